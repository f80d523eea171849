#!/usr/bin/env python3
"""Summarise an ncu CSV of kernel times (`gpu__time_duration.sum`), e.g. of
one decoder layer's forward and backward repeated by `bench --ops`:

    ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum \
        --csv --page raw BIN bench --config C --ops --only mamba_layer > layer.csv
    python3 scripts/dev/ncu_top.py layer.csv [--repeats 3] [--top 30] [--seq] [--base old.csv]

or of one whole step (`bench --warmup 0 --steps 1 --profile-steps 0`) with
`--step`, which skips the setup kernels before the first GEMM.

Per kernel name: total us per repeat, launches per repeat. `--seq` lists one
repeat's kernels in order (grid sizes tell the tensors apart); `--base`
prints the change against an earlier CSV; `--groups` sums by kind (GEMMs,
SSD, attention, norms, ...) as the README's step breakdown reads.
"""
import argparse
import collections
import csv
import io


def load(path):
    text = open(path).read()
    rows = list(csv.reader(io.StringIO(text[text.index('"ID"'):])))
    head = rows[0]
    name, time, grid = (head.index(c) for c in ("Kernel Name", "gpu__time_duration.sum", "Grid Size"))
    out = []
    for r in rows[1:]:
        if len(r) <= time or not r[time]:
            continue
        try:  # the units row after the header has no number
            ns = float(r[time].replace(",", ""))
        except ValueError:
            continue
        out.append((r[name].split("(")[0].strip()[:70], ns / 1e3, r[grid]))
    return out


def by_name(kernels, repeats):
    agg = collections.defaultdict(lambda: [0.0, 0])
    for k, us, _ in kernels:
        agg[k][0] += us / repeats
        agg[k][1] += 1
    return agg


ap = argparse.ArgumentParser()
ap.add_argument("path")
ap.add_argument("--repeats", type=int, default=3, help="how many times the CSV repeats the work (bench --ops: 3)")
ap.add_argument("--top", type=int, default=30)
ap.add_argument("--seq", action="store_true", help="one repeat's kernels in launch order")
ap.add_argument("--base", help="an earlier CSV of the same work, to compare against")
ap.add_argument("--groups", action="store_true", help="totals by kind of kernel")
ap.add_argument("--step", action="store_true",
                help="a whole training step (bench --steps 1): skip the setup kernels before the first GEMM, one repeat")
a = ap.parse_args()


# Kind of a kernel by name prefix, first match wins (cuBLAS's TF32 kernels
# name their types; its bf16 ones are nvjet).
GROUPS = [
    ("TF32/f32 GEMMs", ("sm90_xmma_gemm_f32", "void cutlass", "cutlass")),
    ("bf16 GEMMs", ("nvjet",)),
    ("SSD intra-chunk", ("ssd_diag",)),
    ("SSD other", ("ssd_", "scale_rows", "chunk_cumsum", "head_sum", "scale_fwd", "scale_bwd", "dt_")),
    ("flash attention", ("flash",)),
    ("norms", ("norm_", "colsum")),
    ("conv", ("conv",)),
    ("SwiGLU", ("swiglu",)),
    ("split gradients", ("add_narrow",)),
    ("elementwise (burn)", ("kernel_binop", "kernel_scalar", "unary_float", "cast_element", "full_kernel",
                            "copy_kernel", "slice", "mask_", "flip", "cumulative")),
    ("reductions (burn)", ("reduce_kernel",)),
    ("gradient norm", ("sum_squares", "sum_parts")),
    ("loss", ("xent",)),
    ("embedding", ("embed",)),
    ("rope", ("rope",)),
]


def group_of(name):
    return next((g for g, pre in GROUPS if name.startswith(pre)), "other")


def step_only(ks):
    first = next((i for i, k in enumerate(ks) if k[0].startswith("nvjet")), 0)
    return ks[first:]


if a.step:
    a.repeats = 1
ks = load(a.path)
if a.step:
    ks = step_only(ks)
agg = by_name(ks, a.repeats)
total = sum(us for us, _ in agg.values())
print(f"{len(ks) // a.repeats} kernels, {total:.0f} us per repeat")
if a.base:
    bk = load(a.base)
    base = by_name(step_only(bk) if a.step else bk, a.repeats)
    print(f"base: {sum(us for us, _ in base.values()):.0f} us per repeat")
for k, (us, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[: a.top]:
    line = f"{us:9.1f} us {n // a.repeats:4d}x  {k}"
    if a.base:
        line += f"   (base {base.get(k, [0.0])[0]:.1f})"
    print(line)
if a.base:
    for k in sorted(set(base) - set(agg)):
        print(f"gone: {base[k][0]:9.1f} us  {k}")
if a.seq:
    print()
    for j, (k, us, grid) in enumerate(ks[: len(ks) // a.repeats]):
        print(f"{j:4d} {us:8.1f} us  {k} {grid}")
if a.groups:
    print()
    tot = collections.defaultdict(float)
    for k, (us, _) in agg.items():
        tot[group_of(k)] += us
    for g, us in sorted(tot.items(), key=lambda kv: -kv[1]):
        print(f"{us / 1e3:8.2f} ms  {g}")
