#!/usr/bin/env bash
# Control-plane overhead: the same 1-worker job through `cvdist local` (embedded
# coordinator, gRPC session, progress reports, checkpoint uploads) and through the bare
# trainer (`cvdist train`), alternating rounds in one run. Prints median seconds/epoch.
#
#   scripts/bench-overhead.sh [MODEL] [EPOCHS] [TRAIN_SAMPLES] [ROUNDS]   (default: resnet20 2 10000 2)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/env.sh
source scripts/env.sh
model="${1:-resnet20}"; epochs="${2:-2}"; samples="${3:-10000}"; rounds="${4:-2}"
data="${CVDIST_DATA:-data/cifar10}"
[ -f "$data/cifar-10-batches-bin/test_batch.bin" ] || ../shared/data/prepare-cifar10 "$data"
scripts/build.sh >/dev/null
out="runs/bench-overhead"; rm -rf "$out"; mkdir -p "$out"
common=(--model "$model" --epochs "$epochs" --data "$data" --train-samples "$samples" --test-samples 2000)
for r in $(seq "$rounds"); do
  target/release/cvdist train "${common[@]}" --threads 2 --device cpu --out "$out/bare-$r" --quiet >/dev/null
  target/release/cvdist local "${common[@]}" --workers 1 --threads-per-worker 2 --device cpu --out "$out/local-$r" --quiet >/dev/null
done
"$CVDIST_PYTHON" - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def secs(kind):
    return [json.loads(l)["seconds"] for r in range(1, rounds + 1) for l in open(f"{out}/{kind}-{r}/metrics.jsonl")]
b, l = statistics.median(secs("bare")), statistics.median(secs("local"))
print(f"median s/epoch: bare trainer {b:.2f}  cvdist local (1 worker) {l:.2f}  overhead {100*(l/b-1):+.1f}%")
PY
