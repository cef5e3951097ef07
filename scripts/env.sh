# Sourced by the project's scripts: puts the libtorch venv first on PATH so that
# `cargo` (torch-sys with LIBTORCH_USE_PYTORCH=1) and the Python reference use it.
_cvdist_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CVDIST_TORCH_VENV="$("$_cvdist_root/scripts/setup-libtorch.sh" | tail -n 1)"
export CVDIST_TORCH_VENV
export PATH="$CVDIST_TORCH_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export CVDIST_PYTHON="$CVDIST_TORCH_VENV/bin/python"
