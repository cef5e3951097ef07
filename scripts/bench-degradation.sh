#!/usr/bin/env bash
# He et al.'s degradation experiment in small: plain vs residual nets of 20 and 56 layers
# on the same short schedule, then one overlaid chart set with `cvdist report`.
#
#   scripts/bench-degradation.sh [EPOCHS] [TRAIN_SAMPLES] [OUT]   (default: 3 10000 runs/degradation)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
epochs="${1:-3}"; samples="${2:-10000}"; out="${3:-runs/degradation}"
data="${CVDIST_DATA:-data/cifar10}"
[ -f "$data/cifar-10-batches-bin/test_batch.bin" ] || ../shared/data/prepare-cifar10 "$data"
scripts/build.sh >/dev/null
rm -rf "$out"; mkdir -p "$out"
train() {
  target/release/cvdist train --model "$1" --epochs "$epochs" --train-samples "$samples" --data "$data" \
    --threads 1 --device cpu --out "$out/$1" --quiet > "$out/$1.log" 2>&1
}
# Two at a time, one thread each: the box has two cores.
train plain20 & train resnet20 & wait
train plain56 & train resnet56 & wait
target/release/cvdist report "$out/plain20" "$out/resnet20" "$out/plain56" "$out/resnet56" --out "$out/charts"
