#!/usr/bin/env bash
# Data-parallel scaling on one box: 2 workers x 1 thread vs 1 worker x 2 threads through
# `cvdist local` (real processes, real TCP ring), alternating rounds; prints median
# seconds/epoch, the ratio, and the share of step time spent in the all-reduce.
#
#   scripts/bench-scaling.sh [MODEL] [EPOCHS] [TRAIN_SAMPLES] [ROUNDS]   (default: resnet20 1 0 1; 0 = all 50,000)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
model="${1:-resnet20}"; epochs="${2:-1}"; samples="${3:-0}"; rounds="${4:-1}"
data="${CVDIST_DATA:-data/cifar10}"
[ -f "$data/cifar-10-batches-bin/test_batch.bin" ] || ../shared/data/prepare-cifar10 "$data"
scripts/build.sh >/dev/null
out="runs/bench-scaling"; rm -rf "$out"; mkdir -p "$out"
common=(--model "$model" --epochs "$epochs" --data "$data" --train-samples "$samples" --device cpu --quiet)
for r in $(seq "$rounds"); do
  target/release/cvdist local "${common[@]}" --workers 1 --threads-per-worker 2 --out "$out/w1-$r" >/dev/null
  target/release/cvdist local "${common[@]}" --workers 2 --threads-per-worker 1 --out "$out/w2-$r" >/dev/null
done
"$CVDIST_PYTHON" - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def rows(kind):
    return [json.loads(l) for r in range(1, rounds + 1) for l in open(f"{out}/{kind}-{r}/metrics.jsonl")]
one, two = rows("w1"), rows("w2")
s1, s2 = statistics.median(m["seconds"] for m in one), statistics.median(m["seconds"] for m in two)
share = statistics.median(m["allreduce_seconds"] / m["seconds"] for m in two)
print(f"median s/epoch: 1 worker x 2 threads {s1:.1f}  2 workers x 1 thread {s2:.1f}  ratio {s2/s1:.3f}")
print(f"all-reduce share of epoch time with 2 workers: {100*share:.1f}%")
print(f"test accuracy: 1 worker {one[-1]['test_acc']*100:.2f}%  2 workers {two[-1]['test_acc']*100:.2f}%")
PY
