"""repc.verify: the Hypothesis-driven differential check, its strategies, and half precision."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import repc
from repc.examples import RepVGGBlock, example_net, randomize_bn
from repc.verify.check import deviation
from repc.verify.equivalence import (VerificationError, default_tolerance, probe_free_sizes, resolve_tolerance,
                                     verify)
from repc.verify.strategies import (DISTRIBUTIONS, InputCase, draw_values, input_cases, large_magnitude,
                                    small_magnitude)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- a correct fusion

def test_correct_fusion_passes_on_other_shapes_and_distributions():
    model = example_net()
    x = torch.randn(2, 3, 32, 32)
    fused = repc.compile(model, x)
    before, before_fused = _state(model), _state(fused)
    result = verify(model, fused, x, max_examples=15)
    assert result.ok and bool(result), str(result)
    assert 0 <= result.max_deviation <= result.tolerance == pytest.approx(default_tolerance(torch.float32))
    assert result.cases_checked >= 15
    # batch and both spatial axes were found free; channels stay fixed
    assert {(0, 0), (0, 2), (0, 3)} <= set(result.free_sizes) and (0, 1) not in result.free_sizes
    shapes = {s[0] for s in result.shapes_checked}
    assert (2, 3, 32, 32) in shapes and any(s[0] != 2 for s in shapes) and any(s[2:] != (32, 32) for s in shapes)
    assert all(s[1] == 3 for s in shapes)
    assert "passed" in str(result)
    # neither model was touched
    assert all(torch.equal(v, _state(model)[k]) for k, v in before.items())
    assert all(torch.equal(v, _state(fused)[k]) for k, v in before_fused.items())


def test_result_is_reproducible_for_a_seed():
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4))).eval()
    x = torch.randn(1, 4, 6, 6)
    fused = repc.compile(model, x)
    a = verify(model, fused, x, max_examples=8, seed=3)
    b = verify(model, fused, x, max_examples=8, seed=3)
    assert a.shapes_checked == b.shapes_checked and a.max_deviation == b.max_deviation


# --------------------------------------------------------------------------- wrong fusions are caught

class _PointwiseThenPadded(nn.Module):
    """A biased 1x1 conv, then a zero-padded 3x3 conv: merging them carries the bias into the
    padded border, where the original has zeros."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.pw(x))


def _naive_merge(model: _PointwiseThenPadded) -> nn.Module:
    merged = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        w2, w1 = model.conv.weight, model.pw.weight[:, :, 0, 0]
        merged.weight.copy_(torch.einsum("omhw,mi->oihw", w2, w1))
        merged.bias.copy_(model.conv.bias + torch.einsum("omhw,m->o", w2, model.pw.bias))
    return merged.eval()


def test_border_error_is_caught_on_the_example_itself():
    model = _PointwiseThenPadded().eval()
    x = torch.randn(2, 3, 8, 8)
    result = verify(model, _naive_merge(model), x, max_examples=5)
    assert not result.ok and not result
    assert result.max_deviation > result.tolerance
    assert result.failing_case.distribution == "example"
    assert torch.equal(result.failing_input[0], x)
    assert "FAILED on the example inputs" in str(result)


def test_zeros_distribution_exposes_a_lost_bias():
    """A bias small next to the signal hides in normal inputs; zero inputs show it whole."""
    model = nn.Conv2d(3, 4, 3, padding=1).eval()
    with torch.no_grad():
        model.bias.mul_(1e-4)
    fused = copy.deepcopy(model)
    fused.bias = None
    x = torch.randn(2, 3, 6, 6)
    assert verify(model, fused, x, max_examples=10, distributions=("normal",)).ok
    result = verify(model, fused, x, max_examples=10)
    assert not result.ok
    assert result.failing_case.distribution in ("zeros", "near_zero")
    zeros = verify(model, fused, x, max_examples=3, distributions=("zeros",))
    assert not zeros.ok and zeros.max_deviation == pytest.approx(1.0)  # the output is the bias alone


class _ShapeSpecialized(nn.Module):
    """A fused model that only works at the example's size (a constant map added)."""

    def __init__(self, conv, size):
        super().__init__()
        self.conv = conv
        self.register_buffer("offset", torch.zeros((1, conv.out_channels) + size))

    def forward(self, x):
        return self.conv(x) + self.offset


def test_shape_specialized_fusion_fails_with_a_shrunk_input():
    model = nn.Conv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 8, 9)
    result = verify(model, _ShapeSpecialized(model, (8, 9)).eval(), x, max_examples=20)
    assert not result.ok
    assert result.error and "RuntimeError" in result.error
    shape = result.failing_input[0].shape
    # shrunk: the example's batch, one spatial axis off by one
    assert shape[:2] == (2, 3)
    assert sorted(abs(a - b) for a, b in zip(shape[2:], (8, 9))) == [0, 1]
    assert result.failing_case.distribution == "normal"


def test_flattening_model_keeps_its_spatial_size():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5))
    model = randomize_bn(model).eval()
    x = torch.randn(3, 2, 6, 6)
    assert set(probe_free_sizes(model, (x,))) == {(0, 0)}
    fused = repc.compile(model, x)
    result = verify(model, fused, x, max_examples=10)
    assert result.ok, str(result)
    assert {s[0][1:] for s in result.shapes_checked} == {(2, 6, 6)}
    assert len({s[0][0] for s in result.shapes_checked}) > 1


def test_token_axis_is_varied_for_sequence_models():
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 6)).eval()
    x = torch.randn(2, 5, 6)
    free = probe_free_sizes(model, (x,))
    assert set(free) == {(0, 0), (0, 1)}
    assert verify(model, repc.compile(model, x), x, max_examples=10).ok


# --------------------------------------------------------------------------- tolerance and dtypes

def _slightly_off(model: nn.Conv2d, rel: float) -> nn.Module:
    off = copy.deepcopy(model)
    with torch.no_grad():
        off.weight.mul_(1 + rel)
        off.bias.mul_(1 + rel)
    return off


def test_tolerance_is_sqrt_eps_by_default_and_overridable():
    assert default_tolerance(torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** 0.5)
    assert resolve_tolerance({torch.float16: 0.1}, torch.float16) == 0.1
    assert resolve_tolerance({torch.float16: 0.1}, torch.float32) == default_tolerance(torch.float32)
    assert resolve_tolerance(lambda d: 2e-3, torch.float64) == 2e-3
    model = nn.Conv2d(3, 4, 3).eval()
    off = _slightly_off(model, 1e-3)  # a 0.1% error: beyond float32's sqrt(eps) = 3.5e-4
    x = torch.randn(1, 3, 7, 7)
    assert not verify(model, off, x, max_examples=3).ok
    assert verify(model, off, x, max_examples=3, tolerance=1e-2).ok
    assert verify(model, off, x, max_examples=3, tolerance={torch.float32: 1e-2}).ok
    assert verify(model, off, x, max_examples=3, tolerance=lambda dtype: 1e-2).ok


def test_other_dtypes_are_checked_on_cast_copies():
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4))).eval()
    x = torch.randn(1, 4, 6, 6)
    fused = repc.compile(model, x)
    result = verify(model, fused, x, max_examples=8, dtypes=[None, torch.float64])
    assert result.ok, str(result)
    # a float32 fusion checked in float64 is held to float32's tolerance (its weights are float32)
    assert result.tolerance == pytest.approx(default_tolerance(torch.float32))
    assert all(p.dtype == torch.float32 for p in list(model.parameters()) + list(fused.parameters()))


def test_dtype_cast_needs_modules():
    with pytest.raises(VerificationError, match="not an nn.Module"):
        verify(lambda x: x * 2, lambda x: x + x, torch.randn(3), dtypes=[torch.float64])


# --------------------------------------------------------------------------- bad input

def test_bad_input_is_a_one_line_error():
    model = nn.Conv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(VerificationError, match="not callable"):
        verify(model, 42, x)
    with pytest.raises(VerificationError, match=r"training mode \(1\).*\.eval\(\)"):
        verify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), model, x)
    with pytest.raises(VerificationError, match="fails on the example inputs: RuntimeError"):
        verify(model, model, torch.randn(1, 2, 5, 5))
    with pytest.raises(VerificationError, match="max_examples"):
        verify(model, model, x, max_examples=0)
    with pytest.raises(ValueError, match="unknown value distribution 'uniform'"):
        verify(model, model, x, distributions=("uniform",))


# --------------------------------------------------------------------------- strategies

def test_distributions_have_their_documented_magnitudes():
    gen = torch.Generator().manual_seed(0)
    shape = (4, 256)
    assert large_magnitude(torch.float16) == pytest.approx(65504 ** 0.25)
    assert small_magnitude(torch.float32) == 1e-4
    values = {d: draw_values(shape, d, torch.float32, gen) for d in DISTRIBUTIONS}
    assert values["zeros"].abs().max() == 0
    assert values["positive"].min() >= 0
    assert 500 < values["large"].std() < 2000
    assert 5e-5 < values["near_zero"].std() < 2e-4
    assert 0.5 < values["normal"].std() < 2
    assert draw_values(shape, "normal", torch.bfloat16, gen).dtype == torch.bfloat16


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_input_cases_vary_only_free_axes_and_tie_the_batch(data):
    example = (torch.randn(2, 3, 8, 8), torch.randn(2, 5), 7)
    free = {(0, 0): (2, 1, 3), (0, 2): (8, 7, 9), (1, 0): (2, 1, 3)}
    case = data.draw(input_cases(example, free))
    a, b, c = case.materialize(example)
    assert a.shape[1] == 3 and a.shape[3] == 8 and a.shape[2] in (8, 7, 9)
    assert a.shape[0] == b.shape[0] in (1, 2, 3)  # one batch size for both inputs
    assert b.shape[1] == 5 and c == 7
    assert case.distribution in DISTRIBUTIONS


def test_example_case_materializes_the_example_itself():
    x = torch.randn(2, 3)
    case = InputCase(((2, 3),), "example", torch.float64)
    (y,) = case.materialize((x,))
    assert y.dtype == torch.float64 and torch.equal(y, x.double())
    assert "example" in case.describe()


# --------------------------------------------------------------------------- half precision

def _rms(y: torch.Tensor, truth: torch.Tensor) -> float:
    return float((y.double() - truth).norm() / truth.norm())


@pytest.mark.parametrize("graph", [None, True])  # (the default output, and the whole-model graph)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_fusion_is_no_further_from_float64_truth(dtype, graph):
    """Merged in float64 and cast once, a half-precision fused model is as close to the exact
    function of the half-precision weights as the unfused half-precision model is."""
    model = copy.deepcopy(example_net()).to(dtype)
    fused = repc.compile(model, torch.randn(2, 3, 32, 32).to(dtype), graph=graph)
    report = fused.repc_report
    assert report.rewrites and report.verification.ok, str(report)
    assert all(p.dtype == dtype for p in fused.parameters())
    truth_model = copy.deepcopy(model).double()
    worst_ratio_max, rms_fused, rms_unfused = 0.0, 0.0, 0.0
    with torch.no_grad():
        for seed in range(4):
            x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)
            truth = truth_model(x.double())
            unfused, merged = model(x), fused(x)
            worst_ratio_max = max(worst_ratio_max, deviation(merged, truth) / deviation(unfused, truth))
            rms_fused += _rms(merged, truth)
            rms_unfused += _rms(unfused, truth)
    assert rms_fused <= 1.5 * rms_unfused, (rms_fused, rms_unfused)
    assert worst_ratio_max <= 2.0
    assert verify(model, fused, torch.randn(2, 3, 32, 32).to(dtype), max_examples=6).ok


# --------------------------------------------------------------------------- rounding-noise floor

class _Cancelling(nn.Module):
    """Two equal rows, then their difference: the output is the bias alone, and any re-rounding
    of the weights leaves a residue proportional to the (large) activations."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 2)
        self.fc2 = nn.Linear(2, 1)
        with torch.no_grad():
            self.fc1.weight[1] = self.fc1.weight[0]
            self.fc1.bias[1] = self.fc1.bias[0]
            self.fc2.weight.copy_(torch.tensor([[1.0, -1.0]]))
            self.fc2.bias.fill_(1e-3)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _rerounded(model: _Cancelling) -> nn.Module:
    """What a merge does to weights: one row re-rounded by an ulp."""
    fused = copy.deepcopy(model)
    with torch.no_grad():
        fused.fc1.weight[1] = torch.nextafter(fused.fc1.weight[1], torch.full((4,), 2.0))
    return fused


def test_noise_floor_accepts_rounding_in_ill_conditioned_cases_only():
    torch.manual_seed(0)
    model = _Cancelling().eval()
    x = torch.randn(3, 4)
    rerounded = _rerounded(model)
    strict = verify(model, rerounded, x, max_examples=10, distributions=("large",), noise_floor=False)
    assert not strict.ok  # relative to the tiny output, an ulp is a big deviation
    result = verify(model, rerounded, x, max_examples=10, distributions=("large",))
    assert result.ok, str(result)  # the floor decided: the same cases pass
    wrong = copy.deepcopy(rerounded)
    with torch.no_grad():
        wrong.fc2.bias.mul_(1.1)
    assert not verify(model, wrong, x, max_examples=10, distributions=("large",)).ok


class _TwoInputs(nn.Module):
    """An image and a per-pixel bias map of the same batch and size."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(1, 4, 1)

    def forward(self, x, bias_map):
        return self.a(x) + self.b(bias_map)


def test_axes_shared_by_several_inputs_vary_together():
    model = _TwoInputs().eval()
    example = (torch.randn(2, 3, 6, 7), torch.randn(2, 1, 6, 7))
    free = probe_free_sizes(model, example)
    assert {(0, 0), (1, 0), (0, 2), (1, 2), (0, 3), (1, 3)} <= set(free)
    fused = repc.compile(model, example)
    result = verify(model, fused, example, max_examples=10)
    assert result.ok, str(result)
    assert all(a[0] == b[0] and a[2:] == b[2:] for a, b in result.shapes_checked)
    assert len({a for a, _ in result.shapes_checked}) > 3


# --------------------------------------------------------------------------- NaN and Inf (issue 13)

def _conv_bn(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), seed=seed).eval()


class _Poisoned(nn.Module):
    """``inner``, with one output entry replaced by ``value``: a fused model gone wrong."""

    def __init__(self, inner, value):
        super().__init__()
        self.inner, self.value = inner, value

    def forward(self, x):
        y = self.inner(x).clone()
        y[:, 1, 0, 0] = self.value
        return y


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_the_fused_output_where_the_original_is_finite_fails(value):
    model = _conv_bn()
    x = torch.randn(1, 3, 8, 8)
    fused = repc.compile(model, x)
    result = verify(model, _Poisoned(fused, value).eval(), x, max_examples=3)
    assert not result.ok and result.max_deviation == float("inf")
    kind = "NaN" if value != value else "Inf"
    assert result.error == f"the fused model gives {kind} in 1 of 256 entries of the output where the original's are finite"
    assert "FAILED on the example inputs" in str(result) and kind in str(result)


def _nan_statistics():
    model = _conv_bn(1)
    model[1].running_var[2] = float("nan")
    return model


def _inf_weight():
    model = _conv_bn(2)
    with torch.no_grad():
        model[0].weight[1, 0, 1, 1] = float("inf")
    return model


@pytest.mark.parametrize("build, kind", [(_nan_statistics, "NaN"), (_inf_weight, "Inf")])
def test_an_original_giving_nan_or_inf_on_the_example_fails_and_says_so(build, kind):
    model = build()
    x = torch.randn(1, 3, 8, 8)
    state = _state(model)
    fused = repc.compile(model, x)
    assert all(torch.allclose(v, state[k], rtol=0, atol=0, equal_nan=True)
               for k, v in _state(model).items())  # the model was not touched
    # repc kept the region that would have carried the non-finite values into a merged weight
    assert any("would hold" in r.reason for r in fused.repc_report.rejected), str(fused.repc_report)
    for candidate in (fused, copy.deepcopy(model)):  # even a perfect copy is not "verified"
        result = verify(model, candidate, x, max_examples=3)
        assert not result.ok, str(result)
        assert result.error.startswith(f"the original model gives {kind} in ") and "on the example inputs" in result.error
        assert "nothing to compare" in str(result)
        assert result.original_non_finite and result.original_non_finite[0].startswith("the example inputs: ")


def test_nan_in_an_example_input_is_named():
    model = _conv_bn(3)
    x = torch.randn(1, 3, 8, 8)
    fused = repc.compile(model, x)
    bad = x.clone()
    bad[0, 0, 4, 4] = float("nan")
    result = verify(model, fused, bad, max_examples=3)
    assert not result.ok and "an input holds NaN or Inf" in result.error and "NaN in " in result.error
    assert "nothing to compare" in result.error


class _Overflows(nn.Module):
    """Finite on normal values, Inf on large ones: ``exp`` of the input."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.exp(self.lin(x) * 100)


def test_a_drawn_case_where_the_original_overflows_is_listed_as_unverified():
    torch.manual_seed(0)
    model = _Overflows().eval()
    with torch.no_grad():
        model.lin.weight.mul_(0.01)
        model.lin.bias.zero_()
    x = torch.randn(2, 4) * 0.01
    same = copy.deepcopy(model)
    result = verify(model, same, x, max_examples=20, distributions=("normal", "large"))
    assert result.ok, str(result)
    assert result.original_non_finite and all("Inf in " in n for n in result.original_non_finite)
    assert "WARNING: the original model itself gives NaN or Inf" in str(result) and "not verified" in str(result)

    class _ClampsInf(nn.Module):  # gives a finite value where the original overflows
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).clamp(max=1e30)

    result = verify(model, _ClampsInf(same).eval(), x, max_examples=20, distributions=("normal", "large"))
    assert not result.ok and "the original gives Inf in" in result.error and "something else" in result.error
