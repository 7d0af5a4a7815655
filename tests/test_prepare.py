"""The graph preparation passes (:mod:`repc.passes.prepare`) and their pass manager.

Each pass must compute the same function after its rewrite: in-place ops made out of place
(:mod:`repc.passes.inplace`), norm affines split (:mod:`repc.passes.norm_affine`), scales
moved onto maps (:mod:`repc.passes.move_scales`), metadata reads detached
(:mod:`repc.passes.metadata_reads`).
"""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from repc.capture import propagate_shapes
from repc.passes.crops import crops_as_padding
from repc.passes.inplace import VIEW_MUTATED, functionalize_inplace
from repc.passes.metadata_reads import detach_metadata_reads, metadata_read
from repc.passes.move_scales import push_scales_into_matmul
from repc.passes.norm_affine import split_norm_affine
from repc.passes.record import record_values


# ----------------------------------------------------------------------------- in-place ops

class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        before = self.bn(y)  # reads y before it is mutated
        y += x  # fx itself traces this as an out-of-place add (a Proxy has no __iadd__)
        y.mul_(2)  # method
        z = self.act(y)  # module with inplace=True
        w = F.relu(z - 1, inplace=True)  # functional inplace kwarg
        return before, y, z, w


def test_functionalize_inplace_keeps_results_and_removes_mutation():
    from repc.examples import randomize_bn
    model = randomize_bn(InPlace()).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x.clone())
    gm = fx.symbolic_trace(copy.deepcopy(model))
    changed = functionalize_inplace(gm)
    assert changed == 3  # mul_, the ReLU module, F.relu(inplace=True)
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert "mul_" not in targets and "mul" in targets
    assert not gm.act.inplace
    assert all(not n.kwargs.get("inplace") for n in gm.graph.nodes)
    with torch.no_grad():
        x_in = x.clone()
        got = gm(x_in)
    assert torch.equal(x_in, x)  # nothing mutates the caller's tensor any more
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
    assert model.act.inplace  # the user's model keeps its flag


def test_inplace_operator_function_becomes_out_of_place():
    """Graphs built by other front ends can carry ``operator.iadd`` itself."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(operator.mul, (x, 2.0))
    early = graph.call_function(operator.neg, (y,))
    iadd = graph.call_function(operator.iadd, (y, x))
    late = graph.call_function(operator.neg, (y,))
    graph.output((early, iadd, late))
    gm = fx.GraphModule(nn.Module(), graph)
    v = torch.randn(3)
    want = (-(2 * v), 3 * v, -(3 * v))
    assert functionalize_inplace(gm) == 1
    assert iadd.target is operator.add
    assert late.args[0] is iadd and early.args[0] is y  # only the later reader sees the result
    for g, w in zip(gm(v), want):
        assert torch.allclose(g, w)


def test_an_inplace_act_through_an_identity_name_becomes_out_of_place_for_every_later_reader():
    """timm's blocks: ``self.act(self.attn(x))`` with ``attn = nn.Identity()`` and an in-place
    ReLU writes into ``x`` itself; every later reader of ``x`` or of its Identity name sees it."""

    class IdentityThenInPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.act = nn.Identity(), nn.ReLU(inplace=True)

        def forward(self, x):
            y = x * 2
            early = y + 1  # read before the write
            z = self.act(self.attn(y))
            return early, z, y - 1, self.attn(y) * 3  # later readers of y and of another name

    gm = fx.symbolic_trace(IdentityThenInPlace())
    x = torch.randn(2, 5)
    want = IdentityThenInPlace()(x.clone())
    assert functionalize_inplace(gm) == 1
    assert not any(n.meta.get(VIEW_MUTATED) for n in gm.graph.nodes)
    assert not gm.act.inplace
    for g, w in zip(gm(x), want):
        assert torch.equal(g, w)


def test_an_inplace_write_into_an_input_through_an_identity_name_stays_in_place():
    class InputWrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.act = nn.Identity(), nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.attn(x)) + x

    gm = fx.symbolic_trace(InputWrite())
    assert functionalize_inplace(gm) == 0
    assert gm.act.inplace


class CastThenAddInPlace(nn.Module):
    """PEFT's LoRA ends with ``result.to(dtype)``; Falcon's caller adds into it in place."""

    def forward(self, x):
        out = (x.float() * 2).to(torch.bfloat16)
        out.add_(x)
        return out


def test_a_cast_that_copies_on_the_example_is_not_an_alias_of_its_input():
    gm = fx.symbolic_trace(CastThenAddInPlace())
    x = torch.randn(2, 5, dtype=torch.bfloat16)
    want = CastThenAddInPlace()(x)
    # without values, the cast may return its input: the write stays in place and pins them
    assert functionalize_inplace(copy.deepcopy(gm)) == 0
    # with them, the cast made a bfloat16 copy of a float32 value: the add goes out of place
    assert functionalize_inplace(gm, record_values(gm, (x,))) == 1
    assert not any(n.meta.get(VIEW_MUTATED) for n in gm.graph.nodes)
    assert torch.equal(gm(x), want)


def test_inplace_op_through_a_view_stays_and_is_marked():

    class ViewMutation(nn.Module):
        def forward(self, x):
            a = x * 2
            a[:, :1].mul_(3)
            return a + 1

    gm = fx.symbolic_trace(ViewMutation())
    x = torch.randn(2, 3)
    want = ViewMutation()(x)
    assert functionalize_inplace(gm) == 0
    (mul_,) = [n for n in gm.graph.nodes if n.target == "mul_"]
    assert mul_.meta.get(VIEW_MUTATED)
    (a,) = [n for n in gm.graph.nodes if n.target is operator.mul]
    assert a.meta.get(VIEW_MUTATED)
    assert torch.equal(gm(x), want)


# ----------------------------------------------------------------------------- normalization layers

@pytest.mark.parametrize("norm,shape", [(nn.LayerNorm(4), (2, 5, 4)), (nn.GroupNorm(2, 4), (2, 4, 3, 3)),
                                        (nn.LayerNorm(4, elementwise_affine=False), (2, 4))])
def test_split_norm_affine_keeps_the_function(norm, shape):
    with torch.no_grad():
        for t in norm.parameters():
            t.copy_(torch.randn_like(t))
    module = nn.Sequential(norm)
    gm = fx.symbolic_trace(module)
    x = torch.randn(shape)
    propagate_shapes(gm, (x,))
    n = split_norm_affine(gm)
    assert n == (1 if any(True for _ in norm.parameters()) else 0)
    assert torch.allclose(gm(x), module(x), atol=1e-6)
    if n:
        assert not any(n.op == "call_module" for n in gm.graph.nodes)


# ----------------------------------------------------------------------------- scales through matmul

class ScaledScores(nn.Module):
    """``(q(x) @ k(x)^T) * c`` (or ``/ c``), the scores optionally read twice."""

    def __init__(self, d=6, divide=False, reuse=False, maps=True):
        super().__init__()
        self.q, self.k = (nn.Linear(d, d), nn.Linear(d, d)) if maps else (nn.Identity(), nn.Identity())
        self.divide, self.reuse = divide, reuse

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-2, -1)
        out = scores / 2.5 if self.divide else scores * 0.4
        return out + scores if self.reuse else out


def scale_pass(module, x):
    gm = fx.symbolic_trace(module)
    return gm, push_scales_into_matmul(gm, record_values(gm, (x,)))


@pytest.mark.parametrize("divide", [False, True], ids=["multiply", "divide"])
def test_a_scalar_after_a_matmul_moves_onto_the_operand_a_linear_map_computes(divide):
    module = ScaledScores(divide=divide)
    x = torch.randn(2, 5, 6)
    gm, count = scale_pass(module, x)
    assert count == 1
    (product,) = [n for n in gm.graph.nodes if n.target is operator.matmul]
    assert list(product.users)[0].op == "output"  # nothing scales the scores any more
    scaled = product.args[0]
    assert scaled.target is operator.mul and scaled.args[0].target == "q"
    assert scaled.args[1] == pytest.approx(1 / 2.5 if divide else 0.4)
    assert torch.allclose(gm(x), module(x), atol=1e-6)


def test_a_scale_stays_on_scores_that_something_else_also_reads():
    module = ScaledScores(reuse=True)
    gm, count = scale_pass(module, torch.randn(2, 5, 6))
    assert count == 0


def test_without_a_map_to_fold_into_the_scale_moves_only_onto_a_smaller_operand():
    x = torch.randn(2, 5, 6)  # 5x6 operands, 5x5 scores: the operand is larger
    gm, count = scale_pass(ScaledScores(maps=False), x)
    assert count == 0
    long = torch.randn(2, 8, 3)  # 8x3 operands, 8x8 scores: the operand is smaller
    module = ScaledScores(maps=False)
    gm, count = scale_pass(module, long)
    assert count == 1 and torch.allclose(gm(long), module(long), atol=1e-6)


class FusedQKVScores(nn.Module):
    """A fused qkv projection read through ``chunk``, ``split`` or slices, scores scaled after
    the product."""

    def __init__(self, d=6, read="chunk", divide=True):
        super().__init__()
        self.qkv, self.d, self.read, self.divide = nn.Linear(d, 3 * d), d, read, divide

    def forward(self, x):
        h, d = self.qkv(x), self.d
        if self.read == "chunk":
            q, k, v = h.chunk(3, -1)
        elif self.read == "split":
            q, k, v = h.split(d, -1)
        else:
            q, k, v = h[..., :d], h[..., d:2 * d], h[..., 2 * d:]
        scores = q @ k.transpose(-2, -1)
        scores = scores / math.sqrt(d) if self.divide else scores * 0.4
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("read", ["chunk", "split", "index"])
@pytest.mark.parametrize("divide", [False, True], ids=["multiply", "divide"])
def test_a_scale_on_one_slice_of_a_shared_map_scales_only_that_slice(read, divide):
    """Found by the transformer fuzzer: q of a fused qkv read through ``chunk(3, -1)`` was seen
    through the chunk as all of qkv, so the scale went onto k and v too (deviation 0.5).  It
    now goes onto qkv as a vector, ``c`` on q's rows and 1 on k's and v's."""
    module = FusedQKVScores(read=read, divide=divide)
    x = torch.randn(2, 5, 6)
    gm, count = scale_pass(module, x)
    assert count == 1
    (qkv,) = [n for n in gm.graph.nodes if n.target == "qkv"]
    (scaled,) = qkv.users
    assert scaled.target is operator.mul and scaled.args[1].op == "get_attr"
    vector = getattr(gm, scaled.args[1].target)
    c = 1 / math.sqrt(6) if divide else 0.4
    assert torch.allclose(vector.reshape(-1), torch.tensor([c] * 6 + [1.0] * 12))
    assert torch.allclose(gm(x), module(x), atol=1e-6)
    y = torch.randn(3, 4, 6)  # the vector runs along the features: any batch, any length
    assert torch.allclose(gm(y), module(y), atol=1e-6)


def test_a_scale_stays_off_a_shared_map_whose_scaled_rows_something_else_reads():
    class Overlap(FusedQKVScores):
        def forward(self, x):
            h, d = self.qkv(x), self.d
            q, k, v = h.chunk(3, -1)
            return (q @ k.transpose(-2, -1)) * 0.4 + h[..., :2 * d].sum()  # q's and k's rows read again

    module = Overlap()
    x = torch.randn(2, 5, 6)  # (and the 5x6 operands are larger than the 5x5 scores)
    gm, count = scale_pass(module, x)
    assert count == 0
    assert torch.allclose(gm(x), module(x), atol=1e-6)

# ----------------------------------------------------------------------------- metadata reads

class MetadataReads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        core = F.layer_norm(h, (4,))
        g = core * 2.0 + 1.0
        n = g.size(0) + self.fc(g).size(0) + (h * 3.0).size(0)
        return (g.to(h.dtype) + n).to(x.dtype)


def test_metadata_reads_become_constants_or_move_to_a_same_shaped_value_no_region_absorbs():
    module = MetadataReads()
    x = torch.randn(3, 4)
    gm = fx.symbolic_trace(module)
    count = detach_metadata_reads(gm, record_values(gm, (x,)))
    assert count == 1  # h.dtype became float32
    reads = [(n.args[1] if n.target is getattr else n.target, n.args[0].name) for n in gm.graph.nodes
             if n.target is getattr or n.target == "size"]
    assert sorted(reads) == [("dtype", "x"),  # an input's dtype stays a read: it may change
                             ("size", "add"),  # g is read by fc and by the output: a source, the read stays
                             ("size", "fc_1"),  # a linear's output is not moved past
                             ("size", "mul_1")]  # (h * 3) would reach fc, which a region absorbs
    assert torch.equal(gm(x), module(x))
    assert torch.equal(gm(x[:2]), module(x[:2]))


class ShapeOfAResidualStream(nn.Module):
    """``h = x + fc(x)`` read by the next residual and by a BN over ``h.flatten(0, 1)`` that is
    viewed back with ``B, T, _ = h.shape``; q, k, v read a LayerNorm's output and its shape."""

    def __init__(self, d=4):
        super().__init__()
        self.fc, self.bn, self.ln = nn.Linear(d, d), nn.BatchNorm1d(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = x + self.fc(x)
        B, T, _ = h.shape
        y = h + self.bn(h.flatten(0, 1)).view(B, T, -1)
        n = self.ln(y)
        B, T, C = n.shape
        return (self.q(n) + self.k(n) * self.v(n)).reshape(B, T, C)


def test_a_shape_read_stays_on_a_value_several_ops_read():
    """Found by the transformer fuzzer: ``h.shape`` of a residual sum was moved up to the model
    input.  The BN region (flatten, BN, view) reads ``h`` as its source, but its view then took
    B and T from a value outside the region; checked at another batch, the view used the
    example's B and gave another shape, so the merge was taken back.  The read now stays on
    ``h`` (which two ops read: it is a source anyway), and still moves past the LayerNorm's
    affine, which the q, k and v linears fold in."""
    module = ShapeOfAResidualStream()
    x = torch.randn(2, 3, 4)
    gm = fx.symbolic_trace(module)
    propagate_shapes(gm, (x,))
    assert split_norm_affine(gm) == 1
    assert detach_metadata_reads(gm, record_values(gm, (x,))) == 1
    reads = sorted(n.args[0].name for n in gm.graph.nodes if n.target is getattr and n.args[1] == "shape")
    assert reads[0] == "add"  # h
    assert reads[1] != "add_1" and reads[1].startswith("layer_norm"), reads  # the norm's core, not its affine tail
    assert torch.allclose(gm(x), module(x), atol=1e-6)
    assert torch.allclose(gm(x[:1]), module(x[:1]), atol=1e-6)


class RankAssertedNorm(nn.Module):
    """A library norm after a conv: ``torch._assert(y.ndim == 4)`` and ``y.dim()`` on the conv's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected a 4-d input")
        torch._assert(y.dim() == x.dim(), "same rank")
        return self.bn(y)


def test_a_rank_read_of_a_computed_value_becomes_its_constant_and_an_inputs_stays():
    module = RankAssertedNorm().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = fx.symbolic_trace(module)
    # y.ndim, y.dim(); then 4 == 4 and the assert of it, which would run on every call
    assert detach_metadata_reads(gm, record_values(gm, (x,))) == 4
    reads = [n for n in gm.graph.nodes if metadata_read(n) is not None]
    assert [(metadata_read(n), n.args[0].name) for n in reads] == [("dim", "x")]  # an input's rank may change
    asserts = [n for n in gm.graph.nodes if n.target is torch._assert]
    assert [n.args[1] for n in asserts] == ["same rank"]  # (4 == x.dim(): x's rank may differ)
    assert list(gm.graph.find_nodes(op="call_module", target="conv"))[0].users.keys() == \
        set(gm.graph.find_nodes(op="call_module", target="bn"))  # the conv is read by the norm alone
    assert torch.equal(gm(x), module(x))


# ----------------------------------------------------------------------------- crops

class Crops(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, (1, 3)), nn.Conv2d(3, 3, 3)

    def forward(self, x):
        only_convs = x[:, :, 1:-1, :]  # read by convs only: becomes a negative pad
        shared = x[..., 2:]  # also returned: stays a slice
        absolute = x[:, :, 1:5]  # keeps rows 1..4 at every size: not a fixed cut at the end
        return self.a(only_convs) + self.b(x), F.conv2d(shared, self.b.weight), shared, self.b(absolute)


def test_a_crop_only_convs_read_becomes_negative_padding_and_the_function_stays():
    model = Crops().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 7, 6)
    propagate_shapes(gm, (x,))
    assert crops_as_padding(gm) == 1
    pads = [n for n in gm.graph.nodes if n.target is F.pad]
    assert len(pads) == 1 and pads[0].args[1] == [0, 0, -1, -1]
    assert sum(n.target is operator.getitem for n in gm.graph.nodes) == 2
    for got, want in zip(gm(x), model(x)):
        torch.testing.assert_close(got, want)
    y = torch.randn(1, 3, 9, 8)  # the crop is relative to the size: other sizes too
    for got, want in zip(gm(y), model(y)):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- masked activations

class MaskedActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("mask", torch.tensor([True, True, False, False, True, False]))

    def forward(self, x):
        h = self.fc(x)  # the mask runs along the features the linear produces
        runs = torch.where(self.mask, torch.relu(h), h)  # three runs of channels
        inverted = torch.where(self.mask, h, torch.sigmoid(h))
        from_data = torch.where(h > 0, torch.relu(h), h)  # a mask from the values: stays
        return runs, inverted, from_data


def test_a_masked_activation_over_channel_runs_becomes_a_concat_of_slices():
    from repc.passes.partial_activations import split_masked_activations

    model = MaskedActivations()
    gm = fx.symbolic_trace(model)
    h = torch.randn(2, 3, 6)
    assert split_masked_activations(gm, record_values(gm, (h,))) == 2
    assert sum(n.target is torch.where for n in gm.graph.nodes) == 1  # the data-dependent one
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert [len(c.args[0]) for c in cats] == [4, 4]  # [T T | F F | T | F] and its complement
    for got, want in zip(gm(h), model(h)):
        torch.testing.assert_close(got, want)
    h = torch.randn(5, 1, 6)  # other leading sizes
    for got, want in zip(gm(h), model(h)):
        torch.testing.assert_close(got, want)


def test_a_mask_filled_into_a_slice_as_torch_export_records_it_is_split_too():
    """``mask = zeros_like(h, dtype=bool); mask[:, :, :k] = True`` as torch.export records it: a
    lifted constant filled in place into a slice of the mask (an ATen ``zeros_like``)."""
    from repc.capture_export import export_graph
    from repc.passes.partial_activations import split_masked_activations

    class BuiltMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 8)

        def forward(self, x):
            h = self.fc(x)
            mask = torch.zeros_like(h, dtype=torch.bool)
            mask[:, :, :3] = True
            return torch.where(mask, F.gelu(h), h)

    model = BuiltMask().eval()
    x = torch.randn(2, 3, 6)
    gm = export_graph(model, (x,), {}).gm
    assert any(n.target == "fill_" for n in gm.graph.nodes)
    assert split_masked_activations(gm, record_values(gm, (x,))) == 1
    assert not any(n.target == "fill_" or n.target is torch.where for n in gm.graph.nodes)
    for shape in ((2, 3, 6), (4, 5, 6)):
        x = torch.randn(shape)
        torch.testing.assert_close(gm(x)[0] if isinstance(gm(x), tuple) else gm(x), model(x))


# ----------------------------------------------------------------------------- token layouts

class TokenLayouts(nn.Module):
    """Layout changes that keep the last axis (a batch-first transpose, a token flatten given
    the feature size read off a value, its inverse) around linear maps, a per-feature scale and a
    sum of two values laid out alike, as ``nn.MultiheadAttention`` writes them (functional
    linears, in this forward); one that moves the last axis (``transpose(-1, -2)``), and one read
    by a module of its own (``head``: its input must stay the value it is given), which stay."""

    def __init__(self, d=6):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Linear(d, 3)
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        h = F.linear(x.transpose(0, 1), self.b.weight, self.b.bias)  # (N, B, 2d)
        y = F.linear(h.reshape(-1, h.shape[-1]), self.c.weight, self.c.bias).view(h.shape[0], h.shape[1], -1)
        out = y.transpose(0, 1) + (y * self.scale).transpose(0, 1)
        return F.linear(out, self.a.weight, self.a.bias), out.transpose(-1, -2), self.head(x.transpose(0, 1))


def _layouts_sunk(model: nn.Module, x: torch.Tensor):
    """``model`` traced, its metadata reads detached, then ``sink_token_layouts`` run on it: (the
    graph, how many ops it moved layouts past)."""
    from repc.passes.metadata_reads import detach_metadata_reads
    from repc.passes.token_layouts import sink_token_layouts

    gm = fx.symbolic_trace(copy.deepcopy(model))
    detach_metadata_reads(gm, record_values(gm, (x,)))
    return gm, sink_token_layouts(gm, record_values(gm, (x,)))


def test_token_layout_changes_move_below_linear_maps_scales_and_same_layout_sums():
    model = TokenLayouts().eval()
    gm, moved = _layouts_sunk(model, torch.randn(2, 5, 6))
    assert moved >= 5
    def name(n):
        return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")

    layouts = {"transpose", "reshape", "view"}
    computed = [n for n in gm.graph.nodes if name(n) in ("linear", "add", "mul")]
    # b, c, the scale, the sum and a read no layout change: the layouts come after them all
    assert len(computed) == 5 and not any(name(a) in layouts for n in computed for a in n.all_input_nodes), gm.code
    (head,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert name(head.args[0]) == "transpose"
    assert sum(name(n) == "transpose" for n in gm.graph.nodes) >= 1  # (moving the last axis: stays)
    for shape in ((2, 5, 6), (3, 4, 6)):
        x = torch.randn(shape)
        for got, want in zip(gm(x), model(x)):
            torch.testing.assert_close(got, want)


def test_which_layout_changes_keep_the_last_axis_is_read_off_their_axes_not_the_example():
    """A permutation or an axis reshape by its axes (``flatten(2)`` merges the last axis, also
    where the example's map is one pixel and moves no element); a view or reshape off the
    example, only where the last axis has more than one element."""
    from repc.passes.token_layouts import _keeps_last_axis
    from repc.vocabulary import constant_facts

    class Layouts(nn.Module):
        def forward(self, x):
            return (x.flatten(2), x.flatten(0, 1), torch.flatten(x, 0, 2), x.transpose(1, 2), x.permute(1, 0, 2, 3),
                    x.permute(0, 1, 3, 2), x.reshape(-1, x.shape[-1]), x.view(-1, 1))

    want = {"flatten": False, "flatten_1": True, "flatten_2": True, "transpose": True, "permute": True,
            "permute_1": False, "reshape": True, "view": False}
    for shape in ((2, 3, 4, 5), (1, 1, 1, 1)):
        gm = fx.symbolic_trace(Layouts())
        facts = constant_facts(gm, record_values(gm, (torch.randn(shape),)))
        got = {n.name: _keeps_last_axis(n, facts) for n in gm.graph.nodes if n.name in want}
        if shape == (1, 1, 1, 1):  # (a last axis of one element: no view or reshape is taken)
            want = {**want, "reshape": False}
        assert got == want, (shape, got)


class ViewAfterATransposedLinear(nn.Module):
    """``F.multi_head_attention_forward``'s in-projection of a batch-first input transposed to
    sequence-first, then viewed into heads: the linear's output is contiguous, the view needs it."""

    def __init__(self, d=8):
        super().__init__()
        self.q = nn.Linear(d, d)

    def forward(self, h):  # (B, T, d)
        q = F.linear(h.transpose(0, 1), self.q.weight, self.q.bias)  # (T, B, d)
        return q.view(q.shape[0], q.shape[1] * 2, -1) * 2


def test_a_view_of_a_value_whose_layout_moved_below_its_linear_becomes_a_reshape():
    model = ViewAfterATransposedLinear().eval()
    gm, moved = _layouts_sunk(model, torch.randn(2, 5, 8))
    assert moved >= 1
    gm.recompile()
    # (the transpose now follows the linear: its value has strides no view of it takes)
    assert not any(n.op == "call_method" and n.target == "view" for n in gm.graph.nodes), gm.code
    for shape in ((2, 5, 8), (3, 4, 8)):
        y = torch.randn(shape)
        torch.testing.assert_close(gm(y), model(y))
