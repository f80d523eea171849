#!/usr/bin/env bash
# Two GPUs of one host, in one device call: NCCL smoke test (fsdp over 2
# processes against 1), then fsdp benchmarks of the 1B config and of
# Bamba-9B (batch 1 x 4096 per GPU, full activation checkpointing), and the
# 1B at ac 0 on the whole model and layer by layer.
#   PEER=.carry/peer bash scripts/bench/two_gpu.sh .carry/bamba-train
set -uo pipefail
bin=${1:-target/release/bamba-train}
site=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__path__[0]))' 2>/dev/null)
[ -n "$site" ] && export LD_LIBRARY_PATH="$site/nccl/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -z "${SKIP_SMOKE:-}" ] && bash scripts/gpu_smoke.sh "$bin" 2 2>&1 | grep -v '^step [1-3]/'
echo "== collectives, 256 MB f32: bamba-train (NCCL through cudarc) then torch.distributed"
timeout 120 "$bin" bench --collectives 256 --config configs/bench/bamba-1b.yaml --nproc-per-node 2 2>&1 | grep collective
timeout 120 python3 -m torch.distributed.run --nproc_per_node 2 scripts/bench/torch_collectives.py 256 2>&1 | grep collective
echo "== checkpoint of the 1B config (fsdp x2): stall and write throughput"
timeout 200 "$bin" --config configs/bench/bamba-1b.yaml --set training.global_batch_sequences=2 --set training.micro_batch=1 \
  --set parallelism.activation_checkpointing=1 --set training.steps=3 --set checkpoint.every_steps=2 \
  --set checkpoint.output_dir=/tmp/ckpt-1b --nproc-per-node 2 2>&1 | grep -E "checkpoint step|^step|error" | tail -6
du -sh /tmp/ckpt-1b/checkpoints/step_* 2>/dev/null
# cfg:overlap_comm pairs; the 1B config also without overlap (issue 5).
for run in ${BENCH_RUNS-bamba-1b:true bamba-1b:false bamba-9b:true}; do
  cfg=${run%%:*} overlap=${run##*:}
  echo "== bench $cfg fsdp x2, 1 x 4096 per GPU, overlap_comm $overlap"
  timeout "${BENCH_TIMEOUT:-200}" "$bin" bench --config configs/bench/$cfg.yaml --warmup 1 --steps 3 --profile-steps 1 \
    --set training.global_batch_sequences=2 --set training.micro_batch=1 --set parallelism.overlap_comm=$overlap \
    --set parallelism.activation_checkpointing=1 --nproc-per-node 2 2>&1 | grep -v '"warmup_step"' | tail -2
done
# The 1B without checkpointing: the whole-model step against layer by layer
# (per_layer: collectives overlapped, one layer's gradients at a time).
for pl in ${PER_LAYER_RUNS-false true}; do
  echo "== bench bamba-1b fsdp x2, 1 x 4096 per GPU, ac 0, per_layer $pl"
  timeout "${BENCH_TIMEOUT:-200}" "$bin" bench --config configs/bench/bamba-1b.yaml --warmup 1 --steps 3 --profile-steps 1 \
    --set training.global_batch_sequences=2 --set training.micro_batch=1 --set parallelism.activation_checkpointing=0 \
    --set parallelism.per_layer=$pl --nproc-per-node 2 2>&1 | grep -v '"warmup_step"' | tail -2
done
if [ -n "${PEER:-}" ]; then
  echo "== peer: PyTorch FSDP2 Bamba-9B, batch 1 x 4096 per GPU"
  PYTHONPATH="$PEER/pylib" BSZ=1 timeout 400 python3 -m torch.distributed.run --nproc_per_node 2 \
    "$PEER/bench_peer_fsdp_9b.py" 2>&1 | grep -E '^\{' | tail -3
fi
