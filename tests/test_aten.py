"""repc.aten: every ATen op export produces is written as a torch-level call computing the same."""

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from repc.aten import LOWERINGS, SAME_SIGNATURE, lower_aten, lowering

aten = torch.ops.aten
x4 = torch.randn(2, 6, 5, 5)
x3 = torch.randn(2, 5, 6)
w = torch.randn(4, 6, 3, 3)
lin = torch.randn(3, 6)

# (ATen overload, its arguments, the torch-level target it must become)
ROWS = [
    (aten.conv2d.default, (x4, w, torch.randn(4), [1, 1], [1, 1], [1, 1], 1), torch.conv2d),
    (aten.linear.default, (x3, lin, torch.randn(3)), F.linear),
    (aten.batch_norm.default, (x4, torch.rand(6), torch.randn(6), torch.randn(6), torch.rand(6) + 0.5, False, 0.1,
                               1e-5, False), torch.batch_norm),
    (aten.layer_norm.default, (x3, [6], torch.rand(6), torch.randn(6), 1e-5, True), F.layer_norm),
    (aten.group_norm.default, (x4, 3, torch.rand(6), torch.randn(6), 1e-5, True), F.group_norm),
    (aten.avg_pool2d.default, (x4, [3, 3], [], [1, 1], False, False), F.avg_pool2d),
    (aten.constant_pad_nd.default, (x4, [1, 2, 0, 1], 0.0), F.pad),
    (aten.slice.Tensor, (x4, 1, 2, 5), operator.getitem),
    (aten.slice.Tensor, (x4, -1, 1, 9223372036854775807, 2), operator.getitem),
    (aten.select.int, (x4, 2, 3), operator.getitem),
    (aten.split_with_sizes.default, (x4, [2, 4], 1), torch.split),
    (aten.split.Tensor, (x4, 3, 1), torch.split),
    (aten.chunk.default, (x4, 2, 1), torch.chunk),
    (aten.view.default, (x4, [2, 6, 25]), "view"),
    (aten.view_as.default, (x4.flatten(2), x4), "view_as"),
    (aten.reshape_as.default, (x4.flatten(0, 1), x4), "reshape_as"),  # (LeViT's BN1d over flattened tokens)
    (aten.expand.default, (torch.randn(1, 6, 1, 1), [2, 6, 5, 5]), "expand"),
    (aten.t.default, (lin,), "t"),
    (aten._to_copy.default, (x4,), "to"),
    (aten.dropout.default, (x4, 0.5, False), torch.dropout),
    (aten.add.Tensor, (x4, x4 * 2), torch.add),
    (aten.mul.Tensor, (x4, 0.5), torch.mul),
    (aten.cat.default, ([x4, x4], 1), torch.cat),
    (aten.permute.default, (x4, [0, 2, 3, 1]), torch.permute),
    (aten.mean.dim, (x4, [0]), torch.mean),
    (aten.gelu.default, (x4,), F.gelu),
    (aten.leaky_relu.default, (x4, 1.0), F.leaky_relu),
]


def one_op_graph(op, args, kwargs=None):
    graph = fx.Graph()
    tensors = {}

    def placeholder(value):
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value
            return graph.placeholder(name)
        if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            return [placeholder(v) for v in value]
        return value

    node_args = tuple(placeholder(a) for a in args)
    graph.output(graph.call_function(op, node_args, kwargs or {}))
    return fx.GraphModule(torch.nn.Module(), graph), list(tensors.values())


@pytest.mark.parametrize("op, args, target", ROWS, ids=[str(r[0]) for r in ROWS])
def test_each_lowering_computes_what_the_aten_op_computes(op, args, target):
    gm, inputs = one_op_graph(op, args)
    want = gm(*inputs)
    assert lower_aten(gm) == 1
    (node,) = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert node.target == target
    got = gm(*inputs)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(a, b)


def test_a_slice_over_the_whole_axis_is_removed():
    gm, inputs = one_op_graph(aten.slice.Tensor, (x4, 0, 0, 9223372036854775807))
    assert lower_aten(gm) == 1
    assert not [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert torch.equal(gm(*inputs), x4)


class _CastThenResidual(torch.nn.Module):
    """An RMSNorm's ``x.to(torch.float32)`` on a float32 ``x`` (the same tensor back), then a
    residual that reads ``x``."""

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + h.to(torch.float64).to(x.dtype)


def test_a_cast_to_the_dtype_its_input_has_is_removed_and_its_readers_read_the_input():
    x = torch.randn(2, 5)
    gm = torch.export.export(_CastThenResidual(), (x,)).graph_module
    lower_aten(gm)
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert [c.args[1] for c in casts] == [torch.float64, torch.float32]  # (the casts that change the dtype stay)
    (placeholder,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    residual = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.add, operator.add)]
    assert residual and placeholder in residual[-1].all_input_nodes  # (export had it read the cast)
    assert torch.allclose(gm(x)[0], _CastThenResidual()(x))


def test_an_in_place_op_becomes_the_tensor_method_of_its_name():
    gm, inputs = one_op_graph(aten.relu_.default, (torch.randn(3, 4),))
    lower_aten(gm)
    (node,) = [n for n in gm.graph.nodes if n.op == "call_method"]
    assert node.target == "relu_"


def test_an_op_outside_the_table_stays_the_aten_call():
    gm, inputs = one_op_graph(aten.cumsum.default, (torch.randn(3, 4), 1))
    assert lower_aten(gm) == 0
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert lowering(node) is None and node.target is aten.cumsum.default


def test_the_same_signature_rows_are_torch_functions_of_the_same_name():
    for name in SAME_SIGNATURE:
        assert LOWERINGS[getattr(aten, name)](torch.zeros(1)).target is getattr(torch, name)
