"""Preparation pass: a constant-weighted sum over a stack, written as an explicit sum.

:func:`expand_weighted_stacks` rewrites ``einsum('e,e...->...', w, stack(outs))``,
``(w * stack(outs)).sum(0)`` and ``stack(outs, -1) @ w`` (expert mixtures with fixed gates) as
``w[0] * out_0 + ... + w[E-1] * out_{E-1}``.
"""

from __future__ import annotations

import operator
from typing import Any, Dict

import torch
import torch.fx as fx

from ..graph_predicates import call_target
from ..meanings import GraphFacts
from ..vocabulary import bind, constant_facts


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
        b = bind(n.args, n.kwargs, ["tensors", "dim"], {"dim": 0})
        ndim = len(facts.shape(n) or ())
        if not ndim or (axis is not None and b["dim"] % ndim != axis % ndim):
            return None
        return n, b["dim"] % ndim, ndim

    def vector(arg, size):
        w = facts.const(arg) if isinstance(arg, fx.Node) else None
        if w is None or w.numel() != size:
            return None
        return [float(v) for v in w.reshape(-1).to(torch.float64)]

    key = call_target(node)
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
        b = bind(node.args[1:], node.kwargs, ["dim", "keepdim"], {"dim": None, "keepdim": False})
        product = node.args[0]
        if b["keepdim"] or not isinstance(b["dim"], int) or call_target(product) not in (operator.mul, torch.mul, "mul") \
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
