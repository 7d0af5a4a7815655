"""Preparation pass: an activation applied to some channels only, through a constant mask.

RePaViT-style FFNs leave part of the hidden channels linear.  Written with a channel mask,
``torch.where(mask, act(h), h)`` (the mask a buffer, or built from ``zeros_like(h)`` with
slice assignments), the matcher sees one nonlinear op over all channels.
:func:`split_masked_activations` writes it as the concatenation the papers' deploy code
computes: ``cat([h[..., :k], act(h[..., k:])], axis)`` -- one piece per run of channels the
mask treats alike -- so the linear channels join the surrounding linear maps.  Done where the
mask does not depend on the input's values (its recorded value varies along one axis only,
and it is computed from constants and the shapes of values only) and ``act`` acts on each
element alone.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx

from ..graph_predicates import SHAPE_ONLY_FUNCTIONS, in_place_kind, is_elementwise_activation, may_alias, \
    writes_in_place
from ..vocabulary import constant_facts
from .inplace import VIEW_MUTATED
from .metadata_reads import metadata_read
from .move_scales import _feature_axis


def split_masked_activations(gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> int:
    """Rewrite ``where(mask, act(h), h)`` over channel runs as a concat of slices; returns how many."""
    graph = gm.graph
    modules = facts = None
    count = 0
    for node in list(graph.nodes):
        picked = _masked_activation(node)
        if picked is None:
            continue
        mask, inverted, active, h = picked
        modules = modules if modules is not None else dict(gm.named_modules())
        if not is_elementwise_activation(active, modules) or active.args[0] is not h \
                or len(active.all_input_nodes) != 1 or in_place_kind(active, modules) is not None:
            continue  # (an in-place activation also changes h, which the where then reads)
        if any(n.meta.get(VIEW_MUTATED) for n in (h, active)):
            continue  # written in place through an alias: the slices would read another value
        nodes = _mask_nodes(mask, node)
        if nodes is None:
            continue
        facts = facts or constant_facts(gm, values)
        runs = _channel_runs(_mask_value(gm, mask, node, nodes, values), values.get(h), inverted,
                             _feature_axis(h, facts))
        if runs is None:
            continue
        axis, pieces = runs
        ndim = values[h].dim()
        with graph.inserting_before(node):
            parts = []
            for start, stop, on in pieces:
                index = (slice(None),) * axis + (slice(start, stop),)
                part = graph.call_function(operator.getitem, (h, index))
                if on:
                    part = graph.node_copy(active, lambda n: part if n is h else n)
                parts.append(part)
            joined = graph.call_function(torch.cat, (parts, axis - ndim))
        joined.meta.update({k: v for k, v in node.meta.items() if k == "tensor_meta"})
        node.replace_all_uses_with(joined)
        graph.erase_node(node)
        _erase_dead_mask(graph, nodes)
        if not active.users:
            graph.erase_node(active)
        count += 1
    if count:
        gm.recompile()
    return count


def _masked_activation(node: fx.Node) -> Optional[Tuple[fx.Node, bool, fx.Node, fx.Node]]:
    """``(mask, inverted, act(h), h)`` when ``node`` is ``where(mask, act(h), h)`` (or, with
    ``inverted``, ``where(mask, h, act(h))``; function or method form), else None."""
    if node.op == "call_function" and node.target is torch.where and len(node.args) == 3 and not node.kwargs:
        mask, a, b = node.args
    elif node.op == "call_method" and node.target == "where" and len(node.args) == 3 and not node.kwargs:
        a, mask, b = node.args
    else:
        return None
    if not all(isinstance(v, fx.Node) for v in (mask, a, b)):
        return None
    if a.op != "placeholder" and b in a.all_input_nodes:
        return mask, False, a, b
    if b.op != "placeholder" and a in b.all_input_nodes:
        return mask, True, b, a
    return None


def _channel_runs(mask: Any, h: Any, inverted: bool,
                  feature_axis: Optional[int]) -> Optional[Tuple[int, List[Tuple[int, int, bool]]]]:
    """``(axis, [(start, stop, activated)...])`` when the recorded ``mask`` broadcasts to ``h``
    and varies along ``feature_axis`` only (the axis the conv or linear maps computing ``h``
    produce: its size is fixed by their weights, so the runs hold at every input size), else None."""
    if not (isinstance(mask, torch.Tensor) and isinstance(h, torch.Tensor)) or mask.dtype != torch.bool:
        return None
    try:
        full = mask.expand(h.shape)
    except RuntimeError:
        return None
    ndim = h.dim()
    varying = [a for a in range(ndim) if full.shape[a] > 1 and not bool((full == full.narrow(a, 0, 1)).all())]
    if feature_axis is None or varying != [feature_axis % ndim]:
        return None
    axis = varying[0]
    line = full.movedim(axis, -1).reshape(-1, full.shape[axis])[0]  # the mask along that axis
    if inverted:
        line = ~line
    pieces, start = [], 0
    for i in range(1, len(line) + 1):
        if i == len(line) or bool(line[i]) != bool(line[start]):
            pieces.append((start, i, bool(line[start])))
            start = i
    return axis, pieces


def _mask_nodes(mask: fx.Node, reader: fx.Node, limit: int = 64) -> Optional[Set[fx.Node]]:
    """The nodes computing the mask (its writes included) when it is computed from constants
    and the shapes of values only (``zeros_like(h)`` then assignments of constants: an item
    assignment, or an in-place fill of a view as torch.export records ``mask[..., :k] = True``),
    never from their values, and nothing but those nodes and ``reader`` reads the mask's values;
    None otherwise."""
    seen: Set[fx.Node] = set()
    todo = [mask]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > limit or node.op == "placeholder":
            return None
        if node.op == "get_attr":
            if any(_writes_into(u, node) for u in node.users):
                return None  # a buffer written at every call
            continue
        if node.op not in ("call_function", "call_method"):
            return None
        if node.op == "call_function" and node.target in SHAPE_ONLY_FUNCTIONS or metadata_read(node) is not None:
            # reads only the shape, dtype and device of its first argument
            todo.extend(a for a in node.all_input_nodes if a is not node.args[0])
        else:
            todo.extend(node.all_input_nodes)
        # a value written after it was computed (the mask's assignments), directly or through a view
        todo.extend(u for u in node.users if _writes_into(u, node) or (may_alias(u) and u.args and u.args[0] is node))
    for node in seen:
        if any(u not in seen and u is not reader for u in node.users if u.op != "output"):
            return None  # read elsewhere too: another consumer of the mask or of a view of it
    return seen


def _writes_into(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` writes into ``node`` in place (an item assignment, ``fill_``...)."""
    return writes_in_place(user) and bool(user.args) and user.args[0] is node


def _mask_value(gm: fx.GraphModule, mask: fx.Node, reader: fx.Node, nodes: Set[fx.Node], values) -> Any:
    """The mask as ``reader`` sees it: its nodes run again in graph order up to ``reader`` (the
    recorded value of a tensor written in place later is its value before the writes)."""
    interpreter = fx.Interpreter(gm)
    env: Dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node is reader:
            break
        if node not in nodes:
            continue
        for arg in node.all_input_nodes:
            if arg not in env:
                env[arg] = values[arg]
        interpreter.env = env
        with torch.no_grad():
            env[node] = interpreter.run_node(node)
    return env.get(mask)


def _erase_dead_mask(graph: fx.Graph, nodes: Set[fx.Node]) -> None:
    """Remove the mask's own computation, its writes included (``nodes``: once the where is
    gone nothing else reads them), latest first."""
    for node in reversed(list(graph.nodes)):
        if node in nodes and not node.users:
            graph.erase_node(node)
