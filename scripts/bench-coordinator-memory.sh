#!/usr/bin/env bash
# Coordinator memory per stored job (docs/BENCHMARKS.md, "Coordinator memory per job"):
# starts `cvdist coordinator` on a fresh state dir, submits N jobs that stay QUEUED (they
# ask for more workers than exist), cancels them all, restarts the coordinator on the same
# state dir, and prints VmRSS (from /proc/PID/status) at each point with the per-job figure.
# Usage: scripts/bench-coordinator-memory.sh [N=1000] [CVDIST_BINARY=target/release/cvdist]
# The automated check is coordinator/tests/memory.rs (< 50 MB with 1,000 jobs).
set -euo pipefail
n="${1:-1000}"
bin="$(realpath "${2:-target/release/cvdist}")"
work="$(mktemp -d)"
port=$((20000 + RANDOM % 20000))
url="http://127.0.0.1:$port"
export CVDIST_TOKEN="bench-token-0123456789"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

start() {
  "$bin" coordinator --listen "127.0.0.1:$port" --state-dir "$work/state" >>"$work/coordinator.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do "$bin" jobs --coordinator "$url" >/dev/null 2>&1 && return; sleep 0.1; done
  echo "coordinator did not start; log:" >&2; cat "$work/coordinator.log" >&2; exit 1
}
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"; }
per_job() { awk -v a="$1" -v b="$2" -v n="$n" 'BEGIN { printf "%.1f", (a - b) / n }'; }

start
idle=$(rss)
ids=()
for _ in $(seq "$n"); do
  ids+=("$("$bin" submit --model resnet20 --epochs 2 --workers 64 --coordinator "$url")")
done
queued=$(rss)
for id in "${ids[@]}"; do "$bin" cancel "$id" --coordinator "$url" >/dev/null; done
cancelled=$(rss)
t0=$(date +%s%N); "$bin" jobs --coordinator "$url" >/dev/null; t1=$(date +%s%N)
list_ms=$(( (t1 - t0) / 1000000 ))
kill "$pid"; wait "$pid" 2>/dev/null || true
start
"$bin" jobs --coordinator "$url" >/dev/null
restarted=$(rss)
echo "binary $bin, $n jobs, VmRSS in kB (per job = (RSS - idle) / $n):"
echo "  idle                 $idle"
echo "  $n queued         $queued  ($(per_job "$queued" "$idle") kB/job)"
echo "  $n cancelled      $cancelled  ($(per_job "$cancelled" "$idle") kB/job)"
echo "  after a restart      $restarted  ($(per_job "$restarted" "$idle") kB/job)"
echo "  state dir on disk    $(du -sk "$work/state" | cut -f1)"
echo "  \`cvdist jobs\` with $n ended jobs: $list_ms ms (whole CLI process)"
