"""Inference latency: training form vs repc-fused vs a hand-written deploy form, on CPU.

For each model (stacks of the training-form blocks of :mod:`repc.examples`, and the example
network itself) three versions run on the same input:

* **training** -- the model as trained: every branch of every block;
* **repc** -- ``repc.compile(model, (x,))``, the default result (the model's own classes, the
  fused blocks swapped in);
* **deploy** -- the inference form written by hand, the way the papers' ``reparameterize()``
  methods do it: one conv (+ ReLU) per block, BatchNorms folded in float64 (the code below,
  independent of repc).  It is the target repc should reach.

All three are checked to agree with the training form before timing (relative deviation at
most 1e-4), then timed in interleaved rounds (see :func:`common.interleaved_medians`).
The table gives the median milliseconds per forward pass and the ratios repc/training
(the speed-up repc gives: below 1 is faster) and repc/deploy (1.00 means repc matches the
hand-written form); "best repc/deploy" compares the fastest rounds, which a loaded
machine disturbs least, and "max IQR" (interquartile range over median) says how noisy
the timings were.

    .venv/bin/python benchmarks/bench_latency.py                  # full run (about a minute)
    .venv/bin/python benchmarks/bench_latency.py --quick          # tiny smoke configuration
    .venv/bin/python benchmarks/bench_latency.py --threads 1 --json latency.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

import repc
from repc.examples import (DiverseBranchBlock, ExampleNet, MobileOneBlock, MobileOneUnit,
                           RepVGGBlock, example_net, randomize_bn)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402

F64 = torch.float64
AGREEMENT = 1e-4  # relative deviation allowed between the three forms before timing


# ----------------------------------------------------------------------------- hand-written deploy form
# Per-block reparameterization written the way the papers do it; this is the baseline repc is
# measured against, so it deliberately shares no code with repc.

def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``y = x * scale + shift``: scale = gamma / sqrt(var + eps), shift = beta - mean * scale."""
    std = torch.sqrt(bn.running_var.to(F64) + bn.eps)
    gamma = bn.weight.to(F64) if bn.affine else torch.ones_like(std)
    beta = bn.bias.to(F64) if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    return scale, beta - bn.running_mean.to(F64) * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """``bn(conv(x))`` as one conv: W' = W * scale[o], b' = b * scale + shift."""
    scale, shift = bn_scale_shift(bn)
    w = conv.weight.to(F64) * scale.reshape(-1, 1, 1, 1)
    b = shift if conv.bias is None else conv.bias.to(F64) * scale + shift
    return w, b


def pad_kernel(w: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad a (smaller, odd) kernel to k x k around its centre."""
    p = (k - w.shape[-1]) // 2
    return nn.functional.pad(w, (p, p, p, p))


def identity_kernel(channels: int, groups: int, k: int) -> torch.Tensor:
    """The k x k grouped kernel of the identity map: 1 at the centre of each channel's own tap."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, k, k, dtype=F64)
    for c in range(channels):
        w[c, c % per_group, k // 2, k // 2] = 1.0
    return w


def bn_identity(bn: nn.BatchNorm2d, groups: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    scale, shift = bn_scale_shift(bn)
    return identity_kernel(bn.num_features, groups, k) * scale.reshape(-1, 1, 1, 1), shift


def make_conv(w: torch.Tensor, b: torch.Tensor, stride: int, padding: int, groups: int, dtype) -> nn.Conv2d:
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], w.shape[-1], stride, padding, groups=groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(w.to(dtype))
        conv.bias.copy_(b.to(dtype))
    return conv.requires_grad_(False)


def deploy_repvgg(block: RepVGGBlock) -> nn.Module:
    conv3, bn3 = block.dense[0], block.dense[1]
    w, b = fold_conv_bn(conv3, bn3)
    w1, b1 = fold_conv_bn(block.pointwise[0], block.pointwise[1])
    w, b = w + pad_kernel(w1, 3), b + b1
    if block.identity is not None:
        wi, bi = bn_identity(block.identity, conv3.groups, 3)
        w, b = w + wi, b + bi
    return nn.Sequential(make_conv(w, b, conv3.stride[0], 1, conv3.groups, conv3.weight.dtype), nn.ReLU())


def deploy_mobileone_block(block: MobileOneBlock) -> nn.Module:
    first = block.branches[0][0]
    k, groups = first.kernel_size[0], first.groups
    w = torch.zeros_like(first.weight, dtype=F64)
    b = torch.zeros(first.out_channels, dtype=F64)
    for branch in block.branches:
        wb, bb = fold_conv_bn(branch[0], branch[1])
        w, b = w + wb, b + bb
    if block.scale is not None:
        ws, bs = fold_conv_bn(block.scale[0], block.scale[1])
        w, b = w + pad_kernel(ws, k), b + bs
    if block.skip is not None:
        wi, bi = bn_identity(block.skip, groups, k)
        w, b = w + wi, b + bi
    return nn.Sequential(make_conv(w, b, first.stride[0], k // 2, groups, first.weight.dtype), nn.ReLU())


def deploy_dbb(block: DiverseBranchBlock) -> nn.Module:
    """DBB's four branches as one k x k conv.

    * origin / one: conv-BN folds (the 1x1 padded to k x k);
    * seq: 1x1 (no bias) -> zero-pad -> BN1 -> k x k (pad 0) -> BN2.  The padded border holds
      BN1's shift t1, so this is the k x k conv with padding p applied to s1 * W1 x, plus the
      constant ``sum_{i,taps} Wk[o, i] t1[i]``; composing the 1x1 into it gives
      ``W[o, j] = sum_i Wk[o, i] s1[i] W1[i, j]``; BN2 then scales and shifts;
    * avg: 1x1 (no bias) -> zero-pad -> BN1 -> avg-pool(k, pad 0) -> BN2: the pool over the
      padded map is a k x k depthwise 1/k^2 kernel with padding p (border zeros counted) plus
      t1, so ``W[o, j] = s2 s1[o] W1[o, j] / k^2`` and ``b = s2 t1 + t2``.
    """
    conv_k, bn_k = block.origin[0], block.origin[1]
    k, stride, p = conv_k.kernel_size[0], conv_k.stride[0], conv_k.padding[0]
    w, b = fold_conv_bn(conv_k, bn_k)
    w1, b1 = fold_conv_bn(block.one[0], block.one[1])
    w, b = w + pad_kernel(w1, k), b + b1

    pre, _, bn1, conv_seq, bn2 = block.seq
    s1, t1 = bn_scale_shift(bn1)
    wk = conv_seq.weight.to(F64)
    carried = (wk.sum(dim=(2, 3)) * t1).sum(dim=1)
    w_seq = torch.einsum("oiab,ij->ojab", wk, s1.reshape(-1, 1) * pre.weight.to(F64)[:, :, 0, 0])
    s2, t2 = bn_scale_shift(bn2)
    w, b = w + w_seq * s2.reshape(-1, 1, 1, 1), b + s2 * carried + t2

    pre, _, bn1, pool, bn2 = block.avg
    s1, t1 = bn_scale_shift(bn1)
    s2, t2 = bn_scale_shift(bn2)
    w_avg = (s2 * s1).reshape(-1, 1) * pre.weight.to(F64)[:, :, 0, 0] / (k * k)
    w = w + w_avg[:, :, None, None].expand(-1, -1, k, k)
    b = b + s2 * t1 + t2
    return nn.Sequential(make_conv(w, b, stride, p, 1, conv_k.weight.dtype), nn.ReLU())


class DeployExampleNet(nn.Module):
    """ExampleNet's inference form: one conv per block, the Linear-BN-Dropout-Linear head as one Linear."""

    def __init__(self, net: ExampleNet):
        super().__init__()
        self.features = nn.Sequential(deploy(net.stem), deploy(net.stage1), deploy(net.stage2))
        first, bn, _, last = net.head
        scale, shift = bn_scale_shift(bn)
        w1 = first.weight.to(F64) * scale.reshape(-1, 1)  # BN after the first linear
        b1 = first.bias.to(F64) * scale + shift
        w = last.weight.to(F64) @ w1
        b = last.weight.to(F64) @ b1 + last.bias.to(F64)
        self.head = nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False)
        with torch.no_grad():
            self.head.weight.copy_(w.to(first.weight.dtype))
            self.head.bias.copy_(b.to(first.weight.dtype))

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def deploy(module: nn.Module) -> nn.Module:
    """The hand-written inference form of a training-form block, stack or example network."""
    if isinstance(module, RepVGGBlock):
        return deploy_repvgg(module)
    if isinstance(module, MobileOneBlock):
        return deploy_mobileone_block(module)
    if isinstance(module, MobileOneUnit):
        return nn.Sequential(deploy(module.depthwise), deploy(module.pointwise))
    if isinstance(module, DiverseBranchBlock):
        return deploy_dbb(module)
    if isinstance(module, ExampleNet):
        return DeployExampleNet(module)
    if type(module) is nn.Sequential:
        return nn.Sequential(*(deploy(m) for m in module))
    raise TypeError(f"no hand-written deploy form for {type(module).__name__}")


# ----------------------------------------------------------------------------- models

def repvgg_stack() -> nn.Module:
    """A RepVGG-A0-like stem and three stages (widths 32/64/128), 10 blocks."""
    return nn.Sequential(RepVGGBlock(3, 32, stride=2),
                         RepVGGBlock(32, 64, stride=2), *[RepVGGBlock(64, 64) for _ in range(3)],
                         RepVGGBlock(64, 128, stride=2), *[RepVGGBlock(128, 128) for _ in range(3)],
                         RepVGGBlock(128, 128, groups=4))


def mobileone_stack() -> nn.Module:
    """MobileOne units (depthwise 3x3 + pointwise 1x1 blocks, 3 over-parameterized branches each)."""
    return nn.Sequential(RepVGGBlock(3, 32, stride=2),
                         MobileOneUnit(32, 64, stride=2), MobileOneUnit(64, 64),
                         MobileOneUnit(64, 128, stride=2), MobileOneUnit(128, 128), MobileOneUnit(128, 128))


def dbb_stack() -> nn.Module:
    """Diverse Branch Blocks (k x k, 1x1, 1x1 -> k x k, 1x1 -> avg-pool branches)."""
    return nn.Sequential(DiverseBranchBlock(3, 32, stride=2), DiverseBranchBlock(32, 32),
                         DiverseBranchBlock(32, 64, stride=2), DiverseBranchBlock(64, 64),
                         DiverseBranchBlock(64, 64))


def _stack(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return randomize_bn(builder(), seed).eval()
    return make


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "repvgg": _stack(repvgg_stack),
    "mobileone": _stack(mobileone_stack),
    "example_net": lambda seed=0: example_net(width=32, seed=seed),
    "dbb": _stack(dbb_stack),
}


# ----------------------------------------------------------------------------- measurement

def rel_deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12))


def count_convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def bench_model(name: str, args) -> Dict:
    model = MODELS[name]()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    fused = repc.compile(model, (x,))  # the default: the model's own modules, the fused blocks swapped in
    compile_s = time.perf_counter() - start
    hand = deploy(model).eval()
    forms = {"training": model, "repc": fused, "deploy": hand}
    with torch.no_grad():
        for probe_name, probe in (("example", x), ("random", torch.randn_like(x))):
            want = model(probe)
            for form in ("repc", "deploy"):
                dev = rel_deviation(forms[form](probe), want)
                if not dev <= AGREEMENT:
                    raise SystemExit(f"{name}: the {form} form deviates from the training form by {dev:.2e} "
                                     f"on the {probe_name} input (allowed {AGREEMENT:g}); not timing it")
        calls = args.calls
        if calls is None:  # about 5 ms of the training form per round: fine-grained interleaving
            once = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(x)
                once.append(time.perf_counter() - t0)
            calls = max(1, min(50, int(0.005 / max(min(once), 1e-6))))
        lat = common.interleaved_medians({k: (lambda m=m: m(x)) for k, m in forms.items()}, args.rounds, calls)
    t, r, d = (lat[k].median for k in ("training", "repc", "deploy"))
    return {
        "model": name, "input": list(x.shape), "compile_s": compile_s, "rewrites": len(fused.repc_report.rewrites),
        "convs": {k: count_convs(m) for k, m in forms.items()},
        "ms": {k: lat[k].median * 1e3 for k in forms}, "iqr_rel": {k: lat[k].spread for k in forms},
        "repc_over_training": common.ratio(r, t), "repc_over_deploy": common.ratio(r, d),
        "deploy_over_training": common.ratio(d, t),
        "best_ms": {k: lat[k].best * 1e3 for k in forms},
        "best_repc_over_deploy": common.ratio(lat["repc"].best, lat["deploy"].best),
        "rounds": args.rounds, "calls_per_round": calls,
    }


def render(results: List[Dict]) -> str:
    rows = []
    for res in results:
        c = res["convs"]
        rows.append((res["model"], "x".join(map(str, res["input"])),
                     f"{c['training']}/{c['repc']}/{c['deploy']}",
                     *(f"{res['ms'][form]:.3f}" for form in ("training", "repc", "deploy")),
                     common.fmt_ratio(res["repc_over_training"]), common.fmt_ratio(res["repc_over_deploy"]),
                     common.fmt_ratio(res["best_repc_over_deploy"]),
                     f"{max(res['iqr_rel'].values()) * 100:.0f}%", f"{res['compile_s']:.2f}"))
    return common.format_table(("model", "input", "convs train/repc/deploy", "training ms", "repc ms", "deploy ms",
                                "repc/training", "repc/deploy", "best repc/deploy", "max IQR", "compile s"),
                               rows, align_right_from=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                   help="models to run (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--size", type=int, default=96, help="input height and width (default 96)")
    p.add_argument("--rounds", type=int, default=51, help="interleaved rounds; the median is reported (default 51)")
    p.add_argument("--calls", type=int, default=None, help="calls per model per round (default: about 5 ms worth)")
    p.add_argument("--quick", action="store_true",
                   help="tiny configuration for a smoke test (16x16 input, 3 rounds)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.calls = 16, 3, 1
    for flag in ("batch", "size", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.calls is not None and args.calls < 1:
        p.error("--calls must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    results = [bench_model(name, args) for name in args.models]
    print(f"latency per forward pass, median of {args.rounds} interleaved rounds; {common.machine_note(args.threads)}")
    print(render(results))
    if args.json:
        common.write_json(args.json, {"benchmark": "latency", "machine": common.machine_note(args.threads),
                                      "threads": args.threads, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
