"""Emit canonical ops as standard torch modules and functions into an fx graph.

The output of repc must load where repc is not installed: every op becomes an ``nn.ConvNd``,
``nn.Linear``, ``torch.nn.functional.pad`` or a multiply/add by a registered buffer, with its
tensors cast back to the model's dtype and device.
"""

from __future__ import annotations

import operator
import re
from typing import Callable, Dict

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import algebra
from ..ops import AffineOp, Conv, Dense, Elementwise, Linear

_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class AttributeNamer:
    """Registers new submodules and buffers on ``root`` under fresh readable names."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.taken = {n for n, _ in root.named_modules()} | {n for n, _ in root.named_buffers()} | \
            {n for n, _ in root.named_parameters()} | set(dir(root))

    def fresh(self, hint: str) -> str:
        base = re.sub(r"\W", "_", hint) or "fused"
        name, i = base, 1
        while name in self.taken:
            i += 1
            name = f"{base}_{i}"
        self.taken.add(name)
        return name

    def module(self, hint: str, mod: nn.Module) -> str:
        name = self.fresh(hint)
        self.root.add_module(name, mod)
        return name

    def buffer(self, hint: str, tensor: torch.Tensor) -> str:
        name = self.fresh(hint)
        self.root.register_buffer(name, tensor)
        return name


def conv_module(op: Conv, dtype, device) -> nn.Module:
    """``op`` as an ``nn.ConvNd`` (symmetric padding only; see :func:`emit_op`)."""
    op = algebra.compact_groups(op)
    symmetric = all(lo == hi for lo, hi in op.padding)
    mod = _CONV_CLASSES[op.nd](op.in_channels, op.out_channels, op.kernel_size, stride=op.stride,
                               padding=tuple(lo for lo, _ in op.padding) if symmetric else 0,
                               dilation=op.dilation, groups=op.groups, bias=op.bias is not None,
                               padding_mode=op.padding_mode if symmetric else "zeros", device=device, dtype=dtype)
    with torch.no_grad():
        mod.weight.copy_(op.weight)
        if op.bias is not None:
            mod.bias.copy_(op.bias)
    mod.requires_grad_(False)
    return mod, op


def emit_op(graph: fx.Graph, namer: AttributeNamer, op: AffineOp, x: fx.Node, hint: str, dtype, device) -> fx.Node:
    """Append nodes computing ``op(x)`` to ``graph``; returns the result node."""
    if isinstance(op, Conv):
        mod, op = conv_module(op, dtype, device)
        if not all(lo == hi for lo, hi in op.padding):
            pad = [p for lo_hi in reversed(op.padding) for p in lo_hi]
            mode = "constant" if op.padding_mode == "zeros" else op.padding_mode
            x = graph.call_function(F.pad, (x, pad), {"mode": mode})
        return graph.call_module(namer.module(hint, mod), (x,))
    if isinstance(op, Dense):
        mod = nn.Linear(op.weight.shape[1], op.weight.shape[0], bias=op.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(op.weight)
            if op.bias is not None:
                mod.bias.copy_(op.bias)
        mod.requires_grad_(False)
        flat = graph.call_function(torch.flatten, (x, 1))
        y = graph.call_module(namer.module(hint, mod), (flat,))
        return graph.call_function(torch.reshape, (y, (-1,) + tuple(op.out_shape)))
    if isinstance(op, Linear):
        mod = nn.Linear(op.in_features, op.out_features, bias=op.bias is not None, device=device, dtype=dtype)
        with torch.no_grad():
            mod.weight.copy_(op.weight)
            if op.bias is not None:
                mod.bias.copy_(op.bias)
        mod.requires_grad_(False)
        return graph.call_module(namer.module(hint, mod), (x,))
    out = x
    if op.scale is not None:
        scale = graph.get_attr(namer.buffer(hint + "_scale", op.scale.to(device=device, dtype=dtype)))
        out = graph.call_function(operator.mul, (out, scale))
    if op.shift is not None:
        shift = graph.get_attr(namer.buffer(hint + "_shift", op.shift.to(device=device, dtype=dtype)))
        out = graph.call_function(operator.add, (out, shift))
    return out


def emit_form(graph: fx.Graph, namer: AttributeNamer, form: Dict[fx.Node, AffineOp],
              value_of: Callable[[fx.Node], fx.Node], hint: str, dtype, device) -> fx.Node:
    """``sum_s op_s(value_of(s))`` as nodes of ``graph``."""
    result = None
    for i, (src, op) in enumerate(form.items()):
        term = emit_op(graph, namer, op, value_of(src), hint if i == 0 else f"{hint}_{i}", dtype, device)
        result = term if result is None else graph.call_function(operator.add, (result, term))
    return result


def form_module(form: Dict[fx.Node, AffineOp], dtype, device) -> fx.GraphModule:
    """A standalone module computing the form, its sources as positional inputs in order."""
    root = nn.Module()
    graph = fx.Graph()
    inputs = {src: graph.placeholder(f"x{i}") for i, src in enumerate(form)}
    out = emit_form(graph, AttributeNamer(root), form, inputs.__getitem__, "op", dtype, device)
    graph.output(out)
    return fx.GraphModule(root, graph)
