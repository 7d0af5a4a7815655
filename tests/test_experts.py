"""`repc.compile` on expert mixtures (issue 4): exact merges and specialization.

Uniform and gated sums of linear or conv experts become one linear / conv; RepMode's
task-gated diverse conv experts become one conv per task once ``repc.compile`` specializes
the task argument (a non-tensor example input, or a tensor named in ``specialize=``), and the
specialized model refuses other values.  A data-dependent top-k router is left alone, with the
report saying why.  Averaging of nonlinear experts (EWA) is in :mod:`test_average_experts`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import repc
import linear_blocks as lb
from linear_blocks import called_modules, compile_exact, op_counts, randomize, rel_dev


def tokens(b=2, n=5, d=12):
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(11))


def image(b=2, c=4, h=8, w=8):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(12))


def assert_cheaper(report):
    assert report.rewrites, str(report)
    assert all(r.exact and r.flops_after <= r.flops_before for r in report.rewrites), str(report)
    assert report.flops_saved > 0, str(report)


# ----------------------------------------------------------------------------- linear and conv experts

def _mixture_weights(model):
    """The expert weights the mixture applies: uniform, or the softmax of the gate logits."""
    n = len(model.experts)
    if hasattr(model, "gate_logits"):
        return torch.softmax(model.gate_logits.detach().double(), 0)
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


@pytest.mark.parametrize("block", [lb.StackMeanExperts, lb.SumDivExperts, lb.GatedExperts],
                         ids=["stack_mean", "sum_div_n", "softmax_gate"])
def test_linear_experts_become_one_linear_with_the_weighted_mean_weight(block):
    torch.manual_seed(0)
    model = block(12, 10).eval()
    fused = compile_exact(model, tokens())
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    (linear,) = called_modules(fused)
    g = _mixture_weights(model)
    weight = sum(gi * e.weight.double() for gi, e in zip(g, model.experts))
    bias = sum(gi * e.bias.double() for gi, e in zip(g, model.experts))
    assert torch.allclose(linear.weight.double(), weight, atol=1e-6)
    assert torch.allclose(linear.bias.double(), bias, atol=1e-6)
    assert_cheaper(fused.repc_report)


class _StackedExperts(nn.Module):
    """Linear experts stacked on ``axis`` and reduced over it by ``reduce``."""

    def __init__(self, axis, reduce):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(12, 8) for _ in range(3))
        self.axis, self.reduce = axis, reduce

    def forward(self, x):
        return self.reduce(torch.stack([e(x) for e in self.experts], self.axis), self.axis)


@pytest.mark.parametrize("axis, reduce", [
    (1, lambda t, a: t.mean(a)),
    (-1, lambda t, a: t.mean(a)),
    (0, lambda t, a: t.sum(a) / 3),
    (0, lambda t, a: torch.mean(t, dim=a)),
], ids=["mean_axis1", "mean_last_axis", "sum_then_divide", "torch_mean"])
def test_stacked_expert_outputs_reduced_over_the_stacking_axis_become_one_linear(axis, reduce):
    torch.manual_seed(0)
    model = _StackedExperts(axis, reduce).eval()
    fused = compile_exact(model, tokens())
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    (linear,) = called_modules(fused)
    assert torch.allclose(linear.weight, torch.stack([e.weight for e in model.experts]).mean(0), atol=1e-6)
    assert_cheaper(fused.repc_report)


class _GatedStack(nn.Module):
    """Linear experts combined by a constant soft gate written over a stack of their outputs."""

    def __init__(self, combine):
        super().__init__()
        self.gate_logits = nn.Parameter(torch.randn(3))
        self.experts = nn.ModuleList(nn.Linear(12, 8) for _ in range(3))
        self.combine = combine

    def forward(self, x):
        return self.combine(torch.softmax(self.gate_logits, 0), [e(x) for e in self.experts])


@pytest.mark.parametrize("combine", [
    lambda w, outs: torch.einsum("e,ebnd->bnd", w, torch.stack(outs)),
    lambda w, outs: torch.einsum("ebnd,e->bnd", torch.stack(outs), w),
    lambda w, outs: (w.view(-1, 1, 1, 1) * torch.stack(outs, 0)).sum(0),
    lambda w, outs: torch.sum(torch.stack(outs, 1) * w.view(1, -1, 1, 1), dim=1),
    lambda w, outs: torch.stack(outs, -1) @ w,
], ids=["einsum", "einsum_stack_first", "broadcast_then_sum", "torch_sum_axis1", "matmul_by_gate"])
def test_gated_expert_outputs_over_a_stack_become_one_linear(combine):
    torch.manual_seed(0)
    model = _GatedStack(combine).eval()
    fused = compile_exact(model, tokens())
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    (linear,) = called_modules(fused)
    gate = torch.softmax(model.gate_logits, 0)
    want = sum(g * e.weight for g, e in zip(gate, model.experts))
    assert torch.allclose(linear.weight, want, atol=1e-6)


def test_a_gate_that_broadcasts_along_another_axis_is_not_taken_for_a_per_expert_weight():
    class Broadcast(nn.Module):  # w (3,) meets the last axis (3 features), not the expert axis
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))
            self.experts = nn.ModuleList(nn.Linear(12, 3) for _ in range(3))

        def forward(self, x):
            return (torch.stack([e(x) for e in self.experts], 0) * self.w).sum(0)

    torch.manual_seed(0)
    model = Broadcast().eval()
    compile_exact(model, tokens())  # exact on the example and other sizes: not mistaken for a gate


def test_conv_bn_experts_with_a_parameter_gate_become_one_conv():
    torch.manual_seed(0)
    model = randomize(lb.ConvExperts(4, 6, n=3))
    fused = compile_exact(model, image())
    assert op_counts(fused) == {"conv": 1}, op_counts(fused)
    assert_cheaper(fused.repc_report)


def test_experts_with_a_residual_and_a_following_linear_merge_into_one_linear():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixture = lb.StackMeanExperts(12, 12, n=3)
            self.head = nn.Linear(12, 6)

        def forward(self, x):
            return self.head(x + self.mixture(x))

    torch.manual_seed(0)
    fused = compile_exact(Residual().eval(), tokens())
    assert op_counts(fused) == {"linear": 1}, op_counts(fused)
    assert_cheaper(fused.repc_report)


# ----------------------------------------------------------------------------- RepMode: task-gated experts

@pytest.mark.parametrize("task", [0, 2])
def test_repmode_block_specialized_to_a_task_is_one_conv_and_exact_for_that_task(task):
    torch.manual_seed(0)
    model = randomize(lb.RepModeBlock(4, 4, tasks=3))
    fused = compile_exact(model, (image(), task))
    counts = op_counts(fused)
    assert counts["conv"] == 1 and counts["bn"] == 0 and counts["ReLU"] == 1, counts
    assert counts["softmax"] == 0 and counts["AvgPool2d"] == 0, counts
    (conv,) = called_modules(fused, nn.Conv2d)
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2)
    report = fused.repc_report
    assert report.specialized == {"task": repr(task)}, report.specialized
    assert f"task={task}" in str(report)
    assert_cheaper(report)


def test_repmode_tasks_give_different_merged_kernels_and_other_tasks_are_refused():
    torch.manual_seed(0)
    model = randomize(lb.RepModeBlock(4, 4, tasks=3))
    x = image()
    fused = {task: compile_exact(model, (x, task)) for task in (0, 2)}
    (k0,), (k2,) = (called_modules(fused[t], nn.Conv2d) for t in (0, 2))
    assert not torch.allclose(k0.weight, k2.weight)
    with torch.no_grad():
        assert rel_dev(model(x, 0), model(x, 2)) > 1e-2  # the gate really depends on the task
        for task in (0, 2):
            with pytest.raises(Exception, match="specialized"):
                fused[task](x, 1)


def test_repmode_specialized_through_the_specialize_option():
    torch.manual_seed(0)
    model = randomize(lb.RepModeBlock(4, 4, tasks=3))
    fused = compile_exact(model, (image(), 1), specialize={"task": 1})
    assert op_counts(fused)["conv"] == 1
    assert fused.repc_report.specialized == {"task": "1"}


def test_task_named_by_a_string_key_of_a_parameter_dict():
    class NamedTasks(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.ParameterDict({name: nn.Parameter(torch.randn(3)) for name in ("segment", "denoise")})
            self.experts = nn.ModuleList(nn.Conv2d(4, 4, k, padding=k // 2) for k in (1, 3, 5))

        def forward(self, x, task: str):
            g = self.gate[task].softmax(0)
            return sum(g[i] * e(x) for i, e in enumerate(self.experts))

    torch.manual_seed(0)
    model = NamedTasks().eval()
    fused = compile_exact(model, (image(), "denoise"))
    assert op_counts(fused)["conv"] == 1
    assert fused.repc_report.specialized == {"task": "'denoise'"}
    with pytest.raises(Exception, match="specialized"):
        fused(image(), "segment")


def test_tensor_task_argument_specialized_via_the_option():
    torch.manual_seed(0)
    model = lb.OneHotTaskExperts(12, n=3, tasks=4).eval()
    task = torch.eye(4)[1]
    x = tokens()
    fused = compile_exact(model, (x, task), keep=(1,), specialize={"task_embedding": task})
    assert op_counts(fused)["linear"] == 1, op_counts(fused)
    assert "task_embedding" in fused.repc_report.specialized
    with torch.no_grad():
        assert rel_dev(fused(x, task.clone()), model(x, task)) <= lb.REL_TOL
        with pytest.raises(Exception, match="specialized"):
            fused(x, torch.eye(4)[2])


def test_tensor_task_argument_without_the_option_stays_general():
    """Not asked to specialize: the gate depends on an input, so nothing is folded and any task works."""
    torch.manual_seed(0)
    model = lb.OneHotTaskExperts(12, n=3, tasks=4).eval()
    x = tokens()
    fused = compile_exact(model, (x, torch.eye(4)[1]), keep=(1,))
    assert not fused.repc_report.specialized
    with torch.no_grad():
        assert rel_dev(fused(x, torch.eye(4)[3]), model(x, torch.eye(4)[3])) <= lb.REL_TOL


def test_specializing_an_unknown_argument_is_a_clear_error():
    model = randomize(lb.RepModeBlock(4, 4))
    with pytest.raises(repc.ReparamError, match="no such positional argument"):
        repc.compile(model, (image(), 0), specialize={"tsk": 0}, graph=True)  # (before any output: either form)


# ----------------------------------------------------------------------------- data-dependent routers

def test_topk_router_is_left_alone_and_the_report_says_why():
    torch.manual_seed(0)
    model = lb.TopKRouterMoE(12, n=4, k=2).eval()
    fused = compile_exact(model, tokens())
    counts = op_counts(fused)
    assert counts["linear"] == 5 and counts["topk"] == 1, counts  # router and every expert kept
    report = fused.repc_report
    assert not report.rewrites, str(report)
    assert any("router" in r.reason for r in report.rejected), str(report)
