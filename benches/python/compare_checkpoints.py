"""Compares two cvdist checkpoints' tensor files (safetensors, read with the standard
library and torch only: a GPU host may lack the safetensors package). Prints, for the
BatchNorm running statistics and for the weights, the largest absolute difference and
the relative L2 difference of the group (||a-b|| / ||b||, all its tensors as one vector),
whether every tensor is bit-identical, and whether every running variance is finite and
positive.

  compare_checkpoints.py A.safetensors B.safetensors [--exact | --rtol 0.05]

Exit status 0 when the check passes (--exact: bit-identical; else both relative
differences within --rtol and the statistics sane), 1 when it does not, 2 on bad input.
"""
import argparse
import json
import struct
import sys

import torch

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "BF16": torch.bfloat16,
          "F16": torch.float16, "I32": torch.int32}


def load(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        raw = bytearray(data[base + start:base + end])
        t = torch.frombuffer(raw, dtype=DTYPES[meta["dtype"]]) if raw else torch.empty(0)
        out[name] = t.reshape(meta["shape"]).clone()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--exact", action="store_true")
    p.add_argument("--rtol", type=float, default=0.05)
    a = p.parse_args()
    try:
        x, y = load(a.a), load(a.b)
    except (OSError, ValueError, KeyError) as e:
        print(f"compare_checkpoints: cannot read: {e}")
        sys.exit(2)
    if sorted(x) != sorted(y):
        print(f"compare_checkpoints: the tensor names differ: {sorted(set(x) ^ set(y))[:5]}")
        sys.exit(1)
    groups = {"batchnorm statistics": [], "weights": []}
    identical = True
    sane = True
    for name in sorted(x):
        if name.startswith("momentum.") or x[name].dtype == torch.int64:
            identical &= torch.equal(x[name], y[name])
            continue
        group = "batchnorm statistics" if name.endswith(("running_mean", "running_var")) else "weights"
        d = (x[name].double() - y[name].double()).abs()
        groups[group].append((d.max().item() if d.numel() else 0.0, d.square().sum().item(),
                              y[name].double().square().sum().item()))
        identical &= torch.equal(x[name], y[name])
        if name.endswith("running_var"):
            sane &= bool(torch.isfinite(x[name]).all() and (x[name] > 0).all())
    worst = 0.0
    for group, rows in groups.items():
        if not rows:
            continue
        abs_max = max(r[0] for r in rows)
        rel = (sum(r[1] for r in rows) / max(sum(r[2] for r in rows), 1e-30)) ** 0.5
        worst = max(worst, rel)
        print(f"compare_checkpoints: {group}: {len(rows)} tensors, max |a-b| {abs_max:.3e}, "
              f"relative L2 difference {rel:.3e}")
    print(f"compare_checkpoints: bit-identical: {identical}; running variances finite and positive: {sane}")
    ok = identical if a.exact else (sane and worst <= a.rtol)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
