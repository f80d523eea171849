#!/usr/bin/env bash
# Issue 10's scaling run on one host of 8 GPUs (device kind nvidia-h200-x8):
# Bamba-9B with fsdp over 8 and hsdp as 2 groups of 4 (two simulated nodes),
# then a resume of the 8-GPU run on 4 GPUs from its checkpoint (resharding).
# The same bench on 2 of the GPUs first gives the scaling efficiency in the
# same call (tokens/s per GPU at 8 / at 2; the target is 90% or better).
#   bash scripts/bench/eight_gpu.sh .carry/bamba-train
set -uo pipefail
bin=${1:-target/release/bamba-train}
site=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__path__[0]))' 2>/dev/null)
[ -n "$site" ] && export LD_LIBRARY_PATH="$site/nccl/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
common=(--config configs/bench/bamba-9b.yaml --set training.micro_batch=1 --set parallelism.activation_checkpointing=1)
echo "== bench 9B fsdp x2 (GPUs 0 and 1: the scaling baseline)"
CUDA_VISIBLE_DEVICES=0,1 timeout 300 "$bin" bench "${common[@]}" --set training.global_batch_sequences=2 \
  --warmup 1 --steps 3 --nproc-per-node 2 2>&1 | grep summary | tee /tmp/scale-x2.json
echo "== bench 9B fsdp x8"
timeout 300 "$bin" bench "${common[@]}" --set training.global_batch_sequences=8 --warmup 1 --steps 3 --nproc-per-node 8 2>&1 | grep summary | tee /tmp/scale-x8.json
echo "== bench 9B hsdp 2 x 4"
timeout 300 "$bin" bench "${common[@]}" --set training.global_batch_sequences=8 --set parallelism.strategy=hsdp \
  --set parallelism.shard_group_size=4 --warmup 1 --steps 3 --nproc-per-node 8 2>&1 | grep summary | tee /tmp/scale-hsdp.json
python3 - <<'PY'
import json
def per_gpu(p):
    try: return json.loads(open(p).read().splitlines()[-1])["tokens_per_s_per_device"]
    except Exception: return None
base = per_gpu("/tmp/scale-x2.json")
for name in ("x8", "hsdp"):
    v = per_gpu(f"/tmp/scale-{name}.json")
    if base and v:
        print(json.dumps({"scaling": name, "tokens_per_s_per_gpu": v, "at_2": base, "efficiency": v / base}))
PY
echo "== train 9B fsdp x8 for 4 steps with a checkpoint at step 2, then resume on 4 GPUs"
out=/tmp/scale-9b
timeout 400 "$bin" "${common[@]}" --set training.global_batch_sequences=8 --set training.steps=4 \
  --set checkpoint.every_steps=2 --set checkpoint.keep_last=2 --set checkpoint.output_dir=$out --nproc-per-node 8 2>&1 | grep -E "^step|checkpoint" | tail -5
rm -rf $out/checkpoints/step_4
timeout 400 "$bin" "${common[@]}" --set training.global_batch_sequences=8 --set training.steps=4 \
  --set checkpoint.every_steps=0 --set checkpoint.output_dir=$out --nproc-per-node 4 2>&1 | grep -E "resumed|^step" | tail -4
