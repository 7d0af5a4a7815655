"""``python -m repc.demo``: fuse the built-in training-form example and print the report."""

from __future__ import annotations

import torch

import repc
from repc.examples import example_net


def main() -> int:
    model = example_net()
    x = torch.randn(2, 3, 32, 32)
    fused = repc.compile(model, (x,))
    print(fused.repc_report)
    with torch.no_grad():
        err = (fused(x) - model(x)).abs().max().item()
    convs = lambda m: sum(isinstance(t, torch.nn.Conv2d) for t in m.modules())
    bns = lambda m: sum(isinstance(t, torch.nn.modules.batchnorm._BatchNorm) for t in m.modules())
    print(f"\nconv layers {convs(model)} -> {convs(fused)}, batch norms {bns(model)} -> {bns(fused)}, "
          f"max |fused - original| on the example = {err:.2e}")
    return 0 if fused.repc_report.verification.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
