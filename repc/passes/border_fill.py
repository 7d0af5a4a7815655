"""Preparation pass: padding whose border is then filled with a constant, as canonical ops.

:func:`fold_border_fill` rewrites DBB's BN-and-pad (``F.pad`` followed by item assignments
filling the whole border with one per-channel constant ``c``) as ``pad_0(y - c) + c``.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ..meanings import GraphFacts
from ..vocabulary import bind, constant_facts
from .editing import buffer_node


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
        b = bind(node.args[1:], node.kwargs, ["pad", "mode", "value"], {"mode": "constant", "value": None})
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
            c = buffer_node(gm, graph, constant.reshape(view), dtype)
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
