#!/usr/bin/env bash
# Bamba-9B on two GPUs in one device call: bamba-train's fsdp bench at each
# per-GPU batch (and, with PRESETS, each BAMBA_CUDA_MEMORY preset; unset:
# the default pools; with ACS, each activation-checkpointing fraction, else
# the config's; 0 runs layer by layer without recomputation), then
# the PyTorch FSDP2 peer at the same batches (same-call ratio).
# TRACE=1 adds BAMBA_MEMORY_TRACE (one traced step per run; full output in
# $OUT or /tmp).
#   BATCHES="1 2" ACS="0.25 0.125" PRESETS="bucketed mixed" bash scripts/bench/two_gpu_9b.sh .carry/bamba-train .carry/peer
# The issue-9 pair in one call (the bench config: per layer, nothing
# recomputed: 131.1 GB as a simulated rank of 2, `bench --simulate-ranks 2`
# on one H200; 0.25, 122.9 GB, if NCCL's buffers do not fit beside it):
#   SIM=1 TRACE=1 BATCHES=2 PEER_BATCHES=2 ACS="config 0.25" bash scripts/bench/two_gpu_9b.sh .carry/bamba-train .carry/peer
set -uo pipefail
bin=${1:-target/release/bamba-train}
peer=${2:-../shared/peers/torch-bamba}
site=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__path__[0]))' 2>/dev/null)
[ -n "$site" ] && export LD_LIBRARY_PATH="$site/nccl/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -n "${TRACE:-}" ] && export BAMBA_MEMORY_TRACE=1
for preset in ${PRESETS:-default}; do
  [ "$preset" = default ] && preset=
  for b in ${BATCHES:-1 2}; do
    for ac in ${ACS:-config}; do
      # ac 0 streams layer by layer (per_layer): the whole-model step cannot fit the 9B.
      acset=(); [ "$ac" = config ] || acset=(--set parallelism.activation_checkpointing=$ac)
      [ "$ac" = 0 ] && acset+=(--set parallelism.per_layer=true)
      echo "== bamba-train 9B fsdp x2, $b x 4096 per GPU, ac=$ac, BAMBA_CUDA_MEMORY=${preset:-(default)} ($(date +%T))"
      log="${OUT:-/tmp}/9b_x2_b${b}_ac${ac}_${preset:-default}.txt"
      BAMBA_CUDA_MEMORY=$preset timeout "${BENCH_TIMEOUT:-180}" "$bin" bench --config configs/bench/bamba-9b.yaml \
        --warmup "${WARMUP:-1}" --steps 3 --profile-steps 1 --set training.global_batch_sequences=$((2 * b)) \
        --set training.micro_batch=$b "${acset[@]}" \
        --nproc-per-node 2 > "$log" 2>&1
      grep -E '"bench"|rror|panic|memory' "$log" | grep -v memory_trace | tail -4
      # With TRACE=1, rank 0's memory at each unit boundary (whole trace in $log).
      grep -E '"memory_trace":"(head backward|backward 31: graph ready|optimizer)' "$log"
    done
  done
done
# SIM=1: the config's run again as rank 0 of 2 on GPU 0 alone (no transfers):
# what the collectives cost the real run above.
if [ -n "${SIM:-}" ]; then
  echo "== bamba-train 9B as rank 0 of 2 on one GPU (--simulate-ranks 2) ($(date +%T))"
  CUDA_VISIBLE_DEVICES=0 timeout "${BENCH_TIMEOUT:-180}" "$bin" bench --config configs/bench/bamba-9b.yaml \
    --simulate-ranks 2 --warmup "${WARMUP:-1}" --steps 3 --profile-steps 0 2>&1 |
    grep -E '"bench":"summary"|rror|panic' | cut -c1-900
fi
for b in ${PEER_BATCHES-2 1}; do
  echo "== peer: PyTorch FSDP2 Bamba-9B, $b x 4096 per GPU ($(date +%T))"
  PYTHONPATH="$peer/pylib" BSZ=$b timeout "${PEER_TIMEOUT:-240}" python3 -m torch.distributed.run --nproc_per_node 2 \
    "$peer/bench_peer_fsdp_9b.py" 2>&1 | grep -E '^\{' | tail -3
done
echo "== done ($(date +%T))"
