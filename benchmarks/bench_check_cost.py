"""What verification costs inside ``repc.compile`` on a wide model, in forward passes.

``bench_compile_time.py`` measures repc's own work on deep, narrow stacks (4 channels on
8x8 maps), where running the model costs nothing.  On a real-width model the checks run
the model, and that is where the time goes: this script compiles a stack of RepVGG blocks
at a real width (default 8 blocks at width 64 on 1x3x128x128) and splits ``repc.compile``'s
time into

* capture + prepare + match (tracing, shape propagation with recording, the rewrites
  before matching, the region matcher, writing the fused graph without its checks),
* the per-region checks (``RegionChecker.check``: each merged op against the region as written),
* the whole-model check (``repc.verify.check.compare`` called by ``repc.compile``),
* the rest (the original's own run on the example, copies, the report),

and gives each as a multiple of one forward pass of the training form on the example (the
median of a few passes, measured first).  CPU seconds by default: on a shared machine wall
time also measures the neighbours.

    .venv/bin/python benchmarks/bench_check_cost.py                    # 8 blocks, width 64, 1x3x128x128
    .venv/bin/python benchmarks/bench_check_cost.py --width 128 --repeats 1
    .venv/bin/python benchmarks/bench_check_cost.py --quick            # smoke configuration
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict

import torch
import torch.nn as nn

import repc
from repc.examples import RepVGGBlock, randomize_bn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402

# (module, attribute, phase): exclusive times, so a check inside writing counts as a check
PHASES = [
    ("repc.api", "_trace_whole", "capture + prepare + match"),
    ("repc.passes.manager", "record_values", "capture + prepare + match"),
    ("repc.passes.collapse", "RegionMatcher.run", "capture + prepare + match"),
    ("repc.passes.collapse", "GraphWriter.run", "capture + prepare + match"),
    ("repc.passes.collapse", "RegionChecker.check", "per-region checks"),
    ("repc.api", "compare", "whole-model check"),
]
PHASE_ORDER = ["capture + prepare + match", "per-region checks", "whole-model check", "other"]


def build(blocks: int, width: int, seed: int = 0) -> nn.Module:
    """``blocks`` RepVGG blocks (3 -> width, then width -> width) in eval mode with random BN."""
    torch.manual_seed(seed)
    layers = [RepVGGBlock(3 if i == 0 else width, width) for i in range(blocks)]
    model = randomize_bn(nn.Sequential(*layers), seed).eval()
    with torch.no_grad():  # damped BN scales keep the activations of order one through the stack
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(0.3)
    return model


def forward_seconds(model: nn.Module, x: torch.Tensor, passes: int) -> Dict[str, float]:
    """Median wall and CPU seconds of one forward pass (after one warm-up pass)."""
    walls, cpus = [], []
    with torch.no_grad():
        model(x)
        for _ in range(passes):
            w0, c0 = time.perf_counter(), time.process_time()
            model(x)
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}


def compile_once(model: nn.Module, x: torch.Tensor) -> Dict:
    timer = common.PhaseTimer()
    with timer.instrument(PHASES):
        w0, c0 = time.perf_counter(), time.process_time()
        fused = repc.compile(model, (x,), graph=True)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    split = {}
    for clock, total, per_phase in (("wall", wall, timer.wall), ("cpu", cpu, timer.cpu)):
        phases = {p: per_phase.get(p, 0.0) for p in PHASE_ORDER[:-1]}
        phases["other"] = max(0.0, total - sum(phases.values()))
        split[clock] = phases
    report = fused.repc_report
    v = report.verification
    return {"wall_s": wall, "cpu_s": cpu, "phases": split, "missing": timer.missing,
            "region_checks": timer.calls.get("per-region checks", 0), "rewrites": len(report.rewrites),
            "verified": bool(v and v.ok), "inputs_checked": list(v.inputs_checked) if v else [],
            "max_deviation": v.max_deviation if v else None, "fused": fused}


def measure(blocks: int, width: int, size: int, batch: int, repeats: int, passes: int) -> Dict:
    model = build(blocks, width)
    x = torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(1))
    repc.compile(build(1, 4), torch.randn(1, 3, 8, 8), graph=True)  # warm-up: first-call costs (imports, caches) not counted
    one = forward_seconds(model, x, passes)
    runs = [compile_once(model, x) for _ in range(repeats)]
    median = sorted(runs, key=lambda r: r["cpu_s"])[(len(runs) - 1) // 2]
    fused_one = forward_seconds(median.pop("fused"), x, passes)
    for r in runs:
        r.pop("fused", None)
    return {"blocks": blocks, "width": width, "input": [batch, 3, size, size], "runs": len(runs),
            "forward_s": one, "fused_forward_s": fused_one, **median,
            "cpu_s_all": [r["cpu_s"] for r in runs], "wall_s_all": [r["wall_s"] for r in runs]}


def table(result: Dict, clock: str) -> str:
    one = result["forward_s"][clock]
    rows = []
    for phase in PHASE_ORDER:
        s = result["phases"][clock][phase]
        rows.append((phase, f"{s:.3f}", f"{s / one:.1f}"))
    total = result[f"{clock}_s"]
    rows.append((f"total ({clock})", f"{total:.3f}", f"{total / one:.1f}"))
    return common.format_table(("phase", f"{clock} s", "forward passes"), rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="input height and width (default 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="compiles; the median by CPU time is reported")
    p.add_argument("--passes", type=int, default=5, help="forward passes timed for the unit (median)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny configuration for a smoke test")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.blocks, args.width, args.size, args.repeats, args.passes = 2, 8, 16, 1, 1
    common.set_threads(args.threads)
    result = measure(args.blocks, args.width, args.size, args.batch, args.repeats, args.passes)
    one, fused = result["forward_s"][args.clock], result["fused_forward_s"][args.clock]
    print(f"{args.blocks} RepVGG blocks, width {args.width}, input {'x'.join(map(str, result['input']))}: "
          f"one forward pass {one * 1e3:.1f} ms ({args.clock}) in the training form, {fused * 1e3:.1f} ms fused")
    print(table(result, args.clock))
    print(f"{result['rewrites']} rewrites, {result['region_checks']} region checks; whole-model check on "
          f"{', '.join(result['inputs_checked'])}: {'passed' if result['verified'] else 'FAILED'} "
          f"(max deviation {result['max_deviation']:.1e}); {result['runs']} compile(s), "
          f"CPU s {', '.join(f'{s:.2f}' for s in result['cpu_s_all'])}")
    if result["missing"]:
        print("phases not found (time counted in 'other'): " + ", ".join(result["missing"]))
    print(common.machine_note(args.threads))
    if args.json:
        common.write_json(args.json, {"machine": common.machine_note(args.threads), "result": result})
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
