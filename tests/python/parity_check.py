"""PyTorch side of worker/tests/parity.rs.

Two directions, so that weights are shown to move both ways between tch and PyTorch:

  parity_check.py tch2torch DIR MODEL...
      For each MODEL reads DIR/MODEL.weights.safetensors (a state_dict written by tch: no
      num_batches_tracked) and DIR/MODEL.input.safetensors ("input"), loads the weights into
      the reference model with load_state_dict(strict=True), and writes
      DIR/MODEL.torch_out.safetensors with "logits_eval", "logits_train" (eval first, so it
      sees the loaded running statistics) and every BN running_mean/running_var after the
      train-mode forward under its state_dict key.

  parity_check.py torch2tch DIR SEED MODEL...
      For each MODEL builds the reference with torch.manual_seed(SEED), perturbs BN affine
      parameters and running statistics (so that a wrong BN name mapping cannot hide behind
      γ=1, β=0, μ=0, σ²=1), and writes DIR/MODEL.torch_weights.safetensors (state_dict minus
      num_batches_tracked) and DIR/MODEL.torch_io.safetensors with "input", "logits_eval",
      "logits_train" and the post-train running statistics under "after.<key>".

Exits non-zero on any error, so the Rust test fails (not skips) when torch is unavailable.
"""

import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_models  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def is_buffer_stat(key):
    return key.endswith(".running_mean") or key.endswith(".running_var")


def forward_both(model, x):
    with torch.no_grad():
        model.eval()
        logits_eval = model(x).contiguous()
        model.train()
        logits_train = model(x).contiguous()
    stats = {k: v.clone().contiguous() for k, v in model.state_dict().items() if is_buffer_stat(k)}
    return logits_eval, logits_train, stats


def tch2torch(directory, models):
    for name in models:
        weights = load_file(os.path.join(directory, f"{name}.weights.safetensors"))
        x = load_file(os.path.join(directory, f"{name}.input.safetensors"))["input"]
        model = reference_models.build(name)
        # tch has no num_batches_tracked; it is irrelevant with momentum=0.1, but strict
        # loading needs the key.
        for key in list(weights):
            if key.endswith(".running_mean"):
                weights[key[: -len("running_mean")] + "num_batches_tracked"] = torch.tensor(0)
        model.load_state_dict(weights, strict=True)
        logits_eval, logits_train, stats = forward_both(model, x)
        out = {"logits_eval": logits_eval, "logits_train": logits_train, **stats}
        save_file(out, os.path.join(directory, f"{name}.torch_out.safetensors"))


def perturb_bn(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
                m.running_mean.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)


def torch2tch(directory, seed, models):
    for name in models:
        torch.manual_seed(seed)
        model = reference_models.build(name)
        gen = torch.Generator().manual_seed(seed + 1)
        perturb_bn(model, gen)
        weights = {k: v.clone().contiguous() for k, v in model.state_dict().items()
                   if not k.endswith("num_batches_tracked")}
        x = torch.randn(8, 3, 32, 32, generator=gen)
        logits_eval, logits_train, stats = forward_both(model, x)
        io = {"input": x, "logits_eval": logits_eval, "logits_train": logits_train}
        io.update({f"after.{k}": v for k, v in stats.items()})
        save_file(weights, os.path.join(directory, f"{name}.torch_weights.safetensors"))
        save_file(io, os.path.join(directory, f"{name}.torch_io.safetensors"))


def main(argv):
    if len(argv) >= 3 and argv[0] == "tch2torch":
        tch2torch(argv[1], argv[2:])
    elif len(argv) >= 4 and argv[0] == "torch2tch":
        torch2tch(argv[1], int(argv[2]), argv[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
