#!/usr/bin/env bash
# All-reduce benchmark: cvdist's ring (N separate processes of the allreduce_bench
# example) against torch.distributed Gloo (N Python processes), both on loopback, in the
# same run. Prints a table of medians.
#
# Env: WORLDS="2 4"  SIZES=23500000,2300000,1024 (floats)  ITERS=10  WARMUP=3
#      CHUNK_KIB=<n> (cvdist pipelining chunk)  BENCH_BIN=<prebuilt example binary>
#      SKIP_GLOO=1  COMPRESSIONS=none,bf16,fp16 (cvdist's --grad-compression values to
#      measure, each as the gradient all-reduce; default none; Gloo always sends f32)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/env.sh

WORLDS="${WORLDS:-2 4}"
SIZES="${SIZES:-23500000,2300000,1024}"
ITERS="${ITERS:-10}"
WARMUP="${WARMUP:-3}"

if [[ -z "${BENCH_BIN:-}" ]]; then
  cargo build --release -p cvdist-worker --example allreduce_bench >&2
  BENCH_BIN="${CARGO_TARGET_DIR:-$root/target}/release/examples/allreduce_bench"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# Runs N ranks of a command template (RANK substituted) and waits for all of them.
run_ranks() {
  local n="$1"; shift
  local pids=() r
  for ((r = 0; r < n; r++)); do
    "$@" "$r" >"$out/rank$r.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  if ((rc != 0)); then
    echo "benchmark ranks failed:" >&2
    cat "$out"/rank*.log >&2
    return "$rc"
  fi
  grep -h '^RESULT' "$out/rank0.log" >>"$out/results"
}

cvdist_rank() {
  local n="$1" base="$2" r="$3" peers="" i
  for ((i = 0; i < n; i++)); do peers+="${peers:+,}127.0.0.1:$((base + i))"; done
  "$BENCH_BIN" --rank "$r" --world "$n" --peers "$peers" --sizes "$SIZES" \
    --iters "$ITERS" --warmup "$WARMUP" ${CHUNK_KIB:+--chunk-kib "$CHUNK_KIB"} \
    --grad-compression "${COMPRESSIONS:-none}"
}

gloo_rank() {
  local n="$1" port="$2" r="$3"
  "$CVDIST_PYTHON" benches/python/gloo_allreduce.py --rank "$r" --world "$n" --port "$port" \
    --sizes "$SIZES" --iters "$ITERS" --warmup "$WARMUP"
}

touch "$out/results"
for n in $WORLDS; do
  base=$((20000 + RANDOM % 20000))
  echo "world $n: cvdist ring (ports $base..)" >&2
  run_ranks "$n" cvdist_rank "$n" "$base"
  if [[ -z "${SKIP_GLOO:-}" ]]; then
    echo "world $n: gloo" >&2
    run_ranks "$n" gloo_rank "$n" "$((base + 100))"
  fi
done

"$CVDIST_PYTHON" - "$out/results" <<'PY'
import sys
rows, gloo, sent = {}, {}, {}
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split()[1:])
    floats, n = int(kv["floats"]), int(kv["world"])
    if kv["impl"] == "gloo":
        gloo[(floats, n)] = float(kv["median_ms"])
    else:
        key = (floats, n, kv.get("compression", "none"))
        rows[key] = float(kv["median_ms"])
        sent[key] = int(kv["bytes"]) if "bytes" in kv else None

def size(b):
    return f"{b / 1e6:.1f} MB" if b >= 1e6 else f"{b / 1e3:.1f} KB"

# busBW: the f32 buffer's 2(N-1)/N * bytes over the time, whatever travelled (so a
# compressed row shows the effective rate); "sent MB": what rank 0 wrote for one op.
print(f"{'size':>9} {'N':>2} {'wire':>5} {'cvdist ms':>10} {'sent MB':>8} {'gloo ms':>9} {'cvdist/gloo':>11} {'cvdist busBW GB/s':>17}")
order = {"none": 0, "bf16": 1, "fp16": 2}
for (floats, n, comp), c in sorted(rows.items(), key=lambda kv: (-kv[0][0], kv[0][1], order.get(kv[0][2], 9))):
    b = floats * 4
    g = gloo.get((floats, n))
    ratio = f"{c / g:.2f}" if c and g else "-"
    bw = f"{2 * (n - 1) / n * b / (c / 1e3) / 1e9:.2f}" if c else "-"
    mb = f"{sent[(floats, n, comp)] / 1e6:.3f}" if sent[(floats, n, comp)] is not None else "-"
    print(f"{size(b):>9} {n:>2} {comp:>5} {c:>10.3f} {mb:>8} {g or float('nan'):>9.3f} {ratio:>11} {bw:>17}")
PY
