#!/usr/bin/env bash
# One command from a fresh clone to a finished training run on this machine:
# libtorch venv (cached), release build, CIFAR-10, then `cvdist local`.
#
#   scripts/quickstart.sh                                  # resnet20, 1 epoch, 2 workers
#   scripts/quickstart.sh --model resnet18 --epochs 5 --workers 2
#
# Arguments replace the defaults and go to `cvdist local` (see `cvdist local --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/build.sh
data="${CVDIST_DATA:-data/cifar10}"
if [ ! -f "$data/cifar-10-batches-bin/test_batch.bin" ]; then
  if [ -x ../shared/data/prepare-cifar10 ]; then
    ../shared/data/prepare-cifar10 "$data"          # offline copy, where one is provided
  else
    target/release/cvdist download --out "$data"    # official archive, md5-checked
  fi
fi
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--model resnet20 --epochs 1 --workers 2)
exec target/release/cvdist local --data "$data" "${args[@]}"
