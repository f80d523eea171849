#!/usr/bin/env bash
# A real SLURM "cluster" on this one machine: a controller and two compute
# nodes (bamba-n1, bamba-n2) as three daemons on localhost, for CI and for
# trying scripts/slurm/train.sbatch without a cluster. Needs root (Debian's
# slurm 22.05 runs as root without systemd here).
#
#   scripts/slurm/local_cluster.sh up      # install if missing, configure, start, wait for idle nodes
#   scripts/slurm/local_cluster.sh down    # stop the daemons by their pid files
#   scripts/slurm/local_cluster.sh env     # prints `export SLURM_CONF=...` for sbatch/srun/scontrol
#   scripts/slurm/local_cluster.sh logs    # prints the daemons' logs
#
# Everything lives under $BAMBA_SLURM_DIR (default /var/tmp/bamba-slurm): the
# slurm.conf, state, spool, pid and log files; /etc/slurm is left alone and the
# client commands find the configuration through SLURM_CONF. The node names
# are added to /etc/hosts (127.0.0.1) while the cluster is up, because the
# trainer resolves the first node of SLURM_JOB_NODELIST as its rendezvous
# host. munged is started if it is not running (and stopped again by `down`
# only if this script started it).
#
# Environment knobs: BAMBA_SLURM_DIR, BAMBA_SLURM_CPUS (CPUs each node
# advertises, default 2), BAMBA_SLURM_CTLD_PORT (16817), BAMBA_SLURM_NODE_PORT
# (17001; the second node uses the next port).
#
# If a daemon does not come up, this fails with their logs; it never skips.
set -euo pipefail

DIR=${BAMBA_SLURM_DIR:-/var/tmp/bamba-slurm}
CPUS=${BAMBA_SLURM_CPUS:-2}
CTLD_PORT=${BAMBA_SLURM_CTLD_PORT:-16817}
NODE_PORT=${BAMBA_SLURM_NODE_PORT:-17001}
NODES=(bamba-n1 bamba-n2)
HOSTS_MARK="# bamba-train local SLURM cluster"
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() {
  echo "local_cluster: $*" >&2
  exit 1
}

logs() {
  local f
  for f in "$DIR"/log/*.log /var/log/munge/munged.log; do
    [ -f "$f" ] || continue
    echo "===== $f (last 60 lines) =====" >&2
    tail -n 60 "$f" >&2
  done
}

fail() {
  echo "local_cluster: $*" >&2
  logs
  exit 1
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "need root to install ${missing[*]}"
  command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get to install them"
  echo "local_cluster: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps the packages' init scripts from starting daemons we do
  # not want (a stock slurmctld on the default ports, a second munged).
  local policy=/usr/sbin/policy-rc.d made_policy=
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && made_policy=1
  fi
  if ! apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge; then
    apt-get update && apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge ||
      { [ -n "$made_policy" ] && rm -f $policy; die "apt-get install failed"; }
  fi
  [ -n "$made_policy" ] && rm -f $policy
  return 0
}

start_munge() {
  if [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null | unmunge >/dev/null 2>&1; then
    return 0 # a working munged is already there
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
  touch "$DIR/run/munged.ours"
  for _ in $(seq 50); do
    munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "munged started but munge/unmunge does not work"
}

write_conf() {
  mkdir -p "$DIR"/{state,spool,run,log}
  cat >"$CONF" <<EOF
# Written by scripts/slurm/local_cluster.sh: two nodes on one host.
ClusterName=bamba-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# Two fake nodes share this machine's CPUs: trust the counts below.
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs stay visible to scontrol (no accounting database here).
MinJobAge=900
KillWait=15
InactiveLimit=0
SchedulerParameters=sched_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODES[0]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$NODE_PORT CPUs=$CPUS State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((NODE_PORT + 1)) CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
}

add_hosts() {
  grep -qF "$HOSTS_MARK" /etc/hosts && return 0
  echo "127.0.0.1 ${NODES[*]} $HOSTS_MARK" >>/etc/hosts
}

remove_hosts() {
  grep -qF "$HOSTS_MARK" /etc/hosts || return 0
  # /etc/hosts may be a bind mount (containers): rewrite it in place.
  local kept
  kept=$(grep -vF "$HOSTS_MARK" /etc/hosts)
  printf '%s\n' "$kept" >/etc/hosts
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
  local f=$1 name=$2 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "local_cluster: $name ($pid) ignored SIGTERM; SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

up() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd/slurmctld here run as root)"
  install_packages
  if pid_alive "$DIR/run/slurmctld.pid"; then
    echo "local_cluster: already up (slurmctld pid $(cat "$DIR/run/slurmctld.pid")); run '$0 down' first" >&2
    exit 1
  fi
  rm -rf "$DIR"/{state,spool,log}
  write_conf
  add_hosts
  start_munge
  # -c: start clean (no jobs from an earlier run's state).
  slurmctld -c -f "$CONF" || fail "slurmctld did not start"
  local n
  for n in "${NODES[@]}"; do
    mkdir -p "$DIR/spool/$n"
    slurmd -f "$CONF" -N "$n" || fail "slurmd -N $n did not start"
  done
  # Wait for both nodes to register and become idle.
  local t0=$SECONDS state
  while :; do
    state=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
    if [ "$(grep -c ' idle$' <<<"$state")" = 2 ]; then
      break
    fi
    # A daemon writes its pid file a moment after it forks: a missing file is
    # only an error after a few seconds, a dead pid at once.
    for f in "$DIR/run/slurmctld.pid" "$DIR/run/slurmd-${NODES[0]}.pid" "$DIR/run/slurmd-${NODES[1]}.pid"; do
      if [ -f "$f" ]; then
        pid_alive "$f" || fail "daemon $(cat "$f") (pid file $f) died (node states: ${state:-none})"
      elif ((SECONDS - t0 > 10)); then
        fail "no pid file $f after 10 s: the daemon did not start (node states: ${state:-none})"
      fi
    done
    if ((SECONDS - t0 > 60)); then
      fail "nodes not idle after 60 s: ${state:-sinfo gave nothing}"
    fi
    sleep 1
  done
  echo "local_cluster: up in $((SECONDS - t0)) s; nodes: $(echo $state | tr '\n' ' ')"
  echo "local_cluster: export SLURM_CONF=$CONF"
}

down() {
  local n
  # Jobs first, so no task outlives its slurmd.
  if pid_alive "$DIR/run/slurmctld.pid"; then
    scancel --full --signal=KILL --state=RUNNING -u root 2>/dev/null || true
    scancel -u root 2>/dev/null || true
  fi
  for n in "${NODES[@]}"; do
    stop_pidfile "$DIR/run/slurmd-$n.pid" "slurmd $n"
  done
  stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
  if [ -f "$DIR/run/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid munged
    rm -f "$DIR/run/munged.ours"
  fi
  remove_hosts
  echo "local_cluster: down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  logs) logs ;;
  *) die "usage: $0 up|down|env|logs" ;;
esac
