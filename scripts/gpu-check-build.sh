#!/usr/bin/env bash
# Builds, on this machine, the bundle `scripts/gpu-check.sh` runs on a GPU host that has
# PyTorch preinstalled but no Rust toolchain and no internet (the machine this project is
# lent: PyTorch 2.11 for CUDA 13). The binaries link that host's libtorch at run time, so
# they are built against the same PyTorch release:
#
#   * the torch wheel of that release, from PyPI (`pip download --no-deps`: only its
#     headers and libraries are used; ~0.5 GB download, ~1 GB unpacked, kept in the cache);
#   * the tch release made for it (tch's CHANGELOG: 0.24 = PyTorch 2.11, 0.25 = 2.12,
#     0.26 = 2.13), in a copy of this tree whose Cargo.toml pins it, with its own target
#     directory so the normal build is untouched;
#   * linked with --allow-shlib-undefined: libtorch_cuda's CUDA libraries (cudart, cuBLAS,
#     cuDNN, NCCL) are not downloaded here; the GPU host's torch install provides them.
#
# Output: target/gpu-check/bundle (stripped gpu_check, cvdist-worker, cvdist and a
# VERSIONS file), well under the 64 MiB a device command may carry:
#   run(command="scripts/gpu-check.sh", carry=["target/gpu-check/bundle"])
#
#   scripts/gpu-check-build.sh                      # PyTorch 2.11 / tch 0.24
#   scripts/gpu-check-build.sh --smoke              # then run the bundle here, on CPU
#   CVDIST_GPU_TORCH=2.12.0 CVDIST_GPU_TCH=0.25.0 scripts/gpu-check-build.sh
#
# Rerunnable: every step is skipped or incremental when already done. A first build
# compiles every dependency (several minutes on 2 cores); run it under the project's build
# lock like any cargo command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_version="${CVDIST_GPU_TORCH:-2.11.0}"
tch_version="${CVDIST_GPU_TCH:-0.24.0}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cvdist/torch-$torch_version"
work="$root/target/gpu-check"
bundle="$work/bundle"
python="${CVDIST_PYTHON:-python3}"

# 1. libtorch of that release: the wheel's torch/{lib,include,share}.
if [ ! -f "$cache/torch/lib/libtorch_cuda.so" ]; then
  mkdir -p "$cache/wheel"
  echo "gpu-check-build: downloading torch==$torch_version (CUDA wheel, ~0.5 GB) into $cache" >&2
  "$python" -m pip download -q --no-deps "torch==$torch_version" -d "$cache/wheel" \
    --platform manylinux_2_28_x86_64 --only-binary=:all:
  wheel="$(ls "$cache"/wheel/torch-"$torch_version"-*.whl | head -n 1)"
  "$python" - "$wheel" "$cache" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(("torch/lib/", "torch/include/", "torch/share/"))]
    z.extractall(dest, names)
EOF
  rm -rf "$cache/wheel"
fi
libtorch="$cache/torch"

# 2. A copy of this tree (tracked and new files, as `git status` sees them) pinned to tch.
# tar keeps modification times, so an unchanged file does not make cargo rebuild.
rm -rf "$work/src"
mkdir -p "$work/src"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r ls -d 2>/dev/null | tr '\n' '\0' |
  tar --null -T - -cf -) | tar -xf - -C "$work/src"
sed -i -E "s/^tch = \"[^\"]*\"/tch = \"=$tch_version\"/; s/^torch-sys = \"[^\"]*\"/torch-sys = \"=$tch_version\"/" \
  "$work/src/Cargo.toml"
grep -q "^tch = \"=$tch_version\"" "$work/src/Cargo.toml" || { echo "gpu-check-build: could not pin tch in Cargo.toml" >&2; exit 1; }

# 3. Build against it. LIBTORCH points torch-sys (and the worker's autocast shim) at the
#    wheel's headers and libraries instead of the venv's PyTorch.
(
  cd "$work/src"
  unset LIBTORCH_USE_PYTORCH
  export LIBTORCH="$libtorch" LIBTORCH_CXX11_ABI=1 CARGO_TARGET_DIR="$work/target"
  export RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined"
  cargo build --release -p cvdist-worker -p cvdist-coordinator --bin cvdist-worker --bin cvdist --example gpu_check
)

# 4. The bundle.
rm -rf "$bundle"
mkdir -p "$bundle"
for b in examples/gpu_check cvdist-worker cvdist; do
  strip -o "$bundle/$(basename "$b")" "$work/target/release/$b"
done
glibc="$(objdump -T "$bundle"/* 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)"
glibcxx="$(objdump -T "$bundle"/* 2>/dev/null | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -n 1)"
{
  echo "torch=$torch_version"
  echo "tch=$tch_version"
  echo "commit=$(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo '+dirty')"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "needs=$glibc $glibcxx"
} > "$bundle/VERSIONS"
size_kib="$(du -sk "$bundle" | cut -f1)"
echo "gpu-check-build: $bundle: $((size_kib / 1024)) MiB ($(tr '\n' ' ' < "$bundle/VERSIONS"))"
if [ "$size_kib" -ge $((64 * 1024)) ]; then
  echo "gpu-check-build: the bundle is over the 64 MiB a device command may carry" >&2
  exit 1
fi

# 5. --smoke: prove the bundle loads and trains against that libtorch on this (CPU) machine.
#    Its CUDA libraries come from the project venv's nvidia/* packages (same CUDA major,
#    so the same sonames); the GPU host uses its own torch install's instead.
if [ "${1:-}" = "--smoke" ]; then
  venv="${CVDIST_TORCH_VENV:?source scripts/env.sh first}"
  nv="$(ls -d "$venv"/lib/python3*/site-packages/nvidia | head -n 1)"
  LD_LIBRARY_PATH="$libtorch/lib$(printf ':%s' "$nv"/*/lib)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  # No GPU here: it must see no CUDA device and refuse cuda:0.
  "$bundle/gpu_check" | tee "$work/smoke.txt" || true
  grep -q "^gpu-check: libtorch sees 0 CUDA device" "$work/smoke.txt"
  smoke="$work/smoke-train"
  rm -rf "$smoke"
  "$bundle/cvdist-worker" train --model resnet20 --epochs 1 --dataset synthetic --train-samples 512 \
    --test-samples 128 --batch-size 64 --device cpu --precision bf16 --threads 2 --quiet --out "$smoke"
  echo "gpu-check-build: smoke run trained one epoch against PyTorch $torch_version: $(cat "$smoke/metrics.jsonl")"
fi
