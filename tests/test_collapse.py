"""The collapse pass (:mod:`repc.passes.collapse`) on captured graphs directly: what it
rewrites, what it keeps and why (by kind), and the capture check before anything is rewritten."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from repc.passes.collapse import CaptureMismatch, collapse
from repc.reasons import RejectionKind

from blocks import conv_bn, randomize


class Branches(nn.Module):
    """A RepVGG-style sum of conv-BN branches, then a ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(3, 3, 3, padding=1), conv_bn(3, 3, 1)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


def _graph(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(randomize(model).eval())


def test_a_branch_sum_becomes_one_conv_and_computes_the_same():
    model = randomize(Branches()).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    result = collapse(gm, (x,))
    convs = [m for m in result.module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())
    (rewrite,) = result.rewrites
    assert {"sum", "compose"} <= set(rewrite.rule.split("+")) and rewrite.flops_after <= rewrite.flops_before
    torch.testing.assert_close(result.module(x), want, rtol=1e-5, atol=1e-5)
    y = torch.randn(3, 3, 9, 7)  # another batch and spatial size
    torch.testing.assert_close(result.module(y), model(y), rtol=1e-5, atol=1e-5)


def test_a_bottleneck_that_does_not_pay_is_kept_with_its_kind():
    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = nn.Linear(64, 2), nn.Linear(2, 64)

        def forward(self, x):
            return self.up(self.down(x))

    gm = _graph(Bottleneck())
    result = collapse(gm, (torch.randn(4, 64),))
    assert not result.rewrites
    assert [r.kind for r in result.rejections] == [RejectionKind.DOES_NOT_PAY], result.rejections
    assert "does not pay" in result.rejections[0].reason


def test_a_gate_from_the_data_is_reported_as_such():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.value, self.gate = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.value(x) * torch.sigmoid(self.gate(x))

    result = collapse(_graph(Gated()), (torch.randn(3, 8),))
    assert any(r.kind is RejectionKind.DATA_GATE and "router" in r.reason for r in result.rejections)


class WriteThroughAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.a(x) * 2
        y[:, :1].mul_(3)  # a write through a view: y stays where it is
        return y + 1


def test_a_write_in_place_through_a_view_says_that_it_stops_a_region():
    model = randomize(WriteThroughAView()).eval()
    x = torch.randn(1, 3, 5, 5)
    want = model(x)
    result = collapse(fx.symbolic_trace(model), (x,))
    assert any(r.kind is RejectionKind.STOPS_REGION and "in place through a view" in r.reason
               for r in result.rejections), result.rejections
    assert torch.allclose(result.module(x), want, atol=1e-6)


def test_a_graph_that_computes_something_else_than_the_model_is_refused_before_any_rewrite():
    gm = _graph(Branches())
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(CaptureMismatch, match="differs from the model"):
        collapse(gm, (x,), expected_output=gm(x) + 1)


def test_without_the_check_the_same_rewrites_are_made():
    x = torch.randn(2, 3, 6, 6)
    checked, unchecked = collapse(_graph(Branches()), (x,)), collapse(_graph(Branches()), (x,), check=False)
    assert [r.root for r in checked.rewrites] == [r.root for r in unchecked.rewrites]
    assert unchecked.rewrites[0].max_deviation == 0.0 < checked.rewrites[0].max_deviation


class MixedPrecisionAdapter(nn.Module):
    """peft's LoRA in float32 beside a bfloat16 layer: the input cast up for the adapter, the sum
    in float32, cast back to bfloat16 where ``cast_back``."""

    def __init__(self, cast_back: bool):
        super().__init__()
        self.base = nn.Linear(16, 12).to(torch.bfloat16)
        self.down, self.up = nn.Linear(16, 3, bias=False), nn.Linear(3, 12, bias=False)
        self.cast_back = cast_back

    def forward(self, x):
        out = self.base(x) + self.up(self.down(x.float())) * 0.5
        return out.to(x.dtype) if self.cast_back else out


@pytest.mark.parametrize("cast_back", [True, False])
def test_casts_between_float_dtypes_merge_as_the_identity_and_the_merged_op_computes_in_the_outputs_dtype(cast_back):
    model = randomize(MixedPrecisionAdapter(cast_back)).eval()
    x = torch.randn(4, 16).to(torch.bfloat16)
    want = model(x)
    result = collapse(fx.symbolic_trace(model), (x,))
    (rewrite,) = result.rewrites
    (linear,) = [m for m in result.module.modules() if isinstance(m, nn.Linear)]
    assert linear.weight.dtype == want.dtype  # (bfloat16 cast back, else float32 from a cast of x)
    casts = [n for n in result.module.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert len(casts) == (0 if cast_back else 1)
    for y in (x, torch.randn(2, 5, 16).to(torch.bfloat16)):
        got, expected = result.module(y), model(y)
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


class UpcastScale(nn.Module):
    """peft's IA3 on a bfloat16 layer's input: the input cast up to the float32 scale's dtype,
    scaled, cast back, then the layer."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(16, 12).to(torch.bfloat16)
        self.register_buffer("scale", torch.randn(16))

    def forward(self, x):
        return self.base((torch.relu(x).to(torch.float32) * self.scale).to(x.dtype))


def test_a_cast_up_at_a_regions_edge_is_part_of_it_and_the_merged_linear_reads_the_value_before_it():
    # (exact: the region reads the bfloat16 value and computes in bfloat16, with no casts)
    model = randomize(UpcastScale()).eval()
    x = torch.randn(4, 16).to(torch.bfloat16)
    result = collapse(fx.symbolic_trace(model), (x,))
    (rewrite,) = result.rewrites
    assert not [n for n in result.module.graph.nodes if n.op == "call_method" and n.target == "to"]
    (linear,) = [m for m in result.module.modules() if isinstance(m, nn.Linear)]
    assert linear.weight.dtype == torch.bfloat16
    want = model(x)
    torch.testing.assert_close(result.module(x).float(), want.float(), rtol=2e-2, atol=2e-2 * want.abs().max().item())
