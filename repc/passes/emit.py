"""Emit canonical ops as standard torch modules and functions into an fx graph.

The output of repc must load where repc is not installed: every op becomes an ``nn.ConvNd``,
``nn.Linear``, ``torch.nn.functional.pad`` or a multiply/add by a registered buffer, with its
tensors cast back to the model's dtype and device.
"""

from __future__ import annotations

import weakref

import operator
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

from .. import algebra
from ..deferred import write_into
from ..ops import AffineOp, Conv, Dense, Float64Field, Linear

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


@dataclass
class BuiltOp:
    """An op turned into standard torch pieces, in the model's dtype and device.

    ``pad`` (F.pad arguments) runs first, then ``module`` (a conv or linear; for a dense map on
    the flattened sample, then reshaped to ``reshape``), then ``* scale + shift``.  The same
    pieces are emitted into graphs and run directly by the region checks.
    """

    module: Optional[nn.Module] = None
    pad: Optional[Tuple[List[int], str]] = None
    flatten: bool = False
    reshape: Optional[Tuple[int, ...]] = None
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None

    def __call__(self, x):
        if self.pad is not None:
            x = F.pad(x, self.pad[0], mode=self.pad[1])
        if self.flatten:
            x = torch.flatten(x, 1)
        if self.module is not None:
            x = self.module(x)
        if self.reshape is not None:
            x = torch.reshape(x, self.reshape)
        if self.scale is not None:
            x = x * self.scale
        if self.shift is not None:
            x = x + self.shift
        return x


def _loaded(mod: nn.Module, op) -> nn.Module:
    """``mod`` (built without initializing its tensors: ``skip_init``) holding ``op``'s weight
    and bias; a weight held as an expression is computed into it a block at a time
    (:func:`repc.deferred.write_into`: no float64 copy of the whole weight)."""
    with torch.no_grad():
        write_into(mod.weight, Float64Field.stored(op, "weight"))
        if op.bias is not None:
            mod.bias.copy_(op.bias)
    return mod.requires_grad_(False)


_BUILT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # op -> {(dtype, device): BuiltOp}


def build_op(op: AffineOp, dtype, device) -> BuiltOp:
    """``op`` as standard torch modules and tensors (weights cast from float64 once).  Built once
    per op while the op lives: the region check runs the very modules the graph then holds
    (a merged weight is cast once, not once for the check and again for the graph)."""
    built = _BUILT.setdefault(op, {})
    key = (dtype, str(device))
    if key not in built:
        built[key] = _build_op(op, dtype, device)
    return built[key]


def _build_op(op: AffineOp, dtype, device) -> BuiltOp:
    if isinstance(op, Conv):
        op = algebra.compact_groups(op)
        symmetric = all(lo == hi >= 0 for lo, hi in op.padding)  # (a negative amount crops: F.pad does that)
        mod = skip_init(_CONV_CLASSES[op.nd], op.in_channels, op.out_channels, op.kernel_size, stride=op.stride,
                        padding=tuple(lo for lo, _ in op.padding) if symmetric else 0,
                        dilation=op.dilation, groups=op.groups, bias=op.bias is not None,
                        padding_mode=op.padding_mode if symmetric else "zeros", device=device, dtype=dtype)
        pad = None
        if not symmetric:
            pad = ([p for lo_hi in reversed(op.padding) for p in lo_hi],
                   "constant" if op.padding_mode == "zeros" else op.padding_mode)
        return BuiltOp(_loaded(mod, op), pad=pad)
    if isinstance(op, (Linear, Dense)):
        n_out, n_in = op.weight_shape if isinstance(op, Linear) else op.weight.shape
        mod = skip_init(nn.Linear, n_in, n_out, bias=op.bias is not None, device=device, dtype=dtype)
        built = BuiltOp(_loaded(mod, op))
        if isinstance(op, Dense):
            built.flatten, built.reshape = True, (-1,) + tuple(op.out_shape)
        return built
    # (copies: the op's tensors may be shared, e.g. a float64 weight read once per compile)
    return BuiltOp(scale=None if op.scale is None else op.scale.to(device=device, dtype=dtype, copy=True),
                   shift=None if op.shift is None else op.shift.to(device=device, dtype=dtype, copy=True))


def emit_op(graph: fx.Graph, namer: AttributeNamer, op: AffineOp, x: fx.Node, hint: str, dtype, device) -> fx.Node:
    """Append nodes computing ``op(x)`` to ``graph``; returns the result node."""
    built = build_op(op, dtype, device)
    if built.pad is not None:
        x = graph.call_function(F.pad, (x, built.pad[0]), {"mode": built.pad[1]})
    if built.flatten:
        x = graph.call_function(torch.flatten, (x, 1))
    if built.module is not None:
        x = graph.call_module(namer.module(hint, built.module), (x,))
    if built.reshape is not None:
        x = graph.call_function(torch.reshape, (x, built.reshape))
    if built.scale is not None:
        x = graph.call_function(operator.mul, (x, graph.get_attr(namer.buffer(hint + "_scale", built.scale))))
    if built.shift is not None:
        x = graph.call_function(operator.add, (x, graph.get_attr(namer.buffer(hint + "_shift", built.shift))))
    return x


def emit_form(graph: fx.Graph, namer: AttributeNamer, form: Dict[fx.Node, AffineOp],
              value_of: Callable[[fx.Node], fx.Node], hint: str, dtype, device) -> fx.Node:
    """``sum_s op_s(value_of(s))`` as nodes of ``graph``."""
    result = None
    for i, (src, op) in enumerate(form.items()):
        term = emit_op(graph, namer, op, in_dtype(graph, value_of(src), src, dtype), hint if i == 0 else f"{hint}_{i}",
                       dtype, device)
        result = term if result is None else graph.call_function(operator.add, (result, term))
    return result


def source_dtype(src: fx.Node) -> Optional[torch.dtype]:
    """The dtype of the value a form reads, where the capture recorded it."""
    return getattr(src.meta.get("tensor_meta"), "dtype", None)


def in_dtype(graph: fx.Graph, value: fx.Node, src: fx.Node, dtype) -> fx.Node:
    """``value`` (the graph's copy of ``src``) cast to ``dtype`` where ``src`` has another
    floating dtype: a region through a cast (peft's LoRA in float32 over a bfloat16 base)
    computes in its output's dtype."""
    have = source_dtype(src)
    if have is None or have == dtype or not have.is_floating_point:
        return value
    return graph.call_method("to", (value, dtype))


def form_function(form: Dict[fx.Node, AffineOp], dtype, device) -> Callable:
    """A function computing the form from its sources (positional, in order), built as emitted."""
    pieces = [build_op(op, dtype, device) for op in form.values()]

    def run(*inputs):
        out = None
        for piece, x in zip(pieces, inputs):
            y = piece(x.to(dtype) if x.is_floating_point() else x)
            out = y if out is None else out + y
        return out

    return run
