#!/usr/bin/env bash
# Creates (once) the Python venv that provides libtorch for the `tch` crate and the
# PyTorch reference used by parity tests and benchmarks. The venv lives outside the
# clone so every clone on a machine shares one 4.7 GB install.
#
#   scripts/setup-libtorch.sh          # prints the venv path on the last line
#
# CVDIST_TORCH_VENV overrides the location.
set -euo pipefail
TORCH_VERSION="2.13.0"
venv="${CVDIST_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cvdist/torch-venv}"
stamp="$venv/.cvdist-torch-$TORCH_VERSION"
if [ ! -f "$stamp" ]; then
  echo "setup-libtorch: installing torch==$TORCH_VERSION into $venv (one time, ~4.7 GB)" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy safetensors \
      grpcio grpcio-tools >&2
  touch "$stamp"
fi
echo "$venv"
