"""``repc.compile`` on real-size models against ``torch.export`` of the same model, split by phase.

``bench_compile_time.py`` grows narrow stacks (4 channels on 8x8 maps), where running the model
costs nothing; ``bench_check_cost.py`` prices the checks on one RepVGG stack.  This script
compiles models of the sizes users deploy, at batch 1 and their real input sizes:

* ``vit-b``: transformers' ``ViTModel`` at ViT-B/16 (86M parameters, 1x3x224x224; captured by
  ``torch.export``);
* ``bert-base``: transformers' ``BertModel`` at BERT-base (110M parameters, 1x128 tokens; export);
* ``repvgg-a2``: a library-style RepVGG at RepVGG-A2's widths (64 to 1408 channels, 1x3x224x224;
  captured by fx);
* ``mobileone-s``: a library-style MobileOne with 3 branches per block at 64 to 512 channels
  (1x3x224x224; fx);
* ``repvgg-b1``: the library-style RepVGG at RepVGG-B1's widths (64, 128, 256, 512, 2048
  channels, depths 1-4-6-16-1; 51M parameters as trained, 1x3x224x224; fx);
* ``mobileone-s2``: the library-style MobileOne at MobileOne-S2's widths (64, 96, 256, 512,
  2048 channels, depths 2-8-10-1) with its one over-parameterized branch (1x3x224x224; fx);
* ``resnet-50``: transformers' ``ResNetModel`` at ResNet-50 (bottlenecks 3-4-6-3, 25M
  parameters, 1x3x224x224; export);
* ``convnext-t``: transformers' ``ConvNextModel`` at ConvNeXt-T (96-768 channels, depths
  3-3-9-3, 28M parameters, 1x3x224x224; export).

All parameters and BatchNorm statistics are randomized relative to their spread
(:func:`bench_common.randomized_relative`: absolute noise makes a 12-layer ViT-B chaotic, its
float32 forms 4% apart, and the check then runs its noise-floor copies).  Per
model it reports the parameters, ``torch.export.export`` alone (non-strict; static shapes, and
with every axis ``Dim.AUTO``, the call repc's capture makes), ``repc.compile`` (with its
per-region and whole-model checks, the default) and its ratio to each export, the rewrites and
the output kind, then the compile split into exclusive phases (a phase nested in another is not
counted in it).  Each time is the median of ``--repeats`` runs, one thread by default.  Each model
runs in a fresh process, as a user compiles it.

The machine matters: on a VM whose host backs memory lazily, touching pages the process has
not used before costs about 10 us each (2.5-3 s per GB), so the compile's peak memory shows up
as time; the table gives the peak resident memory growth of the compile (``ru_maxrss``).  Models
run ``--pause`` seconds apart: a model compiled right after another reuses the pages that one
freed before the VM hands them back, and looks cheaper (RepVGG-A2: 1.7-3.5 s depending on it).

    .venv/bin/python benchmarks/bench_compile_real.py                 # all eight models (~5 minutes)
    .venv/bin/python benchmarks/bench_compile_real.py --models vit-b --repeats 3
    .venv/bin/python benchmarks/bench_compile_real.py --quick         # small widths, smoke configuration
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn as nn

import repc
from repc.capture_export import register_output_dataclasses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402
from bench_models import export_alone, library_mobileone, library_repvgg  # noqa: E402

randomized = common.randomized_relative

# (module, attribute, phase): exclusive times
PHASES = [
    ("repc.api", "export_graph", "capture: torch.export"),
    ("repc.api", "_trace_whole", "capture: fx"),
    ("repc.passes.manager", "record_values", "record values"),
    ("repc.passes.collapse", "prepare", "prepare"),
    ("repc.passes.collapse", "RegionMatcher.run", "match"),
    ("repc.passes.collapse", "GraphWriter.run", "write fused graph"),
    ("repc.passes.collapse", "RegionChecker.check", "per-region checks"),
    ("repc.api", "preserve", "write back into modules"),
    ("repc.api", "compare", "whole-model check"),
]
PHASE_ORDER = [p for _, _, p in PHASES] + ["other"]


def _hf(kind: str, quick: bool) -> Tuple[nn.Module, Tuple[Any, ...]]:
    import transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "vit-b":
            d, layers, heads, ffn, image = (64, 2, 2, 128, 32) if quick else (768, 12, 12, 3072, 224)
            model = transformers.ViTModel(transformers.ViTConfig(
                hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                image_size=image, patch_size=16))
            return randomized(model), (torch.randn(1, 3, image, image, generator=torch.Generator().manual_seed(0)),)
        d, layers, heads, ffn, length = (64, 2, 2, 128, 16) if quick else (768, 12, 12, 3072, 128)
        model = transformers.BertModel(transformers.BertConfig(
            hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn))
        ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(0))
        return randomized(model), (ids,)


def _hf_vision(kind: str, quick: bool) -> Tuple[nn.Module, Tuple[Any, ...]]:
    import transformers
    size = 32 if quick else 224
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "resnet-50":
            config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]) if quick \
                else transformers.ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                                               depths=[3, 4, 6, 3], layer_type="bottleneck")
            model = transformers.ResNetModel(config)
        else:
            config = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1]) if quick \
                else transformers.ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3])
            model = transformers.ConvNextModel(config)
    return randomized(model), (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _stages(first: int, stages, quick: bool):
    """(cin, cout, stride) per block: each stage's first block at stride 2."""
    widths, cin = [], first
    for cout, depth in stages:
        widths += [(cin, cout, 2)] + [(cout, cout, 1)] * (depth - 1)
        cin = cout
    return widths


def _repvgg_b1(quick: bool) -> Tuple[nn.Module, Tuple[Any, ...]]:
    widths = _stages(16, [(8, 1), (16, 2)], quick) if quick else \
        _stages(64, [(128, 4), (256, 6), (512, 16), (2048, 1)], quick)
    size = 32 if quick else 224
    return randomized(library_repvgg(widths)), (torch.randn(1, 3, size, size),)


def _mobileone_s2(quick: bool) -> Tuple[nn.Module, Tuple[Any, ...]]:
    widths = _stages(8, [(16, 1), (16, 2)], quick) if quick else \
        _stages(64, [(96, 2), (256, 8), (512, 10), (2048, 1)], quick)
    size = 32 if quick else 224
    return randomized(library_mobileone(widths, branches=1)), (torch.randn(1, 3, size, size),)


def _repvgg_a2(quick: bool) -> Tuple[nn.Module, Tuple[Any, ...]]:
    stages = [(8, 1), (16, 2), (32, 2)] if quick else [(96, 2), (192, 4), (384, 14), (1408, 1)]
    widths, cin = [], 16 if quick else 64
    for cout, depth in stages:
        widths += [(cin, cout, 2)] + [(cout, cout, 1)] * (depth - 1)
        cin = cout
    size = 32 if quick else 224
    return randomized(library_repvgg(widths)), (torch.randn(1, 3, size, size),)


def _mobileone_s(quick: bool) -> Tuple[nn.Module, Tuple[Any, ...]]:
    widths = [(8, 16, 2), (16, 16, 1)] if quick else \
        [(64, 64, 2), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
    size = 32 if quick else 224
    return randomized(library_mobileone(widths, branches=3)), (torch.randn(1, 3, size, size),)


MODELS: Dict[str, Callable[[bool], Tuple[nn.Module, Tuple[Any, ...]]]] = {
    "vit-b": lambda q: _hf("vit-b", q),
    "bert-base": lambda q: _hf("bert-base", q),
    "repvgg-a2": _repvgg_a2,
    "mobileone-s": _mobileone_s,
    "repvgg-b1": _repvgg_b1,
    "mobileone-s2": _mobileone_s2,
    "resnet-50": lambda q: _hf_vision("resnet-50", q),
    "convnext-t": lambda q: _hf_vision("convnext-t", q),
}


def _export_seconds(model: nn.Module, args, dynamic: bool) -> float:
    """Seconds of ``torch.export.export`` (non-strict): static, or ``dynamic`` as repc's capture
    calls it (:func:`bench_models.export_alone`, every axis ``Dim.AUTO``)."""
    start = time.perf_counter()
    if dynamic:
        export_alone(model, args, {})
    else:
        torch.export.export(model, args, strict=False)
    return time.perf_counter() - start


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(name: str, repeats: int, quick: bool) -> Dict[str, Any]:
    model, args = MODELS[name](quick)
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = model(*args)  # warm: lazy initialisation inside torch and the model is not timed
    register_output_dataclasses(out)  # (the library nets return a dataclass, which export must flatten)
    static = statistics.median(_export_seconds(model, args, False) for _ in range(repeats))
    dynamic = statistics.median(_export_seconds(model, args, True) for _ in range(repeats))
    runs = []
    for _ in range(repeats):
        gc.collect()
        timer = common.PhaseTimer()
        rss_before = _max_rss_mb()
        with timer.instrument(PHASES):
            start = time.perf_counter()
            fused = repc.compile(model, args)
            total = time.perf_counter() - start
        phases = dict(timer.wall)
        phases["other"] = total - sum(phases.values())
        runs.append(dict(total=total, phases=phases, peak_growth_mb=_max_rss_mb() - rss_before,
                         missing=list(timer.missing)))
        report = fused.repc_report
        del fused
    runs.sort(key=lambda r: r["total"])
    median = runs[len(runs) // 2]
    return dict(model=name, params=params, export_static_s=static, export_dynamic_s=dynamic,
                compile_s=median["total"], phases=median["phases"], peak_growth_mb=median["peak_growth_mb"],
                rewrites=len(report.rewrites), output=report.output, front_end=report.front_end,
                verified=bool(report.verification and report.verification.ok), missing_hooks=median["missing"])


def render(results: List[Dict[str, Any]]) -> str:
    rows = [[r["model"], f"{r['params'] / 1e6:.1f}M", r["front_end"], f"{r['export_static_s']:.2f}",
             f"{r['export_dynamic_s']:.2f}", f"{r['compile_s']:.2f}",
             f"{r['compile_s'] / r['export_static_s']:.1f}x", f"{r['compile_s'] / r['export_dynamic_s']:.1f}x",
             str(r["rewrites"]), r["output"], "yes" if r["verified"] else "NO", f"{r['peak_growth_mb']:.0f}"]
            for r in results]
    table = common.format_table(["model", "params", "front end", "export s", "export AUTO s", "repc s",
                                 "repc/export", "repc/export AUTO", "rewrites", "output", "verified",
                                 "peak +MB"], rows)
    phase_rows = [[p] + [f"{r['phases'].get(p, 0.0):.2f}" for r in results] for p in PHASE_ORDER]
    phases = common.format_table(["phase (s)"] + [r["model"] for r in results], phase_rows)
    ratios = [r["compile_s"] / r["export_static_s"] for r in results]
    summary = f"repc.compile / torch.export (static): median {statistics.median(ratios):.1f}x, " \
              f"worst {max(ratios):.1f}x (target: median <= 2.5x)"
    return "\n\n".join([table, phases, summary])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=1, help="runs per model; the median is reported")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small widths: a smoke configuration")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--pause", type=float, default=10.0,
                   help="seconds between models (default 10): a VM returns a process's freed memory to its host "
                        "after a few seconds; without the pause a model compiles on pages the last one touched")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _in_fresh_process(name: str, args) -> Dict[str, Any]:
    """``bench(name)`` in a process of its own, as a user compiles a model: a model compiled after
    another would reuse the memory the first one's compile touched, and look cheaper."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, os.path.abspath(__file__), "--child", "--models", name, "--repeats",
                   str(args.repeats), "--threads", str(args.threads), "--json", out] + (["--quick"] if args.quick else [])
        subprocess.run(command, check=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    logging.getLogger("torch._export").setLevel(logging.ERROR)  # (its notes on axes it specialized)
    if args.child:  # one model in this process: what the parent runs in a fresh process per model
        common.write_json(args.json, bench(args.models[0], args.repeats, args.quick))
        return 0
    results = []
    for i, name in enumerate(args.models):
        if i:
            time.sleep(args.pause)
        results.append(_in_fresh_process(name, args))
    print(common.machine_note(args.threads))
    print(render(results))
    if args.json:
        common.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
