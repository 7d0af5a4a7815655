"""``torch.compile(backend="repc")`` against Inductor alone, eager, and Inductor on a hand-written deploy form.

The network is a training-form stack of 4 RepVGG blocks and 6 MobileOne blocks (3 units of a
depthwise and a pointwise block, 3 over-parameterized branches each), with randomized
BatchNorm statistics, in eval mode under ``torch.no_grad()``.  Variants:

* ``eager``            -- the training form, run as is;
* ``inductor``         -- ``torch.compile(model)``: Inductor on the training form;
* ``repc``             -- ``torch.compile(model, backend="repc")``: repc fuses, Inductor compiles;
* ``deploy+inductor``  -- ``torch.compile(deploy(model))``: Inductor on the deploy form written by
  hand here (one conv per block, as the papers' ``reparameterize()`` methods produce it);
* ``repc.compile+inductor`` -- ``torch.compile(repc.compile(model, x))``: repc first, then dynamo
  and Inductor on the fused module;
* ``repc, guard_filter`` -- ``backend="repc"`` with ``options={"guard_filter_fn":
  repc.backend.guard_filter}``: dynamo's per-call guards trimmed to what a frozen model needs;
* ``deploy+inductor, no nn guards`` -- the deploy form with
  ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``, the like-for-like comparison for it.

Latency is the median over rounds (the fastest round is shown too); each round times every
variant once, in a shuffled order, so that load from other processes hits all of them alike.
The speed-up columns are medians of the per-round ratios, which drift in the machine's speed
does not skew.  The same rounds also time dynamo's own per-call cost on the training form and
on the deploy form, with a backend that returns a precomputed output: guards on the module tree
and gathering the lifted parameters, which any backend given the training form pays.

Compile time is the first call (dynamo + backend + Inductor's code generation), measured for
each variant in a process of its own with a fresh Inductor cache directory (unless
``--warm-cache``), after Inductor has been warmed up on an unrelated function: variants do not
reuse each other's kernels, and none pays Inductor's one-time start-up alone.  Usage::

    python benchmarks/bench_backend.py [--rounds 30] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import random
import time
from typing import Callable, Dict, List


VARIANTS = ("eager", "inductor", "repc", "deploy+inductor", "repc.compile+inductor", "repc, guard_filter",
            "deploy+inductor, no nn guards")
DYNAMO_ONLY = ("training form", "deploy form")  # dynamo with a backend that does no work


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (default 30)")
    parser.add_argument("--calls", type=int, default=3, help="calls per variant per round (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--size", type=int, default=128, help="input height and width (default 128)")
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (default 32)")
    parser.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk caches")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--compile-only", choices=VARIANTS, help=argparse.SUPPRESS)  # one compile, in a child process
    args = parser.parse_args(argv)
    for name in ("rounds", "calls", "threads", "batch", "size", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and not ARGS.warm_cache:  # before torch is imported: compile times without a warm cache
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="repc_bench_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import repc  # noqa: E402
import repc.backend  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402
from repc.examples import MobileOneBlock, MobileOneUnit, RepVGGBlock, randomize_bn  # noqa: E402


# ----------------------------------------------------------------------------- the network

def training_stack(width: int = 32, seed: int = 0) -> nn.Module:
    """4 RepVGG blocks, then 3 MobileOne units (6 MobileOne blocks), eval mode, random BN."""
    torch.manual_seed(seed)
    w = width
    model = nn.Sequential(
        RepVGGBlock(3, w, stride=2), RepVGGBlock(w, w), RepVGGBlock(w, 2 * w, stride=2), RepVGGBlock(2 * w, 2 * w),
        MobileOneUnit(2 * w, 2 * w), MobileOneUnit(2 * w, 4 * w, stride=2), MobileOneUnit(4 * w, 4 * w))
    return randomize_bn(model, seed).eval()


# ----------------------------------------------------------------------------- the deploy form by hand

def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, kernel: int):
    """Kernel and bias of conv-then-BN, the kernel zero-padded to ``kernel`` x ``kernel``."""
    std = (bn.running_var + bn.eps).sqrt()
    weight = conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
    pad = (kernel - conv.kernel_size[0]) // 2
    return F.pad(weight, [pad] * 4), bn.bias - bn.running_mean * bn.weight / std


def _identity(bn: nn.BatchNorm2d, groups: int, kernel: int):
    """Kernel and bias of BN alone (the skip branch): a centred 1 in each channel's own group slot."""
    channels = bn.num_features
    per_group = channels // groups
    eye = torch.zeros(channels, per_group, kernel, kernel)
    for c in range(channels):
        eye[c, c % per_group, kernel // 2, kernel // 2] = 1.0
    std = (bn.running_var + bn.eps).sqrt()
    return eye * (bn.weight / std).reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * bn.weight / std


def _conv(template: nn.Conv2d, kernel: int, weight, bias) -> nn.Conv2d:
    conv = nn.Conv2d(template.in_channels, template.out_channels, kernel, template.stride, kernel // 2,
                     groups=template.groups, bias=True)
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    return conv


@torch.no_grad()
def deploy_repvgg(block: RepVGGBlock) -> nn.Module:
    conv = block.dense[0]
    parts = [_fold(conv, block.dense[1], 3), _fold(block.pointwise[0], block.pointwise[1], 3)]
    if block.identity is not None:
        parts.append(_identity(block.identity, conv.groups, 3))
    return nn.Sequential(_conv(conv, 3, sum(p[0] for p in parts), sum(p[1] for p in parts)), nn.ReLU())


@torch.no_grad()
def deploy_mobileone(block: MobileOneBlock) -> nn.Module:
    conv = block.branches[0][0]
    k = conv.kernel_size[0]
    parts = [_fold(b[0], b[1], k) for b in block.branches]
    if block.scale is not None:
        parts.append(_fold(block.scale[0], block.scale[1], k))
    if block.skip is not None:
        parts.append(_identity(block.skip, conv.groups, k))
    return nn.Sequential(_conv(conv, k, sum(p[0] for p in parts), sum(p[1] for p in parts)), nn.ReLU())


def deploy(model: nn.Sequential) -> nn.Module:
    """The inference form of :func:`training_stack`, converted block by block as the papers do."""
    layers = []
    for block in model:
        if isinstance(block, RepVGGBlock):
            layers.append(deploy_repvgg(block))
        elif isinstance(block, MobileOneUnit):
            layers += [deploy_mobileone(block.depthwise), deploy_mobileone(block.pointwise)]
        else:
            raise TypeError(f"no deploy form written for {type(block).__name__}")
    return nn.Sequential(*layers).eval()


# ----------------------------------------------------------------------------- measuring

class FuseClock:
    """Time spent inside repc (freezing, collapse, verification) during a compile."""

    def __init__(self):
        self.seconds = 0.0
        self._original = repc.backend.fuse_graph

    def __enter__(self):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        repc.backend.fuse_graph = timed
        return self

    def __exit__(self, *exc):
        repc.backend.fuse_graph = self._original


def deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def count_convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def build(name: str, model: nn.Module, deployed: nn.Module, x: torch.Tensor) -> Callable:
    if name == "eager":
        return model
    if name == "inductor":
        return torch.compile(copy.deepcopy(model))
    if name == "repc":
        return torch.compile(copy.deepcopy(model), backend="repc")
    if name == "repc.compile+inductor":
        return torch.compile(repc.compile(model, (x,), graph=True))
    # The two guard-filtered variants name an option that is the default anyway ("verify",
    # "freezing"): torch.compile removes guard_filter_fn from the options, and dynamo would
    # otherwise reuse the unfiltered variant's compiled entry, whose backend compares equal.
    if name == "repc, guard_filter":
        return torch.compile(copy.deepcopy(model), backend="repc",
                             options={"guard_filter_fn": repc.backend.guard_filter, "verify": True})
    if name == "deploy+inductor, no nn guards":
        return torch.compile(copy.deepcopy(deployed), options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "freezing": False})
    return torch.compile(copy.deepcopy(deployed))


def dynamo_only(module: nn.Module) -> Callable:
    """``module`` under dynamo with a backend that returns a precomputed output: dynamo's own cost."""
    def backend(gm, example_inputs):
        output = gm(*example_inputs)
        return lambda *args: output
    return torch.compile(copy.deepcopy(module), backend=backend)


def compile_once(args) -> Dict:
    """In a child process: the first call of one variant, after warming Inductor up elsewhere."""
    torch.set_num_threads(args.threads)
    model = training_stack(args.width)
    deployed = deploy(model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        torch.compile(lambda t: torch.sin(t) * 2 + 1)(torch.randn(8))  # Inductor's one-time start-up
        with FuseClock() as clock:
            start = time.perf_counter()
            build(args.compile_only, model, deployed, x)(x)  # repc.compile+inductor: repc's time counts
            seconds = time.perf_counter() - start
    return {"variant": args.compile_only, "compile_s": seconds, "repc_s": clock.seconds}


def compile_times(args) -> Dict[str, Dict]:
    """Each compiled variant's first call, each in a fresh process."""
    times = {}
    for name in VARIANTS[1:]:
        command = [sys.executable, os.path.abspath(__file__), "--compile-only", name,
                   "--threads", str(args.threads), "--batch", str(args.batch), "--size", str(args.size),
                   "--width", str(args.width)] + (["--warm-cache"] if args.warm_cache else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"compiling {name} failed: {done.stderr.strip().splitlines()[-1:]}")
        times[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return times


def measure(args) -> Dict:
    compiled = compile_times(args)
    torch.set_num_threads(args.threads)
    model = training_stack(args.width)
    deployed = deploy(model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        reference = model(x)
        hand_error = deviation(deployed(x), reference)
        if hand_error > 1e-4:
            raise SystemExit(f"the hand-written deploy form is wrong: deviation {hand_error:.3g}")
        variants = {name: build(name, model, deployed, x) for name in VARIANTS}
        outputs = {name: fn(x) for name, fn in variants.items()}
        timed = dict(variants)
        timed.update({DYNAMO_ONLY[0]: dynamo_only(model), DYNAMO_ONLY[1]: dynamo_only(deployed)})
        for fn in timed.values():  # warm up
            for _ in range(3):
                fn(x)
        samples: Dict[str, List[float]] = {name: [] for name in timed}
        names = list(timed)
        shuffle = random.Random(0).shuffle
        for _ in range(args.rounds):
            shuffle(names)
            for name in names:
                fn = timed[name]
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn(x)
                samples[name].append((time.perf_counter() - start) / args.calls)
    median = {name: statistics.median(s) for name, s in samples.items()}

    def speedup(base: str, name: str) -> float:  # the median of the per-round ratios
        return statistics.median(b / t for b, t in zip(samples[base], samples[name]))

    rows = []
    for name in variants:
        rows.append({
            "variant": name,
            "median_ms": median[name] * 1e3,
            "min_ms": min(samples[name]) * 1e3,
            "vs_eager": speedup("eager", name),
            "vs_inductor": speedup("inductor", name),
            "vs_deploy_inductor": speedup("deploy+inductor", name),
            "compile_s": compiled[name]["compile_s"] if name in compiled else None,
            "deviation": deviation(outputs[name], reference),
        })
    return {
        "network": "4x RepVGG + 6x MobileOne (3 units), training form, eval mode, random BN",
        "input": list(x.shape),
        "convs_training_form": count_convs(model),
        "convs_deploy_form": count_convs(deployed),
        "repc_fuse_s": compiled["repc"]["repc_s"],
        "dynamo_call_us": {name: median[name] * 1e6 for name in DYNAMO_ONLY},
        "rows": rows,
        "settings": {"rounds": args.rounds, "calls": args.calls, "threads": args.threads,
                     "warm_cache": args.warm_cache},
        "machine": common.machine_note(args.threads),
    }


def render(result: Dict) -> str:
    head = f"{'variant':<31}{'median ms':>11}{'min ms':>9}{'vs eager':>10}{'vs inductor':>13}{'vs deploy':>11}" \
           f"{'compile s':>11}{'deviation':>11}"
    lines = [f"{result['network']}; input {tuple(result['input'])}", head, "-" * len(head)]
    for row in result["rows"]:
        compile_s = "-" if row["compile_s"] is None else f"{row['compile_s']:.2f}"
        lines.append(f"{row['variant']:<31}{row['median_ms']:>11.3f}{row['min_ms']:>9.3f}{row['vs_eager']:>9.2f}x"
                     f"{row['vs_inductor']:>12.2f}x{row['vs_deploy_inductor']:>10.2f}x{compile_s:>11}"
                     f"{row['deviation']:>11.1e}")
    lines.append(f"convs: {result['convs_training_form']} in the training form, {result['convs_deploy_form']} "
                 f"in the deploy form; time inside repc during its compile: {result['repc_fuse_s']:.2f} s")
    dynamo = result["dynamo_call_us"]
    lines.append(f"dynamo's own cost per call (backend doing no work): {dynamo[DYNAMO_ONLY[0]]:.0f} us on the "
                 f"training form, {dynamo[DYNAMO_ONLY[1]]:.0f} us on the deploy form")
    lines.append("ratios are speed-ups (median over rounds of the column's variant's time / this row's); min ms is "
                 "the fastest round, the least disturbed by other processes; "
                 "deviation is max |out - eager| / max |eager|")
    lines.append(result["machine"])
    return "\n".join(lines)


def write_json(path: str, data: Dict) -> None:
    """Write ``data`` to ``path`` atomically: a partial file is never left behind."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench_backend_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(args) -> int:
    if args.compile_only:
        print(json.dumps(compile_once(args)))
        return 0
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        print(f"error: the directory of --json {args.json} does not exist", file=sys.stderr)
        return 2
    result = measure(args)
    print(render(result))
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
