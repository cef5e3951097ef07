#!/usr/bin/env bash
# Builds every cvdist binary in release mode (target/release/cvdist, cvdist-worker).
# CI, the README and the container images all build through this one script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release --workspace --bins --locked "$@"
