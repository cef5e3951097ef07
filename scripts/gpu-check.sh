#!/usr/bin/env bash
# The GPU check, for a GPU host with PyTorch in its Python but no Rust toolchain and no
# internet. It runs the bundle `scripts/gpu-check-build.sh` made on a build machine against
# the same PyTorch release, with that host's own libtorch, in under 8 minutes, on synthetic
# data, and prints:
#   1. the GPU (name, driver, memory), PyTorch/CUDA/NCCL versions;
#   2. step time and images/s of resnet18 and resnet50 at batch 128 in fp32 and bf16,
#      channels_last, for cvdist's training engine, PyTorch eager and PyTorch DDP
#      (`torchrun --nproc-per-node 1`) on the same GPU in the same command, with the ratios
#      cvdist/eager and cvdist/DDP (benches/python/gpu_step.py);
#   3. 2-rank jobs through the real worker (`cvdist local --workers 2 --device cuda
#      --collective nccl`: c10d's ProcessGroupNCCL; the two ranks share the GPU under
#      distinct NCCL_HOSTIDs, which `cvdist local` sets) with each gradient wire (none, bf16,
#      fp16, under fp32, bf16 and fp16 autocast with the loss scaler), every step's reduced
#      gradients checked on every rank against the exact sum
#      (CVDIST_AUDIT_REDUCTIONS, worker/src/train/reduction_audit.rs);
#   4. a rank killed mid-epoch (SIGKILL): the job recovers from the survivor's live state
#      with no step replayed, and its final checkpoint's BatchNorm statistics and weights
#      are compared with an uninterrupted run's (benches/python/compare_checkpoints.py:
#      bit-identical on the CPU twin, within 5 % relative L2 on a GPU, whose cuDNN
#      kernels are not bit-reproducible).
# No bandwidth is printed for one rank (NCCL does nothing for a world of one).
#
#   scripts/gpu-check.sh [BUNDLE]          # default target/gpu-check/bundle
#   scripts/gpu-check.sh --cpu [BINDIR]    # the CPU twin: the same parts on this machine's
#                                          # CPU, gloo for NCCL, smaller sizes (BINDIR:
#                                          # target/release after scripts/build.sh and
#                                          # `cargo build --release --example gpu_check`)
#
# From a session: run(command="scripts/gpu-check.sh", carry=["target/gpu-check/bundle"],
# timeout_s=540). Output also goes to $OUT/gpu-check.txt (default runs/gpu-check/).
# Exit status: 0 all parts passed, 1 a part failed, 2 the host or bundle does not fit.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cpu=0
if [ "${1:-}" = "--cpu" ]; then
  cpu=1
  shift
fi
if [ $cpu = 1 ]; then
  bundle="${1:-$root/target/release}"
else
  bundle="${1:-$root/target/gpu-check/bundle}"
fi
out="${OUT:-$root/runs/gpu-check}"
mkdir -p "$out"
exec > >(tee "$out/gpu-check.txt") 2>&1
started=$(date +%s)

gpu_check="$bundle/gpu_check"
[ -x "$gpu_check" ] || gpu_check="$bundle/examples/gpu_check"
if [ ! -x "$gpu_check" ] || [ ! -x "$bundle/cvdist" ] || [ ! -x "$bundle/cvdist-worker" ]; then
  echo "gpu-check: no bundle at $bundle (gpu_check, cvdist, cvdist-worker): build it with scripts/gpu-check-build.sh on a machine with Rust, then carry target/gpu-check/bundle"
  exit 2
fi
if [ $cpu = 1 ]; then
  # shellcheck source=scripts/env.sh
  source "$root/scripts/env.sh"
  echo "gpu-check: CPU twin, binaries in $bundle; $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
else
  echo "gpu-check: bundle $(tr '\n' ' ' < "$bundle/VERSIONS")"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu-check: nvidia-smi: /'
fi

python="${CVDIST_GPU_PYTHON:-${CVDIST_PYTHON:-$(command -v python3 || command -v python || true)}}"
if [ -z "$python" ]; then
  echo "gpu-check: no python3 on PATH (set CVDIST_GPU_PYTHON to the Python that has torch)"
  exit 2
fi
info="$("$python" - <<'EOF'
import os, torch
lib = os.path.join(os.path.dirname(torch.__file__), "lib")
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version()))
except Exception:  # a build without NCCL: the check itself says more
    nccl = "?"
print(torch.__version__.split("+")[0], lib, torch.version.cuda, nccl, name, sep="\t")
EOF
)" || { echo "gpu-check: $python cannot import torch"; exit 2; }
IFS=$'\t' read -r torch_version torch_lib cuda_version nccl_version device_name <<< "$info"
echo "gpu-check: device: $device_name; PyTorch $torch_version (CUDA $cuda_version, NCCL $nccl_version) at $torch_lib"

built_for="$(sed -n 's/^torch=//p' "$bundle/VERSIONS" 2>/dev/null)"
if [ $cpu = 0 ] && [ "${torch_version%.*}" != "${built_for%.*}" ]; then
  echo "gpu-check: the bundle was built for PyTorch $built_for but this host has $torch_version; rebuild with CVDIST_GPU_TORCH=$torch_version and the matching CVDIST_GPU_TCH (tch's CHANGELOG)"
  exit 2
fi
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing="$(ldd "$gpu_check" 2>&1 | grep -E 'not found|GLIBC' || true)"
if [ -n "$missing" ]; then
  echo "gpu-check: the bundle cannot load here (needs $(sed -n 's/^needs=//p' "$bundle/VERSIONS")):"
  echo "$missing"
  exit 2
fi

# Sizes: the GPU check proper, or the CPU twin's (the same parts, minutes on 2 cores).
if [ $cpu = 1 ]; then
  dev=cpu; step_dev=cpu; collective=gloo; models=resnet18; batch=32; steps=3; warmup=1
  audit_samples=1024; kill_model=resnet20; kill_samples=4096; kill_epochs=2; compare=(--exact)
else
  dev=cuda; step_dev=0; collective=nccl; models=resnet18,resnet50; batch=128; steps=20; warmup=5
  audit_samples=4096; kill_model=resnet56; kill_samples=4864; kill_epochs=3; compare=(--rtol 0.05)
fi
rc=0

echo "gpu-check: [2] step time, batch $batch, channels_last: cvdist, PyTorch eager, PyTorch DDP (one rank)"
steps_json="$out/steps.jsonl"
rm -f "$steps_json"
timeout 200 "$gpu_check" --device "$step_dev" --batch "$batch" --steps "$steps" --warmup "$warmup" \
  --models "$models" --json "$steps_json" || rc=1
timeout 120 "$python" "$root/benches/python/gpu_step.py" --mode eager --device "$dev" --models "$models" \
  --batch "$batch" --steps "$steps" --warmup "$warmup" --json "$steps_json" || { echo "gpu-check: PyTorch eager FAILED"; rc=1; }
timeout 150 "$python" -m torch.distributed.run --standalone --nproc-per-node 1 "$root/benches/python/gpu_step.py" \
  --mode ddp --device "$dev" --models "$models" --batch "$batch" --steps "$steps" --warmup "$warmup" \
  --json "$steps_json" 2> "$out/ddp.log" || { echo "gpu-check: PyTorch DDP FAILED:"; tail -n 5 "$out/ddp.log"; rc=1; }
"$python" - "$steps_json" <<'PY' || rc=1
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {(r["impl"], r["model"], r["precision"]): statistics.median(r["step_seconds"]) for r in rows}
print("gpu-check: | model | precision | cvdist ms | eager ms | DDP ms | cvdist/eager | cvdist/DDP |")
missing = False
for (impl, model, precision), t in med.items():
    if impl != "cvdist":
        continue
    e, d = med.get(("pytorch-eager", model, precision)), med.get(("pytorch-ddp", model, precision))
    missing |= e is None or d is None
    ms = lambda v: f"{v * 1e3:.2f}" if v else "-"
    ratio = lambda v: f"{t / v:.3f}" if v else "-"
    print(f"gpu-check: | {model} | {precision} | {ms(t)} | {ms(e)} | {ms(d)} | {ratio(e)} | {ratio(d)} |")
sys.exit(1 if missing else 0)
PY

echo "gpu-check: [3] 2 ranks, --collective $collective, every step's reduction audited on every rank"
# Each wire with its precision: fp32, bf16 autocast, and fp16 autocast with the loss scaler
# (a CUDA mode; fp32 on the CPU twin), so the scaled, overlapped, compressed path is audited.
for wire in none bf16 fp16; do
  case $wire in none) precision=fp32 ;; *) precision=$wire ;; esac
  run="$out/audit-$wire"
  rm -rf "$run"
  if CVDIST_AUDIT_REDUCTIONS=1000 timeout 150 "$bundle/cvdist" local --model resnet20 --epochs 1 \
    --dataset synthetic --train-samples "$audit_samples" --test-samples 256 --batch-size 128 --workers 2 \
    --device "$dev" --collective "$collective" --grad-compression "$wire" --precision "$precision" --quiet --out "$run" \
    > "$out/audit-$wire.log" 2>&1; then
    want=$(( audit_samples / 256 ))
    for k in 0 1; do
      n=$(grep -c 'reduction audit: ok' "$run/worker-$k.log" || true)
      worst=$(grep -o 'worst_error_over_bound=[0-9.e+-]*' "$run/worker-$k.log" | cut -d= -f2 | sort -g | tail -n 1)
      if [ "$n" -ge "$want" ] && ! grep -q 'reduction audit failed' "$run/worker-$k.log"; then
        echo "gpu-check: wire $wire, $precision, rank $k: $n steps audited, worst error ${worst:-?} of the bound: ok"
      else
        echo "gpu-check: wire $wire rank $k: FAILED ($n of $want steps audited):"
        grep -m 3 'reduction audit' "$run/worker-$k.log"
        rc=1
      fi
    done
  else
    echo "gpu-check: 2-rank $collective job, wire $wire, FAILED or timed out:"
    tail -n 8 "$out/audit-$wire.log"
    tail -n 4 "$run"/worker-*.log 2>/dev/null
    rc=1
  fi
done

echo "gpu-check: [4] a rank killed mid-epoch ($kill_model, $kill_samples synthetic images, $kill_epochs epochs): live recovery"
# Runs one 2-rank job into DIR; with KILL=1, SIGKILLs rank 1 in the middle of the first
# epoch: the reduction audit logs every step on rank 0 (`reduction audit: ok step=N`), which
# tells the script where the job is; it changes no value the job computes.
kill_step=$(( kill_samples / 256 / 2 ))
kill_job() { # DIR KILL
  local dir="$1" kill="$2"
  rm -rf "$dir"
  mkdir -p "$dir"
  CVDIST_AUDIT_REDUCTIONS=1000000 timeout 240 "$bundle/cvdist" local --model "$kill_model" \
    --epochs "$kill_epochs" --dataset synthetic --train-samples "$kill_samples" --test-samples 256 \
    --batch-size 128 --workers 2 --max-restarts 2 --device "$dev" --collective "$collective" --out "$dir" \
    > "$dir.log" 2>&1 &
  local job=$! at=0
  if [ "$kill" = 1 ]; then
    for _ in $(seq 2400); do
      at=$(grep -o 'reduction audit: ok step=[0-9]*' "$dir/worker-0.log" 2>/dev/null | tail -n 1 | cut -d= -f2)
      [ "${at:-0}" -ge "$kill_step" ] && break
      sleep 0.05
    done
    if pkill -KILL -f -- "--worker-id local-1"; then
      echo "gpu-check: killed rank 1 (SIGKILL) after rank 0's step ${at:-?} of $(( kill_samples / 256 )) in epoch 1"
    else
      echo "gpu-check: rank 1 was not running when it was to be killed"
    fi
  fi
  wait "$job"
}
kill_job "$out/kill-reference" 0; ref_rc=$?
kill_job "$out/kill-killed" 1; killed_rc=$?
summary="$out/kill-killed/summary.json"
if [ $ref_rc = 0 ] && [ $killed_rc = 0 ] && [ -f "$summary" ]; then
  "$python" - "$summary" <<'PY' || rc=1
import json, sys
s = json.load(open(sys.argv[1]))
r = s.get("recoveries", [])
print(f"gpu-check: killed run {s['state']}: {len(r)} recovery(ies): " +
      "; ".join(f"{x['cause']}, resumed from {x['resumed_from']!r}, {x['steps_replayed']} steps replayed, "
                f"down {x['downtime_seconds']} s" for x in r))
ok = (s["state"] == "succeeded" and len(r) == 1 and r[0]["steps_replayed"] == 0
      and r[0]["resumed_from"].startswith("live state"))
sys.exit(0 if ok else 1)
PY
  a="$(find "$out/kill-killed/checkpoints" -name '*.safetensors' | sort | tail -n 1)"
  b="$(find "$out/kill-reference/checkpoints" -name '*.safetensors' | sort | tail -n 1)"
  "$python" "$root/benches/python/compare_checkpoints.py" "$a" "$b" "${compare[@]}" ||
    { echo "gpu-check: the recovered run's final state differs from the uninterrupted run's"; rc=1; }
else
  echo "gpu-check: the kill check FAILED (reference exit $ref_rc, killed exit $killed_rc):"
  tail -n 6 "$out/kill-killed.log"
  rc=1
fi

echo "gpu-check: done in $(( $(date +%s) - started )) s, exit $rc"
exit $rc
