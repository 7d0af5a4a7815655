"""The vocabulary (:mod:`repc.vocabulary`): the node -> meaning table.

Each row is a one-op model written in module, functional, method or operator form.  The
meaning :func:`describe` gives its node is checked by kind, and numerically: the canonical op
(evaluated with torch's functional ops, :func:`blocks.run_op`) recomputes the node's recorded
value in float64.  Rows that are not affine must raise :class:`Opaque` with a reason.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from repc.capture import propagate_shapes
from repc.meanings import AffineCall, Combine, Concat, Constant, GraphFacts, Layout, Slice
from repc.ops import Conv, Elementwise, Linear
from repc.passes.record import record_values
from repc.reasons import Opaque, OpaqueKind
from repc.vocabulary import VOCABULARY, OpKind, describe, handler_for, handles, op_kind

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
    if isinstance(module, fx.GraphModule):
        gm = module  # a graph built by hand (an op symbolic tracing never records, e.g. ``operator.iadd``)
    else:
        if not isinstance(module, _Fn):
            module = nn.Sequential(module)  # a standard layer stays a call_module leaf
        gm = fx.symbolic_trace(module)
    g = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=g, dtype=F64) for s in shapes)
    values = record_values(gm, inputs)
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
            # (rounded to the node's dtype: a cast's meaning is the identity up to that rounding)
            want = want.to(values[node].dtype) if want.is_floating_point() else want
            assert torch.allclose(want.to(F64), values[node].to(F64), rtol=1e-10, atol=1e-10), (node.name, meaning)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    result = out.args[0]
    return meanings[result], result


def _operator_graph(op, inputs: int, constant=None) -> fx.GraphModule:
    """``op(x, y)`` (or ``op(x, constant)``) as a hand-built graph: symbolic tracing records
    ``x += y`` as ``operator.add``, dynamo graphs keep ``operator.iadd``."""
    graph = fx.Graph()
    xs = [graph.placeholder(f"x{i}") for i in range(inputs)]
    out = graph.call_function(op, (xs[0], xs[1] if inputs == 2 else constant))
    graph.output(out)
    return fx.GraphModule(nn.Module(), graph)


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
    # one row per remaining vocabulary entry (see test_every_vocabulary_entry_has_a_row)
    "torch.avg_pool1d": (lambda: Fn(lambda s, x: torch.avg_pool1d(x, 2)), [(2, 3, 6)], AffineCall, Conv),
    "F.avg_pool3d": (lambda: Fn(lambda s, x: F.avg_pool3d(x, 2)), [(1, 2, 4, 4, 4)], AffineCall, Conv),
    "AvgPool3d": (lambda: nn.AvgPool3d(2), [(1, 2, 4, 4, 4)], AffineCall, Conv),
    "torch._C._nn.pad": (lambda: Fn(lambda s, x: torch._C._nn.pad(x, (1, 2))), [(2, 3, 4)], AffineCall, Conv),
    "ZeroPad1d": (lambda: nn.ZeroPad1d(1), [(2, 3, 4)], AffineCall, Conv),
    "F.pad_negative_crops": (lambda: Fn(lambda s, x: F.pad(x, (-1, 2))), [(2, 3, 4)], AffineCall, Conv),
    "ZeroPad3d": (lambda: nn.ZeroPad3d(1), [(1, 2, 3, 3, 3)], AffineCall, Conv),
    "ConstantPad3d_zero": (lambda: nn.ConstantPad3d(1, 0.0), [(1, 2, 3, 3, 3)], AffineCall, Conv),
    "torch.conv3d": (lambda: Fn(lambda s, x: torch.conv3d(x, s.w), w=p(2, 2, 1, 2, 1)), [(1, 2, 3, 3, 3)],
                     AffineCall, Conv),
    "SyncBatchNorm_eval": (lambda: nn.SyncBatchNorm(3), [(2, 3, 4, 4)], AffineCall, Elementwise),
    "torch.dropout_eval": (lambda: Fn(lambda s, x: torch.dropout(x, 0.5, False)), [(2, 3)], AffineCall, Elementwise),
    "F.alpha_dropout_eval": (lambda: Fn(lambda s, x: F.alpha_dropout(x, 0.5, False)), [(2, 3)], AffineCall, Elementwise),
    "F.feature_alpha_dropout_eval": (lambda: Fn(lambda s, x: F.feature_alpha_dropout(x, 0.5, False)), [(2, 3, 4, 4)],
                                     AffineCall, Elementwise),
    "F.dropout1d_eval": (lambda: Fn(lambda s, x: F.dropout1d(x, training=False)), [(2, 3, 4)], AffineCall, Elementwise),
    "F.dropout2d_eval": (lambda: Fn(lambda s, x: F.dropout2d(x, training=False)), [(2, 3, 4, 4)], AffineCall,
                         Elementwise),
    "F.dropout3d_eval": (lambda: Fn(lambda s, x: F.dropout3d(x, training=False)), [(1, 2, 3, 3, 3)], AffineCall,
                         Elementwise),
    "AlphaDropout_eval": (lambda: nn.AlphaDropout(0.5), [(2, 3)], AffineCall, Elementwise),
    "FeatureAlphaDropout_eval": (lambda: nn.FeatureAlphaDropout(0.5), [(2, 3, 4, 4)], AffineCall, Elementwise),
    "Dropout1d_eval": (lambda: nn.Dropout1d(0.5), [(2, 3, 4)], AffineCall, Elementwise),
    "Dropout3d_eval": (lambda: nn.Dropout3d(0.5), [(1, 2, 3, 3, 3)], AffineCall, Elementwise),
    "torch.multiply": (lambda: Fn(lambda s, x: torch.multiply(x, 3.0)), [(2, 3)], AffineCall, Elementwise),
    "torch.true_divide": (lambda: Fn(lambda s, x: torch.true_divide(x, 4.0)), [(2, 3)], AffineCall, Elementwise),
    "torch.neg": (lambda: Fn(lambda s, x: torch.neg(x)), [(2, 3)], AffineCall, Elementwise),
    "unary_plus": (lambda: Fn(lambda s, x: +x), [(2, 3)], AffineCall, Elementwise),
    "torch.subtract": (lambda: Fn(lambda s, x, y: torch.subtract(x, y, alpha=2)), [(2, 3), (2, 3)], Combine, None),
    "torch.concatenate": (lambda: Fn(lambda s, x, y: torch.concatenate([x, y], 1)), [(2, 3), (2, 2)], Concat, None),
    "torch.mean_of_stack": (lambda: Fn(lambda s, x, y: torch.mean(torch.stack([x, y]), 0)), [(2, 3), (2, 3)],
                            Combine, None),
    "torch.sum_of_stack": (lambda: Fn(lambda s, x, y: torch.sum(torch.stack([x, y], 1), 1)), [(2, 3), (2, 3)],
                           Combine, None),
    "addmm_method": (lambda: Fn(lambda s, x: s.b.addmm(x, s.w), b=p(3), w=p(4, 3)), [(2, 4)], AffineCall, Linear),
    "matmul_method": (lambda: Fn(lambda s, x: x.matmul(s.w), w=p(4, 3)), [(2, 4)], AffineCall, Linear),
    "mm_method": (lambda: Fn(lambda s, x: x.mm(s.w), w=p(4, 3)), [(2, 4)], AffineCall, Linear),
    "clone_method": (lambda: Fn(lambda s, x: x.clone()), [(2, 3)], AffineCall, Elementwise),
    "double_of_double": (lambda: Fn(lambda s, x: x.double()), [(2, 3)], AffineCall, Elementwise),
    "to_its_own_dtype": (lambda: Fn(lambda s, x: x.to(torch.float64)), [(2, 3)], AffineCall, Elementwise),
    "type_its_own_dtype": (lambda: Fn(lambda s, x: x.type(torch.float64)), [(2, 3)], AffineCall, Elementwise),
    "type_as_its_own_dtype": (lambda: Fn(lambda s, x: x.type_as(s.c), c=torch.zeros(1)), [(2, 3)], AffineCall,
                              Elementwise),
    # (the rows are traced in float64: these casts round to another floating dtype)
    "float_cast": (lambda: Fn(lambda s, x: x.float()), [(2, 3)], AffineCall, Elementwise),
    "half_cast": (lambda: Fn(lambda s, x: x.half()), [(2, 3)], AffineCall, Elementwise),
    "bfloat16_cast": (lambda: Fn(lambda s, x: x.bfloat16()), [(2, 3)], AffineCall, Elementwise),
    "to_another_float_dtype": (lambda: Fn(lambda s, x: x.to(torch.float32)), [(2, 3)], AffineCall, Elementwise),
    "torch.permute": (lambda: Fn(lambda s, x: torch.permute(x, (0, 2, 1))), [(2, 3, 4)], Layout, None),
    "torch.reshape": (lambda: Fn(lambda s, x: torch.reshape(x, (2, -1))), [(2, 3, 4)], Layout, None),
    "torch.squeeze": (lambda: Fn(lambda s, x: torch.squeeze(x, 1)), [(2, 1, 4)], Layout, None),
    "torch.unsqueeze": (lambda: Fn(lambda s, x: torch.unsqueeze(x, 1)), [(2, 4)], Layout, None),
    "torch.swapaxes": (lambda: Fn(lambda s, x: torch.swapaxes(x, 1, 2)), [(2, 3, 4)], Layout, None),
    "torch.transpose": (lambda: Fn(lambda s, x: torch.transpose(x, 1, 2)), [(2, 3, 4)], Layout, None),
    "torch.unflatten": (lambda: Fn(lambda s, x: torch.unflatten(x, 1, (2, 2))), [(2, 4)], Layout, None),
    "flatten_method": (lambda: Fn(lambda s, x: x.flatten(1)), [(2, 3, 4)], Layout, None),
    "permute_method": (lambda: Fn(lambda s, x: x.permute(0, 2, 1)), [(2, 3, 4)], Layout, None),
    "reshape_method": (lambda: Fn(lambda s, x: x.reshape(2, -1)), [(2, 3, 4)], Layout, None),
    "reshape_as_method": (lambda: Fn(lambda s, x: x.reshape_as(s.c), c=torch.zeros(2, 12)), [(2, 3, 4)], Layout, None),
    "view_method": (lambda: Fn(lambda s, x: x.view(2, 12)), [(2, 3, 4)], Layout, None),
    "view_as_method": (lambda: Fn(lambda s, x: x.view_as(s.c), c=torch.zeros(2, 12)), [(2, 3, 4)], Layout, None),
    "squeeze_method": (lambda: Fn(lambda s, x: x.squeeze(1)), [(2, 1, 4)], Layout, None),
    "unsqueeze_method": (lambda: Fn(lambda s, x: x.unsqueeze(1)), [(2, 4)], Layout, None),
    "swapaxes_method": (lambda: Fn(lambda s, x: x.swapaxes(1, 2)), [(2, 3, 4)], Layout, None),
    "t_method": (lambda: Fn(lambda s, x: x.t()), [(2, 4)], Layout, None),
    "unflatten_method": (lambda: Fn(lambda s, x: x.unflatten(1, (2, 2))), [(2, 4)], Layout, None),
    "iadd_operator": (lambda: _operator_graph(operator.iadd, 2), [(2, 3), (2, 3)], Combine, None),
    "isub_operator": (lambda: _operator_graph(operator.isub, 2), [(2, 3), (2, 3)], Combine, None),
    "imul_operator": (lambda: _operator_graph(operator.imul, 1, 3.0), [(2, 3)], AffineCall, Elementwise),
    "itruediv_operator": (lambda: _operator_graph(operator.itruediv, 1, 2.0), [(2, 3)], AffineCall, Elementwise),
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
    "cast_to_integers": (lambda: Fn(lambda s, x: x.to(torch.int64)), [(2, 3)], "to"),
    "type_to_integers": (lambda: Fn(lambda s, x: x.type(torch.int32)), [(2, 3)], "type"),
}

OPAQUE_KINDS = {  # what kind of no each opaque row is
    "ReLU_module": OpaqueKind.UNKNOWN_OP,
    "torch.relu": OpaqueKind.UNKNOWN_OP,
    "LeakyReLU_slope": OpaqueKind.UNKNOWN_OP,
    "F.leaky_relu_slope": OpaqueKind.NOT_AFFINE,
    "PReLU_default": OpaqueKind.UNKNOWN_OP,
    "product_of_activations": OpaqueKind.PRODUCT_OF_ACTIVATIONS,
    "division_by_activation": OpaqueKind.DATA_WEIGHT,
    "floor_division": OpaqueKind.NOT_AFFINE,
    "matmul_of_activations": OpaqueKind.DATA_WEIGHT,
    "broadcasting_sum": OpaqueKind.UNSUPPORTED_FORM,
    "broadcasting_constant": OpaqueKind.UNSUPPORTED_FORM,
    "F.pad_reflect": OpaqueKind.UNSUPPORTED_FORM,
    "F.pad_value": OpaqueKind.UNSUPPORTED_FORM,
    "ConstantPad_value": OpaqueKind.UNSUPPORTED_FORM,
    "AvgPool_excluding_pad": OpaqueKind.UNSUPPORTED_FORM,
    "F.avg_pool_excluding_pad": OpaqueKind.UNSUPPORTED_FORM,
    "AvgPool_ceil_mode": OpaqueKind.UNSUPPORTED_FORM,
    "MaxPool": OpaqueKind.UNKNOWN_OP,
    "BN_batch_statistics": OpaqueKind.TRAINING,
    "F.batch_norm_training": OpaqueKind.TRAINING,
    "F.batch_norm_without_stats": OpaqueKind.TRAINING,
    "F.dropout_training": OpaqueKind.TRAINING,
    "step_slice": OpaqueKind.UNSUPPORTED_FORM,
    "two_axis_slice": OpaqueKind.UNSUPPORTED_FORM,
    "index_select": OpaqueKind.UNSUPPORTED_FORM,
    "new_axis": OpaqueKind.UNSUPPORTED_FORM,
    "cat_with_constant": OpaqueKind.CONSTANTS,
    "conv_weight_from_input": OpaqueKind.DATA_WEIGHT,
    "linear_weight_from_input": OpaqueKind.DATA_WEIGHT,
    "module_with_two_inputs": OpaqueKind.UNSUPPORTED_FORM,
    "softmax": OpaqueKind.UNKNOWN_OP,
    "stack_reduced_elsewhere": OpaqueKind.UNSUPPORTED_FORM,
    "cast_to_integers": OpaqueKind.UNKNOWN_OP,
    "type_to_integers": OpaqueKind.UNKNOWN_OP,
}


@pytest.mark.parametrize("name", list(OPAQUE))
def test_opaque_row(name):
    factory, shapes, reason = OPAQUE[name]
    meaning, _ = last_meaning(factory(), *shapes)
    assert isinstance(meaning, Opaque), meaning
    assert meaning.kind is OPAQUE_KINDS[name], meaning.kind
    assert reason in str(meaning)


def test_every_vocabulary_entry_has_a_row():
    """Each ``(kind, target)`` of :data:`VOCABULARY` is exercised by an affine or an opaque row."""
    exercised = set()
    for factory, *_ in list(AFFINE.values()) + list(OPAQUE.values()):
        module = factory().double().eval()
        if isinstance(module, fx.GraphModule):
            gm = module
        else:
            gm = fx.symbolic_trace(module if isinstance(module, _Fn) else nn.Sequential(module))
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            kind = op_kind(node)
            if kind is OpKind.MODULE:
                exercised |= {(kind, base) for base in type(modules[node.target]).__mro__} & set(VOCABULARY)
            elif kind is not None and (kind, node.target) in VOCABULARY:
                exercised.add((kind, node.target))
    missing = sorted(f"{kind.value} {getattr(target, '__name__', target)}" for kind, target in set(VOCABULARY) - exercised)
    assert not missing, missing


def test_a_subclass_with_its_own_forward_is_not_its_base():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(2, 2, 1)))
    facts = GraphFacts(gm)
    (conv,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert handler_for(conv, facts) is VOCABULARY[(OpKind.MODULE, nn.Conv2d)]
    gm.add_submodule("0", ScaledConv(2, 2, 1))
    assert handler_for(conv, GraphFacts(gm)) is None


def test_an_entry_has_one_handler():
    with pytest.raises(ValueError, match="two handlers"):
        handles(OpKind.FUNCTION, F.conv2d)(lambda node, facts: None)


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
