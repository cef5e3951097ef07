"""PyTorch side of worker/tests/interop.rs (export -> PyTorch -> import round trip).

    export_roundtrip.py DIR MODEL

Reads DIR/exported.safetensors (written by `cvdist-worker export`) and DIR/input.safetensors
("input": normalised test images [N, 3, 32, 32]), and:

  * checks the header metadata (format "pt", the model name);
  * builds MODEL from reference_models.py and loads the exported tensors with
    load_state_dict(strict=True), so any missing/unexpected key or shape is an error;
  * writes DIR/torch_logits.safetensors with the eval-mode logits ("logits");
  * writes the model's own state_dict (with num_batches_tracked, as PyTorch users save it)
    to DIR/torch_state.safetensors with safetensors.torch.save_file, for `cvdist-worker import`.

Exits non-zero on any error, so the Rust test fails (not skips) when torch is unavailable.
"""

import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_models  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def main(directory, name):
    exported = os.path.join(directory, "exported.safetensors")
    with safe_open(exported, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "pt" or meta.get("model") != name:
        raise SystemExit(f"unexpected metadata in {exported}: {meta}")

    state = load_file(exported)
    model = reference_models.build(name)
    model.load_state_dict(state, strict=True)
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if len(counters) != len(bns) or any(state[k].dtype != torch.int64 or state[k].dim() != 0 for k in counters):
        raise SystemExit(f"{len(counters)} num_batches_tracked int64 scalars for {len(bns)} BatchNorms")

    x = load_file(os.path.join(directory, "input.safetensors"))["input"]
    model.eval()
    with torch.no_grad():
        logits = model(x).contiguous()
    save_file({"logits": logits}, os.path.join(directory, "torch_logits.safetensors"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(directory, "torch_state.safetensors"))
    print(f"{name}: strict load ok, {len(state)} tensors, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
