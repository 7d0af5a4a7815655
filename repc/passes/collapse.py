"""The collapse pass: replace every affine region that pays by its merged ops, verified.

Input: a captured graph and its example inputs.  :func:`collapse` runs the preparation passes
(:data:`repc.passes.prepare.PREPARATION`), then the region matcher
(:mod:`repc.patterns.regions`) gives every value an expr and, where the closed forms apply,
a form ``sum_s op_s(s)``.  The :class:`GraphWriter` writes a new graph in the original order;
each value that something outside its region reads is *materialized*:

* with its form, when the cost decision (:func:`repc.passes.cost.decide`) takes it and the
  per-region check (:class:`repc.verify.region_check.RegionChecker`) agrees with the region
  as written; or as a dense map read off by probing (:mod:`repc.passes.dense_probe`) where
  the closed forms leave parts apart; otherwise
* as written, each operand materialized the same way (so sub-regions still collapse).

Emission of the ops is :mod:`repc.passes.emit`.  Every region that was merged, or kept with a
reason, is recorded for the report.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph_predicates import SYMBOLIC_SIZES, target_name, writes_in_place
from ..meanings import AffineCall, Combine, GraphFacts
from ..ops import Conv, Elementwise, Float64Field, Linear, NotMergeable, params
from ..patterns.regions import Expr, RegionMatcher, _is_slice_of, effective_users, is_container
from ..reasons import MergeRule, OpaqueKind, RejectionKind
from ..report import Rejection, Rewrite
from ..verify.check import deviation, output_dtype, tolerance
from ..verify.region_check import RegionChecker, RegionRunner, non_finite_weights
from .cost import MacCost, decide, op_count, parts_cost
from .dense_probe import DenseProbe
from .emit import AttributeNamer, build_op, emit_form, in_dtype, source_dtype
from .inplace import VIEW_MUTATED
from .manager import PassContext
from .norm_affine import NORM_CORE
from .prepare import prepare


@dataclass
class CollapseResult:
    module: fx.GraphModule
    rewrites: List[Rewrite] = field(default_factory=list)
    rejections: List[Rejection] = field(default_factory=list)
    written_in_place: List[str] = field(default_factory=list)  # rewrites whose merged weight went into the model


class CaptureMismatch(Exception):
    """The traced graph does not compute what the model computes on the example."""


def collapse(gm: fx.GraphModule, example_inputs: Tuple[Any, ...], *, check: bool = True,
             prefix: str = "", expected_output: Any = None, synthesize: bool = True,
             cost_model=None, confine: Optional[Dict[str, Optional[str]]] = None,
             scopes=None, write_into: Optional[Set[int]] = None) -> CollapseResult:
    """Fuse ``gm`` (repc's own copy; its graph may be edited) and return a new GraphModule.

    With ``expected_output`` (the model's own output on the example), a traced graph that
    computes something else (fx records ``out += y`` out of place, so aliases of ``out`` are
    lost) raises :class:`CaptureMismatch` before anything is rewritten.  ``synthesize=False``
    turns off reading dense maps off regions by probing.  ``cost_model`` prices regions and
    their merged forms (:class:`repc.passes.cost.MacCost`, multiply-adds, by default; or a
    :class:`repc.passes.cost.LatencyCost`).  ``confine`` (node name -> the module that computed
    it, None for its enclosing module's own forward) keeps every region that holds such nodes
    inside one of those modules: a merge the model's own modules can take, where a wider one
    could not be swapped in (:meth:`repc.preserve.Provenance.module_scopes`).  ``scopes``: a function of the
    prepared graph giving more such names and scopes (:func:`repc.preserve.varying_scopes`),
    where the nodes the preparation made are known, across which the matcher builds no region;
    ``confine`` takes precedence over them.  ``write_into``: the storages (``data_ptr``) of the
    model's tensors that a merged weight may be written into, in place, once its region is
    checked: the one weight of the region with the merged weight's shape and dtype, read nowhere
    else (a LoRA layer's base weight); see :meth:`GraphWriter._write_into_model`.
    """
    return _collapse(gm, example_inputs, check, prefix, expected_output, synthesize, cost_model, confine, scopes,
                     write_into)


def _collapse(gm, example_inputs, check, prefix, expected_output, synthesize, cost_model, confine,
              scopes=None, write_into=None) -> CollapseResult:
    context = PassContext(gm, example_inputs)
    if expected_output is not None:
        traced = next(context.values[n] for n in gm.graph.nodes if n.op == "output")
        dev = deviation(traced, expected_output)
        if dev > tolerance(output_dtype(expected_output)):
            raise CaptureMismatch(f"the traced graph differs from the model on the example (deviation {dev:.3g}): "
                                  "fx cannot record this forward faithfully (an in-place update of an aliased "
                                  "tensor, or state the trace does not see)")
    prepare(context)
    facts = GraphFacts(gm, context.values)
    # the scopes of the modules whose forward stays the model's code keep regions from forming
    # across them at all; a confined rebuild's scopes refuse a region that spans them (and say
    # so), trying a shallower one
    kept = scopes(gm) if scopes is not None else {}
    confine = {**kept, **(confine or {})} or None
    # (the matcher cuts regions at those scopes: a LoRA merge inside its layer is taken without
    # the norm affine before it that a region spanning both would fold, which no swap expresses)
    matcher = RegionMatcher(gm, facts, confine or {})
    matcher.run()
    device = _device(gm, example_inputs)
    return GraphWriter(gm, facts, matcher, device, check, prefix, synthesize, cost_model, confine, write_into).run()


def _device(gm, example_inputs):
    for p in gm.parameters():
        return p.device
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


class GraphWriter:
    """Writes the collapsed graph: each region materialized as its merged form or as written."""

    def __init__(self, gm, facts: GraphFacts, matcher: RegionMatcher, device, check: bool, prefix: str,
                 synthesize: bool = True, cost_model=None, confine: Optional[Dict[str, Optional[str]]] = None,
                 write_into: Optional[Set[int]] = None):
        self.gm, self.facts, self.matcher = gm, facts, matcher
        self.write_into = _readers_by_storage(gm, facts, write_into) if write_into else None
        self.written: Set[int] = set()  # storages written into
        self.confine = confine or {}
        self._spanning: set = set()  # values refused for spanning the modules they are confined to
        self.exprs, self.absorbed = matcher.exprs, matcher.absorbed
        self.values = facts.values
        self.device, self.check, self.prefix, self.synthesize = device, check, prefix, synthesize
        runner = RegionRunner(gm, facts, matcher)  # evaluates region nodes on other inputs
        self.cost_model = cost_model or MacCost()
        if hasattr(self.cost_model, "bind"):  # a model that runs the regions (MeasuredCost)
            self.cost_model.bind(runner, device)
        self._best: dict = {}  # best_cost memo over the region trees
        self.checker = RegionChecker(runner, device)
        self.dense = DenseProbe(matcher, runner)
        self.graph = fx.Graph()
        self.namer = AttributeNamer(gm)
        self.env: Dict[fx.Node, fx.Node] = {}
        self.memo: Dict[int, Tuple[Expr, fx.Node]] = {}
        self.counted: set = set()  # nodes whose ops a rewrite's flops_before has counted
        self._merged_inside: Optional[set] = None
        self.result = CollapseResult(gm)

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> CollapseResult:
        for node, expr in self.exprs.items():
            if expr.cut_reason:
                self._reject(expr, RejectionKind.CUT, f"not merged with its operands: {expr.cut_reason}")
        for node, why in self.matcher.opaque.items():
            if why.kind is OpaqueKind.PRODUCT_OF_ACTIVATIONS:
                self._reject(self.exprs[node], RejectionKind.DATA_GATE,
                             f"{why}: both factors are computed from the input (a gate, a router, an "
                             "attention product), so their product is not linear in it")
            elif self._borders_region(node) and (why.kind is not OpaqueKind.UNKNOWN_OP
                                                 or any(isinstance(self.exprs[u].meaning, Combine) for u in node.users)):
                self._reject(self.exprs[node], RejectionKind.STOPS_REGION, f"stops a region: {why}")
        for node in self.matcher.pinned:
            if writes_in_place(node):  # (said once, at the write, not at each alias it pins)
                self._reject(self.exprs[node], RejectionKind.STOPS_REGION,
                             "stops a region: a write in place through a view keeps the values it "
                             "reaches where they are")
        for node in self.gm.graph.nodes:
            if node.op == "output":
                self.graph.output(fx.node.map_arg(node.args[0], self.value_of))
                continue
            if node in self.absorbed or node in self.env:
                continue
            if is_container(node):
                continue  # emitted when a reader needs the tuple or the stack
            expr = self.exprs[node]
            synthesized = self._dense(expr) if self.synthesize and node in self.matcher.meanings else None
            if synthesized is not None:
                self.env[node] = synthesized
            else:
                self.env[node] = self._copy(node) if expr.is_leaf else self.materialize(expr)
            self.matcher.forms.release()  # (written: its merged tensors are the module's now)
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
            return self.memo[id(expr)][1]
        if expr.is_leaf:
            out = self.value_of(expr.node)
        elif self._slices_one_shared_map(expr):
            out = self._as_written(expr)  # the shared map once, then its slice
        elif (narrower := self._cheaper_shallower(expr)) is not None:
            out = self._emit(narrower)
        elif self._take_form(expr):
            out = self._emit(expr)
        else:
            shallow = self._shallower(expr)
            out = self._emit(shallow) if shallow is not None else self._as_written(expr)
        self.memo[id(expr)] = (expr, out)  # (kept with it: a freed expr's id is reused by the next one made)
        return out

    def _as_written(self, expr: Expr) -> fx.Node:
        def arg(a):
            child = expr.child_for(a)
            return self.materialize(child) if child is not None else self.value_of(a)

        if expr.kind == "slice":
            m = expr.meaning
            index = (slice(None),) * m.axis + (slice(m.start, m.stop),)
            out = self.graph.call_function(operator.getitem, (self.materialize(expr.children[0]), index))
            out.meta = dict(expr.node.meta)  # (the item of a chunk or split it writes: where that was computed)
            return out
        return self.graph.node_copy(expr.node, arg)

    def _emit(self, expr: Expr) -> fx.Node:
        """``expr``'s merged form as graph nodes; each node it creates is tagged with the
        rewrite (``meta[EMITTED_FOR]``: its root), which the module-preserving output reads."""
        mark = next(iter(reversed(self.graph.nodes)), None)
        out = self._emit_form(expr)
        for node in reversed(self.graph.nodes):
            if node is mark:
                break
            if not node.meta:  # (a copy of a value the form reads keeps its own record)
                node.meta[EMITTED_FOR] = self.prefix + expr.node.name
        if SYMBOLIC_SIZES in expr.node.meta and SYMBOLIC_SIZES not in out.meta:  # (the value it replaces: its sizes)
            out.meta[SYMBOLIC_SIZES] = expr.node.meta[SYMBOLIC_SIZES]
        return out

    def _emit_form(self, expr: Expr) -> fx.Node:
        hint = self.prefix + expr.node.name
        if all(_is_identity(op) for op in expr.form.values()) and len(expr.form) == 1:
            (src,) = expr.form
            return in_dtype(self.graph, self.value_of(src), src, self._dtype(expr.node))
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
        if not expr.has_form:
            return None
        shallow = self.matcher.shallow(expr)
        if shallow is None or not shallow.has_form or not self._take_form(shallow):
            return None
        return shallow

    def _cheaper_shallower(self, expr: Expr) -> Optional[Expr]:
        """The root merged with its operands' last ops only, where that costs less than the whole
        region's form, or as much in fewer ops, and is taken.  A form of several sources is a sum
        of maps: a conv over a concatenation of values computed apart (a CSP block's
        ``cv3(cat(m(cv1(x)), cv2(x)))``) would become a conv per part and their sum, where the
        conv over the concatenation, its BN folded, does the same work in one op."""
        if not expr.has_form or len(expr.form) < 2 or expr.node not in self.matcher.meanings:
            return None
        shallow = self.matcher.shallow(expr)
        if shallow is None or not shallow.has_form or len(shallow.region) >= len(expr.region):
            return None
        model, matcher = self.cost_model, self.matcher
        whole = model.form_cost(expr.form, expr.node, matcher)
        # (the rest of the region is written its own way: at most as it is written)
        narrower = model.form_cost(shallow.form, shallow.node, matcher) + \
            (model.region_cost(expr, matcher) - model.region_cost(shallow, matcher))
        fewer_ops = op_count(shallow.form, source_dtype(shallow.node)) < op_count(expr.form, source_dtype(expr.node))
        if narrower < whole or (math.isclose(narrower, whole, rel_tol=1e-12) and fewer_ops):
            return shallow if self._take_form(shallow) else None
        return None

    def _modules_spanned(self, expr: Expr) -> str:
        """Where ``expr``'s region crosses the module scopes it is confined to: the modules (or
        the enclosing module's own forward) it spans in words; "" where it stays inside one."""
        if not self.confine:
            return ""
        scopes = {self.confine[n.name] for n in expr.region if n.name in self.confine}
        if not scopes or (len(scopes) == 1 and None not in scopes):
            return ""
        named = sorted(s for s in scopes if s)
        own = ["the model's own forward"] if "" in scopes else []
        own += ["the forward that calls them" if named else "the forward of the module that encloses it"] \
            if None in scopes else []
        return " and ".join(filter(None, [", ".join(named), *own]))

    def _slices_one_shared_map(self, expr: Expr) -> bool:
        """A slice of a merged map that several slices read, none of them merged further (a
        fused qkv projection read through ``split`` or ``chunk``): one map then its slices costs
        the same multiply-adds as a map per slice, in fewer ops."""
        if expr.kind != "slice" or not expr.children:
            return False
        child = expr.children[0]
        if child.is_leaf or not child.has_form:
            return False
        readers = effective_users(child.node)
        return len(readers) > 1 and all(_is_slice_of(r, child.node) and r not in self._inside_merges()
                                        for r in readers)

    def _inside_merges(self) -> set:
        """Nodes that a larger region with a closed form contains (they may be merged further)."""
        if self._merged_inside is None:
            self._merged_inside = set()
            for e in self.exprs.values():
                if not e.is_leaf and e.has_form:
                    self._merged_inside |= e.region - {e.node}
        return self._merged_inside

    def _take_form(self, expr: Expr) -> bool:
        """Emit ``expr`` as its merged form?  Yes when it has one, its merged weights are finite,
        the cost decision takes it and the per-region check agrees; the rewrite is then recorded
        for the report, and a refusal worth telling as a rejection."""
        computed = self._computed_weights(expr)
        if len(expr.region) < 2 and not computed:
            return False  # a single op as written: nothing to merge
        spanned = self._modules_spanned(expr)
        if spanned:
            if expr.node not in self._spanning:  # (said once per value, not for each smaller form tried)
                self._spanning.add(expr.node)
                self._reject(expr, RejectionKind.MODULE_BOUNDARY,
                             f"merged only inside each module: its region spans {spanned}, and no swap of one "
                             "of the model's modules expresses a merge across them (graph=True merges it)")
            return False
        if not expr.has_form:
            if not expr.has_pending:  # (a layout change nothing undoes is just a layout change)
                self._reject(expr, RejectionKind.NO_CLOSED_FORM, f"no closed form: {expr.reason}")
            return False
        bad = non_finite_weights(expr.form, self._dtype(expr.node), self.device)
        if bad:
            self._reject(expr, RejectionKind.NON_FINITE, f"not merged: {bad}")
            return False
        model = self.cost_model
        parts = parts_cost(expr, model, self.matcher, self._best) if hasattr(model, "node_cost") else None
        form_cost, region_cost = model.form_cost(expr.form, expr.node, self.matcher), model.region_cost(expr, self.matcher)
        decision = decide(expr, form_cost, computed, region_cost, model, parts)
        if not decision.merge:
            if decision.kind is not None:
                self._reject(expr, decision.kind, decision.words)
            return False
        if not decision.rewrite:
            return True
        dev = 0.0
        if self.check:
            verdict = self.checker.check(expr, seed=len(self.result.rewrites))
            if not verdict.ok:
                self._reject(expr, RejectionKind.CHECK_FAILED, f"rolled back: {verdict.why}")
                return False
            dev = verdict.deviation
        cheaper = form_cost < region_cost and not math.isclose(form_cost, region_cost, rel_tol=1e-12)
        self._record_rewrite(expr, computed, self.matcher.form_cost(expr.form, expr.node), dev, cheaper)
        if self.write_into is not None:
            self._write_into_model(expr)
        return True

    def _write_into_model(self, expr: Expr) -> None:
        """Each merged conv or linear weight of ``expr``'s form written into the model's own
        tensor it replaces, and the emitted module made to hold that tensor (no new weight):
        the one weight of the region with its shape, dtype and device that is a whole tensor of
        the model (``write_into``), read by the region's nodes only and not written before.
        The region was checked with the merged weight as built; what the model held there is
        read by nothing else, so nothing reads it after this."""
        for op in expr.form.values():
            if not isinstance(op, (Conv, Linear)):
                continue
            module = build_op(op, self._dtype(expr.node), self.device).module
            merged = getattr(module, "weight", None)
            target = self._target(expr, merged)
            if target is None:
                continue
            with torch.no_grad():
                target.copy_(merged)
            module.weight = nn.Parameter(target, requires_grad=False)
            self.written.add(target.untyped_storage().data_ptr())
            self.result.written_in_place.append(self.prefix + expr.node.name)

    def _target(self, expr: Expr, merged: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if merged is None:
            return None
        for n in self.matcher.in_order(expr.region):
            meaning = self.exprs[n].meaning
            if not isinstance(meaning, AffineCall) or not isinstance(meaning.op, (Conv, Linear)):
                continue
            held = Float64Field.stored(meaning.op, "weight")
            if not isinstance(held, torch.Tensor) or held.shape != merged.shape or held.dtype != merged.dtype \
                    or held.device != merged.device or held.storage_offset() or not held.is_contiguous() \
                    or held.numel() * held.element_size() != held.untyped_storage().nbytes():
                continue
            ptr = held.untyped_storage().data_ptr()
            readers = self.write_into.get(ptr)
            if readers is None or ptr in self.written or not readers <= expr.region:
                continue
            return held
        return None

    def _record_rewrite(self, expr: Expr, computed: bool, new_cost: int, dev: float, cheaper: bool = False) -> None:
        """The rewrite for the report: ``new_cost`` the merged form's multiply-adds; ``cheaper``:
        the compile's cost model priced the form below the region."""
        before_params = sum(params(self.exprs[n].meaning.op) for n in expr.region
                            if isinstance(self.exprs[n].meaning, AffineCall))
        # a region read through several slices is merged once per slice: count its ops once
        shared = sum(self.matcher.own_cost.get(n, 0) for n in expr.region if n in self.counted)
        self.counted |= expr.region
        self.result.rewrites.append(Rewrite(
            rule=expr.rules | ({MergeRule.FOLD_PARAMETERS} if computed else set()),
            root=self.prefix + expr.node.name,
            replaced=[self.prefix + _describe_node(n, self.facts) for n in self.matcher.in_order(expr.region)],
            result=[repr(op) for op in expr.form.values()],
            params_before=before_params, params_after=sum(params(op) for op in expr.form.values()),
            macs_before=expr.cost, macs_after=new_cost, exact=True, max_deviation=dev, shared_macs=shared,
            cheaper=cheaper))

    def _dense(self, expr: Expr) -> Optional[fx.Node]:
        """The whole affine cone of ``expr.node`` emitted as one dense map, where
        :class:`DenseProbe` offers one and it is taken; None otherwise."""
        probe = self.dense.candidate(expr)
        if probe is None or not self._take_form(probe):
            return None
        inside = {self.prefix + n.name for n in probe.region if n is not expr.node}
        self.result.rewrites = [r for r in self.result.rewrites if r.root not in inside]
        self.result.rejections = [r for r in self.result.rejections if r.root not in inside]
        self.result.rewrites[-1].shape_specialized = True
        return self._emit(probe)

    def _borders_region(self, node: fx.Node) -> bool:
        """``node`` reads an affine region (so it is where that region had to stop)."""
        return node.op not in ("placeholder", "output", "get_attr") and not is_container(node) and \
            any(self.exprs[a].has_form and not self.exprs[a].is_leaf for a in node.all_input_nodes)

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

    def _reject(self, expr: Expr, kind: RejectionKind, reason: str) -> None:
        self.result.rejections.append(Rejection(self.prefix + expr.node.name, reason, kind))


def _readers_by_storage(gm: fx.GraphModule, facts: GraphFacts, storages: Set[int]) -> Dict[int, Set[fx.Node]]:
    """For each of ``storages`` that ``gm`` holds, the nodes that read it: a module call whose
    module holds it, or the readers of an attribute that is it (or a view of it)."""
    readers: Dict[int, Set[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            tensors = list(facts.modules[node.target].parameters()) + list(facts.modules[node.target].buffers())
            reading = {node}
        elif node.op == "get_attr":
            value = facts.values.get(node)
            tensors, reading = ([value] if isinstance(value, torch.Tensor) else []), set(node.users)
        else:
            continue
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                readers.setdefault(ptr, set()).update(reading)
    return readers


EMITTED_FOR = "repc_rewrite"  # node.meta key of an emitted node: the root of the rewrite it belongs to


def _drop_dead_nodes(graph: fx.Graph) -> None:
    """Remove values nothing reads; keeps placeholders, side effects and in-place updates left in place."""
    from torch.fx.node import _side_effectful_functions
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output") or node.meta.get(VIEW_MUTATED):
            continue
        if node.op == "call_function" and (node.target in _side_effectful_functions or _is_check(node.target)):
            continue
        if writes_in_place(node):
            continue
        graph.erase_node(node)


def _is_check(target) -> bool:
    """An assertion fx inserts for a specialized argument (``_assert_is_none``): it returns nothing."""
    return getattr(target, "__name__", "").startswith("_assert")


def _is_identity(op) -> bool:
    return getattr(op, "is_identity", False)


def _describe_node(node: fx.Node, facts: GraphFacts) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(facts.modules[node.target]).__name__})"
    return f"{node.name} ({target_name(node)})"
