"""One rank of PyTorch DDP training (Gloo), the peer of cvdist in scripts/bench-net.sh.

The same reference architecture as cvdist's zoo (tests/python/reference_models.py), SGD with
cvdist's defaults (lr 0.1, momentum 0.9, weight decay 5e-4), DDP with its default buckets
(25 MB, a small first one), one process per rank. Data: the first `steps * batch * world`
CIFAR-10 training images (the images cvdist trains on with the same `--train-samples` and
`--no-augment`), sharded like DistributedSampler(shuffle=True), normalised up front; or random
tensors with `--data` omitted. The network interface comes from GLOO_SOCKET_IFNAME, which the
caller sets.

"train_seconds" is the wall time of the training loop on this rank, from the first step to the
end of the last (forward, backward with DDP's all-reduce, SGD, the loss read back), as cvdist's
epoch timer counts it; process-group setup and DDP's initial broadcast are excluded, as cvdist's
broadcast from rank 0 is. Rank 0 prints one JSON line.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from reference_models import build  # noqa: E402
from torch_train import MEAN, STD, load  # noqa: E402


def shard(a, n, rank):
    """This rank's images, in DistributedSampler order (shuffle=True, seed 0, drop_last=False)."""
    if a.data:
        x, y = load(a.data, [f"data_batch_{i}.bin" for i in range(1, 6)])
        if len(y) < n:
            sys.exit(f"ddp_train.py: --data has {len(y)} training images, {n} needed")
        x, y = x[:n], y[:n]
    else:
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
    idx = torch.tensor(list(DistributedSampler(range(n), num_replicas=a.world, rank=rank, shuffle=True, seed=0)))
    return ((x[idx].float() / 255.0) - MEAN) / STD, y[idx]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="HOST:PORT of rank 0's rendezvous (torch tcp:// init)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=128, help="per rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default="", help="CIFAR-10 binary directory; random images when empty")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC model and input (the layout cvdist trains in by default)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x, y = shard(a, a.steps * a.batch * a.world, a.rank)
    dist.init_process_group("gloo", init_method=f"tcp://{a.master}", rank=a.rank, world_size=a.world)
    model = build(a.model).train()
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model)  # default bucket_cap_mb (25), broadcasts rank 0's weights
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    dist.barrier()
    steps, loss_sum, correct = [], 0.0, 0
    start = time.perf_counter()
    for b in range(0, len(y), a.batch):
        t0 = time.perf_counter()
        xb, yb = x[b:b + a.batch], y[b:b + a.batch]
        opt.zero_grad()
        out = ddp(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(yb)
        correct += int((out.argmax(1) == yb).sum())
        steps.append(time.perf_counter() - t0)
    train_seconds = time.perf_counter() - start
    dist.barrier()
    if a.rank == 0:
        print(json.dumps({"impl": "ddp", "model": a.model, "batch": a.batch, "world": a.world, "threads": a.threads,
                          "steps": len(steps), "train_seconds": round(train_seconds, 4),
                          "step_seconds": [round(t, 4) for t in steps],
                          "train_loss": loss_sum / len(y), "train_acc": correct / len(y)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
