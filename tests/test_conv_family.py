"""`repc.compile` on the conv family of structural re-parameterization (issue 2).

Every block of the family (RepVGG, ACNet, DBB in both forms, MobileOne, FastViT's RepMixer,
RepViT's RepVGGDW, LeViT's Linear-BN / BN-Linear), written in module, functional and
method/operator style, with random BN statistics in eval mode: the fused model computes the
same outputs on the example and on other batch and spatial sizes, holds one conv per block
and no foldable BatchNorm, the input model is untouched, and the report lists the rewrites.
Regions that must not merge stay as written, exactly, and the report says why.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repc
from repc.capture_export import export_graph
from blocks import EXAMPLES, ops_run
from repc.examples import DiverseBranchBlock, MobileOneBlock, MobileOneUnit, RepVGGBlock, example_net

from blocks import (ACNet, ACNetCropped, BNLinear, DBBHalves, DBBConcat, DBBSlices, FastViTBlock, FunctionalRepMixer,
                    FunctionalRepVGG, LeViTMLP, LinearBN, MethodStyleBlock, RepMixer, RepVGG, RepVGGDW,
                    RepViTBlock, SeparablePairMixer, CSPBlock, assert_unchanged, conv_bn, randomize, rel_dev, snapshot)

REL_TOL = 1e-5  # float32; a folding error (border, bias, channel) shows at 1e-2 and above

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_BN_FUNCTIONS = {F.batch_norm, torch.batch_norm}


# ----------------------------------------------------------------------------- helpers

def op_counts(module: nn.Module) -> Counter:
    """conv / batchnorm / linear ops ``module`` runs (modules and functions): for the default
    result of :func:`compile_exact` (the user's model with modules swapped in), counted as it
    runs on its example; for a graph, in every fx graph of it."""
    if module in EXAMPLES:
        counts = ops_run(module, *EXAMPLES[module])
        return Counter({k: counts[k] for k in ("conv", "bn", "linear") if counts[k]})
    counts = Counter()
    graphs = [m for m in module.modules() if isinstance(m, fx.GraphModule)]
    assert graphs, "repc.compile returned no fx graph"
    for gm in graphs:
        mods = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op == "call_module":
                mod = mods[node.target]
                if isinstance(mod, _CONV_MODULES):
                    counts["conv"] += 1
                elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    counts["bn"] += 1
                elif isinstance(mod, nn.Linear):
                    counts["linear"] += 1
            elif node.op == "call_function":
                if node.target in _CONV_FUNCTIONS:
                    counts["conv"] += 1
                elif node.target in _BN_FUNCTIONS:
                    counts["bn"] += 1
                elif node.target is F.linear:
                    counts["linear"] += 1
    return counts


def fused_convs(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, _CONV_MODULES)]


def variants(shape):
    """The example shape, another batch size, and (for N-d activations) other spatial sizes."""
    out = [tuple(shape), (shape[0] + 1,) + tuple(shape[1:]), (1,) + tuple(shape[1:])]
    if len(shape) >= 3:
        out.append(tuple(shape[:2]) + tuple(s + 3 for s in shape[2:]))
        out.append(tuple(shape[:2]) + tuple(s + 1 for s in shape[2:]))
    return out


def compile_exact(model: nn.Module, shapes, *, dtype=torch.float32, tol=REL_TOL, spatial=True):
    """Compile on random inputs of ``shapes`` (one shape or a list, one per input) and check it.

    The fused model must be returned (not rolled back), pass its own verification, leave the
    input model untouched, and match the original on every input variant.
    """
    shapes = [shapes] if isinstance(shapes[0], int) else list(shapes)
    gen = torch.Generator().manual_seed(1)
    example = tuple(torch.randn(s, generator=gen, dtype=dtype) for s in shapes)
    before = snapshot(model)
    fused = repc.compile(model, example)  # the default: the model's own class, modules swapped in
    EXAMPLES[fused] = example
    assert_unchanged(model, before)
    report = fused.repc_report
    assert not report.rolled_back, str(report)
    assert report.verification.ok, str(report)
    per_input = [variants(s) if spatial else variants(s)[:3] for s in shapes]
    with torch.no_grad():
        for i in range(len(per_input[0])):
            inputs = [torch.randn(v[i], generator=gen, dtype=dtype) for v in per_input]
            dev = rel_dev(fused(*inputs), model(*inputs))
            assert dev <= tol, f"deviation {dev:.3g} on shapes {[v[i] for v in per_input]}"
        assert rel_dev(fused(*example), model(*example)) <= tol
    return fused


def replaced_modules(report) -> str:
    return " ".join(name for r in report.rewrites for name in r.replaced)


# ----------------------------------------------------------------------------- one conv per block

BLOCKS = {
    # RepVGG
    "repvgg": (lambda: RepVGG(4, 4), (2, 4, 8, 8)),
    "repvgg_cin_ne_cout": (lambda: RepVGG(4, 6), (2, 4, 8, 8)),
    "repvgg_stride2": (lambda: RepVGG(4, 8, stride=2), (2, 4, 9, 9)),
    "repvgg_grouped": (lambda: RepVGG(8, 8, groups=2), (2, 8, 8, 8)),
    "repvgg_grouped_stride2": (lambda: RepVGG(8, 12, stride=2, groups=4), (2, 8, 8, 8)),
    "repvgg_depthwise": (lambda: RepVGG(6, 6, groups=6), (2, 6, 7, 7)),
    "repvgg_depthwise_multiplier": (lambda: RepVGG(4, 8, groups=4), (2, 4, 7, 7)),
    "repvgg_dilated": (lambda: RepVGG(4, 4, dilation=2), (2, 4, 10, 10)),
    "repvgg_conv_bias": (lambda: RepVGG(4, 4, bias=True), (2, 4, 8, 8)),
    "repvgg_5x5": (lambda: RepVGG(4, 4, k=5), (2, 4, 8, 8)),
    "repvgg_examples_grouped": (lambda: RepVGGBlock(4, 4, groups=2), (2, 4, 8, 8)),
    "repvgg_conv1d": (lambda: RepVGG(4, 4, nd=1), (2, 4, 11)),
    "repvgg_conv1d_dilated_stride2": (lambda: RepVGG(4, 6, k=5, nd=1, dilation=3, stride=2), (2, 4, 20)),
    "repvgg_conv3d": (lambda: RepVGG(3, 3, nd=3), (2, 3, 5, 5, 5)),
    # ACNet
    "acnet": (lambda: ACNet(4, 6), (2, 4, 8, 8)),
    "acnet_stride2_grouped": (lambda: ACNet(4, 8, stride=2, groups=2), (2, 4, 9, 9)),
    "acnet_5x5_dilated": (lambda: ACNet(4, 4, k=5, dilation=2), (2, 4, 12, 12)),
    "acnet_conv_bias": (lambda: ACNet(4, 4, bias=True), (2, 4, 8, 8)),
    "acnet_cropped_valid": (lambda: ACNetCropped(4, 6), (2, 4, 8, 8)),
    "acnet_cropped_5x5_stride2": (lambda: ACNetCropped(4, 4, k=5, stride=2, padding=1), (2, 4, 11, 11)),
    # DBB, branchy and depth-concat forms
    "dbb": (lambda: DiverseBranchBlock(4, 4), (2, 4, 8, 8)),
    "dbb_5x5_stride2": (lambda: DiverseBranchBlock(4, 6, k=5, stride=2), (2, 4, 11, 11)),
    "dbb_concat": (lambda: DBBConcat(4, 6), (2, 4, 8, 8)),
    "dbb_concat_stride2": (lambda: DBBConcat(4, 6, stride=2), (2, 4, 9, 9)),
    "dbb_slices_of_cat": (lambda: DBBSlices(4), (2, 4, 8, 8)),
    "dbb_chunks_of_cat": (lambda: DBBHalves(4, "chunk"), (2, 4, 8, 8)),
    "dbb_split_of_cat": (lambda: DBBHalves(4, "split"), (2, 4, 8, 8)),
    "dbb_narrow_of_cat": (lambda: DBBHalves(4, "narrow"), (2, 4, 8, 8)),
    # MobileOne
    "mobileone_dense": (lambda: MobileOneBlock(4, 4, branches=3), (2, 4, 8, 8)),
    "mobileone_depthwise": (lambda: MobileOneBlock(6, 6, groups=6, branches=4), (2, 6, 8, 8)),
    "mobileone_depthwise_stride2": (lambda: MobileOneBlock(6, 6, stride=2, groups=6, branches=2), (2, 6, 9, 9)),
    "mobileone_pointwise": (lambda: MobileOneBlock(4, 8, kernel=1, branches=4), (2, 4, 8, 8)),
    # FastViT / RepViT
    "repmixer": (lambda: RepMixer(4), (2, 4, 8, 8)),
    "repmixer_dwconv_bn_only": (lambda: RepMixer(6, k=5, rich=False), (2, 6, 8, 8)),
    "repvggdw": (lambda: RepVGGDW(6), (2, 6, 8, 8)),
    # RepNeXt: separable 1xk -> kx1 pairs beside square and dilated kernels
    "separable_pair_mixer": (lambda: SeparablePairMixer(6), (2, 6, 8, 8)),
    "separable_pair_mixer_5x5": (lambda: SeparablePairMixer(6, k=5), (2, 6, 9, 9)),
    "separable_pair_mixer_stride2": (lambda: SeparablePairMixer(6, stride=2), (2, 6, 9, 9)),
    # functional / method / operator / in-place styles
    "functional_repvgg": (lambda: FunctionalRepVGG(4), (2, 4, 8, 8)),
    "functional_repvgg_no_bias": (lambda: FunctionalRepVGG(4, bias=False), (2, 4, 8, 8)),
    "functional_repmixer": (lambda: FunctionalRepMixer(4), (2, 4, 8, 8)),
    "methods_and_inplace": (lambda: MethodStyleBlock(4), (2, 4, 8, 8)),
}

DEPTHWISE = {"repmixer", "repmixer_dwconv_bn_only", "repvggdw", "functional_repmixer", "repvgg_depthwise",
             "separable_pair_mixer", "separable_pair_mixer_5x5", "separable_pair_mixer_stride2",
             "mobileone_depthwise", "mobileone_depthwise_stride2"}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_becomes_one_conv(name):
    factory, shape = BLOCKS[name]
    torch.manual_seed(0)
    model = randomize(factory())
    fused = compile_exact(model, shape)
    counts = op_counts(fused)
    assert counts["conv"] == 1, (counts, str(fused.repc_report))
    assert counts["bn"] == 0, counts
    (conv,) = fused_convs(fused)
    if name in DEPTHWISE:
        assert conv.groups == conv.in_channels == conv.out_channels, conv
    report = fused.repc_report
    assert report.rewrites, str(report)
    assert all(r.exact and r.max_deviation <= REL_TOL for r in report.rewrites)
    assert report.params_after < report.params_before
    # the fused module keeps no tensor its graph does not read
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in (conv.weight, conv.bias) if p is not None)


def test_report_names_the_replaced_modules():
    model = randomize(RepVGG(4, 4))
    fused = compile_exact(model, (2, 4, 8, 8))
    (rewrite,) = fused.repc_report.rewrites
    replaced = " ".join(rewrite.replaced)
    for path in ("dense.0", "dense.1", "pointwise.0", "pointwise.1", "identity"):
        assert path in replaced, replaced
    assert rewrite.rule and "sum" in rewrite.rule and "compose" in rewrite.rule
    assert rewrite.params_before == sum(p.numel() for n, p in model.named_parameters() if "act" not in n)
    assert rewrite.params_after == 4 * 4 * 9 + 4
    assert rewrite.flops_after < rewrite.flops_before


def test_fused_kernel_is_the_papers_closed_form():
    """RepVGG's merged 3x3 kernel: W3*s3 + pad(W1*s1) + identity*s_id, bias the BN shifts."""
    model = randomize(RepVGG(3, 3))
    fused = compile_exact(model, (1, 3, 6, 6))
    (conv,) = fused_convs(fused)

    def fold(seq):
        conv_, bn = seq
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return conv_.weight * s.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * s

    w3, b3 = fold(model.dense)
    w1, b1 = fold(model.pointwise)
    bn = model.identity
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    wid = torch.zeros(3, 3, 3, 3)
    wid[range(3), range(3), 1, 1] = s
    want_w = w3 + F.pad(w1, (1, 1, 1, 1)) + wid
    want_b = b3 + b1 + bn.bias - bn.running_mean * s
    assert torch.allclose(conv.weight, want_w, atol=1e-6)
    assert torch.allclose(conv.bias, want_b, atol=1e-6)
    assert conv.padding == (1, 1) and conv.stride == (1, 1)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_bn_and_bn_linear_become_one_linear(bias):
    for factory in (lambda: LinearBN(6, 5, bias=bias), lambda: BNLinear(6, 5, bias=bias)):
        model = randomize(factory())
        fused = compile_exact(model, (4, 6))
        counts = op_counts(fused)
        assert counts["linear"] == 1 and counts["bn"] == 0, counts


def test_conv_then_bn_and_bn_then_unpadded_conv_fold():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn0 = nn.BatchNorm2d(4)
            self.conv1 = nn.Conv2d(4, 6, 3, padding=0, bias=False)  # unpadded: BN before it is exact
            self.bn1 = nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn1(self.conv1(self.bn0(x)))

    fused = compile_exact(randomize(Chain()), (2, 4, 8, 8))
    counts = op_counts(fused)
    assert counts == Counter(conv=1), counts


def test_bn_without_running_stats_or_affine():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.b = nn.Conv2d(4, 4, 1)
            self.bn_plain = nn.BatchNorm2d(4, affine=False)  # foldable: running stats, no affine
            self.bn_batch = nn.BatchNorm2d(4, track_running_stats=False)  # batch statistics even in eval

        def forward(self, x):
            return self.a(x) + self.bn_plain(self.b(x)) + self.bn_batch(x)

    model = randomize(Block())
    fused = compile_exact(model, (3, 4, 8, 8))
    counts = op_counts(fused)
    assert counts["conv"] == 1 and counts["bn"] == 1, counts  # the batch-statistics BN stays
    assert any(isinstance(m, nn.BatchNorm2d) and not m.track_running_stats for m in fused.modules())


def test_float64_model_is_fused_exactly():
    model = randomize(nn.Sequential(RepVGG(3, 8, stride=2), ACNet(8, 8), RepVGG(8, 8, groups=2))).double()
    fused = compile_exact(model, (2, 3, 12, 12), dtype=torch.float64, tol=1e-12)
    assert op_counts(fused)["conv"] == 3
    assert all(c.weight.dtype == torch.float64 for c in fused_convs(fused))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_half_precision_is_merged_in_float64(dtype, graph):
    """The fused half-precision model is no less accurate than the original (merged in float64)."""
    model = randomize(nn.Sequential(RepVGG(8, 8), ACNet(8, 8), RepVGG(8, 8, groups=2))).to(dtype)
    reference = copy.deepcopy(model).double()  # the same rounded parameters, computed exactly
    x = torch.randn(4, 8, 12, 12)
    fused = repc.compile(model, x.to(dtype), graph=graph)
    EXAMPLES[fused] = (x.to(dtype),)  # (op_counts runs the default output on it)
    assert not fused.repc_report.rolled_back and op_counts(fused)["conv"] == 3
    assert all(c.weight.dtype == dtype for c in fused_convs(fused))
    with torch.no_grad():
        want = reference(x.double())
        err_fused = rel_dev(fused(x.to(dtype)), want)
        err_original = rel_dev(model(x.to(dtype)), want)
    assert err_fused <= 1.5 * err_original + 1e-3, (err_fused, err_original)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.nn.utils.weight_norm is deprecated
@pytest.mark.parametrize("reparam", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_weight_parametrizations_fold(reparam):
    wrap = {"weight_norm": nn.utils.parametrizations.weight_norm,
            "spectral_norm": nn.utils.parametrizations.spectral_norm,
            "old_weight_norm": nn.utils.weight_norm}[reparam]
    model = RepVGG(4, 4)
    model.dense[0] = wrap(model.dense[0])
    model.pointwise[0] = wrap(model.pointwise[0])
    fused = compile_exact(randomize(model), (2, 4, 8, 8))
    assert op_counts(fused) == Counter(conv=1)


# ----------------------------------------------------------------------------- stages

def test_repvgg_stage():
    model = randomize(nn.Sequential(RepVGG(3, 8, stride=2), RepVGG(8, 8), RepVGG(8, 8, groups=2),
                                    RepVGG(8, 16, stride=2), RepVGG(16, 16, groups=16)))
    fused = compile_exact(model, (2, 3, 16, 16))
    assert op_counts(fused) == Counter(conv=5)
    assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == 5
    assert len(fused.repc_report.rewrites) == 5


def test_mobileone_stage():
    model = randomize(nn.Sequential(MobileOneUnit(4, 8, stride=2, branches=3), MobileOneUnit(8, 8, branches=2)))
    fused = compile_exact(model, (2, 4, 10, 10))
    assert op_counts(fused) == Counter(conv=4)
    convs = fused_convs(fused)
    assert [c.groups for c in convs] == [4, 1, 8, 1]  # depthwise then pointwise, twice
    assert [c.kernel_size for c in convs] == [(3, 3), (1, 1), (3, 3), (1, 1)]


def test_repvit_stage():
    model = randomize(nn.Sequential(RepViTBlock(4, 8), RepViTBlock(4, 8)))
    fused = compile_exact(model, (2, 4, 8, 8))
    counts = op_counts(fused)
    # per block: one depthwise token mixer, two pointwise convs around the GELU
    assert counts == Counter(conv=6), counts
    assert sum(isinstance(m, nn.GELU) for m in fused.modules()) == 2


def test_fastvit_stage():
    model = randomize(nn.Sequential(FastViTBlock(4, 8), FastViTBlock(4, 8)))
    fused = compile_exact(model, (2, 4, 8, 8))
    counts = op_counts(fused)
    # per block: the RepMixer as one depthwise conv; the FFN's dw 7x7 conv-BN folded into one conv
    # (merging it with the expanding 1x1 would cost more) and its two 1x1 convs
    assert counts == Counter(conv=8), counts


def test_levit_stage():
    model = randomize(nn.Sequential(LinearBN(6, 8), nn.Hardswish(), LeViTMLP(8, 16), LeViTMLP(8, 16)))
    fused = compile_exact(model, (5, 6), spatial=False)
    counts = op_counts(fused)
    assert counts["bn"] == 0 and counts["linear"] <= 5, counts


def test_levit_classifier_head():
    model = randomize(nn.Sequential(LeViTMLP(8, 16), BNLinear(8, 3)))
    fused = compile_exact(model, (5, 8), spatial=False)
    assert op_counts(fused)["bn"] == 0


def test_example_network():
    model = example_net()
    fused = compile_exact(model, (2, 3, 16, 16))
    counts = op_counts(fused)
    # stem + 2 RepVGG + DBB + MobileOne depthwise + pointwise; the head's linear-BN-dropout-linear as one
    assert counts == Counter(conv=6, linear=1), counts


# ----------------------------------------------------------------------------- sums of odd branches

def test_sum_that_would_cost_more_is_kept_by_the_cost_model():
    """1x5 + 3x1 branches would merge into a dense 3x5 kernel: 15 taps instead of 8."""
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.hor = conv_bn(4, 4, (1, 5), 1, (0, 2))
            self.ver = conv_bn(4, 4, (3, 1), 1, (1, 0))

        def forward(self, x):
            return self.hor(x) + self.ver(x)

    fused = compile_exact(randomize(Cross()), (2, 4, 8, 8))
    assert "does not pay" in _reasons(fused)
    assert sorted(c.kernel_size for c in fused_convs(fused)) == [(1, 5), (3, 1)]
    assert op_counts(fused)["bn"] == 0  # each branch still folds its BN


def test_cross_with_square_kernel_pays():
    """ACNet's cross added to a 5x5 square: the cross lands on the square's middle row/column."""
    model = randomize(ACNet(4, 4, k=5))
    fused = compile_exact(model, (2, 4, 8, 8))
    (conv,) = fused_convs(fused)
    assert conv.kernel_size == (5, 5)
    fold = lambda seq: seq[0].weight * (seq[1].weight / torch.sqrt(seq[1].running_var + seq[1].eps)).reshape(-1, 1, 1, 1)
    want = fold(model.square).clone()
    want[:, :, 2:3, :] += fold(model.hor)
    want[:, :, :, 2:3] += fold(model.ver)
    assert torch.allclose(conv.weight, want, atol=1e-6)


def test_branches_with_different_groups():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(8, 8, 3, 1, 1, groups=2)
            self.b = conv_bn(8, 8, 3, 1, 1, groups=4)
            self.c = conv_bn(8, 8, 1, groups=8)
            self.d = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.a(x) + self.b(x) + self.c(x) + self.d(x)

    fused = compile_exact(randomize(Mixed()), (2, 8, 6, 6))
    (conv,) = fused_convs(fused)
    assert conv.groups == 2


@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_mode_branch_with_unpadded_pointwise(mode):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)
            self.bn = nn.BatchNorm2d(4)
            self.b = conv_bn(4, 4, 1)

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    (conv,) = fused_convs(fused)
    assert conv.padding_mode == mode


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_with_even_kernels():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 4, padding="same")
            self.b = nn.Conv2d(4, 4, 2, padding="same", bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x) + self.b(x))

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert op_counts(fused)["conv"] == 1


def test_explicit_pad_then_conv_branch():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, (2, 3))
            self.b = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(F.pad(x, (1, 1, 0, 1)))) + self.b(x)

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert op_counts(fused)["conv"] == 1


def test_avg_pool_branch_counting_pad():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.pool = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.a(x) + self.pool(x)

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert op_counts(fused) == Counter(conv=1)


def test_scales_dropout_identity_and_constants():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.b = conv_bn(4, 4, 1)
            self.gamma = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
            self.register_buffer("shift", torch.randn(1, 4, 1, 1))
            self.drop = nn.Dropout(0.3)
            self.id = nn.Identity()

        def forward(self, x):
            y = torch.sub(self.a(x) * self.gamma, self.b(x), alpha=0.5) / 3 + self.shift
            return self.drop(self.id(-y + 1.5 * x))

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert op_counts(fused) == Counter(conv=1)


# ----------------------------------------------------------------------------- shared modules

class SharedConvTwoInputs(nn.Module):
    """One conv called on two inputs, each result with its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x, y):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(y))


def test_shared_conv_on_two_inputs_stays_correct():
    model = randomize(SharedConvTwoInputs())
    fused = compile_exact(model, [(2, 4, 8, 8), (2, 4, 8, 8)])
    assert op_counts(fused)["bn"] == 0
    assert model.conv.weight is not None and not any(m is model.conv for m in fused.modules())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.fx.experimental.optimization imports torch.jit
def test_torch_fx_fuse_miscompiles_shared_conv_where_repc_does_not():
    """Contrast: torch's fuse folds both BNs into the one shared conv, in place."""
    from torch.fx.experimental.optimization import fuse

    model = randomize(SharedConvTwoInputs())
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        want = model(x, y)
        assert rel_dev(fuse(model)(x, y), want) > 0.05
        assert rel_dev(repc.compile(model, (x, y))(x, y), want) <= REL_TOL


def test_shared_conv_read_on_two_paths():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            c = self.conv(x)
            return self.bn1(c) + torch.relu(self.bn2(c)), c

    model = randomize(TwoPaths())
    fused = compile_exact(model, (2, 4, 8, 8))
    assert op_counts(fused)["conv"] <= 2


def test_shared_conv_called_twice_on_one_input_is_one_conv():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x))

    fused = compile_exact(randomize(Twice()), (2, 4, 8, 8))
    assert op_counts(fused) == Counter(conv=1)


def test_shared_block_applied_in_sequence_and_in_parallel():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = RepVGG(4, 4)

        def forward(self, x, y):
            return self.block(self.block(x)), self.block(y)

    model = randomize(Reuse())
    fused = compile_exact(model, [(2, 4, 8, 8), (2, 4, 8, 8)])
    assert op_counts(fused) == Counter(conv=3)


# ----------------------------------------------------------------------------- must not merge

def _reasons(fused) -> str:
    return " | ".join(r.reason for r in fused.repc_report.rejected)


def test_bn_before_zero_padded_conv_is_not_folded():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 6, 3, padding=1)

        def forward(self, x):
            return self.conv(self.bn(x))

    model = randomize(Block())
    fused = compile_exact(model, (2, 4, 8, 8))
    assert "border" in _reasons(fused)
    (conv,) = fused_convs(fused)
    assert torch.equal(conv.weight, model.conv.weight)  # the BN was not folded into it


def test_bn_before_padded_conv_in_branches_only_sums_the_exact_part():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.b = conv_bn(4, 4, 1)

        def forward(self, x):
            return self.a(self.bn(x)) + self.b(x)

    model = randomize(Block())
    fused = compile_exact(model, (2, 4, 8, 8))
    assert "border" in _reasons(fused)
    assert op_counts(fused)["conv"] == 2


def test_nonlinearity_between_branches_is_not_merged():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.b = conv_bn(4, 4, 1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.a(x) + self.act(self.b(x))

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    counts = op_counts(fused)
    assert counts == Counter(conv=2), counts  # each conv-BN folded, the sum is not
    assert sum(isinstance(m, nn.ReLU) for m in fused.modules()) == 1
    assert "ReLU" in _reasons(fused)


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_mismatched_strides_are_not_merged(graph):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 5, 1, 0)  # 8x8 -> 4x4 at stride 1
            self.b = conv_bn(4, 4, 1, 2, 0)  # 8x8 -> 4x4 at stride 2

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = randomize(Block())
    x = torch.randn(2, 4, 8, 8)
    fused = repc.compile(model, x, graph=graph)
    EXAMPLES[fused] = (x,)
    assert "strides differ" in _reasons(fused)
    assert op_counts(fused) == Counter(conv=2)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 4, 8, 8)
            assert rel_dev(fused(x), model(x)) <= REL_TOL


def test_avg_pool_excluding_padding_is_not_a_conv():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.b = nn.Conv2d(4, 4, 1, bias=False)
            self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.a(x) + self.bn(self.pool(self.b(x)))

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert sum(isinstance(m, nn.AvgPool2d) for m in fused.modules()) == 1
    assert op_counts(fused)["conv"] == 2
    assert "count_include_pad=False" in _reasons(fused)


def test_concat_on_a_spatial_axis_is_not_merged():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.b = conv_bn(4, 4, 1)
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 2))

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert "axis 2" in _reasons(fused)
    assert op_counts(fused)["conv"] == 3


def test_spatial_slice_blocks_the_merge():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(x)[:, :, 1:])  # a crop (negative padding) before a padded conv

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert op_counts(fused)["conv"] == 2
    assert "a crop before a padded conv" in _reasons(fused)


def test_training_mode_is_refused():
    model = randomize(RepVGG(4, 4)).train()
    with pytest.raises(repc.ReparamError, match=r"eval\(\)"):
        repc.compile(model, torch.randn(2, 4, 8, 8), graph=True)  # (refused before any output: either form)
    assert model.training


# ----------------------------------------------------------------------------- in-place ops

def test_inplace_add_after_an_earlier_reader():
    """``out += x`` mutates ``out``; a BN that read ``out`` before must see the old value."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            out = self.a(x)
            before = self.bn(out)
            out += x
            return out, before

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    # the conv-BN folds; the second BN reads a value with two readers and stays (folding it
    # would duplicate the conv)
    assert op_counts(fused) == Counter(conv=1, bn=1)


def test_inplace_relu_on_a_value_read_by_other_branches():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv_bn(4, 4, 3, 1, 1)
            self.b = conv_bn(4, 4, 1)
            self.act = nn.ReLU(inplace=True)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.a(x) + self.b(x)
            z = self.bn(y)  # reads y before the in-place ReLU
            w = self.act(y)  # y is now relu(y)
            return z + w + y

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert op_counts(fused)["conv"] == 1


@pytest.mark.parametrize("relu_", [F.relu_, torch.relu_], ids=["F.relu_", "torch.relu_"])
def test_inplace_relu_functions_are_made_out_of_place_like_the_module(relu_):
    class Block(nn.Module):  # torchvision / detectron2 style: F.relu_(bn(conv(x))), then read again
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(4, 4, 3, 1, 1), conv_bn(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            z = relu_(y)
            return self.b(z) + y  # y is relu(y) now

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert op_counts(fused)["conv"] == 2 and "bn" not in op_counts(fused), op_counts(fused)
    assert not fused.repc_report.rolled_back and not [r for r in fused.repc_report.rejected
                                                      if r.reason.startswith("rolled back")]


def test_inplace_op_through_a_view_is_honoured():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.other = RepVGG(4, 4)

        def forward(self, x):
            a = self.conv(x)
            a[:, :2].mul_(2)  # mutates a through a view
            return self.bn(a) + self.other(x)

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert fused.repc_report.rewrites  # the rest of the model still fuses
    assert not fused.repc_report.rolled_back


@pytest.mark.parametrize("alias", ["identity", "dropout", "float"])
def test_inplace_op_on_an_op_that_returns_its_input(alias):
    """nn.Identity, eval-mode Dropout and ``.float()`` return their input itself: mutating the
    result mutates the original too."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.id = nn.Identity()
            self.drop = nn.Dropout(0.2)
            self.other = RepVGG(4, 4)

        def forward(self, x):
            y = self.conv(x)
            z = {"identity": self.id, "dropout": self.drop, "float": lambda t: t.float()}[alias](y)
            z.mul_(2)
            return self.bn(y) + self.other(x)

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert fused.repc_report.rewrites


def test_augmented_assignment_on_an_aliased_tensor():
    """``skip = out; out += r``: eager mutates ``skip`` too, which fx's trace does not record; the
    model must still come out exact, with its traceable parts fused."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_bn(4, 4, 3, 1, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            out = self.conv(x)
            skip = out
            out += self.bn(x)
            return out + skip

    fused = compile_exact(randomize(Block()), (2, 4, 8, 8))
    assert fused.repc_report.rewrites


class ConcatThenBN(nn.Module):
    """Inception/DBB-style depth concatenation of conv branches, then one BatchNorm."""

    def __init__(self, two_inputs: bool):
        super().__init__()
        self.two_inputs = two_inputs
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, y):
        return torch.relu(self.bn(torch.cat([self.a(x), self.b(y if self.two_inputs else x)], 1)))


@pytest.mark.parametrize("two_inputs", [False, True])
def test_bn_after_a_concat_folds_into_each_branch(two_inputs):
    model = randomize(ConcatThenBN(two_inputs)).eval()
    fused = compile_exact(model, [(2, 4, 8, 8), (2, 4, 8, 8)])
    counts = op_counts(fused)
    assert counts["bn"] == 0 and counts["conv"] == 2, counts
    exported = export_graph(fused, EXAMPLES[fused], {}).gm
    assert not any(n.target in (operator.mul, torch.mul) for n in exported.graph.nodes), exported.code  # no BN left as a scale


class BNAndPad(nn.Module):
    """DBB's own BN-and-pad layer: BN, zero padding, then the border filled in place with the
    BN's output for a zero input (item assignment, which plain fx tracing rejects)."""

    def __init__(self, pad: int, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x):
        out = F.pad(self.bn(x), [self.pad] * 4)
        bn = self.bn
        values = (bn.bias.detach() - bn.running_mean * bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps))
        values = values.view(1, -1, 1, 1)
        p = self.pad
        out[:, :, 0:p, :] = values
        out[:, :, -p:, :] = values
        out[:, :, :, 0:p] = values
        out[:, :, :, -p:] = values
        return out


class DBBOriginalForm(nn.Module):
    def __init__(self, c=4, k=3):
        super().__init__()
        self.origin = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.seq = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), BNAndPad(k // 2, c),
                                 nn.Conv2d(c, c, k, bias=False), nn.BatchNorm2d(c))
        self.avg = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), BNAndPad(k // 2, c), nn.AvgPool2d(k, 1, 0),
                                 nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.origin(x) + self.one(x) + self.seq(x) + self.avg(x))


def test_dbb_with_its_in_place_border_fill_becomes_one_conv():
    model = randomize(DBBOriginalForm()).eval()
    fused = compile_exact(model, (2, 4, 8, 8))
    counts = op_counts(fused)
    assert counts["conv"] == 1 and counts["bn"] == 0, counts
    exported = export_graph(fused, EXAMPLES[fused], {}).gm
    assert not any(n.target in (operator.setitem, "fill_", "copy_") for n in exported.graph.nodes), exported.code


class AssignAfterRead(nn.Module):
    """An item assignment into a value another op already read: that op must run first."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.c(x)
        z = self.c2(y)
        y[:, 0] = 0
        return self.bn(y) + z


def test_item_assignment_keeps_earlier_readers_in_place():
    model = randomize(AssignAfterRead()).eval()
    x = torch.randn(2, 4, 6, 6)
    fused = repc.compile(model, x, verify=False)
    with torch.no_grad():
        assert rel_dev(fused(x), model(x)) <= REL_TOL
    whole = repc.compile(model, x, verify=False, graph=True)  # (the graph's nodes: the assignment kept)
    with torch.no_grad():
        assert rel_dev(whole(x), model(x)) <= REL_TOL
    assert any(n.target is operator.setitem for n in whole.graph.nodes)


# ----------------------------------------------------------------------------- a region's last step alone

def test_separable_conv_keeps_two_convs_and_folds_its_batch_norm_into_the_pointwise_one():
    """Xception / MobileNet: depthwise 3x3 then pointwise 1x1 then BN.  Merging all three would
    make one dense 3x3 conv (9x the multiply-adds); the BN still folds into the pointwise conv."""
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
                          nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
    fused = compile_exact(randomize(model), (2, 16, 12, 12))
    counts = op_counts(fused)
    assert counts["conv"] == 2 and "bn" not in counts, counts
    report = fused.repc_report
    assert any(r.reason.startswith("does not pay") for r in report.rejected), str(report)
    assert len(report.rewrites) == 1 and report.rewrites[0].flops_after <= report.rewrites[0].flops_before


def test_inverted_residual_blocks_fold_every_batch_norm():
    """MobileNetV2: expand 1x1-BN-ReLU6, depthwise 3x3-BN-ReLU6, project 1x1-BN (linear
    bottleneck), then the next block's expansion: project and expand would merge into a wider
    conv that does not pay, so each BN goes into its own conv."""
    def block(cin, cout, t=4):
        hidden = cin * t
        return nn.Sequential(conv_bn(cin, hidden, 1), nn.ReLU6(), conv_bn(hidden, hidden, 3, 1, 1, groups=hidden),
                             nn.ReLU6(), conv_bn(hidden, cout, 1))

    model = nn.Sequential(block(8, 4), block(4, 8))
    fused = compile_exact(randomize(model), (2, 8, 10, 10))
    counts = op_counts(fused)
    assert counts["conv"] == 6 and "bn" not in counts, counts


def test_batch_norm_after_a_conv_over_a_concatenation_folds_into_that_conv():
    """ASPP / YOLO SPPF: a 1x1 conv over concatenated branches, then BN.  Splitting the conv
    over the branches does not pay; folding the BN into it does."""
    class Project(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU())
            self.proj, self.bn = nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8)

        def forward(self, x):
            pooled = x.mean((2, 3), keepdim=True).expand_as(x)
            return torch.relu(self.bn(self.proj(torch.cat([self.a(x), self.b(x), pooled], 1))))

    fused = compile_exact(randomize(Project()), (2, 8, 12, 12))
    counts = op_counts(fused)
    assert counts["conv"] == 3 and "bn" not in counts, counts


def test_conv_bn_before_a_channel_shuffle_folds_and_the_shuffle_is_understood():
    """ShuffleNetV2: view -> transpose -> contiguous -> view, with the sizes read from the value."""
    def channel_shuffle(x, groups):
        b, c, h, w = x.size()
        x = x.view(b, groups, c // groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, -1, h, w)

    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(8, 8, 1), nn.Conv2d(8, 8, 1, bias=False)

        def forward(self, x):
            return self.b(channel_shuffle(self.a(x), 2))

    fused = compile_exact(randomize(Shuffle()), (2, 8, 6, 6))
    assert "bn" not in op_counts(fused), op_counts(fused)
    assert not any("not understood" in r.reason for r in fused.repc_report.rejected), str(fused.repc_report)


def test_a_pooling_window_read_from_the_input_size_is_reported_plainly():
    class SEBlock(nn.Module):  # RepVGG's SE block: the window is the map's own size
        def __init__(self):
            super().__init__()
            self.body = conv_bn(8, 8, 3, 1, 1)
            self.down, self.up = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)

        def forward(self, x):
            x = self.body(x)
            s = F.avg_pool2d(x, kernel_size=x.size(3))
            return x * torch.sigmoid(self.up(F.relu(self.down(s))))

    fused = compile_exact(randomize(SEBlock()), (2, 8, 6, 6))
    reasons = [r.reason for r in fused.repc_report.rejected]
    assert any("pooling window computed from the input's size" in r for r in reasons), reasons
    assert not any("not understood" in r for r in reasons), reasons


@pytest.mark.parametrize("name", list(BLOCKS))
def test_the_default_output_runs_the_ops_of_the_whole_model_graph(name):
    # the model's own class (its forward the fused graph where the branches sum there): no more
    # convs or BatchNorms than graph=True
    from blocks import ops_run
    factory, shape = BLOCKS[name]
    torch.manual_seed(0)
    model = randomize(factory())
    x = torch.randn(shape)
    fused, whole = repc.compile(model, (x,)), repc.compile(model, (x,), graph=True)
    assert type(fused) is type(model) and fused.repc_report.output == "module-preserving", fused.repc_report
    assert ops_run(fused, x) == ops_run(whole, x) == Counter(conv=1), fused.repc_report
    with torch.no_grad():
        y = torch.randn((shape[0] + 1,) + tuple(shape[1:]))
        assert rel_dev(fused(y), model(y)) <= REL_TOL


def test_a_conv_over_a_concatenation_of_values_computed_apart_stays_one_conv():
    # YOLO's CSP blocks: cv3(cat(a, b)) with a BN; splitting cv3 into a conv per part and their sum
    # does the same multiply-adds in one op more, so only the BN folds into it
    from blocks import ops_run
    torch.manual_seed(0)
    model = randomize(CSPBlock(8, 8))
    x = torch.randn(2, 8, 12, 12)
    fused = repc.compile(model, x)
    assert fused.repc_report.output == "module-preserving"
    assert ops_run(fused, x) == Counter(conv=5)  # each BN folded into its conv, no conv more
    for other in (x, torch.randn(3, 8, 9, 7)):
        with torch.no_grad():
            assert rel_dev(fused(other), model(other)) < REL_TOL
