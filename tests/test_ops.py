"""The canonical ops (:mod:`repc.ops`): their derived fields, costs and guards."""

from __future__ import annotations

import pytest
import torch

from repc.ops import Conv, Dense, Elementwise, Linear, NotMergeable, conv_out_size, flops, identity, params
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
