"""repc.capture_export: models written the way libraries write them are captured by torch.export
and fuse as far as their own conversion code goes."""

import copy
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repc
import repc.api
from repc.capture_export import GUARD_WORDS, export_graph
from repc.report import op_counts
from repc.examples import randomize_bn
from repc.examples.library_style import ConvNorm, RankCheckedBatchNorm, drop_path

from blocks import ops_run


class LibraryRepVGGBlock(nn.Module):
    """timm-style: 3x3 and 1x1 conv-norm branches and a norm identity, drop path, an identity
    ``attn`` (timm's when there is no SE) before the in-place act."""

    def __init__(self, c, drop=0.1):
        super().__init__()
        self.conv_kxk = ConvNorm(c, c, 3)
        self.conv_1x1 = ConvNorm(c, c, 1)
        self.identity = RankCheckedBatchNorm(c)
        self.drop = drop
        self.attn = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        B, C, H, W = x.shape  # a shape read the block does not otherwise need
        y = self.conv_kxk(x) + self.conv_1x1(x)
        if self.training:
            y = F.dropout(y, 0.1)
        y = drop_path(y, self.drop, self.training) + self.identity(x)
        return self.act(self.attn(y))  # the act writes into the sum through its Identity name


@dataclass
class Output:
    logits: torch.Tensor
    features: Optional[torch.Tensor] = None


class LibraryNet(nn.Module):
    def __init__(self, c=8, blocks=3):
        super().__init__()
        self.stem = ConvNorm(3, c, 3, stride=2)
        self.stages = nn.Sequential(*[LibraryRepVGGBlock(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 5)

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward(self, x, return_features: bool = False):
        f = self.forward_features(x)
        return Output(self.head(f.mean((2, 3))), f if return_features else None)


class Wrapper(nn.Module):
    """A PEFT-style wrapper: forwards whatever it is given."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def convs_and_norms(module):
    convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    return convs, norms


def random_model(model):
    torch.manual_seed(0)
    randomize_bn(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("front_end", ["export", "fx", "auto"])
def test_a_library_repvgg_with_rank_checked_norms_fuses_to_one_conv_per_block(front_end):
    model = random_model(LibraryNet())
    x = torch.randn(2, 3, 16, 16)
    fused = repc.compile(model, (x,), front_end=front_end)
    report = fused.repc_report
    assert report.front_end == {"export": "torch.export"}.get(front_end, "fx") and report.verification.ok, report
    assert convs_and_norms(fused) == (4, 0)  # stem + one per block, no norm left (deploy form)
    assert ops_run(fused, x) == {"conv": 4, "linear": 1}, ops_run(fused, x)  # and that is what runs
    for shape in ((1, 3, 16, 16), (3, 3, 20, 12)):
        y = torch.randn(shape)
        assert torch.allclose(fused(y).logits, model(y).logits, atol=1e-5, rtol=1e-4)
    assert isinstance(fused(x), Output)


def test_a_wrapper_forwarding_args_and_kwargs_is_captured_with_keyword_inputs():
    model = random_model(Wrapper(LibraryNet()))
    x = torch.randn(2, 3, 16, 16)
    fused = repc.compile(model, (), {"x": x, "return_features": True})  # fx cannot take **kwargs: export
    assert fused.repc_report.front_end == "torch.export" and convs_and_norms(fused) == (4, 0)
    assert ops_run(fused, x=x, return_features=True) == {"conv": 4, "linear": 1}
    assert "fx" in fused.repc_report.front_ends_declined
    out, want = fused(x=x, return_features=True), model(x=x, return_features=True)
    assert isinstance(out, Output)
    assert torch.allclose(out.features, want.features, atol=1e-5, rtol=1e-4)
    y = torch.randn(3, 3, 12, 12)  # another batch and spatial size, through the pytree specs
    assert torch.allclose(fused(x=y, return_features=True).logits, model(x=y, return_features=True).logits,
                          atol=1e-5, rtol=1e-4)
    other = fused(x=x, return_features=False)  # the model's own forward takes the other path
    assert other.features is None and torch.allclose(other.logits, model(x=x).logits, atol=1e-5, rtol=1e-4)
    whole = repc.compile(model, (), {"x": x, "return_features": True}, graph=True)  # (the graph refuses it)
    with pytest.raises(AssertionError):
        whole(x=x, return_features=False)  # the graph computed the path with features


def test_guards_refuse_inputs_the_graph_does_not_hold_for():
    model = random_model(LibraryNet())
    # graph=True: the whole graph's guards are the subject (the default output runs the model's own
    # forward, which fails in the conv as the model itself does)
    fused = repc.compile(model, (torch.randn(2, 3, 16, 16),), front_end="export", graph=True)
    with pytest.raises(AssertionError, match="x.size\\(\\)\\[1\\] == 3"):
        fused(torch.randn(2, 4, 16, 16))  # the stem takes 3 channels: refused with the guard's words


class SizeBranch(nn.Module):
    """A branch on the input's size: export's graph holds for even widths only."""

    def __init__(self, c=4):
        super().__init__()
        self.a, self.b = ConvNorm(c, c, 3), ConvNorm(c, c, 1)

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            return self.a(x) + self.b(x)
        return self.a(x)


def test_a_size_dependent_branch_falls_back_to_fx_and_says_why():
    model = random_model(SizeBranch())
    x = torch.randn(2, 4, 8, 8)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert report.front_end.startswith("fx") and report.verification.ok, report
    assert GUARD_WORDS in report.front_ends_declined["torch.export"], report  # (and fx not whole either)
    y = torch.randn(2, 4, 9, 9)  # odd: the other branch, which the fused model still computes
    assert torch.allclose(fused(y), model(y), atol=1e-5, rtol=1e-4)


class BranchAboveASize(nn.Module):
    """A branch taken only above the example's width: export's graph holds up to it."""

    def __init__(self, c=4, widest=12):
        super().__init__()
        self.a, self.b, self.widest = ConvNorm(c, c, 3), ConvNorm(c, c, 1), widest

    def forward(self, x):
        y = self.a(x) + self.b(x)
        if x.shape[-1] > self.widest:
            y = y + F.avg_pool2d(x, 3, 1, 1)
        return F.relu(y)


def test_export_records_the_sizes_just_outside_those_its_graph_holds_for():
    model = random_model(BranchAboveASize())
    captured = export_graph(model, (torch.randn(2, 4, 12, 12),), {})
    assert captured.sizes_outside == [(0, 3, 13)]  # (input 0, its width; the height is unbounded)
    assert export_graph(random_model(SizeBranch()), (torch.randn(2, 4, 8, 8),), {}).sizes_outside == []
    # the example above the threshold: the graph holds from it up (export's own floor, 2, is not a bound)
    above = export_graph(random_model(BranchAboveASize(widest=4)), (torch.randn(2, 4, 8, 8),), {})
    assert above.sizes_outside == [(0, 3, 4)]


@pytest.mark.parametrize("how", ["default", "graph", "in_place"])
def test_a_branch_taken_only_above_the_example_size_is_checked_there(how):
    """The checks try a size above the largest export's graph holds for: the result computes the
    model's other branch there too (before, every check ran at or below the example's width, and
    the default output silently computed the example's branch)."""
    model = random_model(BranchAboveASize())
    x = torch.randn(2, 4, 12, 12)
    work = copy.deepcopy(model) if how == "in_place" else model
    fused = repc.compile(work, (x,), graph=how == "graph", in_place=how == "in_place")
    report = fused.repc_report
    assert report.verification.ok and not report.rolled_back, report
    assert "torch.export" in report.front_ends_declined, report  # (fx captures what holds for all widths)
    for shape in ((2, 4, 12, 12), (1, 4, 16, 16), (3, 4, 13, 9)):
        y = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(fused(y), model(y), atol=1e-5, rtol=1e-4), shape


class SmallInputsOtherwise(nn.Module):
    """timm's habit: a block that takes another path below a width, inside the model."""

    def __init__(self, c=4, narrowest=5):
        super().__init__()
        self.stem = ConvNorm(3, c, 3)
        self.block = BranchAboveASize(c, widest=narrowest - 1)

    def forward(self, x):
        return self.block(F.relu(self.stem(x)))


def test_a_branch_inside_a_module_taken_below_the_example_size_is_checked_there():
    # export's graph holds from width 5 up; the default output swapped the block for its part of
    # the graph and computed the example's branch on narrower inputs (off by 0.8-1.0), which no
    # check tried (they ran at or above the example's width)
    model = random_model(SmallInputsOtherwise())
    fused = repc.compile(model, (torch.randn(1, 3, 6, 6),))
    report = fused.repc_report
    assert report.verification.ok and report.output == "module-preserving", report
    assert any(s.endswith("x4") for s in report.verification.inputs_checked), report.verification
    for shape in ((2, 3, 4, 4), (2, 3, 6, 4), (1, 3, 3, 3), (2, 3, 9, 7)):
        y = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(fused(y), model(y), atol=1e-5, rtol=1e-4), shape


def test_a_copy_running_parts_of_exports_graph_refuses_inputs_the_graph_does_not_hold_for(monkeypatch, tmp_path):
    # where the check does not reach the other side of a test on a size (a parity, a product of
    # sizes), the module-preserving copy checks export's conditions on the model's inputs, as the
    # whole-model graph does: a refusal, never the example's branch computed on them
    monkeypatch.setattr(repc.api.Compilation, "sizes_outside_the_graph", lambda self: [])
    model = random_model(SmallInputsOtherwise())
    fused = repc.compile(model, (torch.randn(1, 3, 6, 6),))
    assert fused.repc_report.output == "module-preserving" and fused.repc_report.front_end == "torch.export"
    assert isinstance(fused.block, fx.GraphModule), fused  # (the block runs its part of the graph)
    torch.save(fused, tmp_path / "fused.pt")
    for result in (fused, torch.load(tmp_path / "fused.pt", weights_only=False)):
        with torch.no_grad():
            y = torch.randn(2, 3, 7, 9)
            assert torch.allclose(result(y), model(y), atol=1e-5, rtol=1e-4)
            assert torch.allclose(result(x=y), model(y), atol=1e-5, rtol=1e-4)
            with pytest.raises(AssertionError, match=r"holds only where x\.size\(\)\[3\] >= 5"):
                result(torch.randn(2, 3, 4, 4))


def clip_if_large(t):
    """A value-dependent branch (torch.export cannot capture it; fx records one call)."""
    if bool(t.abs().max() > 1e6):
        return t.clamp(-1e6, 1e6)
    return t


torch.fx.wrap("clip_if_large")


class NormedAttention(nn.Module):
    def __init__(self, d=16, clip=False):
        super().__init__()
        self.clip = clip
        self.ln, self.attn, self.fc = nn.LayerNorm(d), nn.MultiheadAttention(d, 2, batch_first=True), nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(clip_if_large(x) if self.clip else x)
        return self.fc(self.attn(h, h, h, need_weights=False)[0])


def test_fx_leaving_multihead_attention_opaque_gives_way_to_export_and_is_taken_where_export_fails():
    """fx keeps ``nn.MultiheadAttention`` as one leaf, so the norm before it cannot fold into its
    in-projection: export (which records its parts) is used, and fx says why it was not; where
    export cannot capture the model, fx's whole graph is used all the same."""
    x = torch.randn(2, 5, 16)
    model = randomize_bn(NormedAttention()).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert report.front_end == "torch.export", str(report)
    assert "MultiheadAttention" in report.front_ends_declined["fx"]
    # the norm's affine in the in-projection, the out-projection and fc one linear
    assert op_counts(export_graph(fused, (x,), {}).gm) == (2, 1), str(report)
    assert op_counts(export_graph(model, (x,), {}).gm) == (3, 1)
    torch.testing.assert_close(fused(x), model(x))
    model.clip = True
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert report.front_end == "fx" and not report.skipped, str(report)
    assert GUARD_WORDS in report.front_ends_declined["torch.export"] or "torch.export" in report.front_ends_declined
    torch.testing.assert_close(fused(x), model(x))


def test_shapes_read_and_unpacked_at_run_time_stay_general():
    class Tokens(nn.Module):
        """``reshape(*y.size())`` and a BatchNorm1d over tokens (a paper's own code)."""

        def __init__(self, d=8):
            super().__init__()
            self.fc, self.bn, self.out = nn.Linear(d, d), nn.BatchNorm1d(d), nn.Linear(d, d)

        def forward(self, x):
            y = self.fc(x)
            h = self.bn(y.flatten(0, 1)).reshape(*y.size())
            return self.out(h)

    model = random_model(Tokens())
    fused = repc.compile(model, (torch.randn(2, 5, 8),), front_end="export")
    report = fused.repc_report
    assert report.front_end == "torch.export" and report.verification.ok, report
    assert sum(isinstance(m, (nn.Linear, nn.BatchNorm1d)) for m in fused.modules()) == 1, fused
    y = torch.randn(3, 7, 8)
    assert ops_run(fused, y) == {"linear": 1}, ops_run(fused, y)
    assert torch.allclose(fused(y), model(y), atol=1e-5, rtol=1e-4)


def test_export_front_end_names_why_it_cannot_capture():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on values: neither front end captures it whole
                return x * 2
            return x

    with pytest.raises(repc.api.ReparamError, match="torch.export failed"):  # (before any output: either form)
        repc.compile(DataDependent().eval(), (torch.randn(2, 3),), front_end="export", graph=True)


def test_the_flat_graph_has_the_model_tensors_as_attributes_and_no_export_metadata():
    model = random_model(LibraryNet())
    captured = export_graph(model, (torch.randn(2, 3, 16, 16),), {})
    for node in captured.gm.graph.nodes:
        assert "val" not in node.meta
    # the model's own layers are called as modules, at their paths
    assert "stages.0.conv_kxk.0" in dict(captured.gm.named_modules())
    assert not any(str(n.target).startswith("aten.") for n in captured.gm.graph.nodes if n.op == "call_function"
                   and "conv" in str(n.target))


def test_guards_translate_to_graph_code_over_the_inputs():
    import torch.fx as fx
    from repc.capture_export import _GuardTranslator
    import ast
    graph = fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    code = "(P[0].size()[3] % 2 == 0) and max(P[0].size()[0], 2) <= P[1].size()[0] * 4"
    out = _GuardTranslator(graph, [x, y]).visit(ast.parse(code, mode="eval").body)
    graph.output(out)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert gm(torch.zeros(3, 1, 1, 4), torch.zeros(1)) is True
    assert gm(torch.zeros(3, 1, 1, 5), torch.zeros(1)) is False
    assert gm(torch.zeros(9, 1, 1, 4), torch.zeros(2)) is False
    with pytest.raises(Exception, match="cannot write as graph code"):
        _GuardTranslator(graph, [x, y]).visit(ast.parse("P[0].stride()[0] == 1", mode="eval").body)


def test_guards_on_sizes_computed_with_sym_max_and_sym_min_translate_too():
    # export writes a guard on ``min(window, H)`` (timm's EfficientViT, LeViT) with torch.sym_min
    import ast
    import torch.fx as fx
    from repc.capture_export import _GuardTranslator
    graph = fx.Graph()
    x = graph.placeholder("x")
    code = "torch.sym_max(1, P[0].size()[2] // 7) == torch.sym_min(3, P[0].size()[3]) and math.floor(2.5) == 2"
    graph.output(_GuardTranslator(graph, [x]).visit(ast.parse(code, mode="eval").body))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    assert gm(torch.zeros(1, 1, 14, 2)) is True  # max(1, 2) == min(3, 2)
    assert gm(torch.zeros(1, 1, 14, 5)) is False  # max(1, 2) != min(3, 5)
    assert gm(torch.zeros(1, 1, 3, 1)) is True  # max(1, 0) == min(3, 1)


def test_a_capture_is_reused_for_a_module_made_and_called_alike_with_its_own_weights():
    from repc.capture_export import CaptureCache, export_graph, reusing_captures

    def block():
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()

    first, second, wider = block(), block(), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 4)
    cache = CaptureCache()
    with reusing_captures(cache):
        export_graph(first, (x,), {})
        assert not cache.took
        again = export_graph(second, (x,), {})
        assert cache.took  # (the same classes, weight shapes and call)
        export_graph(second, (torch.randn(2, 3, 4),), {})
        assert not cache.took  # (another call: captured afresh)
        export_graph(wider, (x,), {})
        assert not cache.took  # (other weight shapes)
    assert torch.equal(again.gm(x)[0], second(x)) and not torch.equal(again.gm(x)[0], first(x))
    kept = list(cache.programs.values())
    assert all(t.device.type == "meta" for ep in kept for t in ep.state_dict.values())  # (no weights held)
    export_graph(first, (x,), {})
    assert not cache.took  # (outside the block, nothing is taken)


def test_an_input_broadcast_over_the_batch_is_not_tied_to_it():
    # a decoder layer's rotary tables: batch 1 beside hidden states of batch 2 (the example does
    # not tie the two batches, so neither may the graph)
    class Rotate(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        def forward(self, hidden, cos):
            return self.proj(self.norm(hidden)) * cos

    model = Rotate().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5), model.norm.bias.uniform_(-1, 1)
    hidden, cos = torch.randn(2, 5, 8), torch.randn(1, 5, 8)
    fused = repc.compile(model, (hidden, cos), front_end="export")
    assert fused.repc_report.verification.ok and fused.repc_report.rewrites
    other = torch.randn(3, 5, 8)
    with torch.no_grad():
        assert torch.allclose(fused(other, cos), model(other, cos), atol=1e-5)


class LinearThenTokenNorm(nn.Module):
    """LeViT's linear then BatchNorm1d over the flattened tokens, shaped back with ``reshape_as``."""

    def __init__(self, d=8):
        super().__init__()
        self.linear, self.batch_norm = nn.Linear(d, 2 * d, bias=False), nn.BatchNorm1d(2 * d)

    def forward(self, x):
        x = self.linear(x)
        return self.batch_norm(x.flatten(0, 1)).reshape_as(x)


def test_a_norm_shaped_back_with_reshape_as_folds_through_export():
    model = random_model(LinearThenTokenNorm())
    fused = repc.compile(model, (torch.randn(2, 5, 8),), front_end="export")
    assert len(fused.repc_report.rewrites) == 1, fused.repc_report
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules()), fused
    y = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert torch.allclose(fused(y), model(y), atol=1e-5, rtol=1e-4)
