#!/usr/bin/env bash
# One GPU, side by side in one device call: bamba-train's bench of the 1B
# config, then the PyTorch peer (HF Bamba + mamba_ssm Triton kernels) on the
# same shape. JSON lines on stdout.
#   bash scripts/bench/single_gpu.sh .carry/bamba-train .carry/peer [batch]
set -uo pipefail
bin=${1:-target/release/bamba-train}
peer=${2:-../shared/peers/torch-bamba}
batch=${3:-1}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for ac in 0 1; do
  echo "== bamba-train bench bamba-1b batch $batch activation_checkpointing $ac"
  timeout 200 "$bin" bench --config configs/bench/bamba-1b.yaml --warmup 2 --steps 4 --profile-steps 1 \
    --set training.global_batch_sequences="$batch" --set training.micro_batch="$batch" \
    --set parallelism.activation_checkpointing=$ac 2>&1 | grep -v '"warmup_step"' | tail -7
done
echo "== peer bamba_1b ${batch}x4096"
PYTHONPATH="$peer/pylib" BAMBA_PEER_SHAPES="${batch}x4096" timeout 240 python3 "$peer/bench_peer.py" 2>&1 | tail -3
