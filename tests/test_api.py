from collections import Counter

import pytest
import torch
import torch.nn as nn

import repc
from repc.examples import RepVGGBlock, example_net, randomize_bn
from repc.reasons import MergeRule

from blocks import ops_run


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_input_model_is_untouched(graph):
    model = example_net()
    before = _state(model)
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    fused = repc.compile(model, torch.randn(2, 3, 32, 32), graph=graph)
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    assert grads == [p.requires_grad for p in model.parameters()]
    # the result shares no tensor, nor any tensor's memory, with the input model
    ours = list(fused.parameters()) + list(fused.buffers())
    theirs = list(model.parameters()) + list(model.buffers())
    assert not {id(t) for t in ours} & {id(t) for t in theirs}
    assert not {t.untyped_storage().data_ptr() for t in ours} & {t.untyped_storage().data_ptr() for t in theirs}


class AdaptsItsWindow(nn.Module):
    """Like transformers' Swin: a forward that lowers an attribute to a small input's size and
    keeps it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.window = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), 12

    def forward(self, x):
        if x.shape[-1] < self.window:
            self.window = x.shape[-1]
        return self.bn(self.conv(x)) * (self.window / 12)


def test_the_checks_calls_at_other_sizes_leave_the_models_attributes_as_they_were():
    model = AdaptsItsWindow()
    randomize_bn(model.bn)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    fused = repc.compile(model, x)
    assert any("x7" in name for name in fused.repc_report.verification.inputs_checked)  # (a smaller width ran)
    assert model.window == 12 and fused.window == 12
    with torch.no_grad():
        assert torch.allclose(fused(x), AdaptsItsWindow.forward(model, x), atol=1e-5)


class DrawsAMask(nn.Module):
    """Like ViT-MAE without its ``noise`` input: draws at random in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x, noise=None):
        noise = torch.rand(x.shape[0], 1, x.shape[2], x.shape[3]) if noise is None else noise
        return self.bn(self.conv(x)) * (noise > 0.5)


def test_a_model_drawing_at_random_is_compared_from_the_same_random_state_and_the_callers_is_kept():
    model = DrawsAMask()
    randomize_bn(model.bn)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    state = torch.random.get_rng_state()
    fused = repc.compile(model, x)
    assert torch.equal(torch.random.get_rng_state(), state)
    report = fused.repc_report
    assert report.verification.ok and not report.rolled_back and len(report.rewrites) == 1, report
    noise = torch.rand(3, 1, 9, 9)
    y = torch.randn(3, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(fused(y, noise), model(y, noise), atol=1e-5)


def test_training_mode_is_refused_with_a_clear_message():
    model = example_net().train()
    with pytest.raises(repc.ReparamError, match=r"eval\(\)"):
        repc.compile(model, torch.randn(2, 3, 32, 32))


def test_submodule_left_in_training_mode_is_named():
    model = example_net()
    model.stage1[0].dense[1].train()
    with pytest.raises(repc.ReparamError, match="stage1.0.dense.1"):
        repc.compile(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_single_tensor_example_and_report(graph):
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4))).eval()
    fused = repc.compile(model, torch.randn(1, 4, 8, 8), graph=graph)
    report = fused.repc_report
    assert len(report.rewrites) == 1
    rw = report.rewrites[0]
    assert "sum" in rw.rule and "compose" in rw.rule and {MergeRule.SUM, MergeRule.COMPOSE} <= set(rw.rules)
    assert rw.params_after < rw.params_before and rw.flops_after < rw.flops_before
    assert rw.max_deviation < 1e-5 and rw.exact
    assert report.verification.ok
    # the example, random values of its shape, another batch and other map sizes (small)
    assert report.verification.inputs_checked == ["example", "random 1x4x8x8", "random 2x4x9x9"]
    text = str(report)
    assert "rewrite" in text and "verification passed" in text
    d = report.to_dict()
    assert d["rewrites"][0]["root"] == rw.root
    assert d["rewrites"][0]["rule"] == rw.rule and d["rewrites"][0]["rules"] == [r.value for r in rw.rules]
    assert '"rewrites"' in report.to_json()


def test_model_failing_on_example_is_a_clear_error():
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4))).eval()
    with pytest.raises(repc.ReparamError, match="fails on the example"):
        repc.compile(model, torch.randn(1, 3, 8, 8))


def test_not_a_module():
    with pytest.raises(repc.ReparamError, match="nn.Module"):
        repc.compile(lambda x: x, torch.randn(1))


class _Shell(nn.Module):
    """Data-dependent control flow at the top: fx cannot trace it, its blocks can be."""

    def __init__(self):
        super().__init__()
        self.a = RepVGGBlock(4, 4)
        self.b = RepVGGBlock(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_untraceable_model_compiles_its_traceable_parts(graph):
    model = randomize_bn(_Shell()).eval()
    x = torch.randn(1, 4, 8, 8)
    fused = repc.compile(model, x, graph=graph)
    report = fused.repc_report
    assert any(s.path == "<model>" for s in report.skipped)
    assert len(report.rewrites) >= 1
    with torch.no_grad():
        for sign in (1, -1):
            y = sign * torch.randn(2, 4, 8, 8).abs()
            assert torch.allclose(fused(y), model(y), atol=1e-5)


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_report_says_why_a_region_was_kept(graph):
    class BnBeforePaddedConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(self.bn(x))

    model = randomize_bn(BnBeforePaddedConv()).eval()
    fused = repc.compile(model, torch.randn(1, 4, 8, 8), graph=graph)
    reasons = " ".join(r.reason for r in fused.repc_report.rejected)
    assert "border" in reasons
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1


class OptionalMask(nn.Module):
    """A forward with an optional argument that the code branches on (``attention_mask=None``)."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x, mask=None):
        h = self.fc(self.norm(x))
        if mask is not None:
            h = h * mask[..., None]
        return h


def test_an_optional_argument_left_out_of_the_example_is_specialized_to_its_default():
    torch.manual_seed(0)
    model = OptionalMask().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 8)
    fused = repc.compile(model, (x,), graph=True)  # (the graph's guard on the specialized argument)
    assert fused.repc_report.rewrites and fused.repc_report.specialized == {"mask": "None"}
    assert torch.allclose(fused(x), model(x), atol=1e-5)
    with pytest.raises(AssertionError, match="mask has been specialized"):
        fused(x, torch.ones(2, 5))  # the fused graph computed the path without a mask
    with pytest.raises(AssertionError, match="mask has been specialized"):
        fused(x, mask=torch.ones(2, 5))  # by keyword too: the argument keeps its name
    assert torch.allclose(fused(x, mask=None), model(x), atol=1e-5)
    default = repc.compile(model, (x,))  # (the model's own forward: the mask's path stays its code)
    assert default.repc_report.rewrites and ops_run(default, x) == ops_run(fused, x) == Counter(ln=1, linear=1)
    mask = torch.rand(2, 5)
    with torch.no_grad():
        assert torch.allclose(default(x), model(x), atol=1e-5)
        assert torch.allclose(default(x, mask), model(x, mask), atol=1e-5)


def test_a_none_example_input_is_guarded_too():
    model = OptionalMask().eval()
    x = torch.randn(2, 5, 8)
    fused = repc.compile(model, (x, None), graph=True)  # (the graph's guard)
    with pytest.raises(AssertionError, match="specialized"):
        fused(x, torch.ones(2, 5))
    default = repc.compile(model, (x, None))  # the model's own forward: the mask's path stays its code
    with torch.no_grad():
        assert torch.allclose(default(x, torch.ones(2, 5)), model(x, torch.ones(2, 5)), atol=1e-5)


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_a_model_returning_a_dict_is_fused_as_a_whole(graph):
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return {"logits": self.b(self.a(x)), "features": [x * 2]}

    model = Heads().eval()
    x = torch.randn(2, 4)
    fused = repc.compile(model, (x,), graph=graph)
    assert not fused.repc_report.skipped and len(fused.repc_report.rewrites) == 1
    out = fused(x)
    assert torch.allclose(out["logits"], model(x)["logits"], atol=1e-6)


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_a_model_giving_nan_on_the_example_is_rolled_back_and_the_report_says_why(graph):
    """A NaN in one BatchNorm's running_var used to pass verification (the checks compared
    around it); now nothing is compared around the original's NaN: every rewrite is rolled back."""
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 4))).eval()
    with torch.no_grad():
        model[1].dense[1].running_var[2] = float("nan")
    fused = repc.compile(model, torch.randn(1, 4, 8, 8), graph=graph)
    report = fused.repc_report
    assert report.rolled_back and not report.rewrites and not report.verification.ok
    assert report.verification.failing_input == "example"
    assert "the original model produces NaN on the example input" in report.verification.error
    assert "the original model produces NaN on the example input" in str(report)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), equal_nan=True)  # the original's function, NaN and all


# --------------------------------------------------------------------------- issue 13


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
def test_the_result_is_in_eval_mode_like_the_model(graph):
    x = torch.randn(1, 4, 8, 8)
    for model in (randomize_bn(nn.Sequential(RepVGGBlock(4, 4))).eval(), randomize_bn(_Shell()).eval()):
        fused = repc.compile(model, x, graph=graph)
        assert fused.repc_report.rewrites  # (new GraphModules were made)
        assert [n for n, m in fused.named_modules() if m.training] == []
        again = repc.compile(fused, x, graph=graph)  # repc's own output is accepted as input
        with torch.no_grad():
            assert torch.allclose(again(x), model(x), atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance, message", [
    (torch.float32, 1e-12, "tolerance 1e-12 is below the rounding of float32 (eps 1.19e-07)"),
    (torch.float32, 1e-8, "below the rounding of float32"),
    (torch.float32, 0.0, "below the rounding"),
    (torch.float32, -1.0, "below the rounding"),
    (torch.float64, 1e-17, "below the rounding of float64 (eps 2.22e-16)"),
    (torch.float16, 1e-4, "below the rounding of float16 (eps 0.000977)"),
    (torch.float32, float("nan"), "tolerance must be a number"),
    (torch.float32, "1e-3", "tolerance must be a number"),
])
def test_a_tolerance_below_the_dtype_rounding_is_refused(dtype, tolerance, message):
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4))).eval().to(dtype)
    with pytest.raises(repc.api.ReparamError) as refused:
        repc.compile(model, torch.randn(1, 4, 8, 8, dtype=dtype), tolerance=tolerance)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_tolerance_at_the_dtype_rounding_is_taken():
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4))).eval().double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    fused = repc.compile(model, x, tolerance=1e-12)  # far below float32's eps, well above float64's
    assert fused.repc_report.verification.ok and fused.repc_report.verification.tolerance == 1e-12
    assert fused.repc_report.rewrites


def _conv_bn(dtype=torch.float32):
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), seed=0).eval().to(dtype)


def _new_non_finite_tensors(fused, model):
    """Tensors of ``fused`` holding NaN or Inf that are not copies of one of ``model``'s own."""
    theirs = list(model.parameters()) + list(model.buffers())
    return [k for k, t in list(fused.named_parameters()) + list(fused.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
            and not any(o.shape == t.shape and torch.allclose(o, t, rtol=0, atol=0, equal_nan=True) for o in theirs)]


@pytest.mark.parametrize("poison, reason", [
    ("running_var", "the merged conv weight would hold NaN (27 of 108 entries): it is computed from non-finite"),
    ("weight", "the merged conv weight would hold Inf (1 of 108 entries): it is computed from non-finite"),
    ("overflow", "would hold Inf (108 of 108 entries): its values are too large for float16"),
])
def test_a_merge_whose_weights_are_not_finite_is_never_emitted(poison, reason):
    model = _conv_bn(torch.float16 if poison == "overflow" else torch.float32)
    with torch.no_grad():
        if poison == "running_var":
            model[1].running_var[1] = float("nan")
        elif poison == "weight":
            model[0].weight[2, 0, 1, 1] = float("inf")
        else:  # each finite in float16; their product is not
            model[0].weight.fill_(300.0)
            model[1].weight.fill_(300.0)
    dtype = model[0].weight.dtype
    x = torch.randn(1, 3, 8, 8, dtype=dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = repc.compile(model, x, verify=False)
    report = fused.repc_report
    assert not report.rewrites and any(reason in r.reason for r in report.rejected), str(report)
    assert _new_non_finite_tensors(fused, model) == []  # the region was kept as written
    with torch.no_grad():
        want, got = model(x), fused(x)
    assert torch.allclose(got, want, rtol=0, atol=0, equal_nan=True)  # computes exactly as the model
    assert all(torch.allclose(v, state[k], rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())


def test_the_cost_model_is_chosen_by_name(monkeypatch):
    """``cost="latency"`` prices merges by a latency model (here a given one: no calibration),
    under which one 5x5 conv beats a 3x3 and a dilated 3x3 where per-op overhead dominates;
    multiply-adds keep the two; an unknown name is refused."""
    import repc.api as api
    from repc.latency import KINDS, LatencyModel

    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.a(x) + self.b(x)

    overhead_bound = LatencyModel({k: (2e-5, 1e-11, 1e-12) for k in KINDS})
    monkeypatch.setattr(api, "latency_model", lambda device, dtype: overhead_bound)
    model = randomize_bn(Dilated()).eval()
    x = torch.randn(1, 4, 8, 8)

    def kernels(fused):
        return sorted(m.kernel_size for m in fused.modules() if isinstance(m, nn.Conv2d))

    macs = repc.compile(model, x)
    assert kernels(macs) == [(3, 3), (3, 3)] and ops_run(macs, x) == Counter(conv=2)
    # the default output takes the 5x5 the latency model prices below the two 3x3s (before, its
    # placement judged the merge by multiply-adds alone and kept the block as written: 2 convs, 2 BNs)
    fused = repc.compile(model, x, cost="latency")
    assert kernels(fused) == [(5, 5)] and fused.repc_report.verification.ok
    assert ops_run(fused, x) == Counter(conv=1)
    assert ops_run(repc.compile(model, x, graph=True, cost="latency"), x) == Counter(conv=1)
    with pytest.raises(repc.ReparamError, match="cost must be one of macs, latency, measure"):
        repc.compile(model, x, cost="flops")


def test_a_layer_called_without_its_mask_on_other_inputs_keeps_its_forward_and_its_merges_hold_there():
    # transformers' idiom: the layers get no mask where it is all ones; a layer replaced by a graph
    # traced with the example's padded mask would crash (or compute with that mask) there
    from linear_blocks import MaskedTokenModel, masked_token_example
    from linear_blocks import randomize as randomize_tokens
    torch.manual_seed(0)
    model = randomize_tokens(MaskedTokenModel())
    with torch.no_grad():
        for p in model.parameters():  # (unit norms and zero biases hide folding errors)
            p.add_(torch.randn_like(p) * 0.3)
    example = masked_token_example(2, 6)
    fused = repc.compile(model, (), example)
    report = fused.repc_report
    assert type(fused) is MaskedTokenModel and report.output == "module-preserving"
    assert all(type(layer) is type(model.layers[0]) for layer in fused.layers)
    assert all(type(layer.proj) is nn.Linear for layer in fused.layers)  # each LoRA merged in its module
    assert {"all-ones mask", "left-padded mask", "without attention_mask"} <= set(report.verification.inputs_checked)
    ids = example["input_ids"]
    for kwargs in (example, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {"input_ids": ids},
                   masked_token_example(3, 5)):
        with torch.no_grad():
            assert (fused(**kwargs) - model(**kwargs)).abs().max() < 1e-5


class _KeywordsOnlyBranchy(nn.Module):
    """Keyword inputs only, and a branch on the data: neither front end captures it whole."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, **inputs):
        x = inputs["x"]
        y = self.bn(self.conv(x))
        return y if x.sum() > 0 else -y


def test_a_model_that_cannot_be_captured_comes_back_unchanged_with_a_warning():
    model = randomize_bn(_KeywordsOnlyBranchy()).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(repc.UnchangedWarning, match="returned unchanged"):
        fused = repc.compile(model, (), {"x": x})
    report = fused.repc_report
    assert report.output == "unchanged" and not report.rewrites and "captured" in report.output_note
    assert "returned: the model unchanged" in str(report)
    with torch.no_grad():
        assert torch.equal(fused(x=x), model(x=x)) and torch.equal(fused(x=-x), model(x=-x))


class _TiedScaled(nn.Module):
    """Two linears sharing one weight, the first scaled after: its merged weight is not that weight."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
        self.second.weight = self.first.weight
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 6))

    def forward(self, x):
        return torch.relu(self.first(x) * self.scale) + self.second(x)


def test_in_place_writes_only_into_a_weight_nothing_else_reads_and_refuses_the_graph_output():
    model = _TiedScaled().eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        want, other = model(x), model(torch.ones(5, 6))
    weight = model.first.weight.detach().clone()
    fused = repc.compile(model, x, in_place=True)
    report = fused.repc_report
    assert report.rewrites and not report.written_in_place  # the shared weight stays as it was
    assert torch.equal(model.first.weight, weight)
    with torch.no_grad():
        assert torch.allclose(fused(x), want, atol=1e-5) and torch.allclose(fused(torch.ones(5, 6)), other, atol=1e-5)
    with pytest.raises(repc.ReparamError, match="in_place"):
        repc.compile(_TiedScaled().eval(), x, in_place=True, graph=True)  # (refused: graph=True's own)
