"""The node -> meaning table of :mod:`repc.normalize`.

Each row is a one-op model written in module, functional, method or operator form.  The
meaning :func:`describe` gives its node is checked by kind, and numerically: the canonical op
(evaluated with torch's functional ops, :func:`blocks.run_op`) recomputes the node's recorded
value in float64.  Rows that are not affine must raise :class:`Opaque` with a reason.
In-place ops are made out-of-place by :func:`functionalize_inplace` without changing results.
"""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from repc.capture import propagate_shapes
from repc.normalize import (AffineCall, Combine, Concat, Constant, GraphFacts, Layout, Opaque, Slice, describe,
                            detach_metadata_reads, functionalize_inplace, metadata_read, push_scales_into_matmul,
                            split_norm_affine)
from repc.ops import Conv, Elementwise, Linear
from repc.passes.collapse import _record

from blocks import run_op

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


class _Fn(nn.Module):
    def __init__(self, fn, **attrs):
        super().__init__()
        self.fn = fn
        for name, value in attrs.items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            else:
                self.register_buffer(name, value)


class _Fn1(_Fn):
    def forward(self, x):
        return self.fn(self, x)


class _Fn2(_Fn):
    def forward(self, x, y):
        return self.fn(self, x, y)


class _Fn3(_Fn):
    def forward(self, x, y, z):
        return self.fn(self, x, y, z)


def Fn(fn, **attrs) -> nn.Module:
    """A module whose forward is ``fn(self, *inputs)``, holding the given modules and tensors."""
    arity = fn.__code__.co_argcount - 1
    return {1: _Fn1, 2: _Fn2, 3: _Fn3}[arity](fn, **attrs)


def analyse(module: nn.Module, *shapes):
    """Trace in float64, record every value, and describe every node in graph order."""
    module = module.double().eval()
    if not isinstance(module, _Fn):
        module = nn.Sequential(module)  # a standard layer stays a call_module leaf
    gm = fx.symbolic_trace(module)
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=g, dtype=F64) for s in shapes)
    values = _record(gm, inputs)
    facts = GraphFacts(gm, values)
    meanings = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        try:
            meaning = describe(node, facts)
        except Opaque as why:
            meaning = why
        if isinstance(meaning, Constant):
            facts.constants[node] = meaning.value
        meanings[node] = meaning
    return gm, meanings, values


def recomputed(meaning, values):
    """What the meaning says the node computes, from the recorded values of its inputs."""
    if isinstance(meaning, AffineCall):
        return run_op(meaning.op, values[meaning.input])
    if isinstance(meaning, Combine):
        return sum(c * values[n] for n, c in meaning.terms)
    if isinstance(meaning, Concat):
        return torch.cat([values[n] for n in meaning.inputs], meaning.axis)
    if isinstance(meaning, Slice):
        return values[meaning.input].narrow(meaning.axis, meaning.start, meaning.stop - meaning.start)
    if isinstance(meaning, Constant):
        return meaning.value
    return None


def last_meaning(module, *shapes):
    """The meaning of the node the model returns, after checking every described node numerically."""
    gm, meanings, values = analyse(module, *shapes)
    for node, meaning in meanings.items():
        want = recomputed(meaning, values)
        if want is not None and isinstance(values[node], torch.Tensor):
            assert want.shape == values[node].shape, (node, meaning)
            assert torch.allclose(want.to(F64), values[node].to(F64), rtol=1e-10, atol=1e-10), (node.name, meaning)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = out.args[0]
    return meanings[result], result


p = lambda *shape: nn.Parameter(torch.randn(shape))
pos = lambda *shape: torch.rand(shape) + 0.5


# ----------------------------------------------------------------------------- affine rows

AFFINE = {
    # name: (module, input shapes, expected meaning kind, expected op class or None)
    # modules
    "Conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), [(2, 4, 7, 7)], AffineCall, Conv),
    "Conv1d_same_dilated": (lambda: nn.Conv1d(4, 4, 4, padding="same", dilation=1, bias=False), [(2, 4, 9)], AffineCall, Conv),
    "Conv2d_valid": (lambda: nn.Conv2d(4, 4, (1, 3), padding="valid"), [(2, 4, 5, 5)], AffineCall, Conv),
    "Conv2d_reflect": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), [(2, 4, 5, 5)], AffineCall, Conv),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=(0, 1, 1), dilation=(1, 1, 2)), [(1, 2, 5, 5, 6)], AffineCall, Conv),
    "Linear": (lambda: nn.Linear(4, 3), [(2, 4)], AffineCall, Linear),
    "Linear_tokens": (lambda: nn.Linear(4, 3, bias=False), [(2, 5, 4)], AffineCall, Linear),
    "BatchNorm1d_BC": (lambda: nn.BatchNorm1d(4), [(3, 4)], AffineCall, Elementwise),
    "BatchNorm1d_BCL": (lambda: nn.BatchNorm1d(4), [(3, 4, 5)], AffineCall, Elementwise),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(4), [(3, 4, 2, 2)], AffineCall, Elementwise),
    "BatchNorm2d_no_affine": (lambda: nn.BatchNorm2d(4, affine=False), [(3, 4, 2, 2)], AffineCall, Elementwise),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(2), [(1, 2, 2, 2, 2)], AffineCall, Elementwise),
    "Identity": (lambda: nn.Identity(), [(2, 3)], AffineCall, Elementwise),
    "Dropout_eval": (lambda: nn.Dropout(0.5), [(2, 3, 4)], AffineCall, Elementwise),
    "Dropout2d_eval": (lambda: nn.Dropout2d(0.5), [(2, 3, 4, 4)], AffineCall, Elementwise),
    "LeakyReLU_slope_1": (lambda: nn.LeakyReLU(1.0), [(2, 3)], AffineCall, Elementwise),
    "PReLU_ones": (lambda: nn.PReLU(3, init=1.0), [(2, 3, 4)], AffineCall, Elementwise),
    "AvgPool2d_count_pad": (lambda: nn.AvgPool2d(3, 2, 1), [(2, 3, 7, 7)], AffineCall, Conv),
    "AvgPool1d": (lambda: nn.AvgPool1d(2), [(2, 3, 8)], AffineCall, Conv),
    "AvgPool2d_divisor": (lambda: nn.AvgPool2d(2, divisor_override=3), [(2, 3, 4, 4)], AffineCall, Conv),
    "ZeroPad2d": (lambda: nn.ZeroPad2d((1, 2, 0, 1)), [(2, 3, 4, 4)], AffineCall, Conv),
    "ConstantPad1d_zero": (lambda: nn.ConstantPad1d(2, 0.0), [(2, 3, 4)], AffineCall, Conv),
    # functional
    "F.conv2d_kwargs": (lambda: Fn(lambda s, x: F.conv2d(x, s.w, s.b, padding=1, stride=(1, 2)), w=p(6, 4, 3, 3), b=p(6)),
                        [(2, 4, 6, 6)], AffineCall, Conv),
    "torch.conv2d_positional": (lambda: Fn(lambda s, x: torch.conv2d(x, s.w, None, 1, 1, 1, 4), w=p(4, 1, 3, 3)),
                                [(2, 4, 6, 6)], AffineCall, Conv),
    "F.conv1d_string_padding": (lambda: Fn(lambda s, x: F.conv1d(x, s.w, padding="same"), w=p(3, 3, 3)),
                                [(2, 3, 7)], AffineCall, Conv),
    "F.conv2d_folded_weight": (lambda: Fn(lambda s, x: F.conv2d(x, s.w * s.mask + s.delta, s.b + 1, padding=1),
                                          w=p(4, 4, 3, 3), mask=pos(4, 4, 3, 3), delta=p(4, 4, 3, 3), b=p(4)),
                               [(2, 4, 5, 5)], AffineCall, Conv),
    "F.linear": (lambda: Fn(lambda s, x: F.linear(x, s.w, s.b), w=p(3, 4), b=p(3)), [(2, 4)], AffineCall, Linear),
    "torch.matmul": (lambda: Fn(lambda s, x: torch.matmul(x, s.w), w=p(4, 3)), [(2, 5, 4)], AffineCall, Linear),
    "matmul_operator": (lambda: Fn(lambda s, x: x @ s.w, w=p(4, 3)), [(2, 4)], AffineCall, Linear),
    "torch.mm": (lambda: Fn(lambda s, x: torch.mm(x, s.w), w=p(4, 3)), [(2, 4)], AffineCall, Linear),
    "torch.addmm_conv1d": (lambda: Fn(lambda s, x: torch.addmm(s.b, x, s.w), w=p(4, 3), b=p(3)), [(5, 4)],
                           AffineCall, Linear),
    "torch.addmm_scaled": (lambda: Fn(lambda s, x: torch.addmm(s.b, x, s.w, beta=0.5, alpha=2.0), w=p(4, 3), b=p(1, 3)),
                           [(5, 4)], AffineCall, Linear),
    "F.batch_norm_positional": (lambda: Fn(lambda s, x: F.batch_norm(x, s.rm, s.rv, s.g, s.b, False, 0.1, 1e-5),
                                           rm=torch.randn(4), rv=pos(4), g=p(4), b=p(4)), [(2, 4, 3, 3)], AffineCall, Elementwise),
    "F.batch_norm_kwargs": (lambda: Fn(lambda s, x: F.batch_norm(x, s.rm, s.rv, weight=s.g, training=False, eps=1e-3),
                                       rm=torch.randn(4), rv=pos(4), g=p(4)), [(2, 4, 3)], AffineCall, Elementwise),
    "F.batch_norm_no_affine": (lambda: Fn(lambda s, x: F.batch_norm(x, s.rm, s.rv), rm=torch.randn(4), rv=pos(4)),
                               [(2, 4)], AffineCall, Elementwise),
    "torch.batch_norm": (lambda: Fn(lambda s, x: torch.batch_norm(x, s.g, s.b, s.rm, s.rv, False, 0.1, 1e-5, False),
                                    rm=torch.randn(4), rv=pos(4), g=p(4), b=p(4)), [(2, 4, 3, 3)], AffineCall, Elementwise),
    "F.dropout_eval": (lambda: Fn(lambda s, x: F.dropout(x, 0.3, False)), [(2, 3)], AffineCall, Elementwise),
    "F.dropout_training_kw": (lambda: Fn(lambda s, x: F.dropout(x, p=0.3, training=False)), [(2, 3)], AffineCall, Elementwise),
    "F.leaky_relu_1": (lambda: Fn(lambda s, x: F.leaky_relu(x, 1.0)), [(2, 3)], AffineCall, Elementwise),
    "F.prelu_ones": (lambda: Fn(lambda s, x: F.prelu(x, s.a), a=torch.ones(3)), [(2, 3, 4)], AffineCall, Elementwise),
    "F.avg_pool2d": (lambda: Fn(lambda s, x: F.avg_pool2d(x, 3, 1, 1)), [(2, 3, 5, 5)], AffineCall, Conv),
    "F.pad_zero": (lambda: Fn(lambda s, x: F.pad(x, (1, 1, 2, 0))), [(2, 3, 4, 4)], AffineCall, Conv),
    "contiguous": (lambda: Fn(lambda s, x: x.contiguous()), [(2, 3)], AffineCall, Elementwise),
    "clone": (lambda: Fn(lambda s, x: torch.clone(x)), [(2, 3)], AffineCall, Elementwise),
    # operators, methods, torch functions
    "add_operator": (lambda: Fn(lambda s, x, y: x + y), [(2, 3), (2, 3)], Combine, None),
    "sub_operator": (lambda: Fn(lambda s, x, y: x - y), [(2, 3), (2, 3)], Combine, None),
    "torch.add_alpha": (lambda: Fn(lambda s, x, y: torch.add(x, y, alpha=2)), [(2, 3), (2, 3)], Combine, None),
    "torch.sub_alpha": (lambda: Fn(lambda s, x, y: torch.sub(x, y, alpha=0.5)), [(2, 3), (2, 3)], Combine, None),
    "add_method": (lambda: Fn(lambda s, x, y: x.add(y)), [(2, 3), (2, 3)], Combine, None),
    "sub_method_alpha": (lambda: Fn(lambda s, x, y: x.sub(y, alpha=3)), [(2, 3), (2, 3)], Combine, None),
    "scalar_mul_right": (lambda: Fn(lambda s, x: x * 2), [(2, 3)], AffineCall, Elementwise),
    "scalar_mul_left": (lambda: Fn(lambda s, x: 0.5 * x), [(2, 3)], AffineCall, Elementwise),
    "mul_method": (lambda: Fn(lambda s, x: x.mul(-1.5)), [(2, 3)], AffineCall, Elementwise),
    "per_channel_mul_C11": (lambda: Fn(lambda s, x: torch.mul(x, s.g), g=p(4, 1, 1)), [(2, 4, 3, 3)], AffineCall, Elementwise),
    "per_channel_mul_left": (lambda: Fn(lambda s, x: s.g * x, g=p(1, 4, 1, 1)), [(2, 4, 3, 3)], AffineCall, Elementwise),
    "per_feature_mul": (lambda: Fn(lambda s, x: x * s.g, g=p(4)), [(2, 5, 4)], AffineCall, Elementwise),
    "scalar_div": (lambda: Fn(lambda s, x: x / 4), [(2, 3)], AffineCall, Elementwise),
    "div_method_tensor": (lambda: Fn(lambda s, x: x.div(s.g), g=pos(3)), [(2, 3)], AffineCall, Elementwise),
    "neg_operator": (lambda: Fn(lambda s, x: -x), [(2, 3)], AffineCall, Elementwise),
    "neg_method": (lambda: Fn(lambda s, x: x.neg()), [(2, 3)], AffineCall, Elementwise),
    "rsub": (lambda: Fn(lambda s, x: 1 - x), [(2, 3)], AffineCall, Elementwise),
    "add_scalar": (lambda: Fn(lambda s, x: x + 1.5), [(2, 3)], AffineCall, Elementwise),
    "add_bias_tensor": (lambda: Fn(lambda s, x: x + s.b, b=p(1, 4, 1, 1)), [(2, 4, 3, 3)], AffineCall, Elementwise),
    "bias_tensor_minus_x": (lambda: Fn(lambda s, x: s.b - x, b=p(4, 1, 1)), [(2, 4, 3, 3)], AffineCall, Elementwise),
    "add_sub_of_constants": (lambda: Fn(lambda s, x: x + (s.a - 2 * s.b), a=p(4, 1, 1), b=p(4, 1, 1)),
                             [(2, 4, 3, 3)], AffineCall, Elementwise),
    "cat_channels": (lambda: Fn(lambda s, x, y: torch.cat([x, y], 1)), [(2, 3, 4), (2, 2, 4)], Concat, None),
    "cat_negative_dim": (lambda: Fn(lambda s, x, y: torch.cat((x, y), dim=-1)), [(2, 3), (2, 2)], Concat, None),
    "torch.concat": (lambda: Fn(lambda s, x, y: torch.concat([x, y], 1)), [(2, 3), (2, 3)], Concat, None),
    "getitem_channels": (lambda: Fn(lambda s, x: x[:, 1:3]), [(2, 4, 3)], Slice, None),
    "getitem_ellipsis": (lambda: Fn(lambda s, x: x[..., :2]), [(2, 4, 3)], Slice, None),
    "getitem_negative": (lambda: Fn(lambda s, x: x[:, -2:]), [(2, 4, 3)], Slice, None),
    "narrow_method": (lambda: Fn(lambda s, x: x.narrow(1, 1, 2)), [(2, 4, 3)], Slice, None),
    "torch.narrow": (lambda: Fn(lambda s, x: torch.narrow(x, -1, 0, 2)), [(2, 4, 3)], Slice, None),
    "chunk_getitem": (lambda: Fn(lambda s, x: x.chunk(2, 1)[1]), [(2, 5, 3)], Slice, None),
    "split_sections_getitem": (lambda: Fn(lambda s, x: torch.split(x, [1, 3], 1)[1]), [(2, 4, 3)], Slice, None),
    "split_size_getitem": (lambda: Fn(lambda s, x: x.split(2, dim=1)[2]), [(2, 5, 3)], Slice, None),
    "stack_mean": (lambda: Fn(lambda s, x, y: torch.stack([x, y]).mean(0)), [(2, 3), (2, 3)], Combine, None),
    "stack_sum": (lambda: Fn(lambda s, x, y, z: torch.stack([x, y, z], 1).sum(1)), [(2, 3)] * 3, Combine, None),
    "transpose": (lambda: Fn(lambda s, x: x.transpose(1, 2)), [(2, 3, 4)], Layout, None),
    "flatten": (lambda: Fn(lambda s, x: torch.flatten(x, 1)), [(2, 3, 4)], Layout, None),
}


@pytest.mark.parametrize("name", list(AFFINE))
def test_affine_row(name):
    factory, shapes, kind, op_class = AFFINE[name]
    meaning, _ = last_meaning(factory(), *shapes)
    assert isinstance(meaning, kind), meaning
    if op_class is not None:
        assert isinstance(meaning.op, op_class), meaning.op


def test_module_conv_fields():
    meaning, _ = last_meaning(nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                                        padding_mode="circular"), (1, 4, 9, 5))
    op = meaning.op
    assert (op.stride, op.padding, op.dilation, op.groups, op.padding_mode) == \
        ((2, 1), ((1, 1), (0, 0)), (2, 1), 2, "circular")
    assert op.weight.dtype == F64 and op.bias.dtype == F64


def test_same_padding_with_an_even_kernel_is_asymmetric():
    meaning, _ = last_meaning(nn.Conv1d(2, 2, 4, padding="same"), (1, 2, 8))
    assert meaning.op.padding == ((1, 2),)


def test_identity_forms_are_the_identity_map():
    for module in (nn.Identity(), nn.Dropout(0.2), nn.LeakyReLU(1.0), Fn(lambda s, x: x.contiguous())):
        meaning, _ = last_meaning(module, (2, 3))
        assert meaning.op.is_identity, module


def test_combine_coefficients():
    meaning, node = last_meaning(Fn(lambda s, x, y: torch.sub(x, y, alpha=0.25)), (2, 3), (2, 3))
    assert [c for _, c in meaning.terms] == [1.0, -0.25]
    meaning, _ = last_meaning(Fn(lambda s, x, y: torch.stack([x, y]).mean(0)), (2, 3), (2, 3))
    assert [c for _, c in meaning.terms] == [0.5, 0.5]


def test_slice_fields():
    meaning, _ = last_meaning(Fn(lambda s, x: torch.split(x, [1, 3], 1)[1]), (2, 4, 3))
    assert (meaning.axis, meaning.start, meaning.stop) == (1, 1, 4)
    meaning, _ = last_meaning(Fn(lambda s, x: x[..., :2]), (2, 4, 3))
    assert (meaning.axis, meaning.start, meaning.stop) == (2, 0, 2)


def test_parameter_only_subgraph_is_folded_to_a_constant():
    module = Fn(lambda s, x: F.conv2d(x, s.w * s.mask + s.delta, padding=1), w=p(4, 4, 3, 3), mask=pos(4, 4, 3, 3),
                delta=p(4, 4, 3, 3))
    gm, meanings, values = analyse(module, (1, 4, 5, 5))
    folded = [n for n, m in meanings.items() if isinstance(m, Constant) and n.op == "call_function"]
    assert {n.target for n in folded} == {operator.mul, operator.add}
    (conv,) = [m for m in meanings.values() if isinstance(m, AffineCall)]
    want = (module.w * module.mask + module.delta).detach().double()
    assert torch.equal(conv.op.weight, want)


def test_random_values_are_not_folded():
    module = Fn(lambda s, x: F.conv2d(x, s.w + torch.randn_like(s.w)), w=p(2, 2, 1, 1))
    gm, meanings, _ = analyse(module, (1, 2, 3, 3))
    (rand,) = [n for n in meanings if n.op == "call_function" and n.target is torch.randn_like]
    assert not isinstance(meanings[rand], Constant)
    (conv,) = [n for n in meanings if n.op == "call_function" and n.target is F.conv2d]
    assert isinstance(meanings[conv], Opaque) and "depends on the input" in str(meanings[conv])


# ----------------------------------------------------------------------------- opaque rows

OPAQUE = {
    # name: (module, input shapes, reason substring)
    "ReLU_module": (lambda: nn.ReLU(), [(2, 3)], "ReLU"),
    "torch.relu": (lambda: Fn(lambda s, x: torch.relu(x)), [(2, 3)], "relu"),
    "LeakyReLU_slope": (lambda: nn.LeakyReLU(0.1), [(2, 3)], "LeakyReLU"),
    "F.leaky_relu_slope": (lambda: Fn(lambda s, x: F.leaky_relu(x, 0.2)), [(2, 3)], "slope"),
    "PReLU_default": (lambda: nn.PReLU(), [(2, 3)], "PReLU"),
    "product_of_activations": (lambda: Fn(lambda s, x, y: x * y), [(2, 3), (2, 3)], "product of two activations"),
    "division_by_activation": (lambda: Fn(lambda s, x, y: x / y), [(2, 3), (2, 3)], "division"),
    "floor_division": (lambda: Fn(lambda s, x: torch.div(x, 2, rounding_mode="floor")), [(2, 3)], "rounding"),
    "matmul_of_activations": (lambda: Fn(lambda s, x, y: x @ y), [(2, 3), (3, 2)], "matmul of two activations"),
    "broadcasting_sum": (lambda: Fn(lambda s, x, y: x + y), [(2, 3), (1, 3)], "different shapes"),
    "broadcasting_constant": (lambda: Fn(lambda s, x: x * s.g, g=p(2, 4, 3)), [(1, 4, 3)], "larger shape"),
    "F.pad_reflect": (lambda: Fn(lambda s, x: F.pad(x, (1, 1), mode="reflect")), [(2, 3, 4)], "not constant zero"),
    "F.pad_value": (lambda: Fn(lambda s, x: F.pad(x, (1, 1), value=1.0)), [(2, 3, 4)], "not constant zero"),
    "ConstantPad_value": (lambda: nn.ConstantPad2d(1, 0.5), [(2, 3, 4, 4)], "non-zero"),
    "F.pad_negative": (lambda: Fn(lambda s, x: F.pad(x, (-1, 0))), [(2, 3, 4)], "non-negative"),
    "AvgPool_excluding_pad": (lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False), [(2, 3, 5, 5)], "count_include_pad"),
    "F.avg_pool_excluding_pad": (lambda: Fn(lambda s, x: F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)),
                                 [(2, 3, 5, 5)], "count_include_pad"),
    "AvgPool_ceil_mode": (lambda: nn.AvgPool2d(2, 2, ceil_mode=True), [(2, 3, 5, 5)], "ceil_mode"),
    "MaxPool": (lambda: nn.MaxPool2d(2), [(2, 3, 4, 4)], "MaxPool2d"),
    "BN_batch_statistics": (lambda: nn.BatchNorm2d(3, track_running_stats=False), [(2, 3, 4, 4)], "running statistics"),
    "F.batch_norm_training": (lambda: Fn(lambda s, x: F.batch_norm(x, s.rm, s.rv, training=True), rm=torch.zeros(3),
                                         rv=torch.ones(3)), [(2, 3)], "training=True"),
    "F.batch_norm_without_stats": (lambda: Fn(lambda s, x: F.batch_norm(x, None, None, training=True)), [(2, 3)], ""),
    "F.dropout_training": (lambda: Fn(lambda s, x: F.dropout(x, 0.5, True)), [(2, 3)], "random"),
    "step_slice": (lambda: Fn(lambda s, x: x[:, ::2]), [(2, 4)], "one contiguous slice"),
    "two_axis_slice": (lambda: Fn(lambda s, x: x[:, 1:3, 1:]), [(2, 4, 3)], "one contiguous slice on one axis"),
    "index_select": (lambda: Fn(lambda s, x: x[:, 1]), [(2, 4, 3)], "one contiguous slice"),
    "new_axis": (lambda: Fn(lambda s, x: x[None]), [(2, 4)], "adds axes"),
    "cat_with_constant": (lambda: Fn(lambda s, x: torch.cat([x, s.c], 1), c=torch.randn(2, 2)), [(2, 3)], "constants"),
    "conv_weight_from_input": (lambda: Fn(lambda s, x: F.conv2d(x, s.w * x.mean()), w=p(2, 2, 1, 1)), [(1, 2, 3, 3)],
                               "depends on the input"),
    "linear_weight_from_input": (lambda: Fn(lambda s, x: F.linear(x, s.w + x.sum()), w=p(3, 3)), [(2, 3)],
                                 "depends on the input"),
    "module_with_two_inputs": (lambda: Fn(lambda s, x, y: s.bil(x, y), bil=nn.Bilinear(3, 3, 2)), [(2, 3), (2, 3)],
                               "several arguments"),
    "softmax": (lambda: Fn(lambda s, x: x.softmax(-1)), [(2, 3)], "softmax"),
    "stack_reduced_elsewhere": (lambda: Fn(lambda s, x, y: torch.stack([x, y]).mean(1)), [(2, 3), (2, 3)], "stacking axis"),
}


@pytest.mark.parametrize("name", list(OPAQUE))
def test_opaque_row(name):
    factory, shapes, reason = OPAQUE[name]
    meaning, _ = last_meaning(factory(), *shapes)
    assert isinstance(meaning, Opaque), meaning
    assert reason in str(meaning)


def test_training_mode_modules_are_opaque():
    for module, reason in ((nn.BatchNorm2d(3), "training mode"), (nn.Dropout(0.1), "training mode")):
        gm = fx.symbolic_trace(nn.Sequential(module))
        module.train()
        x = torch.randn(2, 3, 4, 4)
        propagate_shapes(gm, (x,))
        facts = GraphFacts(gm)
        (node,) = [n for n in gm.graph.nodes if n.op == "call_module"]
        with pytest.raises(Opaque, match=reason):
            describe(node, facts)


def test_placeholders_and_outputs_have_no_meaning():
    gm, meanings, _ = analyse(nn.Identity(), (2, 3))
    facts = GraphFacts(gm)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            with pytest.raises(Opaque):
                describe(node, facts)


def test_describe_does_not_touch_the_graph():
    module = Fn(lambda s, x, y: F.relu(torch.cat([F.conv2d(x, s.w, padding=1) * 2 - y, y], 1)[:, 1:]),
                w=p(3, 3, 3, 3))
    gm = fx.symbolic_trace(module.double())
    before = gm.code
    analyse(module, (1, 3, 4, 4), (1, 3, 4, 4))
    assert fx.symbolic_trace(module).code == before


# ----------------------------------------------------------------------------- in-place ops

class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        before = self.bn(y)  # reads y before it is mutated
        y += x  # fx itself traces this as an out-of-place add (a Proxy has no __iadd__)
        y.mul_(2)  # method
        z = self.act(y)  # module with inplace=True
        w = F.relu(z - 1, inplace=True)  # functional inplace kwarg
        return before, y, z, w


def test_functionalize_inplace_keeps_results_and_removes_mutation():
    from repc.examples import randomize_bn
    model = randomize_bn(InPlace()).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = model(x.clone())
    gm = fx.symbolic_trace(copy.deepcopy(model))
    changed = functionalize_inplace(gm)
    assert changed == 3  # mul_, the ReLU module, F.relu(inplace=True)
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert "mul_" not in targets and "mul" in targets
    assert not gm.act.inplace
    assert all(not n.kwargs.get("inplace") for n in gm.graph.nodes)
    with torch.no_grad():
        x_in = x.clone()
        got = gm(x_in)
    assert torch.equal(x_in, x)  # nothing mutates the caller's tensor any more
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)
    assert model.act.inplace  # the user's model keeps its flag


def test_inplace_operator_function_becomes_out_of_place():
    """Graphs built by other front ends can carry ``operator.iadd`` itself."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(operator.mul, (x, 2.0))
    early = graph.call_function(operator.neg, (y,))
    iadd = graph.call_function(operator.iadd, (y, x))
    late = graph.call_function(operator.neg, (y,))
    graph.output((early, iadd, late))
    gm = fx.GraphModule(nn.Module(), graph)
    v = torch.randn(3)
    want = (-(2 * v), 3 * v, -(3 * v))
    assert functionalize_inplace(gm) == 1
    assert iadd.target is operator.add
    assert late.args[0] is iadd and early.args[0] is y  # only the later reader sees the result
    for g, w in zip(gm(v), want):
        assert torch.allclose(g, w)


def test_inplace_op_through_a_view_stays_and_is_marked():
    from repc.normalize import VIEW_MUTATED

    class ViewMutation(nn.Module):
        def forward(self, x):
            a = x * 2
            a[:, :1].mul_(3)
            return a + 1

    gm = fx.symbolic_trace(ViewMutation())
    x = torch.randn(2, 3)
    want = ViewMutation()(x)
    assert functionalize_inplace(gm) == 0
    (mul_,) = [n for n in gm.graph.nodes if n.target == "mul_"]
    assert mul_.meta.get(VIEW_MUTATED)
    (a,) = [n for n in gm.graph.nodes if n.target is operator.mul]
    assert a.meta.get(VIEW_MUTATED)
    assert torch.equal(gm(x), want)


# ----------------------------------------------------------------------------- normalization layers

@pytest.mark.parametrize("norm,shape", [(nn.LayerNorm(4), (2, 5, 4)), (nn.GroupNorm(2, 4), (2, 4, 3, 3)),
                                        (nn.LayerNorm(4, elementwise_affine=False), (2, 4))])
def test_split_norm_affine_keeps_the_function(norm, shape):
    with torch.no_grad():
        for t in norm.parameters():
            t.copy_(torch.randn_like(t))
    module = nn.Sequential(norm)
    gm = fx.symbolic_trace(module)
    x = torch.randn(shape)
    propagate_shapes(gm, (x,))
    n = split_norm_affine(gm)
    assert n == (1 if any(True for _ in norm.parameters()) else 0)
    assert torch.allclose(gm(x), module(x), atol=1e-6)
    if n:
        assert not any(n.op == "call_module" for n in gm.graph.nodes)


# ----------------------------------------------------------------------------- scales through matmul

class ScaledScores(nn.Module):
    """``(q(x) @ k(x)^T) * c`` (or ``/ c``), the scores optionally read twice."""

    def __init__(self, d=6, divide=False, reuse=False, maps=True):
        super().__init__()
        self.q, self.k = (nn.Linear(d, d), nn.Linear(d, d)) if maps else (nn.Identity(), nn.Identity())
        self.divide, self.reuse = divide, reuse

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-2, -1)
        out = scores / 2.5 if self.divide else scores * 0.4
        return out + scores if self.reuse else out


def scale_pass(module, x):
    gm = fx.symbolic_trace(module)
    return gm, push_scales_into_matmul(gm, _record(gm, (x,)))


@pytest.mark.parametrize("divide", [False, True], ids=["multiply", "divide"])
def test_a_scalar_after_a_matmul_moves_onto_the_operand_a_linear_map_computes(divide):
    module = ScaledScores(divide=divide)
    x = torch.randn(2, 5, 6)
    gm, count = scale_pass(module, x)
    assert count == 1
    (product,) = [n for n in gm.graph.nodes if n.target is operator.matmul]
    assert list(product.users)[0].op == "output"  # nothing scales the scores any more
    scaled = product.args[0]
    assert scaled.target is operator.mul and scaled.args[0].target == "q"
    assert scaled.args[1] == pytest.approx(1 / 2.5 if divide else 0.4)
    assert torch.allclose(gm(x), module(x), atol=1e-6)


def test_a_scale_stays_on_scores_that_something_else_also_reads():
    module = ScaledScores(reuse=True)
    gm, count = scale_pass(module, torch.randn(2, 5, 6))
    assert count == 0


def test_without_a_map_to_fold_into_the_scale_moves_only_onto_a_smaller_operand():
    x = torch.randn(2, 5, 6)  # 5x6 operands, 5x5 scores: the operand is larger
    gm, count = scale_pass(ScaledScores(maps=False), x)
    assert count == 0
    long = torch.randn(2, 8, 3)  # 8x3 operands, 8x8 scores: the operand is smaller
    module = ScaledScores(maps=False)
    gm, count = scale_pass(module, long)
    assert count == 1 and torch.allclose(gm(long), module(long), atol=1e-6)



class FusedQKVScores(nn.Module):
    """A fused qkv projection read through ``chunk``, ``split`` or slices, scores scaled after
    the product."""

    def __init__(self, d=6, read="chunk", divide=True):
        super().__init__()
        self.qkv, self.d, self.read, self.divide = nn.Linear(d, 3 * d), d, read, divide

    def forward(self, x):
        h, d = self.qkv(x), self.d
        if self.read == "chunk":
            q, k, v = h.chunk(3, -1)
        elif self.read == "split":
            q, k, v = h.split(d, -1)
        else:
            q, k, v = h[..., :d], h[..., d:2 * d], h[..., 2 * d:]
        scores = q @ k.transpose(-2, -1)
        scores = scores / math.sqrt(d) if self.divide else scores * 0.4
        return scores.softmax(-1) @ v


@pytest.mark.parametrize("read", ["chunk", "split", "index"])
@pytest.mark.parametrize("divide", [False, True], ids=["multiply", "divide"])
def test_a_scale_on_one_slice_of_a_shared_map_scales_only_that_slice(read, divide):
    """Found by the transformer fuzzer: q of a fused qkv read through ``chunk(3, -1)`` was seen
    through the chunk as all of qkv, so the scale went onto k and v too (deviation 0.5).  It
    now goes onto qkv as a vector, ``c`` on q's rows and 1 on k's and v's."""
    module = FusedQKVScores(read=read, divide=divide)
    x = torch.randn(2, 5, 6)
    gm, count = scale_pass(module, x)
    assert count == 1
    (qkv,) = [n for n in gm.graph.nodes if n.target == "qkv"]
    (scaled,) = qkv.users
    assert scaled.target is operator.mul and scaled.args[1].op == "get_attr"
    vector = getattr(gm, scaled.args[1].target)
    c = 1 / math.sqrt(6) if divide else 0.4
    assert torch.allclose(vector.reshape(-1), torch.tensor([c] * 6 + [1.0] * 12))
    assert torch.allclose(gm(x), module(x), atol=1e-6)
    y = torch.randn(3, 4, 6)  # the vector runs along the features: any batch, any length
    assert torch.allclose(gm(y), module(y), atol=1e-6)


def test_a_scale_stays_off_a_shared_map_whose_scaled_rows_something_else_reads():
    class Overlap(FusedQKVScores):
        def forward(self, x):
            h, d = self.qkv(x), self.d
            q, k, v = h.chunk(3, -1)
            return (q @ k.transpose(-2, -1)) * 0.4 + h[..., :2 * d].sum()  # q's and k's rows read again

    module = Overlap()
    x = torch.randn(2, 5, 6)  # (and the 5x6 operands are larger than the 5x5 scores)
    gm, count = scale_pass(module, x)
    assert count == 0
    assert torch.allclose(gm(x), module(x), atol=1e-6)

# ----------------------------------------------------------------------------- metadata reads

class MetadataReads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        core = F.layer_norm(h, (4,))
        g = core * 2.0 + 1.0
        n = g.size(0) + self.fc(g).size(0) + (h * 3.0).size(0)
        return (g.to(h.dtype) + n).to(x.dtype)


def test_metadata_reads_become_constants_or_move_to_a_same_shaped_value_no_region_absorbs():
    module = MetadataReads()
    x = torch.randn(3, 4)
    gm = fx.symbolic_trace(module)
    count = detach_metadata_reads(gm, _record(gm, (x,)))
    assert count == 1  # h.dtype became float32
    reads = [(n.args[1] if n.target is getattr else n.target, n.args[0].name) for n in gm.graph.nodes
             if n.target is getattr or n.target == "size"]
    assert sorted(reads) == [("dtype", "x"),  # an input's dtype stays a read: it may change
                             ("size", "add"),  # g is read by fc and by the output: a source, the read stays
                             ("size", "fc_1"),  # a linear's output is not moved past
                             ("size", "mul_1")]  # (h * 3) would reach fc, which a region absorbs
    assert torch.equal(gm(x), module(x))
    assert torch.equal(gm(x[:2]), module(x[:2]))


class ShapeOfAResidualStream(nn.Module):
    """``h = x + fc(x)`` read by the next residual and by a BN over ``h.flatten(0, 1)`` that is
    viewed back with ``B, T, _ = h.shape``; q, k, v read a LayerNorm's output and its shape."""

    def __init__(self, d=4):
        super().__init__()
        self.fc, self.bn, self.ln = nn.Linear(d, d), nn.BatchNorm1d(d), nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = x + self.fc(x)
        B, T, _ = h.shape
        y = h + self.bn(h.flatten(0, 1)).view(B, T, -1)
        n = self.ln(y)
        B, T, C = n.shape
        return (self.q(n) + self.k(n) * self.v(n)).reshape(B, T, C)


def test_a_shape_read_stays_on_a_value_several_ops_read():
    """Found by the transformer fuzzer: ``h.shape`` of a residual sum was moved up to the model
    input.  The BN region (flatten, BN, view) reads ``h`` as its source, but its view then took
    B and T from a value outside the region; checked at another batch, the view used the
    example's B and gave another shape, so the merge was taken back.  The read now stays on
    ``h`` (which two ops read: it is a source anyway), and still moves past the LayerNorm's
    affine, which the q, k and v linears fold in."""
    module = ShapeOfAResidualStream()
    x = torch.randn(2, 3, 4)
    gm = fx.symbolic_trace(module)
    propagate_shapes(gm, (x,))
    assert split_norm_affine(gm) == 1
    assert detach_metadata_reads(gm, _record(gm, (x,))) == 1
    reads = sorted(n.args[0].name for n in gm.graph.nodes if n.target is getattr and n.args[1] == "shape")
    assert reads[0] == "add"  # h
    assert reads[1] != "add_1" and reads[1].startswith("layer_norm"), reads  # the norm's core, not its affine tail
    assert torch.allclose(gm(x), module(x), atol=1e-6)
    assert torch.allclose(gm(x[:1]), module(x[:1]), atol=1e-6)


class RankAssertedNorm(nn.Module):
    """A library norm after a conv: ``torch._assert(y.ndim == 4)`` and ``y.dim()`` on the conv's output."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.ndim == 4, "expected a 4-d input")
        torch._assert(y.dim() == x.dim(), "same rank")
        return self.bn(y)


def test_a_rank_read_of_a_computed_value_becomes_its_constant_and_an_inputs_stays():
    module = RankAssertedNorm().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = fx.symbolic_trace(module)
    assert detach_metadata_reads(gm, _record(gm, (x,))) == 2  # y.ndim, y.dim()
    reads = [n for n in gm.graph.nodes if metadata_read(n) is not None]
    assert [(metadata_read(n), n.args[0].name) for n in reads] == [("dim", "x")]  # an input's rank may change
    assert list(gm.graph.find_nodes(op="call_module", target="conv"))[0].users.keys() == \
        set(gm.graph.find_nodes(op="call_module", target="bn"))  # the conv is read by the norm alone
    assert torch.equal(gm(x), module(x))
