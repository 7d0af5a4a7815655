"""repc against timm's own ``reparameterize_model`` on timm's reparameterizable model zoo.

timm is not a dependency of repc, nor installable beside the CPU build of torch that repc's
tests use (it imports torchvision).  This script runs where timm is installed, e.g. in a
separate environment::

    python -m venv /tmp/zoo && /tmp/zoo/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31
    /tmp/zoo/bin/pip install -e .
    /tmp/zoo/bin/python benchmarks/bench_timm.py                  # every family below
    /tmp/zoo/bin/python benchmarks/bench_timm.py --models repvgg_a0 mobileone_s0 --rounds 11

Per model (random weights: every parameter moved off its init and every BatchNorm given
random statistics, which default init would hide folding errors behind), on CPU:

* **heavy ops** (conv / linear / matmul) and **norm layers** before -> after repc, next to
  ``timm.utils.reparameterize_model``'s (all counted alike, on the graph torch.export or fx
  captures: :func:`repc.report.op_counts`);
* **exact**: max relative error of repc's result against the original on another batch and
  (where the model allows) another image size, below 1e-4, or no larger than the original's own
  float32 rounding error (against the model in float64) or timm's conversion's error, which
  random weights make large in some deep networks;
* the **front end** and **output** (``module-preserving``: the model's own class) repc gave;
* **compile time** of ``repc.compile`` with its verification;
* with ``--rounds``: **latency** of repc's result over the reference's, and over repc's
  whole-model graph (``graph=True``: what keeping the model's own modules costs), median of
  interleaved rounds (one thread).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

import repc
from repc.report import op_counts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402

# timm's families with a reparameterize / fuse method, smallest variant of each
MODELS = ["repvgg_a0", "repvgg_b1g4", "repvgg_d2se", "mobileone_s0", "mobileone_s1", "fastvit_t8", "fastvit_sa12",
          "fastvit_mci0", "repvit_m0_9", "repghostnet_050", "levit_128s", "levit_conv_128s", "efficientvit_m0",
          "hgnetv2_b0", "ghostnetv3_050", "tiny_vit_5m_224", "mobilenetv4_conv_small", "starnet_s050", "gernet_s"]


def counts(models: List[nn.Module], x: torch.Tensor) -> List[Tuple[int, int]]:
    """(heavy ops, norm layers) of each model, counted alike: on the graphs torch.export (or
    fx) captures, or where one of them is captured by neither (a forward that branches on
    sizes, fused by repc in parts), on the ATen ops each runs on ``x``."""
    from repc.capture import trace
    from repc.capture_export import export_graph
    try:
        out = []
        for model in models:
            try:
                out.append(op_counts(export_graph(model, (x,), {}).gm))
            except Exception:  # (an export guard repc does not write: count on the fx graph)
                out.append(op_counts(trace(model, example_inputs=(x,))))
        return out
    except Exception:
        return [dispatched_counts(model, x) for model in models]


_HEAVY_ATEN = {"convolution", "addmm", "mm", "bmm", "baddbmm"}
_NORM_ATEN = {"native_batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
              "native_layer_norm", "native_group_norm"}


def dispatched_counts(model: nn.Module, x: torch.Tensor) -> Tuple[int, int]:
    """(heavy ops, norm layers) among the ATen ops ``model`` runs on ``x``."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen: List[str] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(x)
    return sum(n in _HEAVY_ATEN for n in seen), sum(n in _NORM_ATEN for n in seen)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def bench_model(name: str, size: int, rounds: int) -> Dict[str, Any]:
    import timm
    from timm.utils.model import reparameterize_model
    row: Dict[str, Any] = {"model": name}
    model = common.randomized_relative(timm.create_model(name, pretrained=False, num_classes=10))
    fixed = getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False) or \
        name.startswith(("levit", "tiny_vit", "efficientvit_m"))
    s = model.pretrained_cfg["input_size"][-1] if fixed else size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, s, s, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reparameterize_model(copy.deepcopy(model))
        start = time.perf_counter()
        fused = repc.compile(model, (x,))
        row["compile_s"] = time.perf_counter() - start
    report = fused.repc_report
    before, after, ref = counts([model, fused, reference], x)
    row.update(front_end=report.front_end, output=report.output, rolled_back=report.rolled_back,
               before=before, repc=after, reference=ref)
    other = s if fixed else s + 32
    y = torch.randn(2, 3, other, other, generator=g)
    with torch.no_grad():
        want = model(y)
        row["error"] = rel_error(fused(y), want)
        row["reference_error"] = rel_error(reference(y), want)
        # the original's own float32 rounding (against float64): a random deep network can be
        # chaotic (ghostnetv3: 0.5), and no float32 form of it agrees more closely than that
        row["noise"] = rel_error(want.double(), copy.deepcopy(model).double()(y.double()))
    row["as_few"] = row["repc"][0] <= row["reference"][0] and row["repc"][1] <= row["reference"][1]
    # as exact as float32 allows: within 1e-4, or no further off than the original's own rounding
    # or than timm's conversion is (two float32 forms of a chaotic network differ by about that)
    row["exact"] = row["error"] < max(1e-4, row["noise"], row["reference_error"])
    if rounds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = repc.compile(model, (x,), graph=True)  # the whole-model graph, to time the copy against
        forms = {"repc": lambda: fused(x), "reference": lambda: reference(x), "graph": lambda: graph(x)}
        with torch.no_grad():
            lat = common.interleaved_medians(forms, rounds, 3)
        row["repc_over_reference"] = common.ratio(lat["repc"].median, lat["reference"].median)
        row["repc_over_graph"] = common.ratio(lat["repc"].median, lat["graph"].median)
    if not row["as_few"]:
        row["left"] = sorted({f"{r.kind}: {r.reason}"[:120] for r in report.rejected})[:6]
        row["output_note"] = report.output_note
    return row


def render(rows: List[Dict[str, Any]]) -> str:
    headers = ["model", "front end", "output", "heavy ops: before -> repc (timm)", "norms: before -> repc (timm)",
               "max rel. error (timm's; f32 noise)", "compile s", "repc/timm latency", "repc/graph latency"]
    table = []
    for r in rows:
        if "failed" in r:
            table.append([r["model"], "failed: " + r["failed"][:80], "", "", "", "", "", "", ""])
            continue
        table.append([r["model"], r["front_end"], r["output"],
                      f"{r['before'][0]} -> {r['repc'][0]} ({r['reference'][0]})",
                      f"{r['before'][1]} -> {r['repc'][1]} ({r['reference'][1]})",
                      f"{r['error']:.1e} ({r['reference_error']:.0e}; {r['noise']:.0e})", f"{r['compile_s']:.1f}",
                      common.fmt_ratio(r["repc_over_reference"]) if "repc_over_reference" in r else "-",
                      common.fmt_ratio(r["repc_over_graph"]) if "repc_over_graph" in r else "-"])
    return common.format_table(headers, table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=64, help="image size where the model takes any")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved latency rounds (0: no timing)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    try:
        import timm  # noqa: F401
    except ImportError:
        print("timm is not installed here; see this script's docstring for an environment that has it")
        return 2
    common.set_threads(args.threads)
    rows = []
    for name in args.models:
        try:
            rows.append(bench_model(name, args.size, args.rounds))
        except Exception as why:  # one model's failure is a row, not the end of the run
            rows.append({"model": name, "failed": f"{type(why).__name__}: {why}"})
        print(rows[-1], flush=True)
    print(common.machine_note(args.threads))
    print(render(rows))
    ok = [r for r in rows if r.get("as_few") and r.get("exact")]
    print(f"{len(ok)} of {len(rows)} models: no more heavy ops and norms than timm's own conversion, exact")
    if args.json:
        common.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
