#!/usr/bin/env bash
# A real training run side by side: `cvdist train` and the same recipe in PyTorch eager
# (benches/python/torch_train.py), same model, data, epochs and threads. By default both run
# at the same time with one thread each on this 2-core box, so machine noise hits them alike;
# SEQUENTIAL=1 runs them one after the other with THREADS each instead.
#
#   scripts/bench-train.sh [MODEL] [EPOCHS] [THREADS] [TRAIN_SAMPLES]   (default: resnet20 5 1 0=all)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
model="${1:-resnet20}"; epochs="${2:-5}"; threads="${3:-1}"; samples="${4:-0}"
data="${CVDIST_DATA:-data/cifar10}"
[ -f "$data/cifar-10-batches-bin/test_batch.bin" ] || ../shared/data/prepare-cifar10 "$data"
scripts/build.sh >/dev/null
out="runs/bench-train-$model-$epochs"
rm -rf "$out"
mkdir -p "$out/pytorch"
run_cvdist() {
  target/release/cvdist-worker train --model "$model" --epochs "$epochs" --data "$data" --threads "$threads" \
    --train-samples "$samples" --device cpu --out "$out/cvdist" --quiet 2>"$out/cvdist.log"
}
run_torch() {
  "$CVDIST_PYTHON" benches/python/torch_train.py --model "$model" --epochs "$epochs" --data "$data" \
    --threads "$threads" --train-samples "$samples" > "$out/pytorch/metrics.jsonl"
}
if [ "${SEQUENTIAL:-0}" = 1 ]; then
  run_cvdist; run_torch
else
  run_cvdist & c=$!; run_torch & p=$!
  wait "$c"; wait "$p"
fi
"$CVDIST_PYTHON" - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
runs = {k: [json.loads(l) for l in open(f"{out}/{k}/metrics.jsonl")] for k in ("cvdist", "pytorch")}
print(f"{'epoch':>5} {'cvdist acc':>10} {'pytorch acc':>11} {'cvdist s':>9} {'pytorch s':>9}")
for c, p in zip(runs["cvdist"], runs["pytorch"]):
    print(f"{c['epoch']+1:>5} {c['test_acc']*100:>9.2f}% {p['test_acc']*100:>10.2f}% {c['seconds']:>9.1f} {p['seconds']:>9.1f}")
c, p = runs["cvdist"], runs["pytorch"]
cs, ps = statistics.median(m["seconds"] for m in c), statistics.median(m["seconds"] for m in p)
print(f"final test accuracy: cvdist {c[-1]['test_acc']*100:.2f}%  pytorch {p[-1]['test_acc']*100:.2f}%  "
      f"difference {(c[-1]['test_acc']-p[-1]['test_acc'])*100:+.2f} points")
print(f"median seconds/epoch: cvdist {cs:.1f}  pytorch {ps:.1f}  ratio cvdist/pytorch {cs/ps:.3f}")
PY
