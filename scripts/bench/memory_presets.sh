#!/usr/bin/env bash
# One GPU, one device call: the host cost of a kernel launch and the 1B
# bench under each of BAMBA_CUDA_MEMORY's pool presets, then the PyTorch
# peer on the same shape (same-call ratio). JSON lines on stdout.
#   bash scripts/bench/memory_presets.sh .carry/bamba-train .carry/peer [presets]
# With PROFILE_DIR set (on the device: PROFILE_DIR=$OUT), the launch test
# also writes host stacks per preset (pass a binary stripped with
# `strip --strip-debug` so that they carry names).
set -uo pipefail
bin=${1:-target/release/bamba-train}
peer=${2:-../shared/peers/torch-bamba}
presets=${3:-subslices mixed exclusive}
config=configs/bench/bamba-1b.yaml
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for preset in $presets; do
  echo "== BAMBA_CUDA_MEMORY=$preset"
  profile=()
  [ -n "${PROFILE_DIR:-}" ] && profile=(--host-profile "$PROFILE_DIR/launch-$preset.folded")
  BAMBA_CUDA_MEMORY=$preset timeout 60 "$bin" bench --config $config --ops --only launch ${profile[@]+"${profile[@]}"} 2>&1 | grep '"launch"\|host_profile'
  BAMBA_CUDA_MEMORY=$preset timeout 150 "$bin" bench --config $config --warmup 2 --steps 4 --profile-steps 1 \
    2>&1 | grep -v '"warmup_step"' | tail -1
done
echo "== peer bamba_1b 1x4096"
PYTHONPATH="$peer/pylib" BAMBA_PEER_SHAPES=1x4096 timeout 200 python3 "$peer/bench_peer.py" 2>&1 | tail -2
