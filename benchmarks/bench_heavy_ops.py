"""How many heavy ops (convs, linears) random branchy conv networks keep, per cost model.

Networks are drawn by the architecture fuzzer's conv-family generator (``tests/fuzz_networks.py``:
branches of convs of every kernel shape, stride, dilation, group count and padding style, BNs,
pools, scales, identities, sums, concats and channel splits, optional linear tails), with wider
channels than the fuzzer uses (``--channels``).  Each is traced and collapsed (with the per-region
checks) once per cost model -- multiply-adds (the default), and the latency model
(``repc/latency.py``, calibrated once and cached) -- and the table gives the mean and median
fraction of heavy ops kept, and how often each model kept fewer.  (An average pool merged
with the BN after it becomes one depthwise conv: a network of pools can end with more heavy
ops than it had, in fewer ops overall.)

    .venv/bin/python benchmarks/bench_heavy_ops.py                # 200 networks
    .venv/bin/python benchmarks/bench_heavy_ops.py --quick        # 10 networks
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_common.py
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the fuzzer's generator (test tooling)
import bench_common as common  # noqa: E402
import fuzz_networks  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from repc.capture import trace  # noqa: E402
from repc.latency import latency_model  # noqa: E402
from repc.passes.collapse import collapse  # noqa: E402
from repc.passes.cost import LatencyCost, MacCost  # noqa: E402
from repc.report import op_counts  # noqa: E402


def draw_networks(count: int, channels: int, seed: int):
    """``count`` network specs from the fuzzer's strategy, reproducibly (derandomized)."""
    specs = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_networks.networks(max_channels=channels))
    def collect(spec):
        specs.append(spec)

    collect()
    return specs[:count]


def heavy_fraction(spec, cost_model):
    """Heavy ops after / before for one network under ``cost_model``; None if it did not compile."""
    model = fuzz_networks.build_network(spec)
    x = torch.randn((spec.batch, spec.in_channels) + tuple(spec.size), generator=torch.Generator().manual_seed(1))
    try:
        gm = trace(model)
        before = op_counts(gm)[0]
        if before == 0:
            return None
        result = collapse(gm, (x,), cost_model=cost_model)
    except Exception:
        return None
    return op_counts(result.module)[0] / before


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--networks", type=int, default=200)
    p.add_argument("--channels", type=int, default=32, help="the generator's largest channel count")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.networks, args.channels = 10, 8
    common.set_threads(args.threads)
    warnings.filterwarnings("ignore")
    models = {"multiply-adds": MacCost(), "latency": LatencyCost(latency_model("cpu", torch.float32))}
    fractions = {name: [] for name in models}
    fewer = {name: 0 for name in models}
    for spec in draw_networks(args.networks, args.channels, 0):
        got = {name: heavy_fraction(spec, model) for name, model in models.items()}
        if any(v is None for v in got.values()):
            continue
        for name, v in got.items():
            fractions[name].append(v)
        a, b = got["multiply-adds"], got["latency"]
        fewer["multiply-adds"] += a < b
        fewer["latency"] += b < a
    n = len(fractions["multiply-adds"])
    rows = [[name, n, f"{statistics.mean(v):.3f}" if v else "-", f"{statistics.median(v):.3f}" if v else "-",
             fewer[name]] for name, v in fractions.items()]
    print(common.machine_note(args.threads))
    print(common.format_table(["cost model", "networks", "mean heavy ops kept", "median", "networks with fewer"], rows))
    if args.json:
        common.write_json(args.json, {"networks": n, "fractions": fractions, "fewer": fewer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
