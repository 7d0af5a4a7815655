"""The canonical ops (:mod:`repc.ops`): their derived fields, costs and guards."""

from __future__ import annotations

import pytest
import torch

from repc.ops import (Conv, Dense, Elementwise, Float64Field, Linear, NotMergeable, conv_out_size, flops, identity,
                      params)
from repc.reasons import MergeKind

F64 = torch.float64


def test_conv_fields():
    conv = Conv(torch.zeros(6, 2, 3, 1, dtype=F64), None, (2, 1), ((1, 1), (0, 0)), (1, 1), 2)
    assert (conv.nd, conv.out_channels, conv.in_channels, conv.kernel_size) == (2, 6, 4, (3, 1))
    assert not conv.is_pointwise
    assert Conv(torch.zeros(2, 2, 1, 1, dtype=F64), None, (1, 1), ((0, 0), (0, 0)), (1, 1), 1).is_pointwise


def test_costs_count_multiply_adds_and_parameters():
    conv = Conv(torch.zeros(8, 4, 3, 3, dtype=F64), torch.zeros(8, dtype=F64), (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert flops(conv, (2, 4, 5, 5), (2, 8, 5, 5)) == 2 * 8 * 5 * 5 * 4 * 9
    assert params(conv) == 8 * 4 * 9 + 8
    linear = Linear(torch.zeros(3, 5, dtype=F64), None)
    assert flops(linear, (7, 5), (7, 3)) == 7 * 3 * 5 and params(linear) == 15
    assert conv_out_size(7, 3, 2, (1, 1), 1) == 4


def test_identity_and_constant_elementwise_maps():
    assert identity((2, 3)).is_identity
    ew = Elementwise(None, torch.ones(1, 3, dtype=F64), (2, 3))
    assert not ew.is_identity and ew.ndim == 2


def test_channel_vectors_of_a_per_channel_map_and_the_guard_of_one_that_is_not():
    scale = torch.arange(3, dtype=F64).reshape(1, 3, 1, 1)
    ew = Elementwise(scale, None, (2, 3, 4, 4))
    s, t = ew.channel_vectors(1)
    assert torch.equal(s, torch.arange(3, dtype=F64)) and torch.equal(t, torch.zeros(3, dtype=F64))
    spatial = Elementwise(torch.ones(1, 3, 4, 1, dtype=F64), None, (2, 3, 4, 4))
    with pytest.raises(NotMergeable) as caught:
        spatial.channel_vectors(1)
    assert caught.value.kind is MergeKind.AXIS and "varies along axes [2]" in str(caught.value)


def test_dense_map_fields():
    dense = Dense(torch.zeros(6, 8, dtype=F64), None, (2, 4), (3, 2))
    assert params(dense) == 48 and "Dense" in repr(dense)


def test_a_conv_or_linear_holds_the_tensors_it_is_given_and_reads_them_in_float64():
    weight = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    bias = torch.randn(6, dtype=torch.bfloat16)
    linear = Linear(weight, bias)
    # held as given: the parameter's storage, no copy, not the parameter object itself
    assert Float64Field.stored(linear, "weight").data_ptr() == weight.data_ptr()
    assert not Float64Field.stored(linear, "weight").requires_grad
    # read in float64, a copy of its own at each read: writing into it leaves the parameter alone
    read = linear.weight
    assert read.dtype == F64 and torch.equal(read, weight.detach().double())
    read.zero_()
    assert weight.abs().sum() > 0 and linear.weight.abs().sum() > 0
    assert linear.bias.dtype == F64 and torch.equal(linear.bias, bias.double())
    # shapes and counts come from what it holds, and a replacement passes on what it holds
    assert (linear.in_features, linear.out_features, params(linear)) == (4, 6, 30)
    unbiased = linear.replace(bias=None)
    assert unbiased.bias is None and Float64Field.stored(unbiased, "weight").data_ptr() == weight.data_ptr()
    # a float64 tensor of its own (a closed form's result) is read as it is
    merged = Linear(torch.zeros(2, 3, dtype=F64), None)
    assert merged.weight is Float64Field.stored(merged, "weight")
    conv = Conv(torch.zeros(8, 2, 3, 3, dtype=torch.float16), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 2)
    assert (conv.in_channels, conv.kernel_size, conv.weight.dtype) == (4, (3, 3), F64)
    assert Float64Field.stored(conv.replace(groups=2), "weight").dtype == torch.float16
