#!/usr/bin/env bash
# One device call for a kernel change, in the order that matters when the
# call is cut short: every fused-kernel check, the 1B bench step, HF parity,
# the fused AdamW's bandwidth, then ncu over one step (CSV into $OUT for
# `python3 scripts/dev/ncu_top.py step.csv --step [--base OLD] [--groups]`).
#   bash scripts/dev/kernel_call.sh .carry/bamba-train [quick]
# `quick`: only the checks and the bench step.
set -uo pipefail
bin=${1:-target/release/bamba-train}
out=${OUT:-/tmp}
cfg=configs/bench/bamba-1b.yaml
echo "== kernel checks (failures, then the count that passed)"
# The reference side's reductions would autotune per shape (cubecl's
# default): the least of it is enough for a comparison.
CUBECL_AUTOTUNE_LEVEL=minimal timeout 360 "$bin" bench --kernels --config $cfg > "$out/kernels.txt" 2>&1
grep -E '"kernel"|error|panic' "$out/kernels.txt" | grep -v '"pass":true' | cut -c1-250
grep -c '"pass":true' "$out/kernels.txt"
echo "== the slowest checks (ms each, both sides)"
python3 - "$out/kernels.txt" <<'PY'
import json, sys
ms = {}
for line in open(sys.argv[1]):
    try:
        d = json.loads(line)
    except ValueError:
        continue
    if "ms" in d:
        ms[(d["kernel"], d["dtype"])] = d["ms"]
print(f"{len(ms)} checks, {sum(ms.values()) / 1e3:.0f} s")
for (k, t), v in sorted(ms.items(), key=lambda kv: -kv[1])[:8]:
    print(f"{v:9.0f} {t} {k}")
PY
echo "== 1B bench, batch 1 x 4096, activation_checkpointing 0"
timeout 200 "$bin" bench --config $cfg --warmup 2 --steps 5 --profile-steps 1 2>&1 |
  grep -v '"warmup_step"' | grep -E 'summary|"step":5' | cut -c1-900
[ "${2:-}" = quick ] && exit 0
echo "== HF parity"
timeout 200 bash scripts/gpu_parity.sh "$bin" 2>&1 | grep -E '^[a-z_]+ (f32|bf16)' | cut -c1-200
echo "== fused AdamW bandwidth"
timeout 60 "$bin" bench --ops --only adamw --config $cfg 2>&1 | grep '"adamw"'
echo "== ncu over one step (AdamW excluded: it cannot be profiled here)"
timeout 200 ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
  --page raw -k 'regex:^(?!adamw)' "$bin" bench --config $cfg --warmup 0 --steps 1 \
  --profile-steps 0 > "$out/step.csv" 2>/dev/null
echo "ncu rc $?"
