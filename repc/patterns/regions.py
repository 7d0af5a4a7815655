"""The affine-region matcher: which values are affine functions of which sources.

Walking the graph in order, every value ``v`` gets an :class:`Expr`: the tree of canonical
meanings that computes it from *sources* (values the matcher cannot see through, or values
that must exist anyway because several consumers read them).  Where the closed forms of
:mod:`repc.algebra` apply, the expr also carries its *form*: ``v = sum_s op_s(s)``, one merged
op per source.  The local rules are

* **compose** -- an affine op applied to an expr: the op is composed into each term;
* **sum** -- a weighted sum of exprs: terms on the same source are added;
* **concat** -- a concatenation of exprs on one source: the ops are stacked;
* **select** -- a channel slice of an expr: the ops' output rows are sliced
  (a value read only through slices is distributed into each of them).

When a guard fails, the operand is *cut*: it becomes a source of its own and the rule is
tried again on it, so a region stops exactly where exactness stops.  The matcher never
mutates the graph; each expr records why it has no form.  Whether a form pays is decided
later, by the cost model of :mod:`repc.passes.collapse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx

from .. import algebra
from ..memory import FreedMemory
from ..meanings import AffineCall, Combine, Concat, Constant, GraphFacts, Layout, apply_layout
from ..passes.inplace import VIEW_MUTATED
from ..vocabulary import describe, is_float_cast
from ..ops import AffineOp, Conv, Elementwise, Linear, NotMergeable, flops, identity
from ..reasons import MergeKind, MergeRule, Opaque, OpaqueKind

Form = Dict[fx.Node, AffineOp]


class FormCache:
    """The forms computed from their recipes and held since the last :meth:`release`.

    A form's merged tensors are float64 and as large as the weights they merge.  Held for
    every value at once they would be several copies of the model, so a form is held only while
    it is in use (the node being matched, the region being written) and computed again from
    its recipe when it is read after a release: memory grows with the largest region, not with
    the model.
    """

    def __init__(self):
        self.held: List["LazyForm"] = []
        self.freed = FreedMemory()

    def hold(self, lazy: "LazyForm") -> None:
        self.held.append(lazy)

    def release(self, keep: Optional["Expr"] = None) -> None:
        """Drop every held form but ``keep``'s (those without a recipe stay with their expr)."""
        kept = {id(keep._form), id(keep._pending)} if keep is not None else set()
        still, dropped = [], {}
        for lazy in self.held:
            if id(lazy) in kept:
                still.append(lazy)
                continue
            for op in lazy.value.values() if lazy.value is not None else ():
                for t in vars(op).values():
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                        dropped[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            lazy.value = None
        self.held = still
        self.freed.dropped_bytes(sum(dropped.values()))


class LazyForm:
    """A form: its value, or the recipe that computes it again from its operands' forms."""

    __slots__ = ("recipe", "value", "cache")

    def __init__(self, value: Form, recipe: Optional[Callable[[], Form]] = None, cache: Optional[FormCache] = None):
        self.value, self.recipe, self.cache = value, recipe, cache

    def get(self) -> Form:
        if self.value is None:
            self.value = self.recipe()  # (it gave a form once; the rules are deterministic)
            self.cache.hold(self)
        return self.value


@dataclass(eq=False)
class Expr:
    node: fx.Node
    kind: str  # "leaf", "apply", "combine", "concat", "slice"
    meaning: object = None
    children: List["Expr"] = field(default_factory=list)
    _form: Optional[LazyForm] = field(default=None, repr=False)
    reason: Optional[str] = None
    region: Set[fx.Node] = field(default_factory=set)  # original nodes computed inside
    cost: int = 0  # multiply-accumulates of the region as written
    rules: Set[MergeRule] = field(default_factory=set)
    cut_reason: Optional[str] = None  # why the operands were not merged into this node
    # a value that is a layout change (transpose, flatten, view...) of an affine expression:
    # value = base.flatten()[layout], with base = sum_s pending[s](s)
    layout: Optional[torch.Tensor] = None
    _pending: Optional[LazyForm] = field(default=None, repr=False)
    base: Optional[fx.Node] = None

    @property
    def form(self) -> Optional[Form]:
        """``value = sum_s form[s](s)``, the merged op per source; None where no closed form
        applies (:attr:`reason` says why).  Computed again if it was released."""
        return None if self._form is None else self._form.get()

    @form.setter
    def form(self, value: Optional[Form]) -> None:
        self._form = None if value is None else LazyForm(value)

    @property
    def has_form(self) -> bool:
        """Whether :attr:`form` is one (without computing it)."""
        return self._form is not None

    @property
    def pending(self) -> Optional[Form]:
        return None if self._pending is None else self._pending.get()

    @property
    def has_pending(self) -> bool:
        return self._pending is not None

    @property
    def is_leaf(self) -> bool:
        return self.kind == "leaf"

    def child_for(self, arg: fx.Node) -> Optional["Expr"]:
        for c in self.children:
            if c.node is arg and not c.is_leaf:
                return c
        return None


class RegionMatcher:
    """Builds an :class:`Expr` for every node of a shape-annotated graph."""

    def __init__(self, gm: fx.GraphModule, facts: GraphFacts, scopes: Optional[Dict[str, Optional[str]]] = None):
        self.gm = gm
        # node name -> the module scope its region must keep to (None: it joins no region); a
        # node without one goes with its neighbours
        self.scopes = scopes or {}
        self.facts = facts
        self.exprs: Dict[fx.Node, Expr] = {}
        self.forms = FormCache()  # the forms held now (see FormCache)
        self.opaque: Dict[fx.Node, Opaque] = {}  # nodes without a meaning, and why
        self.absorbed: Set[fx.Node] = set()
        self.meanings: Dict[fx.Node, object] = {}  # nodes with a canonical meaning
        self.own_cost: Dict[fx.Node, int] = {}  # multiply-adds of each such node as written
        self.pinned: Set[fx.Node] = {n for n in gm.graph.nodes if n.meta.get(VIEW_MUTATED)}

    # -- public ---------------------------------------------------------------------------
    def in_order(self, nodes) -> List[fx.Node]:
        """``nodes`` sorted as in the graph."""
        return sorted(nodes, key=self.order.__getitem__)

    def run(self) -> Dict[fx.Node, Expr]:
        self.order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        for node in self.gm.graph.nodes:
            self.exprs[node] = self._match(node)
            self.forms.release(keep=self.exprs[node])  # (its reader, often the next node, reads it)
        self.forms.release()
        return self.exprs

    def _compute(self, expr: Expr, recipe: Callable[[], Form], pending: bool = False) -> None:
        """Give ``expr`` the form ``recipe`` computes (its :attr:`Expr.pending` form with
        ``pending``), or the reason none applies."""
        try:
            value = recipe()
        except NotMergeable as why:
            if not pending:
                expr._form, expr.reason = None, str(why)
            else:
                expr.reason = str(why)
            return
        lazy = LazyForm(value, recipe, self.forms)
        self.forms.hold(lazy)
        if pending:
            expr._pending = lazy
        else:
            expr._form, expr.reason = lazy, None

    # -- per node -------------------------------------------------------------------------
    def _match(self, node: fx.Node) -> Expr:
        try:
            meaning = describe(node, self.facts)
        except Opaque as why:
            self.opaque[node] = why
            return self._leaf(node)
        except Exception as why:  # a front-end form the table misreads: leave it alone
            self.opaque[node] = Opaque(OpaqueKind.UNSUPPORTED_FORM, f"not understood ({type(why).__name__}: {why})")
            return self._leaf(node)
        if isinstance(meaning, Constant):
            self.facts.constants[node] = meaning.value
            return self._leaf(node)
        if self.facts.shape(node) is None:
            self.opaque[node] = Opaque(OpaqueKind.UNSUPPORTED_FORM, "no tensor shape recorded")
            return self._leaf(node)
        dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
        if dtype is None or not dtype.is_floating_point:
            self.opaque[node] = Opaque(OpaqueKind.UNSUPPORTED_FORM, f"not a floating-point tensor ({dtype})")
            return self._leaf(node)
        self.meanings[node] = meaning
        expr = self._build(node, meaning, cut=False)
        first_reason = expr.reason
        # a concat of several sources, or a pending layout change, stays open for its consumer
        if not expr.has_form and expr.kind != "concat" and not expr.has_pending:
            why = expr.reason
            expr = self._build(node, meaning, cut=True)
            if any(not self.exprs[c.node].is_leaf for c in expr.children):
                expr.cut_reason = why
        for child in expr.children:
            if not child.is_leaf:
                self.absorbed.add(child.node)
        if expr.has_form:
            expr = self._absorb_forks(expr)
        if not expr.has_form and expr.kind == "slice":
            self.opaque[node] = Opaque(OpaqueKind.UNSUPPORTED_FORM, first_reason or expr.reason)  # the guard that failed first
            leaf = self._leaf(node)
            leaf.reason = self.opaque[node].words
            return leaf
        return expr

    def _build(self, node, meaning, cut: bool) -> Expr:
        if isinstance(meaning, Layout):
            child = self._operand(meaning.input, node, cut, distributable=True, see_layout=True)
            expr = self._expr(node, "layout", meaning, [child], None)
            self._layout(expr, child)
            return expr
        if isinstance(meaning, AffineCall):
            child = self._operand(meaning.input, node, cut, distributable=True,
                                  see_layout=isinstance(meaning.op, Elementwise))
            expr = self._expr(node, "apply", meaning, [child], meaning.op)
            if child.has_pending:
                if not isinstance(meaning.op, Elementwise):
                    raise AssertionError("only elementwise maps see through layouts")
                try:
                    e = pull_back(meaning.op, child.layout, self.facts.shape(child.base))
                except NotMergeable as why:
                    expr.reason = str(why)
                else:
                    self._compute(expr, lambda: compose_form(child.pending, e), pending=True)
                    if expr.has_pending:
                        expr.layout, expr.base = child.layout, child.base
                expr.rules |= {MergeRule.COMPOSE, MergeRule.LAYOUT}
            elif child.kind == "concat" and (not child.has_form or len(child.form) > 1):
                # (parts of several sources: each part's own columns of the op, not zero blocks)
                ndim = len(self.facts.shape(child.node))
                sizes = [self.facts.shape(c.node)[child.meaning.axis] for c in child.children]
                self._compute(expr, lambda: distribute_form([c.form for c in child.children], sizes,
                                                            child.meaning.axis, ndim, meaning.op))
                expr.rules.add(MergeRule.DISTRIBUTE)
            else:
                self._compute(expr, lambda: compose_form(child.form, meaning.op))
            expr.rules |= {MergeRule.COMPOSE} if not child.is_leaf else set()
        elif isinstance(meaning, Combine):
            children = [self._operand(a, node, cut) for a, _ in meaning.terms]
            expr = self._expr(node, "combine", meaning, children, None)
            self._compute(expr, lambda: sum_forms([c.form for c in children], [w for _, w in meaning.terms]))
            expr.rules.add(MergeRule.SUM)
        elif isinstance(meaning, Concat):
            children = [self._operand(a, node, cut) for a in meaning.inputs]
            expr = self._expr(node, "concat", meaning, children, None)
            ndim = len(self.facts.shape(node))
            sizes = [(self.facts.shape(a) or (None,) * ndim)[meaning.axis] for a in meaning.inputs]
            self._compute(expr, lambda: concat_forms([c.form for c in children], meaning.axis, ndim, sizes))
            expr.rules.add(MergeRule.CONCAT)
        else:  # Slice
            child = self._operand(meaning.input, node, cut)
            expr = self._expr(node, "slice", meaning, [child], None)
            ndim = len(self.facts.shape(node))
            self._compute(expr, lambda: slice_form(child.form, meaning.axis, ndim, meaning.start, meaning.stop))
            expr.rules.add(MergeRule.SELECT)
        return expr

    def _absorb_forks(self, expr: Expr) -> Expr:
        """Pull a source into the region when every reader of it is already inside.

        ``v = M(u)`` and ``u = N(s)`` give ``v = (M o N)(s)`` once nothing outside the region
        reads ``u`` (a fork whose branches all join here: an adapter after a layer, a residual
        block after another).  Taken only when the merged form costs no more than keeping
        ``u`` apart.

        A source that an operand's region already computes inside (``u`` absorbed by one
        expert, and read as a source by the others through a duplicated elementwise map) is
        always pulled in: a region must not both compute a value and read it as an input, or
        its check, which draws every source independently, runs an inconsistent region.  When
        that cannot be done, the expr has no form.
        """
        changed = True
        while changed:
            changed = False
            for src in list(expr.form):
                inner = self.exprs.get(src)
                inside = src in expr.region  # computed by an operand's region: must be pulled in
                if inner is None or inner.is_leaf or not inner.has_form or (src in self.absorbed and not inside) or \
                        (self._edge_cast(src) and not inside):
                    continue
                if not inside and not self._only_region_reads(src, expr):
                    continue  # (inside: already computed in the region, pulled in for its other readers too)
                if self._stays_in_place(src) or not self._same_scope(src, expr.node):
                    continue
                try:
                    form = pull_in(expr.form, inner.form, src)
                except NotMergeable:
                    continue
                if not inside and self.form_cost(form, expr.node) > self.form_cost(expr.form, expr.node) + inner.cost:
                    continue
                before = expr._form
                expr._form = LazyForm(form, lambda before=before, inner=inner, src=src: pull_in(before.get(), inner.form, src),
                                      self.forms)
                self.forms.hold(expr._form)
                if not inside:  # (inside: the operand that computes it has counted its cost)
                    expr.cost += inner.cost
                expr.region |= inner.region
                expr.rules |= inner.rules | {MergeRule.COMPOSE}
                self.absorbed.add(src)
                changed = True
                break
        inside = [src for src in expr.form if src in expr.region]
        if inside:
            expr._form = None
            expr.reason = f"the region computes {inside[0].name} and also reads it as an input"
        return expr

    def _only_region_reads(self, src: fx.Node, expr: Expr) -> bool:
        """Whether ``src`` is read inside ``expr``'s region only, and so is everything the region
        computes from it: a node of the region that another region also reads (a shared norm
        before two channel slices) keeps ``src`` computed, so pulling it in would duplicate it."""
        todo, seen = list(effective_users(src)), set()
        while todo:
            node = todo.pop()
            if node in seen or node is expr.node:
                continue
            seen.add(node)
            if node not in expr.region:
                return False
            todo.extend(effective_users(node))
        return True

    def affine_cone(self, root: fx.Node) -> Tuple[List[fx.Node], List[fx.Node]]:
        """The largest region of nodes with canonical meanings that only ``root`` reads out of.

        Returns (its nodes in graph order, the values it reads from outside).  Whatever the
        closed forms say, such a region computes an affine function of its inputs.
        """
        cone = {root}
        changed = True
        while changed:
            changed = False
            for n in list(cone):
                for a in n.all_input_nodes:
                    if is_container(a):
                        a = a.args[0] if _is_split(a) else a
                        if not isinstance(a, fx.Node):
                            continue
                    if a in cone or a not in self.meanings or self._stays_in_place(a):
                        continue
                    if all(u in cone for u in effective_users(a)):
                        cone.add(a)
                        changed = True
        stack_inputs = []
        for n in cone:
            for a in n.all_input_nodes:
                if a.op == "call_function" and a.target is torch.stack:
                    stack_inputs.extend(a.all_input_nodes)
        for a in stack_inputs:
            if a not in cone and a in self.meanings and all(u in cone for u in effective_users(a)):
                cone.add(a)
        nodes = self.in_order(cone)
        sources = []
        for n in nodes:
            for a in n.all_input_nodes:
                if is_container(a):
                    inner = [a.args[0]] if _is_split(a) else a.all_input_nodes
                    for b in inner:
                        if b not in cone and b not in sources and b not in self.facts.constants:
                            sources.append(b)
                elif a not in cone and a not in sources and a not in self.facts.constants \
                        and isinstance(self.facts.values.get(a), torch.Tensor):
                    sources.append(a)  # (shape arithmetic such as x.shape[0] is recomputed, not a source)
        return nodes, sources

    def shallow(self, expr: Expr) -> Optional[Expr]:
        """``expr`` with every operand region cut back to its own last op.

        When merging a whole region does not pay (a depthwise then a pointwise conv would
        become one dense conv), its last step still may: the BN after the pointwise conv folds
        into that conv alone.  The operands' own operands become sources; they are written by
        their own exprs.  None when no operand region holds more than one op.
        """
        deeper = [c for c in expr.children if not c.is_leaf and len(c.region) > 1 and c.node in self.meanings]
        if not deeper or expr.node not in self.meanings:
            return None
        saved = {c.node: self.exprs[c.node] for c in deeper}
        try:
            for c in deeper:
                self.exprs[c.node] = self._build(c.node, self.meanings[c.node], cut=True)
            return self._build(expr.node, self.meanings[expr.node], cut=False)
        except Exception:
            return None
        finally:
            self.exprs.update(saved)

    def form_cost(self, form: Form, node: fx.Node) -> int:
        """Multiply-accumulates of ``sum_s op_s(s)`` on the example shapes."""
        out = self.facts.shape(node)
        return sum(flops(op, self.facts.shape(src), out) for src, op in form.items()) + \
            math.prod(out) * (len(form) - 1)

    def _expr(self, node, kind, meaning, children, op) -> Expr:
        expr = Expr(node, kind, meaning, children)
        expr.region = {node}.union(*[c.region for c in children])
        own = 0
        if kind == "layout":
            own = 0
        elif op is not None:
            own = flops(op, self.facts.shape(children[0].node), self.facts.shape(node))
        elif kind == "combine":
            own = math.prod(self.facts.shape(node)) * (len(children) - 1)
        seen, total = set(), own
        for c in children:  # a region shared by two operands counts once
            if id(c) not in seen and not c.is_leaf:
                seen.add(id(c))
                total += c.cost
        expr.cost = total
        self.own_cost[node] = own
        for c in children:
            expr.rules |= c.rules
        return expr

    def _leaf(self, node: fx.Node) -> Expr:
        shape = self.facts.shape(node)
        form = {node: identity(shape)} if shape is not None and node not in self.facts.constants else None
        leaf = Expr(node, "leaf", reason=None if form else "not a tensor value")
        leaf.form = form
        return leaf

    def _layout(self, expr: Expr, child: Expr) -> None:
        """A layout change of ``child``: pending until another one undoes it."""
        expr.rules.add(MergeRule.LAYOUT)
        if child.has_pending:
            index, pending, base = child.layout, child._pending, child.base
        elif child.has_form:
            shape = self.facts.shape(child.node)
            index = torch.arange(math.prod(shape)).reshape(shape)
            pending, base = child._form, child.node
        else:
            expr.reason = "operand has no affine form"
            return
        try:
            index = apply_layout(expr.node, index, self.facts)
        except Exception as why:
            expr.reason = f"layout change not understood: {why}"
            return
        base_shape = self.facts.shape(base)
        if tuple(index.shape) == tuple(base_shape) and torch.equal(index.reshape(-1), torch.arange(index.numel())):
            expr._form = pending  # the layout changes cancel out (the operand's own form)
        else:
            expr.layout, expr._pending, expr.base = index, pending, base
            expr.reason = "a layout change that is not undone"

    def _operand(self, arg: fx.Node, parent: fx.Node, cut: bool, distributable: bool = False,
                 see_layout: bool = False) -> Expr:
        expr = self.exprs[arg]
        if see_layout and expr.has_pending and not cut and self._absorbable(arg, parent):
            return expr
        no_form = not expr.has_form and not (distributable and expr.kind == "concat")
        if cut or expr.is_leaf or no_form or not self._absorbable(arg, parent) or self._edge_cast(arg):
            return self._leaf(arg)
        return expr

    def _edge_cast(self, arg: fx.Node) -> bool:
        """A cast to a less precise dtype whose input nothing else reads (a norm's float32 result
        cast back to the input's bfloat16): merged, the form would round that input all the same;
        it stays outside the region, which reads the rounded value.  A cast to a more precise
        dtype is exact (peft's IA3 casts a bfloat16 input up to its float32 scale, then back):
        the region reads its input, and computes in its output's dtype.  A cast whose input is
        also read another way (peft's LoRA beside the base layer) joins the two paths."""
        if not is_float_cast(arg, self.facts) or not self.exprs[arg.args[0]].is_leaf:
            return False
        out, given = self.facts.values.get(arg), self.facts.values.get(arg.args[0])
        if torch.finfo(out.dtype).eps <= torch.finfo(given.dtype).eps:
            return False  # (as precise or more: exact)
        return effective_users(arg.args[0]) == [arg]

    def _cheap_to_duplicate(self, arg: fx.Node, readers: List[fx.Node]) -> bool:
        """An elementwise-only value (a norm's affine tail, a BN) whose every reader is a conv or
        linear map: folding a copy into each reader costs nothing and removes the pass."""
        expr = self.exprs[arg]
        if len(readers) < 2 or not _single_elementwise(expr):
            return False
        for r in readers:
            m = self.meanings.get(r) if r in self.exprs else None
            if r not in self.exprs:
                try:
                    m = describe(r, self.facts)
                except Exception:
                    return False
            if not (isinstance(m, AffineCall) and isinstance(m.op, (Conv, Linear)) and m.input is arg):
                return False
        return True

    def _stays_in_place(self, node: fx.Node) -> bool:
        """Mutated in place through an alias, or reading such a value (it may run before the
        mutation): the value is computed where it is written, never moved into a later region."""
        return node in self.pinned or any(a in self.pinned for a in node.all_input_nodes)

    def _same_scope(self, a: fx.Node, b: fx.Node) -> bool:
        """``a`` and ``b`` may share a region: in the same scope, or either without one."""
        if a.name not in self.scopes or b.name not in self.scopes:
            return True
        return self.scopes[a.name] is not None and self.scopes[a.name] == self.scopes[b.name]

    def _absorbable(self, arg: fx.Node, parent: fx.Node) -> bool:
        """``arg`` may live inside ``parent``'s region: nothing else reads it."""
        if self._stays_in_place(arg) or not self._same_scope(arg, parent):
            return False
        occurrences = []
        fx.node.map_arg((parent.args, parent.kwargs),
                        lambda a: occurrences.append(a) if a is arg or (is_container(a) and a.args[0] is arg) else None)
        if len(occurrences) != 1:
            return False
        readers = effective_users(arg)
        if readers == [parent]:
            return True
        if self._cheap_to_duplicate(arg, readers):
            return True  # a per-channel map read by several linear maps folds into each of them
        # read only through channel slices: each slice takes its own rows of the region
        return parent in readers and all(_is_slice_of(r, arg) for r in readers)


def _single_elementwise(expr: "Expr") -> bool:
    return expr.has_form and len(expr.form) == 1 and isinstance(next(iter(expr.form.values())), Elementwise)


def effective_users(node: fx.Node) -> List[fx.Node]:
    """Users of ``node``; chunk/split tuples and stacks are replaced by the nodes that read them."""
    out = []
    for u in node.users:
        if (_is_split(u) and u.args[0] is node) or (u.op == "call_function" and u.target is torch.stack):
            out.extend(u.users)
        else:
            out.append(u)
    return out


def is_container(node: fx.Node) -> bool:
    """A tuple or stack that the matcher reads through (split/chunk, torch.stack)."""
    return _is_split(node) or (node.op == "call_function" and node.target is torch.stack)


def _is_split(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_function", "call_method") and name in ("chunk", "split")


def _is_slice_of(reader: fx.Node, arg: fx.Node) -> bool:
    import operator
    name = reader.target if isinstance(reader.target, str) else getattr(reader.target, "__name__", "")
    if name == "narrow" and reader.op in ("call_function", "call_method"):
        return reader.args[0] is arg
    if reader.op != "call_function":
        return False
    if reader.target is operator.getitem:
        return reader.args[0] is arg or (_is_split(reader.args[0]) and reader.args[0].args[0] is arg)
    return False


# ----------------------------------------------------------------------------- form algebra

def compose_form(form: Optional[Form], op: AffineOp) -> Form:
    """``op(sum_s M_s(s)) = op(M_first(first)) + sum_rest op_linear(M_s(s))``."""
    if form is None:
        raise NotMergeable(MergeKind.NO_AFFINE_FORM, "operand has no affine form")
    out: Form = {}
    for i, (src, m) in enumerate(form.items()):
        out[src] = algebra.compose(m, op if i == 0 else _without_bias(op))
    return out


def pull_in(form: Form, inner: Form, src: fx.Node) -> Form:
    """``form`` with its source ``src = sum_s inner[s](s)`` replaced by ``inner``'s sources."""
    pulled = compose_form(inner, form[src])
    rest = {k: v for k, v in form.items() if k is not src}
    return sum_forms([rest, pulled], [1.0, 1.0]) if rest else pulled


def _without_bias(op: AffineOp) -> AffineOp:
    if isinstance(op, (Conv, Linear)):
        return op.replace(bias=None)
    return Elementwise(op.scale, None, op.shape)


def pull_back(ew: Elementwise, index: torch.Tensor, base_shape) -> Elementwise:
    """``E(base.flatten()[index])`` as ``E'(base).flatten()[index]``: constants moved back.

    A layout change only moves elements, so an elementwise map commutes with it once its
    constants are moved along: ``c'[index[i]] = c[i]``.  Axes along which the moved constant
    does not vary are collapsed to size 1 again (so a per-channel map stays per-channel).
    """
    flat_index = index.reshape(-1)
    if flat_index.numel() != math.prod(base_shape):
        raise NotMergeable(MergeKind.LAYOUT, "a layout change that does not keep every element")

    def back(t):
        if t is None:
            return None
        out = torch.empty(flat_index.numel(), dtype=t.dtype)
        out[flat_index] = t.expand(index.shape).reshape(-1)
        out = out.reshape(tuple(base_shape))
        for axis in range(out.dim()):
            first = out.narrow(axis, 0, 1)
            if torch.equal(out, first.expand_as(out)):
                out = first
        return out

    return Elementwise(back(ew.scale), back(ew.shift), tuple(base_shape))


def distribute_form(parts: List[Optional[Form]], sizes: List[int], axis: int, ndim: int, op: AffineOp) -> Form:
    """``op(cat([p_1, ..., p_n], axis)) = sum_i op[:, block_i](p_i)`` (bias once).

    For a conv the blocks are input channels (axis 1), for a linear map input features (last
    axis): the op splits over the concatenated parts, whatever their sources.
    """
    if isinstance(op, Conv) and axis != 1 or isinstance(op, Linear) and axis != ndim - 1 or isinstance(op, Elementwise):
        raise NotMergeable(MergeKind.AXIS, "the op does not act across the concatenation axis")
    forms, start = [], 0
    for i, (part, size) in enumerate(zip(parts, sizes)):
        if part is None:
            raise NotMergeable(MergeKind.NO_AFFINE_FORM, "a concatenated part has no affine form")
        piece = algebra.select_inputs(op, start, start + size)
        forms.append(compose_form(part, piece if i == 0 else _without_bias(piece)))
        start += size
    return sum_forms(forms, [1.0] * len(forms))


def sum_forms(forms: List[Optional[Form]], weights: List[float]) -> Form:
    if any(f is None for f in forms):
        raise NotMergeable(MergeKind.NO_AFFINE_FORM, "an operand has no affine form")
    out: Form = {}
    for form, w in zip(forms, weights):
        for src, m in form.items():
            m = m if w == 1.0 else algebra.scale_op(m, w)
            out[src] = algebra.add(out[src], m) if src in out else m
    return out


def concat_forms(forms: List[Optional[Form]], axis: int, ndim: int, sizes: Sequence[Optional[int]]) -> Form:
    """``cat([f_1(...), ..., f_n(...)], axis)`` as one map per source: for source ``s`` the
    maps of the parts that read it stacked, a zero map (``sizes[i]`` rows) for a part that
    does not (``cat([a, L(b)]) = [I; 0] a + [0; L] b``: a part computed outside the region
    and a part computed in it, as where an activation covers some channels only)."""
    if any(f is None for f in forms):
        raise NotMergeable(MergeKind.NO_AFFINE_FORM, "an operand has no affine form")
    sources = list(dict.fromkeys(s for f in forms for s in f))
    if len(sources) == 1 and all(len(f) == 1 for f in forms):
        (src,) = sources
        return {src: algebra.concat([f[src] for f in forms], axis, ndim)}
    if any(size is None for size in sizes):
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "concatenated values of different sources with unknown sizes")
    out: Form = {}
    for src in sources:
        template = next(f[src] for f in forms if src in f)
        out[src] = algebra.concat([f[src] if src in f else algebra.zero_rows(template, size, axis, ndim)
                                   for f, size in zip(forms, sizes)], axis, ndim)
    return out


def slice_form(form: Optional[Form], axis: int, ndim: int, start: int, stop: int) -> Form:
    if form is None:
        raise NotMergeable(MergeKind.NO_AFFINE_FORM, "operand has no affine form")
    out: Form = {}
    for src, m in form.items():
        if isinstance(m, Conv) and axis != 1:
            raise NotMergeable(MergeKind.AXIS, f"slice on axis {axis}, not the conv channel axis")
        if isinstance(m, Linear) and axis != ndim - 1:
            raise NotMergeable(MergeKind.AXIS, f"slice on axis {axis}, not the feature axis")
        if isinstance(m, Elementwise):
            raise NotMergeable(MergeKind.NO_CLOSED_FORM, "a slice of an elementwise map is not a single op")
        out[src] = algebra.select_outputs(m, start, stop)
    return out
