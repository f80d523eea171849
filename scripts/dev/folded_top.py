#!/usr/bin/env python3
"""Summarise folded stacks (`bench --host-profile`): samples per thread, then
the functions with the most inclusive and self samples.

    python3 scripts/dev/folded_top.py host.folded [--thread NAME] [--top 40] [--under SUBSTR]
"""
import argparse
import collections

ap = argparse.ArgumentParser()
ap.add_argument("path")
ap.add_argument("--thread", help="only threads whose name contains this")
ap.add_argument("--under", help="only stacks that pass through a frame containing this")
ap.add_argument("--top", type=int, default=40)
a = ap.parse_args()

threads = collections.Counter()
incl = collections.Counter()
self_ = collections.Counter()
total = 0
for line in open(a.path):
    stack, count = line.rstrip("\n").rsplit(" ", 1)
    count = int(count)
    frames = stack.split(";")
    thread, frames = frames[0], frames[1:]
    threads[thread] += count
    if a.thread and a.thread not in thread:
        continue
    if a.under:
        idx = next((i for i, f in enumerate(frames) if a.under in f), None)
        if idx is None:
            continue
        frames = frames[idx:]
    total += count
    for f in set(frames):
        incl[f] += count
    if frames:
        self_[frames[-1]] += count

print("samples per thread:")
for t, c in threads.most_common():
    print(f"  {c:7d}  {t}")
print(f"\nselected: {total} samples\n\ninclusive:")
for f, c in incl.most_common(a.top):
    print(f"  {c:7d} {100 * c / max(total, 1):5.1f}%  {f[:160]}")
print("\nself:")
for f, c in self_.most_common(a.top):
    print(f"  {c:7d} {100 * c / max(total, 1):5.1f}%  {f[:160]}")
