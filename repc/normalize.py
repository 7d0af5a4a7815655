"""One table from fx nodes to canonical meanings.

Module calls, functional calls, tensor methods and operators all map onto a handful of
meanings, with their weights resolved to float64 constants:

* :class:`AffineCall` -- ``op(input)`` for a canonical :mod:`repc.ops` op;
* :class:`Combine` -- ``sum_i c_i * input_i`` (add, sub, alpha);
* :class:`Concat` -- ``cat(inputs, axis)``;
* :class:`Slice` -- ``input[..., start:stop, ...]`` on one axis (getitem, narrow, split, chunk);
* :class:`Constant` -- a value computed from parameters and constants only (folded here);
* ``None`` -- anything else: the node stays as it is, and :func:`describe` can say why.

Nothing here mutates the graph; :func:`functionalize_inplace` is the one exception and runs
on repc's private copy before analysis.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import algebra
from .ops import AffineOp, Conv, Elementwise, Linear, as_float64, identity


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


Meaning = Any  # one of the above, or None


class Opaque(Exception):
    """The node is not in the canonical vocabulary; the message says why."""


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


# ----------------------------------------------------------------------------- helpers

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
    w = as_float64(weight)
    nd = w.dim() - 2
    kernel = tuple(w.shape[2:])
    dil = _tuple(dilation, nd)
    return Conv(w, as_float64(bias), _tuple(stride, nd), _conv_padding(padding, kernel, dil), dil,
                int(groups), padding_mode)


def _elementwise(shape, scale=None, shift=None) -> Elementwise:
    """``x * scale + shift`` for constants that broadcast to ``shape`` without enlarging it."""
    ndim = len(shape)

    def full(t):
        if t is None:
            return None
        t = as_float64(t)
        if t.dim() > ndim:
            raise Opaque("a constant with more dimensions than the activation")
        t = t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))
        if torch.broadcast_shapes(t.shape, shape) != torch.Size(shape):
            raise Opaque("a constant that broadcasts the activation to a larger shape")
        return t

    return Elementwise(full(scale), full(shift), tuple(shape))


def _bn(x_shape, mean, var, eps, weight, bias) -> Elementwise:
    if mean is None or var is None:
        raise Opaque("batch norm without running statistics uses batch statistics")
    if len(x_shape) < 2:
        raise Opaque("batch norm on a tensor without a channel axis")
    scale, shift = algebra.batchnorm_affine(as_float64(mean), as_float64(var), float(eps),
                                            as_float64(weight), as_float64(bias))
    view = (1, -1) + (1,) * (len(x_shape) - 2)
    return Elementwise(scale.reshape(view), shift.reshape(view), tuple(x_shape))


def _avg_pool(x_shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> Conv:
    nd = len(x_shape) - 2
    kernel = _tuple(kernel, nd)
    stride = _tuple(stride if stride not in (None, []) else kernel, nd)
    padding = _tuple(padding, nd)
    if ceil_mode:
        raise Opaque("avg-pool with ceil_mode has partial windows")
    if any(padding) and not count_include_pad:
        raise Opaque("avg-pool with count_include_pad=False divides border windows differently")
    return algebra.avg_pool_as_conv(x_shape[1], kernel, stride, padding, divisor)


def _zero_pad(x_shape, pad: Sequence[int]) -> Conv:
    pad = list(pad)
    nd = len(pad) // 2
    if len(x_shape) != nd + 2 or any(p < 0 for p in pad):
        raise Opaque("padding that is not a non-negative spatial padding of a (N, C, ...) tensor")
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(nd)][::-1]  # F.pad lists the last axis first
    return algebra.zero_pad_as_conv(x_shape[1], tuple(pairs))


def _is_all(t, value) -> bool:
    return t is not None and bool((t == value).all())


_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _module_meaning(mod: nn.Module, x: fx.Node, x_shape, facts: GraphFacts) -> Meaning:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return AffineCall(x, make_conv(mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation,
                                       mod.groups, mod.padding_mode))
    if isinstance(mod, nn.Linear):
        return AffineCall(x, Linear(as_float64(mod.weight), as_float64(mod.bias)))
    if isinstance(mod, _BATCHNORMS):
        if mod.training and mod.track_running_stats:
            raise Opaque("batch norm in training mode")
        return AffineCall(x, _bn(x_shape, mod.running_mean, mod.running_var, mod.eps,
                                 mod.weight if mod.affine else None, mod.bias if mod.affine else None))
    if isinstance(mod, _IDENTITY_MODULES):
        if mod.training and not isinstance(mod, nn.Identity):
            raise Opaque("dropout in training mode")
        return AffineCall(x, identity(x_shape))
    if isinstance(mod, nn.LeakyReLU) and mod.negative_slope == 1.0:
        return AffineCall(x, identity(x_shape))
    if isinstance(mod, nn.PReLU) and _is_all(mod.weight, 1.0):
        return AffineCall(x, identity(x_shape))
    if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return AffineCall(x, _avg_pool(x_shape, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                                       mod.count_include_pad, getattr(mod, "divisor_override", None)))
    if isinstance(mod, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
        if float(mod.value) != 0.0:
            raise Opaque("constant padding with a non-zero value")
        return AffineCall(x, _zero_pad(x_shape, mod.padding))
    raise Opaque(f"module {type(mod).__name__} is not an affine map repc knows")


def _has_node(value) -> bool:
    """Whether arguments (nested in tuples, lists, dicts) hold a graph value, e.g. a size read at run time."""
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _bind(args, kwargs, names: Sequence[str], defaults: Dict[str, Any]) -> Dict[str, Any]:
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


_CONVS = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d}
_ADD = {operator.add, torch.add, "add", operator.iadd}
_SUB = {operator.sub, torch.sub, "sub", operator.isub, torch.subtract}
_MUL = {operator.mul, torch.mul, "mul", operator.imul, torch.multiply}
_DIV = {operator.truediv, torch.div, "div", operator.itruediv, torch.true_divide}
_NEG = {operator.neg, torch.neg, "neg"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_PASS = {"contiguous", "clone", operator.pos, torch.clone}
_CASTS = {"to", "type", "type_as", "float", "double", "half", "bfloat16"}


def _same_tensor_kind(out, x) -> bool:
    """Whether a cast's example output has the dtype, device and shape of its input: it changed nothing."""
    return isinstance(out, Tensor) and isinstance(x, Tensor) and out.dtype == x.dtype and \
        out.device == x.device and out.shape == x.shape
_LAYOUT = {torch.transpose, torch.permute, torch.flatten, torch.reshape, torch.unflatten, torch.swapaxes,
           torch.squeeze, torch.unsqueeze, "transpose", "permute", "flatten", "reshape", "view", "reshape_as",
           "view_as", "unflatten", "swapaxes", "squeeze", "unsqueeze", "t"}
_RANDOM = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
           torch.bernoulli, torch.multinomial, torch.normal, torch.randperm, F.dropout, F.dropout1d,
           F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout,
           "uniform_", "normal_", "bernoulli_", "random_", "exponential_"}


def _target_key(node: fx.Node):
    return node.target if node.op == "call_function" else (node.target if node.op == "call_method" else None)


def _split_ranges(size: int, node: fx.Node) -> List[Tuple[int, int]]:
    """[(start, stop)...] of the pieces of a chunk/split node over an axis of ``size``."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    args = list(node.args[1:])
    if name == "chunk":
        b = _bind(args, node.kwargs, ["chunks", "dim"], {"dim": 0})
        step = -(-size // b["chunks"])
        sizes = [min(step, size - s) for s in range(0, size, step)]
    else:
        b = _bind(args, node.kwargs, ["split_size_or_sections", "dim"], {"dim": 0})
        sec = b.get("split_size_or_sections", b.get("split_size"))
        sizes = [min(sec, size - s) for s in range(0, size, sec)] if isinstance(sec, int) else list(sec)
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return bounds


def _slice_of(x: fx.Node, index, x_shape) -> Slice:
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is None for i in index):
        raise Opaque("indexing that adds axes")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(x_shape) - len(index) + 1) + index[at + 1:]
    cut = [(axis, s) for axis, s in enumerate(index) if s != slice(None)]
    if len(cut) != 1 or not isinstance(cut[0][1], slice) or cut[0][1].step not in (None, 1):
        raise Opaque("indexing other than one contiguous slice on one axis")
    axis, s = cut[0]
    start, stop, _ = s.indices(x_shape[axis])
    return Slice(x, axis, start, max(start, stop))


def describe(node: fx.Node, facts: GraphFacts) -> Meaning:
    """The canonical meaning of ``node``; raises :class:`Opaque` with the reason if none."""
    if node.op in ("placeholder", "output"):
        raise Opaque(f"{node.op}")
    if node.op == "get_attr":
        return Constant(_fetch_attr(facts.gm, node.target))
    args, kwargs = node.args, node.kwargs
    key = _target_key(node)
    flat: List[fx.Node] = []
    fx.node.map_arg((args, kwargs), flat.append)
    if all(a in facts.constants for a in flat) and key not in _RANDOM and (flat or node.op == "call_module"):
        # computed from parameters and constants only (GLoRA weights, a parametrization, a fixed gate)
        if node.op != "call_module" or not _is_random_module(facts.modules[node.target]):
            return Constant(_evaluate(node, facts))
    if node.op == "call_module":
        mod = facts.modules[node.target]
        if not args or not isinstance(args[0], fx.Node):
            raise Opaque("module called without a tensor input")
        if len(args) != 1 or kwargs:
            raise Opaque(f"module {type(mod).__name__} called with several arguments")
        return _module_meaning(mod, args[0], facts.shape(args[0]), facts)
    x = args[0] if args else None
    x_shape = facts.shape(x) if isinstance(x, fx.Node) else None
    if key in _CONVS:
        b = _bind(args[1:], kwargs, ["weight", "bias", "stride", "padding", "dilation", "groups"],
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        w, bias = facts.const(b["weight"]), b["bias"]
        if w is None or (bias is not None and facts.const(bias) is None):
            raise Opaque("conv whose weight or bias depends on the input")
        return AffineCall(x, make_conv(w, None if bias is None else facts.const(bias), b["stride"],
                                       b["padding"], b["dilation"], b["groups"]))
    if key in (F.linear, torch._C._nn.linear):
        b = _bind(args[1:], kwargs, ["weight", "bias"], {"bias": None})
        w, bias = facts.const(b["weight"]), b["bias"]
        if w is None or (bias is not None and facts.const(bias) is None):
            raise Opaque("linear whose weight or bias depends on the input")
        return AffineCall(x, Linear(as_float64(w), None if bias is None else as_float64(facts.const(bias))))
    if key in (torch.addmm, "addmm"):  # GPT-2's Conv1D: addmm(bias, x.view(-1, nx), weight)
        b = _bind(args, kwargs, ["input", "mat1", "mat2"], {})
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
        bias, w = facts.const(b["input"]), facts.const(b["mat2"])
        if w is None or bias is None or w.dim() != 2 or facts.is_const(b["mat1"]) or bias.dim() > 1 and bias.shape[0] != 1:
            raise Opaque("addmm other than a constant bias plus an activation times a constant matrix")
        if not isinstance(b["mat1"], fx.Node):
            raise Opaque("addmm of a non-tensor")
        return AffineCall(b["mat1"], Linear(alpha * as_float64(w).T.contiguous(),
                                            beta * as_float64(bias).reshape(-1).expand(w.shape[1]).clone()))
    if key in (torch.matmul, operator.matmul, "matmul", torch.mm, "mm") and len(args) == 2:
        w = facts.const(args[1])
        if w is None or w.dim() != 2 or facts.is_const(args[0]):
            raise Opaque("matmul of two activations")
        return AffineCall(args[0], Linear(as_float64(w).T.contiguous(), None))
    if key is F.batch_norm:
        b = _bind(args[1:], kwargs, ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
                  {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
        return _functional_bn(x, x_shape, b, facts)
    if key is torch.batch_norm:
        b = _bind(args[1:], kwargs, ["weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                                     "cudnn_enabled"], {})
        return _functional_bn(x, x_shape, b, facts)
    if key in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout):
        b = _bind(args[1:], kwargs, ["p", "training", "inplace"], {"p": 0.5, "training": key is not torch.dropout})
        if b["training"]:
            raise Opaque("dropout with training=True is random")
        return AffineCall(x, identity(x_shape))
    if key in (F.leaky_relu,):
        b = _bind(args[1:], kwargs, ["negative_slope", "inplace"], {"negative_slope": 0.01})
        if b["negative_slope"] == 1.0:
            return AffineCall(x, identity(x_shape))
        raise Opaque("leaky_relu with a slope other than 1 is not affine")
    if key in (F.prelu, torch.prelu):
        if _is_all(facts.const(args[1]), 1.0):
            return AffineCall(x, identity(x_shape))
        raise Opaque("prelu with a weight other than 1 is not affine")
    if key in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d):
        b = _bind(args[1:], kwargs, ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"],
                  {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
        if _has_node(b):
            raise Opaque("a pooling window computed from the input's size at run time, not one fixed map")
        return AffineCall(x, _avg_pool(x_shape, b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"],
                                       b["count_include_pad"], b["divisor_override"]))
    if key in (F.pad, torch._C._nn.pad):
        b = _bind(args[1:], kwargs, ["pad", "mode", "value"], {"mode": "constant", "value": None})
        if b["mode"] != "constant" or (b["value"] not in (None, 0, 0.0)):
            raise Opaque("padding that is not constant zero")
        return AffineCall(x, _zero_pad(x_shape, b["pad"]))
    if key in _PASS:
        return AffineCall(x, identity(x_shape))
    if key in _CASTS and isinstance(x, fx.Node) and _same_tensor_kind(facts.values.get(node), facts.values.get(x)):
        return AffineCall(x, identity(x_shape))  # a cast to the dtype and device it already has (peft's LoRA)
    if key in _ADD | _SUB:
        return _add_or_sub(node, key in _SUB, facts)
    if key in _MUL:
        a, c = args[0], args[1]
        if facts.is_const(a):
            a, c = c, a
        if facts.is_const(a) or facts.const(c) is None:
            if isinstance(facts.values.get(c), torch.Tensor) and isinstance(facts.values.get(a), torch.Tensor):
                raise Opaque("product of two activations")
            raise Opaque("product with a number computed at run time (e.g. from a shape)")
        return AffineCall(a, _elementwise(facts.shape(a), scale=facts.const(c)))
    if key in _DIV:
        if kwargs.get("rounding_mode") is not None or facts.const(args[1]) is None or facts.is_const(args[0]):
            raise Opaque("division by an activation or with rounding")
        return AffineCall(x, _elementwise(x_shape, scale=1.0 / facts.const(args[1]).to(torch.float64)))
    if key in _NEG:
        return AffineCall(x, _elementwise(x_shape, scale=torch.tensor(-1.0, dtype=torch.float64)))
    if key in _CAT or key == "cat":
        b = _bind(args, kwargs, ["tensors", "dim"], {"dim": 0})
        tensors = list(b["tensors"])
        if not all(isinstance(t, fx.Node) and not facts.is_const(t) for t in tensors):
            raise Opaque("concatenation with constants")
        ndim = len(facts.shape(tensors[0]))
        return Concat(tensors, b["dim"] % ndim)
    if key is operator.getitem:
        src = args[0]
        if src.op in ("call_function", "call_method") and _name(src) in ("chunk", "split"):
            base = src.args[0]
            shape = facts.shape(base)
            if shape is None:
                raise Opaque("split of a value that is not a tensor")
            dim = _bind(list(src.args[1:]), src.kwargs, ["_", "dim"], {"dim": 0})["dim"] % len(shape)
            start, stop = _split_ranges(shape[dim], src)[args[1]]
            return Slice(base, dim, start, stop)
        if x_shape is None:
            raise Opaque("indexing a value that is not a tensor")
        return _slice_of(x, args[1], x_shape)
    if key in (torch.mean, torch.sum, "mean", "sum") and isinstance(x, fx.Node) and x.op == "call_function" \
            and x.target is torch.stack:
        return _reduce_stack(node, x, key in (torch.mean, "mean"), facts)
    if key in _LAYOUT and isinstance(x, fx.Node) and x_shape is not None:
        return Layout(x, node)
    if key in (torch.narrow, "narrow"):
        b = _bind(args[1:], kwargs, ["dim", "start", "length"], {})
        dim = b["dim"] % len(x_shape)
        return Slice(x, dim, b["start"], b["start"] + b["length"])
    raise Opaque(f"{node.op} {_name(node)} is not an affine map repc knows")


def _reduce_stack(node: fx.Node, stack: fx.Node, mean: bool, facts: GraphFacts) -> Combine:
    """``stack(xs, d).mean(d)`` / ``.sum(d)``: a weighted sum of the stacked values."""
    b = _bind(node.args[1:], node.kwargs, ["dim", "keepdim"], {"dim": None, "keepdim": False})
    s = _bind(stack.args, stack.kwargs, ["tensors", "dim"], {"dim": 0})
    tensors = list(s["tensors"])
    ndim = len(facts.shape(stack))
    dim = b["dim"]
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or dim % ndim != s["dim"] % ndim or b["keepdim"] or node.kwargs.get("dtype"):
        raise Opaque("reduction that is not over the stacking axis")
    if not all(isinstance(t, fx.Node) and not facts.is_const(t) for t in tensors):
        raise Opaque("stack with constants")
    weight = 1.0 / len(tensors) if mean else 1.0
    return Combine([(t, weight) for t in tensors])


def apply_layout(node: fx.Node, tensor: Tensor, facts: GraphFacts) -> Tensor:
    """Run the layout op of ``node`` on ``tensor`` in place of its input (other args as recorded)."""
    data = node.args[0]
    tensor = tensor.contiguous()  # the values are what matter: a view needs no particular strides
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: tensor if n is data else facts.values[n])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _functional_bn(x, x_shape, b, facts: GraphFacts) -> Meaning:
    if b.get("training"):
        raise Opaque("batch_norm with training=True uses batch statistics")
    vals = {k: (facts.const(b[k]) if b.get(k) is not None else None)
            for k in ("running_mean", "running_var", "weight", "bias")}
    for k in vals:
        if b.get(k) is not None and vals[k] is None:
            raise Opaque(f"batch_norm whose {k} depends on the input")
    return AffineCall(x, _bn(x_shape, vals["running_mean"], vals["running_var"], b["eps"], vals["weight"], vals["bias"]))


def _add_or_sub(node: fx.Node, subtract: bool, facts: GraphFacts) -> Meaning:
    a, c = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    sign = -float(alpha) if subtract else float(alpha)
    a_const, c_const = facts.is_const(a), facts.is_const(c)
    if a_const and c_const:
        raise Opaque("sum of constants")
    if c_const:
        value = facts.const(c)
        if value is None:
            raise Opaque("adding a non-tensor constant")
        return AffineCall(a, _elementwise(facts.shape(a), shift=value * sign))
    if a_const:
        value = facts.const(a)
        if value is None:
            raise Opaque("adding a non-tensor constant")
        return AffineCall(c, _elementwise(facts.shape(c), scale=torch.tensor(sign, dtype=torch.float64), shift=value))
    if facts.shape(a) != facts.shape(c):
        raise Opaque("sum of activations of different shapes (broadcasting)")
    return Combine([(a, 1.0), (c, sign)])


def _fetch_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _evaluate(node: fx.Node, facts: GraphFacts):
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: facts.constants[n])
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return facts.modules[node.target](*args, **kwargs)
    raise Opaque("cannot evaluate")


def _is_random_module(mod: nn.Module) -> bool:
    return mod.training or isinstance(mod, _IDENTITY_MODULES[1:]) or isinstance(mod, nn.RReLU)


def constant_facts(gm: fx.GraphModule, values: Optional[Dict[fx.Node, Any]] = None) -> GraphFacts:
    """Facts about ``gm`` with every constant known: parameters and buffers, and the values
    computed from them only (a gate's softmax, a BN's zero response)."""
    facts = GraphFacts(gm, values)
    for node in gm.graph.nodes:
        try:
            meaning = describe(node, facts)
        except Exception:
            continue
        if isinstance(meaning, Constant):
            facts.constants[node] = meaning.value
    return facts


# ----------------------------------------------------------------------------- normalization layers

NORM_CORE = "repc_norm_core"  # node.meta key: (function, normalized axes, where) of a norm without affine
NORM_AFFINE = "repc_norm_affine"  # node.meta key: the norm whose affine tail this node is


def split_norm_affine(gm: fx.GraphModule) -> int:
    """Write ``LayerNorm``/``GroupNorm`` with affine parameters as the bare norm then ``* w + b``.

    ``LN(x; w, b) = LN(x) * w + b`` (and per channel for GroupNorm): the affine tail is then an
    ordinary elementwise map that folds into the next linear or conv (RepQ-ViT's scales, LN
    affine into the following projection).  Where nothing absorbs it, the writer puts it back
    into the norm (see ``NORM_CORE``).  Runs on repc's own copy.  Returns how many were split.
    """
    modules = dict(gm.named_modules())
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        spec = None
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            mod = modules[node.target]
            if isinstance(mod, nn.LayerNorm) and mod.weight is not None:
                spec = (F.layer_norm, (list(mod.normalized_shape), None, None, mod.eps), mod.weight, mod.bias,
                        len(mod.normalized_shape), "last")
            elif isinstance(mod, nn.GroupNorm) and mod.affine:
                spec = (F.group_norm, (mod.num_groups, None, None, mod.eps), mod.weight, mod.bias, 1, "channel")
        elif node.op == "call_function" and node.target is F.layer_norm:
            b = _bind(node.args[1:], node.kwargs, ["normalized_shape", "weight", "bias", "eps"],
                      {"weight": None, "bias": None, "eps": 1e-5})
            w, bias = b["weight"], b["bias"]
            if isinstance(w, fx.Node) and w.op == "get_attr" and (bias is None or isinstance(bias, fx.Node) and bias.op == "get_attr"):
                spec = (F.layer_norm, (list(b["normalized_shape"]), None, None, b["eps"]),
                        _fetch_attr(gm, w.target), None if bias is None else _fetch_attr(gm, bias.target),
                        len(b["normalized_shape"]), "last")
        if spec is None:
            continue
        fn, rest, weight, bias, naxes, where = spec
        x = node.args[0]
        meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        if meta is None:
            continue
        ndim = len(meta.shape)
        with graph.inserting_before(node):
            core = graph.call_function(fn, (x,) + tuple(rest))
            core.meta[NORM_CORE] = (fn, naxes, where)
            core.meta.update({k: v for k, v in node.meta.items() if k == "tensor_meta"})
            out = graph.call_function(operator.mul, (core, _constant_node(gm, graph, weight, ndim, where)))
            out.meta[NORM_AFFINE] = node.name
            if bias is not None:
                out = graph.call_function(operator.add, (out, _constant_node(gm, graph, bias, ndim, where)))
                out.meta[NORM_AFFINE] = node.name
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def _constant_node(gm, graph, tensor, ndim, where):
    value = tensor.detach()
    if where == "channel":
        value = value.reshape((-1,) + (1,) * (ndim - 2))  # broadcast over the spatial axes of (N, C, *)
    return _buffer_node(gm, graph, value, value.dtype)


def fold_border_fill(gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> int:
    """Zero padding whose whole border is then filled with a per-channel constant ``c``
    (DBB's BN-and-pad: ``y = F.pad(bn(x), p); y[:, :, :p, :] = c; ...``) as canonical ops.

    Padding with the value ``c`` is ``pad_c(y) = pad_0(y - c) + c``: a shift, a zero pad and a
    shift, which compose with what comes before and after (when ``c`` is the BN's output for a
    zero input, the first shift cancels the BN's bias and the padded border stays exact).
    The fills must cover exactly the padded border, with one constant, before anything else
    reads the padded value.  Runs on repc's own copy; returns how many paddings were rewritten.
    """
    graph = gm.graph
    if not any(n.op == "call_function" and n.target is operator.setitem for n in graph.nodes):
        return 0
    facts = constant_facts(gm, values)
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (F.pad, torch._C._nn.pad):
            continue
        fills = [u for u in node.users if u.op == "call_function" and u.target is operator.setitem and u.args[0] is node]
        shape = facts.shape(node)
        if not fills or shape is None or len(shape) < 3:
            continue
        b = _bind(node.args[1:], node.kwargs, ["pad", "mode", "value"], {"mode": "constant", "value": None})
        if b["mode"] != "constant" or b["value"] not in (None, 0, 0.0):
            continue
        readers = [u for u in node.users if u not in fills]
        if readers and min(order[r] for r in readers) < max(order[f] for f in fills):
            continue  # something reads the padding before it is filled
        constant = _border_constant(fills, b["pad"], shape, facts)
        if constant is None:
            continue
        view = (-1,) + (1,) * (len(shape) - 2)
        dtype = getattr(node.meta.get("tensor_meta"), "dtype", torch.float32)
        with graph.inserting_before(node):
            c = _buffer_node(gm, graph, constant.reshape(view), dtype)
            shifted = graph.call_function(operator.sub, (node.args[0], c))
            padded = graph.call_function(F.pad, (shifted, list(b["pad"])))
            filled = graph.call_function(operator.add, (padded, c))
        for r in readers:
            r.replace_input_with(node, filled)
        for f in fills:
            graph.erase_node(f)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def _border_constant(fills, pad, shape, facts: GraphFacts) -> Optional[Tensor]:
    """The per-channel constant the fills write, if they write exactly the padded border."""
    nd = len(pad) // 2
    if nd != len(shape) - 2:
        return None
    spatial = tuple(shape[2:])
    written = torch.zeros(spatial, dtype=torch.bool)
    value = None
    for f in fills:
        key, v = f.args[1], facts.const(f.args[2])
        if v is None or not isinstance(key, tuple) or len(key) != len(shape) or key[:2] != (slice(None), slice(None)):
            return None
        if v.numel() != shape[1] or any(n != 1 for i, n in enumerate(v.shape) if i != v.dim() - len(shape) + 1):
            return None
        v = v.reshape(-1)
        if value is not None and not torch.equal(v, value):
            return None
        value = v
        try:
            written[key[2:]] = True
        except Exception:
            return None
    border = torch.ones(spatial, dtype=torch.bool)
    pairs = [(pad[2 * i], pad[2 * i + 1]) for i in range(nd)][::-1]  # F.pad lists the last axis first
    border[tuple(slice(lo, size - hi) for (lo, hi), size in zip(pairs, spatial))] = False
    return value if torch.equal(written, border) else None


def push_scales_into_concat(gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> int:
    """``E(cat([a, b], axis)) = cat([E_a(a), E_b(b)], axis)`` for a per-channel map ``E`` on that axis.

    ``E_i`` is ``E``'s rows for part ``i``.  Written this way, a BatchNorm after a depth
    concatenation folds into the branch convs even when stacking the branches into one conv
    does not pay.  Done only where a part is a conv or linear map that nothing else reads (so
    the piece of ``E`` has somewhere to go).  Runs on repc's own copy; returns how many.
    """
    graph = gm.graph
    if not any(n.op == "call_function" and n.target in _CAT and len(n.users) == 1 for n in graph.nodes):
        return 0
    facts = constant_facts(gm, values)
    count = 0
    for node in list(graph.nodes):
        cat = node.args[0] if node.args else None
        if not (isinstance(cat, fx.Node) and cat.op == "call_function" and cat.target in _CAT and len(cat.users) == 1):
            continue
        try:
            meaning = describe(node, facts)
            b = _bind(cat.args, cat.kwargs, ["tensors", "dim"], {"dim": 0})
            parts, ndim = list(b["tensors"]), len(facts.shape(cat))
            axis = b["dim"] % ndim
            if not (isinstance(meaning, AffineCall) and isinstance(meaning.op, Elementwise) and meaning.input is cat):
                continue
            scale, shift = meaning.op.channel_vectors(axis)
        except Exception:
            continue
        if any(facts.shape(p) is None for p in parts) or not any(_is_single_use_map(p, facts) for p in parts):
            continue
        dtype = getattr(node.meta.get("tensor_meta"), "dtype", torch.float32)
        with graph.inserting_before(node):
            pieces, start = [], 0
            for part in parts:
                size = facts.shape(part)[axis]
                view = (size,) + (1,) * (ndim - 1 - axis)
                rows = slice(start, start + size)
                piece = graph.call_function(operator.mul, (part, _buffer_node(gm, graph, scale[rows].reshape(view), dtype)))
                piece = graph.call_function(operator.add, (piece, _buffer_node(gm, graph, shift[rows].reshape(view), dtype)))
                piece.meta["tensor_meta"] = part.meta.get("tensor_meta")
                pieces.append(piece)
                start += size
            joined = graph.call_function(torch.cat, (pieces, axis))
            joined.meta["tensor_meta"] = node.meta.get("tensor_meta")  # (a later concat may read it)
        node.replace_all_uses_with(joined)
        graph.erase_node(node)
        graph.erase_node(cat)
        count += 1
    if count:
        gm.recompile()
    return count


_METADATA_ATTRIBUTES = {"dtype", "device"}  # the same on every input (the model's dtype and device)
_SHAPE_READS = {"size", "dim", "ndimension"}  # methods; and the attributes "shape" and "ndim"
_RANK_READS = {"ndim", "dim", "ndimension"}


def detach_metadata_reads(gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> int:
    """Keep reads of a value's dtype, device or shape from pinning that value.

    ``result.dtype`` (peft's LoRA) becomes the dtype itself, and ``y.ndim`` / ``y.dim()`` (a
    library norm's rank assert on a conv's output) the rank, except for an input's.
    ``x.shape`` / ``x.size()`` (timm's ``B, N, C = x.shape`` after a LayerNorm) is moved up the
    elementwise maps and sums that computed ``x`` with its shape, when it arrives at a value no
    region absorbs (the norm's core): ``x`` is then read only by what consumes its values and
    can be folded away.  Runs on repc's own copy; returns how many reads moved.
    """
    graph = gm.graph
    facts = None
    count = 0
    for node in list(graph.nodes):
        target = metadata_read(node)
        if target is None:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        if target in _METADATA_ATTRIBUTES | _RANK_READS:
            value = values.get(node)
            # an input's dtype or rank may differ from call to call; everything else follows the
            # weights (a dtype) or does not depend on the sizes (a rank: a norm's ``x.ndim == 4``)
            if isinstance(value, (torch.dtype, torch.device, int)) and not isinstance(value, bool) \
                    and source.op != "placeholder":
                for user in list(node.users):
                    user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
                    user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
                graph.erase_node(node)
                count += 1
            continue
        facts = facts or constant_facts(gm, values)
        start = source
        while _foldable_into_readers(source, facts):
            earlier = _same_shape_input(source, facts)
            if earlier is None:
                break
            source = earlier
        if source is not start and not _has_affine_meaning(source, facts):
            # moved onto a value no region absorbs (a norm's core, an activation, an input);
            # a conv or linear output would be pinned by the read instead.  Never past a value
            # several ops read (it stays a source): a region would read the shape of a value
            # beyond its sources, and its check at another size would see the example's shape
            node.replace_input_with(start, source)
            count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def _foldable_into_readers(node: fx.Node, facts: GraphFacts) -> bool:
    """The ops that read ``node``'s values (not only its shape, dtype or device) can take it
    into their regions: there is one, or all are conv or linear maps of it."""
    readers = [u for u in node.users if metadata_read(u) is None]
    if len(readers) <= 1:
        return True
    for reader in readers:
        try:
            meaning = describe(reader, facts)
        except Exception:
            return False
        if not (isinstance(meaning, AffineCall) and meaning.input is node and isinstance(meaning.op, (Conv, Linear))):
            return False
    return True


def _has_affine_meaning(node: fx.Node, facts: GraphFacts) -> bool:
    try:
        return not isinstance(describe(node, facts), Constant)
    except Exception:
        return False


def metadata_read(node: fx.Node) -> Optional[str]:
    """"dtype" / "device" / "shape" ... when ``node`` reads that of its first argument, else None."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in _METADATA_ATTRIBUTES | {"shape", "ndim"}:
        return node.args[1]
    if node.op == "call_method" and node.target in _SHAPE_READS:
        return node.target
    return None


def _same_shape_input(node: fx.Node, facts: GraphFacts) -> Optional[fx.Node]:
    """The input of the elementwise map or sum that computes ``node``, when it has ``node``'s shape."""
    try:
        meaning = describe(node, facts)
    except Exception:
        return None
    if isinstance(meaning, AffineCall) and isinstance(meaning.op, Elementwise):
        candidate = meaning.input
    elif isinstance(meaning, Combine) and meaning.terms:
        candidate = meaning.terms[0][0]
    else:
        return None
    shape = facts.shape(node)
    return candidate if shape is not None and facts.shape(candidate) == shape else None


def expand_weighted_stacks(gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> int:
    """``sum_e w[e] * out_e`` written over a stack becomes the explicit weighted sum.

    Expert mixtures with constant gates combine their outputs as ``einsum('e,e...->...', w,
    stack(outs))``, ``(w.view(-1, 1, ...) * stack(outs)).sum(0)`` or ``stack(outs, -1) @ w``.
    Written ``w[0] * out_0 + ... + w[E-1] * out_{E-1}``, it is a sum the matcher merges.  Done
    where ``w`` is a constant with one number per expert and the stack has no other reader.
    Runs on repc's own copy; returns how many.
    """
    graph = gm.graph
    if not any(n.op == "call_function" and n.target is torch.stack for n in graph.nodes):
        return 0
    facts = constant_facts(gm, values)
    count = 0
    for node in list(graph.nodes):
        found = _weighted_stack(node, facts)
        if found is None:
            continue
        stack, weights, dead = found
        outs = list(stack.args[0]) if stack.args else list(stack.kwargs["tensors"])
        with graph.inserting_before(node):
            total = None
            for out, w in zip(outs, weights):
                term = graph.call_function(operator.mul, (out, w))
                total = term if total is None else graph.call_function(operator.add, (total, term))
        node.replace_all_uses_with(total)
        for n in [node] + dead:
            if not n.users:
                graph.erase_node(n)
        count += 1
    if count:
        gm.recompile()
    return count


def _weighted_stack(node: fx.Node, facts: GraphFacts):
    """(the stack, one weight per expert, the nodes the sum replaces) if ``node`` is a weighted
    sum over a stack's axis with constant weights, else None."""
    def stacked(n, axis=None):
        if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is torch.stack and len(n.users) == 1):
            return None
        b = _bind(n.args, n.kwargs, ["tensors", "dim"], {"dim": 0})
        ndim = len(facts.shape(n) or ())
        if not ndim or (axis is not None and b["dim"] % ndim != axis % ndim):
            return None
        return n, b["dim"] % ndim, ndim

    def vector(arg, size):
        w = facts.const(arg) if isinstance(arg, fx.Node) else None
        if w is None or w.numel() != size:
            return None
        return [float(v) for v in w.reshape(-1).to(torch.float64)]

    key = _target_key(node)
    if key in (torch.einsum, "einsum") and len(node.args) == 3 and isinstance(node.args[0], str):
        equation = node.args[0].replace(" ", "")
        inputs, _, output = equation.partition("->")
        parts = inputs.split(",")
        for w_at, s_at in ((1, 2), (2, 1)):
            found = stacked(node.args[s_at], 0)
            if found is None or len(parts) != 2:
                continue
            w_sub, s_sub = parts[w_at - 1], parts[s_at - 1]
            if len(w_sub) == 1 and s_sub[:1] == w_sub and s_sub[1:] == output and w_sub not in output:
                weights = vector(node.args[w_at], len(found[0].args[0]))
                if weights is not None:
                    return found[0], weights, []
        return None
    if key in (torch.sum, "sum") and node.args and isinstance(node.args[0], fx.Node):
        b = _bind(node.args[1:], node.kwargs, ["dim", "keepdim"], {"dim": None, "keepdim": False})
        product = node.args[0]
        if b["keepdim"] or not isinstance(b["dim"], int) or _target_key(product) not in (operator.mul, torch.mul, "mul") \
                or len(product.users) != 1 or len(product.args) != 2:
            return None
        for s_at in (0, 1):
            found = stacked(product.args[s_at], b["dim"])
            w = facts.const(product.args[1 - s_at]) if isinstance(product.args[1 - s_at], fx.Node) else None
            if found is None or w is None:
                continue
            stack, axis, ndim = found
            if w.dim() > ndim or any(n != 1 for i, n in enumerate(w.shape[::-1]) if ndim - 1 - i != axis):
                continue
            weights = vector(product.args[1 - s_at], len(stack.args[0]))
            if weights is not None:
                return stack, weights, [product]
        return None
    if key in (operator.matmul, torch.matmul, "matmul") and len(node.args) == 2:
        found = stacked(node.args[0], -1)
        weights = vector(node.args[1], len(found[0].args[0])) if found is not None else None
        if weights is not None and facts.const(node.args[1]).dim() == 1:
            return found[0], weights, []
    return None


_FLATTENS = {"view", "reshape", "flatten"}


def push_linears_before_flattens(gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> int:
    """``L(h.view(-1, C)) = flatten(L(h), 0, -2)`` for a linear map ``L`` on the last axis.

    GPT-2's ``Conv1D`` (and code that flattens tokens for a 2-D matmul) puts a reshape between
    a norm's affine and the linear layer; with the linear moved before it, the affine folds
    into the linear, and the reshape back to tokens after it meets the flatten and cancels.
    Done where the reshape keeps the last axis, gives a 2-D value and has no other reader.
    Runs on repc's own copy; returns how many.
    """
    graph = gm.graph
    if not any(_name(n) in _FLATTENS for n in graph.nodes if n.op in ("call_function", "call_method")):
        return 0
    facts = None
    count = 0
    for node in list(graph.nodes):
        if not (node.op in ("call_function", "call_method", "call_module") and node.all_input_nodes):
            continue
        if not any(_name(a) in _FLATTENS for a in node.all_input_nodes if a.op in ("call_function", "call_method")):
            continue
        facts = facts or constant_facts(gm, values)
        try:
            meaning = describe(node, facts)
        except Exception:
            continue
        if not (isinstance(meaning, AffineCall) and isinstance(meaning.op, Linear)):
            continue
        flat = meaning.input
        try:
            layout = describe(flat, facts)
        except Exception:
            continue
        h = layout.input if isinstance(layout, Layout) else None
        h_shape, flat_shape = facts.shape(h) if h is not None else None, facts.shape(flat)
        if h_shape is None or flat_shape is None or len(flat_shape) != 2 or len(h_shape) < 3 \
                or flat_shape[-1] != h_shape[-1] or len(flat.users) != 1:
            continue
        dtype = getattr(node.meta.get("tensor_meta"), "dtype", torch.float32)
        op = meaning.op
        with graph.inserting_before(node):
            weight = _buffer_node(gm, graph, op.weight, dtype)
            bias = None if op.bias is None else _buffer_node(gm, graph, op.bias, dtype)
            mapped = graph.call_function(F.linear, (h, weight, bias))
            flattened = graph.call_function(torch.flatten, (mapped, 0, -2))
        node.replace_all_uses_with(flattened)
        graph.erase_node(node)
        if not flat.users:
            graph.erase_node(flat)
        count += 1
    if count:
        gm.recompile()
    return count


_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm"}


def push_scales_into_matmul(gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> int:
    """``(a @ b) * c = (a * c) @ b`` for a scalar ``c``.

    Attention often scales after the product: ``(q @ k.transpose(-2, -1)) * scale``, or
    ``/ math.sqrt(d)``.  Moved onto an operand that an affine region computes (q's projection)
    and that nothing else reads, the scale folds into that region's weights, and the multiply
    over the scores disappears.  When the operand is one slice of a map whose other slices are
    read too (a fused qkv projection read through ``chunk``, ``split`` or indexing), the scale
    goes on that map as a vector that is ``c`` on the slice and 1 elsewhere, so k and v are
    left as they were.  Without such an operand, the scale moves only onto an operand no
    larger than the product, so the result never costs more.  Runs on repc's own copy;
    returns how many.
    """
    graph = gm.graph
    if not any(_target_key(n) in _MATMULS for n in graph.nodes if n.op in ("call_function", "call_method")):
        return 0
    facts = constant_facts(gm, values)
    count = 0
    for node in list(graph.nodes):
        products = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op in ("call_function", "call_method")
                    and _target_key(a) in _MATMULS and len(a.users) == 1 and len(a.args) == 2 and not a.kwargs
                    and all(isinstance(o, fx.Node) for o in a.args)]
        if len(products) != 1:
            continue
        product = products[0]
        scale = _scalar_scale(node, product, facts)
        site = None if scale is None else _scale_target(product, facts)
        if site is None:
            continue
        target, part = site
        if part is None:
            reader = next(iter(target.users))  # the target's one reader: the product or the chain to it
            with graph.inserting_after(target):
                scaled = graph.call_function(operator.mul, (target, scale))
            reader.replace_input_with(target, scaled)
        else:
            readers = list(target.users)  # every one reads a slice: only the scaled one sees c
            with graph.inserting_after(target):
                vector = _buffer_node(gm, graph, _slice_scale(part, facts.shape(target), scale),
                                      values[target].dtype)
            with graph.inserting_after(vector):
                scaled = graph.call_function(operator.mul, (target, vector))
            for reader in readers:
                reader.replace_input_with(target, scaled)
        scaled.meta["tensor_meta"] = target.meta.get("tensor_meta")
        node.replace_all_uses_with(product)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def _slice_scale(part: Slice, shape: Sequence[int], scale: float) -> Tensor:
    """A tensor broadcasting over ``shape``: ``scale`` on ``part``'s range of its axis, 1 elsewhere."""
    vector = torch.ones(shape[part.axis], dtype=torch.float64)
    vector[part.start:part.stop] = scale
    return vector.reshape((-1,) + (1,) * (len(shape) - 1 - part.axis))


def _scalar_scale(node: fx.Node, product: fx.Node, facts: GraphFacts) -> Optional[float]:
    """The number ``c`` when ``node`` computes ``product * c`` (a multiply or a divide), else None."""
    try:
        meaning = describe(node, facts)
    except Exception:
        return None
    if not (isinstance(meaning, AffineCall) and meaning.input is product and isinstance(meaning.op, Elementwise)):
        return None
    op = meaning.op
    if op.shift is not None and bool((op.shift != 0).any()):
        return None
    if op.scale is None or op.scale.numel() != 1:
        return None
    return float(op.scale.reshape(()).to(torch.float64))


def _scale_target(product: fx.Node, facts: GraphFacts) -> Optional[Tuple[fx.Node, Optional[Slice]]]:
    """Where the scale of ``product`` goes: the map behind an operand, else the smaller operand.

    Returns ``(node, part)``: the scale multiplies all of ``node`` (``part`` None), or only the
    range ``part`` (a :class:`Slice` of ``node``) of it.  A scalar commutes with reshapes,
    transposes and slices, so on an operand that a conv or linear map computes through such
    views, nothing else reading them, it goes right after the map and folds into it.  Otherwise
    it goes on an operand no larger than the product.
    """
    maps = [m for m in (_map_behind(o, facts) for o in product.args if len(o.users) == 1) if m is not None]
    if maps:
        return min(maps, key=lambda m: _numel(m[0], facts))
    out = _numel(product, facts)
    small = [o for o in product.args if len(o.users) == 1 and _numel(o, facts) <= out]
    return (min(small, key=lambda o: _numel(o, facts)), None) if small else None


def _numel(node: fx.Node, facts: GraphFacts) -> float:
    shape = facts.shape(node)
    return math.inf if shape is None else math.prod(shape)


def _map_behind(node: fx.Node, facts: GraphFacts) -> Optional[Tuple[fx.Node, Optional[Slice]]]:
    """The conv or linear map (or sum or concat of them) that ``node`` is, seen through
    reshapes, transposes and slices that nothing else reads; None if there is none.

    Returns ``(map, None)``, or ``(map, slice)`` when ``node`` is one slice of the map and other
    slices of it are read too (q of a fused qkv projection): only that slice may be scaled.
    """
    while True:
        try:
            meaning = describe(node, facts)
        except Exception:
            return None
        if isinstance(meaning, Layout):
            if len(meaning.input.users) != 1:
                return None
            node = meaning.input
            continue
        if isinstance(meaning, Slice):
            via = node.args[0]  # the sliced value, or the chunk/split tuple the slice indexes
            if len(via.users) == 1 and len(meaning.input.users) == 1:
                node = meaning.input  # the only slice read: the rest is discarded
                continue
            if _feature_axis(meaning.input, facts) != meaning.axis or not _only_this_slice_overlaps(node, meaning, facts):
                return None
            return meaning.input, meaning
        if isinstance(meaning, AffineCall):
            return (node, None) if isinstance(meaning.op, (Conv, Linear)) else None
        return (node, None) if isinstance(meaning, (Combine, Concat)) else None


def _feature_axis(node: fx.Node, facts: GraphFacts, depth: int = 8) -> Optional[int]:
    """The axis along which a per-axis scale of ``node`` folds into the conv or linear maps that
    compute it (1 for a conv, the last axis for a linear, through elementwise maps, sums and
    concatenations); None when no such map computes ``node``."""
    shape = facts.shape(node)
    if shape is None or depth == 0:
        return None
    try:
        meaning = describe(node, facts)
    except Exception:
        return None
    if isinstance(meaning, AffineCall):
        if isinstance(meaning.op, Linear):
            return len(shape) - 1
        if isinstance(meaning.op, Conv):
            return 1
        if isinstance(meaning.op, Elementwise) and facts.shape(meaning.input) == shape:
            return _feature_axis(meaning.input, facts, depth - 1)
        return None
    if isinstance(meaning, (Combine, Concat)):
        parts = [t for t, _ in meaning.terms] if isinstance(meaning, Combine) else meaning.inputs
        axes = {_feature_axis(p, facts, depth - 1) if facts.shape(p) == shape or isinstance(meaning, Concat) else None
                for p in parts}
        return axes.pop() if len(axes) == 1 else None
    return None


def _only_this_slice_overlaps(node: fx.Node, part: Slice, facts: GraphFacts) -> bool:
    """Every reader of ``part.input`` reads a slice of it on ``part``'s axis (directly, or
    through a chunk/split), and none but ``node`` reads any of ``part``'s range."""
    base = part.input
    for user in base.users:
        if user.op in ("call_function", "call_method") and _name(user) in ("chunk", "split") and user.args[0] is base:
            readers = list(user.users)
        else:
            readers = [user]
        for reader in readers:
            if reader is node:
                continue
            try:
                other = describe(reader, facts)
            except Exception:
                return False
            if not isinstance(other, Slice) or other.input is not base or other.axis != part.axis:
                return False
            if other.start < part.stop and part.start < other.stop and other.stop > other.start:
                return False
    return True


def _is_single_use_map(node, facts: GraphFacts) -> bool:
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return False
    try:
        meaning = describe(node, facts)
    except Exception:
        return False
    return isinstance(meaning, AffineCall) and isinstance(meaning.op, (Conv, Linear))


def _buffer_node(gm, graph, value: Tensor, dtype):
    """A get_attr of ``value`` (cast to ``dtype``) registered on ``gm`` under a fresh name."""
    name, i = "_repc_constant", 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    gm.register_buffer(f"{name}_{i}", value.to(dtype).clone())
    return graph.get_attr(f"{name}_{i}")


# ----------------------------------------------------------------------------- in-place ops

_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


_VIEW_NAMES = {"getitem", "narrow", "view", "reshape", "transpose", "permute", "t", "expand", "expand_as",
               "squeeze", "unsqueeze", "flatten", "unflatten", "split", "chunk", "select", "diagonal",
               "as_strided", "view_as", "reshape_as", "detach", "unfold", "contiguous", "swapaxes", "movedim",
               "unbind", "tensor_split", "hsplit", "vsplit", "real", "imag"}
VIEW_MUTATED = "repc_view_mutated"  # node.meta key: this value is mutated in place through an alias


_SAME_TENSOR_NAMES = {"float", "double", "half", "bfloat16", "to", "type", "type_as", "dropout", "dropout1d",
                      "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "identity"}


def _is_view(node: fx.Node, modules=None) -> bool:
    """Whether ``node`` may return (a view of) its input tensor itself: mutating one mutates both."""
    if node.op == "call_module":
        mod = (modules or {}).get(node.target)
        return isinstance(mod, _IDENTITY_MODULES)
    if node.op not in ("call_function", "call_method"):
        return False
    return _name(node) in _VIEW_NAMES | _SAME_TENSOR_NAMES


def inplace_kind(node: fx.Node, modules) -> Optional[str]:
    if node.op == "call_function" and node.target is operator.setitem:
        return "setitem"
    if node.op == "call_module" and getattr(modules.get(node.target), "inplace", False):
        return "module"
    if node.op == "call_function" and node.target in _INPLACE_FUNCTIONS:
        return "operator"
    if node.op == "call_function" and node.kwargs.get("inplace"):
        return "kwarg"
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_") \
            and hasattr(torch.Tensor, node.target[:-1]):
        return "method"
    if node.op == "call_function" and _out_of_place_function(node.target) is not None:
        return "function"
    return None


def _out_of_place_function(target) -> Optional[Callable]:
    """``F.relu`` for ``F.relu_``, ``torch.sigmoid`` for ``torch.sigmoid_``...; None for other targets."""
    name = getattr(target, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    for namespace in (F, torch):
        if getattr(namespace, name, None) is target:
            return getattr(namespace, name[:-1], None)
    return None


def functionalize_inplace(gm: fx.GraphModule) -> int:
    """Make in-place ops out-of-place, rewiring later readers of the mutated value to the result.

    An in-place op ``m`` on ``v`` makes every reader of ``v`` that runs after ``m`` see ``m``'s
    output; with those readers pointed at ``m``, ``m`` can compute out of place and the graph is
    a pure data-flow graph again.  When ``v`` is a view of another value, or has views, the
    mutation reaches values that are not ``v``: such an op stays in place and every alias of
    it is marked ``VIEW_MUTATED`` (the matcher leaves those values, and their readers, where they
    are).  Runs on repc's own copy of the model only.  Returns how many ops were changed.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modules = dict(gm.named_modules())
    changed = 0
    for node in list(gm.graph.nodes):
        kind = inplace_kind(node, modules)
        if kind is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        if kind == "setitem" or _is_view(mutated, modules) or any(_is_view(u, modules) for u in mutated.users):
            for alias in _aliases(mutated, modules):
                alias.meta[VIEW_MUTATED] = True
            node.meta[VIEW_MUTATED] = True
            continue
        if kind == "module":
            # the graph's leaves are the user's own modules: swap in an out-of-place copy
            out_of_place = copy.copy(modules[node.target])
            out_of_place.inplace = False
            parent, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, out_of_place)
            modules[node.target] = out_of_place
        elif kind == "operator":
            node.target = _INPLACE_FUNCTIONS[node.target]
        elif kind == "kwarg":
            node.kwargs = {**node.kwargs, "inplace": False}
        elif kind == "function":
            node.target = _out_of_place_function(node.target)
        else:
            node.target = node.target[:-1]
        changed += 1
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)
    if changed:
        gm.recompile()  # keep gm's forward in step with its graph
    return changed


def _aliases(node: fx.Node, modules) -> List[fx.Node]:
    """``node``, the value it is a view of, and every view taken of those."""
    base = node
    while _is_view(base, modules) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    out, todo = [], [base]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(u for u in n.users if _is_view(u, modules) and u.args and u.args[0] is n)
    return out
