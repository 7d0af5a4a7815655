"""Emission (:mod:`repc.passes.emit`): canonical ops as standard torch modules and functions.

Each op is built in float32 and compared with its float64 meaning (:func:`repc.algebra.apply`);
the emitted graph holds only standard modules, ``F.pad`` and buffer arithmetic.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from repc import algebra
from repc.ops import Conv, Dense, Elementwise, Linear
from repc.passes.emit import AttributeNamer, build_op, emit_form, form_function

F64 = torch.float64


def _conv(padding=((1, 1), (1, 1)), groups=1, mode="zeros", bias=True):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4 // groups, 3, 3, generator=g, dtype=F64)
    b = torch.randn(4, generator=g, dtype=F64) if bias else None
    return Conv(w, b, (1, 1), padding, (1, 1), groups, mode)


OPS = {
    "conv": (_conv(), (2, 4, 6, 6)),
    "conv_asymmetric_padding": (_conv(padding=((0, 2), (1, 0))), (2, 4, 6, 6)),
    "conv_grouped_without_bias": (_conv(groups=2, bias=False), (2, 4, 6, 6)),
    "conv_circular": (_conv(mode="circular"), (2, 4, 6, 6)),
    "linear": (Linear(torch.randn(3, 5, dtype=F64), torch.randn(3, dtype=F64)), (2, 7, 5)),
    "elementwise": (Elementwise(torch.randn(1, 4, 1, 1, dtype=F64), torch.randn(1, 4, 1, 1, dtype=F64), (2, 4, 3, 3)),
                    (2, 4, 3, 3)),
    "dense": (Dense(torch.randn(6, 8, dtype=F64), torch.randn(6, dtype=F64), (2, 4), (3, 2)), (5, 2, 4)),
}


@pytest.mark.parametrize("name", list(OPS))
def test_built_op_computes_the_op_in_the_model_dtype(name):
    op, shape = OPS[name]
    x = torch.randn(shape, dtype=F64)
    built = build_op(op, torch.float32, torch.device("cpu"))
    got = built(x.float())
    want = algebra.apply(op, x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_emitted_form_is_a_sum_of_standard_ops_and_registers_fresh_names():
    root = nn.Module()
    root.register_buffer("fused", torch.zeros(1))  # a name already taken
    namer = AttributeNamer(root)
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    conv, shift = _conv(padding=((0, 2), (1, 1))), Elementwise(None, torch.ones(1, 4, 1, 1, dtype=F64), (2, 4, 6, 6))
    out = emit_form(graph, namer, {a: conv, b: shift}, lambda n: n, "fused", torch.float32, torch.device("cpu"))
    graph.output(out)
    gm = fx.GraphModule(root, graph)
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_module", "get_attr")]
    assert F.pad in targets and operator.add in targets
    assert all(isinstance(gm.get_submodule(n.target), nn.Conv2d) for n in gm.graph.nodes if n.op == "call_module")
    assert "fused" not in [n.target for n in gm.graph.nodes if n.op == "call_module"]  # a fresh name, not the buffer's
    xa, xb = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    want = algebra.apply(conv, xa.double()) + algebra.apply(shift, xb.double())
    torch.testing.assert_close(gm(xa, xb).double(), want, rtol=1e-5, atol=1e-5)
    run = form_function({a: conv, b: shift}, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(run(xa, xb), gm(xa, xb))
