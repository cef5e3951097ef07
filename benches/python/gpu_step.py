"""PyTorch's side of the GPU check (scripts/gpu-check.sh): the step time of the same
reference architecture, batch and SGD recipe as cvdist's `gpu_check`, as users would run it:

  --mode eager   plain PyTorch (autocast for bf16, channels_last model and input);
  --mode ddp     the same under DistributedDataParallel, started by torchrun
                 (`python -m torch.distributed.run --nproc-per-node 1 gpu_step.py --mode ddp`):
                 NCCL on CUDA, Gloo on CPU, so the bucketed all-reduce hooks run as in a job.

Synthetic 32x32 input; each step ends with the loss read back (device idle), as gpu_check
times it. Appends one JSON line per model x precision to --json (impl, model, precision,
batch, step_seconds) and prints a `gpu-check:` table row per cell.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from reference_models import build  # noqa: E402


def time_steps(model, opt, x, y, device, precision, warmup, steps):
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        value = loss.item()
        if value != value:
            raise RuntimeError(f"non-finite loss at step {i}")
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["eager", "ddp"], default="eager")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--json", required=True)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if a.mode == "ddp":
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    for name in a.models.split(","):
        for precision in a.precisions.split(","):
            torch.manual_seed(0)
            model = build(name).to(device).to(memory_format=torch.channels_last).train()
            if a.mode == "ddp":
                ids = [device.index] if device.type == "cuda" else None
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            x = torch.randn(a.batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (a.batch,), device=device)
            times = time_steps(model, opt, x, y, device, precision, a.warmup, a.steps)
            step = sorted(times)[len(times) // 2]
            print(f"gpu-check: | pytorch-{a.mode} {name} | {precision} | {step * 1e3:.2f} | {a.batch / step:.0f} |",
                  flush=True)
            with open(a.json, "a") as f:
                f.write(json.dumps({"impl": f"pytorch-{a.mode}", "model": name, "precision": precision,
                                    "batch": a.batch, "step_seconds": [round(t, 6) for t in times]}) + "\n")
            del model, opt
    if a.mode == "ddp":
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
