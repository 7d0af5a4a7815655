"""Experts Weights Averaging: a mixture of identical experts becomes one averaged expert.

``sum_i w_i * E(x; theta_i)  ~  (sum_i w_i) * E(x; sum_i w_i theta_i / sum_i w_i)``

Exact when the experts are linear in their parameters' effect (and then the region matcher
already merges them exactly); for nonlinear experts it is an approximation whose quality
depends on how close training pulled the experts together.  It runs only when the user asks
(``allow_approximate=True``), and the caller measures and reports the deviation.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import List

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from ..graph_predicates import fetch_attr
from ..meanings import AffineCall, GraphFacts
from ..vocabulary import constant_facts, describe
from ..ops import flops
from ..patterns.experts import Mixture, find_mixtures
from .emit import AttributeNamer


@dataclass
class AveragedMixture:
    root: str
    experts: int
    weights: List[float]
    replaced: List[str]
    params_before: int
    params_after: int
    flops_before: int = 0
    flops_after: int = 0


def _meaning(node: fx.Node, facts: GraphFacts):
    if node in facts.constants:
        return "constant"
    try:
        return describe(node, facts)
    except Exception:
        return None


def _macs(node: fx.Node, facts: GraphFacts) -> int:
    meaning = _meaning(node, facts)
    if isinstance(meaning, AffineCall):
        return flops(meaning.op, facts.shape(meaning.input), facts.shape(node))
    return 0


def _mean(tensors: List[torch.Tensor], weights: List[float]) -> torch.Tensor:
    """``sum_i w_i t_i`` in float64, cast back (integer tensors keep the first expert's value)."""
    if not tensors[0].is_floating_point():
        return tensors[0].clone()
    acc = sum(w * t.detach().double() for w, t in zip(weights, tensors))
    return acc.to(tensors[0].dtype)


def average_experts(gm: fx.GraphModule, example_inputs) -> List[AveragedMixture]:
    """Replace every mixture of identical experts in ``gm`` (repc's own copy) by one expert."""
    with torch._guards.tracing(None), torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    facts = constant_facts(gm)  # parameters and what is computed from them only (a softmax gate)
    mixtures, _ = find_mixtures(gm, facts)
    modules = dict(gm.named_modules())
    namer = AttributeNamer(gm)
    done = []
    for mix in mixtures:
        if all(_meaning(n, facts) is not None for e in mix.experts for n in e):
            continue  # linear experts: the exact merge takes them, no approximation needed
        per_expert = sum(_macs(n, facts) for n in mix.experts[0])
        averaged = _average(gm, mix, modules, namer)
        averaged.flops_before, averaged.flops_after = per_expert * len(mix.experts), per_expert
        done.append(averaged)
    if done:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return done


def _average(gm: fx.GraphModule, mix: Mixture, modules, namer: AttributeNamer) -> AveragedMixture:
    graph = gm.graph
    total = sum(mix.weights)
    share = [w / total for w in mix.weights]
    env = {}
    before = after = 0
    with graph.inserting_before(mix.root):
        for position, node in enumerate(mix.experts[0]):
            peers = [e[position] for e in mix.experts]
            if node.op == "call_module":
                mods = [modules[p.target] for p in peers]
                merged = copy.deepcopy(mods[0])
                with torch.no_grad():
                    for name, t in list(merged.named_parameters()) + list(merged.named_buffers()):
                        t.copy_(_mean([fetch_attr(m, name) for m in mods], share))
                before += sum(p.numel() for m in mods for p in m.parameters())
                after += sum(p.numel() for p in merged.parameters())
                new = graph.call_module(namer.module(f"{node.target}_averaged", merged),
                                        fx.node.map_arg(node.args, lambda a: env.get(a, a)),
                                        fx.node.map_arg(node.kwargs, lambda a: env.get(a, a)))
            elif node.op == "get_attr":
                values = [fetch_attr(gm, p.target) for p in peers]
                merged_value = _mean(values, share)
                before += sum(v.numel() for v in values)
                after += merged_value.numel()
                new = graph.get_attr(namer.buffer(f"{node.target}_averaged", merged_value))
            else:
                new = graph.node_copy(node, lambda a: env.get(a, a))
            env[node] = new
        out = env[mix.experts[0][-1]]
        if total != 1.0:
            out = graph.call_function(operator.mul, (out, total))
        for term, weight in mix.others:
            if weight != 1.0:
                term = graph.call_function(operator.mul, (term, weight))
            out = graph.call_function(operator.add, (out, term))
    mix.root.replace_all_uses_with(out)
    return AveragedMixture(mix.root.name, len(mix.experts), list(mix.weights),
                           [n.name for e in mix.experts for n in e], before, after)
