#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: "Run all tests").
# Fetches the pinned Llama-3 tokenizer (sha256-checked) for the data tests,
# then runs every workspace test on burn's CPU backend in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/data/fetch_tokenizer.sh
cargo test --release --workspace
# SLURM end to end (README: "Running on a cluster"): a real slurmctld and two
# slurmd on this machine, train.sbatch on 2 nodes x 2 CPU ranks, and a
# preempted, requeued, resumed job; about a minute. Needs root.
bash scripts/slurm/ci_test.sh
