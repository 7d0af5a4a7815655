"""The collapse pass: replace every affine region that pays by its merged ops, verified.

Input: a traced graph and its example inputs.  The region matcher
(:mod:`repc.patterns.regions`) gives every value an expr and, where the closed forms apply,
a form ``sum_s op_s(s)``.  This pass writes a new graph in the original order; each value
that something outside its region reads is *materialized*:

* with its form, when the form costs no more multiply-accumulates than the region as written
  (the cost model: a d->r->d bottleneck stays two thin maps unless a sum absorbs it) and a
  check on the recorded example values and on random inputs agrees with the original
  region; otherwise
* as written, each operand materialized the same way (so sub-regions still collapse).

Every region that was merged, or kept with a reason, is recorded for the report.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from .. import algebra
from ..normalize import NORM_AFFINE, NORM_CORE, VIEW_MUTATED, AffineCall, Combine, Layout, GraphFacts, detach_metadata_reads, expand_weighted_stacks, fold_border_fill, inplace_kind, functionalize_inplace, metadata_read, push_linears_before_flattens, push_scales_into_concat, push_scales_into_matmul, split_norm_affine
from ..ops import Conv, Dense, Elementwise, NotMergeable, params
from ..patterns.regions import Expr, RegionMatcher, _is_slice_of, effective_users, is_container
from ..report import Rejection, Rewrite
from ..verify.check import deviation, non_finite, output_dtype, quiet_call, tolerance
from .emit import AttributeNamer, emit_form, form_function
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_map


class _Recorder(ShapeProp):
    """Shape propagation that also keeps every node's value on the example inputs.

    In a graph that still writes in place (``x.mul_(g)`` through an alias), a later op can
    change a tensor already recorded: just before such a write, the recorded values that share
    the written tensor's storage are replaced by copies.
    """

    def __init__(self, gm):
        super().__init__(gm)
        self.values: Dict[fx.Node, Any] = {}
        modules = dict(gm.named_modules())
        self._writes = {n for n in gm.graph.nodes if inplace_kind(n, modules)
                        and n.args and isinstance(n.args[0], fx.Node)}
        self._by_storage: Dict[int, List[fx.Node]] = {}  # recorded tensors by storage, where writes exist

    def run_node(self, n):
        if n in self._writes:
            written = self.env.get(n.args[0])
            if isinstance(written, torch.Tensor):
                for node in self._by_storage.pop(_storage(written), []):
                    self.values[node] = tree_map(_copy_tensor, self.values[node])
        out = super().run_node(n)
        self.values[n] = out
        if self._writes:
            for leaf in torch.utils._pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self._by_storage.setdefault(_storage(leaf), []).append(n)
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _copy_tensor(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _record(gm, example_inputs) -> Dict[fx.Node, Any]:
    # real tensors, even when called from inside a dynamo backend (no ambient fake mode)
    with torch._guards.tracing(None), torch.no_grad():
        recorder = _Recorder(gm)
        recorder.propagate(*example_inputs)
    return recorder.values


@dataclass
class CollapseResult:
    module: fx.GraphModule
    rewrites: List[Rewrite] = field(default_factory=list)
    rejections: List[Rejection] = field(default_factory=list)


class CaptureMismatch(Exception):
    """The traced graph does not compute what the model computes on the example."""


def collapse(gm: fx.GraphModule, example_inputs: Tuple[Any, ...], *, check: bool = True,
             prefix: str = "", expected_output: Any = None, synthesize: bool = True) -> CollapseResult:
    """Fuse ``gm`` (repc's own copy; its graph may be edited) and return a new GraphModule.

    With ``expected_output`` (the model's own output on the example), a traced graph that
    computes something else (fx records ``out += y`` out of place, so aliases of ``out`` are
    lost) raises :class:`CaptureMismatch` before anything is rewritten.  ``synthesize=False``
    turns off reading dense maps off regions by probing.
    """
    values = _record(gm, example_inputs)
    if fold_border_fill(gm, values) + functionalize_inplace(gm):
        values = _record(gm, example_inputs)
    if expected_output is not None:
        traced = next(values[n] for n in gm.graph.nodes if n.op == "output")
        dev = deviation(traced, expected_output)
        if dev > tolerance(output_dtype(expected_output)):
            raise CaptureMismatch(f"the traced graph differs from the model on the example (deviation {dev:.3g}): "
                                  "fx cannot record this forward faithfully (an in-place update of an aliased "
                                  "tensor, or state the trace does not see)")
    if split_norm_affine(gm) + push_scales_into_concat(gm, values) + push_scales_into_matmul(gm, values) \
            + expand_weighted_stacks(gm, values):
        values = _record(gm, example_inputs)
    if detach_metadata_reads(gm, values) + push_linears_before_flattens(gm, values):
        values = _record(gm, example_inputs)
    facts = GraphFacts(gm, values)
    matcher = RegionMatcher(gm, facts)
    matcher.run()
    device = _device(gm, example_inputs)
    return _Writer(gm, facts, matcher, device, check, prefix, synthesize).run()


def _device(gm, example_inputs):
    for p in gm.parameters():
        return p.device
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


class _Writer:
    def __init__(self, gm, facts: GraphFacts, matcher: RegionMatcher, device, check: bool, prefix: str,
                 synthesize: bool = True):
        self.gm, self.facts, self.matcher = gm, facts, matcher
        self.exprs, self.absorbed = matcher.exprs, matcher.absorbed
        self.values = facts.values
        self.interp = fx.Interpreter(gm)  # evaluates region nodes on other inputs
        self.device, self.check, self.prefix, self.synthesize = device, check, prefix, synthesize
        self.graph = fx.Graph()
        self.namer = AttributeNamer(gm)
        self.env: Dict[fx.Node, fx.Node] = {}
        self.memo: Dict[int, fx.Node] = {}
        self.counted: set = set()  # nodes whose ops a rewrite's flops_before has counted
        self._merged_inside: Optional[set] = None
        self.result = CollapseResult(gm)

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> CollapseResult:
        for node, expr in self.exprs.items():
            if expr.cut_reason:
                self._reject(expr, f"not merged with its operands: {expr.cut_reason}")
        for node, why in self.matcher.opaque.items():
            if why.startswith("product of two activations"):
                self._reject(self.exprs[node], f"{why}: a gate computed from the data (a router) is not linear")
            elif self._borders_region(node) and (not why.endswith("is not an affine map repc knows")
                                                 or any(isinstance(self.exprs[u].meaning, Combine) for u in node.users)):
                self._reject(self.exprs[node], f"stops a region: {why}")
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.graph.output(fx.node.map_arg(node.args[0], self.value_of))
                continue
            if node in self.absorbed or node in self.env:
                continue
            if is_container(node):
                continue  # emitted when a reader needs the tuple or the stack
            expr = self.exprs[node]
            synthesized = self._synthesize(expr) if self.synthesize and node in self.matcher.meanings else None
            if synthesized is not None:
                self.env[node] = synthesized
            else:
                self.env[node] = self._copy(node) if expr.is_leaf else self.materialize(expr)
        _drop_dead_nodes(self.graph)
        self.graph.lint()
        module = fx.GraphModule(self.gm, self.graph, class_name=type(self.gm).__name__)
        self.result.module = module
        return self.result

    def value_of(self, node: fx.Node) -> fx.Node:
        if node not in self.env:
            if node in self.absorbed:
                self.env[node] = self.materialize(self.exprs[node])
            else:
                self.env[node] = self._copy(node)
        return self.env[node]

    def _copy(self, node: fx.Node) -> fx.Node:
        return self.graph.node_copy(node, self.value_of)

    # -- materialization ----------------------------------------------------------------------
    def materialize(self, expr: Expr) -> fx.Node:
        if id(expr) in self.memo:
            return self.memo[id(expr)]
        if expr.is_leaf:
            out = self.value_of(expr.node)
        elif self._slices_one_shared_map(expr):
            out = self._as_written(expr)  # the shared map once, then its slice
        elif self._use_form(expr):
            out = self._emit(expr)
        else:
            shallow = self._shallower(expr)
            out = self._emit(shallow) if shallow is not None else self._as_written(expr)
        self.memo[id(expr)] = out
        return out

    def _as_written(self, expr: Expr) -> fx.Node:
        def arg(a):
            child = expr.child_for(a)
            return self.materialize(child) if child is not None else self.value_of(a)

        if expr.kind == "slice":
            m = expr.meaning
            index = (slice(None),) * m.axis + (slice(m.start, m.stop),)
            return self.graph.call_function(operator.getitem, (self.materialize(expr.children[0]), index))
        return self.graph.node_copy(expr.node, arg)

    def _emit(self, expr: Expr) -> fx.Node:
        hint = self.prefix + expr.node.name
        if all(_is_identity(op) for op in expr.form.values()) and len(expr.form) == 1:
            (src,) = expr.form
            return self.value_of(src)
        if len(expr.form) == 1:
            (src, op), = expr.form.items()
            if NORM_CORE in src.meta and isinstance(op, Elementwise):
                out = self._norm_with_affine(src, op, hint)
                if out is not None:
                    return out
        return emit_form(self.graph, self.namer, expr.form, self.value_of, hint + "_fused",
                         self._dtype(expr.node), self.device)

    def _norm_with_affine(self, core: fx.Node, op: Elementwise, hint: str) -> Optional[fx.Node]:
        """``norm(x) * s + t`` back into one norm call whose weight is ``s`` and bias ``t``."""
        fn, naxes, where = core.meta[NORM_CORE]
        if naxes != 1:
            return None
        try:
            scale, shift = op.channel_vectors(-1 if where == "last" else 1)
        except NotMergeable:
            return None
        dtype = self._dtype(core)
        w = self.graph.get_attr(self.namer.buffer(hint + "_weight", scale.to(self.device, dtype)))
        b = self.graph.get_attr(self.namer.buffer(hint + "_bias", shift.to(self.device, dtype)))
        x, first, _, _, eps = core.args
        return self.graph.call_function(core.target, (self.value_of(x), first, w, b, eps))

    def _dtype(self, node: fx.Node):
        meta = node.meta.get("tensor_meta")
        return getattr(meta, "dtype", torch.float32)

    # -- decisions ------------------------------------------------------------------------------
    def _shallower(self, expr: Expr) -> Optional[Expr]:
        """The root merged with its operands' last ops only, when the whole region was not taken."""
        if expr.form is None:
            return None
        shallow = self.matcher.shallow(expr)
        if shallow is None or shallow.form is None or not self._use_form(shallow):
            return None
        return shallow

    def _slices_one_shared_map(self, expr: Expr) -> bool:
        """A slice of a merged map that several slices read, none of them merged further (a
        fused qkv projection read through ``split`` or ``chunk``): one map then its slices costs
        the same multiply-adds as a map per slice, in fewer ops."""
        if expr.kind != "slice" or not expr.children:
            return False
        child = expr.children[0]
        if child.is_leaf or child.form is None:
            return False
        readers = effective_users(child.node)
        return len(readers) > 1 and all(_is_slice_of(r, child.node) and r not in self._inside_merges()
                                        for r in readers)

    def _inside_merges(self) -> set:
        """Nodes that a larger region with a closed form contains (they may be merged further)."""
        if self._merged_inside is None:
            self._merged_inside = set()
            for e in self.exprs.values():
                if not e.is_leaf and e.form is not None:
                    self._merged_inside |= e.region - {e.node}
        return self._merged_inside

    def _use_form(self, expr: Expr) -> bool:
        computed = self._computed_weights(expr)
        if len(expr.region) < 2 and not computed:
            return False  # a single op as written: nothing to merge
        if expr.form is None:
            if expr.pending is None:  # (a layout change nothing undoes is just a layout change)
                self._reject(expr, f"no closed form: {expr.reason}")
            return False
        bad = _non_finite(expr.form, self._dtype(expr.node))
        if bad:
            self._reject(expr, f"not merged: {bad}")
            return False
        if all(NORM_AFFINE in n.meta for n in expr.region):
            return True  # a norm's own affine tail, put back into the norm as it was: not a rewrite
        new_cost = self.matcher.form_cost(expr.form, expr.node)
        if new_cost > expr.cost:
            self._reject(expr, f"does not pay: {new_cost} multiply-adds merged vs {expr.cost} as written")
            return False
        if new_cost == expr.cost and _op_count(expr.form) >= len(expr.region) and not computed:
            return False  # same work in as many ops: nothing to gain
        dev = 0.0
        if self.check:
            ok, dev, why = self._check(expr)
            if not ok:
                self._reject(expr, f"rolled back: {why}")
                return False
        before_params = sum(params(self.exprs[n].meaning.op) for n in expr.region
                            if isinstance(self.exprs[n].meaning, AffineCall))
        # a region read through several slices is merged once per slice: count its ops once
        shared = sum(self.matcher.own_cost.get(n, 0) for n in expr.region if n in self.counted)
        self.counted |= expr.region
        self.result.rewrites.append(Rewrite(
            rule="+".join(sorted(expr.rules | ({"fold-parameters"} if computed else set()))) or "fold",
            root=self.prefix + expr.node.name,
            replaced=[self.prefix + _describe_node(n, self.facts) for n in self.matcher.in_order(expr.region)],
            result=[repr(op) for op in expr.form.values()],
            params_before=before_params, params_after=sum(params(op) for op in expr.form.values()),
            flops_before=expr.cost, flops_after=new_cost, exact=True, max_deviation=dev, shared_flops=shared))
        return True

    # -- synthesis by probing ------------------------------------------------------------------
    DENSE_LIMIT = 1 << 22  # matrix entries per source a probe may read off

    def _synthesize(self, expr: Expr) -> Optional[fx.Node]:
        """The whole affine cone of ``expr.node`` as one dense map read off by probing.

        Where the closed forms left part of an affine region apart (a fully-connected layer
        over a flattened map next to convolutions: RepMLP), the region is still affine at the
        example's per-sample shape: a zero input gives the bias, unit impulses give the matrix.
        Kept only when it costs less than the region as written and than the closed forms'
        partial merge, and when the region check confirms it.  The result is shape-specialized.
        """
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
        partial = (self.matcher.form_cost(expr.form, node) if expr.form is not None else expr.cost) + rest
        if dense_cost >= min(as_written, partial):
            return None
        probe = Expr(node, "dense", region=set(cone), rules={"synthesize"})
        if self._accepts_other_sizes(probe, sources):
            return None  # a dense map would tie a size-generic region to the example's size
        try:
            probe.form = self._probe(probe, sources)
        except Exception:
            return None
        probe.cost = as_written
        if not self._use_form(probe):
            return None
        inside = {self.prefix + n.name for n in cone if n is not node}
        self.result.rewrites = [r for r in self.result.rewrites if r.root not in inside]
        self.result.rejections = [r for r in self.result.rejections if r.root not in inside]
        self.result.rewrites[-1].shape_specialized = True
        return self._emit(probe)

    def _accepts_other_sizes(self, probe: Expr, sources: List[fx.Node]) -> bool:
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
                self._run_region(probe, inputs)
            except Exception:
                continue
            return True
        return False

    def _probe(self, probe: Expr, sources: List[fx.Node]) -> Dict[fx.Node, Dense]:
        ref = self.values[probe.node]
        if not isinstance(ref, torch.Tensor) or not ref.is_floating_point():
            raise NotMergeable("not a floating-point tensor")

        def zeros(s, batch):
            v = self.values[s]
            return torch.zeros((batch,) + tuple(v.shape[1:]), dtype=torch.float64, device=v.device)

        base = {s: zeros(s, 1) for s in sources}
        bias = self._run_region(probe, base, exact=True).reshape(-1)
        out_shape = tuple(ref.shape[1:])
        form = {}
        for i, s in enumerate(sources):
            v = self.values[s]
            n_in = math.prod(v.shape[1:])
            inputs = {t: zeros(t, n_in) for t in sources}
            inputs[s] = torch.eye(n_in, dtype=torch.float64, device=v.device).reshape((n_in,) + tuple(v.shape[1:]))
            out = self._run_region(probe, inputs, exact=True).reshape(n_in, -1) - bias
            form[s] = Dense(out.T.contiguous().cpu(), bias.cpu() if i == 0 else None, tuple(v.shape[1:]), out_shape)
        return form

    def _borders_region(self, node: fx.Node) -> bool:
        """``node`` reads an affine region (so it is where that region had to stop)."""
        return node.op not in ("placeholder", "output", "get_attr") and not is_container(node) and \
            any(self.exprs[a].form is not None and not self.exprs[a].is_leaf for a in node.all_input_nodes)

    def _computed_weights(self, expr: Expr) -> bool:
        """The region's weights are computed at every call from parameters only (GLoRA's
        ``W + W*A + B@C``, weight norm, a parametrization, a gate from fixed logits)."""
        for n in expr.region:
            if n.op == "call_module":
                mod = self.facts.modules[n.target]
                if hasattr(mod, "parametrizations") or mod._forward_pre_hooks:
                    return True
            for a in n.all_input_nodes:
                if a in self.facts.constants and a.op != "get_attr":
                    return True
        return False

    def _reject(self, expr: Expr, reason: str) -> None:
        self.result.rejections.append(Rejection(self.prefix + expr.node.name, reason))

    # -- per-region verification ------------------------------------------------------------
    def _check(self, expr: Expr) -> Tuple[bool, float, str]:
        """The merged ops against the region as written, on small random inputs at another batch
        size where the region runs on them (every border of a map is still there at 7x7), on the
        recorded example values where it does not.  NaN or Inf never passes: the region as written
        giving them means there is nothing to compare, the merged ops giving them where the region
        is finite is a failure."""
        sources = list(expr.form)
        ref = self.values[expr.node]
        if not isinstance(ref, torch.Tensor):
            return False, float("inf"), "region output is not a tensor"
        tol = tolerance(ref.dtype)
        merged = form_function(expr.form, ref.dtype, self.device)
        trial = self._small_trial(expr, sources)
        name, inputs, want = trial if trial is not None else ("example", [self.values[s] for s in sources], ref)
        bad = non_finite(want)
        if bad is not None:
            return False, float("inf"), f"the region as written gives {bad} on the {name} input"
        with torch.no_grad():
            try:
                got = quiet_call(merged, inputs)
            except Exception as why:
                return False, float("inf"), f"merged op failed on {name} input: {why}"
        dev = deviation(got, want)
        if dev > tol:
            bad = non_finite(got)
            if bad is not None:
                return False, dev, f"the merged op gives {bad} on the {name} input, where the region as written is finite"
            return False, dev, f"deviation {dev:.3g} > {tol:g} on the {name} input"
        return True, dev, ""

    SMALL = 7  # per-axis size of the small trial maps

    def _small_trial(self, expr: Expr, sources: List[fx.Node]):
        """``(name, inputs, region output)`` on small random source values at another batch size
        (2, or 1 when the example's is 2): maps shrunk to 7 per axis, tokens to 7; None if the
        region as written runs on none of the shapes tried (it fits its example's sizes only)."""
        gen = torch.Generator().manual_seed(len(self.result.rewrites))
        shapes = [list(self.values[s].shape) for s in sources]
        tried = set()
        for shrink in ("maps", "channels-last", "tokens", "length"):
            trial = []
            for shape in shapes:
                shape = list(shape)
                if shape:
                    shape[0] = 1 if shape[0] == 2 else 2
                axes = {"maps": range(2, len(shape)) if len(shape) >= 4 else (),
                        "channels-last": range(1, len(shape) - 1) if len(shape) >= 4 else (),
                        "tokens": (1,) if len(shape) == 3 else (),
                        "length": (2,) if len(shape) == 3 else ()}[shrink]
                for a in axes:
                    shape[a] = min(shape[a], self.SMALL)
                trial.append(tuple(shape))
            if tuple(trial) in tried:
                continue
            tried.add(tuple(trial))
            inputs = [torch.randn(shape, generator=gen, dtype=torch.float32).to(self.values[s].dtype)
                      .to(self.values[s].device) for s, shape in zip(sources, trial)]
            try:
                want = self._run_region(expr, dict(zip(sources, inputs)))
            except Exception:
                continue
            if not isinstance(want, torch.Tensor) or want.dim() != self.values[expr.node].dim():
                continue
            return f"random {'x'.join(map(str, trial[0]))}", inputs, want
        return None

    def _run_region(self, expr: Expr, sources: Dict[fx.Node, torch.Tensor], exact: bool = False):
        """The region's original nodes evaluated on other source values.

        ``exact``: in float64, each conv/linear/BN through its canonical op (``algebra.apply``)
        rather than the model's own lower-precision module."""
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
                # example's, which fits the trials at the example's sizes (others fail and are skipped)
                env[arg] = self.values[arg]
            else:
                raise RuntimeError(f"region input {arg.name} is not a source")

    def _eval(self, node, env):
        self.interp.env = env
        with torch.no_grad():
            return self.interp.run_node(node)


def _drop_dead_nodes(graph: fx.Graph) -> None:
    """Remove values nothing reads; keeps placeholders, side effects and in-place updates left in place."""
    from torch.fx.node import _side_effectful_functions
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output") or node.meta.get(VIEW_MUTATED):
            continue
        if node.op == "call_function" and (node.target in _side_effectful_functions or _is_check(node.target)):
            continue
        if node.op == "call_method" and node.target.endswith("_"):
            continue
        graph.erase_node(node)


def _is_check(target) -> bool:
    """An assertion fx inserts for a specialized argument (``_assert_is_none``): it returns nothing."""
    return getattr(target, "__name__", "").startswith("_assert")


def _non_finite(form, dtype) -> Optional[str]:
    """Why the form's merged tensors cannot be emitted: NaN or Inf in one of them, in float64 (from
    non-finite weights or statistics) or once cast to ``dtype`` (a finite product too large for
    float16); None if all are finite."""
    for op in form.values():
        for f in fields(op):
            t = getattr(op, f.name)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            cast = t.to(dtype) if dtype.is_floating_point else t
            bad = ~(torch.isfinite(t) & torch.isfinite(cast))
            if not bad.any():
                continue
            nan = int(torch.isnan(cast).sum())
            what = " and ".join(w for w, n in (("NaN", nan), ("Inf", int(bad.sum()) - nan)) if n)
            why = ("it is computed from non-finite weights or statistics" if not torch.isfinite(t).all() else
                   f"its values are too large for {str(dtype).replace('torch.', '')}")
            return f"the merged {type(op).__name__.lower()} {f.name} would hold {what} " \
                   f"({int(bad.sum())} of {t.numel()} entries): {why}"
    return None


def _op_count(form) -> int:
    """How many graph ops emitting ``form`` takes."""
    count = len(form) - 1
    for op in form.values():
        if isinstance(op, Elementwise):
            count += (op.scale is not None) + (op.shift is not None)
        else:
            count += 1 + (isinstance(op, Conv) and any(lo != hi for lo, hi in op.padding))
    return count


def _is_identity(op) -> bool:
    return getattr(op, "is_identity", False)


def _describe_node(node: fx.Node, facts: GraphFacts) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(facts.modules[node.target]).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"
