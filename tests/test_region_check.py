"""The per-region check (:mod:`repc.verify.region_check`): each merged form against its region
as written, on small random inputs where the region takes them."""

from __future__ import annotations

import torch
import torch.nn as nn

import repc
import repc.verify.region_check as region_check
from repc.examples import RepVGGBlock, randomize_bn
from repc.ops import Elementwise
from repc.reasons import RejectionKind
from repc.verify.region_check import RegionRunner, non_finite_weights


def test_a_merged_op_giving_nan_where_the_region_is_finite_is_rolled_back(monkeypatch):
    built = region_check.form_function

    def poisoned(form, dtype, device):
        run = built(form, dtype, device)

        def with_nan(*inputs):
            out = run(*inputs)
            out.view(-1)[0] = float("nan")
            return out
        return with_nan

    monkeypatch.setattr(region_check, "form_function", poisoned)
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4))).eval()
    fused = repc.compile(model, torch.randn(1, 4, 8, 8))
    report = fused.repc_report
    assert not report.rewrites
    assert any(r.kind is RejectionKind.CHECK_FAILED and "gives NaN" in r.reason
               and "where the region as written is finite" in r.reason for r in report.rejected), str(report)


def _recorded_region_shapes(monkeypatch):
    """The shapes of the source values every region check runs its region on, as they come."""
    shapes = []
    run_region = RegionRunner.run

    def recording(self, expr, sources, exact=False):
        shapes.extend(tuple(v.shape) for v in sources.values())
        return run_region(self, expr, sources, exact)

    monkeypatch.setattr(RegionRunner, "run", recording)
    return shapes


def test_region_checks_run_on_small_random_maps(monkeypatch):
    shapes = _recorded_region_shapes(monkeypatch)
    model = randomize_bn(nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 4))).eval()
    fused = repc.compile(model, torch.randn(1, 4, 32, 32))
    assert len(fused.repc_report.rewrites) == 2
    assert shapes and set(shapes) == {(2, 4, 7, 7)}


def test_region_checks_on_token_sequences_run_on_seven_tokens(monkeypatch):
    shapes = _recorded_region_shapes(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 8)).eval()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.uniform_(-1, 1)
    fused = repc.compile(model, torch.randn(1, 50, 16))
    assert len(fused.repc_report.rewrites) == 2  # the norm's affine into the first linear; the last two linears
    assert shapes and all(s[:2] == (2, 7) for s in shapes), shapes


def test_non_finite_weights_names_the_tensor_and_the_cause():
    finite = {None: Elementwise(torch.ones(1, 3, 1, 1, dtype=torch.float64), None, (1, 3, 4, 4))}
    assert non_finite_weights(finite, torch.float32) is None
    scale = torch.ones(1, 3, 1, 1, dtype=torch.float64)
    scale[0, 1] = float("nan")
    why = non_finite_weights({None: Elementwise(scale, None, (1, 3, 4, 4))}, torch.float32)
    assert "scale" in why and "NaN" in why and "non-finite weights" in why
    large = torch.full((1, 3, 1, 1), 1e6, dtype=torch.float64)
    why = non_finite_weights({None: Elementwise(large, None, (1, 3, 4, 4))}, torch.float16)
    assert "Inf" in why and "too large for float16" in why
