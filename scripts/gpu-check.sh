#!/usr/bin/env bash
# One short check for a single-GPU machine (< 8 minutes): build, NCCL at world size 1,
# and one epoch of resnet18 with mixed precision + channels_last through `cvdist local`.
# Figures go to stdout and $OUT (if set) for docs/BENCHMARKS.md and docs/RESULTS.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-runs/gpu-check}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
scripts/build.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release -q -p cvdist-worker --example nccl_check
target/release/examples/nccl_check | tee "$out/nccl.txt"
data=data/cifar10
[ -f "$data/cifar-10-batches-bin/test_batch.bin" ] || ../shared/data/prepare-cifar10 "$data" || target/release/cvdist download --out "$data"
target/release/cvdist local --model resnet18 --epochs 1 --workers 1 --data "$data" --device cuda:0 \
  --amp --channels-last --out "$out/resnet18-amp" 2>&1 | tail -5 | tee "$out/train.txt"
