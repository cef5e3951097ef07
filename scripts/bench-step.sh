#!/usr/bin/env bash
# Training-step time, cvdist vs PyTorch eager, same model/batch/threads, alternating
# rounds in one run so machine noise hits both alike. Prints medians and the ratio.
# The peer is PyTorch eager as users write it (NCHW); PyTorch with channels_last — the
# layout cvdist trains in by default — runs alongside so the source of the gain is visible.
#
#   scripts/bench-step.sh [--rounds 3] [--steps 10] [--threads 2] [MODEL ...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
rounds=3; steps=10; threads=2; models=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    *) models+=("$1"); shift ;;
  esac
done
[ ${#models[@]} -gt 0 ] || models=(resnet18 mobilenetv2)
cargo build --release -q -p cvdist-worker --example step_bench
bench="target/release/examples/step_bench"
out="$(mktemp)"
for m in "${models[@]}"; do
  for r in $(seq "$rounds"); do
    "$bench" --model "$m" --steps "$steps" --threads "$threads" >> "$out"
    "$CVDIST_PYTHON" benches/python/torch_step.py --model "$m" --steps "$steps" --threads "$threads" >> "$out"
    "$CVDIST_PYTHON" benches/python/torch_step.py --model "$m" --steps "$steps" --threads "$threads" --channels-last >> "$out"
  done
done
"$CVDIST_PYTHON" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
print(f"{'model':<12} {'batch':>5} {'thr':>3} {'cvdist ms':>10} {'pytorch ms':>10} {'pt-cl ms':>9} {'cvdist/pytorch':>15} {'cvdist/pt-cl':>13}")
def med(m, impl):
    return statistics.median([t for r in rows if r["model"] == m and r["impl"] == impl for t in r["step_seconds"]])
for m in models:
    c, p, pc = med(m, "cvdist"), med(m, "pytorch"), med(m, "pytorch-channels-last")
    b = next(r for r in rows if r["model"] == m)
    print(f"{m:<12} {b['batch']:>5} {b['threads']:>3} {c*1000:>10.1f} {p*1000:>10.1f} {pc*1000:>9.1f} {c/p:>15.3f} {c/pc:>13.3f}")
PY
rm -f "$out"
