#!/usr/bin/env bash
# Creates (once) the Python venv that provides libtorch for the `tch` crate, the PyTorch
# reference used by parity tests and benchmarks, and the Python test tools. The venv lives
# outside the clone so every clone on a machine shares one 4.7 GB install.
#
#   scripts/setup-libtorch.sh          # prints the venv path on the last line
#
# CVDIST_TORCH_VENV overrides the location. CVDIST_TORCH_INDEX_URL takes torch from another
# wheel index, e.g. PyTorch's CUDA 12 builds for nodes whose NVIDIA driver is older than the
# R580 branch CUDA 13 needs (README, "GPU driver"):
#
#   CVDIST_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#     CVDIST_TORCH_VENV=~/.cache/cvdist/torch-venv-cu12 scripts/setup-libtorch.sh
set -euo pipefail
torch=torch==2.13.0
packages=(numpy safetensors grpcio grpcio-tools pytest)
index="${CVDIST_TORCH_INDEX_URL:-}"
venv="${CVDIST_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cvdist/torch-venv}"
# The default index leaves the stamp as it always was, so existing venvs are not reinstalled.
stamp="$venv/.cvdist-$(printf '%s\n' "$torch" "${packages[@]}" ${index:+"index=$index"} | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup-libtorch: installing $torch${index:+ from $index} and ${packages[*]} into $venv (first time ~4.7 GB)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  if [ -n "$index" ]; then
    # Only torch comes from that index (it also serves torch's own CUDA dependencies);
    # everything else from the default one.
    "$venv/bin/python" -m pip install -q --index-url "$index" "$torch" >&2
    "$venv/bin/python" -m pip install -q "${packages[@]}" >&2
  else
    "$venv/bin/python" -m pip install -q "$torch" "${packages[@]}" >&2
  fi
  rm -f "$venv"/.cvdist-[0-9a-f]*
  touch "$stamp"
fi
# The NCCL process group's headers (ProcessGroupNCCL.hpp) need CUDA's C++ core library
# (cccl) and the compiler's host headers (crt), which the torch wheel does not pull in:
# installed at the version of its CUDA runtime, ~15 MB, only for a CUDA build of torch.
cuda_rt="$("$venv/bin/python" -m pip show nvidia-cuda-runtime 2>/dev/null | sed -n 's/^Version: \([0-9]*\.[0-9]*\).*/\1/p')"
headers_stamp="$venv/.cvdist-headers-cuda$cuda_rt"
if [ -n "$cuda_rt" ] && [ ! -f "$headers_stamp" ]; then
  echo "setup-libtorch: installing CUDA $cuda_rt headers (cccl, crt) for the NCCL process group" >&2
  "$venv/bin/python" -m pip install -q --no-deps "nvidia-cuda-cccl==$cuda_rt.*" "nvidia-cuda-crt==$cuda_rt.*" >&2
  touch "$headers_stamp"
fi
echo "$venv"
