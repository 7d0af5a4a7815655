"""Questions about fx nodes that every stage asks, answered once.

* :func:`in_place_kind` / :func:`writes_in_place` -- whether (and how) a node writes its first
  argument in place: item assignment, in-place operators (``+=`` ... ``@=``), ``inplace=True``
  (keyword or an activation's positional flag), a module built with ``inplace=True``, trailing
  underscore methods and functions, and ATen overloads whose schema marks the write;
  :func:`out_of_place_target` names the op that computes the same out of place.
* :func:`may_alias` -- whether a node may return its input tensor itself or a view of it
  (``view``, ``transpose``, ``getitem``..., a cast that changes nothing, an identity module).
* :func:`target_name` -- a node's target as a name (``"conv2d"``, ``"add"``, ``"view"``).
* :func:`fetch_attr` -- the attribute ``a.b.c`` of a module.
* :func:`short_error` -- an exception as one short line for a report or an error message.

Used by capture (:mod:`repc.capture`), the graph preparation passes (:mod:`repc.passes`), the
matcher and the torch.compile backend (:mod:`repc.backend`).
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable, Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

# a node's meta key: its size's expression, or its tensor's per axis, over the inputs' size
# symbols (a sympy expression each; an int where fixed), where torch.export traced them
# symbolically (:func:`repc.capture_export.export_graph`)
SYMBOLIC_SIZES = "repc_symbolic_sizes"

IN_PLACE_OPERATORS: Dict[Callable, Callable] = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}  # in-place operator -> the operator computing the same out of place

# activations -> the position of their ``inplace`` argument
_POSITIONAL_INPLACE = {F.relu: 1, F.relu6: 1, F.selu: 1, F.hardsigmoid: 1, F.hardswish: 1, F.silu: 1, F.mish: 1,
                       F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.threshold: 3, F.rrelu: 4}

IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)  # modules that return their input itself in eval mode

VIEW_NAMES = frozenset({
    "getitem", "narrow", "view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "T", "mT",
    "expand", "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten", "split", "chunk", "select", "diagonal",
    "as_strided", "detach", "unfold", "contiguous", "swapaxes", "swapdims", "movedim", "moveaxis", "unbind",
    "tensor_split", "hsplit", "vsplit", "real", "imag", "view_as_real", "view_as_complex", "alias"})
# casts and identities that return their input itself when they change nothing
SAME_TENSOR_NAMES = frozenset({"float", "double", "half", "bfloat16", "to", "type", "type_as", "dropout", "dropout1d",
                               "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "identity"})


def target_name(node: fx.Node) -> str:
    """The node's target as a name: a method's name, a function's ``__name__``, a module's path."""
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def fetch_attr(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for ``target == "a.b.c"`` (a parameter, buffer, submodule or constant)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def short_error(why: BaseException, limit: int = 200) -> str:
    """``"TypeError: first sentence of the message"``, one line of at most ``limit`` characters
    (cut with ``...``)."""
    lines = [line.strip() for line in str(why).strip().splitlines() if line.strip()]
    first = re.split(r"(?<=[a-z0-9)\]])\. ", lines[0], maxsplit=1)[0] if lines else ""
    text = f"{type(why).__name__}: {first}" if first else type(why).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_underscore_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("_")


def in_place_kind(node: fx.Node, modules: Optional[Dict[str, nn.Module]] = None) -> Optional[str]:
    """How ``node`` writes into its first argument, or None if it does not.

    ``"setitem"`` (``x[i] = v``), ``"operator"`` (``x += y``), ``"flag"`` (``inplace=True``,
    by keyword or an activation's positional flag), ``"module"`` (a module built with
    ``inplace=True``; needs ``modules``), ``"method"`` (``x.mul_(y)``), ``"function"``
    (``torch.relu_(x)``) or ``"schema"`` (an ATen overload that writes its first argument).
    """
    if node.op == "call_method":
        return "method" if isinstance(node.target, str) and _is_underscore_name(node.target) else None
    if node.op == "call_module":
        mod = (modules or {}).get(node.target)
        return "module" if getattr(mod, "inplace", False) is True else None
    if node.op != "call_function":
        return None
    target = node.target
    if target is operator.setitem:
        return "setitem"
    if target in IN_PLACE_OPERATORS:
        return "operator"
    if node.kwargs.get("inplace") is True or \
            (target in _POSITIONAL_INPLACE and len(node.args) > _POSITIONAL_INPLACE[target]
             and node.args[_POSITIONAL_INPLACE[target]] is True):
        return "flag"
    schema = getattr(target, "_schema", None)
    if schema is not None:  # torch.ops.aten.*: the schema says whether the first argument is written
        arguments = schema.arguments
        written = bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write
        return "schema" if written else None
    return "function" if _is_underscore_name(getattr(target, "__name__", "")) else None


def inplace_position(target) -> Optional[int]:
    """The position of the ``inplace`` argument of an activation function (``F.relu(x, True)``)."""
    return _POSITIONAL_INPLACE.get(target)


def writes_in_place(node: fx.Node, modules: Optional[Dict[str, nn.Module]] = None) -> bool:
    """Whether ``node`` writes into its first argument (see :func:`in_place_kind`)."""
    return in_place_kind(node, modules) is not None


def out_of_place_target(node: fx.Node) -> Optional[Callable]:
    """The function or method name computing what the in-place ``node`` computes, out of place:
    ``operator.add`` for ``+=``, ``"mul"`` for ``.mul_``, ``F.relu`` for ``F.relu_``; None where
    there is none (item assignment, a module, a flag, an ATen overload, an unknown name)."""
    if node.op == "call_method" and isinstance(node.target, str) and _is_underscore_name(node.target):
        return node.target[:-1] if hasattr(torch.Tensor, node.target[:-1]) else None
    if node.op != "call_function":
        return None
    if node.target in IN_PLACE_OPERATORS:
        return IN_PLACE_OPERATORS[node.target]
    name = getattr(node.target, "__name__", "")
    if not _is_underscore_name(name) or getattr(node.target, "_schema", None) is not None:
        return None
    for namespace in (F, torch):
        if getattr(namespace, name, None) is node.target:
            return getattr(namespace, name[:-1], None)
    return None


def may_alias(node: fx.Node, modules: Optional[Dict[str, nn.Module]] = None) -> bool:
    """Whether ``node`` may return its input tensor itself or a view of it: writing into one
    writes into both."""
    if node.op == "call_module":
        return isinstance((modules or {}).get(node.target), IDENTITY_MODULES)
    if node.op not in ("call_function", "call_method"):
        return False
    name = target_name(node)
    return name in VIEW_NAMES or name in SAME_TENSOR_NAMES


def alias_base(node: fx.Node, aliasing: Callable[[fx.Node], bool]) -> fx.Node:
    """The value ``node`` is a view or another name of: its first argument followed while
    ``aliasing`` (:func:`may_alias`, or a caller's narrower test) says so."""
    while aliasing(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def call_target(node: fx.Node):
    """The target of a function or method call (a callable, or a method's name); None for other nodes."""
    return node.target if node.op in ("call_function", "call_method") else None


# functions of their argument's shape, dtype and device only (and of their other arguments), as
# Python calls and as the ATen overloads torch.export records
SHAPE_ONLY_FUNCTIONS = frozenset({torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                                  torch.ops.aten.zeros_like.default, torch.ops.aten.ones_like.default,
                                  torch.ops.aten.empty_like.default, torch.ops.aten.full_like.default})

_ELEMENTWISE_FUNCTIONS = frozenset({
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, torch.relu, torch.sigmoid, torch.tanh,
    torch.erf, torch.exp, F.sigmoid, F.tanh})
_ELEMENTWISE_METHODS = frozenset({"relu", "sigmoid", "tanh", "erf", "exp"})
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU,
                        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Softsign,
                        nn.Tanhshrink, nn.LogSigmoid)


def is_elementwise_activation(node: fx.Node, modules: Optional[Dict[str, nn.Module]] = None) -> bool:
    """Whether ``node`` applies a nonlinearity to each element of its first argument alone (so it
    commutes with slicing): ReLU, GELU, SiLU, sigmoid, tanh... (not PReLU: its weights are per channel)."""
    if node.op == "call_module":
        return type((modules or {}).get(node.target)) in _ELEMENTWISE_MODULES
    if node.op == "call_method":
        return node.target in _ELEMENTWISE_METHODS
    return node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS
