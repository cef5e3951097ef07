#!/usr/bin/env bash
# What --sync-bn costs: the same 2-worker job on the ring (global batch 128, 64 per worker,
# one thread per worker) with and without SyncBatchNorm, alternating rounds in one run.
# Prints, per model, the median training images/s of each and their ratio.
#
#   scripts/bench-sync-bn.sh [MODELS] [STEPS] [ROUNDS]   (default: "resnet20 resnet18" 20 2)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
models="${1:-resnet20 resnet18}"; steps="${2:-20}"; rounds="${3:-2}"
scripts/build.sh >/dev/null
out="runs/bench-sync-bn"; rm -rf "$out"; mkdir -p "$out"
lscpu | sed -n 's/^Model name: *//p'
for model in $models; do
  common=(--model "$model" --epochs 1 --dataset synthetic --train-samples $((128 * steps)) --test-samples 128
          --workers 2 --threads-per-worker 1 --device cpu --collective ring --global-batch 128 --quiet)
  for r in $(seq "$rounds"); do
    echo "$model round $r/$rounds" >&2
    target/release/cvdist local "${common[@]}" --out "$out/$model-plain-$r" >/dev/null
    target/release/cvdist local "${common[@]}" --sync-bn --out "$out/$model-sync-$r" >/dev/null
  done
done
"$CVDIST_PYTHON" - "$out" "$rounds" $models <<'PY'
import json, statistics, sys
out, rounds, models = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for m in models:
    def ips(kind):
        return statistics.median(json.loads(l)["images_per_sec"] for r in range(1, rounds + 1)
                                 for l in open(f"{out}/{m}-{kind}-{r}/metrics.jsonl"))
    p, s = ips("plain"), ips("sync")
    print(f"{m}: images/s without --sync-bn {p:.1f}, with {s:.1f}; step time with/without {p / s:.3f}")
PY
