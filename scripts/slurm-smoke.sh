#!/usr/bin/env bash
# Runs deploy/slurm/cvdist.sbatch on a real Slurm cluster: one node (this machine), started
# for the test from a configuration in a temporary directory, then torn down.
#
#   scripts/slurm-smoke.sh
#
# 1. Installs Debian's slurm-wlm and munge when they are absent (root + apt-get; the
#    packages' own services are not started).
# 2. Writes slurm.conf (one node, this machine's CPUs, two stand-in GPUs so the script's
#    `#SBATCH --gpus-per-task=1` is honoured), a MUNGE key, and starts munged, slurmctld
#    and slurmd on free ports.
# 3. Job 1: `sbatch --wait` of the project's sbatch script with 2 tasks on the CPU,
#    resnet20 on synthetic data for 2 epochs. It must end COMPLETED with exit code 0, the
#    cvdist job SUCCEEDED with 2 epochs on 2 workers, and metrics equal to `cvdist local`
#    running the same job (2 workers x 1 thread, same seed).
# 4. Job 2: a long run, requeued with `scontrol requeue` once its first epoch is stored
#    (as preemption does): the restarted batch script must resume the same cvdist job from
#    its checkpoint. Then it is cancelled with `scancel`. Every
#    process of the job must be gone well before Slurm's KillWait (so they stopped on
#    SIGTERM, not by SIGKILL), its ports closed, and a new coordinator must open the same
#    state directory at once (the database lock was released).
# 5. Stops only the daemons it started (their pid files in the temporary directory) and
#    removes the directory (CVDIST_SMOKE_KEEP=1 keeps it).
#
# Needs the release binaries (${CVDIST_BIN_DIR:-target/release}; scripts/build.sh) and
# python3. Takes about 2 minutes on a 2-core machine once the packages are installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="$(cd "${CVDIST_BIN_DIR:-$root/target/release}" && pwd)"
sbatch_script="$root/deploy/slurm/cvdist.sbatch"
# Slurm sends SIGKILL this long after SIGTERM; processes gone before STOP_BOUND seconds
# therefore exited on SIGTERM. Both generous: the bound is about what cvdist promises for
# SIGTERM (10 s) plus a slow machine's margin.
KILL_WAIT=90
t_start=$(date +%s)
STOP_BOUND=60

say() { echo "slurm-smoke: $*" >&2; }
failure=""
# The reason is said again after the logs teardown prints, so that a CI log's tail shows it.
fail() { failure="$*"; say "FAIL: $*"; exit 1; }

for b in cvdist cvdist-worker; do
  [ -x "$bin_dir/$b" ] || fail "$bin_dir/$b is missing: run scripts/build.sh (or set CVDIST_BIN_DIR)"
done
command -v python3 >/dev/null || fail "python3 is needed"

# ---- 1. Packages --------------------------------------------------------------------------
missing=0
for c in munged slurmctld slurmd sbatch srun scancel squeue scontrol; do
  command -v "$c" >/dev/null || missing=1
done
if [ "$missing" = 1 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    fail "Slurm and MUNGE are not installed; install them (Debian/Ubuntu: apt-get install slurm-wlm munge) or run as root"
  fi
  say "installing slurm-wlm and munge from the Debian archive"
  # policy-rc.d 101 stops the packages' maintainer scripts from starting system daemons:
  # this script starts its own, from its own configuration.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
  fi
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
  install || { apt-get update -qq >/dev/null && install; } || { [ "$made_policy" = 0 ] || rm -f "$policy"; fail "apt-get install slurm-wlm munge failed"; }
  [ "$made_policy" = 0 ] || rm -f "$policy"
fi

# ---- 2. A one-node cluster in a temporary directory ---------------------------------------
T="$(mktemp -d "${TMPDIR:-/tmp}/cvdist-slurm.XXXXXX")"
# munged refuses a socket in a directory that not everyone can traverse.
chmod 755 "$T"
mkdir -p "$T/munge" "$T/run" "$T/log" "$T/state" "$T/spool" "$T/fakedev" "$T/shared" "$T/scratch"
chmod 700 "$T/munge"
submitted=()
daemons=()   # "name:pidfile"

stop_pidfile() {
  local name="$1" file="$2" pid
  [ -s "$file" ] || return 0
  pid="$(cat "$file")"
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  say "$name (pid $pid) ignored SIGTERM; killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

teardown() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ "${#submitted[@]}" -gt 0 ]; then
    for j in "${submitted[@]}"; do scancel "$j" 2>/dev/null; done
    for _ in $(seq 1 60); do
      [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  # Reverse start order: slurmd, slurmctld, munged.
  for ((i = ${#daemons[@]} - 1; i >= 0; i--)); do
    stop_pidfile "${daemons[$i]%%:*}" "${daemons[$i]#*:}"
  done
  if [ "$rc" != 0 ]; then
    for f in "$T"/log/*.log "$T"/job*.out "$T"/shared/runs/*/logs/*.log; do
      [ -f "$f" ] || continue
      echo "==== $f (last 25 lines)" >&2
      tail -n 25 "$f" >&2
    done
    [ -z "$failure" ] || say "FAIL (see the logs above): $failure"
  fi
  if [ "${CVDIST_SMOKE_KEEP:-0}" = 1 ]; then say "kept $T"; else rm -rf "$T"; fi
  exit "$rc"
}
trap teardown EXIT
trap '[ -n "$failure" ] || failure="line $LINENO: \"$BASH_COMMAND\" failed"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

read -r ctld_port slurmd_port < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])')
node="$(hostname -s)"
cpus="$(nproc)"
[ "$cpus" -ge 2 ] || cpus=2   # two 1-CPU tasks; config_overrides lets slurmd accept it
user="$(id -un)"

# Two stand-in GPUs: gres/gpu wants character devices and reads the index from the name.
ln -s /dev/null "$T/fakedev/gpu0"
ln -s /dev/zero "$T/fakedev/gpu1"
cat > "$T/gres.conf" <<EOF
AutoDetect=off
NodeName=$node Name=gpu File=$T/fakedev/gpu[0-1]
EOF
cat > "$T/slurm.conf" <<EOF
ClusterName=cvdistsmoke
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/run/munge.socket
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/run/slurmctld.pid
SlurmdPidFile=$T/run/slurmd.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
GresTypes=gpu
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=$KILL_WAIT
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1024 Gres=gpu:2 State=UNKNOWN
PartitionName=smoke Nodes=$node Default=YES MaxTime=30 State=UP
EOF
export SLURM_CONF="$T/slurm.conf"

say "starting munged, slurmctld, slurmd in $T (ports $ctld_port, $slurmd_port)"
dd if=/dev/urandom of="$T/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$T/munge/munge.key"
munged --key-file="$T/munge/munge.key" --socket="$T/run/munge.socket" --pid-file="$T/run/munged.pid" \
       --log-file="$T/log/munged.log" --seed-file="$T/munge/seed" || fail "munged did not start"
daemons+=("munged:$T/run/munged.pid")
slurmctld -f "$SLURM_CONF" || fail "slurmctld did not start"
daemons+=("slurmctld:$T/run/slurmctld.pid")
slurmd -f "$SLURM_CONF" -N "$node" || fail "slurmd did not start"
daemons+=("slurmd:$T/run/slurmd.pid")
for i in $(seq 1 60); do
  st="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
  [ "$st" = idle ] && break
  [ "$i" = 60 ] && fail "node $node is '$st', not idle, after 60 s"
  sleep 1
done
say "node $node idle: $cpus CPUs, gres gpu:2"

# The environment every job gets: our binaries, the CPU instead of a GPU, and the shared
# and scratch directories inside $T (so the process checks below can find every process).
export_env="ALL,CVDIST_SHARED=$T/shared,CVDIST_BIN_DIR=$bin_dir,CVDIST_DEVICE=cpu,CVDIST_SCRATCH=$T/scratch"
job_args=(--model resnet20 --dataset synthetic --train-samples 512 --test-samples 256 --batch-size 64 --seed 7)
sb=(sbatch --parsable --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=20 --export="$export_env")

job_processes() {   # pids whose command line names this test's directories (not the daemons)
  local p
  for p in $(pgrep -f "$T/(shared|scratch|spool)" || true); do
    [ "$p" = "$$" ] || echo "$p"
  done
}

# ---- 3. Job 1: runs to the end --------------------------------------------------------------
say "job 1: sbatch --wait, 2 tasks x 1 CPU, resnet20 on synthetic data, 2 epochs"
t0=$(date +%s)
rc=0
id1="$("${sb[@]}" --wait --output="$T/job1.out" "$sbatch_script" "${job_args[@]}" --epochs 2)" || rc=$?
id1="${id1%%;*}"
submitted+=("$id1")
say "job 1 ($id1): sbatch --wait exit status $rc after $(( $(date +%s) - t0 )) s"
[ "$rc" = 0 ] || fail "job 1 exited $rc"
info1="$(scontrol show job -o "$id1")"
[[ "$info1" == *"JobState=COMPLETED"* && "$info1" == *"ExitCode=0:0"* ]] || fail "job 1: $info1"
run1="$T/shared/runs/slurm-$id1"
grep -q "submitted job" "$T/job1.out" || fail "job 1's output does not show the submission"
for f in token worker-token tls/ca.key tls/coord.key; do
  [ "$(stat -c %a "$run1/$f")" = 600 ] || fail "$f is not private: mode $(stat -c %a "$run1/$f")"
done
grep -q "coordinator https://" "$T/job1.out" || fail "job 1's coordinator did not speak TLS"
for k in 0 1; do [ -s "$run1/logs/worker-$k.log" ] || fail "no log for worker task $k"; done

say "reference: the same job through cvdist local (2 workers x 1 thread)"
"$bin_dir/cvdist" local --workers 2 --threads-per-worker 1 "${job_args[@]}" --epochs 2 --device cpu \
  --out "$T/local-ref" --quiet >/dev/null 2>"$T/log/local-ref.log" || fail "cvdist local failed: $(tail -n 3 "$T/log/local-ref.log")"
python3 - "$run1" "$T/local-ref" <<'PY' || fail "job 1's results are not as expected"
import json, math, pathlib, sys
run, ref = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
job = (run / "cvdist-job-id").read_text().strip()
d = run / "coordinator" / "jobs" / job
summary = json.loads((d / "summary.json").read_text())
metrics = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
ref_metrics = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines() if l.strip()]
errors = []
def check(ok, what):
    if not ok:
        errors.append(what)
check(summary["state"] == "succeeded", f"state {summary['state']!r}")
check(summary["epochs_completed"] == 2 and summary["world_size"] == 2, f"summary {summary}")
check([m["epoch"] for m in metrics] == [0, 1], f"epochs {[m.get('epoch') for m in metrics]}")
for m, r in zip(metrics, ref_metrics):
    check(m.get("world_size") == 2, f"epoch {m['epoch']}: world size {m.get('world_size')}")
    for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        check(math.isfinite(m[k]), f"epoch {m['epoch']}: {k} {m[k]}")
        # Same spec, seed, world size and threads: the ring all-reduce and the sampler are
        # deterministic, so the numbers are the same to the last bit.
        check(m[k] == r[k], f"epoch {m['epoch']}: {k} {m[k]} under Slurm vs {r[k]} from cvdist local")
check(len(ref_metrics) == 2, f"reference has {len(ref_metrics)} epochs")
if errors:
    sys.exit("\n".join(errors))
last = metrics[-1]
print(f"slurm-smoke: job 1 cvdist job {job} succeeded: 2 epochs on 2 workers, "
      f"train loss {last['train_loss']:.4f}, test acc {last['test_acc']:.4f}, identical to cvdist local", file=sys.stderr)
PY
[ -z "$(job_processes)" ] || fail "processes of job 1 still running: $(job_processes | xargs -r ps -o pid=,args= -p)"

# ---- 4. Job 2: cancelled mid-run ------------------------------------------------------------
say "job 2: a 200-epoch run, requeued after its first epoch, then cancelled"
id2="$("${sb[@]}" --output="$T/job2.out" "$sbatch_script" "${job_args[@]}" --epochs 200)"
id2="${id2%%;*}"
submitted+=("$id2")
run2="$T/shared/runs/slurm-$id2"
for i in $(seq 1 300); do
  job2="$(cat "$run2/cvdist-job-id" 2>/dev/null || true)"
  [ -n "$job2" ] && [ -s "$run2/coordinator/jobs/$job2/metrics.jsonl" ] && break
  squeue -h -j "$id2" 2>/dev/null | grep -q . || fail "job 2 ended before its first epoch: $(scontrol show job -o "$id2")"
  [ "$i" = 300 ] && fail "job 2 stored no epoch within 300 s"
  sleep 1
done
# Preemption or a node failure: Slurm requeues the batch job under the same id, and the
# restarted script must resume the same cvdist job from its checkpoint, not start another.
epochs_before="$(wc -l < "$run2/coordinator/jobs/$job2/metrics.jsonl")"
say "job 2 ($id2, cvdist job $job2) stored $epochs_before epoch(s); scontrol requeue"
scontrol requeue "$id2"
# A requeued job waits for its begin time (Slurm delays it); start it now.
for i in $(seq 1 120); do
  scontrol update jobid="$id2" StartTime=now 2>/dev/null || true
  grep -q "(restart 1)" "$T/job2.out" 2>/dev/null && grep -q "resuming job $job2" "$T/job2.out" && break
  [ "$i" = 120 ] && fail "job 2 did not restart within 120 s of the requeue: $(scontrol show job -o "$id2")"
  sleep 1
done
for i in $(seq 1 300); do
  [ "$(wc -l < "$run2/coordinator/jobs/$job2/metrics.jsonl")" -gt "$epochs_before" ] && break
  [ "$i" = 300 ] && fail "job 2 stored no new epoch within 300 s of its restart"
  sleep 1
done
jobs_stored="$(ls "$run2/coordinator/jobs")"
[ "$jobs_stored" = "$job2" ] || fail "the requeued run holds jobs '$jobs_stored', not only $job2"
grep -q "from ckpt-e" "$run2/logs/coordinator.log" || fail "job 2 did not resume from a checkpoint after the requeue"
python3 - "$run2/coordinator/jobs/$job2/metrics.jsonl" <<'PY' || fail "job 2's epochs are not one continuous run"
import json, sys
epochs = [json.loads(l)["epoch"] for l in open(sys.argv[1]) if l.strip()]
sys.exit(0 if epochs == list(range(len(epochs))) else f"epochs {epochs}")
PY
say "job 2 restarted (SLURM_RESTART_COUNT 1) and resumed $job2 from its checkpoint: $(wc -l < "$run2/coordinator/jobs/$job2/metrics.jsonl") epochs stored"

port2="$(grep -oE 'coordinator https://[^ ]+:[0-9]+' "$T/job2.out" | head -n1 | sed -E 's/.*:([0-9]+)$/\1/')"
[ -n "$port2" ] || fail "job 2's output does not name its coordinator"
before="$(job_processes | wc -l)"
# The batch script, srun, the coordinator, `cvdist logs --follow` and two workers at least.
[ "$before" -ge 5 ] || fail "job 2 has only $before processes running: $(job_processes | xargs -r ps -o pid=,args= -p)"
say "job 2 is training with $before processes; scancel"
t0=$(date +%s)
scancel "$id2"
while :; do
  left="$(job_processes | wc -l)"
  queued="$(squeue -h -j "$id2" 2>/dev/null | wc -l)"
  [ "$left" = 0 ] && [ "$queued" = 0 ] && break
  if [ $(( $(date +%s) - t0 )) -ge "$STOP_BOUND" ]; then
    fail "$left process(es) of job 2 still running ${STOP_BOUND} s after scancel (they ignored SIGTERM): $(job_processes | xargs -r ps -o pid=,args= -p)"
  fi
  sleep 0.5
done
took=$(( $(date +%s) - t0 ))
info2="$(scontrol show job -o "$id2")"
[[ "$info2" == *"JobState=CANCELLED"* ]] || fail "job 2: $info2"
python3 - "$port2" <<'PY' || fail "job 2's coordinator port is still open"
import socket, sys
s = socket.socket()
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) != 0 else 1)
PY
say "job 2: every process gone ${took} s after scancel (Slurm's SIGKILL would come at ${KILL_WAIT} s); CANCELLED"

# A new coordinator opens the cancelled run's state at once and still knows the job.
read -r probe_port < <(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin_dir/cvdist" coordinator --listen "127.0.0.1:$probe_port" --state-dir "$run2/coordinator" \
  --token-file "$run2/token" --worker-token-file "$run2/worker-token" > "$T/log/coordinator-reopen.log" 2>&1 &
probe=$!
ok=0
for _ in $(seq 1 60); do
  if "$bin_dir/cvdist" status "$job2" --coordinator "http://127.0.0.1:$probe_port" --token-file "$run2/token" > "$T/log/status.txt" 2>&1; then
    ok=1; break
  fi
  kill -0 "$probe" 2>/dev/null || break
  sleep 0.5
done
kill -TERM "$probe" 2>/dev/null || true
for _ in $(seq 1 100); do kill -0 "$probe" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$probe" 2>/dev/null; then kill -KILL "$probe"; fail "the reopened coordinator ignored SIGTERM"; fi
wait "$probe" 2>/dev/null || true
[ "$ok" = 1 ] || fail "a new coordinator could not open job 2's state: $(tail -n 3 "$T/log/coordinator-reopen.log")"
say "job 2's state reopened by a new coordinator: $(head -n1 "$T/log/status.txt")"
say "PASS ($(( $(date +%s) - t_start )) s)"
