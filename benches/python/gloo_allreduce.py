"""One rank of the Gloo all-reduce reference benchmark (torch.distributed on loopback).

Mirrors worker/examples/allreduce_bench.rs: barrier before each timed iteration, rank 0
prints one RESULT line per size with the median and minimum over the timed iterations.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sizes", default="23500000,2300000,1024")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world
    )
    for n in (int(s) for s in a.sizes.split(",")):
        t = torch.full((n,), float(a.rank))
        dist.all_reduce(t)
        expect = a.world * (a.world - 1) / 2
        assert bool((t == expect).all()), "gloo sum mismatch"
        for _ in range(a.warmup):
            dist.barrier()
            dist.all_reduce(t)
        times = []
        for _ in range(a.iters):
            t.fill_(1.0)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        if a.rank == 0:
            print(
                f"RESULT impl=gloo world={a.world} floats={n} "
                f"median_ms={times[len(times) // 2]:.4f} min_ms={times[0]:.4f}",
                flush=True,
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
