#!/usr/bin/env bash
# One machine, N processes (one per GPU, or CPU processes for testing):
#   scripts/launch_local.sh 4 configs/tiny.yaml [--set key=value ...]
# Same as `bamba-train --nproc-per-node N --config ...`, which this calls.
set -euo pipefail
n=${1:?usage: launch_local.sh NPROC CONFIG [args...]}
config=${2:?usage: launch_local.sh NPROC CONFIG [args...]}
shift 2
exec ${BAMBA_TRAIN:-cargo run --release -p bamba-train --} --nproc-per-node "$n" --config "$config" "$@"
