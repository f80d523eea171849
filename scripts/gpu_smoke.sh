#!/usr/bin/env bash
# A few training steps of the tiny config on the GPU, f32 and bf16, single
# process (and, with 2+ GPUs, fsdp over NCCL against the single-process run).
#   bash scripts/gpu_smoke.sh .carry/bamba-train [nproc]
set -uo pipefail
bin=${1:-target/release/bamba-train}
nproc=${2:-1}
site=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__path__[0]))' 2>/dev/null)
[ -n "$site" ] && export LD_LIBRARY_PATH="$site/nccl/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
common=(--config configs/tiny.yaml --set training.device=cuda --set training.steps=6 --set schedule.warmup_steps=1
  --set logging.progress=lines --set logging.every_steps=1 --set checkpoint.every_steps=0 --set data.distribute=by_row
  --set training.global_batch_sequences=4 --set training.micro_batch=2 --set optimizer.eps=1e-4)
for prec in f32 bf16; do
  echo "== tiny cuda $prec, 1 process"
  timeout 120 "$bin" "${common[@]}" --set training.precision=$prec --set checkpoint.output_dir=/tmp/smoke-$prec-1 2>&1 | tail -3
  if [ "$nproc" -gt 1 ]; then
    # Whole-model step, then the per-layer step with the collectives
    # overlapped in the NCCL stream (prefetch), then without overlap, then
    # per layer with nothing recomputed (every layer resharded after
    # forward and gathered again for backward), then that without reshard,
    # then hsdp per layer in nproc/2-rank groups (the replicas' average of
    # each slice in the replicate communicator's stream, once a step).
    for mode in whole overlap serial reshard keep hsdp; do
      case $mode in
        whole) extra=() ;;
        hsdp) extra=(--set parallelism.strategy=hsdp --set parallelism.shard_group_size=$((nproc / 2))
          --set parallelism.per_layer=true) ;;
        reshard) extra=(--set parallelism.per_layer=true) ;;
        keep) extra=(--set parallelism.per_layer=true --set parallelism.reshard_after_forward=false) ;;
        overlap) extra=(--set parallelism.activation_checkpointing=1 --set parallelism.overlap_comm=true) ;;
        serial) extra=(--set parallelism.activation_checkpointing=1 --set parallelism.overlap_comm=false) ;;
      esac
      echo "== tiny cuda $prec, fsdp over $nproc processes (NCCL), $mode"
      timeout 120 "$bin" "${common[@]}" --set training.precision=$prec --set checkpoint.output_dir=/tmp/smoke-$prec-$nproc-$mode \
        --set training.micro_batch=1 "${extra[@]}" --nproc-per-node "$nproc" 2>&1 | tail -2
      python3 - "$prec" "$nproc" "$mode" <<'PY'
import json, sys
prec, n, mode = sys.argv[1:4]
load = lambda p: [(r["step"], r["loss"]) for r in map(json.loads, open(p)) if "loss" in r]
a, b = load(f"/tmp/smoke-{prec}-1/metrics.jsonl"), load(f"/tmp/smoke-{prec}-{n}-{mode}/metrics.jsonl")
print(json.dumps({"precision": prec, "nproc": int(n), "mode": mode, "steps": len(b), "max_loss_diff": max(abs(x[1] - y[1]) for x, y in zip(a, b)), "losses_1": [round(x[1], 5) for x in a], "losses_n": [round(y[1], 5) for y in b]}))
PY
    done
  fi
done
