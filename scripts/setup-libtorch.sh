#!/usr/bin/env bash
# Creates (once) the Python venv that provides libtorch for the `tch` crate, the PyTorch
# reference used by parity tests and benchmarks, and the Python test tools. The venv lives
# outside the clone so every clone on a machine shares one 4.7 GB install.
#
#   scripts/setup-libtorch.sh          # prints the venv path on the last line
#
# CVDIST_TORCH_VENV overrides the location.
set -euo pipefail
packages=(torch==2.13.0 numpy safetensors grpcio grpcio-tools pytest)
venv="${CVDIST_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/cvdist/torch-venv}"
stamp="$venv/.cvdist-$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup-libtorch: installing ${packages[*]} into $venv (first time ~4.7 GB)" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q "${packages[@]}" >&2
  rm -f "$venv"/.cvdist-*
  touch "$stamp"
fi
echo "$venv"
