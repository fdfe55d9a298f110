#!/usr/bin/env bash
# `cliper batch` as a real Slurm array job, on a one-node cluster started on
# this machine (munge + slurmctld + slurmd, all in a scratch folder, all
# stopped by PID at the end).
#
#   tests/cluster/slurm.sh CLIPER_BIN WEIGHTS INPUT_DIR WORK_DIR
#
# It runs, with INPUT_DIR holding a handful of videos and images (one of
# them unreadable):
#   1. a single-process `cliper batch` over INPUT_DIR into WORK_DIR/single;
#   2. an array of 3 tasks into WORK_DIR/array; task 1 is cancelled
#      (`scancel`) as soon as it has finished its first input, while it is
#      still working on the next;
#   3. the same array submitted again, which must finish the rest;
#   4. `cliper batch merge` of both folders.
# The caller (tests/batch.rs) compares the tables and the status files.
# On success the last line is `SLURM-TEST: OK`. Where Slurm cannot be
# installed or started here it prints a NOTICE and exits 0 with
# `SLURM-TEST: SKIPPED`.
set -uo pipefail

BIN=$(realpath "$1")
WEIGHTS=$(realpath "$2")
INPUT=$(realpath "$3")
WORK=$(realpath -m "$4")
mkdir -p "$WORK"

skip() {
    echo "NOTICE: $*; the Slurm array test is skipped"
    echo "SLURM-TEST: SKIPPED"
    exit 0
}
fail() {
    echo "SLURM-TEST: FAILED: $*"
    for f in "$WORK"/logs/*.log "$WORK"/slurm/*.log; do
        [ -f "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }
    done
    exit 1
}

# Debian's packages, when they are missing and we may install them.
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge \
            >"$WORK/apt.log" 2>&1 || skip "cannot install slurm-wlm and munge (see $WORK/apt.log)"
    else
        skip "slurm-wlm and munge are not installed (apt-get install slurm-wlm munge, as root)"
    fi
fi
[ "$(id -u)" = 0 ] || skip "the one-node cluster runs its daemons as root, and this is $(id -un)"

S="$WORK/slurm"
mkdir -p "$S/state" "$S/spool" "$WORK/logs"
chmod 711 "$S"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
}
trap cleanup EXIT

# munge, with its own key and socket.
head -c 1024 /dev/urandom >"$S/munge.key"
chmod 400 "$S/munge.key"
munged -F --force --key-file="$S/munge.key" --socket="$S/munge.sock" \
    --pid-file="$S/munged.pid" --log-file="$S/munged.log" --seed-file="$S/munge.seed" \
    >"$S/munged.out" 2>&1 &
PIDS+=($!)

HOST=$(hostname -s)
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
PORT=$((20000 + RANDOM % 20000))
export SLURM_CONF="$S/slurm.conf"
cat >"$SLURM_CONF" <<EOF
ClusterName=cliper-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge.sock
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/slurmctld.log
SlurmdLogFile=$S/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

for _ in $(seq 50); do [ -S "$S/munge.sock" ] && break; sleep 0.1; done
[ -S "$S/munge.sock" ] || skip "munged did not start ($(tail -n 3 "$S/munged.log" 2>/dev/null))"
slurmctld -D -i -f "$SLURM_CONF" >"$S/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" >"$S/slurmd.out" 2>&1 &
PIDS+=($!)
up=""
for _ in $(seq 100); do
    if sinfo -h -o "%T" 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then up=1; break; fi
    sleep 0.2
done
[ -n "$up" ] || skip "slurmctld/slurmd did not bring the node up ($(tail -n 3 "$S/slurmctld.log" 2>/dev/null | tr '\n' ' '))"
echo "slurm: node $HOST with $CPUS CPUs is up"

# Waits until no job of ours is queued or running (or 300 s).
wait_jobs() {
    for _ in $(seq 1500); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
        sleep 0.2
    done
    fail "jobs still queued after 300 s: $(squeue 2>&1 | tr '\n' ' ')"
}

# 1. One process, the reference.
"$BIN" batch --input "$INPUT" --out "$WORK/single" --weights "$WEIGHTS" \
    >"$WORK/logs/single.log" 2>&1
echo "single process: exit $?"

# 2. The array, with task 1 cancelled after its first input.
cmd="\"$BIN\" batch --input \"$INPUT\" --out \"$WORK/array\" --weights \"$WEIGHTS\""
JOB=$(sbatch --parsable --array=0-2 --cpus-per-task=1 -o "$WORK/logs/run1-%a.log" \
    --wrap "$cmd") || fail "sbatch refused the array"
echo "submitted array $JOB"
STATUS1="$WORK/array/_status/task-1-of-3.jsonl"
cancelled=""
for _ in $(seq 1500); do
    if [ -f "$STATUS1" ] && [ "$(grep -c . "$STATUS1")" -ge 1 ]; then
        scancel "${JOB}_1" && cancelled=1
        break
    fi
    sleep 0.1
done
[ -n "$cancelled" ] || fail "task 1 never finished an input"
echo "cancelled ${JOB}_1 after $(grep -c . "$STATUS1") input(s)"
wait_jobs
echo "first submission: task 1 wrote $(grep -c . "$STATUS1") status line(s)"

# 3. Submit the same array again: it must finish what is left.
JOB2=$(sbatch --parsable --array=0-2 --cpus-per-task=1 -o "$WORK/logs/run2-%a.log" \
    --wrap "$cmd") || fail "sbatch refused the second array"
wait_jobs
echo "second submission $JOB2 done"

# 4. Merge both.
"$BIN" batch merge "$WORK/single" >"$WORK/logs/merge-single.log" 2>&1 || fail "merge of the single run"
"$BIN" batch merge "$WORK/array" >"$WORK/logs/merge-array.log" 2>&1 || fail "merge of the array"
cat "$WORK/logs/merge-array.log"
echo "SLURM-TEST: OK"
