"""The per-region check: a merged form against the region as written, before it is emitted.

* :class:`RegionRunner` evaluates a region's original nodes on other values of its sources
  (the model's own modules, or in float64 through each node's canonical op);
* :class:`RegionChecker` compares a form with the region on small random inputs at another
  batch size where the region runs on them, on the recorded example values where it does not;
* :func:`non_finite_weights` says why a form's merged tensors cannot be emitted (NaN or Inf).

The whole-model check after all rewrites is :mod:`repc.verify.check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.fx as fx

from .. import algebra
from ..meanings import AffineCall, GraphFacts
from ..passes.emit import build_op, form_function
from ..passes.metadata_reads import metadata_read
from ..patterns.regions import Expr, RegionMatcher, is_container
from .check import deviation, non_finite, quiet_call, tolerance


class RegionRunner:
    """Evaluates the original nodes of a region on other source values."""

    def __init__(self, gm: fx.GraphModule, facts: GraphFacts, matcher: RegionMatcher):
        self.facts, self.matcher = facts, matcher
        self.values = facts.values
        self.interp = fx.Interpreter(gm)
        self.read_sizes_outside = False  # whether the last run read a size of a value outside the region

    def run(self, expr: Expr, sources: Dict[fx.Node, torch.Tensor], exact: bool = False):
        """The region's output on ``sources``.  ``exact``: in float64, each conv/linear/BN through
        its canonical op (``algebra.apply``) rather than the model's own lower-precision module.
        Sets :attr:`read_sizes_outside` where the region read the example's sizes of a value
        outside it (then only the example's sizes fit)."""
        self.read_sizes_outside = False
        env = dict(sources)
        for node in self.matcher.in_order(expr.region):
            self._provide_inputs(node, env)
            meaning = self.matcher.meanings.get(node)
            if exact and isinstance(meaning, AffineCall):
                env[node] = algebra.apply(meaning.op, env[meaning.input])
            else:
                env[node] = self._eval(node, env)
        return env[expr.node]

    def _provide_inputs(self, node: fx.Node, env) -> None:
        for arg in node.all_input_nodes:
            if arg in env:
                continue
            if arg in self.facts.constants:
                env[arg] = self.values[arg]
            elif is_container(arg) or not isinstance(self.values.get(arg), torch.Tensor):
                # a tuple/stack of region values, or shape arithmetic (x.shape[0]): recompute
                self._provide_inputs(arg, env)
                env[arg] = self._eval(arg, env)
            elif metadata_read(node) is not None:
                # the shape of a value outside the region (x.shape of the model's input): the
                # example's, which fits the example's sizes only
                env[arg] = self.values[arg]
                self.read_sizes_outside = True
            else:
                raise RuntimeError(f"region input {arg.name} is not a source")

    def _eval(self, node, env):
        self.interp.env = env
        with torch.no_grad():
            return self.interp.run_node(node)


@dataclass(frozen=True)
class RegionVerdict:
    ok: bool
    deviation: float
    why: str = ""  # why not, in words


class RegionChecker:
    """Checks merged forms against their regions as written."""

    SMALL = 7  # per-axis size of the small trial maps

    def __init__(self, runner: RegionRunner, device):
        self.runner, self.device = runner, device
        self.values = runner.values

    def check(self, expr: Expr, seed: int) -> RegionVerdict:
        """The merged ops against the region as written, on small random inputs at another batch
        size where the region runs on them (every border of a map is still there at 7x7), on the
        recorded example values where it does not.  NaN or Inf never passes: the region as written
        giving them means there is nothing to compare, the merged ops giving them where the region
        is finite is a failure."""
        sources = list(expr.form)
        ref = self.values[expr.node]
        if not isinstance(ref, torch.Tensor):
            return RegionVerdict(False, float("inf"), "region output is not a tensor")
        # the least precise dtype the region reads or gives bounds how closely it can be matched
        tol = max([tolerance(ref.dtype)] + [tolerance(self.values[s].dtype) for s in sources
                                             if isinstance(self.values.get(s), torch.Tensor)])
        merged = form_function(expr.form, ref.dtype, self.device)
        trial = self.small_trial(expr, sources, seed)
        name, inputs, want = trial if trial is not None else ("example", [self.values[s] for s in sources], ref)
        bad = non_finite(want)
        if bad is not None:
            return RegionVerdict(False, float("inf"), f"the region as written gives {bad} on the {name} input")
        with torch.no_grad():
            try:
                got = quiet_call(merged, inputs)
            except Exception as why:
                return RegionVerdict(False, float("inf"), f"merged op failed on {name} input: {why}")
        dev = deviation(got, want)
        if dev > tol:
            bad = non_finite(got)
            if bad is not None:
                return RegionVerdict(False, dev, f"the merged op gives {bad} on the {name} input, "
                                                 "where the region as written is finite")
            return RegionVerdict(False, dev, f"deviation {dev:.3g} > {tol:g} on the {name} input")
        return RegionVerdict(True, dev)

    # the trials, smallest first: how each source of 4+ axes (a map) and of 3 axes (tokens, or
    # a 1-d signal) is shrunk; a source of another rank only changes its batch
    TRIALS = (("maps", "tokens"), ("channels-last", "tokens"), ("maps", "length"), ("channels-last", "length"),
              ("maps", None), ("channels-last", None), (None, "tokens"), (None, "length"), (None, None))

    def small_trial(self, expr: Expr, sources: List[fx.Node], seed: int):
        """``(name, inputs, region output)`` on small random source values at another batch size
        (2, or 1 when the example's is 2): maps shrunk to 7 per axis, tokens to 7, every source at
        once (a region of a 197-token sequence is checked on 7); where the region as written takes
        no such shape, fewer axes shrunk, the batch alone last; None if it runs on none of them (it
        fits its example's sizes only)."""
        gen = torch.Generator().manual_seed(seed)
        shapes = [list(self.values[s].shape) for s in sources]
        tried = set()
        for shrink_map, shrink_3d in self.TRIALS:
            trial = []
            for shape in shapes:
                shape = list(shape)
                if shape:
                    shape[0] = 1 if shape[0] == 2 else 2
                axes = {"maps": range(2, len(shape)), "channels-last": range(1, len(shape) - 1),
                        None: ()}[shrink_map] if len(shape) >= 4 else \
                    {"tokens": (1,), "length": (2,), None: ()}[shrink_3d] if len(shape) == 3 else ()
                for a in axes:
                    shape[a] = min(shape[a], self.SMALL)
                trial.append(tuple(shape))
            if tuple(trial) in tried:
                continue
            tried.add(tuple(trial))
            inputs = [torch.randn(shape, generator=gen, dtype=torch.float32).to(self.values[s].dtype)
                      .to(self.values[s].device) for s, shape in zip(sources, trial)]
            try:
                want = self.runner.run(expr, dict(zip(sources, inputs)))
            except Exception:
                continue
            if self.runner.read_sizes_outside:
                # ``view(B, -1, H, W)`` with B read off the model's input: at another batch it may
                # still run, folding the batch into the ``-1``, and give no value to compare with
                return None
            if not isinstance(want, torch.Tensor) or want.dim() != self.values[expr.node].dim():
                continue
            return f"random {'x'.join(map(str, trial[0]))}", inputs, want
        return None


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t`` (read off its extremes: no copy of ``t``)."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def non_finite_weights(form, dtype, device=torch.device("cpu")) -> Optional[str]:
    """Why the form's merged tensors cannot be emitted: NaN or Inf in one of them as built in
    ``dtype`` (the very tensors the graph will hold, :func:`repc.passes.emit.build_op`), from
    non-finite weights or statistics, or from finite values too large for ``dtype`` (a product
    beyond float16's range); None if all are finite."""
    for op in form.values():
        built = build_op(op, dtype, device)
        module = built.module
        for name, t in (("weight", getattr(module, "weight", None)), ("bias", getattr(module, "bias", None)),
                        ("scale", built.scale), ("shift", built.shift)):
            if t is None or not t.is_floating_point() or _finite(t):
                continue
            bad = ~torch.isfinite(t)
            nan = int(torch.isnan(t).sum())
            what = " and ".join(w for w, n in (("NaN", nan), ("Inf", int(bad.sum()) - nan)) if n)
            exact = getattr(op, name)  # (float64: where the non-finite values come from)
            why = ("it is computed from non-finite weights or statistics" if not torch.isfinite(exact).all() else
                   f"its values are too large for {str(dtype).replace('torch.', '')}")
            return f"the merged {type(op).__name__.lower()} {name} would hold {what} " \
                   f"({int(bad.sum())} of {t.numel()} entries): {why}"
    return None

