"""Experts Weights Averaging (``repc.passes.average_experts``), reached through ``repc.compile``.

A mixture of identical nonlinear FFN experts (EWA) compiles exactly by default, the experts
kept.  With ``allow_approximate=True`` it becomes one expert with the averaged weights; the
report marks that rewrite approximate with the deviation measured against the original, and
that deviation is what the user sees.  An ``approximate_tolerance`` tighter than the deviation
rolls the averaging back.  Experts that are not identical, and data-dependent routers, are
never averaged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import repc
import linear_blocks as lb
from linear_blocks import called_modules, compile_exact, input_variants, op_counts, rel_dev, snapshot, assert_unchanged


def tokens(b=2, n=5, d=16):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(21))


def measured_deviation(fused, model, x) -> float:
    """Largest relative deviation of ``fused`` from ``model`` on the example and its variants."""
    with torch.no_grad():
        return max(rel_dev(fused(*inputs), model(*inputs)) for inputs in [(x,)] + list(input_variants((x,))))


def averaged(model, x, **options):
    before = snapshot(model)
    fused = repc.compile(model, (x,), allow_approximate=True, **options)  # the default output
    lb.EXAMPLES[fused] = (x,)  # (its ops counted as it runs on the example)
    assert_unchanged(model, before)
    assert not fused.repc_report.rolled_back, str(fused.repc_report)
    return fused


@pytest.mark.parametrize("form", ["mean", "sum"])
def test_ewa_mixture_compiles_exactly_by_default_and_keeps_its_experts(form):
    torch.manual_seed(0)
    model = lb.EWAMoE(16, 32, n=4, spread=1e-2, form=form).eval()
    fused = compile_exact(model, tokens())
    counts = op_counts(fused)
    assert counts["GELU"] == 4, counts  # every expert's nonlinearity is still there
    assert counts["linear"] >= 5, counts  # 4 fc1 (the fc2s may merge exactly over the sum)
    report = fused.repc_report
    assert all(r.exact for r in report.rewrites), str(report)
    assert "average-experts" not in {r.rule for r in report.rewrites}
    assert report.verification.max_deviation < 1e-6, report.verification


@pytest.mark.parametrize("form", ["mean", "sum"])
def test_ewa_mixture_is_averaged_on_request_with_the_measured_deviation(form):
    torch.manual_seed(0)
    model = lb.EWAMoE(16, 32, n=4, spread=1e-2, form=form).eval()
    x = tokens()
    fused = averaged(model, x)
    counts = op_counts(fused)
    assert counts["GELU"] == 1 and counts["linear"] == 2, counts  # one expert left
    fc1, fc2 = called_modules(fused)
    assert torch.allclose(fc1.weight, torch.stack([e.fc1.weight for e in model.experts]).mean(0), atol=1e-6)
    assert torch.allclose(fc2.bias, torch.stack([e.fc2.bias for e in model.experts]).mean(0), atol=1e-6)
    report = fused.repc_report
    (rewrite,) = [r for r in report.rewrites if r.rule == "average-experts"]
    assert rewrite.exact is False
    assert rewrite.params_after * 4 == rewrite.params_before, rewrite
    actual = measured_deviation(fused, model, x)
    assert actual > 1e-7  # it really is an approximation
    assert rewrite.max_deviation > 0
    assert actual / 5 <= rewrite.max_deviation <= actual * 5, (rewrite.max_deviation, actual)
    assert "APPROXIMATE" in str(report)


def test_deviation_grows_with_how_far_apart_the_experts_are():
    torch.manual_seed(0)
    x = tokens()
    close, far = (averaged(lb.EWAMoE(spread=s).eval(), x).repc_report for s in (1e-3, 1e-1))
    dev_close = next(r.max_deviation for r in close.rewrites if not r.exact)
    dev_far = next(r.max_deviation for r in far.rewrites if not r.exact)
    assert dev_far > 10 * dev_close, (dev_close, dev_far)


@pytest.mark.parametrize("form", ["mean", "sum"])
def test_tolerance_tighter_than_the_deviation_rolls_the_averaging_back(form):
    torch.manual_seed(0)
    model = lb.EWAMoE(16, 32, n=4, spread=1e-2, form=form).eval()
    x = tokens()
    deviation = next(r.max_deviation for r in averaged(model, x).repc_report.rewrites if not r.exact)
    fused = compile_exact(model, x, allow_approximate=True, approximate_tolerance=deviation / 10)
    assert op_counts(fused)["GELU"] == 4
    report = fused.repc_report
    assert all(r.exact for r in report.rewrites), str(report)
    assert any("approximate_tolerance" in r.reason for r in report.rejected), str(report)


def test_tolerance_looser_than_the_deviation_keeps_the_averaging():
    torch.manual_seed(0)
    model = lb.EWAMoE(16, 32, n=4, spread=1e-2).eval()
    x = tokens()
    fused = averaged(model, x, approximate_tolerance=1e-2)
    assert op_counts(fused)["GELU"] == 1
    assert any(not r.exact for r in fused.repc_report.rewrites)


def test_experts_of_different_architectures_are_not_averaged():
    class Different(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = lb.FFNExpert(16, 32)
            self.b = lb.FFNExpert(16, 24)

        def forward(self, x):
            return (self.a(x) + self.b(x)) / 2

    torch.manual_seed(0)
    fused = compile_exact(Different().eval(), tokens(), allow_approximate=True)
    assert op_counts(fused)["GELU"] == 2
    report = fused.repc_report
    assert all(r.exact for r in report.rewrites), str(report)
    assert any("no mixture of identical experts" in r.reason for r in report.rejected), str(report)


def test_topk_router_is_not_averaged_even_when_allowed():
    torch.manual_seed(0)
    model = lb.TopKRouterMoE(12, n=4, k=2).eval()
    fused = compile_exact(model, tokens(d=12), allow_approximate=True)
    assert op_counts(fused)["linear"] == 5
    assert not fused.repc_report.rewrites, str(fused.repc_report)


def test_averaged_mixture_then_exact_merges_around_it():
    """Averaging and the exact rules compose: the BN on tokens and the head fold into the
    averaged expert's fc2 / the following linear; only the averaging is marked approximate."""
    class MoEThenHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = lb.EWAMoE(16, 32, n=3, spread=1e-2)
            self.norm = nn.BatchNorm1d(16)
            self.head = nn.Linear(16, 8)

        def forward(self, x):
            return self.head(lb.bn_tokens(self.norm, self.moe(x)))

    torch.manual_seed(0)
    model = lb.randomize(MoEThenHead())
    x = tokens()
    fused = averaged(model, x)
    counts = op_counts(fused)
    assert counts["GELU"] == 1 and counts["bn"] == 0, counts
    report = fused.repc_report
    approximate = [r for r in report.rewrites if not r.exact]
    assert len(approximate) == 1 and approximate[0].rule == "average-experts", str(report)
    assert any(r.exact for r in report.rewrites), str(report)
    assert measured_deviation(fused, model, x) <= 5 * approximate[0].max_deviation


def test_two_moe_layers_are_averaged_separately():
    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = lb.EWAMoE(16, 32, n=3, seed=1)
            self.second = lb.EWAMoE(16, 32, n=2, seed=2)

        def forward(self, x):
            return self.second(torch.relu(self.first(x)))

    torch.manual_seed(0)
    model = TwoLayers().eval()
    x = tokens()
    fused = averaged(model, x)
    counts = op_counts(fused)
    assert counts["GELU"] == 2 and counts["linear"] == 4, counts
    report = fused.repc_report
    averaged_rewrites = [r for r in report.rewrites if r.rule == "average-experts"]
    assert len(averaged_rewrites) == 2 and not any(r.exact for r in averaged_rewrites), str(report)
    assert measured_deviation(fused, model, x) <= 5 * max(r.max_deviation for r in averaged_rewrites)


def test_functional_experts_with_raw_parameters_are_averaged():
    """Experts written with ``F.linear`` on their own parameters: the parameters are averaged."""
    class FunctionalFFN(nn.Module):
        def __init__(self, like=None):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(32, 16) * 0.2), nn.Parameter(torch.randn(32))
            self.w2, self.b2 = nn.Parameter(torch.randn(16, 32) * 0.2), nn.Parameter(torch.randn(16))
            if like is not None:
                with torch.no_grad():
                    for p, q in zip(self.parameters(), like.parameters()):
                        p.copy_(q + 1e-3 * torch.randn_like(q))

        def forward(self, x):
            return F.linear(F.gelu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)

    class Mixture(nn.Module):
        def __init__(self):
            super().__init__()
            shared = FunctionalFFN()
            self.experts = nn.ModuleList(FunctionalFFN(shared) for _ in range(3))

        def forward(self, x):
            return sum(e(x) for e in self.experts) / 3

    torch.manual_seed(0)
    model = Mixture().eval()
    x = tokens()
    fused = averaged(model, x)
    counts = op_counts(fused)
    assert counts["gelu"] == 1 and counts["linear"] == 2, counts
    (rewrite,) = [r for r in fused.repc_report.rewrites if r.rule == "average-experts"]
    actual = measured_deviation(fused, model, x)
    assert 0 < actual <= 5 * rewrite.max_deviation and rewrite.max_deviation <= 5 * actual
