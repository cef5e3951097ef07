"""The reference recipe in plain PyTorch eager, for side-by-side runs with `cvdist train`:
SGD 0.1 / momentum 0.9 / wd 5e-4, cosine stepped per epoch, batch 128 (last batch kept),
zero-pad-4 random crop + flip, normalisation, test batch 100. Reads the CIFAR-10 binary
layout directly. Prints one JSON line per epoch."""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "python"))
from reference_models import build  # noqa: E402

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)


def load(dir_, files):
    d = Path(dir_)
    d = d / "cifar-10-batches-bin" if (d / "cifar-10-batches-bin").is_dir() else d
    raw = np.concatenate([np.fromfile(d / f, dtype=np.uint8).reshape(-1, 3073) for f in files])
    return torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy()), torch.from_numpy(raw[:, 0].astype(np.int64))


def augment(x_u8, gen):
    n = x_u8.shape[0]
    padded = F.pad(x_u8.float() / 255.0, (4, 4, 4, 4))  # zeros in pixel space
    oy = torch.randint(0, 9, (n,), generator=gen)
    ox = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    r = torch.arange(32)
    rows = (oy[:, None] + r)[:, None, :, None]
    cols = (ox[:, None] + torch.where(flip[:, None], 31 - r, r))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    return (out - MEAN) / STD


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-samples", type=int, default=0)
    p.add_argument("--test-samples", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    xtr, ytr = load(a.data, [f"data_batch_{i}.bin" for i in range(1, 6)])
    xte, yte = load(a.data, ["test_batch.bin"])
    if a.train_samples:
        xtr, ytr = xtr[:a.train_samples], ytr[:a.train_samples]
    if a.test_samples:
        xte, yte = xte[:a.test_samples], yte[:a.test_samples]
    xte_n = ((xte.float() / 255.0) - MEAN) / STD
    model = build(a.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(a.seed)
    for epoch in range(a.epochs):
        lr = 0.05 * (1 + math.cos(math.pi * epoch / a.epochs))
        for g in opt.param_groups:
            g["lr"] = lr
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        loss_sum = correct = seen = 0.0
        for b in range(0, len(perm), 128):
            idx = perm[b:b + 128]
            x, y = augment(xtr[idx], gen), ytr[idx]
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
        train_seconds = time.perf_counter() - start
        model.eval()
        tl = tc = 0.0
        with torch.no_grad():
            for b in range(0, len(yte), 100):
                out = model(xte_n[b:b + 100])
                tl += F.cross_entropy(out, yte[b:b + 100]).item() * len(out)
                tc += (out.argmax(1) == yte[b:b + 100]).sum().item()
        print(json.dumps({"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                          "test_loss": tl / len(yte), "test_acc": tc / len(yte), "lr": lr,
                          "seconds": time.perf_counter() - start, "images_per_sec": seen / train_seconds}),
              flush=True)


if __name__ == "__main__":
    main()
