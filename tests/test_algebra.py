"""Every closed form of :mod:`repc.algebra`, checked numerically against torch's own
``F.conv*`` / ``F.linear`` / ``F.batch_norm`` / ``F.avg_pool*`` / ``F.pad`` in float64, and the
guards that raise :class:`NotMergeable` where a closed form would not be exact.

A merged op is evaluated by :func:`run` below (``F.pad`` then ``F.convNd``), never by repc's
emitter; the ops it replaces are evaluated with torch's functions on their own parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repc import algebra
from repc.ops import Conv, Elementwise, Linear, NotMergeable

from blocks import CONV_FN
from blocks import run_op as run

F64 = torch.float64
TOL = 1e-10


# ----------------------------------------------------------------------------- helpers

def rnd(*shape, seed=None):
    g = torch.Generator().manual_seed(hash(shape) % 2**31 if seed is None else seed)
    return torch.randn(shape, generator=g, dtype=F64)


def conv(cin, cout, k, *, stride=1, padding=0, dilation=1, groups=1, bias=True, nd=2, mode="zeros", seed=0) -> Conv:
    """A random canonical conv; ``padding`` an int, a per-axis int tuple, or per-axis (lo, hi) pairs."""
    k = (k,) * nd if isinstance(k, int) else tuple(k)
    per_axis = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)
    pad = tuple(p if isinstance(p, tuple) else (p, p) for p in per_axis(padding))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((cout, cin // groups) + k, generator=g, dtype=F64)
    b = torch.randn(cout, generator=g, dtype=F64) if bias else None
    return Conv(w, b, per_axis(stride), pad, per_axis(dilation), groups, mode)


def torch_conv(op: Conv, x):
    """The original conv as torch computes it: symmetric padding handed to ``F.convNd`` itself."""
    if all(lo == hi for lo, hi in op.padding) and op.padding_mode == "zeros":
        return CONV_FN[op.nd](x, op.weight, op.bias, op.stride, tuple(lo for lo, _ in op.padding), op.dilation,
                              op.groups)
    return run(op, x)


def close(a, b, tol=TOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


def per_channel(shape, axis=1, seed=0, shift=True):
    """A random per-channel Elementwise on ``axis`` of an activation of ``shape``."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(view, generator=g, dtype=F64) + 0.5
    t = torch.randn(view, generator=g, dtype=F64) if shift else None
    return Elementwise(s, t, tuple(shape))


# ----------------------------------------------------------------------------- basic maps

@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_affine_matches_eval_batch_norm(affine):
    c = 5
    mean, var = rnd(c, seed=1), rnd(c, seed=2).abs() + 0.1
    weight, bias = (rnd(c, seed=3), rnd(c, seed=4)) if affine else (None, None)
    x = rnd(3, c, 4, 4)
    scale, shift = algebra.batchnorm_affine(mean, var, 1e-3, weight, bias)
    want = F.batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-3)
    close(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1), want)
    assert scale.dtype == shift.dtype == F64



@pytest.mark.parametrize("bias", [True, False])
def test_a_scale_without_shift_after_a_conv_gives_a_bias_only_where_the_conv_has_one(bias):
    # (a LoRA's scaling of a bias-free conv: the merged conv has no bias, as the architecture's)
    conv = Conv(rnd(4, 3, 3, 3, seed=1), rnd(4, seed=2) if bias else None, (1, 1), ((1, 1), (1, 1)), (1, 1))
    scale = per_channel((2, 4, 5, 5), shift=False)
    merged = algebra.compose(conv, scale)
    assert (merged.bias is not None) == bias
    x = rnd(2, 3, 5, 5, seed=3)
    close(run(merged, x), run(scale, run(conv, x)))


def test_batchnorm_affine_computes_in_float64():
    mean = torch.tensor([1e4], dtype=torch.float32)
    var = torch.tensor([1e-6], dtype=torch.float32)
    scale, shift = algebra.batchnorm_affine(mean, var, 1e-5, None, None)
    assert scale.dtype == F64
    assert abs(float(shift) + 1e4 / math.sqrt(float(var.double()) + 1e-5)) < 1e-6


@pytest.mark.parametrize("groups,new_groups", [(4, 1), (4, 2), (6, 3), (6, 2), (2, 2), (12, 1), (12, 4)])
def test_regroup_computes_the_same_conv(groups, new_groups):
    op = conv(24, 12, (3, 2), groups=groups)
    w = algebra.regroup(op.weight, groups, new_groups)
    assert w.shape == (12, 24 // new_groups, 3, 2)
    x = rnd(2, 24, 6, 5)
    close(F.conv2d(x, w, op.bias, groups=new_groups), F.conv2d(x, op.weight, op.bias, groups=groups))


def test_regroup_refuses_a_group_count_that_does_not_divide():
    op = conv(12, 12, 3, groups=4)
    with pytest.raises(NotMergeable, match="regroup"):
        algebra.regroup(op.weight, 4, 3)


@pytest.mark.parametrize("cin,cout,groups", [(8, 8, 8), (8, 16, 4), (12, 6, 3), (6, 6, 2), (4, 8, 1)])
def test_compact_groups_recovers_block_diagonal_structure(cin, cout, groups):
    op = conv(cin, cout, 3, padding=1, groups=groups)
    dense = op.replace(weight=algebra.regroup(op.weight, groups, 1), groups=1)
    compact = algebra.compact_groups(dense)
    assert compact.groups == groups
    x = rnd(2, cin, 5, 5)
    close(run(compact, x), run(op, x))


def test_compact_groups_keeps_a_dense_kernel_and_only_coarsens():
    dense = conv(6, 6, 3, padding=1)
    assert algebra.compact_groups(dense).groups == 1
    # a grouped conv whose kernel is depthwise in fact: compacted to depthwise
    dw = conv(6, 6, 3, padding=1, groups=6)
    as_two = dw.replace(weight=algebra.regroup(dw.weight, 6, 2), groups=2)
    assert algebra.compact_groups(as_two).groups == 6


@pytest.mark.parametrize("nd,kernel,stride,padding,divisor", [
    (2, (3, 3), (1, 1), (1, 1), None),
    (2, (2, 3), (2, 1), (1, 0), None),
    (2, (3, 3), (2, 2), (0, 0), 5),
    (1, (3,), (2,), (1,), None),
    (3, (2, 2, 2), (1, 1, 1), (1, 0, 1), None),
])
def test_avg_pool_as_conv_counting_pad(nd, kernel, stride, padding, divisor):
    c = 3
    x = rnd(*((2, c) + (7,) * nd))
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    kwargs = {"count_include_pad": True}
    if divisor is not None:
        kwargs["divisor_override"] = divisor
    want = pool(x, kernel, stride, padding, **kwargs)
    close(run(algebra.avg_pool_as_conv(c, kernel, stride, padding, divisor), x), want)


def test_avg_pool_as_conv_differs_when_padding_is_not_counted():
    """The guard lives in normalize: the closed form assumes count_include_pad."""
    x = rnd(1, 2, 5, 5)
    op = algebra.avg_pool_as_conv(2, (3, 3), (1, 1), (1, 1), None)
    excl = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    assert float((run(op, x) - excl).abs().max()) > 1e-3


def test_zero_pad_as_conv_is_f_pad():
    x = rnd(2, 3, 4, 5)
    op = algebra.zero_pad_as_conv(3, ((1, 2), (0, 3)))
    close(run(op, x), F.pad(x, (0, 3, 1, 2)))


def test_elementwise_as_conv_and_as_linear():
    x = rnd(2, 4, 3, 3)
    ew = per_channel(x.shape)
    close(run(algebra.elementwise_as_conv(ew, 2), x), run(ew, x))
    z = rnd(5, 6)
    ew = per_channel(z.shape, axis=1)
    close(run(algebra.elementwise_as_linear(ew), z), run(ew, z))
    with pytest.raises(NotMergeable, match="3-d"):
        algebra.elementwise_as_conv(per_channel((2, 4, 3)), 2)


def test_elementwise_varying_off_the_channel_axis_is_not_a_conv():
    spatial = Elementwise(rnd(1, 1, 3, 3), None, (2, 4, 3, 3))
    with pytest.raises(NotMergeable, match="varies along axes"):
        algebra.elementwise_as_conv(spatial, 2)


# ----------------------------------------------------------------------------- compose

COMPOSE_CASES = {
    # name: (first, second, input spatial size)
    "kxk_then_1x1": (conv(4, 6, 3, padding=1), conv(6, 5, 1, seed=1), 6),
    "1x1_then_kxk_unpadded": (conv(4, 6, 1), conv(6, 5, 3, seed=1), 6),
    "kxk_then_kxk_unpadded": (conv(4, 6, 3, padding=1), conv(6, 5, 3, seed=1), 7),
    "stride_then_stride": (conv(4, 6, 3, stride=2, padding=1), conv(6, 5, 3, stride=2, seed=1), 13),
    "stride_then_pointwise_stride": (conv(4, 6, 3, stride=1), conv(6, 5, 1, stride=2, seed=1), 9),
    "dilated_then_plain": (conv(4, 6, 3, dilation=2, padding=2), conv(6, 5, 3, seed=1), 9),
    "plain_then_dilated": (conv(4, 6, 3), conv(6, 5, 3, dilation=3, seed=1), 12),
    "stride2_then_dilated2": (conv(4, 4, 3, stride=2), conv(4, 4, 2, dilation=2, seed=1), 13),
    "groups_2_then_4": (conv(8, 8, 3, groups=2, padding=1), conv(8, 12, 3, groups=4, seed=1), 6),
    "depthwise_then_pointwise": (conv(6, 6, 3, groups=6, padding=1), conv(6, 4, 1, seed=1), 5),
    "pointwise_then_depthwise": (conv(6, 6, 1, groups=3), conv(6, 6, 3, groups=6, seed=1), 5),
    "asymmetric_1x3_then_3x1": (conv(4, 4, (1, 3), padding=(0, 1)), conv(4, 4, (3, 1), seed=1), 6),
    "asymmetric_padding_first": (conv(4, 4, (2, 3), padding=((0, 1), (1, 1))), conv(4, 4, 2, seed=1), 6),
    "conv1d": (conv(4, 6, 5, padding=2, nd=1, stride=2), conv(6, 3, 3, nd=1, dilation=2, seed=1), 17),
    "conv3d": (conv(2, 3, 3, padding=1, nd=3), conv(3, 2, 2, nd=3, seed=1), 4),
    "no_bias": (conv(4, 6, 3, bias=False), conv(6, 5, 3, bias=False, seed=1), 7),
    "reflect_first": (conv(4, 6, 3, padding=1, mode="reflect"), conv(6, 5, 1, seed=1), 6),
    # the second conv pads: exact only after a stride-1 pointwise map without bias
    "pointwise_no_bias_then_padded": (conv(4, 6, 1, bias=False), conv(6, 5, 3, padding=1, seed=1), 6),
    "pointwise_zero_bias_then_padded": (conv(4, 6, 1).replace(bias=torch.zeros(6, dtype=F64)),
                                        conv(6, 5, 3, padding=(1, 2), seed=1), 6),
    "padded_pointwise_then_padded": (conv(4, 6, 1, bias=False, padding=1), conv(6, 5, 3, padding=1, seed=1), 5),
    "grouped_pointwise_then_padded_dilated": (conv(4, 6, 1, bias=False, groups=2),
                                              conv(6, 6, 3, padding=2, dilation=2, groups=3, seed=1), 7),
    # ... or after a conv that spans one position with stride 1 along each axis the second pads
    # (RepNeXt's separable pairs: 1xk then kx1, depthwise, no bias between)
    "1x7_then_padded_7x1_depthwise": (conv(4, 4, (1, 7), padding=(0, 3), groups=4, bias=False),
                                      conv(4, 4, (7, 1), padding=(3, 0), groups=4, seed=1), 9),
    "1x3_stride_1x2_then_padded_3x1_stride_2x1": (conv(4, 4, (1, 3), stride=(1, 2), padding=(0, 1), groups=4,
                                                       bias=False),
                                                  conv(4, 4, (3, 1), stride=(2, 1), padding=(1, 0), groups=4, seed=1),
                                                  9),
    "1x5_dilated_then_padded_5x1_dense": (conv(4, 6, (1, 5), dilation=(1, 2), padding=(0, 4), bias=False),
                                          conv(6, 5, (5, 1), padding=(2, 0), seed=1), 11),
}


@pytest.mark.parametrize("name", list(COMPOSE_CASES))
def test_compose_conv(name):
    first, second, size = COMPOSE_CASES[name]
    merged = algebra.compose_conv(first, second)
    for n in (size, size + 1, size + 4):
        x = rnd(*((2, first.in_channels) + (n,) * first.nd), seed=n)
        close(run(merged, x), torch_conv(second, torch_conv(first, x)))


@pytest.mark.parametrize("first,second,match", [
    (conv(4, 6, 1), conv(6, 5, 3, padding=1), "border"),  # biased 1x1 (e.g. folded BN) then padded kxk
    (conv(4, 6, 3), conv(6, 5, 3, padding=1), "one position"),
    (conv(4, 6, 1, stride=2, bias=False), conv(6, 5, 3, padding=1), "one position"),
    (conv(4, 4, (3, 1), padding=(1, 0), bias=False), conv(4, 4, (3, 1), padding=(1, 0)), "one position"),
    (conv(4, 4, (1, 3), padding=(0, 1)), conv(4, 4, (3, 1), padding=(1, 0)), "border"),  # a bias between them
    (conv(4, 6, 1, bias=False), conv(6, 5, 3, padding=1, mode="reflect"), "padding modes"),
    (conv(4, 6, 1), conv(5, 5, 1), "channel"),
    (conv(4, 6, 1, nd=1), conv(6, 5, 1), "dimensionality"),
])
def test_compose_conv_guards(first, second, match):
    with pytest.raises(NotMergeable, match=match):
        algebra.compose_conv(first, second)


def test_the_border_guard_is_needed():
    """What the 'border' guard protects: merging a biased 1x1 into a padded 3x3 is wrong at the border."""
    first, second = conv(2, 2, 1), conv(2, 2, 3, padding=1, seed=1)
    naive = algebra.compose_conv(first.replace(bias=None), second)
    naive = naive.replace(bias=naive.bias + second.weight.sum((2, 3)) @ first.bias)
    x = rnd(1, 2, 5, 5)
    err = (run(naive, x) - torch_conv(second, torch_conv(first, x))).abs()
    assert float(err[..., 1:-1, 1:-1].max()) < 1e-10 and float(err.max()) > 1e-3


@pytest.mark.parametrize("pair", ["ew_then_conv", "conv_then_ew", "linear_then_ew", "ew_then_linear", "linear_then_linear",
                                  "ew_then_ew", "identity_first", "identity_second", "constant_second"])
def test_compose_dispatch(pair):
    x4, x2 = rnd(2, 4, 5, 5), rnd(3, 4)
    c = conv(4, 3, 3)
    lin, lin2 = Linear(rnd(6, 4), rnd(6)), Linear(rnd(2, 6), rnd(2))
    cases = {
        "ew_then_conv": (per_channel(x4.shape), c, x4),
        "conv_then_ew": (conv(4, 3, 3, padding=1), per_channel((2, 3, 5, 5)), x4),
        "linear_then_ew": (lin, per_channel((3, 6)), x2),
        "ew_then_linear": (per_channel((3, 4)), lin, x2),
        "linear_then_linear": (lin, lin2, x2),
        "ew_then_ew": (per_channel(x4.shape, seed=1), per_channel(x4.shape, seed=2), x4),
        "identity_first": (Elementwise(None, None, tuple(x4.shape)), c, x4),
        "identity_second": (c, Elementwise(None, None, (2, 3, 3, 3)), x4),
        # a constant map (zero scale) after a conv that changes channels and size
        "constant_second": (c, Elementwise(torch.zeros(1, 1, 1, 1, dtype=F64), rnd(1, 3, 1, 1), (2, 3, 3, 3)), x4),
    }
    first, second, x = cases[pair]
    close(run(algebra.compose(first, second), x), run(second, run(first, x)))


def test_compose_guards():
    with pytest.raises(NotMergeable, match="border"):  # BN (shift) before a zero-padded conv
        algebra.compose(per_channel((2, 4, 5, 5)), conv(4, 3, 3, padding=1))
    with pytest.raises(NotMergeable, match="feature"):
        algebra.compose_linear(Linear(rnd(6, 4), None), Linear(rnd(2, 5), None))
    with pytest.raises(NotMergeable, match="varies along axes"):  # a spatial scale after a conv
        algebra.compose(conv(4, 3, 3), Elementwise(rnd(1, 1, 3, 3), None, (2, 3, 3, 3)))
    with pytest.raises(NotMergeable, match="no closed form"):
        algebra.compose(conv(4, 3, 1), Linear(rnd(2, 3), None))


def test_bn_before_unpadded_conv_composes():
    bn = per_channel((2, 4, 6, 6))
    c = conv(4, 3, 3, stride=2)
    x = rnd(2, 4, 6, 6)
    close(run(algebra.compose(bn, c), x), torch_conv(c, run(bn, x)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compose_conv_property(data):
    """Random conv pairs whose second conv does not pad: the closed form always applies and is exact."""
    nd = data.draw(st.sampled_from([1, 2]))
    g1, g2 = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 2, 4]))
    cin, mid, cout = 4, 4, data.draw(st.sampled_from([4, 8]))
    k1 = tuple(data.draw(st.integers(1, 3)) for _ in range(nd))
    k2 = tuple(data.draw(st.integers(1, 3)) for _ in range(nd))
    s1 = tuple(data.draw(st.integers(1, 2)) for _ in range(nd))
    s2 = tuple(data.draw(st.integers(1, 2)) for _ in range(nd))
    d1 = tuple(data.draw(st.integers(1, 2)) for _ in range(nd))
    d2 = tuple(data.draw(st.integers(1, 3)) for _ in range(nd))
    p1 = tuple((data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))) for _ in range(nd))
    first = conv(cin, mid, k1, stride=s1, padding=p1, dilation=d1, groups=g1, bias=data.draw(st.booleans()), nd=nd)
    second = conv(mid, cout, k2, stride=s2, dilation=d2, groups=g2, bias=data.draw(st.booleans()), nd=nd, seed=1)
    merged = algebra.compose_conv(first, second)
    for n in (30, 33):
        x = rnd(*((1, cin) + (n,) * nd), seed=n)
        close(run(merged, x), torch_conv(second, torch_conv(first, x)))


# ----------------------------------------------------------------------------- sums

ADD_CASES = {
    # name: (a, b, input spatial size): the sum is exact for every input size
    "3x3_plus_1x1": (conv(4, 6, 3, padding=1), conv(4, 6, 1, seed=1), 6),
    # different dilations: the coarser kernel spreads onto the finer grid (gcd of the dilations)
    "3x3_plus_3x3_dilated_2": (conv(4, 4, 3, padding=1), conv(4, 4, 3, padding=2, dilation=2, seed=1), 7),
    "dilated_2_plus_dilated_3": (conv(4, 4, 3, padding=2, dilation=2),
                                 conv(4, 4, 3, padding=3, dilation=3, seed=1), 9),
    "dilated_4_plus_dilated_2_stride2": (conv(4, 4, 3, padding=4, dilation=4, stride=2),
                                         conv(4, 4, 3, padding=2, dilation=2, stride=2, seed=1), 11),
    "5x5_plus_3x3_plus_offsets": (conv(4, 6, 5, padding=2), conv(4, 6, 3, padding=1, seed=1), 6),
    "1x3_plus_3x1": (conv(4, 6, (1, 3), padding=(0, 1)), conv(4, 6, (3, 1), padding=(1, 0), seed=1), 6),
    "1x5_plus_3x3": (conv(4, 6, (1, 5), padding=(0, 2)), conv(4, 6, 3, padding=1, seed=1), 7),
    "stride2_3x3_plus_1x1": (conv(4, 6, 3, stride=2, padding=1), conv(4, 6, 1, stride=2, seed=1), 9),
    "groups_2_plus_4": (conv(8, 8, 3, padding=1, groups=2), conv(8, 8, 3, padding=1, groups=4, seed=1), 5),
    "groups_4_plus_6_gcd_2": (conv(12, 12, 3, padding=1, groups=4), conv(12, 12, 1, groups=6, seed=1), 5),
    "depthwise_plus_dense": (conv(6, 6, 3, padding=1, groups=6), conv(6, 6, 1, seed=1), 5),
    "dilated_plus_1x1": (conv(4, 4, 3, padding=2, dilation=2), conv(4, 4, 1, seed=1), 9),
    "dilated_5x5_plus_dilated_3x3": (conv(4, 4, 5, padding=4, dilation=2), conv(4, 4, 3, padding=2, dilation=2, seed=1), 9),
    "same_even_kernels": (conv(4, 4, 4, padding=((1, 2), (1, 2))), conv(4, 4, 2, padding=((0, 1), (0, 1)), seed=1), 6),
    "conv1d": (conv(4, 4, 5, padding=2, nd=1), conv(4, 4, 3, padding=1, nd=1, seed=1), 9),
    "conv3d": (conv(2, 2, 3, padding=1, nd=3), conv(2, 2, 1, nd=3, seed=1), 4),
    "no_bias_plus_bias": (conv(4, 4, 3, padding=1, bias=False), conv(4, 4, 1, seed=1), 5),
    "reflect_plus_unpadded_1x1": (conv(4, 4, 3, padding=1, mode="reflect"), conv(4, 4, 1, seed=1), 5),
}


@pytest.mark.parametrize("name", list(ADD_CASES))
def test_add_convs(name):
    a, b, size = ADD_CASES[name]
    merged = algebra.add_convs(a, b)
    assert merged.groups == math.gcd(a.groups, b.groups)
    for n in (size, size + 1, size + 3):
        x = rnd(*((2, a.in_channels) + (n,) * a.nd), seed=n)
        close(run(merged, x), torch_conv(a, x) + torch_conv(b, x))


@pytest.mark.parametrize("a,b,match", [
    (conv(4, 4, 3, padding=1, stride=2), conv(4, 4, 1), "strides differ"),
    (conv(4, 4, 3, padding=2, dilation=2), conv(4, 4, 3, padding=1, dilation=2), "offset|align"),
    (conv(4, 4, 3), conv(4, 4, 1), "padding offsets differ"),  # 3x3 'valid' vs 1x1: grids differ
    (conv(4, 4, 3, padding=1), conv(6, 4, 1), "input channel"),
    (conv(4, 4, 3, padding=1, mode="reflect"), conv(4, 4, 3, padding=1, mode="circular"), "padding modes differ"),
    (conv(4, 4, 3, padding=1, nd=1), conv(4, 4, 1), "dimensionality"),
])
def test_add_convs_guards(a, b, match):
    with pytest.raises(NotMergeable, match=match):
        algebra.add_convs(a, b)


def test_add_dispatch():
    x4, x2 = rnd(2, 4, 5, 5), rnd(3, 4)
    c = conv(4, 4, 3, padding=1)
    identity = Elementwise(None, None, tuple(x4.shape))
    bn_identity = per_channel(x4.shape)
    constant = Elementwise(torch.zeros(1, 1, 1, 1, dtype=F64), rnd(1, 4, 1, 1), tuple(x4.shape))
    lin = Linear(rnd(4, 4), rnd(4))
    for a, b, x in [(c, identity, x4), (bn_identity, c, x4), (c, constant, x4), (lin, per_channel((3, 4)), x2),
                    (lin, Linear(rnd(4, 4, seed=5), None), x2), (per_channel(x4.shape, seed=1), bn_identity, x4),
                    (identity, identity, x4),
                    (lin, Elementwise(torch.zeros(1, 1, dtype=F64), rnd(1, 4), (3, 4)), x2)]:
        close(run(algebra.add(a, b), x), run(a, x) + run(b, x))
    with pytest.raises(NotMergeable, match="shapes"):
        algebra.add(lin, Linear(rnd(5, 4), None))
    with pytest.raises(NotMergeable, match="varies along axes"):  # a positional embedding is not a bias
        algebra.add(c, Elementwise(torch.zeros(1, 1, 1, 1, dtype=F64), rnd(1, 4, 5, 5), tuple(x4.shape)))


def test_identity_branch_in_grouped_sum_is_the_centre_tap():
    c = conv(8, 8, 3, padding=1, groups=4)
    merged = algebra.add(c, Elementwise(None, None, (1, 8, 5, 5)))
    assert merged.groups == 4
    centre = merged.weight[:, :, 1, 1] - c.weight[:, :, 1, 1]
    want = torch.zeros(8, 2, dtype=F64)
    want[range(8), [0, 1] * 4] = 1.0
    close(centre, want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_centred_branches_always_add(data):
    """Branches with odd kernels centred by their padding, one stride, one dilation (or 1x1),
    groups dividing the channels: the sum never raises and is exact at every input size."""
    nd = data.draw(st.sampled_from([1, 2]))
    stride = data.draw(st.integers(1, 2))
    dil = data.draw(st.integers(1, 2))
    n_branches = data.draw(st.integers(2, 4))
    convs = []
    for i in range(n_branches):
        k = tuple(data.draw(st.sampled_from([1, 3, 5])) for _ in range(nd))
        g = data.draw(st.sampled_from([1, 2, 4]))
        d = tuple(dil if kk > 1 else data.draw(st.integers(1, 3)) for kk in k)
        pad = tuple(dd * (kk - 1) // 2 for kk, dd in zip(k, d))
        convs.append(conv(8, 4, k, stride=stride, padding=pad, dilation=d, groups=g, nd=nd,
                          bias=data.draw(st.booleans()), seed=i))
    merged = convs[0]
    for c in convs[1:]:
        merged = algebra.add(merged, c)
    for n in (9, 12):
        x = rnd(*((1, 8) + (n,) * nd), seed=n)
        close(run(merged, x), sum(torch_conv(c, x) for c in convs))


def test_scale_op():
    x = rnd(2, 4, 5, 5)
    for op in (conv(4, 3, 3, padding=1), conv(4, 3, 3, bias=False), per_channel(x.shape)):
        close(run(algebra.scale_op(op, -0.75), x), -0.75 * run(op, x))
    lin, z = Linear(rnd(3, 4), rnd(3)), rnd(2, 4)
    close(run(algebra.scale_op(lin, 2.5), z), 2.5 * run(lin, z))


# ----------------------------------------------------------------------------- concat and slices

def test_concat_convs_of_different_kernels():
    a, b = conv(4, 3, 3, padding=1), conv(4, 2, (1, 3), padding=(0, 1), seed=1, bias=False)
    ident = Elementwise(None, None, (2, 4, 6, 6))
    merged = algebra.concat([a, b, ident], 1, 4)
    for n in (6, 9):
        x = rnd(2, 4, n, n, seed=n)
        close(run(merged, x), torch.cat([torch_conv(a, x), torch_conv(b, x), x], 1))


def test_concat_strided_grouped_convs():
    a, b = conv(4, 4, 3, stride=2, padding=1, groups=2), conv(4, 6, 1, stride=2, groups=2, seed=1)
    merged = algebra.concat([a, b], -3, 4)
    x = rnd(2, 4, 7, 7)
    close(run(merged, x), torch.cat([torch_conv(a, x), torch_conv(b, x)], 1))


def test_concat_linears():
    a, b = Linear(rnd(3, 4), rnd(3)), Linear(rnd(2, 4), None)
    merged = algebra.concat([a, b, per_channel((5, 4), axis=1)], 1, 2)
    z = rnd(5, 4)
    close(run(merged, z), torch.cat([run(a, z), run(b, z), run(per_channel((5, 4), axis=1), z)], 1))


def test_concat_guards():
    with pytest.raises(NotMergeable, match="axis 2"):
        algebra.concat([conv(4, 4, 3, padding=1), conv(4, 4, 1)], 2, 4)
    with pytest.raises(NotMergeable, match="strides"):
        algebra.concat([conv(4, 4, 3, padding=1), conv(4, 4, 1, stride=2)], 1, 4)
    with pytest.raises(NotMergeable, match="elementwise"):
        algebra.concat([per_channel((2, 4, 3, 3)), per_channel((2, 4, 3, 3), seed=1)], 1, 4)
    with pytest.raises(NotMergeable, match="feature axis"):
        algebra.concat([Linear(rnd(3, 4), None), Linear(rnd(3, 4), None)], 0, 3)


def test_select_outputs():
    c = conv(4, 6, 3, padding=1, groups=2)
    x = rnd(2, 4, 5, 5)
    close(run(algebra.select_outputs(c, 2, 5), x), torch_conv(c, x)[:, 2:5])
    lin, z = Linear(rnd(6, 4), rnd(6)), rnd(3, 4)
    close(run(algebra.select_outputs(lin, 1, 4), z), run(lin, z)[:, 1:4])
    with pytest.raises(NotMergeable):
        algebra.select_outputs(per_channel(x.shape), 0, 2)


def test_select_inputs_pieces_sum_to_the_op():
    c = conv(6, 4, 3, padding=1, groups=2)
    x = rnd(2, 6, 5, 5)
    lo, hi = algebra.select_inputs(c, 0, 2), algebra.select_inputs(c, 2, 6)
    close(run(lo, x[:, :2]) + run(hi.replace(bias=None), x[:, 2:]), torch_conv(c, x))
    lin, z = Linear(rnd(3, 5), rnd(3)), rnd(4, 5)
    a, b = algebra.select_inputs(lin, 0, 3), algebra.select_inputs(lin, 3, 5)
    close(run(a, z[:, :3]) + F.linear(z[:, 3:], b.weight), run(lin, z))


@pytest.mark.parametrize("bias,shift", [(True, True), (True, False), (False, True), (False, False)])
def test_scaling_a_linear_by_a_per_feature_map_equals_composing_with_its_diagonal(bias, shift):
    lin = Linear(rnd(5, 3), rnd(5) if bias else None)
    after = Elementwise(rnd(1, 5), rnd(1, 5) if shift else None, (2, 5))
    before = Elementwise(rnd(1, 3, seed=2), rnd(1, 3, seed=3) if shift else None, (2, 3))
    for got, want in ((algebra.scale_linear_outputs(lin, after), algebra.compose_linear(lin, algebra.elementwise_as_linear(after))),
                      (algebra.scale_linear_inputs(before, lin), algebra.compose_linear(algebra.elementwise_as_linear(before), lin))):
        close(got.weight, want.weight)
        assert (got.bias is None) == (want.bias is None)
        if got.bias is not None:
            close(got.bias, want.bias)
