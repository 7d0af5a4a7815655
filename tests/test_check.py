"""repc/verify/check.py: the differential check inside repc.compile."""

import copy

import torch
import torch.nn as nn

from repc.verify.check import compare, deviation, input_variants, perturbed_copies, quiet_call


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


def test_identical_models_pass_on_every_variant():
    model = _model()
    result = compare(copy.deepcopy(model), model, (torch.randn(2, 3, 6, 6),))
    assert result.ok and result.max_deviation == 0.0
    assert result.checked == ["example", "random", "batch+1", "spatial+3"]


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
    for name, inputs in input_variants((x, task), fixed={1}):
        assert inputs[1] is task, name


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
