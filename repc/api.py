"""``repc.compile``: the Python front door over capture -> normalize -> collapse -> verify."""

from __future__ import annotations

import copy
from typing import Any, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import split_untraceable, trace, _short
from .passes.collapse import collapse
from .report import Rejection, Report, SkippedPart, Verification
from .verify.check import compare


class ReparamError(ValueError):
    """The model or the example inputs cannot be compiled as given."""


def _training_modules(model: nn.Module):
    return [name or "<model>" for name, m in model.named_modules() if m.training]


def compile(model: nn.Module, example_inputs: Any, *, verify: bool = True,
            tolerance: Optional[float] = None) -> nn.Module:
    """Return a new module computing ``model``'s function with its affine regions merged.

    ``example_inputs`` is a tuple of positional inputs (a single tensor is accepted).  The
    model must be in eval mode; it is never modified.  ``verify`` checks the result against
    the original on the example and on random inputs of other batch and spatial sizes; a
    result that fails is rolled back.  The report is in ``result.repc_report``.
    """
    if not isinstance(model, nn.Module):
        raise ReparamError(f"repc.compile expects an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    training = _training_modules(model)
    if training:
        raise ReparamError(
            f"the model is in training mode ({', '.join(training[:3])}{'...' if len(training) > 3 else ''}): "
            "call model.eval() first; merging BatchNorm is only valid with its running statistics")
    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as why:
        raise ReparamError(f"the model fails on the example inputs: {_short(why)}") from why

    work = copy.deepcopy(model)
    report = Report()
    report.params_before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        fused = _fuse_module(work, example_inputs, report, "")
    report.nodes_before, report.nodes_after = _count_nodes(model, work, example_inputs), _graph_nodes(fused)
    if verify:
        result = compare(fused, model, example_inputs, tolerance)
        report.verification = Verification(result.ok, result.max_deviation, result.tolerance, result.checked,
                                           result.skipped, result.failing_input, result.error)
        if not result.ok:
            # a miscompile that slipped past the per-region checks: never return it
            fused = copy.deepcopy(model)
            report.rolled_back = True
            for r in report.rewrites:
                report.rejected.append(Rejection(r.root, "rolled back: whole-model verification failed"))
            report.rewrites = []
            report.nodes_after = report.nodes_before
    report.params_after = sum(p.numel() for p in fused.parameters()) + \
        sum(b.numel() for n, b in fused.named_buffers() if "_fused" in n)
    fused.repc_report = report
    return fused


def _fuse_module(work: nn.Module, example_inputs, report: Report, prefix: str) -> nn.Module:
    """Trace and collapse ``work`` (repc's copy); if it does not trace, its largest traceable parts."""
    try:
        gm = trace(work)
    except Exception as why:
        parts, skipped = split_untraceable(work, example_inputs, _short(why))
        report.skipped.extend(SkippedPart(prefix + s.path if s.path != "<model>" else (prefix.rstrip(".") or s.path),
                                          s.reason) for s in skipped)
        for path, inputs in parts:
            parent_path, _, name = path.rpartition(".")
            parent = work.get_submodule(parent_path) if parent_path else work
            child = getattr(parent, name)
            try:
                gm = trace(child)
                result = collapse(gm, inputs, prefix=f"{prefix}{path}.")
            except Exception as err:
                report.skipped.append(SkippedPart(prefix + path, _short(err)))
                continue
            report.rewrites.extend(result.rewrites)
            report.rejected.extend(result.rejections)
            setattr(parent, name, result.module)
        return work
    result = collapse(gm, example_inputs, prefix=prefix)
    report.rewrites.extend(result.rewrites)
    report.rejected.extend(result.rejections)
    return result.module


def _graph_nodes(module: nn.Module) -> int:
    return sum(len(m.graph.nodes) for m in module.modules() if isinstance(m, fx.GraphModule))


def _count_nodes(model: nn.Module, work: nn.Module, example_inputs) -> int:
    try:
        return len(trace(model).graph.nodes)
    except Exception:
        return sum(len(m.graph.nodes) for m in work.modules() if isinstance(m, fx.GraphModule))
