"""repc/verify/check.py: the differential check inside repc.compile."""

import copy

import torch
import torch.nn as nn

import pytest

from repc.verify.check import SizeProbe, compare, deviation, input_variants, perturbed_copies, probe_sizes, quiet_call


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


def test_identical_models_pass_on_every_variant():
    model = _model()
    result = compare(copy.deepcopy(model), model, (torch.randn(2, 3, 6, 6),))
    assert result.ok and result.max_deviation == 0.0
    # random values at the example's per-sample shape, then another batch and other map sizes
    assert result.checked == ["example", "random 1x3x6x6", "random 1x3x7x7"]
    assert result.skipped == []  # (a map's channels are not varied: merged convs fix them)


def test_a_model_of_fixed_sizes_is_checked_once_at_another_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    result = compare(copy.deepcopy(model), model, (torch.randn(1, 3, 6, 6),))
    # random values at the example's per-sample shape at batch 2 stand for those at batch 1 too
    assert result.ok and result.checked == ["example", "random 2x3x6x6"]
    assert result.skipped == ["axis 2 (size 6)", "axis 3 (size 6)"]
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong[2].bias[1] += 1e-2
    failed = compare(wrong, model, (torch.randn(1, 3, 6, 6),))
    assert not failed.ok and failed.failing_input == "example"


def test_a_wrong_bias_is_caught_and_not_excused_as_rounding_noise():
    model = _model()
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong[2].bias.add_(1e-2)
    result = compare(wrong, model, (torch.randn(2, 3, 6, 6),))
    assert not result.ok and result.failing_input == "example" and not result.within_noise


def test_rounding_noise_floor_excuses_only_what_an_ulp_of_the_weights_does():
    model = _model()
    x = (torch.randn(2, 3, 6, 6),)
    noisy = perturbed_copies(model, count=1, seed=5)[0]  # the weights moved by an ulp
    tiny = compare(noisy, model, x, tol=0.0)  # an explicit tolerance is taken as it is
    assert not tiny.ok
    assert compare(noisy, model, x).ok  # default tolerance: well within it anyway
    for c in perturbed_copies(model, count=2):
        for t_orig, t_copy in zip(model.parameters(), c.parameters()):
            ratio = (t_copy / t_orig)[t_orig != 0]
            assert ((ratio - 1).abs() <= 2 * torch.finfo(torch.float32).eps).all()


def test_specialized_positions_stay_as_given():
    x, task = torch.randn(2, 3, 4, 4), torch.tensor([1.0, 0.0])
    for variant in input_variants((x, task), fixed={1}, original=lambda x, task: x * task.sum()):
        assert variant.inputs[1] is task, variant.name
    assert len(input_variants((x, task), fixed={1}, original=lambda x, task: x * task.sum())) == 3


def test_deviation_is_relative_and_structure_sensitive():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert abs(deviation(a + 0.04, a) - 0.01) < 1e-7  # 0.04 against a largest magnitude of 4
    assert deviation((a,), [a]) == float("inf")
    assert deviation(a[:2], a) == float("inf")


def test_graph_modules_that_reject_a_trial_size_are_skipped_without_printing_their_code(capfd):
    class FixedSizeHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 3 * 6 * 6))

        def forward(self, x):  # the failing call is in the generated code itself, not in a submodule
            return torch.nn.functional.linear(x.flatten(1), self.weight)

    torch.manual_seed(0)
    traced = torch.fx.symbolic_trace(FixedSizeHead())  # accepts 6x6 maps only, like the backend's frozen graphs
    result = compare(traced, copy.deepcopy(traced), (torch.randn(2, 3, 6, 6),))
    assert result.ok and result.skipped  # the other spatial sizes do not fit the linear head
    assert capfd.readouterr().err == ""
    try:
        quiet_call(traced, (torch.randn(1, 3, 5, 5),))
    except RuntimeError as why:
        assert "shapes cannot be multiplied" in str(why)  # the error itself still propagates
    else:
        raise AssertionError("a 5x5 map should not fit the linear head")
    assert capfd.readouterr().err == ""


def test_fx_immutable_containers_compare_like_plain_ones():
    from torch.fx.immutable_collections import immutable_dict, immutable_list
    t = torch.randn(3)
    assert deviation(immutable_dict({"a": t, "b": immutable_list([t, t])}), {"a": t, "b": [t, t]}) == 0.0
    assert deviation({"a": t}, {"b": t}) == float("inf")  # other keys are still another structure


# ----------------------------------------------------------------------------- which sizes

class Calls(nn.Module):
    """Wraps a model and records the input shapes of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, *xs):
        self.shapes.append(tuple(tuple(x.shape) for x in xs if isinstance(x, torch.Tensor)))
        return self.model(*xs)


class Tokens(nn.Module):
    """(B, T, d) tokens with an additive (B, T) mask: T is free, d is not."""

    def __init__(self, d=16):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x, mask):
        return self.proj(x) + mask.unsqueeze(-1)


def test_token_inputs_vary_the_sequence_length_not_the_width_and_tied_axes_together():
    torch.manual_seed(0)
    model = Tokens().eval()
    x, mask = torch.randn(3, 12, 16), torch.randn(3, 12)
    skipped = []
    variants = input_variants((x, mask), original=model, skipped=skipped)
    shapes = [tuple(tuple(t.shape) for t in v.inputs) for v in variants]
    # the example, random values at a smaller batch, then another batch and T: the mask follows x
    assert shapes == [((3, 12, 16), (3, 12)), ((2, 12, 16), (2, 12)), ((2, 7, 16), (2, 7))]
    assert skipped == ["axis 2 (size 16)"]
    assert variants[1].reference is not None and variants[2].reference is not None  # probed: not run again
    result = compare(copy.deepcopy(model), model, (x, mask))
    assert result.ok and result.checked == ["example", "random 2x12x16, 2x12", "random 2x7x16, 2x7"]


def test_a_wrong_merge_on_another_sequence_length_is_caught():
    """The old spatial+3 variant grew d on (B, T, d) inputs, which the model rejects, so no other
    T was ever tried; a result that is only right at the example's T must fail."""
    torch.manual_seed(0)
    model = Tokens().eval()
    x, mask = torch.randn(1, 12, 16), torch.randn(1, 12)

    class RightAtTwelveOnly(nn.Module):
        def forward(self, x, mask):
            out = model(x, mask)
            return out if x.shape[1] == 12 else out + 1

    result = compare(RightAtTwelveOnly(), model, (x, mask))
    assert not result.ok and result.failing_input == "random 2x7x16, 2x7"


def test_square_only_maps_vary_both_axes_together():
    class Square(nn.Module):
        def forward(self, x):
            return x + x.transpose(2, 3)

    variants = input_variants((torch.randn(1, 2, 20, 20),), original=Square())
    assert [tuple(v.inputs[0].shape) for v in variants] == [(1, 2, 20, 20), (1, 2, 20, 20), (2, 2, 7, 7)]


def test_other_sizes_are_small_and_the_smallest_the_model_accepts():
    class Patches(nn.Module):  # needs multiples of 16 per axis, like a ViT's patch embedding
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 16, stride=16)

        def forward(self, x):
            return self.embed(x)

    model = Calls(Patches().eval())
    x = torch.randn(8, 3, 128, 128)
    variants = input_variants((x,), original=model)
    assert [tuple(v.inputs[0].shape) for v in variants] == [(8, 3, 128, 128), (2, 3, 128, 128), (2, 3, 16, 16)]
    # probing never ran the model at the example's size or larger (the batch of 8 included)
    assert all(s[0][0] <= 2 and s[0][2] <= 128 and s[0][3] <= 128 for s in model.shapes), model.shapes

    # the random values at the example's per-sample shapes, at the smaller batch, are the probe
    # of the smaller batch: the model is not run at that size a second time
    assert model.shapes.count(((2, 3, 128, 128),)) == 1, model.shapes


def test_the_whole_model_check_costs_a_few_forward_passes_and_reuses_the_expected_output():
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    original, fused = Calls(model), Calls(copy.deepcopy(model))
    result = compare(fused, original, (x,), expected=expected)
    assert result.ok
    passes = lambda calls: sum(b * h * w for (b, _, h, w), in calls.shapes) / (64 * 64)  # in full passes
    # the original: random values at the example's shape, and small probes (its output on the
    # example is reused); the fused model: the example, random values and the small variant
    assert ((1, 3, 64, 64),) in original.shapes and ((1, 3, 64, 64),) in fused.shapes
    assert passes(original) < 1.3, original.shapes
    assert passes(fused) < 2.1, fused.shapes


def test_probe_sizes_is_the_mechanism_of_repc_verify():
    from repc.verify.equivalence import probe_free_sizes

    def candidates(axis, size):  # probe_free_sizes' own candidates
        return [1, size + 1] if axis == 0 else [size - 1, size + 1, size + 2]

    torch.manual_seed(0)
    for model, inputs in ((_model(), (torch.randn(2, 3, 6, 6),)),
                          (Tokens().eval(), (torch.randn(2, 5, 16), torch.randn(2, 5)))):
        assert probe_sizes(model, inputs, candidates) == probe_free_sizes(model, inputs)
    probe = SizeProbe(_model(), (torch.randn(2, 3, 6, 6),))
    assert set(probe.ties) == {(0, 2), (1, 3), (2, 6), (3, 6)}
    assert set(SizeProbe(_model(), (torch.randn(2, 3, 6, 6),), channels=False).ties) == {(0, 2), (2, 6), (3, 6)}


# ----------------------------------------------------------------------------- NaN and Inf

def _conv_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def test_nan_where_the_original_is_finite_is_infinitely_far():
    a = torch.tensor([1.0, 2.0, 4.0])
    assert deviation(torch.tensor([1.0, float("nan"), 4.0]), a) == float("inf")
    assert deviation(torch.tensor([1.0, float("inf"), 4.0]), a) == float("inf")
    both = torch.tensor([1.0, float("nan"), float("-inf")])
    assert deviation(both.clone(), both) == 0.0  # the same non-finite entries: finite ones compared
    assert deviation(torch.tensor([1.0, float("nan"), float("inf")]), both) == float("inf")


@pytest.mark.parametrize("where", ["bn running_var", "conv weight", "example input"])
def test_an_original_giving_nan_or_inf_on_the_example_fails_and_says_so(where):
    model = _conv_bn()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        if where == "bn running_var":
            model[1].running_var[1] = float("nan")
        elif where == "conv weight":
            model[0].weight[2, 0, 1, 1] = float("inf")
        else:
            x[0, 1, 3, 3] = float("nan")
    result = compare(copy.deepcopy(model), model, (x,))  # even an identical copy does not pass
    assert not result.ok and result.failing_input == "example"
    assert "the original model produces" in result.error and "on the example input" in result.error
    assert ("Inf" if where == "conv weight" else "NaN") in result.error
    assert result.max_deviation == float("inf") and result.tolerance > 0


def test_a_result_giving_nan_where_the_original_is_finite_fails():
    model = _conv_bn()

    class NanOnLargeMaps(nn.Module):  # right on the example, NaN on another size
        def forward(self, x):
            out = model(x)
            return out if x.shape[-1] == 8 else out * float("nan")

    result = compare(NanOnLargeMaps(), model, (torch.randn(1, 3, 8, 8),))
    assert not result.ok and result.max_deviation == float("inf")
    assert "the result produces NaN" in result.error and "where the original is finite" in result.error


class TokenModel(torch.nn.Module):
    """Token ids and an attention mask of the same (B, T): an embedding, masked."""

    def __init__(self, vocab=11, d=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)

    def forward(self, ids, mask):
        assert ids.shape == mask.shape
        return self.embed(ids) * mask[..., None]


def test_integer_inputs_vary_together_with_values_drawn_from_the_example():
    ids = torch.tensor([[1, 5, 7, 2, 9, 3, 4, 8], [0, 2, 2, 6, 10, 1, 3, 5]])
    mask = torch.ones(2, 8, dtype=torch.long)
    variants = input_variants((ids, mask), original=TokenModel().eval())
    shapes = {tuple(tuple(t.shape) for t in v.inputs) for v in variants}
    assert any(a[1] != 8 and a == b for a, b in shapes), shapes  # another T, the same for ids and mask
    for v in variants[1:]:
        got_ids, got_mask = v.inputs
        assert got_ids.dtype == torch.long and set(got_ids.unique().tolist()) <= set(ids.unique().tolist())
        assert bool((got_mask == 1).all())
