"""Compile + verify time of ``repc.compile`` as the graph grows (1k -> 20k fx nodes).

Deep stacks of training-form blocks from :mod:`repc.examples` with few channels (4) and a
tiny input (1x4x8x8), so that running the model costs little and the time measured is
repc's own: capture, shape propagation, matching, writing the fused graph with its
per-region checks, and the whole-model verification.  Families: ``repvgg``, ``mobileone``
(depthwise + pointwise units), ``dbb`` and ``mixed`` (the three blocks in turn).

The growth table gives, per size: fx nodes of the traced model, rewrites applied, nodes
after, wall and CPU seconds of ``repc.compile`` (median of ``--repeats`` runs; one run above
5,000 nodes), CPU microseconds per node, and the growth exponent ``k`` of ``t ~ n^k``
against the previous size (1 = linear, 2 = quadratic).  The phase table splits the median
run by phase (exclusive times: a nested phase is not counted in its parent), with each
phase's exponent from the smallest to the largest size, so a superlinear phase stands out.
CPU time is the default clock there: on a shared machine wall time also measures the
neighbours.

    .venv/bin/python benchmarks/bench_compile_time.py                     # mixed stack, 1k..20k nodes
    .venv/bin/python benchmarks/bench_compile_time.py --families repvgg mobileone dbb --sizes 3000
    .venv/bin/python benchmarks/bench_compile_time.py --sizes 3000 --profile 3000   # cProfile hot spots
    .venv/bin/python benchmarks/bench_compile_time.py --threads 2         # torch's default on 2 cores
    .venv/bin/python benchmarks/bench_compile_time.py --quick             # smoke configuration
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.fx as fx
import torch.nn as nn

import repc
from repc.examples import DiverseBranchBlock, MobileOneUnit, RepVGGBlock, randomize_bn


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402

CHANNELS = 4
INPUT_SHAPE = (1, CHANNELS, 8, 8)
TARGET_SECONDS, TARGET_NODES = 2.0, 3000  # the target: compile + verify under 2 s at 3k nodes
SINGLE_RUN_ABOVE = 5000  # nodes; larger graphs are compiled once
# BatchNorm scales multiplied by this after randomize_bn: with its own range (gamma/std up to
# ~2.8) activations grow block after block and overflow to inf after 130-300 blocks, and the
# checks would then compare infinities; damped, they stay of order 1 through 20k nodes
BN_DAMPING = 0.3

BLOCKS: Dict[str, List[Callable[[], nn.Module]]] = {
    "repvgg": [lambda: RepVGGBlock(CHANNELS, CHANNELS)],
    "mobileone": [lambda: MobileOneUnit(CHANNELS, CHANNELS)],
    "dbb": [lambda: DiverseBranchBlock(CHANNELS, CHANNELS)],
    "mixed": [lambda: RepVGGBlock(CHANNELS, CHANNELS), lambda: MobileOneUnit(CHANNELS, CHANNELS),
              lambda: DiverseBranchBlock(CHANNELS, CHANNELS)],
}

# (module, attribute as that module sees it, phase); exclusive times, so the order is free
PHASES = [
    ("repc.api", "copy.deepcopy", "copy model"),
    ("repc.api", "_trace_whole", "trace"),
    ("repc.passes.prepare", "functionalize_inplace", "functionalize"),
    ("repc.passes.manager", "record_values", "shape prop + record"),
    ("repc.passes.prepare", "split_norm_affine", "split norms"),
    ("repc.passes.collapse", "RegionMatcher.run", "matching"),
    ("repc.passes.collapse", "GraphWriter.run", "writing"),
    ("repc.passes.collapse", "RegionChecker.check", "per-region checks"),
    ("repc.passes.collapse", "DenseProbe.candidate", "synthesis"),
    ("repc.api", "compare", "whole-model verify"),
]
PHASE_ORDER = [p for _, _, p in PHASES] + ["other", "gc (wall, inside the above)"]


def nodes_per_cycle(family: str) -> int:
    """fx nodes one cycle of the family's blocks adds (a traced graph also has input and output)."""
    one = fx.symbolic_trace(nn.Sequential(*(make() for make in BLOCKS[family])))
    return len(one.graph.nodes) - 2


def build_stack(family: str, target_nodes: int, seed: int = 0) -> nn.Module:
    """A Sequential of the family's blocks with about ``target_nodes`` traced nodes, in eval mode."""
    cycles = max(1, round((target_nodes - 2) / nodes_per_cycle(family)))
    torch.manual_seed(seed)
    blocks = [make() for _ in range(cycles) for make in BLOCKS[family]]
    model = randomize_bn(nn.Sequential(*blocks), seed).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(BN_DAMPING)
    return model


class GcClock:
    """Wall seconds spent in the cyclic garbage collector while active."""

    def __init__(self):
        self.seconds, self._start = 0.0, 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start

    def __enter__(self):
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self)


GC_ROW = "gc (wall, inside the above)"


def compile_once(model: nn.Module, x: torch.Tensor) -> Dict:
    """One timed ``repc.compile`` with its phase split (wall and CPU seconds, exclusive)."""
    timer = common.PhaseTimer()
    gc.collect()
    with timer.instrument(PHASES), GcClock() as gc_clock:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        fused = repc.compile(model, (x,), graph=True)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    split = {}
    for clock, total, per_phase in (("wall", wall, timer.wall), ("cpu", cpu, timer.cpu)):
        phases = {p: per_phase.get(p, 0.0) for _, _, p in PHASES}
        phases["other"] = max(0.0, total - sum(per_phase.values()))
        phases[GC_ROW] = gc_clock.seconds
        split[clock] = phases
    report = fused.repc_report
    verification = report.verification
    return {"wall_s": wall, "cpu_s": cpu, "phases_wall_s": split["wall"], "phases_cpu_s": split["cpu"],
            "missing_phases": timer.missing, "rewrites": len(report.rewrites), "nodes_after": report.nodes_after,
            "verified": bool(verification and verification.ok), "rolled_back": report.rolled_back}


def measure(family: str, target: int, repeats: int) -> Dict:
    """The family's stack at about ``target`` nodes compiled ``repeats`` times; the median run."""
    model = build_stack(family, target)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    nodes = len(fx.symbolic_trace(model).graph.nodes)
    with torch.no_grad():
        if not torch.isfinite(model(x)).all():
            raise SystemExit(f"{family} stack of {nodes} nodes overflows on the example input; lower BN_DAMPING")
    runs = [compile_once(model, x) for _ in range(repeats if nodes <= SINGLE_RUN_ABOVE else 1)]
    by_wall = sorted(runs, key=lambda r: r["wall_s"])
    median = by_wall[(len(runs) - 1) // 2]
    return {"family": family, "target_nodes": target, "nodes": nodes, "blocks": len(model), "runs": len(runs),
            **median, "wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "wall_s_all": [r["wall_s"] for r in runs], "cpu_s_all": [r["cpu_s"] for r in runs]}


def _exponent(a: Dict, b: Dict, key: str) -> str:
    k = common.growth_exponent(a["nodes"], a[key], b["nodes"], b[key])
    return "" if k != k else f"{k:.2f}"


def growth_table(results: List[Dict]) -> str:
    rows, prev = [], None
    for r in results:
        same = prev is not None and prev["family"] == r["family"]
        rows.append((r["family"], r["nodes"], r["blocks"], r["rewrites"], r["nodes_after"],
                     f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['cpu_s'] / r['nodes'] * 1e6:.0f}",
                     _exponent(prev, r, "wall_s") if same else "", _exponent(prev, r, "cpu_s") if same else "",
                     r["runs"], "yes" if r["verified"] else "NO"))
        prev = r
    return common.format_table(("family", "nodes", "blocks", "rewrites", "nodes after", "wall s", "cpu s",
                                "cpu us/node", "k wall", "k cpu", "runs", "verified"), rows)


def phase_table(results: List[Dict], clock: str) -> str:
    """Seconds per phase (``clock`` is "wall" or "cpu") of one family's sizes, with the growth exponent."""
    key = f"phases_{clock}_s"
    several = len(results) > 1
    headers = ["phase"] + [str(r["nodes"]) for r in results] + (["k first->last"] if several else [])
    rows = []
    for phase in PHASE_ORDER:
        values = [r[key].get(phase, 0.0) for r in results]
        k = common.growth_exponent(results[0]["nodes"], values[0], results[-1]["nodes"], values[-1])
        rows.append([phase] + [f"{v:.3f}" for v in values] + ([("" if k != k else f"{k:.2f}")] if several else []))
    rows.append([f"total ({clock})"] + [f"{r[clock + '_s']:.3f}" for r in results]
                + ([_exponent(results[0], results[-1], clock + "_s")] if several else []))
    return common.format_table(headers, rows)


def profile(family: str, target: int, top: int = 25) -> str:
    """cProfile (CPU clock) of one compile: hot spots by own time, and repc's functions by cumulative time."""
    model = build_stack(family, target)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    profiler = cProfile.Profile(time.process_time)  # CPU time: other processes' load does not show up
    profiler.enable()
    repc.compile(model, (x,), graph=True)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(r"repc[/\\]", top)
    return out.getvalue()


DEFAULT_SIZES = [1000, 2000, 3000, 5000, 10000, 20000]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["mixed"], choices=list(BLOCKS),
                   help="block families (default: mixed)")
    p.add_argument("--sizes", nargs="+", type=int, default=DEFAULT_SIZES, help="target fx node counts")
    p.add_argument("--repeats", type=int, default=3,
                   help=f"compiles per size up to {SINGLE_RUN_ABOVE} nodes, the median is reported (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the work is Python and tiny tensors, see README)")
    p.add_argument("--phase-clock", choices=("cpu", "wall"), default="cpu",
                   help="clock of the phase table (default cpu: what repc itself spent, whatever the machine's load)")
    p.add_argument("--budget", type=float, default=300.0,
                   help="skip sizes whose compile, extrapolated from the last two, would exceed this many seconds")
    p.add_argument("--profile", type=int, metavar="NODES",
                   help="also print a cProfile of one compile at about NODES nodes")
    p.add_argument("--quick", action="store_true",
                   help="tiny configuration for a smoke test (100 and 200 nodes, once)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [100, 200], 1
    if any(s < 10 for s in args.sizes):
        p.error("--sizes must be at least 10 nodes each")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    args.sizes = sorted(set(args.sizes))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    repc.compile(build_stack("mixed", 60), torch.randn(INPUT_SHAPE), graph=True)  # warm-up: lazy imports and inits
    results, skipped = [], []
    for family in args.families:
        done: List[Dict] = []
        for target in args.sizes:
            if len(done) >= 2:
                a, b = done[-2], done[-1]
                k = max(1.0, common.growth_exponent(a["nodes"], a["wall_s"], b["nodes"], b["wall_s"]))
                predicted = b["wall_s"] * (target / b["nodes"]) ** k
                if predicted > args.budget:
                    skipped.append(f"{family} {target} nodes: predicted {predicted:.0f} s > budget {args.budget:g} s")
                    continue
            done.append(measure(family, target, args.repeats))
        results.extend(done)
    print(f"repc.compile (compile + verify) time vs graph size; median of {args.repeats} run(s) up to "
          f"{SINGLE_RUN_ABOVE} nodes, one above; k = growth exponent vs the previous size (1 linear, 2 quadratic); "
          f"{common.machine_note(args.threads)}")
    print(growth_table(results))
    for line in skipped:
        print(f"skipped {line}")
    for r in results:
        if abs(r["nodes"] - TARGET_NODES) <= 0.05 * TARGET_NODES:
            verdict = "meets" if r["wall_s"] < TARGET_SECONDS else "misses"
            print(f"target (compile + verify < {TARGET_SECONDS:g} s at {TARGET_NODES} nodes): {r['family']} "
                  f"{r['nodes']} nodes took {r['wall_s']:.2f} s wall ({r['cpu_s']:.2f} s CPU): {verdict} it")
    for family in args.families:
        fam = [r for r in results if r["family"] == family]
        if fam:
            growth = f"; k from {fam[0]['nodes']} to {fam[-1]['nodes']} nodes" if len(fam) > 1 else ""
            print(f"\nphases, {family} stack: {args.phase_clock} seconds, exclusive (a nested phase is not counted "
                  f"in its parent){growth}")
            print(phase_table(fam, args.phase_clock))
    missing = sorted({m for r in results for m in r["missing_phases"]})
    if missing:
        print(f"phase hooks not found (the core changed; their time is in 'other'): {', '.join(missing)}")
    profile_text = None
    if args.profile:
        profile_text = profile(args.families[0], args.profile)
        print(f"\ncProfile (CPU clock) of one compile, {args.families[0]} stack, about {args.profile} nodes")
        print(profile_text)
    if args.json:
        common.write_json(args.json, {"benchmark": "compile_time", "machine": common.machine_note(args.threads),
                                      "threads": args.threads, "results": results, "skipped": skipped,
                                      "profile": profile_text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
