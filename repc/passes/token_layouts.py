"""Preparation pass: token layout changes moved below the per-token maps that read them.

:func:`sink_token_layouts` rewrites ``L(layout(h))`` as ``layout(L(h))`` where ``layout``
(a transpose, permute, view, reshape, flatten... ) keeps the last axis as it is and ``L`` acts
on the last axis only: a linear map, a scalar or per-feature constant, or the sum of two values
laid out the same way.  GPT-2's ``Conv1D`` flattens tokens for a 2-D matmul, and
``nn.MultiheadAttention`` (as torch.export records it) transposes a batch-first input before
its in-projection and lays its out-projection's result back out before the caller's adapter
reads it: with the layout changes moved out of the way, a norm's affine or an adapter folds
into the linear map on either side.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph_predicates import target_name
from ..meanings import AffineCall, GraphFacts, Layout, apply_layout
from ..ops import Elementwise, Linear
from ..vocabulary import constant_facts, describe
from .editing import buffer_node, took_place_of
from .inplace import VIEW_MUTATED

# layout changes that only permute axes: the same call lays out a value of any last size
_PERMUTATIONS = {"transpose", "permute", "swapaxes", "swapdims", "movedim", "moveaxis"}
# layout changes given the sizes they produce: the last one is the feature size
_RESHAPES = {"view", "reshape"}
# layout changes given axes only (flatten(0, -2), unflatten of a leading axis)
_AXIS_RESHAPES = {"flatten", "unflatten"}
_ELEMENTWISE = {"mul", "add", "sub", "truediv", "div"}


_STRIDED_VIEWS = {"view": "reshape", "view_as": "reshape_as"}


def _reshapes_for_views(node: fx.Node) -> None:
    """A ``view`` of ``node`` as a ``reshape``: the same values, where ``node`` (a layout change
    moved below the map that made its value contiguous) may have strides no view takes."""
    for reader in node.users:
        if reader.op == "call_method" and reader.target in _STRIDED_VIEWS and reader.args[0] is node:
            reader.target = _STRIDED_VIEWS[reader.target]


def sink_token_layouts(gm: fx.GraphModule, values: Dict[fx.Node, Any], limit: int = 10_000) -> int:
    """Move each last-axis-keeping layout change below the linear maps, per-feature constants
    and same-layout sums that read it; returns how many ops were moved past.  Runs on repc's
    own copy."""
    graph = gm.graph
    names = _PERMUTATIONS | _RESHAPES | _AXIS_RESHAPES
    if not any(n.op in ("call_function", "call_method") and target_name(n) in names for n in graph.nodes):
        return 0
    facts = constant_facts(gm, values)
    shapes: Dict[fx.Node, Tuple[int, ...]] = {}  # of the nodes made here (not recorded yet)

    def shape(node) -> Optional[Tuple[int, ...]]:
        return shapes.get(node) or (facts.shape(node) if isinstance(node, fx.Node) else None)

    todo = [n for n in graph.nodes if _keeps_last_axis(n, facts) and not _undoes_another(n, facts)]
    layouts: Set[fx.Node] = set(todo)  # (those made here keep the last axis by construction)
    count = 0
    while todo and count < limit:
        layout = todo.pop(0)
        if layout.meta.get(VIEW_MUTATED):
            continue
        h = layout.args[0]
        for user in list(layout.users):
            if user.meta.get(VIEW_MUTATED) or _enters_a_module(layout, user):
                continue
            moved = _move_below(gm, facts, shape, layout, h, user)
            if moved is None:
                continue
            inner, outer, out_shape = moved
            shapes[inner] = out_shape[1]
            shapes[outer] = out_shape[0]
            layouts.add(outer)
            took_place_of(user, inner, outer)
            user.replace_all_uses_with(outer)
            graph.erase_node(user)
            _reshapes_for_views(outer)
            todo.append(outer)
            # the ops now reading h (and the other operand of a sum) may move below h's own layout
            todo.extend(a for a in inner.all_input_nodes if a in layouts and a not in todo)
            count += 1
    for node in reversed(list(graph.nodes)):  # layout changes left with no reader (views: no effect)
        if node in layouts and not node.users:
            graph.erase_node(node)
    if count:
        graph.lint()
        gm.recompile()
    return count


def _enters_a_module(layout: fx.Node, user: fx.Node) -> bool:
    """Whether ``user`` runs inside a module that ``layout``'s module calls (its value is that
    module's input): moved below ``user``, the layout change would leave the module's input
    out of the graph, and no module on the way down could be given back as it was (the
    module-preserving output places a merge at a module whose inputs and outputs the graph
    computes).  Below an op of the same module, or of the module that reads the value returned
    (an adapter after an attention), it may move."""
    inner, outer = _module_path(user), _module_path(layout)
    return inner != outer and (outer == "" or inner.startswith(outer + "."))


def _module_path(node: fx.Node) -> str:
    """The path of the module whose forward computes ``node`` (torch.export records it; in an
    fx graph, a module call's own target), ``""`` for the model's own forward."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        path = path[0] if isinstance(path, tuple) else path
        return path if isinstance(path, str) else ""
    return node.target if node.op == "call_module" else ""


def _keeps_last_axis(node: fx.Node, facts: GraphFacts) -> bool:
    """A layout change after which every element keeps its position on the last axis (and the
    elements of one row stay one row), for every input size: read off its arguments for a
    permutation or an axis reshape; for a view or reshape, off the example (a row-major reshape
    that keeps a last axis of more than one element)."""
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    name = target_name(node)
    if name not in _PERMUTATIONS | _RESHAPES | _AXIS_RESHAPES:
        return False
    before, after = facts.shape(node.args[0]), facts.shape(node)
    if not before or not after or before[-1] != after[-1] or node.args[0] not in facts.values:
        return False
    try:
        if not isinstance(describe(node, facts), Layout):
            return False
    except Exception:
        return False
    if name in _PERMUTATIONS or name in _AXIS_RESHAPES:
        return _axes_keep_last(node, len(before), len(after))
    size = before[-1]
    if size < 2:
        return False  # (a last axis of one element: the example cannot tell which axis it is)
    try:
        index = apply_layout(node, torch.arange(torch.Size(before).numel()).reshape(before), facts)
    except Exception:
        return False
    rows = index.reshape(-1, size)
    return bool((rows % size == torch.arange(size)).all()) and bool((rows // size == rows[:, :1] // size).all())


def _axes_keep_last(node: fx.Node, ndim_in: int, ndim_out: int) -> bool:
    """A permutation or an axis reshape whose axis arguments leave the last axis alone."""
    name = target_name(node)
    args = list(node.args[1:]) + list(node.kwargs.values())
    ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)] if name != "permute" else []
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        return all(isinstance(d, int) for d in dims) and bool(dims) and dims[-1] % ndim_in == ndim_in - 1
    if name in ("transpose", "swapaxes", "swapdims"):
        return len(ints) == 2 and all(d % ndim_in != ndim_in - 1 for d in ints)
    if name in ("movedim", "moveaxis"):
        flat = [d for a in args for d in (a if isinstance(a, (list, tuple)) else [a])]
        return all(isinstance(d, int) for d in flat) and all(d % ndim_in != ndim_in - 1 for d in flat)
    if name == "flatten":
        end = ints[1] if len(ints) > 1 else -1  # (flatten(start) runs to the last axis)
        return end % ndim_in != ndim_in - 1
    if name == "unflatten":
        return bool(ints) and ints[0] % ndim_in != ndim_in - 1
    return False


def _undoes_another(layout: fx.Node, facts: GraphFacts, depth: int = 8) -> bool:
    """Whether ``layout`` undoes a layout change made before the elementwise maps between them
    (``bn(x.flatten(0, 1)).view(B, N, C)``): the matcher reads such a sandwich as one per-channel
    map of ``x``, which moving the second layout change away would break."""
    node = layout.args[0]
    between = 0
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method", "call_module"):
            return False
        try:
            meaning = describe(node, facts)
        except Exception:
            return False
        if isinstance(meaning, Layout):
            if not between:
                return False  # (two layout changes in a row: the matcher composes them anyway)
            try:
                shape = facts.shape(meaning.input)
                index = torch.arange(torch.Size(shape).numel()).reshape(shape)
                back = apply_layout(layout, apply_layout(node, index, facts), facts)
            except Exception:
                return False
            return tuple(back.shape) == tuple(shape) and bool(torch.equal(back, index))
        if not (isinstance(meaning, AffineCall) and isinstance(meaning.op, Elementwise)):
            return False
        node, between = meaning.input, between + 1
    return False


def _move_below(gm, facts, shape, layout: fx.Node, h: fx.Node, user: fx.Node):
    """``(user'(h), layout'(user'(h)), (its shape, user'(h)'s shape))`` computing ``user``'s
    value with the layout change after it, or None where ``user`` does not commute with it."""
    graph = gm.graph
    h_shape, laid_shape = shape(h), shape(layout)
    if h_shape is None or laid_shape is None:
        return None
    # a linear map of the last axis
    try:
        meaning = describe(user, facts) if user.op in ("call_module", "call_function", "call_method") else None
    except Exception:
        meaning = None
    if isinstance(meaning, AffineCall) and isinstance(meaning.op, Linear) and meaning.input is layout:
        out_features = meaning.op.weight_shape[0]
        with graph.inserting_before(user):
            inner = _linear_on(gm, user, h, meaning.op)
            outer = _lay_out(graph, layout, inner, out_features, h_shape[-1], facts.values)
        if outer is None:
            graph.erase_node(inner)
            return None
        return inner, outer, (laid_shape[:-1] + (out_features,), h_shape[:-1] + (out_features,))
    if user.op not in ("call_function", "call_method") or user.kwargs or len(user.args) != 2 \
            or target_name(user) not in _ELEMENTWISE:
        return None
    a, b = user.args
    if a is layout and b is layout:
        return None
    other = b if a is layout else a
    if isinstance(other, fx.Node) and other.op in ("call_function", "call_method") and other is not layout \
            and _same_layout(other, layout, shape):
        # the sum (difference...) of two values laid out the same way
        args = (h, other.args[0]) if a is layout else (other.args[0], h)
    elif _per_feature(other, facts, h_shape, laid_shape):
        args = (h, other) if a is layout else (other, h)
    else:
        return None
    with graph.inserting_before(user):
        inner = graph.create_node(user.op, user.target, args, {})
        outer = graph.node_copy(layout, lambda n: inner if n is h else n)
    return inner, outer, (laid_shape, h_shape)


def _linear_on(gm: fx.GraphModule, user: fx.Node, h: fx.Node, op: Linear) -> fx.Node:
    """``user``'s linear map applied to ``h``: the same module or ``F.linear`` call where it
    reads its input first, else ``F.linear`` of its weights (an ``addmm`` of a flattened view)."""
    graph = gm.graph
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.Linear) and len(user.args) == 1:
        return graph.call_module(user.target, (h,))
    if user.op == "call_function" and user.target is F.linear:
        return graph.call_function(F.linear, (h,) + tuple(user.args[1:]), dict(user.kwargs))
    dtype = getattr(user.meta.get("tensor_meta"), "dtype", torch.float32)
    weight = buffer_node(gm, graph, op.weight, dtype)
    bias = None if op.bias is None else buffer_node(gm, graph, op.bias, dtype)
    return graph.call_function(F.linear, (h, weight, bias))


def _lay_out(graph: fx.Graph, layout: fx.Node, value: fx.Node, features: int, features_in: int,
             values: Dict[fx.Node, Any]) -> Optional[fx.Node]:
    """``layout`` applied to ``value``, whose last axis has ``features`` elements (``layout``'s
    own input, ``features_in``): the same call for a permutation or an axis reshape, a reshape
    given the sizes with the last one replaced."""
    name = target_name(layout)
    if name in _PERMUTATIONS or name in _AXIS_RESHAPES:
        return graph.node_copy(layout, lambda n: value if n is layout.args[0] else n)
    sizes = _sizes(layout)
    if sizes is None:
        return None
    last = sizes[-1]
    if isinstance(last, fx.Node) and values.get(last) == features_in:
        last = features_in  # (the feature size read off a value: fixed by the linear map's weights)
    if not (isinstance(last, int) and (last == -1 or last > 0)):
        return None
    if last == -1 and sum(s == -1 for s in sizes if isinstance(s, int)) > 1:
        return None
    return graph.call_function(torch.reshape, (value, list(sizes[:-1]) + [features]))


def _sizes(layout: fx.Node) -> Optional[List[Any]]:
    """The sizes a view or reshape is given (as a list, or as separate arguments)."""
    rest = list(layout.args[1:])
    if layout.kwargs:
        rest = list(layout.kwargs.get("shape", layout.kwargs.get("size", ())))
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        rest = list(rest[0])
    return rest or None


def _same_layout(other: fx.Node, layout: fx.Node, shape) -> bool:
    """``other`` lays out a value of ``layout``'s input shape the way ``layout`` does."""
    if target_name(other) in _RESHAPES and target_name(layout) in _RESHAPES:  # (a view, or a reshape made here)
        sizes = _sizes(other), _sizes(layout)
        return None not in sizes and shape(other.args[0]) == shape(layout.args[0]) and _equal_arg(*sizes)
    if other.op != layout.op or other.target != layout.target or not other.args or len(other.args) != len(layout.args):
        return False
    if shape(other.args[0]) != shape(layout.args[0]) or other.kwargs != layout.kwargs:
        return False
    return all(_equal_arg(x, y) for x, y in zip(other.args[1:], layout.args[1:]))


def _equal_arg(x, y) -> bool:
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_equal_arg(a, b) for a, b in zip(x, y))
    return x is y if isinstance(x, fx.Node) or isinstance(y, fx.Node) else x == y


def _per_feature(other, facts: GraphFacts, h_shape: Sequence[int], laid_shape: Sequence[int]) -> bool:
    """A Python number, or a constant that is one value or one per feature (a vector of the last
    axis' size): it broadcasts alike before and after the layout change."""
    if isinstance(other, (int, float)) and not isinstance(other, bool):
        return True
    const = facts.const(other) if isinstance(other, fx.Node) else None
    if const is None:
        return False
    if const.numel() == 1:
        return const.dim() <= min(len(h_shape), len(laid_shape))
    return const.dim() == 1 and const.shape[0] == h_shape[-1]
