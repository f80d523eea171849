#!/usr/bin/env bash
# Runs the HF parity fixtures through `bamba-train forward` on the GPU (f32
# and bf16) and prints the errors against transformers. On the device machine:
#   bash scripts/gpu_parity.sh .carry/bamba-train
set -euo pipefail
bin=${1:-target/release/bamba-train}
out=$(mktemp -d)
for case in tests/fixtures/parity/*/; do
  name=$(basename "$case")
  for dtype in f32 bf16; do
    "$bin" forward --model "$case" --inputs "$case/inputs.safetensors" --out "$out/$name-$dtype.safetensors" --device cuda --dtype "$dtype"
    printf '%s %s ' "$name" "$dtype"
    python3 scripts/compare_parity.py "$out/$name-$dtype.safetensors" "$case/expected.safetensors"
  done
done
