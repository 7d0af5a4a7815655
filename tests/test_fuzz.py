"""The architecture fuzzer: random branchy networks compiled by repc, compared on other shapes.

Networks come from :func:`fuzz_networks.networks` (kernels 1x1..5x5 incl. 1xk/kx1,
strides, dilation, groups, bias with padding, BN-and-pad, pools, identity and shared
branches, scales, identity-like and nonlinear activations, concatenations, repeated blocks,
linear tails).  The number of networks comes from the Hypothesis profile selected by
``REPC_FUZZ_PROFILE`` (see tests/fuzz_profiles.py).  A failure shrinks to a minimal network
spec; keep it as a plain test in tests/regressions/.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import event, given, target
from hypothesis import strategies as st

import repc
import repc.algebra
from fuzz_networks import NetworkSpec, accepted_channels, accepted_sizes, build_network, example_input, networks, output_size
from fuzz_profiles import fuzz_settings
from repc.examples import randomize_bn
from repc.verify.equivalence import ModelPair, check_case, verify
from repc.verify.strategies import DISTRIBUTIONS, InputCase

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def other_cases(spec: NetworkSpec):
    """Input cases whose shape differs from the example's (batch and/or spatial sizes)."""
    heights = accepted_sizes(spec, 0, spec.size[0] + 5)
    widths = accepted_sizes(spec, 1, spec.size[1] + 5)
    example = (spec.batch, spec.in_channels) + tuple(spec.size)
    shapes = [(b, spec.in_channels, h, w) for b in (1, 2, 3) for h in heights for w in widths]
    shapes = sorted((s for s in shapes if s != example), key=lambda s: sum(abs(a - b) for a, b in zip(s, example)))
    return st.builds(lambda shape, dist, seed: InputCase((shape,), dist, None, seed),
                     st.sampled_from(shapes), st.sampled_from(DISTRIBUTIONS), st.integers(0, 2 ** 16))


@fuzz_settings()
@given(spec=networks(), data=st.data())
def test_compiled_network_matches_the_original_on_other_shapes(spec, data):
    model = build_network(spec)
    x = example_input(spec)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    # a whole-model rollback would mean a region passed its own check and still changed the
    # model (or the check misjudged rounding noise): both are bugs
    assert report.verification.ok and not report.rolled_back, f"{spec!r}\n{report}"
    assert not report.skipped, f"the fuzz network traces whole: {spec!r}\n{report}"
    event(f"rewrites: {min(len(report.rewrites), 5)}{'+' if len(report.rewrites) >= 5 else ''}")
    target(float(len(report.rewrites)), label="rewrites")
    models = ModelPair(model, fused)
    for _ in range(2):
        case = data.draw(other_cases(spec), label="case")
        result = check_case(models, (x,), case)
        assert not result.skipped, f"the generator's size bookkeeping is wrong: {spec!r} rejects {case}"
        assert result.ok, f"{spec!r}\non {case.describe()}: {result.error or result.deviation}\n{report}"


@fuzz_settings(scale=0.5)
@given(spec=networks())
def test_generated_networks_accept_every_size_they_claim(spec):
    """The generator's size bookkeeping: the branches of every block agree on every size, and
    the generator knows whether the network takes one more input channel."""
    model = build_network(spec)
    with torch.no_grad():
        for h in accepted_sizes(spec, 0, spec.size[0] + 3)[-3:]:
            for w in accepted_sizes(spec, 1, spec.size[1] + 3)[-2:]:
                out = model(torch.randn(1, spec.in_channels, h, w))
                if spec.tail is None:
                    assert tuple(out.shape[2:]) == (output_size(spec, h, 0), output_size(spec, w, 1))
        # one channel more: rejected, or accepted with the output channels the generator says
        # (slices of a split, pools and broadcast scales take extra channels)
        feature_axis = 1 if spec.tail is None else -1
        assert accepted_channels(spec, spec.in_channels) == model(example_input(spec)).shape[feature_axis]
        extra = torch.randn(1, spec.in_channels + 1, *spec.size)
        channels = accepted_channels(spec, spec.in_channels + 1)
        if channels is None:
            with pytest.raises(Exception):
                model(extra)
        else:
            assert model(extra).shape[feature_axis] == channels, repr(spec)


# --------------------------------------------------------------------------- planted bugs

class _TwoBlocks(nn.Module):
    """A RepVGG-like block (3x3 + 1x1 branches: different kernel sizes), an ACNet-like block of
    two 3x3 branches (equal sizes), a linear tail."""

    def __init__(self, c=4):
        super().__init__()
        self.a3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.a1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=2), nn.BatchNorm2d(c))
        self.b2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.fc1 = nn.Linear(c, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.a3(x) + self.a1(x))
        x = torch.relu(self.b1(x) + self.b2(x))
        return self.fc2(self.fc1(x.mean((2, 3))))


def _misplaced_add_convs(real):
    """add_convs with the classic bug: a smaller kernel lands in the top-left corner of the big
    one instead of at its offset (exact only when the kernels have the same size)."""

    def add_convs(a, b):
        merged = real(a, b)
        if a.kernel_size == b.kernel_size:
            return merged
        small, big = (a, b) if a.weight[0, 0].numel() < b.weight[0, 0].numel() else (b, a)
        w = repc.algebra.regroup(big.weight, big.groups, merged.groups).clone()
        sw = repc.algebra.regroup(small.weight, small.groups, merged.groups)
        w[(Ellipsis,) + tuple(slice(0, k) for k in small.kernel_size)] += sw
        return merged.replace(weight=w)

    return add_convs


def test_planted_wrong_closed_form_is_rolled_back_per_region(monkeypatch):
    model = randomize_bn(_TwoBlocks()).eval()
    x = torch.randn(2, 4, 8, 8)
    honest = repc.compile(model, x).repc_report
    honest_roots = {r.root for r in honest.rewrites}
    monkeypatch.setattr(repc.algebra, "add_convs", _misplaced_add_convs(repc.algebra.add_convs))
    fused = repc.compile(model, x)
    report = fused.repc_report
    rolled = [r for r in report.rejected if "rolled back" in r.reason]
    assert rolled, str(report)
    # the region of the first block (3x3 + 1x1) is the one undone, and the report says on what input
    assert all(r.root in honest_roots for r in rolled)
    assert any("deviation" in r.reason and "input" in r.reason for r in rolled), str(report)
    rolled_roots = {r.root for r in rolled}
    kept = {r.root for r in report.rewrites}
    assert honest_roots - rolled_roots <= kept, str(report)  # the equal-kernel block and the tail still merge
    assert not kept & rolled_roots
    assert len(rolled_roots) == 1, str(report)  # only the 3x3 + 1x1 block sums kernels of different sizes
    assert report.verification.ok and not report.rolled_back
    assert verify(model, fused, x, max_examples=10).ok


def test_planted_wrong_batchnorm_fold_is_caught_where_batchnorms_fold(monkeypatch):
    """A BN closed form that forgets eps (visible with eps=0.5): every region containing a BN is
    rolled back, the BN-free regions still merge, and the result is still exact."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4, eps=0.5)
            self.c3 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.c1(x) + self.c2(x))  # no BN here: merges
            return self.bn(self.c3(y))  # conv-BN fold: must be rolled back

    real = repc.algebra.batchnorm_affine
    monkeypatch.setattr(repc.algebra, "batchnorm_affine",
                        lambda mean, var, eps, weight, bias: real(mean, var, 0.0, weight, bias))
    model = randomize_bn(Net()).eval()
    x = torch.randn(1, 3, 6, 6)
    fused = repc.compile(model, x)
    report = fused.repc_report
    assert any("rolled back" in r.reason for r in report.rejected), str(report)
    assert len(report.rewrites) == 1 and "sum" in report.rewrites[0].rule, str(report)
    assert report.verification.ok
    with torch.no_grad():
        y = torch.randn(2, 3, 9, 7)
        assert torch.allclose(fused(y), model(y), atol=1e-5)


def test_fuzz_profile_is_selected_by_environment(monkeypatch):
    import fuzz_profiles
    monkeypatch.delenv("REPC_FUZZ_NETWORKS", raising=False)  # a run's own count (a slow run) overrides both
    monkeypatch.setenv("REPC_FUZZ_PROFILE", "slow")
    assert fuzz_settings().max_examples == fuzz_profiles.SLOW_NETWORKS
    monkeypatch.setenv("REPC_FUZZ_PROFILE", "ci")
    assert fuzz_settings(scale=0.5).max_examples == fuzz_profiles.CI_NETWORKS // 2
    assert fuzz_settings(ci_networks=7).max_examples == 7
    monkeypatch.setenv("REPC_FUZZ_NETWORKS", "40")
    assert fuzz_settings(scale=0.5).max_examples == 20
    assert fuzz_settings(ci_networks=7).max_examples == 40
    monkeypatch.setenv("REPC_FUZZ_PROFILE", "nightly")
    with pytest.raises(ValueError, match="ci or slow"):
        fuzz_settings()
