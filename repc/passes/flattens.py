"""Preparation pass: a linear map moved before a reshape that flattens tokens.

:func:`push_linears_before_flattens` rewrites ``L(h.view(-1, C))`` as ``flatten(L(h), 0, -2)``
(GPT-2's Conv1D), so a norm's affine before the reshape folds into ``L``.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph_predicates import target_name
from ..meanings import AffineCall, Layout
from ..ops import Linear
from ..vocabulary import constant_facts, describe
from .editing import buffer_node, took_place_of


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
    if not any(target_name(n) in _FLATTENS for n in graph.nodes if n.op in ("call_function", "call_method")):
        return 0
    facts = None
    count = 0
    for node in list(graph.nodes):
        if not (node.op in ("call_function", "call_method", "call_module") and node.all_input_nodes):
            continue
        if not any(target_name(a) in _FLATTENS for a in node.all_input_nodes if a.op in ("call_function", "call_method")):
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
            weight = buffer_node(gm, graph, op.weight, dtype)
            bias = None if op.bias is None else buffer_node(gm, graph, op.bias, dtype)
            mapped = graph.call_function(F.linear, (h, weight, bias))
            flattened = graph.call_function(torch.flatten, (mapped, 0, -2))
        took_place_of(node, mapped, flattened)
        node.replace_all_uses_with(flattened)
        graph.erase_node(node)
        if not flat.users:
            graph.erase_node(flat)
        count += 1
    if count:
        gm.recompile()
    return count
