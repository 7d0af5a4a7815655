"""The vocabulary: which op means what, as one table.

:data:`VOCABULARY` maps ``(OpKind, target)`` to a small handler returning the node's meaning
(:mod:`repc.meanings`) or raising :class:`repc.reasons.Opaque`:

* ``(OpKind.MODULE, nn.Conv2d)`` -- a call of a standard module (a subclass matches through
  its class's bases only when it keeps the base's ``forward``);
* ``(OpKind.FUNCTION, F.conv2d)`` -- a torch function;
* ``(OpKind.OPERATOR, operator.add)`` -- a Python operator (``x + y``, ``x[i]``);
* ``(OpKind.METHOD, "add")`` -- a tensor method.

ATen overloads (what ``torch.export`` produces) are lowered to these targets first by the
table in :mod:`repc.aten`.  :func:`describe` looks a node up here after folding values computed
from constants only; :func:`constant_facts` finds those constants.  Adding an op is one
``@handles(...)`` handler and its row in ``tests/test_vocabulary.py``.
"""

from __future__ import annotations

import enum
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .graph_predicates import IDENTITY_MODULES, fetch_attr, target_name
from .meanings import (AffineCall, Combine, Concat, Constant, GraphFacts, Layout, Meaning, Slice, avg_pool, batch_norm,
                       elementwise, make_conv, zero_pad)
from .ops import Linear, as_float64, identity
from .reasons import Opaque, OpaqueKind


class OpKind(enum.Enum):
    """What a vocabulary key's target is."""
    MODULE = "module"  # a module class (call_module)
    FUNCTION = "function"  # a torch function (call_function)
    OPERATOR = "operator"  # a Python operator (call_function with an ``operator`` target)
    METHOD = "method"  # a tensor method name (call_method)


Handler = Callable[[fx.Node, GraphFacts], Meaning]
VOCABULARY: Dict[Tuple[OpKind, Any], Handler] = {}


def handles(kind: OpKind, *targets) -> Callable[[Handler], Handler]:
    """Register the decorated handler for each ``(kind, target)``."""
    def register(handler: Handler) -> Handler:
        for target in targets:  # (aliases such as F.conv2d and torch.conv2d are one object)
            if VOCABULARY.get((kind, target), handler) is not handler:
                raise ValueError(f"{kind.value} {target} has two handlers in the vocabulary")
            VOCABULARY[(kind, target)] = handler
        return handler
    return register


def op_kind(node: fx.Node) -> Optional[OpKind]:
    """The kind of vocabulary key a node's target is looked up under; None for graph I/O and attributes."""
    if node.op == "call_module":
        return OpKind.MODULE
    if node.op == "call_method":
        return OpKind.METHOD
    if node.op == "call_function":
        return OpKind.OPERATOR if getattr(node.target, "__module__", None) == "_operator" else OpKind.FUNCTION
    return None


def handler_for(node: fx.Node, facts: GraphFacts) -> Optional[Handler]:
    """The vocabulary's handler for ``node``, or None if the op is not in it."""
    kind = op_kind(node)
    if kind is OpKind.MODULE:
        cls = type(facts.modules[node.target])
        for base in cls.__mro__:
            handler = VOCABULARY.get((kind, base))
            if handler is not None:
                # a subclass with its own forward computes something else
                return handler if cls.forward is base.forward else None
        return None
    if kind is None:
        return None
    try:
        return VOCABULARY.get((kind, node.target))
    except TypeError:  # an unhashable target
        return None


# ----------------------------------------------------------------------------- lookup

RANDOM_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
                    torch.bernoulli, torch.multinomial, torch.normal, torch.randperm, F.dropout, F.dropout1d,
                    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, torch.dropout,
                    "uniform_", "normal_", "bernoulli_", "random_", "exponential_"}


def describe(node: fx.Node, facts: GraphFacts) -> Meaning:
    """The canonical meaning of ``node``; raises :class:`Opaque` with the reason if none."""
    if node.op in ("placeholder", "output"):
        raise Opaque(OpaqueKind.BOUNDARY, f"{node.op}")
    if node.op == "get_attr":
        return Constant(fetch_attr(facts.gm, node.target))
    flat: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), flat.append)
    key = node.target if node.op in ("call_function", "call_method") else None
    if all(a in facts.constants for a in flat) and node.op in ("call_function", "call_method", "call_module") \
            and not _is_random(node, key, facts):
        # computed from parameters and constants only (GLoRA weights, a parametrization, a fixed
        # gate), or from literals alone (DoRA's ``torch.eye`` probe of its LoRA weight)
        return Constant(_evaluate(node, facts))
    if node.op == "call_module":
        mod = facts.modules[node.target]
        if not node.args or not isinstance(node.args[0], fx.Node):
            raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "module called without a tensor input")
        if len(node.args) != 1 or node.kwargs:
            raise Opaque(OpaqueKind.UNSUPPORTED_FORM, f"module {type(mod).__name__} called with several arguments")
    handler = handler_for(node, facts)
    if handler is None:
        raise _unknown(node, facts)
    return handler(node, facts)


def _unknown(node: fx.Node, facts: GraphFacts) -> Opaque:
    if node.op == "call_module":
        return Opaque(OpaqueKind.UNKNOWN_OP,
                      f"module {type(facts.modules[node.target]).__name__} is not an affine map repc knows")
    return Opaque(OpaqueKind.UNKNOWN_OP, f"{node.op} {target_name(node)} is not an affine map repc knows")


def _is_random(node: fx.Node, key, facts: GraphFacts) -> bool:
    if node.op == "call_module":
        mod = facts.modules[node.target]
        return mod.training or isinstance(mod, IDENTITY_MODULES[1:]) or isinstance(mod, nn.RReLU)
    try:
        return key in RANDOM_FUNCTIONS
    except TypeError:
        return False


def _evaluate(node: fx.Node, facts: GraphFacts):
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: facts.constants[n])
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return facts.modules[node.target](*args, **kwargs)


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


# ----------------------------------------------------------------------------- argument helpers

def bind(args, kwargs, names: Sequence[str], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Arguments by name: ``defaults``, then ``args`` in the order of ``names``, then ``kwargs``."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def _has_node(value) -> bool:
    """Whether arguments (nested in tuples, lists, dicts) hold a graph value, e.g. a size read at run time."""
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _is_all(t, value) -> bool:
    return t is not None and bool((t == value).all())


def _input(node: fx.Node, facts: GraphFacts):
    """The node's first argument and its recorded shape (None where it is not a tensor value)."""
    x = node.args[0] if node.args else None
    return x, facts.shape(x)


def split_ranges(size: int, node: fx.Node) -> List[Tuple[int, int]]:
    """[(start, stop)...] of the pieces of a chunk/split node over an axis of ``size``."""
    name = target_name(node)
    args = list(node.args[1:])
    if name == "chunk":
        b = bind(args, node.kwargs, ["chunks", "dim"], {"dim": 0})
        step = -(-size // b["chunks"])
        sizes = [min(step, size - s) for s in range(0, size, step)]
    else:
        b = bind(args, node.kwargs, ["split_size_or_sections", "dim"], {"dim": 0})
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
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "indexing that adds axes")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(x_shape) - len(index) + 1) + index[at + 1:]
    cut = [(axis, s) for axis, s in enumerate(index) if s != slice(None)]
    if len(cut) != 1 or not isinstance(cut[0][1], slice) or cut[0][1].step not in (None, 1):
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "indexing other than one contiguous slice on one axis")
    axis, s = cut[0]
    start, stop, _ = s.indices(x_shape[axis])
    return Slice(x, axis, start, max(start, stop))


def _identity_of_input(node: fx.Node, facts: GraphFacts) -> AffineCall:
    x, x_shape = _input(node, facts)
    return AffineCall(x, identity(x_shape))


# ----------------------------------------------------------------------------- modules

@handles(OpKind.MODULE, nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(node, facts):
    mod = facts.modules[node.target]
    return AffineCall(node.args[0], make_conv(mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation,
                                              mod.groups, mod.padding_mode))


@handles(OpKind.MODULE, nn.Linear)
def _linear_module(node, facts):
    mod = facts.modules[node.target]
    return AffineCall(node.args[0], Linear(mod.weight, mod.bias))


@handles(OpKind.MODULE, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def _batch_norm_module(node, facts):
    mod = facts.modules[node.target]
    if mod.training and mod.track_running_stats:
        raise Opaque(OpaqueKind.TRAINING, "batch norm in training mode")
    x, x_shape = _input(node, facts)
    return AffineCall(x, batch_norm(x_shape, mod.running_mean, mod.running_var, mod.eps,
                                    mod.weight if mod.affine else None, mod.bias if mod.affine else None))


@handles(OpKind.MODULE, *IDENTITY_MODULES)
def _identity_module(node, facts):
    mod = facts.modules[node.target]
    if mod.training and not isinstance(mod, nn.Identity):
        raise Opaque(OpaqueKind.TRAINING, "dropout in training mode")
    return _identity_of_input(node, facts)


@handles(OpKind.MODULE, nn.LeakyReLU)
def _leaky_relu_module(node, facts):
    if facts.modules[node.target].negative_slope == 1.0:
        return _identity_of_input(node, facts)
    raise _unknown(node, facts)


@handles(OpKind.MODULE, nn.PReLU)
def _prelu_module(node, facts):
    if _is_all(facts.modules[node.target].weight, 1.0):
        return _identity_of_input(node, facts)
    raise _unknown(node, facts)


@handles(OpKind.MODULE, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def _avg_pool_module(node, facts):
    mod = facts.modules[node.target]
    x, x_shape = _input(node, facts)
    return AffineCall(x, avg_pool(x_shape, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                                  mod.count_include_pad, getattr(mod, "divisor_override", None)))


@handles(OpKind.MODULE, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
def _pad_module(node, facts):
    mod = facts.modules[node.target]
    if float(mod.value) != 0.0:
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "constant padding with a non-zero value")
    x, x_shape = _input(node, facts)
    return AffineCall(x, zero_pad(x_shape, mod.padding))


# ----------------------------------------------------------------------------- maps with weights

def _weight_and_bias(b, facts: GraphFacts, what: str):
    w, bias = facts.const(b["weight"]), b["bias"]
    if w is None or (bias is not None and facts.const(bias) is None):
        raise Opaque(OpaqueKind.DATA_WEIGHT, f"{what} whose weight or bias depends on the input")
    return w, None if bias is None else facts.const(bias)


@handles(OpKind.FUNCTION, torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d)
def _conv(node, facts):
    b = bind(node.args[1:], node.kwargs, ["weight", "bias", "stride", "padding", "dilation", "groups"],
             {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    w, bias = _weight_and_bias(b, facts, "conv")
    return AffineCall(node.args[0], make_conv(w, bias, b["stride"], b["padding"], b["dilation"], b["groups"]))


@handles(OpKind.FUNCTION, F.linear, torch._C._nn.linear)
def _linear(node, facts):
    b = bind(node.args[1:], node.kwargs, ["weight", "bias"], {"bias": None})
    w, bias = _weight_and_bias(b, facts, "linear")
    return AffineCall(node.args[0], Linear(w, bias))


@handles(OpKind.FUNCTION, torch.addmm)
@handles(OpKind.METHOD, "addmm")
def _addmm(node, facts):
    """GPT-2's Conv1D: ``addmm(bias, x.view(-1, nx), weight)``."""
    b = bind(node.args, node.kwargs, ["input", "mat1", "mat2"], {})
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    bias, w = facts.const(b["input"]), facts.const(b["mat2"])
    if w is None or bias is None or w.dim() != 2 or facts.is_const(b["mat1"]) or bias.dim() > 1 and bias.shape[0] != 1:
        raise Opaque(OpaqueKind.DATA_WEIGHT, "addmm other than a constant bias plus an activation times a constant matrix")
    if not isinstance(b["mat1"], fx.Node):
        raise Opaque(OpaqueKind.CONSTANTS, "addmm of a non-tensor")
    weight, bias = w.detach().T, bias.detach().reshape(-1).expand(w.shape[1])  # (views, converted where read)
    return AffineCall(b["mat1"], Linear(weight if alpha == 1 else alpha * as_float64(weight),
                                        bias if beta == 1 else beta * as_float64(bias)))


@handles(OpKind.FUNCTION, torch.matmul, torch.mm)
@handles(OpKind.OPERATOR, operator.matmul)
@handles(OpKind.METHOD, "matmul", "mm")
def _matmul(node, facts):
    args = node.args
    if len(args) != 2:
        raise _unknown(node, facts)
    w = facts.const(args[1])
    if w is None or w.dim() != 2 or facts.is_const(args[0]):
        raise Opaque(OpaqueKind.DATA_WEIGHT, "matmul of two activations")
    return AffineCall(args[0], Linear(w.detach().T, None))


def _functional_bn(node, b, facts: GraphFacts) -> Meaning:
    if b.get("training"):
        raise Opaque(OpaqueKind.TRAINING, "batch_norm with training=True uses batch statistics")
    vals = {k: (facts.const(b[k]) if b.get(k) is not None else None)
            for k in ("running_mean", "running_var", "weight", "bias")}
    for k in vals:
        if b.get(k) is not None and vals[k] is None:
            raise Opaque(OpaqueKind.DATA_WEIGHT, f"batch_norm whose {k} depends on the input")
    x, x_shape = _input(node, facts)
    return AffineCall(x, batch_norm(x_shape, vals["running_mean"], vals["running_var"], b["eps"], vals["weight"],
                                    vals["bias"]))


@handles(OpKind.FUNCTION, F.batch_norm)
def _batch_norm_function(node, facts):
    b = bind(node.args[1:], node.kwargs, ["running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
             {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
    return _functional_bn(node, b, facts)


@handles(OpKind.FUNCTION, torch.batch_norm)
def _batch_norm_torch(node, facts):
    b = bind(node.args[1:], node.kwargs, ["weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                                          "cudnn_enabled"], {})
    return _functional_bn(node, b, facts)


# ----------------------------------------------------------------------------- identities and maps without weights

@handles(OpKind.FUNCTION, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
         torch.dropout)
def _dropout(node, facts):
    b = bind(node.args[1:], node.kwargs, ["p", "training", "inplace"],
             {"p": 0.5, "training": node.target is not torch.dropout})
    if b["training"]:
        raise Opaque(OpaqueKind.TRAINING, "dropout with training=True is random")
    return _identity_of_input(node, facts)


@handles(OpKind.FUNCTION, F.leaky_relu)
def _leaky_relu(node, facts):
    b = bind(node.args[1:], node.kwargs, ["negative_slope", "inplace"], {"negative_slope": 0.01})
    if b["negative_slope"] == 1.0:
        return _identity_of_input(node, facts)
    raise Opaque(OpaqueKind.NOT_AFFINE, "leaky_relu with a slope other than 1 is not affine")


@handles(OpKind.FUNCTION, F.prelu, torch.prelu)
def _prelu(node, facts):
    if _is_all(facts.const(node.args[1]), 1.0):
        return _identity_of_input(node, facts)
    raise Opaque(OpaqueKind.NOT_AFFINE, "prelu with a weight other than 1 is not affine")


@handles(OpKind.FUNCTION, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, torch.avg_pool1d)
def _avg_pool(node, facts):
    b = bind(node.args[1:], node.kwargs, ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                          "divisor_override"],
             {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None})
    if _has_node(b):
        raise Opaque(OpaqueKind.RUNTIME_NUMBER, "a pooling window computed from the input's size at run time, "
                                                "not one fixed map")
    x, x_shape = _input(node, facts)
    return AffineCall(x, avg_pool(x_shape, b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"],
                                  b["count_include_pad"], b["divisor_override"]))


@handles(OpKind.FUNCTION, F.pad, torch._C._nn.pad)
def _pad(node, facts):
    b = bind(node.args[1:], node.kwargs, ["pad", "mode", "value"], {"mode": "constant", "value": None})
    if b["mode"] != "constant" or (b["value"] not in (None, 0, 0.0)):
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "padding that is not constant zero")
    x, x_shape = _input(node, facts)
    return AffineCall(x, zero_pad(x_shape, b["pad"]))


@handles(OpKind.FUNCTION, torch.clone)
@handles(OpKind.OPERATOR, operator.pos)
@handles(OpKind.METHOD, "contiguous", "clone")
def _pass_through(node, facts):
    return _identity_of_input(node, facts)


def _float_cast(out, x) -> bool:
    """Whether a cast's example output is its input in another floating dtype (or the same), on
    the same device, in the same shape: a rounding, nothing else."""
    return isinstance(out, Tensor) and isinstance(x, Tensor) and out.dtype.is_floating_point and \
        x.dtype.is_floating_point and out.device == x.device and out.shape == x.shape


CAST_METHODS = ("to", "type", "type_as", "float", "double", "half", "bfloat16")


def is_float_cast(node: fx.Node, facts: GraphFacts) -> bool:
    """``node`` casts a value to another floating dtype (or the same), nothing else."""
    return node.op == "call_method" and node.target in CAST_METHODS and bool(node.args) and \
        isinstance(node.args[0], fx.Node) and _float_cast(facts.values.get(node), facts.values.get(node.args[0]))


@handles(OpKind.METHOD, *CAST_METHODS)
def _cast(node, facts):
    """A cast between floating dtypes on one device: the identity, up to rounding to the output's
    dtype.  peft's LoRA casts its input to the adapter's dtype (float32 beside a bfloat16 base)
    and its result back; the merged op computes in the region's output dtype, its float64 weights
    rounded once (what ``merge_and_unload`` gives), and the region is checked at the tolerance of
    the least precise dtype it reads or gives."""
    if is_float_cast(node, facts):
        return _identity_of_input(node, facts)
    raise _unknown(node, facts)


# ----------------------------------------------------------------------------- arithmetic

@handles(OpKind.FUNCTION, torch.add)
@handles(OpKind.OPERATOR, operator.add, operator.iadd)
@handles(OpKind.METHOD, "add")
def _add(node, facts):
    return _add_or_sub(node, False, facts)


@handles(OpKind.FUNCTION, torch.sub, torch.subtract)
@handles(OpKind.OPERATOR, operator.sub, operator.isub)
@handles(OpKind.METHOD, "sub")
def _sub(node, facts):
    return _add_or_sub(node, True, facts)


def _add_or_sub(node: fx.Node, subtract: bool, facts: GraphFacts) -> Meaning:
    a, c = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    sign = -float(alpha) if subtract else float(alpha)
    a_const, c_const = facts.is_const(a), facts.is_const(c)
    if a_const and c_const:
        raise Opaque(OpaqueKind.CONSTANTS, "sum of constants")
    if c_const or a_const:
        value = facts.const(c if c_const else a)
        if value is None:
            raise Opaque(OpaqueKind.CONSTANTS, "adding a non-tensor constant")
        if c_const:
            return AffineCall(a, elementwise(facts.shape(a), shift=value * sign))
        return AffineCall(c, elementwise(facts.shape(c), scale=torch.tensor(sign, dtype=torch.float64), shift=value))
    if facts.shape(a) != facts.shape(c):
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "sum of activations of different shapes (broadcasting)")
    return Combine([(a, 1.0), (c, sign)])


@handles(OpKind.FUNCTION, torch.mul, torch.multiply)
@handles(OpKind.OPERATOR, operator.mul, operator.imul)
@handles(OpKind.METHOD, "mul")
def _mul(node, facts):
    a, c = node.args[0], node.args[1]
    if facts.is_const(a):
        a, c = c, a
    if facts.is_const(a) or facts.const(c) is None:
        if isinstance(facts.values.get(c), torch.Tensor) and isinstance(facts.values.get(a), torch.Tensor):
            raise Opaque(OpaqueKind.PRODUCT_OF_ACTIVATIONS, "product of two activations")
        raise Opaque(OpaqueKind.RUNTIME_NUMBER, "product with a number computed at run time (e.g. from a shape)")
    return AffineCall(a, elementwise(facts.shape(a), scale=facts.const(c)))


@handles(OpKind.FUNCTION, torch.div, torch.true_divide)
@handles(OpKind.OPERATOR, operator.truediv, operator.itruediv)
@handles(OpKind.METHOD, "div")
def _div(node, facts):
    x, x_shape = _input(node, facts)
    divisor = node.args[1] if len(node.args) > 1 else None
    if node.kwargs.get("rounding_mode") is not None or facts.const(divisor) is None or facts.is_const(x):
        kind = OpaqueKind.NOT_AFFINE if node.kwargs.get("rounding_mode") is not None else \
            OpaqueKind.DATA_WEIGHT if isinstance(facts.values.get(divisor), Tensor) else OpaqueKind.RUNTIME_NUMBER
        raise Opaque(kind, "division by an activation or with rounding")
    return AffineCall(x, elementwise(x_shape, scale=1.0 / facts.const(divisor).to(torch.float64)))


@handles(OpKind.FUNCTION, torch.neg)
@handles(OpKind.OPERATOR, operator.neg)
@handles(OpKind.METHOD, "neg")
def _neg(node, facts):
    x, x_shape = _input(node, facts)
    return AffineCall(x, elementwise(x_shape, scale=torch.tensor(-1.0, dtype=torch.float64)))


# ----------------------------------------------------------------------------- structure: concat, slices, layout

@handles(OpKind.FUNCTION, torch.cat, torch.concat, torch.concatenate)
def _cat(node, facts):
    b = bind(node.args, node.kwargs, ["tensors", "dim"], {"dim": 0})
    tensors = list(b["tensors"])
    if not all(isinstance(t, fx.Node) and not facts.is_const(t) for t in tensors):
        raise Opaque(OpaqueKind.CONSTANTS, "concatenation with constants")
    ndim = len(facts.shape(tensors[0]))
    return Concat(tensors, b["dim"] % ndim)


@handles(OpKind.OPERATOR, operator.getitem)
def _getitem(node, facts):
    src, index = node.args
    if src.op in ("call_function", "call_method") and target_name(src) in ("chunk", "split"):
        base = src.args[0]
        shape = facts.shape(base)
        if shape is None:
            raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "split of a value that is not a tensor")
        dim = bind(list(src.args[1:]), src.kwargs, ["_", "dim"], {"dim": 0})["dim"] % len(shape)
        start, stop = split_ranges(shape[dim], src)[index]
        return Slice(base, dim, start, stop)
    shape = facts.shape(src)
    if shape is None:
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "indexing a value that is not a tensor")
    return _slice_of(src, index, shape)


@handles(OpKind.FUNCTION, torch.narrow)
@handles(OpKind.METHOD, "narrow")
def _narrow(node, facts):
    x, x_shape = _input(node, facts)
    b = bind(node.args[1:], node.kwargs, ["dim", "start", "length"], {})
    dim = b["dim"] % len(x_shape)
    return Slice(x, dim, b["start"], b["start"] + b["length"])


@handles(OpKind.FUNCTION, torch.transpose, torch.permute, torch.flatten, torch.reshape, torch.unflatten,
         torch.swapaxes, torch.squeeze, torch.unsqueeze)
@handles(OpKind.METHOD, "transpose", "permute", "flatten", "reshape", "view", "reshape_as", "view_as", "unflatten",
         "swapaxes", "squeeze", "unsqueeze", "t")
def _layout(node, facts):
    x, x_shape = _input(node, facts)
    if isinstance(x, fx.Node) and x_shape is not None:
        return Layout(x, node)
    raise _unknown(node, facts)


@handles(OpKind.FUNCTION, torch.mean, torch.sum)
@handles(OpKind.METHOD, "mean", "sum")
def _reduce(node, facts):
    """``stack(xs, d).mean(d)`` / ``.sum(d)``: a weighted sum of the stacked values."""
    stack, _ = _input(node, facts)
    if not (isinstance(stack, fx.Node) and stack.op == "call_function" and stack.target is torch.stack):
        raise _unknown(node, facts)
    b = bind(node.args[1:], node.kwargs, ["dim", "keepdim"], {"dim": None, "keepdim": False})
    s = bind(stack.args, stack.kwargs, ["tensors", "dim"], {"dim": 0})
    tensors = list(s["tensors"])
    ndim = len(facts.shape(stack))
    dim = b["dim"]
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    if not isinstance(dim, int) or dim % ndim != s["dim"] % ndim or b["keepdim"] or node.kwargs.get("dtype"):
        raise Opaque(OpaqueKind.UNSUPPORTED_FORM, "reduction that is not over the stacking axis")
    if not all(isinstance(t, fx.Node) and not facts.is_const(t) for t in tensors):
        raise Opaque(OpaqueKind.CONSTANTS, "stack with constants")
    weight = 1.0 / len(tensors) if node.target in (torch.mean, "mean") else 1.0
    return Combine([(t, weight) for t in tensors])
