"""The linear family on a small ViT-style stack: latency and FLOPs, training form vs repc.

Each block of the stack carries the training-time extras of issue 3, written from the papers:

* pre-norm attention whose q/k/v and output projections have LoRA branches
  (``W x + (alpha / r) B A dropout(x)``, B non-zero as after fine-tuning);
* a ZeroI2V linear adapter ``x + up(down(x))`` (no nonlinearity) before the FFN;
* a RePaViT FFN: BatchNorm on the tokens as the norm, hidden width 4d of which only a quarter
  goes through the GELU (the rest is "idle"), and the residual.

After ``repc.compile`` the LoRA branches are inside the projections, the adapter and the BN are
inside the FFN's first linear, and the idle channels, the BN and the residual become one d x d
linear parallel to a narrow nonlinear FFN (about 3d^2 instead of 8d^2 MACs per token).
The script prints the per-rewrite MACs, whole-model FLOPs (torch's FlopCounterMode) and the
median latency of interleaved rounds (see ``common.interleaved_medians``).

    .venv/bin/python benchmarks/bench_vit.py             # d=192, 197 tokens, 4 blocks
    .venv/bin/python benchmarks/bench_vit.py --quick     # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import repc
from repc.examples import randomize_bn


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402
AGREEMENT = 1e-4  # relative deviation allowed between training form and repc before timing


class LoRALinear(nn.Module):
    def __init__(self, d_in, d_out, rank=8, alpha=16.0):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        nn.init.normal_(self.B.weight, std=0.02)
        self.scale = alpha / rank
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.base(x) + self.scale * self.B(self.A(self.drop(x)))


class Block(nn.Module):
    def __init__(self, d, heads, idle=0.75):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.proj = (LoRALinear(d, d) for _ in range(4))
        self.adapter_down, self.adapter_up = nn.Linear(d, d // 8), nn.Linear(d // 8, d)
        self.norm2 = nn.BatchNorm1d(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.active = int(4 * d * (1 - idle))

    def attention(self, x):
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (t(h).reshape(b, n, self.heads, d // self.heads).transpose(1, 2) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)

    def forward(self, x):
        x = x + self.attention(x)
        x = x + self.adapter_up(self.adapter_down(x))
        h = self.fc1(self.norm2(x.transpose(1, 2)).transpose(1, 2))
        h = torch.cat([F.gelu(h[..., :self.active]), h[..., self.active:]], -1)
        return x + self.fc2(h)


def vit_stack(d, heads, depth, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return randomize_bn(model, seed).eval()


def flops(model, x) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.heads, args.tokens, args.depth, args.rounds = 32, 2, 9, 2, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    model = vit_stack(args.dim, args.heads, args.depth)
    x = torch.randn(1, args.tokens, args.dim)
    fused = repc.compile(model, (x,), graph=True)
    report = fused.repc_report
    with torch.no_grad():
        dev = (fused(x) - model(x)).abs().max().item() / model(x).abs().max().item()
    if not report.verification.ok or dev > AGREEMENT:
        print(f"repc result differs from the training form (relative deviation {dev:.2e})", file=sys.stderr)
        return 1
    rows = [(r.root, r.rule, f"{r.flops_before:,}", f"{r.flops_after:,}",
             common.fmt_ratio(common.ratio(r.flops_after, r.flops_before))) for r in report.rewrites]
    print(f"rewrites ({len(report.rewrites)}), multiply-adds on 1 x {args.tokens} tokens x d={args.dim}:")
    print(common.format_table(["region", "rules", "MACs before", "MACs after", "after/before"], rows, 2))
    flops_before, flops_after = flops(model, x), flops(fused, x)
    linears = lambda m: sum(isinstance(t, nn.Linear) for t in m.modules())
    with torch.no_grad():
        times = common.interleaved_medians({"training": lambda: model(x), "repc": lambda: fused(x)},
                                           rounds=args.rounds, calls_per_round=3)
    print(f"\nwhole model; {common.machine_note(args.threads)}")
    print(common.format_table(
        ["form", "nn.Linear", "FLOPs", "median ms", "best ms"],
        [("training", linears(model), f"{flops_before:,}", f"{times['training'].median * 1e3:.3f}",
          f"{times['training'].best * 1e3:.3f}"),
         ("repc", linears(fused), f"{flops_after:,}", f"{times['repc'].median * 1e3:.3f}",
          f"{times['repc'].best * 1e3:.3f}")]))
    print(f"repc/training: FLOPs {common.fmt_ratio(common.ratio(flops_after, flops_before))}, "
          f"median latency {common.fmt_ratio(common.ratio(times['repc'].median, times['training'].median))}")
    if args.json:
        common.write_json(args.json, {
            "benchmark": "vit", "machine": common.machine_note(args.threads), "config": vars(args),
            "flops": {"training": flops_before, "repc": flops_after},
            "ms": {k: v.median * 1e3 for k, v in times.items()},
            "rewrites": [{"root": r.root, "rule": r.rule, "macs_before": r.flops_before, "macs_after": r.flops_after}
                         for r in report.rewrites]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
