#!/usr/bin/env bash
# The GPU check, for a GPU host with PyTorch in its Python but no Rust toolchain and no
# internet. It runs the bundle `scripts/gpu-check-build.sh` made on a build machine against
# the same PyTorch release, with that host's own libtorch, in under 8 minutes, on synthetic
# data, and prints:
#   the GPU (name, driver, memory), PyTorch/CUDA/NCCL versions,
#   step time and images/s of resnet18 and resnet50 at batch 128 in fp32 and bf16,
#   one short resnet18 bf16 epoch through the real worker binary, and
#   2-rank `cvdist local --device cuda --collective nccl` jobs (c10d's ProcessGroupNCCL) with
#   each gradient wire (none, bf16, fp16): every rank must finish and agree on the final
#   metrics. No bandwidth is printed for one rank (NCCL does nothing for a world of one).
#
#   scripts/gpu-check.sh [BUNDLE]     # default target/gpu-check/bundle
#
# From a session: run(command="scripts/gpu-check.sh", carry=["target/gpu-check/bundle"],
# timeout_s=540). Output also goes to $OUT/gpu-check.txt (default runs/gpu-check/).
# Exit status: 0 all parts passed, 1 a part failed, 2 the host or bundle does not fit.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bundle="${1:-$root/target/gpu-check/bundle}"
out="${OUT:-$root/runs/gpu-check}"
mkdir -p "$out"
exec > >(tee "$out/gpu-check.txt") 2>&1
started=$(date +%s)

if [ ! -x "$bundle/gpu_check" ]; then
  echo "gpu-check: no bundle at $bundle: build it with scripts/gpu-check-build.sh on a machine with Rust, then carry target/gpu-check/bundle"
  exit 2
fi
echo "gpu-check: bundle $(tr '\n' ' ' < "$bundle/VERSIONS")"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu-check: nvidia-smi: /'

python="${CVDIST_GPU_PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$python" ]; then
  echo "gpu-check: no python3 on PATH (set CVDIST_GPU_PYTHON to the Python that has torch)"
  exit 2
fi
info="$("$python" - <<'EOF'
import os, torch
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception:  # a build without NCCL: the check itself says more
    nccl = "?"
print(torch.__version__.split("+")[0], lib, torch.version.cuda, nccl, name, sep="\t")
EOF
)" || { echo "gpu-check: $python cannot import torch"; exit 2; }
IFS=$'\t' read -r torch_version torch_lib cuda_version nccl_version device_name <<< "$info"
echo "gpu-check: device: $device_name; PyTorch $torch_version (CUDA $cuda_version, NCCL $nccl_version) at $torch_lib"

built_for="$(sed -n 's/^torch=//p' "$bundle/VERSIONS")"
if [ "${torch_version%.*}" != "${built_for%.*}" ]; then
  echo "gpu-check: the bundle was built for PyTorch $built_for but this host has $torch_version; rebuild with CVDIST_GPU_TORCH=$torch_version and the matching CVDIST_GPU_TCH (tch's CHANGELOG)"
  exit 2
fi
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing="$(ldd "$bundle/gpu_check" 2>&1 | grep -E 'not found|GLIBC' || true)"
if [ -n "$missing" ]; then
  echo "gpu-check: the bundle cannot load here (needs $(sed -n 's/^needs=//p' "$bundle/VERSIONS")):"
  echo "$missing"
  exit 2
fi

rc=0
timeout 330 "$bundle/gpu_check" --device 0 --batch 128 || rc=1

echo "gpu-check: one resnet18 bf16 epoch through cvdist-worker (5,000 synthetic images, batch 128)"
run="$out/train-resnet18-bf16"
rm -rf "$run"
if timeout 90 "$bundle/cvdist-worker" train --model resnet18 --epochs 1 --dataset synthetic --batch-size 128 \
  --device cuda:0 --precision bf16 --quiet --out "$run" > "$out/train.log" 2>&1; then
  tail -n 1 "$out/train.log" | sed 's/^/gpu-check: /'
else
  echo "gpu-check: training FAILED or timed out:"
  tail -n 5 "$out/train.log"
  rc=1
fi
if [ -x "$bundle/cvdist" ]; then
  for wire in none bf16 fp16; do
    run="$out/local-nccl-$wire"
    rm -rf "$run"
    echo "gpu-check: 2 ranks on c10d NCCL, --grad-compression $wire (resnet20, 2,048 synthetic images)"
    if timeout 120 "$bundle/cvdist" local --model resnet20 --epochs 1 \
      --dataset synthetic --train-samples 2048 --test-samples 256 --batch-size 128 --workers 2 --device cuda \
      --collective nccl --grad-compression "$wire" --quiet --out "$run" > "$out/local-$wire.log" 2>&1; then
      tail -n 1 "$run/metrics.jsonl" | sed 's/^/gpu-check: /'
    else
      echo "gpu-check: 2-rank NCCL ($wire) FAILED or timed out:"
      tail -n 8 "$out/local-$wire.log"
      rc=1
    fi
  done
fi
echo "gpu-check: done in $(( $(date +%s) - started )) s, exit $rc"
exit $rc
