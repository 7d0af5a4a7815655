"""The affine-region matcher (:mod:`repc.patterns.regions`) on small graphs.

For every value the matcher gives a form ``sum_s op_s(s)``, that form, evaluated with torch's
functional ops from the recorded values of its sources, must recompute the value (float64).
The tests then check the shape of the regions: which values become sources, which are
absorbed, which rules built them, and why a region was cut.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from repc.meanings import GraphFacts
from repc.passes.inplace import functionalize_inplace
from repc.passes.metadata_reads import detach_metadata_reads
from repc.ops import Conv
from repc.reasons import MergeRule
from repc.passes.record import record_values
from repc.reasons import OpaqueKind
from repc.patterns.regions import RegionMatcher

from blocks import ACNet, DBBConcat, RepMixer, RepVGG, conv_bn, randomize, run_op

F64 = torch.float64


class Matched:
    """A model traced in float64, its recorded values and the matcher's exprs."""

    def __init__(self, module: nn.Module, *shapes, detach_reads: bool = False):
        module = copy.deepcopy(module).double().eval()
        self.gm = fx.symbolic_trace(module)
        functionalize_inplace(self.gm)
        g = torch.Generator().manual_seed(0)
        inputs = tuple(torch.randn(s, generator=g, dtype=F64) for s in shapes)
        self.values = record_values(self.gm, inputs)
        if detach_reads and detach_metadata_reads(self.gm, self.values):  # as collapse does before matching
            self.values = record_values(self.gm, inputs)
        self.matcher = RegionMatcher(self.gm, GraphFacts(self.gm, self.values))
        self.exprs = self.matcher.run()

    def node(self, name: str) -> fx.Node:
        (node,) = [n for n in self.gm.graph.nodes if n.name == name]
        return node

    def expr(self, name: str):
        return self.exprs[self.node(name)]

    @property
    def output(self):
        (out,) = [n for n in self.gm.graph.nodes if n.op == "output"]
        return out.args[0]

    def root(self):
        return self.exprs[self.output]

    def sources(self, expr) -> list:
        return [s.name for s in expr.form]

    def check_all_forms(self):
        """Every form the matcher found recomputes its value from its sources."""
        checked = 0
        for node, expr in self.exprs.items():
            if expr.form is None or expr.is_leaf:
                continue
            want = self.values[node]
            got = sum(run_op(op, self.values[src]) for src, op in expr.form.items())
            assert got.shape == want.shape, node.name
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), node.name
            checked += 1
        return checked


def matched(module, *shapes, detach_reads: bool = False) -> Matched:
    m = Matched(module, *shapes, detach_reads=detach_reads)
    assert m.check_all_forms() > 0
    return m


# ----------------------------------------------------------------------------- the rules

def test_compose_chain_is_one_region_on_the_input():
    m = matched(randomize(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                                        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))), (2, 3, 6, 6))
    root = m.root()
    assert m.sources(root) == ["input_1"]
    (op,) = root.form.values()
    assert isinstance(op, Conv) and op.kernel_size == (3, 3)
    assert MergeRule.COMPOSE in root.rules
    assert {n.name for n in root.region} == {"_0", "_1", "_2", "_3", "_4"}
    assert {n.name for n in m.matcher.absorbed} == {"_0", "_1", "_2", "_3"}


def test_sum_of_branches_on_one_source():
    m = matched(randomize(RepVGG(4, 4)), (2, 4, 6, 6))
    (add,) = [n for n in m.gm.graph.nodes if n.name == "add_1"]
    expr = m.exprs[add]
    assert m.sources(expr) == ["x"]
    (op,) = expr.form.values()
    assert isinstance(op, Conv) and op.kernel_size == (3, 3) and op.groups == 1
    assert {"sum", "compose"} <= expr.rules
    # the ReLU is opaque: the output is a leaf, and says why
    assert m.root().is_leaf
    why = m.matcher.opaque[m.output]
    assert why.kind is OpaqueKind.UNKNOWN_OP and "ReLU" in why.words


def test_sum_over_several_sources_keeps_one_term_each():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 3, 3, 1, 1)
            self.b = conv_bn(3, 3, 1)

        def forward(self, x, y):
            return self.a(x) + self.b(y) + x

    m = matched(randomize(TwoInputs()), (2, 3, 5, 5), (2, 3, 5, 5))
    assert sorted(m.sources(m.root())) == ["x", "y"]


def test_concat_on_one_source_stacks_the_ops():
    m = matched(randomize(DBBConcat(3, 5)), (2, 3, 6, 6))
    (cat,) = [n for n in m.gm.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    expr = m.exprs[cat]
    assert "concat" in expr.rules and m.sources(expr) == ["x"]
    (op,) = expr.form.values()
    assert op.out_channels == 12
    root = m.root()
    assert m.sources(root) == ["x"] and isinstance(root.form[m.node("x")], Conv)


def test_concat_of_different_sources_is_distributed_into_its_consumer():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 3, 3, 1, 1)
            self.proj = nn.Conv2d(6, 4, 1)

        def forward(self, x, y):
            return self.proj(torch.cat([self.a(x), y], 1))

    m = matched(randomize(Mixed()), (2, 3, 5, 5), (2, 3, 5, 5))
    root = m.root()
    assert sorted(m.sources(root)) == ["x", "y"]
    assert MergeRule.DISTRIBUTE in root.rules


def test_concat_of_a_source_and_a_map_is_one_map_per_source():
    """RePaViT's partial activation: ``cat([relu(h[:d]), h[d:]])`` then a per-channel affine is
    ``[I; 0] relu(...) + [0; fc1[d:]] x``: the concatenation has a form over both sources."""
    class PartlyActive(nn.Module):
        def __init__(self, d=4):
            super().__init__()
            self.d = d
            self.fc1 = nn.Linear(d, 2 * d)
            self.scale, self.shift = nn.Parameter(torch.randn(2 * d)), nn.Parameter(torch.randn(2 * d))

        def forward(self, x):
            h = self.fc1(x)
            c = torch.cat([torch.relu(h[..., :self.d]), h[..., self.d:]], -1)
            return c * self.scale + self.shift

    m = matched(PartlyActive(), (2, 5, 4))
    (cat,) = [n for n in m.gm.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert MergeRule.CONCAT in m.exprs[cat].rules and sorted(m.sources(m.exprs[cat])) == ["relu", "x"]


def test_slices_of_a_value_read_only_by_slices_are_distributed():
    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 8, 3, 1, 1)

        def forward(self, x):
            y = self.a(x)
            lo, hi = y.chunk(2, 1)
            return y[:, :4] * 2 + hi - y.narrow(1, 0, 4)

    m = matched(randomize(Halves()), (2, 3, 5, 5))
    root = m.root()
    assert m.sources(root) == ["x"] and MergeRule.SELECT in root.rules
    (op,) = root.form.values()
    assert op.out_channels == 4


def test_two_readers_make_a_source():
    """A value read outside the region (here: returned as well) is materialized once, not duplicated."""
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 3, 3, 1, 1)
            self.b = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y), y

    m = matched(randomize(Fork()), (2, 3, 5, 5))
    b = m.expr("b")
    assert m.sources(b) == ["a_1"]
    assert m.node("a_1") not in m.matcher.absorbed


def test_fork_whose_readers_all_join_is_pulled_into_the_region():
    """``u = conv_bn(x); v = u + pw(u)``: every reader of ``u`` is inside ``v``'s region."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 3, 3, 1, 1)
            self.pw = conv_bn(3, 3, 1)

        def forward(self, x):
            u = self.a(x)
            return u + self.pw(u)

    m = matched(randomize(Residual()), (2, 3, 5, 5))
    assert m.sources(m.root()) == ["x"]
    assert m.node("a_1") in m.root().region



def test_a_fork_read_by_a_norm_that_another_region_shares_stays_a_source():
    """``u = y + proj(x)``, read by the residual and by a BN whose linear's channels split
    into two regions (an activated slice, an idle slice): the idle path's region reads every
    reader of ``u``, but the other slice's region needs ``u`` computed all the same, so pulling
    ``proj`` in would run it twice: ``u`` stays a source."""
    class SharedNorm(nn.Module):
        def __init__(self, d=4):
            super().__init__()
            self.d = d
            self.proj, self.bn = nn.Linear(d, d), nn.BatchNorm1d(d)
            self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x, y):
            u = y + self.proj(x)
            h = self.fc1(self.bn(u.transpose(1, 2)).transpose(1, 2))
            return self.fc2(torch.cat([torch.relu(h[..., :self.d]), h[..., self.d:]], -1)) + u

    m = matched(randomize(SharedNorm()), (2, 5, 4), (2, 5, 4))
    assert sorted(m.sources(m.root())) == ["add", "relu"]
    assert m.node("proj") not in m.root().region


def test_a_source_that_an_operand_region_computes_is_pulled_in():
    """``u = x + up(down(x))`` read by three linears through one BN (duplicated into each):
    the first linear absorbs ``u`` (u's one reader is the shared BN, inside its region), the
    others read ``u`` as a source.  Their sum must not both compute ``u`` and read it as an
    input (its check draws the sources independently and was rejected): ``u`` is pulled in,
    the sum is one map of ``x``, and no form anywhere has a source inside its own region."""
    class AdapterBnExperts(nn.Module):
        def __init__(self, d=8):
            super().__init__()
            self.down, self.up, self.bn = nn.Linear(d, 2), nn.Linear(2, d), nn.BatchNorm1d(d)
            self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(3))

        def forward(self, x):
            u = x + self.up(self.down(x))
            h = self.bn(u.flatten(0, 1)).reshape_as(u)  # (reshape_as reads u's shape only)
            return self.experts[0](h) * 0.5 + self.experts[1](h) * 0.25 + self.experts[2](h) * 0.25

    m = matched(randomize(AdapterBnExperts()), (2, 5, 8), detach_reads=True)
    assert m.sources(m.root()) == ["x"]
    for node, expr in m.exprs.items():
        if expr.form is not None and not expr.is_leaf:
            assert not set(expr.form) & expr.region, node.name

def test_region_cost_is_the_sum_of_its_ops():
    m = matched(randomize(RepVGG(4, 4, identity=False)), (1, 4, 6, 6))
    expr = m.expr("add")
    own = m.matcher.own_cost
    assert expr.cost == sum(own[n] for n in expr.region)
    assert own[m.node("dense_0")] == 36 * 4 * 4 * 9 and own[m.node("pointwise_0")] == 36 * 4 * 4
    assert own[m.node("add")] == 36 * 4


# ----------------------------------------------------------------------------- cuts and reasons

def test_strides_that_differ_cut_the_sum():
    class Strides(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 3, 5, 1, 0)
            self.b = conv_bn(3, 3, 1, 2, 0)

        def forward(self, x):
            return self.a(x) + self.b(x)

    m = matched(randomize(Strides()), (2, 3, 8, 8))
    root = m.root()
    assert "strides differ" in root.cut_reason
    # cut: one branch becomes a source of its own; both branches still fold their BN into the conv
    assert len(root.form) == 2
    for src, op in root.form.items():
        if src.name != "x":
            (inner,) = m.exprs[src].form.items()
            assert inner[0].name == "x" and isinstance(inner[1], Conv)
        else:
            assert isinstance(op, Conv)


def test_bn_before_padded_conv_is_cut_with_the_border_reason():
    m = matched(randomize(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1))), (2, 3, 5, 5))
    root = m.root()
    assert "border" in root.cut_reason
    assert m.sources(root) == ["_0"]


def test_bn_before_unpadded_conv_is_not_cut():
    m = matched(randomize(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=0))), (2, 3, 5, 5))
    assert m.root().cut_reason is None and m.sources(m.root()) == ["input_1"]


def test_nonlinearity_between_branches_is_a_source():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 3, 3, 1, 1)
            self.b = conv_bn(3, 3, 1)

        def forward(self, x):
            return self.a(x) + torch.relu(self.b(x))

    m = matched(randomize(Block()), (2, 3, 5, 5))
    assert sorted(m.sources(m.root())) == ["relu", "x"]
    why = m.matcher.opaque[m.node("relu")]
    assert why.kind is OpaqueKind.UNKNOWN_OP and "relu" in why.words
    assert m.exprs[m.node("relu")].is_leaf


def test_avg_pool_excluding_padding_is_opaque():
    m = matched(randomize(nn.Sequential(nn.Conv2d(3, 3, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                                        nn.BatchNorm2d(3))), (2, 3, 5, 5))
    why = m.matcher.opaque[m.node("_1")]
    assert why.kind is OpaqueKind.UNSUPPORTED_FORM and "count_include_pad" in why.words
    assert m.sources(m.root()) == ["_1"]


def test_spatial_slice_has_no_form_and_says_why():
    class Crop(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(3, 3, 3, 1, 1)

        def forward(self, x):
            return self.a(x)[:, :, 1:]

    m = matched(randomize(Crop()), (2, 3, 5, 5))
    assert m.root().is_leaf
    why = m.matcher.opaque[m.output]
    assert why.kind is OpaqueKind.UNSUPPORTED_FORM and "axis 2" in why.words
    assert m.sources(m.expr("a_1")) == ["x"]


def test_value_mutated_through_a_view_is_pinned():
    class ViewMutation(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            a = self.conv(x)
            a[:, :1].mul_(2)
            return self.bn(a)

    m = Matched(randomize(ViewMutation()), (2, 3, 5, 5))
    conv = m.node("conv")
    assert conv in m.matcher.pinned
    assert conv not in m.matcher.absorbed
    assert m.sources(m.root()) == ["conv"]  # the BN does not fold into the mutated conv output


def test_every_form_of_a_stage_recomputes_its_value():
    """Forms of every intermediate value of a mixed stage (including cut and distributed ones)."""
    model = randomize(nn.Sequential(RepVGG(3, 6, stride=2), ACNet(6, 6), RepMixer(6), RepVGG(6, 6, groups=3)))
    m = Matched(model, (1, 3, 9, 9))
    assert m.check_all_forms() >= 4


def test_forms_are_held_while_in_use_and_computed_again_the_same_when_read_later():
    m = Matched(randomize(RepVGG(4, 4)), (2, 4, 6, 6))
    # after matching no form is held: each is computed again from its recipe where it is read
    assert m.matcher.forms.held == []
    root = max((e for e in m.exprs.values() if e.has_form and not e.is_leaf), key=lambda e: len(e.region))
    assert len(root.region) > 3 and root._form.value is None
    first = {src: op.weight.clone() for src, op in root.form.items()}
    assert root._form in m.matcher.forms.held  # (held until the next release)
    m.matcher.forms.release()
    assert root._form.value is None
    again = root.form
    assert first.keys() == again.keys() and all(torch.equal(first[s], again[s].weight) for s in first)
    assert m.check_all_forms() > 0  # every form, computed again, still recomputes its value
