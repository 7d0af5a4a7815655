"""The ATen dialect of ``torch.export`` graphs, written in the torch-level dialect repc reads.

``torch.export`` records ``torch.ops.aten.<op>.<overload>`` calls; repc's vocabulary
(:mod:`repc.vocabulary`) defines the meaning of torch functions, tensor methods, operators and
modules.  Rather than a second copy of every meaning, each ATen overload is translated here to
the torch-level call that computes the same thing, and the one table in ``vocabulary`` then
gives it its meaning.  The translation is a table, :data:`LOWERINGS`, keyed by the ATen op
(the overload packet: ``aten.conv2d`` covers ``aten.conv2d.default`` and ``.padding``), each
entry a small function from the node's arguments to the torch-level call.  Three generic rules
cover the rest:

* an op whose torch function takes the ATen schema's arguments as they are
  (:data:`SAME_SIGNATURE`: ``aten.add.Tensor`` -> ``torch.add``, ``aten.cat`` -> ``torch.cat``);
* an in-place op (``aten.relu_``, ``aten.add_``) becomes the tensor method of its name, which
  the in-place pass (:func:`repc.passes.inplace.functionalize_inplace`) already knows;
* anything else stays the ATen call it was: it runs as it is and is opaque to the matcher.

Only the target and arguments of a node change; its inputs, users and metadata stay.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


class Call(NamedTuple):
    """A torch-level call: fx op (``call_function`` / ``call_method``), target, args, kwargs;
    op ``identity``: the node is its first argument (it is removed)."""
    op: str
    target: Any
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]


def _function(target) -> Callable[..., Call]:
    return lambda *args, **kwargs: Call("call_function", target, args, kwargs)


def _method(name: str) -> Callable[..., Call]:
    return lambda *args, **kwargs: Call("call_method", name, args, kwargs)


def _index_on(dim: int, item) -> tuple:
    """The indexing tuple that applies ``item`` on axis ``dim`` (``x[:, :, item]``, ``x[..., item, :]``)."""
    if dim >= 0:
        return (slice(None),) * dim + (item,)
    return (Ellipsis, item) + (slice(None),) * (-dim - 1)


_END = 2 ** 62  # export writes an open end as the largest int64


def _slice(x, dim=0, start=None, end=None, step=1):
    if start in (None, 0) and (end is None or isinstance(end, int) and end >= _END) and step == 1:
        return Call("identity", None, (x,), {})  # the whole axis (export's ``x[:]``)
    return Call("call_function", operator.getitem, (x, _index_on(dim, slice(start, end, None if step == 1 else step))), {})


def _select(x, dim, index):
    return Call("call_function", operator.getitem, (x, _index_on(dim, index)), {})


def _expand(x, size, implicit=False):
    return Call("call_method", "expand", (x, size), {})


_TO_KEYWORDS = ("dtype", "device", "non_blocking", "copy", "memory_format")


def _to(x, *args, **kwargs):
    """``aten.to.*`` / ``aten._to_copy``: ``x.to(...)`` without the factory-only keywords (layout,
    pin_memory) that ``Tensor.to`` does not take."""
    return Call("call_method", "to", (x,) + args, {k: v for k, v in kwargs.items() if k in _TO_KEYWORDS})


def _avg_pool(fn):
    def lower(x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None):
        # ATen's empty stride means "the kernel size", torch's None does
        return Call("call_function", fn, (x, kernel_size, stride or None, padding, ceil_mode, count_include_pad,
                                          divisor_override), {})
    return lower


def _constant_pad(x, pad, value=0):
    return Call("call_function", F.pad, (x, pad, "constant", value), {})


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return Call("call_function", F.layer_norm, (x, normalized_shape, weight, bias, eps), {})


def _group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return Call("call_function", F.group_norm, (x, num_groups, weight, bias, eps), {})


def _split_with_sizes(x, sizes, dim=0):
    return Call("call_function", torch.split, (x, list(sizes), dim), {})


def _identity(x, *args, **kwargs):
    return Call("identity", None, (x,), {})  # (an alias shares the storage: the value itself)


def _sym_size(x, dim):
    return Call("call_method", "size", (x, dim), {})


LOWERINGS: Dict[Any, Callable[..., Call]] = {
    aten.conv1d: _function(torch.conv1d),
    aten.conv2d: _function(torch.conv2d),
    aten.conv3d: _function(torch.conv3d),
    aten.linear: _function(F.linear),
    aten.batch_norm: _function(torch.batch_norm),
    aten.layer_norm: _layer_norm,
    aten.group_norm: _group_norm,
    aten.dropout: _function(torch.dropout),
    aten.avg_pool1d: _avg_pool(F.avg_pool1d),
    aten.avg_pool2d: _avg_pool(F.avg_pool2d),
    aten.avg_pool3d: _avg_pool(F.avg_pool3d),
    aten.constant_pad_nd: _constant_pad,
    aten.slice: _slice,
    aten.select: _select,
    aten.split_with_sizes: _split_with_sizes,
    aten.sym_size: _sym_size,
    aten.view: _method("view"),
    aten.view_as: _method("view_as"),
    aten.reshape_as: _method("reshape_as"),
    aten.expand: _expand,
    aten.t: _method("t"),
    aten.contiguous: _method("contiguous"),
    aten.alias: _identity,
    aten.to: _to,
    aten._to_copy: _to,
    aten.leaky_relu: _function(F.leaky_relu),
    aten.gelu: _function(F.gelu),
    aten.silu: _function(F.silu),
    aten.hardswish: _function(F.hardswish),
    aten.hardsigmoid: _function(F.hardsigmoid),
    aten.hardtanh: _function(F.hardtanh),
    aten.relu6: _function(F.relu6),
    aten.scaled_dot_product_attention: _function(F.scaled_dot_product_attention),
}

# ATen ops whose torch function (``torch.<name>``) takes the schema's arguments unchanged
SAME_SIGNATURE = (
    "add", "sub", "mul", "div", "neg", "rsub", "cat", "concat", "stack", "split", "chunk", "unbind",
    "permute", "transpose", "flatten", "unflatten", "reshape", "squeeze", "unsqueeze", "narrow",
    "mean", "sum", "einsum", "matmul", "mm", "bmm", "addmm", "clone", "where", "relu", "sigmoid",
    "tanh", "softmax", "prelu", "embedding", "erf", "exp", "sqrt", "rsqrt", "pow", "abs",
)
for _name in SAME_SIGNATURE:
    LOWERINGS[getattr(aten, _name)] = _function(getattr(torch, _name))
del _name


def lowering(node: fx.Node) -> Optional[Call]:
    """The torch-level call for an ATen ``node``, or None where it stays as it is."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    if target.overloadpacket is aten.to and _returns_its_input(node):
        return Call("identity", None, (node.args[0],), {})
    rule = LOWERINGS.get(target.overloadpacket)
    if rule is not None:
        return rule(*node.args, **node.kwargs)
    name = target.overloadpacket.__name__
    schema = target._schema
    if name.endswith("_") and not name.startswith("_") and schema.arguments and \
            schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
        return Call("call_method", name, node.args, dict(node.kwargs))  # in place: ``x.add_(y)``
    return None


def _returns_its_input(node: fx.Node) -> bool:
    """``aten.to`` to the dtype and device its input has, without ``copy`` or a memory format:
    it returns the input tensor itself, and the trace then records every later use of that
    tensor (a residual's ``x`` after an RMSNorm's ``x.to(torch.float32)``) as a use of the cast.
    Removed, those uses read the value they name, in the scope of the module that made it."""
    x = node.args[0] if node.args else None
    out, given = node.meta.get("val"), x.meta.get("val") if isinstance(x, fx.Node) else None
    if node.kwargs.get("copy") or node.kwargs.get("memory_format") is not None or \
            any(a is True or isinstance(a, torch.memory_format) for a in node.args[1:]):
        return False
    return isinstance(out, torch.Tensor) and isinstance(given, torch.Tensor) and out.dtype == given.dtype and \
        out.device == given.device and out.shape == given.shape


def lower_aten(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s ATen calls as torch-level calls (see the module docstring); returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        call = lowering(node)
        if call is None:
            continue
        count += 1
        if call.op == "identity":
            node.replace_all_uses_with(call.args[0])
            gm.graph.erase_node(node)
            continue
        node.op, node.target = call.op, call.target
        node.args, node.kwargs = tuple(call.args), dict(call.kwargs)
    if count:
        gm.recompile()
    return count
