#!/usr/bin/env bash
# Exact resume on the GPU: the tiny config trained 8 steps with checkpoints
# at 4 and 8, then a second run started from a copy of the first run's
# step 4 alone. Its losses for steps 5 to 8 and its step-8 checkpoint
# (weights, AdamW moments, loader state) must equal the first run's to the
# bit: every kernel is deterministic (no float atomics), so CUDA resumes as
# exactly as the CPU (tests/train_resume.rs).
#   bash scripts/gpu_resume.sh .carry/bamba-train
set -uo pipefail
bin=${1:-target/release/bamba-train}
root=/tmp/gpu-resume logs=${OUT:-/tmp}
rm -rf "$root"
common=(--config configs/tiny.yaml --set training.device=cuda --set training.steps=8
  --set schedule.warmup_steps=2 --set checkpoint.every_steps=4 --set checkpoint.keep_last=2 --set logging.every_steps=1
  --set logging.progress=lines)
status=0
for mode in bf16 bf16-per-layer f32; do
  case $mode in
    bf16) extra=(--set training.precision=bf16) ;;
    bf16-per-layer) extra=(--set training.precision=bf16 --set parallelism.per_layer=true) ;;
    f32) extra=(--set training.precision=f32) ;;
  esac
  a=$root/$mode/a b=$root/$mode/b
  timeout 120 "$bin" "${common[@]}" "${extra[@]}" --set checkpoint.output_dir="$a" > "$logs/resume-$mode-a.log" 2>&1 ||
    { echo "$mode: the first run failed"; tail -5 "$logs/resume-$mode-a.log"; status=1; continue; }
  mkdir -p "$b/checkpoints" && cp -r "$a/checkpoints/step_4" "$b/checkpoints/"
  timeout 120 "$bin" "${common[@]}" "${extra[@]}" --set checkpoint.output_dir="$b" > "$logs/resume-$mode-b.log" 2>&1 ||
    { echo "$mode: the resumed run failed"; tail -5 "$logs/resume-$mode-b.log"; status=1; continue; }
  python3 - "$a" "$b" "$mode" <<'PY' || status=1
import filecmp, json, os, sys
a, b, mode = sys.argv[1:4]
load = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in r}
la, lb = load(a), load(b)
steps = sorted(s for s in lb if s > 4)
same_loss = steps == [5, 6, 7, 8] and all(la[s] == lb[s] for s in steps)
da, db = f"{a}/checkpoints/step_8", f"{b}/checkpoints/step_8"
tensors = sorted(f for f in os.listdir(da) if f.endswith((".safetensors", ".bin")) or f.startswith("loader"))
differ = [f for f in tensors if not filecmp.cmp(f"{da}/{f}", f"{db}/{f}", shallow=False)]
ok = same_loss and tensors and not differ
print(json.dumps({"mode": mode, "exact": bool(ok), "steps": steps, "losses_a": [la.get(s) for s in steps],
                  "losses_b": [lb[s] for s in steps], "files_compared": len(tensors), "files_differ": differ}))
sys.exit(0 if ok else 1)
PY
done
exit $status
