#!/usr/bin/env bash
# Bamba-9B's layers 16 deep on ONE GPU (fsdp solo), 2 x 4096: the per-GPU
# compute and per-layer activation memory of the 9B on 2 GPUs, without its
# communication, for when no 2-GPU machine is at hand (README: "Current
# figures"). Each value in ACS is one run; RE sets `recompute_elementwise`
# (true/false). The per-layer step throughout (at ac 0 too, as two_gpu_9b.sh runs it).
#   ACS="0.625 0" RE="true false" bash scripts/bench/proxy_9b.sh .carry/bamba-train
# Per kept layer: (peak at ac 0 - peak at ac p) / (16 * p).
set -uo pipefail
bin=${1:-target/release/bamba-train}
for re in ${RE:-true}; do
  for ac in ${ACS:-0.25 0.125 0}; do
    echo "== 9B x16 layers, 2 x 4096, ac=$ac, recompute_elementwise=$re ($(date +%T))"
    timeout "${BENCH_TIMEOUT:-110}" "$bin" bench --config configs/bench/bamba-9b.yaml \
      --set model.hf.num_hidden_layers=16 --set 'model.hf.attn_layer_indices=[9]' \
      --set training.global_batch_sequences=2 --set parallelism.activation_checkpointing=$ac \
      --set parallelism.recompute_elementwise=$re --set parallelism.per_layer=true --steps 4 --profile-steps 0 2>&1 |
      grep -E '"bench"|rror|panic' | cut -c1-700
  done
done
