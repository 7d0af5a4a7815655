"""The cost decision: whether a region's merged form replaces the region as written.

A cost model prices the region as written and its merged form:

* :class:`MacCost` (the default) -- multiply-adds;
* :class:`LatencyCost` -- seconds predicted by a calibrated :class:`repc.latency.LatencyModel`
  (per-op overhead, arithmetic and memory traffic by op kind), so that a merge which adds
  multiply-adds but removes ops (convs of different dilations, a depthwise branch with its
  residual) can pay;
* :class:`MeasuredCost` -- seconds measured on the example, the region as written against its
  merged form (opt-in: it runs every candidate).

A merged form is taken when it costs no more than the region as written, nor than the region
with its operand regions at their own cheapest (:func:`best_cost`, dynamic programming over the
region tree), and, at equal cost, when it takes fewer ops (or its weights were computed at every
call from parameters: folding them saves that work).  :func:`decide` is pure: it reads the two costs and returns a
:class:`Decision`.  The collapse pass (:mod:`repc.passes.collapse`) asks it, then runs the
per-region check on what it takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..latency import LatencyModel, add_features, fastest_seconds
from ..meanings import AffineCall, Combine, Concat
from ..ops import Conv, Elementwise
from ..patterns.regions import Expr, RegionMatcher
from ..reasons import RejectionKind
from .emit import form_function, source_dtype
from .norm_affine import NORM_AFFINE


class MacCost:
    """Multiply-adds on the example shapes (the region's, as the matcher counted them)."""
    unit = "multiply-adds"

    def region_cost(self, expr: Expr, matcher: RegionMatcher) -> float:
        return expr.cost

    def form_cost(self, form, node, matcher: RegionMatcher) -> float:
        return matcher.form_cost(form, node)

    def node_cost(self, node, matcher: RegionMatcher) -> float:
        return matcher.own_cost.get(node, 0)

    def words(self, cost: float) -> str:
        return f"{int(cost)}"


class LatencyCost:
    """Seconds on the example shapes as predicted by ``model``, for values of ``itemsize`` bytes."""
    unit = "us predicted"

    def __init__(self, model: LatencyModel, itemsize: int = 4):
        self.model, self.itemsize = model, itemsize

    def region_cost(self, expr: Expr, matcher: RegionMatcher) -> float:
        return sum(self.node_cost(n, matcher) for n in expr.region)

    def node_cost(self, node, matcher: RegionMatcher) -> float:
        """One node of a region as the model computes it."""
        meaning, shape = matcher.meanings.get(node), matcher.facts.shape
        if isinstance(meaning, AffineCall):
            return self.model.op_seconds(meaning.op, shape(meaning.input), shape(node), self.itemsize)
        if isinstance(meaning, Combine):
            return (len(meaning.terms) - 1) * self.model.time(add_features(shape(node), self.itemsize))
        if isinstance(meaning, Concat):  # a copy of every part
            return self.model.time(add_features(shape(node), self.itemsize)) * 2 / 3
        return 0.0  # slices and layout changes are views

    def form_cost(self, form, node, matcher: RegionMatcher) -> float:
        out = matcher.facts.shape(node)
        terms = sum(self.model.op_seconds(op, matcher.facts.shape(src), out, self.itemsize) for src, op in form.items())
        return terms + (len(form) - 1) * self.model.time(add_features(out, self.itemsize))

    def words(self, cost: float) -> str:
        return f"{cost * 1e6:.1f}"


class MeasuredCost:
    """Seconds measured on the example: the region as written (its own modules, on the
    recorded values of its sources) against its merged form (the ops as emitted), the faster
    of ``repeats`` timed calls each.  Opt-in (``cost="measure"``): it runs every candidate,
    and a timing is only as steady as the machine."""
    unit = "us measured"

    def __init__(self, repeats: int = 5):
        self.repeats = repeats
        self.runner = self.device = None
        self._region_times: dict = {}

    def bind(self, runner, device) -> "MeasuredCost":
        """The region runner and device of the graph being collapsed."""
        self.runner, self.device = runner, device
        return self

    def region_cost(self, expr: Expr, matcher: RegionMatcher) -> float:
        key = (expr.node, frozenset(expr.region))
        if key not in self._region_times:
            values = self.runner.values
            sources = {n: values[n] for n in _sources(expr, matcher)}
            self._region_times[key] = fastest_seconds(lambda: self.runner.run(expr, sources), self.device, self.repeats)
        return self._region_times[key]

    def form_cost(self, form, node, matcher: RegionMatcher) -> float:
        values = self.runner.values
        ref = values[node]
        run = form_function(form, ref.dtype, self.device)
        inputs = [values[s] for s in form]
        return fastest_seconds(lambda: run(*inputs), self.device, self.repeats)

    def words(self, cost: float) -> str:
        return f"{cost * 1e6:.1f}"


def _sources(expr: Expr, matcher: RegionMatcher):
    """The values the region reads from outside (what its form reads, else its leaves' inputs)."""
    if expr.has_form:
        return list(expr.form)
    inside = expr.region
    return sorted({a for n in inside for a in n.all_input_nodes if a not in inside and a not in matcher.facts.constants},
                  key=matcher.order.__getitem__)


@dataclass(frozen=True)
class Decision:
    """Take the form (``merge``) or not; ``kind`` and ``words`` when a refusal is worth
    reporting; ``rewrite``: a taken form is a rewrite to check and report (a norm's own affine
    put back into the norm is not)."""
    merge: bool
    kind: Optional[RejectionKind] = None
    words: str = ""
    rewrite: bool = True


def best_cost(expr: Expr, model, matcher: RegionMatcher, memo: Optional[dict] = None) -> float:
    """The cheapest way to compute ``expr``'s region: its merged form, or its root as written
    with every operand region computed its own cheapest way (dynamic programming over the
    region tree; a region two operands share counts once)."""
    memo = {} if memo is None else memo
    if id(expr) in memo:
        return memo[id(expr)][1]
    best = parts_cost(expr, model, matcher, memo)
    if expr.has_form and len(expr.region) > 1:
        best = min(best, model.form_cost(expr.form, expr.node, matcher))
    # the expr is kept with its cost: a memo keyed by the id of an expr that was freed (the
    # shallower forms tried are made and dropped) would give its cost to the next one made there
    memo[id(expr)] = (expr, best)
    return best


def parts_cost(expr: Expr, model, matcher: RegionMatcher, memo: Optional[dict] = None) -> float:
    """``expr``'s root op as written plus each operand region at its :func:`best_cost`.  An
    operand that is a source of the operand tree but inside the region (a fork the region
    absorbed: ``y`` of ``y + up(down(y))``) counts as its own region does."""
    memo = {} if memo is None else memo
    total, seen, covered = model.node_cost(expr.node, matcher), set(), {expr.node}
    for child in expr.children:
        if child.is_leaf and child.node in expr.region and child.node is not expr.node:
            child = matcher.exprs.get(child.node, child)
        if child.is_leaf or id(child) in seen:
            continue
        seen.add(id(child))
        covered |= child.region
        total += best_cost(child, model, matcher, memo)
    # nodes of the region no operand region covers (layout changes, slices) count as written
    return total + sum(model.node_cost(n, matcher) for n in expr.region - covered)


def decide(expr: Expr, form_cost: float, computed_weights: bool, region_cost: Optional[float] = None,
           model=None, parts: Optional[float] = None) -> Decision:
    """Whether ``expr``'s form (costing ``form_cost``) replaces its region as written (costing
    ``region_cost``; its multiply-adds ``expr.cost`` by default), priced by ``model``
    (:class:`MacCost` by default).  ``parts``: the cost of the region with its operand regions
    merged on their own (:func:`parts_cost`); a whole that costs more than that is refused, and
    its parts then decide for themselves."""
    model = model or MacCost()
    region_cost = expr.cost if region_cost is None else region_cost
    if all(NORM_AFFINE in n.meta for n in expr.region):
        return Decision(True, rewrite=False)  # a norm's own affine tail, put back into the norm as it was
    if form_cost > region_cost:
        return Decision(False, RejectionKind.DOES_NOT_PAY,
                        f"does not pay: {model.words(form_cost)} {model.unit} merged vs "
                        f"{model.words(region_cost)} as written")
    if parts is not None and form_cost > parts and not math.isclose(form_cost, parts, rel_tol=1e-12):
        return Decision(False, RejectionKind.DOES_NOT_PAY,
                        f"does not pay: {model.words(form_cost)} {model.unit} merged vs "
                        f"{model.words(parts)} with its operands merged on their own")
    if math.isclose(form_cost, region_cost, rel_tol=1e-12) and not computed_weights and \
            op_count(expr.form, source_dtype(expr.node)) >= len(expr.region):
        return Decision(False)  # same work in as many ops: nothing to gain
    return Decision(True)


def op_count(form, dtype: Optional[torch.dtype] = None) -> int:
    """How many graph ops emitting ``form`` in ``dtype`` takes (a cast for each source of another
    floating dtype: :func:`repc.passes.emit.in_dtype`)."""
    count = len(form) - 1
    if dtype is not None:
        count += sum(1 for src in form if (have := source_dtype(src)) not in (None, dtype) and have.is_floating_point)
    for op in form.values():
        if isinstance(op, Elementwise):
            count += (op.scale is not None) + (op.shift is not None)
        else:
            count += 1 + (isinstance(op, Conv) and any(lo != hi or lo < 0 for lo, hi in op.padding))
    return count
