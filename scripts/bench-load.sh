#!/usr/bin/env bash
# Control-plane load benchmark (docs/BENCHMARKS.md, "Control-plane load"): one coordinator,
# 32 real worker processes, 50 WatchJob streams and a stream of GetJob/ListJobs calls on
# loopback for 45 s. Prints status-call latency p50/p90/p99 and checks that no worker was
# dropped; exits non-zero if p99 >= 100 ms or anything was dropped. Not part of CI (about
# 1-2 minutes). Extra arguments go to the benchmark, e.g.:
#   scripts/bench-load.sh --job              # also train a small job on two workers
#   scripts/bench-load.sh --workers 8 --duration 10
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/build.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
cargo build --release -p cvdist-coordinator --example load_test
exec target/release/examples/load_test "$@"
