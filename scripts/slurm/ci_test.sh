#!/usr/bin/env bash
# SLURM end-to-end test (CI, from scripts/test.sh): a real slurmctld and two
# slurmd on this machine (scripts/slurm/local_cluster.sh), and
# scripts/slurm/train.sbatch submitted to them on CPU.
#
#  ref  one process, no SLURM: configs/test/slurm-ci.yaml, the reference losses.
#  (a)  sbatch on 2 nodes x 2 tasks (4 ranks, fsdp, same global batch): the job
#       completes with exit 0, the loss falls, and every step's loss equals the
#       reference's (relative 1e-5, as tests/train_dist.rs).
#  (b)  the same job, preempted after a few steps with `scancel --signal=USR1`
#       (what --signal=USR1@T delivers before a time limit): the ranks save a
#       checkpoint and exit 75, the batch script requeues the job, the requeued
#       job resumes from that checkpoint and completes; every step appears once
#       in metrics.jsonl and its loss equals the reference's.
#
# Needs root (it starts the daemons, installing Debian's slurm packages if
# missing) and a release build of bamba-train (built here if absent). Prints
# how long each part took. Fails loudly, with job and daemon logs; never skips.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

T_START=$SECONDS
declare -A TOOK
phase_start() { PHASE_T0=$SECONDS; echo "== slurm ci: $1"; }
phase_end() { TOOK[$1]=$((SECONDS - PHASE_T0)); echo "== slurm ci: $1 took ${TOOK[$1]} s"; }

[ "$(id -u)" = 0 ] || {
  echo "slurm ci: must run as root (it starts slurmctld/slurmd)" >&2
  exit 1
}

# This test is its own launcher: nothing from an outer job may leak in.
for v in $(compgen -e | grep -E '^(SLURM_|SBATCH_|SRUN_|SALLOC_)' || true); do unset "$v"; done
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_ADDR MASTER_PORT

BIN=$ROOT/target/release/bamba-train
if [ ! -x "$BIN" ]; then
  cargo build --release -p bamba-train
fi
export BAMBA_TRAIN=$BIN

CFG=configs/test/slurm-ci.yaml
STEPS=12            # training.steps in $CFG
PREEMPT_AFTER=3     # logged steps before (b) is preempted
JOB_TIMEOUT=${BAMBA_SLURM_CI_JOB_TIMEOUT:-240}

WORK=$(mktemp -d /var/tmp/bamba-slurm-ci.XXXXXX)
mkdir -p "$WORK/logs"
CLUSTER=scripts/slurm/local_cluster.sh
ok=

cleanup() {
  local rc=$?
  if [ -z "$ok" ]; then
    echo "slurm ci: FAILED (exit $rc); job logs and daemon logs follow; work dir kept: $WORK" >&2
    for f in "$WORK"/logs/*; do
      [ -f "$f" ] || continue
      echo "===== $f =====" >&2
      tail -n 80 "$f" >&2
    done
    squeue 2>/dev/null >&2 || true
    bash "$CLUSTER" logs || true
  fi
  bash "$CLUSTER" down || true
  [ -n "$ok" ] && [ -z "${BAMBA_SLURM_CI_KEEP:-}" ] && rm -rf "$WORK"
  return 0
}
trap cleanup EXIT

fail() {
  echo "slurm ci: FAIL: $*" >&2
  exit 1
}

# "step loss" per line of a metrics.jsonl.
losses() {
  sed -E 's/.*"step":([0-9]+),.*"loss":([^,}]+).*/\1 \2/' "$1/metrics.jsonl"
}

# Every step 1..STEPS exactly once, each loss within 1e-5 (relative, floor 1)
# of the reference; and the loss falls.
compare_losses() {
  local name=$1 run=$2
  losses "$run" | awk -v name="$name" -v steps=$STEPS '
    NR == FNR { ref[$1] = $2; next }
    {
      if ($1 in seen) { printf "%s: step %d logged twice\n", name, $1; bad = 1 }
      seen[$1] = 1; n++
      if (!($1 in ref)) { printf "%s: step %d not in the reference\n", name, $1; bad = 1; next }
      d = $2 - ref[$1]; if (d < 0) d = -d
      a = ref[$1] < 0 ? -ref[$1] : ref[$1]; if (a < 1) a = 1
      if (d > 1e-5 * a) { printf "%s: step %d loss %s vs reference %s\n", name, $1, $2, ref[$1]; bad = 1 }
      if (d > worst) worst = d
    }
    END {
      if (n != steps) { printf "%s: %d logged steps, expected %d\n", name, n, steps; bad = 1 }
      if (bad) exit 1
      printf "%s: %d steps match the single-process losses (max |diff| %.3g)\n", name, n, worst
    }' <(losses "$WORK/ref") - || fail "$name: losses differ from the single-process run"
  losses "$run" | awk -v name="$name" '
    NR <= 3 { first += $2 } { last[NR % 3] = $2 } END {
      tail = last[0] + last[1] + last[2]
      if (!(tail < first)) { printf "%s: loss does not fall (first 3 sum %f, last 3 sum %f)\n", name, first, tail; exit 1 }
    }' || fail "$name: loss does not fall"
}

job_field() { scontrol show job -o "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | head -1; }

# Waits for a job to reach a final state (a requeued job passes through
# REQUEUED and PENDING on its way) and prints that state.
wait_job() {
  local id=$1 t0=$SECONDS state
  while :; do
    state=$(job_field "$id" JobState)
    case $state in
      COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
        echo "$state"
        return 0
        ;;
    esac
    ((SECONDS - t0 < JOB_TIMEOUT)) || {
      scontrol show job "$id" >&2
      fail "job $id still $state after $JOB_TIMEOUT s"
    }
    sleep 1
  done
}

submit() { # name, then extra args for the trainer
  local name=$1
  shift
  sbatch --parsable --job-name="ci-$name" --nodes=2 --ntasks-per-node=2 \
    --gpus-per-node=0 --cpus-per-task=1 --output="$WORK/logs/%x-%j.out" \
    scripts/slurm/train.sbatch "$CFG" --set "checkpoint.output_dir=$WORK/$name" "$@"
}

expect_success() { # id, name
  local id=$1 name=$2 state code
  state=$(wait_job "$id")
  code=$(job_field "$id" ExitCode)
  [ "$state" = COMPLETED ] && [ "$code" = 0:0 ] ||
    fail "$name: job $id ended $state with exit code $code"
}

phase_start "cluster up"
bash "$CLUSTER" up
eval "$(bash "$CLUSTER" env)"
phase_end "cluster up"

phase_start "reference: 1 process, no SLURM"
"$BIN" --config "$CFG" --set "checkpoint.output_dir=$WORK/ref" >"$WORK/logs/ref.out" 2>&1 ||
  fail "reference run failed (see $WORK/logs/ref.out)"
[ "$(losses "$WORK/ref" | wc -l)" = $STEPS ] || fail "reference run logged $(losses "$WORK/ref" | wc -l) steps"
phase_end "reference: 1 process, no SLURM"

phase_start "(a) sbatch 2 nodes x 2 tasks, fsdp"
id=$(submit a)
echo "job $id"
expect_success "$id" a
compare_losses "(a)" "$WORK/a"
[ -d "$WORK/a/checkpoints/step_$STEPS" ] || fail "(a): no final checkpoint step_$STEPS"
# fsdp over 4 ranks writes one shard per rank.
shards=$(ls "$WORK/a/checkpoints/step_$STEPS" | grep -c '^shard_.*\.safetensors$' || true)
[ "$shards" = 4 ] || fail "(a): step_$STEPS has $shards shard files, expected 4 (one per rank)"
phase_end "(a) sbatch 2 nodes x 2 tasks, fsdp"

phase_start "(b) preempt with SIGUSR1, requeue, resume"
id=$(submit b)
echo "job $id"
t0=$SECONDS
until [ -f "$WORK/b/metrics.jsonl" ] && [ "$(wc -l <"$WORK/b/metrics.jsonl")" -ge $PREEMPT_AFTER ]; do
  state=$(job_field "$id" JobState)
  case $state in PENDING | CONFIGURING | RUNNING) ;; *) fail "(b): job $id is $state before it was preempted" ;; esac
  ((SECONDS - t0 < JOB_TIMEOUT)) || fail "(b): job $id did not log $PREEMPT_AFTER steps in $JOB_TIMEOUT s"
  sleep 0.2
done
echo "(b): $(wc -l <"$WORK/b/metrics.jsonl") steps logged; scancel --signal=USR1 $id"
scancel --signal=USR1 "$id"
expect_success "$id" b
restarts=$(job_field "$id" Restarts)
[ "$restarts" = 1 ] || fail "(b): job $id restarted ${restarts:-?} times, expected 1"
log=$WORK/logs/ci-b-$id.out
grep -q "preempted: checkpoint saved; requeueing job $id" "$log" || fail "(b): the batch script did not requeue"
saved=$(sed -n 's/.*stop requested: saved step \([0-9]*\).*/\1/p' "$log" | head -1)
[ -n "$saved" ] || fail "(b): no 'stop requested: saved step N' in $log"
((saved >= PREEMPT_AFTER && saved < STEPS)) || fail "(b): saved at step $saved, expected $PREEMPT_AFTER..$((STEPS - 1))"
[ -d "$WORK/b/checkpoints/step_$saved" ] || fail "(b): checkpoint step_$saved missing"
grep -q "resumed at step $saved" "$log" || fail "(b): the requeued job did not resume at step $saved"
echo "(b): saved step $saved on SIGUSR1, requeued (Restarts=$restarts), resumed at step $saved"
compare_losses "(b)" "$WORK/b"
phase_end "(b) preempt with SIGUSR1, requeue, resume"

ok=1
echo "== slurm ci: passed in $((SECONDS - T_START)) s:" \
  "cluster up ${TOOK[cluster up]} s," \
  "reference ${TOOK[reference: 1 process, no SLURM]} s," \
  "(a) ${TOOK[(a) sbatch 2 nodes x 2 tasks, fsdp]} s," \
  "(b) ${TOOK[(b) preempt with SIGUSR1, requeue, resume]} s"
