"""Find mixtures of structurally identical experts: ``sum_i w_i * expert_i(x)``.

A *mixture* is a weighted sum (an add/sub tree with constant scales, or ``stack(...).mean/sum``)
whose terms are computed from one shared input by disjoint subgraphs of identical structure:
the same ops in the same order, modules of the same class and configuration, parameters of
the same shapes.  Only the parameter values differ.  Linear experts need none of this (the
region matcher merges them exactly); this matcher serves Experts Weights Averaging, which
replaces nonlinear experts by one expert with the averaged weights -- an approximation.

Pure analysis: the graph is not touched.  ``find_mixtures`` returns the mixtures and, for
sums that are not mixtures, why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..meanings import AffineCall, Combine, GraphFacts
from ..reasons import Opaque
from ..vocabulary import describe
from ..ops import Elementwise


@dataclass
class Mixture:
    root: fx.Node  # the node whose value is the weighted sum
    source: fx.Node  # the input every expert reads
    weights: List[float]
    experts: List[List[fx.Node]]  # each expert's nodes in graph order, aligned across experts
    others: List[Tuple[fx.Node, float]] = field(default_factory=list)  # the sum's other terms, kept


def _flatten_sum(node: fx.Node, facts: GraphFacts, weight: float, terms: List[Tuple[fx.Node, float]],
                 inner: Set[fx.Node], root: fx.Node) -> None:
    """Terms of the weighted-sum tree rooted at ``node`` (single-use inner nodes only)."""
    try:
        meaning = describe(node, facts)
    except Opaque:
        meaning = None
    single = node is root or len(node.users) == 1
    if single and isinstance(meaning, Combine):
        inner.add(node)
        if node.op == "call_function" and any(a.op == "call_function" and a.target is torch.stack
                                              for a in node.all_input_nodes):
            inner.update(a for a in node.all_input_nodes if a.target is torch.stack)
        for arg, w in meaning.terms:
            _flatten_sum(arg, facts, weight * w, terms, inner, root)
        return
    if single and isinstance(meaning, AffineCall) and isinstance(meaning.op, Elementwise) \
            and (meaning.op.shift is None or not meaning.op.shift.any()) \
            and (meaning.op.scale is None or meaning.op.scale.numel() == 1):
        inner.add(node)
        scale = 1.0 if meaning.op.scale is None else float(meaning.op.scale)
        _flatten_sum(meaning.input, facts, weight * scale, terms, inner, root)
        return
    terms.append((node, weight))


def _expert_nodes(term: fx.Node, stop: Set[fx.Node]) -> Optional[List[fx.Node]]:
    """The nodes computing ``term`` back to (not including) the nodes in ``stop``."""
    seen: Set[fx.Node] = set()
    todo = [term]
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        if n.op == "placeholder":
            return None  # reaches a model input other than the shared source
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return sorted(seen, key=_position(term.graph))


def _position(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _signature(node: fx.Node, modules: Dict[str, nn.Module], gm: fx.GraphModule, index: Dict[fx.Node, int],
               source: fx.Node):
    """What must agree between corresponding nodes of two experts."""
    def arg(a):
        if isinstance(a, fx.Node):
            return ("source",) if a is source else ("node", index.get(a, -1))
        return ("const", repr(a))

    args = fx.node.map_aggregate(node.args, arg)
    kwargs = fx.node.map_aggregate(dict(node.kwargs), arg)
    if node.op == "call_module":
        mod = modules[node.target]
        shapes = tuple((n, tuple(t.shape)) for n, t in list(mod.named_parameters()) + list(mod.named_buffers()))
        return ("call_module", type(mod), mod.extra_repr(), shapes, args, kwargs)
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return ("get_attr", tuple(value.shape) if isinstance(value, torch.Tensor) else repr(value))
    return (node.op, node.target, args, kwargs)


def find_mixtures(gm: fx.GraphModule, facts: GraphFacts) -> Tuple[List[Mixture], Dict[fx.Node, str]]:
    """Weighted sums of identical experts on one input; and, per other sum, why it is not one."""
    modules = dict(gm.named_modules())
    mixtures: List[Mixture] = []
    why_not: Dict[fx.Node, str] = {}
    taken: Set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node in taken:
            continue
        try:
            meaning = describe(node, facts)
        except Opaque:
            continue
        if not isinstance(meaning, Combine):
            continue
        terms: List[Tuple[fx.Node, float]] = []
        inner: Set[fx.Node] = set()
        _flatten_sum(node, facts, 1.0, terms, inner, node)
        if len(terms) < 2:
            continue
        mixture = _largest_mixture(node, terms, gm, modules)
        if isinstance(mixture, str):
            why_not[node] = mixture
            continue
        mixtures.append(mixture)
        taken |= inner
        for e in mixture.experts:
            taken |= set(e)
    return mixtures, why_not


def _largest_mixture(root, terms, gm, modules):
    """The largest group of identical experts among the terms of a sum (others are kept)."""
    reason = "no two terms are identical experts"
    best = None
    remaining = list(terms)
    while len(remaining) >= 2:
        candidate = _as_mixture(root, remaining, gm, modules)
        if not isinstance(candidate, str):
            if best is None or len(candidate.experts) > len(best.experts):
                best = candidate
            break
        reason = candidate
        remaining = remaining[1:]  # drop a term that does not fit (a residual, a bias...)
    if best is None:
        return reason
    members = {e[-1] for e in best.experts}
    best.others = [(t, w) for t, w in terms if t not in members]
    return best


def _as_mixture(root, terms, gm, modules):
    # the shared source: the latest node that every term depends on
    ancestors = [_ancestors(t) for t, _ in terms]
    common = {n for n in set.intersection(*ancestors) if n.op != "get_attr"}
    if not common:
        return "the terms share no input"
    order = _position(root.graph)
    source = max(common, key=order)
    experts = []
    for t, _ in terms:
        nodes = _expert_nodes(t, {source})
        if not nodes:
            return "a term reads model inputs other than the shared one"
        experts.append(nodes)
    all_nodes = [n for e in experts for n in e]
    if len(set(all_nodes)) != len(all_nodes):
        return "the experts share intermediate values"
    for e in experts:
        members = set(e)
        for n in e:
            if n is not e[-1] and any(u not in members for u in n.users):
                return "an expert's intermediate value is read outside it"
            if n.op == "placeholder":
                return "an expert reads a model input"
    if any(len(e) != len(experts[0]) for e in experts):
        return "the experts have different structures"
    sigs = []
    for e in experts:
        index = {n: i for i, n in enumerate(e)}
        sigs.append([_signature(n, modules, gm, index, source) for n in e])
    if any(s != sigs[0] for s in sigs[1:]):
        return "the experts have different structures"
    if not any(n.op in ("call_module", "get_attr") for n in experts[0]):
        return "the experts have no parameters"
    return Mixture(root, source, [w for _, w in terms], experts)


def _ancestors(node: fx.Node) -> Set[fx.Node]:
    seen: Set[fx.Node] = set()
    todo = list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen
