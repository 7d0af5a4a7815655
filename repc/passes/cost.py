"""The cost decision: whether a region's merged form replaces the region as written.

The cost is multiply-adds: a merged form is taken when it costs no more than the region as
written and, at equal cost, when it takes fewer ops (or its weights were computed at every
call from parameters: folding them saves that work).  :func:`decide` is pure: it reads the
region and its form's cost, and returns a :class:`Decision`.  The collapse pass
(:mod:`repc.passes.collapse`) asks it, then runs the per-region check on what it takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..ops import Conv, Elementwise
from ..patterns.regions import Expr
from ..reasons import RejectionKind
from .norm_affine import NORM_AFFINE


@dataclass(frozen=True)
class Decision:
    """Take the form (``merge``) or not; ``kind`` and ``words`` when a refusal is worth
    reporting; ``rewrite``: a taken form is a rewrite to check and report (a norm's own affine
    put back into the norm is not)."""
    merge: bool
    kind: Optional[RejectionKind] = None
    words: str = ""
    rewrite: bool = True


def decide(expr: Expr, form_cost: int, computed_weights: bool) -> Decision:
    """Whether ``expr``'s form (costing ``form_cost`` multiply-adds) replaces its region as written."""
    if all(NORM_AFFINE in n.meta for n in expr.region):
        return Decision(True, rewrite=False)  # a norm's own affine tail, put back into the norm as it was
    if form_cost > expr.cost:
        return Decision(False, RejectionKind.DOES_NOT_PAY,
                        f"does not pay: {form_cost} multiply-adds merged vs {expr.cost} as written")
    if form_cost == expr.cost and op_count(expr.form) >= len(expr.region) and not computed_weights:
        return Decision(False)  # same work in as many ops: nothing to gain
    return Decision(True)


def op_count(form) -> int:
    """How many graph ops emitting ``form`` takes."""
    count = len(form) - 1
    for op in form.values():
        if isinstance(op, Elementwise):
            count += (op.scale is not None) + (op.shift is not None)
        else:
            count += 1 + (isinstance(op, Conv) and any(lo != hi or lo < 0 for lo, hi in op.padding))
    return count
