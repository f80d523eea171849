#!/usr/bin/env bash
# Issue 10's scaling run on one host of 8 GPUs (device kind nvidia-h200-x8):
# Bamba-9B with fsdp over 8 and hsdp as 2 groups of 4 (two simulated nodes),
# then a resume of the 8-GPU run on 4 GPUs from its checkpoint (resharding).
# Compare tokens/s per GPU with scripts/bench/two_gpu.sh's 9B row for the
# scaling efficiency (per-GPU throughput at 8 / at 2).
#   bash scripts/bench/eight_gpu.sh .carry/bamba-train
set -uo pipefail
bin=${1:-target/release/bamba-train}
site=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__path__[0]))' 2>/dev/null)
[ -n "$site" ] && export LD_LIBRARY_PATH="$site/nccl/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
common=(--config configs/bench/bamba-9b.yaml --set training.micro_batch=1 --set parallelism.activation_checkpointing=1)
echo "== bench 9B fsdp x8"
timeout 300 "$bin" bench "${common[@]}" --set training.global_batch_sequences=8 --warmup 1 --steps 3 --nproc-per-node 8 2>&1 | grep summary
echo "== bench 9B hsdp 2 x 4"
timeout 300 "$bin" bench "${common[@]}" --set training.global_batch_sequences=8 --set parallelism.strategy=hsdp \
  --set parallelism.shard_group_size=4 --warmup 1 --steps 3 --nproc-per-node 8 2>&1 | grep summary
echo "== train 9B fsdp x8 for 4 steps with a checkpoint at step 2, then resume on 4 GPUs"
out=/tmp/scale-9b
timeout 400 "$bin" "${common[@]}" --set training.global_batch_sequences=8 --set training.steps=4 \
  --set checkpoint.every_steps=2 --set checkpoint.keep_last=2 --set checkpoint.output_dir=$out --nproc-per-node 8 2>&1 | grep -E "^step|checkpoint" | tail -5
rm -rf $out/checkpoints/step_4
timeout 400 "$bin" "${common[@]}" --set training.global_batch_sequences=8 --set training.steps=4 \
  --set checkpoint.every_steps=0 --set checkpoint.output_dir=$out --nproc-per-node 4 2>&1 | grep -E "resumed|^step" | tail -4
