"""The latency cost model against the clock: predicted and measured time of merge candidates.

For regions whose merge the multiply-add and the latency models may judge differently (a
depthwise branch with its residual, convs of different dilations, a depth concat of 3x3 / 1x1
/ 1x3 branches, a RepVGG block, a pointwise bottleneck) at real widths, each region's traced
graph is collapsed three ways: as the multiply-add model chooses (``macs``), with every closed
form taken however much it costs (``whole``), and as the latency model chooses (``latency``).
The table gives the latency model's prediction and the measured time (median of interleaved
rounds) of the first two, the convs each leaves, and whether the latency model's choice is
within 5% of the faster of the two on the clock.

    .venv/bin/python benchmarks/bench_cost_model.py            # calibrates once (cached), then measures
    .venv/bin/python benchmarks/bench_cost_model.py --quick    # small widths, few rounds
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402

from repc.examples import randomize_bn  # noqa: E402
from repc.latency import latency_model  # noqa: E402
from repc.passes.collapse import collapse  # noqa: E402
from repc.passes.cost import LatencyCost, MacCost  # noqa: E402
from repc.report import op_counts  # noqa: E402


def conv_bn(cin, cout, k, padding=0, dilation=1, groups=1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class DepthwiseResidual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = conv_bn(c, c, 3, 1, groups=c)

    def forward(self, x):
        return self.dw(x) + x


class Dilations(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b = conv_bn(c, c, 3, 1), conv_bn(c, c, 3, 2, dilation=2)

    def forward(self, x):
        return self.a(x) + self.b(x)


class DepthConcat(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b, self.c = conv_bn(c, c // 2, 3, 1), conv_bn(c, c // 4, 1), conv_bn(c, c // 4, (1, 3), (0, 1))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.c(x)], 1)


class RepVGG(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a, self.b, self.id = conv_bn(c, c, 3, 1), conv_bn(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.id(x)


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.down, self.up = conv_bn(c, c // 8, 1), conv_bn(c // 8, c, 1)

    def forward(self, x):
        return self.up(self.down(x))


REGIONS: Dict[str, Tuple[Callable[[int], nn.Module], int]] = {
    "depthwise 3x3 + identity": (DepthwiseResidual, 1),
    "3x3 + dilated 3x3": (Dilations, 1),
    "concat 3x3 | 1x1 | 1x3": (DepthConcat, 1),
    "RepVGG 3x3 + 1x1 + BN": (RepVGG, 1),
    "bottleneck 1x1 -> 1x1": (Bottleneck, 1),
}


class _Always:
    """A cost model under which every merged form pays: as much merged as the closed forms allow."""
    unit = "always"

    def region_cost(self, expr, matcher):
        return 1.0

    def form_cost(self, form, node, matcher):
        return 0.0

    def words(self, cost):
        return "-"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", nargs="+", type=int, default=[32, 128, 256])
    p.add_argument("--size", type=int, default=28, help="spatial size of the input maps")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.size, args.rounds = [16], 8, 3
    common.set_threads(args.threads)
    model = latency_model("cpu", torch.float32)
    cost = LatencyCost(model)
    rows, records, good = [], [], 0
    for width in args.widths:
        for name, (factory, _) in REGIONS.items():
            torch.manual_seed(0)
            block = randomize_bn(factory(width)).eval()
            x = torch.randn(1, width, args.size, args.size)
            graphs = {way: collapse(fx.symbolic_trace(block), (x,), check=False, cost_model=model_).module
                      for way, model_ in (("macs", MacCost()), ("whole", _Always()), ("latency", cost))}
            with torch.no_grad():
                want = block(x)
                for way, g in graphs.items():  # what is timed computes the block's function
                    if not torch.allclose(g(x), want, rtol=1e-4, atol=1e-4):
                        raise SystemExit(f"bench_cost_model: the {way} form of {name} (c={width}) differs from the block")
                times = common.interleaved_medians({way: (lambda g=g: g(x)) for way, g in graphs.items()},
                                                   rounds=args.rounds, calls_per_round=5)
            predicted = {way: _predicted(g, x, cost) for way, g in graphs.items()}
            measured = {way: times[way].median for way in graphs}
            ok = measured["latency"] <= 1.05 * min(measured["macs"], measured["whole"])
            good += ok
            rows.append([f"{name} (c={width})"]
                        + [f"{predicted[w] * 1e6:.0f}" for w in ("macs", "whole")]
                        + [f"{measured[w] * 1e6:.0f}" for w in ("macs", "whole", "latency")]
                        + [" / ".join(str(op_counts(graphs[w])[0]) for w in ("macs", "whole", "latency")),
                           "yes" if ok else "no"])
            records.append({"region": name, "width": width, "predicted_s": predicted, "measured_s": measured,
                            "convs": {w: op_counts(g)[0] for w, g in graphs.items()}})
    print(common.machine_note(args.threads))
    print(f"latency model: {model.source} for {model.device} {model.dtype}; input 1 x c x {args.size} x {args.size}")
    print(common.format_table(["region", "pred. macs us", "pred. whole us", "meas. macs us", "meas. whole us",
                               "meas. latency us", "convs macs / whole / latency", "latency within 5% of best"],
                              rows))
    print(f"the latency model's choice is within 5% of the faster of the two on {good} of {len(rows)}")
    if args.json:
        common.write_json(args.json, {"rows": records})


def _predicted(gm: fx.GraphModule, x: torch.Tensor, cost: LatencyCost) -> float:
    """The latency model's time for a compiled graph: each op's prediction on the recorded shapes."""
    from repc.meanings import GraphFacts
    from repc.passes.record import record_values
    from repc.patterns.regions import RegionMatcher

    facts = GraphFacts(gm, record_values(gm, (x,)))
    matcher = RegionMatcher(gm, facts)
    matcher.run()
    return sum(cost.node_cost(n, matcher) for n in gm.graph.nodes if n in matcher.meanings)


if __name__ == "__main__":
    main()
