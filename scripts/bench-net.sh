#!/usr/bin/env bash
# Two "hosts" over a shaped link: cvdist against PyTorch DDP (Gloo), one rank per host.
#
# Builds two network namespaces joined by a veth pair, shapes the link in both directions
# with `tc qdisc ... tbf rate R` (nothing for "unshaped"), and for each rate runs, in
# alternating rounds, (a) cvdist: a coordinator and one worker in namespace A, one worker
# in namespace B, one job of one epoch of STEPS steps per rank, and (b)
# benches/python/ddp_train.py: one DDP rank per namespace, GLOO_SOCKET_IFNAME = that
# namespace's end of the veth. Same model, batch, steps, data (the first STEPS*BATCH*2
# CIFAR-10 training images, no augmentation) and one thread per rank. Prints, per rate,
# the medians over rounds of DDP train seconds, cvdist train seconds and cvdist all-reduce
# seconds (rank 0), and cvdist/DDP.
#
# Only addresses inside the two namespaces are used (10.99.13.1 in A, 10.99.13.2 in B);
# the namespaces, the veth and its qdiscs, and every process started in them are removed
# on exit, including on failure, Ctrl-C and SIGTERM. Needs root, ip and tc (iproute2).
#
#   scripts/bench-net.sh [--rates unshaped,1gbit,100mbit] [--rounds 2] [--steps 10]
#                        [--model resnet18] [--batch 128] [--grad-compression none|bf16|fp16]
#                        [--ddp-channels-last] [--link-check]
#
# Env: RATES, ROUNDS, STEPS (defaults for the flags above); CVDIST_DATA (CIFAR-10 copy,
# default data/cifar10, prepared when missing); CVDIST_SUBMIT_ARGS / CVDIST_WORKER_ARGS
# (extra words for `cvdist submit` / `cvdist-worker worker`); CVDIST_BIN_DIR (default
# target/release; built by scripts/build.sh when it is the default); BENCH_NET_TIMEOUT
# (seconds one run may take, default 1800). Logs and results.jsonl go to runs/bench-net/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
me="bench-net.sh"

rates="${RATES:-unshaped,1gbit,100mbit}"
rounds="${ROUNDS:-2}"
steps="${STEPS:-10}"
model="resnet18"; batch=128; ddp_extra=(); link_check=0
read -r -a submit_extra <<<"${CVDIST_SUBMIT_ARGS:-}"
read -r -a worker_extra <<<"${CVDIST_WORKER_ARGS:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) rates="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --grad-compression) submit_extra+=(--grad-compression "$2"); shift 2 ;;
    --ddp-channels-last) ddp_extra+=(--channels-last); shift ;;
    --link-check) link_check=1; shift ;;
    -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "$me: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in rounds steps batch; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "$me: --$v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
IFS=, read -r -a rate_list <<<"$rates"
for r in "${rate_list[@]}"; do
  [[ "$r" == unshaped || "$r" =~ ^[0-9]+(k|m|g)?bit$ ]] ||
    { echo "$me: rate '$r' is neither 'unshaped' nor a tc rate like 100mbit, 1gbit, 500kbit" >&2; exit 2; }
done

# ---- what the machine must offer -------------------------------------------------------
[ "${BASH_VERSINFO[0]}${BASH_VERSINFO[1]}" -ge 51 ] || { echo "$me: needs bash 5.1 or newer (wait -n -p), this is $BASH_VERSION" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "$me: needs root (it creates network namespaces and tc qdiscs): run it as root or with sudo" >&2; exit 1; }
for tool in ip tc timeout; do
  command -v "$tool" >/dev/null || { echo "$me: '$tool' not found on PATH (ip and tc come with iproute2, timeout with coreutils)" >&2; exit 1; }
done

# shellcheck source=scripts/env.sh
source scripts/env.sh
bin="${CVDIST_BIN_DIR:-$root/target/release}"
[ -n "${CVDIST_BIN_DIR:-}" ] || scripts/build.sh >/dev/null
for b in cvdist cvdist-worker; do
  [ -x "$bin/$b" ] || { echo "$me: $bin/$b is missing (run scripts/build.sh)" >&2; exit 1; }
done
data="$(realpath -m "${CVDIST_DATA:-data/cifar10}")"
[ -f "$data/cifar-10-batches-bin/test_batch.bin" ] || ../shared/data/prepare-cifar10 "$data"
timeout_s="${BENCH_NET_TIMEOUT:-1800}"
out="$root/runs/bench-net"
rm -rf "$out"; mkdir -p "$out"
results="$out/results.jsonl"
samples=$((steps * batch * 2))

# ---- namespaces and cleanup -----------------------------------------------------------
ns_a="cvdist-bench-a-$$"; ns_b="cvdist-bench-b-$$"
dev_a="veth-a"; dev_b="veth-b"
ip_a="10.99.13.1"; ip_b="10.99.13.2"
made=()     # namespaces this run created
started=()  # pids of processes this run started

stop_pids() {  # TERM, up to 5 s grace, then KILL
  [ $# -gt 0 ] || return 0
  local p alive
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq 50); do
    alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || return 0
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pids "${started[@]}"
  local ns pids
  for ns in "${made[@]}"; do
    ip netns list | awk '{print $1}' | grep -qxF "$ns" || continue
    # Anything still running inside the namespace was started by this run.
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null)
    stop_pids "${pids[@]}"
    ip netns del "$ns" 2>/dev/null || echo "$me: could not delete network namespace $ns" >&2
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for ns in "$ns_a" "$ns_b"; do
  made+=("$ns")  # before it exists, so that a signal right after `add` still removes it
  ip netns add "$ns" || { echo "$me: cannot create network namespace $ns (needs CAP_SYS_ADMIN and /run/netns)" >&2; exit 1; }
  ip -n "$ns" link set lo up
done
ip link add "$dev_a" netns "$ns_a" type veth peer name "$dev_b" netns "$ns_b"
ip -n "$ns_a" addr add "$ip_a/24" dev "$dev_a"
ip -n "$ns_b" addr add "$ip_b/24" dev "$dev_b"
ip -n "$ns_a" link set "$dev_a" up
ip -n "$ns_b" link set "$dev_b" up

# tbf on the egress of both ends. burst: 5 ms of the rate, at least 64 KiB (one GSO
# segment), so the token bucket neither splits segments nor lets the link run far above R;
# latency 50 ms bounds the queue.
shape() {
  local rate="$1" ns dev ns_dev
  for ns_dev in "$ns_a:$dev_a" "$ns_b:$dev_b"; do
    ns="${ns_dev%%:*}"; dev="${ns_dev#*:}"
    tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
    [ "$rate" = unshaped ] && continue
    local n="${rate%bit}" mult=1
    case "$n" in *k) mult=1000 ;; *m) mult=1000000 ;; *g) mult=1000000000 ;; esac
    n="${n%[kmg]}"
    local burst=$((n * mult / 8 / 200))
    [ "$burst" -ge 65536 ] || burst=65536
    tc -n "$ns" qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms
  done
}

# The environment of every process started in a namespace: every library on one thread, no
# tokens from the caller's environment. Used as `ip netns exec NS "${envs[@]}" CMD ... &`
# (a plain command, not a shell function, so that $! is the process itself and killing it
# stops it: ip netns exec and env both exec).
envs=(env -u CVDIST_TOKEN -u CVDIST_WORKER_TOKEN -u CVDIST_TOKEN_FILE -u CVDIST_WORKER_TOKEN_FILE
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1)

# Waits until the first of the given processes ends: sets `ended` to its pid and returns
# its status. A SIGTERM/INT to the script interrupts `wait` at once, so the traps above run
# without waiting for a run to end.
ended=""
wait_first() {
  local s=0
  wait -n -p ended "$@" || s=$?
  forget "$ended"
  return "$s"
}

# Drops ended processes from `started`, so that cleanup never signals a pid that the
# system may since have given to another process.
forget() {
  local keep=() q p
  for q in "${started[@]}"; do
    for p in "$@"; do [ "$q" != "$p" ] || continue 2; done
    keep+=("$q")
  done
  started=("${keep[@]}")
}

fail_run() {  # what failed, then its logs' tails
  echo "$me: $1 failed; last lines of its logs:" >&2
  local f
  for f in "${@:2}"; do echo "== $f" >&2; tail -n 20 "$f" >&2 || true; done
  exit 1
}

run_ddp() {
  local tag="$1" dir="$out/$1" pids=() r ns dev
  mkdir -p "$dir"
  for r in 1 0; do
    if [ "$r" = 0 ]; then ns="$ns_a"; dev="$dev_a"; else ns="$ns_b"; dev="$dev_b"; fi
    ip netns exec "$ns" "${envs[@]}" GLOO_SOCKET_IFNAME="$dev" timeout "$timeout_s" "$CVDIST_PYTHON" benches/python/ddp_train.py \
      --rank "$r" --world 2 --master "$ip_a:29400" --model "$model" --batch "$batch" --steps "$steps" \
      --threads 1 --data "$data" "${ddp_extra[@]}" >"$dir/rank$r.log" 2>&1 &
    pids+=($!); started+=($!)
  done
  # Both ranks must end with 0; the first failure ends the run (the other rank would wait
  # for it until Gloo's timeout).
  while [ ${#pids[@]} -gt 0 ]; do
    wait_first "${pids[@]}" || fail_run "DDP ($tag)" "$dir/rank0.log" "$dir/rank1.log"
    mapfile -t pids < <(printf '%s\n' "${pids[@]}" | grep -vx "$ended" || true)
  done
  local line
  line="$(grep '^{' "$dir/rank0.log" | tail -n 1 || true)"
  [ -n "$line" ] || fail_run "DDP ($tag) printed no result" "$dir/rank0.log"
  echo "{\"tag\": \"$tag\", \"result\": $line}" >>"$results"
}

run_cvdist() {
  local tag="$1" dir="$out/$1" coord="http://$ip_a:50051" pids=()
  mkdir -p "$dir"
  ip netns exec "$ns_a" "${envs[@]}" "$bin/cvdist" coordinator --listen "$ip_a:50051" --state-dir "$dir/state" \
    --allow-insecure-remote >"$dir/coordinator.log" 2>&1 &
  local cpid=$!; started+=("$cpid")
  local ok=0
  for _ in $(seq 100); do
    kill -0 "$cpid" 2>/dev/null || fail_run "cvdist coordinator ($tag) exited" "$dir/coordinator.log"
    if ip netns exec "$ns_a" "${envs[@]}" "$bin/cvdist" jobs --coordinator "$coord" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
  done
  [ "$ok" = 1 ] || fail_run "cvdist coordinator ($tag) not answering after 20 s" "$dir/coordinator.log"
  local side ns ip
  # Worker ids sort a < b, so the worker in A (with the coordinator) is rank 0.
  for side in a b; do
    if [ "$side" = a ]; then ns="$ns_a"; ip="$ip_a"; else ns="$ns_b"; ip="$ip_b"; fi
    ip netns exec "$ns" "${envs[@]}" "$bin/cvdist-worker" worker --coordinator "$coord" --device cpu --threads 1 \
      --data "$data" --cache-dir "$dir/cache" --data-listen "$ip:29500" --worker-id "host-$side" \
      "${worker_extra[@]}" >"$dir/worker-$side.log" 2>&1 &
    pids+=($!); started+=($!)
  done
  ip netns exec "$ns_a" "${envs[@]}" timeout "$timeout_s" "$bin/cvdist" submit --coordinator "$coord" --model "$model" --epochs 1 \
    --workers 2 --batch-size "$batch" --train-samples "$samples" --test-samples 256 --no-augment \
    --threads-per-worker 1 --name "bench-net" "${submit_extra[@]}" --follow >"$dir/submit.log" 2>&1 &
  local spid=$!; started+=("$spid")
  # The job is done when `submit --follow` exits 0; a worker or the coordinator ending
  # before that is a failure (the job would wait for its worker until the timeout).
  local s=0
  wait_first "$spid" "${pids[@]}" "$cpid" || s=$?
  [ "$ended" = "$spid" ] && [ "$s" -eq 0 ] ||
    fail_run "cvdist job ($tag)" "$dir/submit.log" "$dir/worker-a.log" "$dir/worker-b.log" "$dir/coordinator.log"
  stop_pids "${pids[@]}" "$cpid"
  forget "${pids[@]}" "$cpid"
  local metrics
  metrics="$(cat "$dir"/state/jobs/*/metrics.jsonl 2>/dev/null | tail -n 1 || true)"
  [ -n "$metrics" ] || fail_run "cvdist job ($tag) left no metrics.jsonl" "$dir/submit.log"
  echo "{\"tag\": \"$tag\", \"samples\": $samples, \"result\": $metrics}" >>"$results"
  # ~90 MB of checkpoints per run (resnet18 weights and momentum): not needed afterwards.
  rm -rf "$dir/cache" "$dir"/state/jobs/*/checkpoints
}

echo "$me: $model, batch $batch per rank, $steps steps, 1 thread per rank, rates ${rate_list[*]}, $rounds round(s); logs in $out" >&2
[ ${#submit_extra[@]} -eq 0 ] || echo "$me: extra cvdist submit args: ${submit_extra[*]}" >&2
for round in $(seq "$rounds"); do
  for rate in "${rate_list[@]}"; do
    shape "$rate"
    if [ "$link_check" = 1 ]; then
      "$CVDIST_PYTHON" - "$ns_a" "$ns_b" "$ip_b" "$rate" >>"$out/link-check.txt" <<'PY'
import socket, subprocess, sys, time
ns_a, ns_b, ip_b, rate = sys.argv[1:]
srv = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", """
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("%s", 29600)); s.listen(1); c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    t0 = t0 or time.perf_counter(); n += len(b)
print(n * 8 / (time.perf_counter() - t0) / 1e6)
""" % ip_b], stdout=subprocess.PIPE, text=True)
time.sleep(1.0)
subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-c", """
import socket, time
c = socket.create_connection(("%s", 29600)); buf = b"x" * (1 << 20); end = time.perf_counter() + 2
while time.perf_counter() < end: c.sendall(buf)
c.close()
""" % ip_b], check=True)
print(f"{rate}: A->B {float(srv.communicate()[0]):.0f} Mbit/s", flush=True)
PY
      tail -n 1 "$out/link-check.txt" >&2
    fi
    # Alternate which side goes first, so drift in the machine's speed hits both alike.
    if [ $((round % 2)) = 1 ]; then order=(ddp cvdist); else order=(cvdist ddp); fi
    for impl in "${order[@]}"; do
      echo "$me: round $round, $rate: $impl" >&2
      "run_$impl" "$impl-$rate-r$round"
    done
  done
done
shape unshaped

"$CVDIST_PYTHON" - "$results" "$rates" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = statistics.median
print(f"{'link':<10} {'rounds':>6} {'DDP train s':>12} {'cvdist train s':>15} {'cvdist all-reduce s':>20} {'cvdist/DDP':>11}")
for rate in sys.argv[2].split(","):
    ddp = [r["result"]["train_seconds"] for r in rows if r["tag"].startswith(f"ddp-{rate}-")]
    cv = [r for r in rows if r["tag"].startswith(f"cvdist-{rate}-")]
    # cvdist's images/s is the images of all ranks over rank 0's training-loop seconds.
    cvt = [r["samples"] / r["result"]["images_per_sec"] for r in cv]
    cva = [r["result"]["allreduce_seconds"] for r in cv]
    print(f"{rate:<10} {len(ddp):>6} {med(ddp):>12.1f} {med(cvt):>15.1f} {med(cva):>20.1f} {med(cvt) / med(ddp):>11.2f}")
    print(f"{'':<10} {'runs':>6} {' '.join(f'{t:.1f}' for t in ddp):>12} {' '.join(f'{t:.1f}' for t in cvt):>15} "
          f"{' '.join(f'{t:.1f}' for t in cva):>20}")
PY
