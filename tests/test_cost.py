"""The cost decision (:func:`repc.passes.cost.decide`): merged forms that pay, and the refusals."""

from __future__ import annotations

import torch
import torch.fx as fx

from repc.ops import Conv, Elementwise, Linear
from repc.passes.cost import decide, op_count
from repc.passes.norm_affine import NORM_AFFINE
from repc.patterns.regions import Expr
from repc.reasons import RejectionKind

F64 = torch.float64


def _with_form(expr: Expr, form) -> Expr:
    expr.form = form
    return expr


def _region(n: int, cost: int, form) -> Expr:
    graph = fx.Graph()
    nodes = [graph.placeholder(f"n{i}") for i in range(n)]
    return _with_form(Expr(nodes[-1], "apply", region=set(nodes), cost=cost), form)


def _linear():
    return Linear(torch.zeros(4, 4, dtype=F64), torch.zeros(4, dtype=F64))


def test_a_cheaper_form_is_taken():
    d = decide(_region(3, 100, {None: _linear()}), 64, computed_weights=False)
    assert d.merge and d.rewrite and d.kind is None


def test_a_dearer_form_is_refused_as_not_paying():
    d = decide(_region(2, 10, {None: _linear()}), 64, computed_weights=False)
    assert not d.merge and d.kind is RejectionKind.DOES_NOT_PAY and "64 multiply-adds merged vs 10" in d.words


def test_same_work_in_as_many_ops_is_left_silently_unless_weights_are_computed():
    region = _region(1, 64, {None: _linear()})
    assert decide(region, 64, computed_weights=False) == decide(region, 64, computed_weights=False)
    assert not decide(region, 64, computed_weights=False).merge
    assert decide(region, 64, computed_weights=False).kind is None
    assert decide(region, 64, computed_weights=True).merge


def test_a_norms_own_affine_goes_back_into_the_norm_without_a_rewrite():
    region = _region(2, 0, {None: Elementwise(None, None, (2, 4))})
    for node in region.region:
        node.meta[NORM_AFFINE] = "ln"
    d = decide(region, 10, computed_weights=False)
    assert d.merge and not d.rewrite


def test_op_count_counts_padding_scale_and_shift_ops():
    asym = Conv(torch.zeros(2, 2, 3, 3, dtype=F64), None, (1, 1), ((0, 2), (1, 1)), (1, 1), 1)
    ew = Elementwise(torch.ones(1, 2, 1, 1, dtype=F64), torch.ones(1, 2, 1, 1, dtype=F64), (1, 2, 3, 3))
    assert op_count({"a": asym}) == 2 and op_count({"a": asym, "b": ew}) == 5


def test_a_merge_that_adds_multiply_adds_but_removes_ops_pays_under_a_latency_model():
    """3x3 and dilated 3x3 branches: one 5x5 conv costs more multiply-adds than the two 3x3s,
    but where each op costs a fixed overhead (small maps), one op is faster."""
    import torch.nn as nn

    from repc.latency import KINDS, LatencyModel
    from repc.passes.collapse import collapse
    from repc.passes.cost import LatencyCost

    from blocks import conv_bn, randomize

    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 3, padding=2, dilation=2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = randomize(Dilated()).eval()
    x = torch.randn(1, 4, 8, 8)
    by_macs = collapse(fx.symbolic_trace(model), (x,))
    assert [r.kind for r in by_macs.rejections] == [RejectionKind.DOES_NOT_PAY], by_macs.rejections
    overhead_bound = LatencyModel({k: (2e-5, 1e-11, 1e-12) for k in KINDS})
    by_latency = collapse(fx.symbolic_trace(model), (x,), cost_model=LatencyCost(overhead_bound))
    (rewrite,) = by_latency.rewrites
    assert rewrite.macs_after > rewrite.macs_before  # more multiply-adds, fewer ops
    convs = [m for m in by_latency.module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (5, 5)
    y = torch.randn(2, 4, 11, 9)
    torch.testing.assert_close(by_latency.module(y), model(y), rtol=1e-5, atol=1e-5)
    arithmetic_bound = LatencyModel({k: (0.0, 1e-9, 0.0) for k in KINDS})
    kept = collapse(fx.symbolic_trace(model), (x,), cost_model=LatencyCost(arithmetic_bound))
    assert sorted(m.kernel_size for m in kept.module.modules() if isinstance(m, nn.Conv2d)) == [(3, 3), (3, 3)]
    assert any(r.kind is RejectionKind.DOES_NOT_PAY and "us predicted merged" in r.reason for r in kept.rejections)


def test_measured_costs_time_the_region_and_its_form_on_the_example():
    import torch.nn as nn

    from repc.passes.collapse import collapse
    from repc.passes.cost import MeasuredCost

    from blocks import conv_bn, randomize

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(4, 4, 3, padding=1), conv_bn(4, 4, 1)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))

    model = randomize(Branches()).eval()
    x = torch.randn(1, 4, 8, 8)
    measured = MeasuredCost(repeats=3)
    result = collapse(fx.symbolic_trace(model), (x,), cost_model=measured)
    assert measured._region_times, "the regions were timed"
    assert all(t > 0 for t in measured._region_times.values())
    for r in result.rejections:  # whatever the clock chose, refusals say so in its unit
        assert r.kind is not RejectionKind.DOES_NOT_PAY or "us measured" in r.reason
    y = torch.randn(2, 4, 10, 7)
    torch.testing.assert_close(result.module(y), model(y), rtol=1e-5, atol=1e-5)


class _Table:
    """A cost model from tables: each node's own cost, each form's cost by its root."""
    unit = "units"

    def __init__(self, own, forms):
        self.own, self.forms = own, forms

    def node_cost(self, node, matcher):
        return self.own[node.name]

    def form_cost(self, form, node, matcher):
        return self.forms[node.name]

    def region_cost(self, expr, matcher):
        return sum(self.own[n.name] for n in expr.region)

    def words(self, cost):
        return str(cost)


def test_the_whole_is_refused_when_its_operands_merged_on_their_own_cost_less():
    from repc.passes.cost import best_cost, parts_cost

    graph = fx.Graph()
    x, a, b, c, root = (graph.placeholder(n) for n in ("x", "a", "b", "c", "root"))
    leaf = Expr(x, "leaf")
    a_expr = _with_form(Expr(a, "apply", children=[leaf], region={a}), {x: None})
    b_expr = _with_form(Expr(b, "apply", children=[a_expr], region={a, b}), {x: None})
    c_expr = _with_form(Expr(c, "apply", children=[leaf], region={c}), {x: None})
    top = _with_form(Expr(root, "combine", children=[b_expr, c_expr], region={a, b, c, root}), {x: None})
    model = _Table(own={"a": 4, "b": 4, "c": 3, "root": 1}, forms={"b": 2, "c": 3, "root": 6})
    assert parts_cost(b_expr, model, None) == 4 + 4  # b as written on a (a's own region has one op)
    assert best_cost(b_expr, model, None) == 2
    assert parts_cost(top, model, None) == 1 + 2 + 3
    whole = decide(top, 6.5, False, model.region_cost(top, None), model, parts_cost(top, model, None))
    assert not whole.merge and whole.kind is RejectionKind.DOES_NOT_PAY and "merged on their own" in whole.words
    assert decide(top, 5, False, 12, model, 6).merge
