"""Capture: an ``nn.Module`` to shape-annotated ``torch.fx`` graphs.

Standard ``torch.nn`` layers stay leaves so their weights stay attached.  A model that does
not trace as a whole is split: its largest traceable submodules are traced (each with the
inputs it really received on the example run) and the untraceable shells are kept as they
are, with the reason recorded.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp


class CaptureError(Exception):
    pass


@dataclass
class Skipped:
    path: str
    reason: str


class _AssignableProxy(fx.Proxy):
    """A proxy that records item assignment (``y[:, :, :p] = v``) as an ``operator.setitem`` node
    instead of failing: DBB's BN-and-pad fills its border that way."""

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class Tracer(fx.Tracer):
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AssignableProxy(node, self)


def trace(module: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """Symbolically trace ``module``; standard ``torch.nn`` layers stay call_module leaves and
    item assignments are recorded (the graph then holds in-place ``setitem`` nodes)."""
    tracer = Tracer()
    graph = tracer.trace(module, concrete_args)
    name = module.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Tuple[Any, ...]) -> None:
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def record_submodule_inputs(model: nn.Module, example_inputs: Tuple[Any, ...]) -> Dict[str, Tuple[Any, ...]]:
    """The positional inputs each submodule received first when ``model`` ran on the example."""
    seen: Dict[str, Tuple[Any, ...]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, args, kwargs, name=name):
            if name not in seen and not kwargs:
                seen[name] = tuple(args)
        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def split_untraceable(model: nn.Module, example_inputs, reason: str) -> Tuple[List[Tuple[str, Tuple[Any, ...]]], List[Skipped]]:
    """Submodule paths (outermost first) that trace, with their example inputs; and what was skipped."""
    inputs = record_submodule_inputs(model, example_inputs)
    traceable: List[Tuple[str, Tuple[Any, ...]]] = []
    skipped = [Skipped("<model>", reason)]

    def visit(prefix: str, mod: nn.Module):
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.children()):
                continue  # a single layer on its own: nothing to fuse inside it
            if path not in inputs:
                skipped.append(Skipped(path, "not called on the example inputs"))
                continue
            try:
                trace(child)
            except Exception as why:
                skipped.append(Skipped(path, _short(why)))
                visit(path, child)
                continue
            traceable.append((path, inputs[path]))

    visit("", model)
    return traceable, skipped


def _short(why: BaseException) -> str:
    text = str(why).strip().splitlines()
    return f"{type(why).__name__}: {text[0] if text else ''}"[:200]
