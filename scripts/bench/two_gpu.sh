#!/usr/bin/env bash
# Two GPUs of one host, in one device call: NCCL smoke test (fsdp over 2
# processes against 1), then fsdp benchmarks of the 1B config and of
# Bamba-9B (batch 1 x 4096 per GPU, full activation checkpointing).
#   bash scripts/bench/two_gpu.sh .carry/bamba-train
set -uo pipefail
bin=${1:-target/release/bamba-train}
site=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__path__[0]))' 2>/dev/null)
[ -n "$site" ] && export LD_LIBRARY_PATH="$site/nccl/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bash scripts/gpu_smoke.sh "$bin" 2 2>&1 | grep -v '^step [1-3]/'
for cfg in bamba-1b bamba-9b; do
  echo "== bench $cfg fsdp x2, 1 x 4096 per GPU"
  timeout "${BENCH_TIMEOUT:-200}" "$bin" bench --config configs/bench/$cfg.yaml --warmup 1 --steps 2 --profile-steps 1 \
    --set training.global_batch_sequences=2 --set training.micro_batch=1 \
    --set parallelism.activation_checkpointing=1 --nproc-per-node 2 2>&1 | grep -v '"warmup_step"' | tail -5
done
