"""`repc.compile` on the linear family of structural re-parameterization (issue 3).

LoRA, GLoRA-style parameter-only weights, parametrizations, ZeroI2V adapters, WID compactors,
linear chains, LayerNorm / BatchNorm folding on token layouts, RePaViT's channel-idle FFN and
depth-reduced residual stacks and RepMLP, written from the papers' descriptions in
:mod:`linear_blocks`: the fused model is exact on the example and on other batch sizes and
token counts, runs the promised number of ops, and does no more work than the original (less
where the method promises it).  Nonlinearities that are not identities stop merging, and a
bottleneck is not expanded.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.nn.utils.parametrizations import weight_norm

import repc
from repc.capture_export import export_graph
from repc.report import op_counts as op_counts_of_export
import linear_blocks as lb
from linear_blocks import compile_exact, called_modules, op_counts, randomize
from blocks import ops_run


def tokens(b=2, n=5, d=16, dtype=torch.float32):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(7), dtype=dtype)


def assert_flops_not_increased(report, strictly=True):
    assert report.rewrites, str(report)
    for r in report.rewrites:
        assert r.flops_after <= r.flops_before, r
        assert r.exact, r
    if strictly:
        assert report.flops_saved > 0, str(report)


def only_linear(fused) -> nn.Linear:
    counts = op_counts(fused)
    assert counts["linear"] == 1, (counts, str(fused.repc_report))
    (linear,) = called_modules(fused)
    assert type(linear) is nn.Linear, type(linear)
    return linear


# ----------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize("shape, bias, dtype", [
    ((2, 5, 16), True, torch.float32),
    ((2, 5, 16), False, torch.float32),
    ((7, 16), True, torch.float32),
    ((2, 5, 16), True, torch.float64),
])
def test_lora_becomes_one_linear_with_the_closed_form_weight(shape, bias, dtype):
    torch.manual_seed(0)
    model = lb.LoRALinear(16, 24, r=4, alpha=8.0, bias=bias).to(dtype).eval()
    fused = compile_exact(model, torch.randn(shape, dtype=dtype), tol=1e-12 if dtype == torch.float64 else lb.REL_TOL)
    linear = only_linear(fused)
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)  # dropout (eval), adds, scale gone
    want = model.base.weight.double() + model.scale * model.lora_B.weight.double() @ model.lora_A.weight.double()
    assert linear.weight.dtype == dtype
    assert torch.allclose(linear.weight.double(), want, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    if bias:
        assert torch.equal(linear.bias, model.base.bias)
    else:
        assert linear.bias is None or not linear.bias.any()
    report = fused.repc_report
    assert_flops_not_increased(report)
    assert report.params_after < report.params_before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_half_precision_lora_merge_is_no_less_accurate_than_the_original(dtype, graph):
    """Merged in float64 and cast once: the fused model is at least as close to the float64
    truth as the half-precision original (a merge done in half precision loses digits)."""
    torch.manual_seed(0)
    model = lb.LoRALinear(64, 64, r=8).eval()
    x = torch.randn(4, 10, 64)
    fused = repc.compile(model.to(dtype), (x.to(dtype),), graph=graph)
    lb.EXAMPLES[fused] = (x.to(dtype),)  # (op_counts runs the default output on it)
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    assert fused.repc_report.verification.ok
    (linear,) = called_modules(fused)
    assert linear.weight.dtype == dtype
    with torch.no_grad():
        truth = copy.deepcopy(model).double()(x.to(dtype).double())
        original = lb.rel_dev(model(x.to(dtype)), truth)
        merged = lb.rel_dev(fused(x.to(dtype)), truth)
    assert merged <= 1.5 * original, (merged, original)


def test_lora_adapter_is_not_trivial():
    """The merge checks above would pass vacuously with LoRA's zero initialisation of B."""
    model = lb.LoRALinear(16, 24).eval()
    x = tokens()
    assert (model(x) - model.base(x)).abs().max() > 0.1


def test_functional_lora_becomes_one_linear():
    torch.manual_seed(0)
    model = lb.FunctionalLoRA(16, 24, r=4, scale=0.75).eval()
    fused = compile_exact(model, tokens())
    linear = only_linear(fused)
    want = model.weight.double() + 0.75 * model.B.double() @ model.A.double()
    assert torch.allclose(linear.weight.double(), want, atol=1e-5)
    assert op_counts(fused)["matmul"] == 0
    assert_flops_not_increased(fused.repc_report)


def test_lora_on_a_conv_becomes_one_conv():
    """LoRA for convs: A a k x k conv to r channels, B a 1x1 conv back: one k x k conv."""
    class LoRAConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Conv2d(4, 6, 3, padding=1)
            self.A = nn.Conv2d(4, 2, 3, padding=1, bias=False)
            self.B = nn.Conv2d(2, 6, 1, bias=False)

        def forward(self, x):
            return self.base(x) + 0.5 * self.B(self.A(x))

    torch.manual_seed(0)
    fused = compile_exact(LoRAConv().eval(), torch.randn(2, 4, 8, 8))
    assert op_counts(fused) == {"conv": 1}, op_counts(fused)
    assert_flops_not_increased(fused.repc_report)


@pytest.mark.parametrize("explicit", [True, False], ids=["matmul_softmax", "sdpa"])
def test_lora_on_qkv_projections_merges_three_times_and_keeps_attention(explicit):
    torch.manual_seed(0)
    model = lb.LoRASelfAttention(16, r=4, explicit=explicit).eval()
    fused = compile_exact(model, tokens())
    counts = op_counts(fused)
    assert counts["linear"] == 3, counts  # q, k, v: base + LoRA each merged into one linear
    assert all(type(m) is nn.Linear for m in called_modules(fused))
    if explicit:
        assert counts["matmul"] == 2 and counts["softmax"] == 1, counts
        assert "mul" not in counts, counts  # the scale on the scores went into q's weights
    else:
        assert counts["scaled_dot_product_attention"] == 1, counts
    report = fused.repc_report
    assert len(report.rewrites) == 3, str(report)
    assert_flops_not_increased(report)


@pytest.mark.parametrize("divide", [False, True], ids=["times_scaling", "over_sqrt_head_dim"])
def test_attention_scale_after_the_product_folds_into_the_query_projection(divide):
    torch.manual_seed(0)
    model = lb.randomize(lb.ScaledProductAttention(16, heads=2, divide=divide)).eval()
    x = tokens(n=6)
    mask = torch.zeros(2, 1, 1, 6)
    mask[1, ..., -2:] = -1e4  # the second sequence is padded
    fused = compile_exact(model, (x, mask), fixed_size=True)
    counts = op_counts(fused)
    assert counts["linear"] == 4 and counts["softmax"] == 1 and counts["matmul"] == 2, counts
    assert "truediv" not in counts and "mul" not in counts, counts
    (rewrite,) = fused.repc_report.rewrites  # the query projection, with the scale in its weights
    with torch.no_grad():
        scaled = model.q_proj.weight * model.scaling
        assert any(torch.allclose(m.weight, scaled, atol=1e-6) for m in called_modules(fused))


def test_lora_on_qkv_of_multi_head_attention_merges_three_times_and_keeps_attention():
    """Heads split by reshape/transpose and re-assembled before the output projection."""
    torch.manual_seed(0)
    model = lb.LoRAMultiHeadAttention(16, heads=2, r=4).eval()
    fused = compile_exact(model, tokens())
    counts = op_counts(fused)
    assert counts["linear"] == 4, counts  # q, k, v (each base + LoRA merged) and the output projection
    assert all(type(m) is nn.Linear for m in called_modules(fused))
    assert counts["matmul"] == 2 and counts["softmax"] == 1, counts
    report = fused.repc_report
    assert len(report.rewrites) == 3, str(report)
    assert_flops_not_increased(report)


def test_two_lora_layers_around_a_relu_and_a_reused_lora_module():
    """A LoRA module called twice is merged at each call; the two calls that follow each other
    with no nonlinearity merge into one linear (``a(b(.))``); the user's modules are left alone
    (compile_exact checks the state dict)."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = lb.LoRALinear(16, 16)
            self.b = lb.LoRALinear(16, 16)

        def forward(self, x):
            return self.a(torch.relu(self.a(self.b(torch.relu(self.b(x))))))

    torch.manual_seed(0)
    fused = compile_exact(Twice().eval(), tokens())
    counts = op_counts(fused)
    assert counts["linear"] == 3 and counts["relu"] == 2, counts
    assert_flops_not_increased(fused.repc_report)


# ----------------------------------------------------------------------------- parameter-only weights

def test_glora_weight_and_bias_fold_into_the_following_batchnorm_as_one_linear():
    """``W + W*A + Bu@Bv`` and ``b + b*D + E`` are constants; with the BN after them, one linear."""
    torch.manual_seed(0)
    glora = lb.GLoRALinear(16, 24, r=3)
    model = randomize(nn.Sequential(glora, nn.BatchNorm1d(24)))
    fused = compile_exact(model, torch.randn(6, 16))
    linear = only_linear(fused)
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    bn = model[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = glora.weight + glora.weight * glora.A + glora.Bu @ glora.Bv
    bias = glora.bias + glora.bias * glora.D + glora.E
    assert torch.allclose(linear.weight, weight * scale[:, None], atol=1e-5)
    assert torch.allclose(linear.bias, (bias - bn.running_mean) * scale + bn.bias, atol=1e-5)


def test_glora_alone_is_exact():
    torch.manual_seed(0)
    compile_exact(lb.GLoRALinear(16, 24).eval(), tokens())
    compile_exact(lb.GLoRAConv(4, 6).eval(), torch.randn(2, 4, 8, 8))


def test_glora_conv_and_gated_kernels_fold_into_one_conv_with_the_batchnorm():
    torch.manual_seed(0)
    for block in (lb.GLoRAConv(4, 6), lb.GatedKernels(4, 6)):
        model = randomize(nn.Sequential(block, nn.BatchNorm2d(6)))
        fused = compile_exact(model, torch.randn(2, 4, 8, 8))
        assert op_counts(fused) == {"conv": 1}, (type(block).__name__, op_counts(fused))


@pytest.mark.parametrize("kind", ["low_rank_parametrization", "weight_norm"])
def test_parametrized_linear_folds_into_a_plain_linear_with_its_neighbour(kind):
    torch.manual_seed(0)
    fc = nn.Linear(12, 20)
    if kind == "weight_norm":
        fc = weight_norm(fc)
        with torch.no_grad():
            fc.parametrizations.weight.original0.mul_(torch.rand(20, 1) + 0.5)
    else:
        parametrize.register_parametrization(fc, "weight", lb.LowRankDelta(20, 12))
    model = randomize(nn.Sequential(fc, nn.BatchNorm1d(20)))
    fused = compile_exact(model, torch.randn(6, 12))
    only_linear(fused)
    assert not any(parametrize.is_parametrized(m) for m in fused.modules())
    assert parametrize.is_parametrized(model[0])  # the user's model keeps its parametrization


def test_parametrized_mlp_is_exact_and_the_user_parametrizations_survive():
    torch.manual_seed(0)
    model = lb.ParametrizedMLP().eval()
    compile_exact(model, tokens(d=12))
    assert parametrize.is_parametrized(model.fc1, "weight") and parametrize.is_parametrized(model.fc2, "weight")


# ----------------------------------------------------------------------------- adapters, compactors, chains

@pytest.mark.parametrize("before, after", [(True, True), (True, False), (False, True)])
def test_zeroi2v_linear_adapters_are_absorbed_into_the_frozen_linear(before, after):
    torch.manual_seed(0)
    model = lb.AdaptedLinear(16, 24, r=2, before=before, after=after).eval()
    fused = compile_exact(model, tokens())
    linear = only_linear(fused)
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    eye_in, eye_out = torch.eye(16, dtype=torch.float64), torch.eye(24, dtype=torch.float64)
    w_in = eye_in + model.adapter_in.up.weight.double() @ model.adapter_in.down.weight.double() if before else eye_in
    w_out = eye_out + model.adapter_out.up.weight.double() @ model.adapter_out.down.weight.double() if after else eye_out
    assert torch.allclose(linear.weight.double(), w_out @ model.fc.weight.double() @ w_in, atol=1e-5)
    assert_flops_not_increased(fused.repc_report)


@pytest.mark.parametrize("batch_first", [True, False])
def test_zeroi2v_adapters_around_multihead_attention_fold_into_its_projections(batch_first):
    """Adapters before and after ``nn.MultiheadAttention`` and before the MLP fold into the
    in-projection, the out-projection and fc1 (torch.export records the attention's parts; its
    batch-first transposes and token reshapes are moved out of the way): the default result
    runs 4 linears per block, as the paper's own reparameterization does, with no norm affine
    left, at every batch size and length."""
    d, depth = 32, 2
    model = randomize(nn.Sequential(*[lb.AdaptedAttentionBlock(d, batch_first=batch_first) for _ in range(depth)]))
    x = tokens(2, 7, d) if batch_first else tokens(7, 2, d)
    fused = compile_exact(model, x, graph=False)
    report = fused.repc_report
    assert report.front_end == "torch.export" and "MultiheadAttention" in report.front_ends_declined["fx"]
    assert type(fused) is nn.Sequential
    exported = export_graph(fused, (x,), {}).gm
    assert op_counts_of_export(exported) == (4 * depth, 2 * depth), str(report)  # 2 bare LayerNorms per block
    assert op_counts_of_export(export_graph(model, (x,), {}).gm) == (10 * depth, 2 * depth)
    assert_flops_not_increased(report)


def test_an_embedding_expanded_to_the_batch_is_not_folded_into_a_constant_of_the_examples_batch():
    """Video transformers add a temporal embedding expanded to batch x frames: compiled on one
    clip, the result holds for other batch sizes (no constant shaped by the example's batch, no
    rollback), the LayerNorm's affine still folds into fc, and no rewrite claims to hold for
    other shapes when it does not."""
    model = randomize(lb.VideoEmbedding())
    x = torch.randn(1, 4, 9, 12, generator=torch.Generator().manual_seed(5))
    fused = compile_exact(model, x, graph=False, fixed_size=True)  # (other batches: below)
    report = fused.repc_report
    assert report.rewrites and not report.rolled_back and not any(r.shape_specialized for r in report.rewrites)
    assert op_counts_of_export(export_graph(fused, (x,), {}).gm) == (2, 1), str(report)
    for batch in (2, 3):
        y = torch.randn(batch, 4, 9, 12)
        with torch.no_grad():
            assert lb.rel_dev(fused(y), model(y)) <= lb.REL_TOL


def test_wid_compactors_around_a_teacher_linear_become_one_compact_linear():
    torch.manual_seed(0)
    model = lb.CompactedLinear(8, 32, 48, 12).eval()
    fused = compile_exact(model, tokens(d=8))
    linear = only_linear(fused)
    assert (linear.in_features, linear.out_features) == (8, 12)
    report = fused.repc_report
    assert_flops_not_increased(report)
    (rewrite,) = report.rewrites
    assert rewrite.flops_after * 10 < rewrite.flops_before, rewrite  # 8*12 vs 8*32 + 32*48 + 48*12


@pytest.mark.parametrize("widths", [(16, 16, 16), (16, 48, 8), (16, 16, 16, 16)])
def test_linear_chain_is_merged_when_cheaper(widths):
    torch.manual_seed(0)
    fused = compile_exact(lb.LinearChain(*widths).eval(), tokens(d=widths[0]))
    linear = only_linear(fused)
    assert (linear.in_features, linear.out_features) == (widths[0], widths[-1])
    assert_flops_not_increased(fused.repc_report)


@pytest.mark.parametrize("model", [lambda: lb.LinearChain(64, 4, 64), lambda: lb.LinearAdapter(64, 2)],
                         ids=["bottleneck", "residual_adapter_alone"])
def test_standalone_bottleneck_is_not_expanded(model):
    """d -> r -> d with r << d: a d x d matrix costs 8x more; the cost model keeps both thin maps."""
    torch.manual_seed(0)
    fused = compile_exact(model().eval(), tokens(d=64))
    linears = called_modules(fused)
    assert sorted((m.in_features, m.out_features) for m in linears) == [(4, 64), (64, 4)] or \
        sorted((m.in_features, m.out_features) for m in linears) == [(2, 64), (64, 2)], linears
    report = fused.repc_report
    assert not report.rewrites, str(report)
    assert report.flops_saved == 0
    assert any("does not pay" in r.reason for r in report.rejected), str(report)


# ----------------------------------------------------------------------------- LayerNorm, BatchNorm on tokens

def _layer_norm_calls(fused):
    return [n for gm in lb.graph_modules(fused) for n in gm.graph.nodes
            if n.op == "call_function" and n.target is F.layer_norm]


def _norm_affines_run(module, x, norm=F.layer_norm):
    """(weight, bias) of each ``norm`` call (``F.layer_norm`` / ``F.group_norm``, as a module or a
    function) as ``module`` runs on ``x``: how the default output's norms are read."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is norm:
                seen.append(((args + (None, None))[2] if len(args) > 2 else kwargs.get("weight"),
                             (args + (None, None))[3] if len(args) > 3 else kwargs.get("bias")))
            return func(*args, **kwargs)

    with torch.no_grad(), Record():
        module(x)
    return seen


def _identity_weight(weight):
    return weight is None or bool((weight == 1).all())


def _identity_bias(bias):
    return bias is None or not bool(bias.any())


@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
def test_layernorm_affine_folds_into_the_next_linear_and_the_normalisation_stays(functional):
    torch.manual_seed(0)
    model = lb.LNLinear(16, 24, functional=functional).eval()
    fused = compile_exact(model, tokens(), graph=True)  # (the graph's layer_norm call: its arguments)
    linear = only_linear(fused)
    (ln,) = _layer_norm_calls(fused)
    weight, bias = (ln.args + (None, None, None))[2:4]
    assert weight is None and bias is None, ln.args  # the affine is in the linear now
    assert not any(isinstance(m, nn.LayerNorm) for m in called_modules(fused, nn.Module))
    gamma, beta = model.norm.weight.double(), model.norm.bias.double()
    w = model.fc.weight.double()
    assert torch.allclose(linear.weight.double(), w * gamma, atol=1e-5)
    assert torch.allclose(linear.bias.double(), w @ beta + model.fc.bias.double(), atol=1e-5)
    assert_flops_not_increased(fused.repc_report)
    # the default output: the same one linear, the affine in it (its norm's affine the identity)
    default = compile_exact(model, tokens())
    linear = only_linear(default)
    assert ops_run(default, tokens()) == Counter(ln=1, linear=1)
    ((weight, bias),) = _norm_affines_run(default, tokens())
    assert _identity_weight(weight) and _identity_bias(bias), (weight, bias)
    assert torch.allclose(linear.weight.double(), w * gamma, atol=1e-5)
    assert torch.allclose(linear.bias.double(), w @ beta + model.fc.bias.double(), atol=1e-5)
    assert_flops_not_increased(default.repc_report)


def test_layernorm_read_by_a_linear_and_the_residual_is_one_linear_after_the_bare_norm():
    """``fc(LN(x)) + LN(x)`` = ``(W + I)(norm(x) * gamma + beta) + b``: one linear on the bare norm."""
    class NormResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = lb.LNLinear(16, 16).norm
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            y = self.norm(x)
            return self.fc(y) + y

    torch.manual_seed(0)
    model = NormResidual().eval()
    fused = compile_exact(model, tokens(), graph=True)  # (the graph's layer_norm call)
    only_linear(fused)
    (ln,) = _layer_norm_calls(fused)
    assert ln.args[2] is None, ln.args
    assert_flops_not_increased(fused.repc_report)
    default = compile_exact(model, tokens())  # the default output: one linear, after the bare norm
    only_linear(default)
    assert ops_run(default, tokens()) == Counter(ln=1, linear=1)
    ((weight, _),) = _norm_affines_run(default, tokens())
    assert _identity_weight(weight), weight
    assert_flops_not_increased(default.repc_report)


def test_repq_vit_channel_scales_after_layernorm_fold_into_the_qkv_linear():
    torch.manual_seed(0)
    model = lb.RepQScaledLN(16, 48).eval()
    fused = compile_exact(model, tokens())
    only_linear(fused)
    counts = op_counts(fused)
    assert counts["LayerNorm"] == 1 and counts["mul"] == 0 and counts["add"] == 0, counts
    assert_flops_not_increased(fused.repc_report)


def test_layernorm_before_a_nonlinearity_keeps_its_affine_and_adds_no_op():
    torch.manual_seed(0)
    model = lb.LNThenAct(16).eval()
    fused = compile_exact(model, tokens(), graph=True)  # (the graph's calls, as written)
    counts = op_counts(fused)
    assert counts["linear"] == 1 and counts["GELU"] == 1, counts
    assert counts["mul"] == 0 and counts["add"] == 0, counts
    norms = _layer_norm_calls(fused) + [m for m in called_modules(fused, nn.LayerNorm)]
    assert len(norms) == 1
    assert not fused.repc_report.rewrites, str(fused.repc_report)
    calls = [n for gm in lb.graph_modules(fused) for n in gm.graph.nodes if n.op.startswith("call_")]
    assert len(calls) == 3, calls  # layer_norm (with its affine), GELU, linear: as written
    default = compile_exact(model, tokens())  # the default output runs the same three, as written
    counts = op_counts(default)
    assert counts["linear"] == 1 and counts["GELU"] == 1 and counts["mul"] == 0 and counts["add"] == 0, counts
    assert sum(counts.values()) == 3, counts
    assert ops_run(default, tokens()) == Counter(ln=1, linear=1)
    assert not default.repc_report.rewrites, str(default.repc_report)


@pytest.mark.parametrize("style", ["transpose", "flatten"])
@pytest.mark.parametrize("before, after", [(True, True), (True, False), (False, True)])
def test_batchnorm_on_token_layouts_folds_into_the_linear(style, before, after):
    torch.manual_seed(0)
    model = randomize(lb.TokenLinearBN(16, 24, style=style, before=before, after=after))
    fused = compile_exact(model, tokens())
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)  # no BN, no transpose/flatten left
    assert_flops_not_increased(fused.repc_report)


def test_groupnorm_affine_folds_into_a_pointwise_conv_but_not_across_a_padded_one():
    class GNConv(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.norm = nn.GroupNorm(2, 8)
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 2.0)
                self.norm.bias.normal_()
            self.conv = nn.Conv2d(8, 6, k, padding=k // 2)

        def forward(self, x):
            return self.conv(self.norm(x))

    torch.manual_seed(0)
    model = GNConv(1).eval()
    x = torch.randn(2, 8, 6, 6)
    pointwise = compile_exact(model, x, graph=True)  # (its group_norm call)
    (gn,) = [n for gm in lb.graph_modules(pointwise) for n in gm.graph.nodes if n.target is F.group_norm]
    assert gn.args[2] is None and gn.args[3] is None
    assert op_counts(pointwise)["conv"] == 1
    padded = compile_exact(GNConv(3).eval(), torch.randn(2, 8, 6, 6))  # beta at the zero border: not foldable
    assert not padded.repc_report.rewrites, str(padded.repc_report)
    assert op_counts(padded)["conv"] == 1
    default = compile_exact(model, x)  # the default output: the affine folded into the pointwise conv too
    ((weight, bias),) = _norm_affines_run(default, x, F.group_norm)
    assert _identity_weight(weight) and _identity_bias(bias), (weight, bias)
    assert op_counts(default)["conv"] == 1 and ops_run(default, x) == Counter(conv=1)


# ----------------------------------------------------------------------------- RePaViT

@pytest.mark.parametrize("form", ["slice", "split", "chunk", "mask_buffer", "mask_zeros_like"])
def test_repavit_channel_idle_ffn_runs_about_3d2_instead_of_8d2_per_token(form):
    d = 32
    torch.manual_seed(0)
    model = randomize(lb.RePaViTFFN(d, ratio=4, idle=0.75, form=form, chunks=4))
    x = tokens(2, 5, d)
    fused = compile_exact(model, x)
    counts = op_counts(fused)
    assert counts["bn"] == 0 and counts["GELU"] == 1, counts
    assert counts["linear"] == 3, counts  # narrow fc1, narrow fc2, and the parallel idle+residual+BN linear
    per_token = sum(m.in_features * m.out_features for m in called_modules(fused))
    assert abs(per_token - 3 * d * d) <= 0.03 * 3 * d * d, per_token
    before = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    assert before == 8 * d * d
    report = fused.repc_report
    assert_flops_not_increased(report)
    tokens_count = x.shape[0] * x.shape[1]
    after = sum(r.flops_after for r in report.rewrites) / tokens_count
    assert abs(after - 3 * d * d) <= 0.05 * 3 * d * d, after
    assert sum(r.flops_before for r in report.rewrites) / tokens_count >= 8 * d * d
    widths = sorted((m.in_features, m.out_features) for m in called_modules(fused))
    assert widths == [(d, d)] * 3, widths  # the GELU covers only k = d hidden channels


def test_repavit_with_the_idle_channels_first_and_a_layernorm():
    """Idle part before the active one in the concat, and a LayerNorm as the norm: the bare
    normalisation stays, the rest is still narrow fc1 -> GELU -> narrow fc2 + one parallel linear."""
    class IdleFirstLN(lb.RePaViTFFN):
        def __init__(self, d):
            super().__init__(d)
            self.norm = lb.LNLinear(d, d).norm

        def forward(self, x):
            h = self.fc1(self.norm(x))
            return x + self.fc2(torch.cat([h[..., self.k:], self.act(h[..., :self.k])], -1))

    torch.manual_seed(0)
    fused = compile_exact(IdleFirstLN(32).eval(), tokens(d=32))
    counts = op_counts(fused)
    assert counts["linear"] == 3 and counts["GELU"] == 1, counts
    assert sum(m.in_features * m.out_features for m in called_modules(fused)) == 3 * 32 * 32
    assert_flops_not_increased(fused.repc_report)


def test_repavit_with_half_the_channels_idle_is_exact():
    torch.manual_seed(0)
    model = randomize(lb.RePaViTFFN(16, ratio=4, idle=0.5, form="slice"))
    fused = compile_exact(model, tokens())
    assert op_counts(fused)["linear"] == 3
    assert_flops_not_increased(fused.repc_report)


@pytest.mark.parametrize("front_end", ["auto", "export"])
def test_repavit_paper_code_runs_the_deploy_forms_linears_by_default(front_end):
    """The paper's own idiom (mask built at each call, BN on the hidden channels after the
    activation, the FFN reading the attention's residual sum): the default result runs, per
    block, the attention's qkv and proj, then fc1 and fc2 narrowed to the d activated channels
    and one d x d linear for the idle channels, the norms and the residual -- the paper's deploy
    form -- and not a second copy of proj (the attention's sum is read by fc1 anyway)."""
    d, depth = 32, 2
    model = randomize(nn.Sequential(*[lb.RePaViTPaperBlock(d) for _ in range(depth)]))
    for block in model:
        block.mlp.ls.data.normal_()
    x = tokens(2, 9, d)
    fused = compile_exact(model, x, graph=False, front_end=front_end)
    assert type(fused) is nn.Sequential
    exported = export_graph(fused, (x,), {}).gm
    modules = dict(exported.named_modules())
    called = [modules[n.target] for n in exported.graph.nodes if n.op == "call_module"]
    linears = sorted((m.in_features, m.out_features) for m in called if isinstance(m, nn.Linear))
    assert linears == sorted([(d, 3 * d), (d, d), (d, d), (d, d), (d, d)] * depth), linears
    assert sum(isinstance(m, nn.GELU) for m in called) == depth
    assert not any(isinstance(m, nn.BatchNorm1d) for m in called)
    assert_flops_not_increased(fused.repc_report)


# ----------------------------------------------------------------------------- depth reduction

IDENTITY_ACTIVATIONS = {
    "leaky_relu_1": lambda: nn.LeakyReLU(1.0),
    "prelu_ones": lb.all_ones_prelu,
    "identity": nn.Identity,
    "eval_dropout": lambda: nn.Dropout(0.3),
}


@pytest.mark.parametrize("act", list(IDENTITY_ACTIVATIONS))
def test_identity_activation_vanishes_and_the_mlp_is_one_linear(act):
    torch.manual_seed(0)
    model = lb.ActivatedMLP(16, 16, IDENTITY_ACTIVATIONS[act]()).eval()
    fused = compile_exact(model, tokens())
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    assert_flops_not_increased(fused.repc_report)


@pytest.mark.parametrize("act", list(IDENTITY_ACTIVATIONS))
def test_residual_blocks_with_identity_activations_collapse_into_one_linear(act):
    torch.manual_seed(0)
    model = lb.ResidualLinearStack(16, depth=3, make_act=lambda d: IDENTITY_ACTIVATIONS[act]()).eval()
    fused = compile_exact(model, tokens())
    linear = only_linear(fused)
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    eye = torch.eye(16, dtype=torch.float64)
    want = eye
    for fc in model.fcs:
        want = (eye + fc.weight.double()) @ want
    assert torch.allclose(linear.weight.double(), want, atol=1e-4)
    report = fused.repc_report
    assert_flops_not_increased(report)
    assert sum(r.flops_after for r in report.rewrites) * 3 <= sum(r.flops_before for r in report.rewrites)


def test_residual_mlps_with_identity_activations_collapse_from_16d2_to_d2_per_token():
    """Two ``x = x + fc2(act(fc1(x)))`` blocks with hidden 4d: 16 d^2 MACs per token as written."""
    class Blocks(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.mlps = nn.ModuleList(lb.ActivatedMLP(d, 4 * d, nn.LeakyReLU(1.0)) for _ in range(2))

        def forward(self, x):
            for mlp in self.mlps:
                x = x + mlp(x)
            return x

    torch.manual_seed(0)
    fused = compile_exact(Blocks().eval(), tokens())
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    report = fused.repc_report
    assert_flops_not_increased(report)
    per_token = [sum(getattr(r, f) for r in report.rewrites) / 10 for f in ("flops_before", "flops_after")]
    assert per_token[0] >= 16 * 16 * 16 and per_token[1] <= 16 * 16 * 1.1, per_token


@pytest.mark.parametrize("act", [lambda: nn.LeakyReLU(0.5), nn.GELU, lambda: nn.PReLU(init=0.25)],
                         ids=["leaky_relu_0.5", "gelu", "prelu_0.25"])
def test_nonlinearity_that_is_not_an_identity_stops_merging(act):
    torch.manual_seed(0)
    model = lb.ActivatedMLP(16, 16, act()).eval()
    fused = compile_exact(model, tokens())
    counts = op_counts(fused)
    assert counts["linear"] == 2, counts
    assert counts[type(model.act).__name__] == 1, counts
    assert not fused.repc_report.rewrites, str(fused.repc_report)


def test_residual_stack_with_one_real_nonlinearity_keeps_it_and_stays_exact():
    torch.manual_seed(0)
    model = lb.ResidualLinearStack(16, depth=3)
    model.acts[1] = nn.GELU()
    fused = compile_exact(model.eval(), tokens())
    counts = op_counts(fused)
    assert counts["GELU"] == 1 and counts["LeakyReLU"] == 0, counts
    assert 1 <= counts["linear"] <= 3, counts
    assert_flops_not_increased(fused.repc_report)


# ----------------------------------------------------------------------------- RepMLP

def test_repmlp_conv_branches_become_part_of_the_fc_for_the_example_map_size():
    torch.manual_seed(0)
    model = randomize(lb.RepMLPUnit(c=3, h=4, w=4, kernels=(1, 3)))
    fused = compile_exact(model, torch.randn(2, 3, 4, 4), fixed_size=True)
    counts = op_counts(fused)
    assert counts["linear"] == 1 and counts["conv"] == 0 and counts["bn"] == 0, counts
    (fc,) = called_modules(fused)
    assert (fc.in_features, fc.out_features) == (48, 48)
    # the branches' matrix, read off independently: their responses to unit impulses on a 3x4x4 map
    with torch.no_grad():
        impulses = torch.eye(48).reshape(48, 3, 4, 4)
        zero = torch.zeros(1, 3, 4, 4)
        branches = sum(b(impulses) - b(zero) for b in model.branches).reshape(48, 48).T
        offset = sum(b(zero) for b in model.branches).reshape(48)
    assert torch.allclose(fc.weight, model.fc.weight + branches, atol=1e-5)
    assert torch.allclose(fc.bias, model.fc.bias + offset, atol=1e-5)
    report = fused.repc_report
    assert_flops_not_increased(report)
    assert all(r.shape_specialized for r in report.rewrites), report.rewrites
    assert "SHAPE-SPECIALIZED" in str(report)


def test_repmlp_refuses_another_map_size_like_the_original():
    torch.manual_seed(0)
    model = randomize(lb.RepMLPUnit(c=3, h=4, w=4))
    fused = compile_exact(model, torch.randn(2, 3, 4, 4), fixed_size=True)
    other = torch.randn(2, 3, 5, 5)
    for m in (model, fused):
        with pytest.raises(RuntimeError):
            m(other)


def test_an_in_place_layer_scale_after_eval_dropout_does_not_spoil_the_region_checks():
    """timm's ``LayerScale(inplace=True)``: ``x.mul_(gamma)`` on fc2's output, which the eval
    Dropout passes through as the same tensor.  The write is made out of place, so the scale
    folds into fc2 and the merges are checked against values recorded before that write."""
    class LayerScale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

        def forward(self, x):
            return x.mul_(self.gamma)

    class Block(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
            self.drop1, self.drop2 = nn.Dropout(0.1), nn.Dropout(0.1)
            self.ls = LayerScale(d)

        def forward(self, x):  # timm's Mlp: fc1, act, drop1, fc2, drop2
            return x + self.ls(self.drop2(self.fc2(self.drop1(self.act(self.fc1(self.norm(x)))))))

    torch.manual_seed(0)
    model = lb.randomize(Block()).eval()
    fused = compile_exact(model, tokens())
    report = fused.repc_report
    assert not [r.reason for r in report.rejected if r.reason.startswith("rolled back")], str(report)
    # LN's affine into fc1; the in-place scale, made out of place through drop2, into fc2
    assert {r.root for r in report.rewrites} == {"fc1", "add"}, str(report)
    assert lb.op_counts(fused) == {"layer_norm": 1, "linear": 2, "GELU": 1, "add": 1}, lb.op_counts(fused)


def test_peft_style_lora_with_its_dtype_casts_merges_into_one_linear():
    torch.manual_seed(0)
    model = lb.randomize(lb.PeftLoRALinear()).eval()
    fused = compile_exact(model, tokens())
    assert op_counts(fused)["linear"] == 1, op_counts(fused)
    assert len(called_modules(fused)) == 1 and type(called_modules(fused)[0]) is nn.Linear


def test_reading_the_shape_of_a_norm_output_does_not_stop_its_affine_folding_into_qkv():
    torch.manual_seed(0)
    model = lb.randomize(lb.TimmAttentionInput()).eval()
    fused = compile_exact(model, tokens())
    (rewrite,) = fused.repc_report.rewrites
    assert "qkv (Linear)" in rewrite.replaced, str(fused.repc_report)
    counts = op_counts(fused)
    assert "mul" not in counts and "add" not in counts, counts  # the LN's scale and shift are in qkv


def test_gpt2_conv1d_mlp_takes_the_layer_norm_affine_into_its_first_layer():
    """``addmm`` on tokens flattened by ``view(-1, C)``: the linear moves before the flatten,
    the LN's scale and shift fold into it, and the flatten and the view back cancel."""
    torch.manual_seed(0)
    model = lb.randomize(lb.GPT2MLP()).eval()
    fused = compile_exact(model, tokens())  # the default: GPT-2's own Conv1D layers, the affine in the first
    counts = op_counts(fused)
    assert counts["linear"] + counts["addmm"] == 2 and "mul" not in counts, counts
    assert torch.equal(fused.ln_2.weight, torch.ones_like(fused.ln_2.weight)) and not fused.ln_2.bias.any()
    # (the whole graph, Conv1D's code inlined: its views cancel; the default runs Conv1D's own view/addmm/view)
    counts = op_counts(compile_exact(model, tokens(), graph=True))
    assert counts["linear"] == 2 and "addmm" not in counts, counts
    assert "mul" not in counts and "view" not in counts and "flatten" not in counts, counts


def test_a_projection_read_through_slices_counts_its_multiply_adds_once_in_the_savings():
    """LN -> qkv -> chunk(3): qkv takes the LN's affine once and is sliced (one linear, not one
    per slice); the savings are the LN's multiply-adds, not 3x qkv's."""
    class SplitHeads(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.norm, self.qkv = nn.LayerNorm(d), nn.Linear(d, 3 * d)

        def forward(self, x):
            q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
            return q.softmax(-1) + torch.relu(k) + torch.sigmoid(v)

    torch.manual_seed(0)
    model = lb.randomize(SplitHeads()).eval()
    x = tokens()
    fused = compile_exact(model, x)
    report = fused.repc_report
    assert len(report.rewrites) == 1, str(report)
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 1
    ln_affine = 2 * x.numel()  # a multiply and an add per element
    assert report.flops_saved == ln_affine, (report.flops_saved, ln_affine)


LINEAR_BLOCKS = {
    "lora": lambda: lb.LoRALinear(16, 24),
    "functional_lora": lambda: lb.FunctionalLoRA(16, 24),
    "peft_lora": lambda: lb.PeftLoRALinear(),
    "glora": lambda: lb.GLoRALinear(16, 24),
    "adapter": lambda: lb.LinearAdapter(16),
    "adapted_linear": lambda: lb.AdaptedLinear(),
    "compactors": lambda: lb.CompactedLinear(d_student_in=16),
    "linear_chain": lambda: lb.LinearChain(16, 16, 16),
    "ln_linear": lambda: lb.LNLinear(),
    "repq_scaled_ln": lambda: lb.RepQScaledLN(),
    "token_linear_bn": lambda: lb.TokenLinearBN(),
    "residual_linear_stack": lambda: lb.ResidualLinearStack(),
    "stack_mean_experts": lambda: lb.StackMeanExperts(16),
    "sum_div_experts": lambda: lb.SumDivExperts(16),
    "gated_experts": lambda: lb.GatedExperts(16),
}


@pytest.mark.parametrize("name", list(LINEAR_BLOCKS))
def test_the_default_output_runs_the_ops_of_the_whole_model_graph(name):
    # blocks compiled on their own, their branches summed in their own forward: the model's own
    # class comes back, running no more linears, norms or matmuls than graph=True
    from blocks import ops_run
    torch.manual_seed(0)
    model = randomize(LINEAR_BLOCKS[name]())
    with torch.no_grad():
        for p in model.parameters():  # (unit norms and zero biases hide folding errors)
            p.add_(torch.randn_like(p) * 0.2)
    x = tokens()
    fused, whole = repc.compile(model, (x,)), repc.compile(model, (x,), graph=True)
    assert type(fused) is type(model) and fused.repc_report.output == "module-preserving", fused.repc_report
    assert ops_run(fused, x) == ops_run(whole, x), fused.repc_report
    y = tokens(b=3, n=7)
    with torch.no_grad():
        assert lb.rel_dev(fused(y), model(y)) <= 1e-5
