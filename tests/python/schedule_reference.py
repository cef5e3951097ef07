"""Reference learning-rate schedules from PyTorch, for worker/tests/schedule_reference.rs.

Reads a JSON list of {"lr", "epochs", "warmup", "world", "steps"} from argv[1] and prints,
for each, the rate of every training step as PyTorch's schedulers give it: Goyal et al.'s
gradual warmup is LinearLR(start_factor=1/k) over the warmup steps on an optimizer at the
scaled rate k*lr, stepped after every step; the cosine that follows is CosineAnnealingLR
over the remaining epochs, stepped after every epoch; SequentialLR switches between them.
"""
import json
import sys
import warnings

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

warnings.filterwarnings("ignore")  # SequentialLR passes an epoch to step(); deprecated, fine


def rates(lr, epochs, warmup, world, steps):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr * world)
    warm_steps = warmup * steps
    cosine = CosineAnnealingLR(opt, T_max=epochs - warmup)
    if warmup > 0:
        ramp = LinearLR(opt, start_factor=1.0 / world, end_factor=1.0, total_iters=warm_steps)
        sched = SequentialLR(opt, [ramp, cosine], milestones=[warm_steps])
    else:
        sched = cosine
    out = []
    for epoch in range(epochs):
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if epoch < warmup:
                sched.step()
        if epoch >= warmup:
            sched.step()
    return out


def main():
    cases = json.loads(sys.argv[1])
    print(json.dumps([rates(c["lr"], c["epochs"], c["warmup"], c["world"], c["steps"]) for c in cases]))


if __name__ == "__main__":
    main()
