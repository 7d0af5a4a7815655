"""Preparation passes: move constant scales to where they fold into a conv or linear map.

* :func:`push_scales_into_concat` -- ``E(cat(parts)) = cat(E_i(part_i))`` for a per-channel map
  ``E`` on the concatenation axis (a BN after a depth concat folds into the branches);
* :func:`push_scales_into_matmul` -- ``(a @ b) * c = (a * c) @ b`` for a scalar ``c`` (an
  attention scale folds into the query projection, or into its slice of a fused qkv map).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from ..graph_predicates import call_target, target_name
from ..meanings import AffineCall, Combine, Concat, GraphFacts, Layout, Slice
from ..ops import Conv, Elementwise, Linear
from ..vocabulary import bind, constant_facts, describe
from .editing import buffer_node

_CAT = {torch.cat, torch.concat, torch.concatenate}


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
            b = bind(cat.args, cat.kwargs, ["tensors", "dim"], {"dim": 0})
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
                piece = graph.call_function(operator.mul, (part, buffer_node(gm, graph, scale[rows].reshape(view), dtype)))
                piece = graph.call_function(operator.add, (piece, buffer_node(gm, graph, shift[rows].reshape(view), dtype)))
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
    if not any(call_target(n) in _MATMULS for n in graph.nodes if n.op in ("call_function", "call_method")):
        return 0
    facts = constant_facts(gm, values)
    count = 0
    for node in list(graph.nodes):
        products = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.op in ("call_function", "call_method")
                    and call_target(a) in _MATMULS and len(a.users) == 1 and len(a.args) == 2 and not a.kwargs
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
                vector = buffer_node(gm, graph, _slice_scale(part, facts.shape(target), scale),
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
        if user.op in ("call_function", "call_method") and target_name(user) in ("chunk", "split") and user.args[0] is base:
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
