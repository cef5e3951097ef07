#!/usr/bin/env bash
# Runs the whole cvdist test suite on a fresh machine: sets up the libtorch venv (cached),
# builds every binary, checks formatting (rustfmt.toml) and lints (clippy, -D warnings),
# then runs the Rust tests, the Python gRPC client test, the deployment checks and the
# Slurm smoke test (a real one-node Slurm cluster; installs slurm-wlm and munge when absent).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/build.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

# Two tests need a small tmpfs (a read-only state dir, a full disk). Where one can be
# mounted they must run (a test that cannot mount then fails instead of skipping); where
# not, say so here, where the summary is read.
probe="$(mktemp -d)"
if [ -z "${CVDIST_TEST_NO_MOUNT:-}" ] && mount -t tmpfs -o size=64k tmpfs "$probe" 2>/dev/null; then
    umount "$probe"
    export CVDIST_REQUIRE_MOUNT=1
else
    echo "test.sh: no tmpfs can be mounted here: the read-only state dir and disk-full checkpoint cases will be SKIPPED"
fi
rmdir "$probe"

# Test binaries run one at a time: the end-to-end tests start several processes that
# each train, and this machine class has two cores.
# --no-fail-fast, and every stage runs even after one fails: a failure must never hide another.
failed=()
cargo fmt --all -- --check || failed+=("cargo fmt --check")
cargo clippy --release --workspace --all-targets --locked -- -D warnings || failed+=("cargo clippy")
cargo test --release --workspace --locked --no-fail-fast -- --test-threads=1 || failed+=("cargo test")
"$CVDIST_PYTHON" -m pytest -q tests/python || failed+=("pytest tests/python")
scripts/check-deploy.sh || failed+=("scripts/check-deploy.sh")
scripts/slurm-smoke.sh || failed+=("scripts/slurm-smoke.sh")
if [ ${#failed[@]} -gt 0 ]; then
  echo "test.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test.sh: all stages passed"
