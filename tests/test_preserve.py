"""The module-preserving output of ``repc.compile``: a copy of the user's own model with each fused
region swapped in at the module that computed it, verified like the whole-model graph."""

import copy
import dataclasses
from collections import Counter
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import repc
import repc.api
from repc.examples import RepVGGBlock, conv_bn, randomize_bn

from blocks import ops_run


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _random_affines(model, seed=0):
    """Every BatchNorm with random statistics, every parameter off its init."""
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


class Net(nn.Module):
    """A user's model: RepVGG blocks, a conv-BN stem as siblings, a head, methods and attributes."""

    def __init__(self):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.stages = nn.Sequential(RepVGGBlock(8, 8), RepVGGBlock(8, 16, stride=2), RepVGGBlock(16, 16))
        self.head = nn.Linear(16, 5)
        self.pretrained_cfg = {"name": "net", "input_size": (3, 16, 16)}

    def forward_features(self, x):
        return self.stages(self.act(self.stem_bn(self.stem_conv(x))))

    def forward(self, x):
        return self.head(self.forward_features(x).mean((2, 3)))


def _same(a, b, tol=1e-4):
    with torch.no_grad():
        return ((a - b).abs().max() / b.abs().max()).item() <= tol


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_the_fused_model_keeps_its_class_methods_and_attributes(front_end):
    model = _random_affines(Net())
    before = _state(model)
    x = torch.randn(2, 3, 16, 16)
    fused = repc.compile(model, x, front_end=front_end, graph=False)
    report = fused.repc_report
    assert report.output == "module-preserving", report.output_note
    assert type(fused) is Net and fused is not model
    assert fused.pretrained_cfg == model.pretrained_cfg
    # the user's model is untouched and shares nothing with the result
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    theirs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not theirs & {t.untyped_storage().data_ptr() for t in list(fused.parameters()) + list(fused.buffers())}
    assert any(type(m) is nn.Linear for m in fused.modules())  # (a module kept as written: copied too)
    # same function, on other batch and map sizes too, through forward and forward_features
    for shape in ((2, 3, 16, 16), (3, 3, 20, 12), (1, 3, 9, 9)):
        y = torch.randn(shape)
        with torch.no_grad():
            assert _same(fused(y), model(y))
            assert _same(fused.forward_features(y), model.forward_features(y))
    # each RepVGG block is one conv (and its activation), the stem BN folded into its conv
    for i in range(3):
        block = fused.stages[i]
        assert sum(isinstance(m, nn.Conv2d) for m in block.modules()) == 1
        assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    assert isinstance(fused.stem_bn, nn.Identity) and isinstance(fused.stem_conv, nn.Conv2d)
    assert fused.stem_conv.bias is not None
    assert fused.head is not model.head and isinstance(fused.head, nn.Linear)  # untouched: a copy
    paths = {s.path for s in report.swaps}
    assert {"stages.0", "stages.1", "stages.2"} <= paths
    # state-dict names follow the model's module paths
    names = set(fused.state_dict())
    assert {"stages.0.conv.weight", "stem_conv.weight", "stem_conv.bias", "head.weight"} <= names


def test_graph_true_gives_the_whole_model_graph():
    model = _random_affines(Net())
    x = torch.randn(2, 3, 16, 16)
    graph = repc.compile(model, x, graph=True)
    assert isinstance(graph, fx.GraphModule) and graph.repc_report.output == "graph"
    preserved = repc.compile(model, x, graph=False)
    with torch.no_grad():
        assert _same(preserved(x), graph(x), 1e-5)
    assert sum(r.params_after for r in graph.repc_report.rewrites) == \
        sum(r.params_after for r in preserved.repc_report.rewrites)


def test_hooks_on_untouched_modules_stay_and_the_copy_runs_them():
    model = _random_affines(Net())
    seen = []
    model.head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    fused = repc.compile(model, torch.randn(2, 3, 16, 16), graph=False)
    seen.clear()
    with torch.no_grad():
        fused(torch.randn(4, 3, 16, 16))
    assert seen == [torch.Size([4, 5])]


class Shared(nn.Module):
    """One block called twice: it cannot be swapped on its own, its parent is."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(RepVGGBlock(4, 4))
        self.tail = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.tail(self.inner(self.inner(x)))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Shared()

    def forward(self, x):
        return self.body(x)


def test_a_module_called_twice_is_swapped_at_its_parent_and_the_report_says_why():
    model = _random_affines(Outer())
    x = torch.randn(2, 4, 8, 8)
    fused = repc.compile(model, x, graph=False)
    report = fused.repc_report
    assert type(fused) is Outer and report.output == "module-preserving", report.output_note
    swap = next(s for s in report.swaps if s.path == "body")
    assert "called 2 times" in swap.note
    with torch.no_grad():
        y = torch.randn(3, 4, 11, 11)
        assert _same(fused(y), model(y))


def test_a_preserved_model_that_fails_verification_is_never_returned(monkeypatch):
    model = _random_affines(Net())
    x = torch.randn(2, 3, 16, 16)
    real = repc.api.preserve

    def wrong(*args, **kwargs):
        preserved, swaps = real(*args, **kwargs)
        with torch.no_grad():
            preserved.head.bias.add_(1.0)  # a write-back that computes something else
        return preserved, swaps

    monkeypatch.setattr(repc.api, "preserve", wrong)
    fused = repc.compile(model, x, graph=False)
    report = fused.repc_report
    assert isinstance(fused, fx.GraphModule) and report.output == "graph"
    assert "failed verification" in report.output_note
    with torch.no_grad():
        assert _same(fused(x), model(x))


def test_with_verify_false_the_preserved_model_is_still_checked_on_the_example(monkeypatch):
    model = _random_affines(Net())
    x = torch.randn(2, 3, 16, 16)
    real = repc.api.preserve

    def wrong(*args, **kwargs):
        preserved, swaps = real(*args, **kwargs)
        with torch.no_grad():
            preserved.head.weight.mul_(2.0)
        return preserved, swaps

    monkeypatch.setattr(repc.api, "preserve", wrong)
    fused = repc.compile(model, x, verify=False, graph=False)
    assert isinstance(fused, fx.GraphModule) and "failed verification" in fused.repc_report.output_note


class SelfOutput(nn.Module):
    """Nothing that pays: an eval-mode dropout between a linear and a residual add of another
    input (BERT's ``BertSelfOutput``)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(8)

    def forward(self, h, x):
        return self.norm(x + self.drop(self.dense(h)))


class Residual(nn.Module):
    """``x + W x + b``: one linear ``(W + I) x + b``, the whole module one call of it."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.dense(x))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.out = SelfOutput()
        self.res = Residual()

    def forward(self, x):
        return self.res(torch.tanh(self.out(torch.tanh(self.mix(x)), x)))


def test_a_rewrite_that_saves_nothing_leaves_the_module_as_written():
    model = _random_affines(Layer())
    x = torch.randn(2, 5, 8)
    fused = repc.compile(model, x, graph=False)
    report = fused.repc_report
    assert type(fused) is Layer and report.output == "module-preserving", report.output_note
    assert type(fused.out) is SelfOutput and isinstance(fused.out.drop, nn.Dropout)
    assert next(s for s in report.swaps if s.path == "out").becomes == "unchanged"
    # a module whose whole forward is one merged linear becomes that linear
    assert type(fused.res) is nn.Linear
    with torch.no_grad():
        for shape in ((2, 5, 8), (3, 9, 8)):
            y = torch.randn(shape)
            assert _same(fused(y), model(y))


def test_the_preserved_model_pickles_and_reloads(tmp_path):
    model = _random_affines(nn.Sequential(RepVGGBlock(4, 4), conv_bn(4, 6, 3, padding=1), nn.ReLU()))
    x = torch.randn(2, 4, 8, 8)
    fused = repc.compile(model, x, graph=False)
    assert type(fused) is nn.Sequential and fused.repc_report.output == "module-preserving"
    path = tmp_path / "fused.pt"
    torch.save(fused, path)
    loaded = torch.load(path, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
    # a fresh copy of the architecture takes the state dict of a chain-swapped model's merged leaves
    assert isinstance(fused[1][1], nn.Identity) and fused[1][0].bias is not None


class NormThenProjections(nn.Module):
    """A LayerNorm read only by three projections (its affine folds forward into them)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) * torch.sigmoid(self.k(h)) * torch.tanh(self.v(h))


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(NormThenProjections() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_an_affine_folded_forward_leaves_the_norm_with_a_unit_affine_and_the_architecture(front_end):
    model = _random_affines(Stack())
    x = torch.randn(2, 5, 8)
    fused = repc.compile(model, x, front_end=front_end, graph=False)
    report = fused.repc_report
    assert type(fused) is Stack and report.output == "module-preserving", report.output_note
    for block in fused.blocks:
        assert type(block) is NormThenProjections and type(block.norm) is nn.LayerNorm
        assert torch.equal(block.norm.weight, torch.ones(8)) and torch.equal(block.norm.bias, torch.zeros(8))
        assert all(type(getattr(block, p)) is nn.Linear for p in "qkv")
    assert any("folded forward" in s.note for s in report.swaps)
    # the state dict fits the architecture: a fresh model loads it and computes the same
    fresh = Stack().eval()
    fresh.load_state_dict(fused.state_dict())
    with torch.no_grad():
        for shape in ((2, 5, 8), (3, 11, 8)):
            y = torch.randn(shape)
            assert _same(fresh(y), model(y)) and _same(fused(y), model(y))


class NormLinear(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.BatchNorm1d(cin), nn.Linear(cin, cout))


class DistilledHead(nn.Module):
    """RepViT's classifier: two BN-linear heads averaged (one linear in its deploy form)."""

    def __init__(self, c, classes):
        super().__init__()
        self.head, self.head_dist = NormLinear(c, classes), NormLinear(c, classes)

    def forward(self, x):
        return (self.head(x) + self.head_dist(x)) / 2


class PooledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head_drop = nn.Dropout(0.1)  # the model's own, before its head: identity in eval
        self.head = DistilledHead(8, 5)

    def forward(self, x):
        return self.head(self.head_drop(self.body(x).mean((2, 3))))


def test_an_identity_before_a_module_does_not_lift_its_region_to_the_model():
    model = _random_affines(PooledNet())
    x = torch.randn(2, 3, 8, 8)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert report.output == "module-preserving" and not report.output_note, report
    assert type(fused) is PooledNet and isinstance(fused.head_drop, nn.Dropout)
    assert sum(isinstance(m, nn.Linear) for m in fused.head.modules()) == 1
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fused.modules())
    for shape in ((1, 3, 8, 8), (3, 3, 12, 10)):
        y = torch.randn(shape)
        assert torch.allclose(fused(y), model(y), atol=1e-5)


class ConvNormPair(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class ResidualMlp(nn.Module):
    """LeViT's conv-mode block: ``x + ln2(act(ln1(x)))``, each ln a 1x1 conv then BN."""

    def __init__(self, c):
        super().__init__()
        self.ln1, self.act, self.ln2 = ConvNormPair(c, 2 * c), nn.Hardswish(), ConvNormPair(2 * c, c)

    def forward(self, x):
        return x + self.ln2(self.act(self.ln1(x)))


def test_residual_blocks_after_merged_blocks_are_each_swapped_at_their_own_module():
    # the sum a block's merge emits reads the previous block's merged output first: it is
    # placed by the rewrite that emitted it, not by its first input's module
    model = _random_affines(nn.Sequential(ConvNormPair(3, 8), *[ResidualMlp(8) for _ in range(4)]))
    x = torch.randn(2, 3, 6, 6)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert report.output == "module-preserving" and not report.output_note, report
    assert not any(s.becomes == "not applied" for s in report.swaps), report.swaps
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all(isinstance(fused[i], ResidualMlp) or isinstance(fused[i], fx.GraphModule) for i in range(1, 5))
    y = torch.randn(1, 3, 9, 7)
    assert torch.allclose(fused(y), model(y), atol=1e-5)


class DistilledNet(nn.Module):
    """LeViT's distilled heads, averaged in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.stem = ConvNormPair(3, 8)
        self.head, self.head_dist = NormLinear(8, 5), NormLinear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x)).mean((2, 3))
        return (self.head(x) + self.head_dist(x)) / 2


@pytest.mark.parametrize("verify", [True, False])
def test_a_region_spanning_the_models_forward_replaces_its_forward_and_the_model_keeps_its_class(verify):
    # both heads and their average are one linear map, in the model's own forward: the model's
    # forward becomes its graph (one linear), as graph=True merges it
    model = _random_affines(DistilledNet())
    x = torch.randn(2, 3, 8, 8)
    whole = repc.compile(model, (x,), graph=True, verify=verify)  # (the graph's nodes: one linear call)
    assert sum(n.op == "call_module" and isinstance(whole.get_submodule(n.target), nn.Linear)
               for n in whole.graph.nodes) == 1, whole.code
    fused = repc.compile(model, (x,), verify=verify)
    report = fused.repc_report
    assert type(fused) is DistilledNet and report.output == "module-preserving", report
    assert [s.path for s in report.swaps] == ["<model>"] and report.swaps[0].becomes.startswith("forward: ")
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in fused.modules()), fused
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 1
    assert ops_run(fused, x) == ops_run(whole, x) == Counter(conv=1, linear=1)  # what runs: the graph's ops
    for shape in ((1, 3, 8, 8), (3, 3, 12, 10)):
        y = torch.randn(shape)
        with torch.no_grad():
            assert _same(fused(y), model(y)) and _same(whole(y), model(y))


class BranchesInTheModelsForward(nn.Module):
    """RepVGG's block written as a model: the branches summed in the model's own forward."""

    def __init__(self, c=4):
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.bn_identity, self.act = nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        self.name = "rep"

    def forward(self, x):
        return self.act(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.bn_identity(x))

    def describe(self):
        return f"{self.name}: {len(list(self.children()))} children"


def test_branches_summed_in_the_models_own_forward_merge_by_default_and_the_result_keeps_its_class(tmp_path):
    model = _random_affines(BranchesInTheModelsForward())
    hooked = []
    hook = model.register_forward_hook(lambda m, a, out: hooked.append(out.shape))
    x = torch.randn(2, 4, 8, 8)
    fused = repc.compile(model, (x,))
    hook.remove()
    assert type(fused) is BranchesInTheModelsForward and fused.repc_report.output == "module-preserving"
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (3, 3)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert fused.describe().startswith("rep: ") and fused.name == "rep"  # methods and attributes stay
    y = torch.randn(3, 4, 9, 7)
    with torch.no_grad():
        assert _same(fused(y), model(y))
        assert hooked[-1] == (3, 4, 9, 7)  # (the model's own hooks run on the result too)
        fused._forward_hooks.clear()  # (a lambda: not picklable)
        torch.save(fused, tmp_path / "fused.pt")
        reloaded = torch.load(tmp_path / "fused.pt", weights_only=False)
        assert type(reloaded) is BranchesInTheModelsForward and _same(reloaded(y), model(y))
        assert _same(copy.deepcopy(fused)(y), model(y))
        # the graph reads the model's own attributes at each call: a conversion of the model reaches it
        assert _same(copy.deepcopy(fused).double()(y.double()), copy.deepcopy(model).double()(y.double()))
    assert sum(p.numel() for p in fused.parameters()) == 4 * 4 * 9 + 4


@dataclasses.dataclass
class BlockOutput:
    features: torch.Tensor


class BranchesReturningAnOutputClass(BranchesInTheModelsForward):
    """The branches summed in the model's own forward, returned in a dataclass or a ModelOutput."""

    def __init__(self, output: str):
        super().__init__()
        self.output = output

    def forward(self, x):
        y = super().forward(x)
        if self.output == "dataclass":
            return BlockOutput(y)
        from transformers.modeling_outputs import BaseModelOutput
        return BaseModelOutput(last_hidden_state=y)


@pytest.mark.parametrize("output", ["dataclass", "ModelOutput"])
@pytest.mark.parametrize("front_end", ["auto", "export"])
def test_a_models_own_forward_returning_an_output_class_merges_as_one_returning_a_tensor(output, front_end,
                                                                                         tmp_path):
    model = _random_affines(BranchesReturningAnOutputClass(output))
    x = torch.randn(2, 4, 8, 8)
    fused = repc.compile(model, (x,), front_end=front_end)
    report = fused.repc_report
    assert type(fused) is BranchesReturningAnOutputClass and report.output == "module-preserving", report
    assert [s.path for s in report.swaps] == ["<model>"], report.swaps  # (before: each BN folded, no branch merged)
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    y = torch.randn(3, 4, 9, 7)
    first = lambda out: getattr(out, dataclasses.fields(out)[0].name)  # noqa: E731
    with torch.no_grad():
        got, want = fused(y), model(y)
        assert type(got) is type(want) and _same(first(got), first(want))
        torch.save(fused, tmp_path / "fused.pt")
        reloaded = torch.load(tmp_path / "fused.pt", weights_only=False)
        assert type(reloaded(y)) is type(want) and _same(first(reloaded(y)), first(want))
        assert _same(first(copy.deepcopy(fused)(y)), first(want))


class TokenAttention(nn.Module):
    """Reads its token count and width from its input, as attention blocks do."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj, self.norm = nn.Linear(d, d), nn.BatchNorm1d(d)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, 2, c // 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        o = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1) @ v
        o = self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.norm(o.flatten(0, 1)).reshape_as(o)


class PatchesToTokens(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.embed, self.block, self.head = nn.Conv2d(3, d, 2, 2), TokenAttention(d), nn.Linear(d, 5)

    def forward(self, pixel_values):
        x = self.embed(pixel_values).flatten(2).transpose(1, 2)
        return self.head(self.block(x).mean(1))


def test_a_size_read_outside_a_module_is_read_again_only_from_an_axis_that_holds_that_size():
    """Export reads the image's sizes once, at the top; the block's token count is their product.
    On an 8x8 example the token width is 8 too: the block must not read the image's height off
    its own width axis (before, the result failed on 12x12 images)."""
    model = _random_affines(PatchesToTokens())
    fused = repc.compile(model, (), {"pixel_values": torch.randn(2, 3, 8, 8)}, front_end="export")
    assert fused.repc_report.verification.ok
    for shape in ((2, 3, 12, 12), (1, 3, 16, 8), (3, 3, 10, 14)):
        y = torch.randn(shape)
        with torch.no_grad():
            assert _same(fused(pixel_values=y), model(y)), shape


class ConvNorm(nn.Sequential):
    def __init__(self, cin, cout, k=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class CascadedAttention(nn.Module):
    """timm EfficientViT's cascaded group attention: each head's qkv conv-BN reads the previous
    head's output plus its own chunk, and ``view(B, -1, H, W)`` with sizes read off the input."""

    def __init__(self, heads=3, d=16):
        super().__init__()
        self.qkvs = nn.ModuleList(ConvNorm(d, 3 * d) for _ in range(heads))
        self.dws = nn.ModuleList(ConvNorm(d, d, 3, d) for _ in range(heads))
        self.proj = ConvNorm(d * heads, 32)
        self.d = d

    def forward(self, x):
        B, C, H, W = x.shape
        chunks = x.chunk(len(self.qkvs), dim=1)
        feat, outs = chunks[0], []
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + chunks[i]
            q, k, v = qkv(feat).view(B, -1, H, W).split([self.d] * 3, dim=1)
            q, k, v = dw(q).flatten(2), k.flatten(2), v.flatten(2)
            attn = ((q.transpose(-2, -1) @ k) * 0.25).softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.d, H, W)
            outs.append(feat)
        return self.proj(torch.relu(torch.cat(outs, 1)))


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_every_conv_bn_of_a_cascaded_attention_folds_in_its_own_module(front_end):
    # the per-region check does not try another batch on a view sized by the input's batch (it
    # ran, folding the batch into the -1, and "failed"); a qkv conv whose sum input makes the
    # whole region not pay still takes its BN (the cost memo no longer gives a freed shallower
    # form's cost to the next one made at its address: which head kept its BN varied by run)
    model = _random_affines(CascadedAttention())
    x = torch.randn(4, 48, 7, 7)
    for _ in range(3):
        fused = repc.compile(model, (x,), front_end=front_end)
        report = fused.repc_report
        assert report.output == "module-preserving" and not report.rolled_back, report
        assert not [r for r in report.rejected if r.kind is repc.api.RejectionKind.CHECK_FAILED], report
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), report
    y = torch.randn(2, 48, 5, 6)
    with torch.no_grad():
        assert _same(fused(y), model(y))


class InByOut(nn.Module):
    """GPT-2's Conv1D: ``x @ weight + bias`` with the weight ``in x out``."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(nx, nf)), nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


@pytest.mark.parametrize("shape", [(4, 6), (5, 5)])
def test_a_merged_linear_is_held_by_the_layer_class_written_there(shape):
    from repc.preserve import in_the_layers_own_class
    merged = nn.Linear(shape[0], shape[1])
    held = in_the_layers_own_class(InByOut(*shape), merged)
    assert type(held) is InByOut and held.weight.shape == (shape[0], shape[1])  # (square: the probe tells)
    x = torch.randn(3, shape[0])
    assert torch.allclose(held(x), merged(x), atol=1e-6)
    other = InByOut(*shape)
    other.scale = nn.Parameter(torch.ones(1))  # a third parameter: not a plain weight and bias
    assert in_the_layers_own_class(other, merged) is merged
    assert in_the_layers_own_class(nn.Linear(*shape), merged) is merged


def test_a_block_that_becomes_module_calls_in_turn_is_a_sequential_of_them():
    # a RepVGG block fused: its merged conv, then its activation; as a Sequential its call costs
    # less Python than a GraphModule's, and its state-dict names stay the block's own
    model = _random_affines(Net())
    x = torch.randn(2, 3, 16, 16)
    fused = repc.compile(model, (x,))
    for i in range(3):
        block = fused.stages[i]
        assert type(block) is nn.Sequential and [type(m) for m in block] == [nn.Conv2d, nn.ReLU], block
    assert "stages.1.conv.weight" in fused.state_dict()
    y = torch.randn(1, 3, 20, 12)
    with torch.no_grad():
        assert _same(fused(y), model(y))


class InPlaceActBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv3, self.conv1, self.act = conv_bn(c, c, 3, padding=1), conv_bn(c, c, 1), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.conv3(x) + self.conv1(x))


def test_an_activation_the_model_wrote_in_place_runs_in_place_after_its_merged_conv():
    # repc's graph runs it out of place (a new tensor per call); after the block's merged conv,
    # whose output only it reads, the swapped-in block runs it as written
    model = _random_affines(nn.Sequential(InPlaceActBlock(8), InPlaceActBlock(8)))
    x = torch.randn(2, 8, 10, 10)
    fused = repc.compile(model, (x,))
    for block in fused:
        assert type(block) is nn.Sequential and block.act.inplace is True, block
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))  # the model's own, untouched
    y = torch.randn(3, 8, 12, 9)
    before = y.clone()
    with torch.no_grad():
        assert _same(fused(y), model(y)) and torch.equal(y, before)  # the input itself is not written


class StemNet(nn.Module):
    """timm's ResNet stem: conv1, bn1 and an in-place act1 in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), \
            nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


def test_a_conv_bn_chain_before_an_in_place_activation_is_swapped_as_a_chain():
    # the module calls are recorded as copies: the in-place act1 overwrote bn1's recorded output,
    # so the chain conv1 -> bn1 did not match and its BN stayed
    model = _random_affines(StemNet())
    x = torch.randn(2, 3, 8, 8)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert type(fused) is StemNet and isinstance(fused.bn1, nn.Identity), report
    assert not [r for r in report.rejected if r.kind is repc.api.RejectionKind.MODULE_BOUNDARY], report
    y = torch.randn(3, 3, 11, 7)
    with torch.no_grad():
        assert _same(fused(y), model(y))


def test_module_paths_through_a_slice_of_a_container_are_the_items_own():
    # export records `self.layers[:n]` as `layers.slice(None, n, None).i`
    from repc.preserve.provenance import _without_slices
    assert _without_slices("model.layers.slice(None, 2, None).1.mlp") == "model.layers.1.mlp"
    assert _without_slices("blocks.slice(2, None, 3).1.attn") == "blocks.5.attn"
    assert _without_slices("blocks.slice(-2, None, None).0") == "blocks.slice(-2, None, None).0"  # (length unknown)


def _saved_by_names(name: str, layers: Callable[[nn.Module], None], forward: Callable) -> type:
    """A transformers model class (saved by parameter names, like every ``PreTrainedModel``) whose
    ``__init__`` makes the layers ``layers`` sets on it, with ``forward``."""
    transformers = pytest.importorskip("transformers")
    config_class = type(f"{name}Config", (transformers.PretrainedConfig,), {"model_type": f"repc-{name.lower()}"})

    def __init__(self, config=None):
        transformers.PreTrainedModel.__init__(self, config if config is not None else config_class())
        layers(self)
        self.post_init()
    return type(name, (transformers.PreTrainedModel,), {"config_class": config_class, "__init__": __init__,
                                                        "forward": forward})


def _reloads_to_the_model(fused: nn.Module, model: nn.Module, tmp_path, y: torch.Tensor) -> None:
    """``fused`` saved with ``save_pretrained`` reloads, every key in place, to ``model``'s function."""
    fused.save_pretrained(tmp_path)
    reloaded, info = type(fused).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        assert _same(reloaded.eval()(y), model(y)) and _same(fused(y), model(y))


def test_a_bn_folded_into_a_bias_free_conv_of_a_checkpointed_model_reloads_to_the_fused_outputs(tmp_path):
    # a model saved by parameter names: the conv keeps no bias (its architecture has none), the
    # BatchNorm stays with identity statistics and carries the shift, so from_pretrained gives it back
    def layers(m):
        m.conv, m.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        m.act, m.head = nn.ReLU(), nn.Conv2d(8, 4, 1)

    TinyConv = _saved_by_names("TinyConv", layers, lambda m, pixel_values: m.head(m.act(m.bn(m.conv(pixel_values)))))
    model = _random_affines(TinyConv())
    fused = repc.compile(model, (torch.randn(2, 3, 8, 8),))
    assert type(fused) is TinyConv and fused.conv.bias is None and isinstance(fused.bn, nn.BatchNorm2d)
    _reloads_to_the_model(fused, model, tmp_path, torch.randn(3, 3, 9, 7))


def test_a_norm_before_a_bias_free_linear_of_a_checkpointed_model_keeps_its_shift_and_reloads(tmp_path):
    # Swin's patch merging: a LayerNorm read only by a linear without bias.  Folding the norm
    # gives the linear a bias the architecture lacks (from_pretrained drops it as unexpected and
    # reloads another function): in a model saved by parameter names, that fold is refused
    def layers(m):
        m.norm, m.reduction = nn.LayerNorm(16), nn.Linear(16, 8, bias=False)

    TinyMerge = _saved_by_names("TinyMerge", layers, lambda m, x: m.reduction(m.norm(x)))
    model = _random_affines(TinyMerge())
    fused = repc.compile(model, (torch.randn(2, 5, 16),))
    assert type(fused) is TinyMerge and fused.state_dict().keys() == model.state_dict().keys()
    _reloads_to_the_model(fused, model, tmp_path, torch.randn(3, 7, 16))


class ChunkedGateUp(nn.Module):
    """Phi-3's MLP: one projection for gate and up, its output read in two chunks."""

    def __init__(self, d=8):
        super().__init__()
        self.gate_up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(up * torch.nn.functional.silu(gate))


def test_a_lora_layer_whose_output_is_read_in_chunks_is_swapped_for_its_merged_linear():
    # the graph writes each chunk read as a slice; the slices are the caller's, not the layer's
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(ChunkedGateUp(), peft.LoraConfig(r=2, init_lora_weights=False,
                                                                 target_modules=["gate_up"])).eval()
    x = torch.randn(2, 5, 8)
    fused = repc.compile(model, (x,))
    assert type(fused) is ChunkedGateUp and type(fused.gate_up) is nn.Linear, fused.repc_report.swaps
    y = torch.randn(3, 7, 8)
    with torch.no_grad():
        assert _same(fused(y), model(y))


def test_a_lora_on_a_bias_free_conv_before_a_norm_of_a_checkpointed_model_merges_and_reloads(tmp_path):
    # LoRA on HF ResNet's convolutions: the merged conv comes back without the (zero) bias its
    # architecture lacks, so the swap keeps the checkpoint's names (before: the PEFT model unchanged)
    peft = pytest.importorskip("peft")

    def layers(m):
        m.convolution = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        m.normalization, m.head = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    TinyConvNet = _saved_by_names("TinyConvNet", layers, lambda m, pixel_values: m.head(torch.relu(
        m.normalization(m.convolution(pixel_values)))))
    model = peft.get_peft_model(_random_affines(TinyConvNet()),
                                peft.LoraConfig(r=2, init_lora_weights=False, target_modules=["convolution"])).eval()
    fused = repc.compile(model, (torch.randn(2, 3, 16, 16),))
    assert type(fused) is TinyConvNet and type(fused.convolution) is nn.Conv2d, fused.repc_report.output_note
    assert fused.convolution.bias is None
    _reloads_to_the_model(fused, model, tmp_path, torch.randn(3, 3, 18, 14))


def test_regions_kept_finer_over_several_confined_builds_give_back_the_architecture(tmp_path):
    # Whisper's encoder (saved by parameter names): its norms fold into q/k/v and fc1 across
    # modules, which no swap keeps the names of; the first confined build still leaves some out,
    # the next keeps them finer (before: the whole-model GraphModule came back, no save_pretrained)
    transformers = pytest.importorskip("transformers")
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    torch.manual_seed(0)
    config = transformers.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                        num_mel_bins=8, max_source_positions=16)
    model = _random_affines(WhisperEncoder(config))
    x = torch.randn(2, 8, 32)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert type(fused) is WhisperEncoder and report.output == "module-preserving" and report.rewrites, report
    fused.save_pretrained(tmp_path)
    reloaded, info = WhisperEncoder.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        want = model(x).last_hidden_state
        assert _same(fused(x).last_hidden_state, want) and _same(reloaded.eval()(x).last_hidden_state, want)


# ----------------------------------------------------------------------------- outputs matched by structure

def test_a_module_output_matched_by_structure_is_taken_only_where_it_is_the_one_value_out_and_recomputes_the_call():
    """Where merges upstream move the fused graph's values further than value matching allows
    (an attention amplifying float32 rounding, bfloat16), a module's output is the one tensor
    its nodes give out of it of the output's shape and float dtype, not already another
    output's -- and the replacement is kept only if, run on the inputs the module was given, it
    returns the module's output."""
    from repc.preserve.observation import _Call, _refuse_unless_same_call, _sole_value_out
    from repc.preserve.provenance import _Refused

    graph = fx.Graph()
    a, b, c = graph.placeholder("a"), graph.placeholder("b"), graph.placeholder("c")
    out = torch.randn(2, 3)
    values = {a: out + 0.1, b: torch.randn(2, 5), c: torch.randn(2, 3)}
    assert _sole_value_out(out, [a], values, set()) is a  # drifted, but the one value out alike
    assert _sole_value_out(out, [a, b], values, set()) is a  # (the other is of another shape)
    assert _sole_value_out(out, [a, c], values, set()) is None  # two alike: no telling which
    assert _sole_value_out(out, [a, c], values, {c}) is a  # c is another output's
    assert _sole_value_out(out, [b], values, set()) is None  # not of the output's shape
    half = out.bfloat16()
    assert _sole_value_out(half, [a], {a: half}, set()) is a
    assert _sole_value_out(half, [a], {a: out}, set()) is None  # another dtype
    ids = torch.arange(6).reshape(2, 3)
    assert _sole_value_out(ids, [a], {a: ids}, set()) is None  # integers: by value only

    linear = nn.Linear(3, 3).eval()
    x = torch.randn(2, 3)
    with torch.no_grad():
        call = _Call((x,), {}, linear(x))
        _refuse_unless_same_call(copy.deepcopy(linear), call)  # recomputes it: kept
        wrong = copy.deepcopy(linear)
        wrong.bias.add_(1.0)
    with pytest.raises(_Refused):
        _refuse_unless_same_call(wrong, call)
    with pytest.raises(_Refused):
        _refuse_unless_same_call(nn.Linear(4, 3), call)  # fails on the recorded input


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_peft_layer_compiled_on_its_own_comes_back_as_its_plain_merged_layer(kind):
    # a PEFT layer is a wrapper, as the PEFT model is: its merge is the plain layer PEFT's own
    # merge gives, not the PEFT class holding a graph (whose save would hold repc's names)
    import warnings
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    layer = wrapped.base_model.model[0].eval()
    x = torch.randn(2, 16) if kind == "linear" else torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no adapter-left warning: nothing is left)
        fused = repc.compile(layer, x)
    assert type(fused) is (nn.Linear if kind == "linear" else nn.Conv2d), type(fused)
    assert fused.repc_report.swaps[0].becomes == type(fused).__name__
    others = (torch.randn(3, 5, 16),) if kind == "linear" else (torch.randn(1, 4, 11, 7),)
    with torch.no_grad():
        for y in (x,) + others:
            assert torch.allclose(fused(y), layer(y), atol=1e-5)


# ----------------------------------------------------------------------------- wrappers that delegate

class CallsItsCopy(nn.Module):
    """PEFT's ModulesToSaveWrapper: an untrained original beside the copy it calls."""

    def __init__(self, layer):
        super().__init__()
        self.original, self.copy = layer, copy.deepcopy(layer)

    def forward(self, x):
        return self.copy(x)


class UpdatesWeightsForTheCall(nn.Module):
    """PEFT's ParamWrapper: the base layer's weight swapped for an updated one during its call."""

    def __init__(self, layer):
        super().__init__()
        self.base_layer, self.delta = layer, nn.Linear(layer.in_features, layer.out_features, bias=False)

    def forward(self, x):
        stored = self.base_layer.weight
        try:
            del self.base_layer.weight
            self.base_layer.weight = stored + self.delta.weight
            return self.base_layer(x)
        finally:
            self.base_layer.weight = stored


@pytest.mark.parametrize("wrapper, unwrapped", [(CallsItsCopy, True), (UpdatesWeightsForTheCall, False)])
def test_a_wrapper_is_replaced_by_the_layer_it_calls_only_where_that_layer_alone_gives_its_output(wrapper,
                                                                                                  unwrapped):
    from repc.preserve.layers import unwrap_delegating
    from repc.preserve.observation import record_calls
    torch.manual_seed(0)
    model = nn.Sequential(wrapper(nn.Linear(4, 4)), nn.ReLU()).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = model(x)
    swaps = unwrap_delegating(model, record_calls(model, (x,), {}), lambda m: isinstance(m, wrapper))
    assert (type(model[0]) is nn.Linear) == unwrapped and len(swaps) == int(unwrapped)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_placement_reads_the_module_calls_recorded_when_the_model_was_observed(monkeypatch):
    # the model runs once on the example for the check's reference and for placement: placement,
    # over the several confined builds of Whisper's encoder too, never runs it again
    transformers = pytest.importorskip("transformers")
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    from repc.preserve import planning

    def no_second_run(*args, **kwargs):
        raise AssertionError("placement ran the model on the example again")

    monkeypatch.setattr(planning, "record_calls", no_second_run)
    torch.manual_seed(0)
    config = transformers.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                        num_mel_bins=8, max_source_positions=16)
    x = torch.randn(2, 8, 32)
    for model in (_random_affines(BranchesInTheModelsForward()), _random_affines(WhisperEncoder(config))):
        example = (torch.randn(2, 4, 8, 8),) if isinstance(model, BranchesInTheModelsForward) else (x,)
        fused = repc.compile(model, example)
        assert type(fused) is type(model) and fused.repc_report.output == "module-preserving", fused.repc_report
        assert fused.repc_report.rewrites and fused.repc_report.verification.ok


def test_a_recorded_call_runs_a_module_on_copies_of_its_arguments():
    # the records serve every write-back of a compile: a module that writes its argument in place
    # (an activation written in place, run to match a module's output) must not change them
    from repc.preserve.observation import calls_recorded

    class WritesItsInput(nn.Module):
        def forward(self, x):
            return x.mul_(2)

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    with calls_recorded(model) as calls, torch.no_grad():
        model(torch.randn(2, 3))
    before = calls["1"].args[0].clone()
    with torch.no_grad():
        assert torch.equal(calls["1"].run(WritesItsInput()), before * 2)
    assert torch.equal(calls["1"].args[0], before)


def test_module_calls_larger_than_a_share_of_the_weights_are_recorded_again_at_placement(monkeypatch):
    # a net of large maps and few weights: its modules' inputs and outputs are not held through the
    # build (they would cost more memory than the weights); placement runs the model once for them
    from repc.preserve import planning
    runs = []
    record = planning.record_calls
    monkeypatch.setattr(planning, "record_calls", lambda *a, **k: runs.append(1) or record(*a, **k))
    monkeypatch.setattr(repc.api, "RECORDS_FLOOR", 0)
    model = _random_affines(BranchesInTheModelsForward())
    x = torch.randn(2, 4, 8, 8)
    fused = repc.compile(model, (x,))
    assert type(fused) is type(model) and fused.repc_report.output == "module-preserving", fused.repc_report
    assert len(runs) == 1
    with torch.no_grad():
        assert _same(fused(x), model(x))


def test_recording_calls_stops_and_leaves_nothing_past_its_budget():
    from repc.preserve.observation import calls_recorded
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(8, 64)  # (each copy 2 KiB: the input, two outputs between, the output)
    with calls_recorded(model, budget=5 * 2 ** 10) as calls, torch.no_grad():
        model(x)
    assert calls == {}
    with calls_recorded(model, budget=64 * 2 ** 10) as calls, torch.no_grad():
        model(x)
    assert set(calls) == {"", "0", "1", "2"} and torch.equal(calls["0"].args[0], x)
