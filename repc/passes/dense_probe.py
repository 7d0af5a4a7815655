"""Dense maps read off affine regions by probing, where the closed forms leave parts apart.

Where the closed forms do not cover all of an affine region (a fully-connected layer over a
flattened map next to convolutions: RepMLP), the region is still affine at the example's
per-sample shape: a zero input gives the bias, unit impulses give the matrix.
:meth:`DenseProbe.candidate` returns that dense form (a :class:`repc.ops.Dense` per source)
when it would cost less than the region as written and than the closed forms' partial merge,
and when the region takes the example's sizes only (a dense map would tie a size-generic
region to one size).  The collapse pass checks and emits it like any other form.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from ..meanings import Layout
from ..ops import Dense, NotMergeable
from ..patterns.regions import Expr, RegionMatcher
from ..reasons import MergeKind, MergeRule
from ..verify.region_check import RegionRunner


class DenseProbe:
    DENSE_LIMIT = 1 << 22  # matrix entries per source a probe may read off

    def __init__(self, matcher: RegionMatcher, runner: RegionRunner):
        self.matcher, self.runner = matcher, runner
        self.facts, self.values = matcher.facts, runner.values

    def candidate(self, expr: Expr) -> Optional[Expr]:
        """The whole affine cone of ``expr.node`` as one dense map (an :class:`Expr` of kind
        ``"dense"`` with its form and its cost as written), or None where it does not apply or
        would not pay.  The result is shape-specialized."""
        node = expr.node
        cone, sources = self.matcher.affine_cone(node)
        covered = expr.region if not expr.is_leaf else {node}
        if len(cone) < 2 or set(cone) <= covered or not sources or len(sources) > 3:
            return None
        if not any(isinstance(self.matcher.meanings.get(n), Layout) for n in cone):
            return None  # the region works for any input size: keep it so (only fixed-size regions are probed)
        out_shape = self.facts.shape(node)
        shapes = [self.facts.shape(s) for s in sources]
        if out_shape is None or any(sh is None or not sh for sh in shapes):
            return None
        n_out = math.prod(out_shape[1:])
        if any(math.prod(sh[1:]) * n_out > self.DENSE_LIMIT for sh in shapes):
            return None
        batch = out_shape[0]
        dense_cost = sum(batch * n_out * math.prod(sh[1:]) for sh in shapes) + batch * n_out * (len(sources) - 1)
        as_written = sum(self.matcher.own_cost.get(n, 0) for n in cone)
        rest = sum(self.matcher.own_cost.get(n, 0) for n in cone if n not in covered)
        partial = (self.matcher.form_cost(expr.form, node) if expr.has_form else expr.cost) + rest
        if dense_cost >= min(as_written, partial):
            return None
        probe = Expr(node, "dense", region=set(cone), rules={MergeRule.SYNTHESIZE})
        if self.accepts_other_sizes(probe, sources):
            return None
        try:
            probe.form = self.read_off(probe, sources)
        except Exception:
            return None
        probe.cost = as_written
        return probe

    def accepts_other_sizes(self, probe: Expr, sources: List[fx.Node]) -> bool:
        """Whether the region as written also runs on other per-sample sizes: any one map axis
        (or the token axis) one larger or one smaller, the others as recorded (a stride can
        take two sizes to the same output, so every axis and both ways are tried)."""
        shapes = {s: list(self.values[s].shape) for s in sources}
        trials = []
        for s, shape in shapes.items():
            axes = range(2, len(shape)) if len(shape) >= 4 else (range(1, 2) if len(shape) == 3 else ())
            trials.extend((s, a, d) for a in axes for d in (1, -1) if shape[a] + d >= 1)
        for s, a, d in trials:
            inputs = {}
            for t, shape in shapes.items():
                shape = list(shape)
                if t is s:
                    shape[a] += d
                v = self.values[t]
                inputs[t] = torch.zeros(shape, dtype=v.dtype, device=v.device)
            try:
                self.runner.run(probe, inputs)
            except Exception:
                continue
            return True
        return False

    def read_off(self, probe: Expr, sources: List[fx.Node]) -> Dict[fx.Node, Dense]:
        """The region's dense map per source, in float64: the bias from a zero input, the
        matrix from unit impulses (one batch row per input entry)."""
        ref = self.values[probe.node]
        if not isinstance(ref, torch.Tensor) or not ref.is_floating_point():
            raise NotMergeable(MergeKind.NOT_FLOATING, "not a floating-point tensor")

        def zeros(s, batch):
            v = self.values[s]
            return torch.zeros((batch,) + tuple(v.shape[1:]), dtype=torch.float64, device=v.device)

        base = {s: zeros(s, 1) for s in sources}
        bias = self.runner.run(probe, base, exact=True).reshape(-1)
        out_shape = tuple(ref.shape[1:])
        form = {}
        for i, s in enumerate(sources):
            v = self.values[s]
            n_in = math.prod(v.shape[1:])
            inputs = {t: zeros(t, n_in) for t in sources}
            inputs[s] = torch.eye(n_in, dtype=torch.float64, device=v.device).reshape((n_in,) + tuple(v.shape[1:]))
            out = self.runner.run(probe, inputs, exact=True).reshape(n_in, -1) - bias
            form[s] = Dense(out.T.contiguous().cpu(), bias.cpu() if i == 0 else None, tuple(v.shape[1:]), out_shape)
        return form
