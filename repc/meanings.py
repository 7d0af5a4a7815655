"""What a node means to repc: the canonical meanings, the facts they are read from, and
the builders of their canonical ops.

A node of a captured graph means one of:

* :class:`AffineCall` -- ``op(input)`` for a canonical :mod:`repc.ops` op (conv, linear,
  elementwise ``x * s + t``);
* :class:`Combine` -- ``sum_i c_i * input_i`` (add, sub, alpha, a mean over a stack);
* :class:`Concat` -- ``cat(inputs, axis)``;
* :class:`Slice` -- ``input[..., start:stop, ...]`` on one axis (getitem, narrow, split, chunk);
* :class:`Layout` -- a reshape or permutation (transpose, view, flatten...);
* :class:`Constant` -- a value computed from parameters and constants only (folded);

or nothing, and then :class:`repc.reasons.Opaque` says why.  Which op means what is the table
in :mod:`repc.vocabulary`; :class:`GraphFacts` is what that table reads (modules, constants,
recorded shapes and values).  The builders (:func:`make_conv`, :func:`elementwise`,
:func:`batch_norm`, :func:`avg_pool`, :func:`zero_pad`) turn a call's arguments into canonical
ops in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from . import algebra
from .ops import AffineOp, Conv, Elementwise, as_float64
from .reasons import Opaque, OpaqueKind


@dataclass
class AffineCall:
    input: fx.Node
    op: AffineOp


@dataclass
class Combine:
    terms: List[Tuple[fx.Node, float]]


@dataclass
class Concat:
    inputs: List[fx.Node]
    axis: int


@dataclass
class Slice:
    input: fx.Node
    axis: int
    start: int
    stop: int


@dataclass
class Layout:
    """A reshape/permutation of ``input`` (transpose, permute, flatten, view, reshape...)."""
    input: fx.Node
    node: fx.Node


@dataclass
class Constant:
    value: Any


Meaning = Any  # one of the above


# ----------------------------------------------------------------------------- context

class GraphFacts:
    """What normalization needs to know about a captured graph: modules, constants, shapes."""

    def __init__(self, gm: fx.GraphModule, values: Optional[Dict[fx.Node, Any]] = None):
        self.gm = gm
        self.values = values or {}  # every node's value on the example inputs
        self.modules = dict(gm.named_modules())
        self.constants: Dict[fx.Node, Any] = {}

    def shape(self, node) -> Optional[Tuple[int, ...]]:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def const(self, arg) -> Optional[Tensor]:
        """``arg`` as a constant tensor (float64 not yet applied), or None if it is data."""
        if isinstance(arg, fx.Node):
            value = self.constants.get(arg)
            return value if isinstance(value, Tensor) else None
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return torch.tensor(float(arg), dtype=torch.float64)
        return None

    def is_const(self, arg) -> bool:
        if isinstance(arg, fx.Node):
            return arg in self.constants
        return True


# ----------------------------------------------------------------------------- builders of canonical ops

def _tuple(v, n: int) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


def _conv_padding(padding, kernel, dilation) -> Tuple[Tuple[int, int], ...]:
    if padding == "valid":
        return tuple((0, 0) for _ in kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)
    return tuple((p, p) for p in _tuple(padding, len(kernel)))


def make_conv(weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups,
              padding_mode: str = "zeros") -> Conv:
    """A conv call's arguments as a canonical :class:`Conv` (its tensors read in float64);
    ``padding="same"`` puts the odd extra row on the high side, as PyTorch does."""
    nd = weight.dim() - 2
    kernel = tuple(weight.shape[2:])
    dil = _tuple(dilation, nd)
    return Conv(weight, bias, _tuple(stride, nd), _conv_padding(padding, kernel, dil), dil,
                int(groups), padding_mode)


def elementwise(shape, scale=None, shift=None) -> Elementwise:
    """``x * scale + shift`` for constants that broadcast to ``shape`` without enlarging it."""
    ndim = len(shape)

    def full(t):
        if t is None:
            return None
        t = as_float64(t)
        if t.dim() > ndim:
            raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "a constant with more dimensions than the activation")
        t = t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))
        if torch.broadcast_shapes(t.shape, shape) != torch.Size(shape):
            raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "a constant that broadcasts the activation to a larger shape")
        return t

    return Elementwise(full(scale), full(shift), tuple(shape))


def batch_norm(x_shape, mean, var, eps, weight, bias) -> Elementwise:
    """Eval-mode batch norm on axis 1 as ``x * s + t``: ``s = w / sqrt(var + eps)``,
    ``t = b - mean * s`` (``w = 1``, ``b = 0`` without affine)."""
    if mean is None or var is None:
        raise Opaque(OpaqueKind.TRAINING, "batch norm without running statistics uses batch statistics")
    if len(x_shape) < 2:
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "batch norm on a tensor without a channel axis")
    scale, shift = algebra.batchnorm_affine(as_float64(mean), as_float64(var), float(eps),
                                            as_float64(weight), as_float64(bias))
    view = (1, -1) + (1,) * (len(x_shape) - 2)
    return Elementwise(scale.reshape(view), shift.reshape(view), tuple(x_shape))


def avg_pool(x_shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> Conv:
    """Average pooling as a depthwise conv whose weights are ``1 / prod(kernel)`` (or
    ``1 / divisor``), zero padding counted, no partial windows."""
    nd = len(x_shape) - 2
    kernel = _tuple(kernel, nd)
    stride = _tuple(stride if stride not in (None, []) else kernel, nd)
    padding = _tuple(padding, nd)
    if ceil_mode:
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "avg-pool with ceil_mode has partial windows")
    if any(padding) and not count_include_pad:
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "avg-pool with count_include_pad=False divides border windows differently")
    return algebra.avg_pool_as_conv(x_shape[1], kernel, stride, padding, divisor)


def zero_pad(x_shape, pad: Sequence[int]) -> Conv:
    """``F.pad(x, pad)`` with zeros as an identity 1x1 depthwise conv with that padding; a
    negative amount crops (as ``F.pad`` does)."""
    pad = list(pad)
    nd = len(pad) // 2
    if len(x_shape) != nd + 2 or len(pad) % 2:
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "padding that is not a spatial padding of a (N, C, ...) tensor")
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(nd)][::-1]  # F.pad lists the last axis first
    return algebra.zero_pad_as_conv(x_shape[1], tuple(pairs))


def apply_layout(node: fx.Node, tensor: Tensor, facts: GraphFacts) -> Tensor:
    """Run the layout op of ``node`` on ``tensor`` in place of its input (other args as recorded)."""
    data = node.args[0]
    tensor = tensor.contiguous()  # the values are what matter: a view needs no particular strides
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: tensor if n is data else facts.values[n])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


