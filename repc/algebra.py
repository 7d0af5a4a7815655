"""Closed forms over the canonical affine ops of :mod:`repc.ops`.

Pure tensor functions: no fx, no modules, no mutation.  Inputs are float64 (see
:func:`repc.ops.as_float64`); results are float64.  Each function states its math and raises
:class:`repc.ops.NotMergeable` with the failing guard when the closed form is not exact.

Notation: a convolution ``y = conv(x; W, b)`` with stride ``s``, dilation ``d``, padding
``(lo, hi)`` per axis reads ``y[o, j] = b[o] + sum_{i, t} W[o, i, t] * xpad[i, s*j - lo + d*t]``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import deferred
from .ops import AffineOp, Conv, Dense, Elementwise, Float64Field, Linear, NotMergeable, Padding
from .reasons import MergeKind

F64 = torch.float64


# --------------------------------------------------------------------------- basic maps

def batchnorm_affine(mean: Tensor, var: Tensor, eps: float, weight: Optional[Tensor],
                     bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``y = x * scale + shift``.

    ``scale = gamma / sqrt(var + eps)``, ``shift = beta - mean * scale`` (gamma = 1, beta = 0
    when the BN is not affine).
    """
    scale = 1.0 / torch.sqrt(var.to(F64) + eps)
    if weight is not None:
        scale = scale * weight.to(F64)
    shift = -mean.to(F64) * scale
    if bias is not None:
        shift = shift + bias.to(F64)
    return scale, shift


def regroup(weight: Tensor, groups: int, new_groups: int) -> Tensor:
    """The kernel of the same grouped conv written with ``new_groups`` groups.

    ``new_groups`` divides ``groups``; each coarse group holds ``r = groups / new_groups`` fine
    groups and its kernel is block-diagonal: ``W'[o, (j mod r) * cin_g + i] = W[o, i]`` for
    output ``o`` of fine group ``j``, zero elsewhere.
    """
    if new_groups == groups:
        return weight
    if groups % new_groups:
        raise NotMergeable(MergeKind.GROUPS, f"cannot regroup {groups} groups into {new_groups}")
    r = groups // new_groups
    cout, cin_g = weight.shape[:2]
    kernel = weight.shape[2:]
    out_pg = cout // groups
    dense = weight.new_zeros((new_groups, r, out_pg, r, cin_g) + tuple(kernel))
    fine = weight.reshape((new_groups, r, out_pg, cin_g) + tuple(kernel))
    # diagonal over the two r axes: shape [new_groups, out_pg, cin_g, *kernel, r]
    diag = dense.diagonal(dim1=1, dim2=3)
    diag.copy_(fine.movedim(1, -1))
    return dense.reshape((cout, r * cin_g) + tuple(kernel))


def compact_groups(conv: Conv) -> Conv:
    """The same conv with the largest group count its block-diagonal kernel allows.

    Which (output, input) channel pairs the kernel connects is read once, as a ``cout x cin``
    boolean matrix ``A`` (any nonzero tap); ``g`` groups are allowed when every off-diagonal
    block of ``A`` cut ``g x g`` is empty.  A kernel that connects every pair (the usual merged
    conv) is returned at once, without a copy of the weight."""
    cin, cout = conv.in_channels, conv.out_channels
    g0 = math.gcd(cin, cout)
    if g0 <= conv.groups:
        return conv
    w = conv.weight
    taps = (w != 0).reshape(w.shape[0], w.shape[1], -1).any(-1)  # [cout, cin / groups]
    if conv.groups == 1 and bool(taps.all()):
        return conv
    connected = regroup(taps.to(torch.float32), conv.groups, 1) != 0  # [cout, cin]
    for g in sorted((g for g in range(1, g0 + 1) if g0 % g == 0), reverse=True):
        if g <= conv.groups:
            break
        if g % conv.groups:
            continue
        blocks = connected.reshape(g, cout // g, g, cin // g).any(3).any(1)  # [g, g]: block (i, j) used
        if not (blocks & ~torch.eye(g, dtype=torch.bool)).any():
            dense = regroup(w, conv.groups, 1).reshape((g, cout // g, g, cin // g) + conv.kernel_size)
            w = dense.diagonal(dim1=0, dim2=2).movedim(-1, 0).reshape((cout, cin // g) + conv.kernel_size)
            return conv.replace(weight=w.contiguous(), groups=g)
    return conv


def elementwise_as_conv(ew: Elementwise, nd: int) -> Conv:
    """A per-channel ``x * s + t`` on channel axis 1 as a depthwise pointwise conv."""
    if ew.ndim != nd + 2:
        raise NotMergeable(MergeKind.SHAPES_DIFFER, f"elementwise map on a {ew.ndim}-d tensor next to a {nd}-d conv")
    s, t = ew.channel_vectors(1)
    c = s.numel()
    return Conv(s.reshape((c, 1) + (1,) * nd), None if ew.shift is None else t,
                (1,) * nd, ((0, 0),) * nd, (1,) * nd, c)


def elementwise_as_linear(ew: Elementwise) -> Linear:
    """A per-feature ``x * s + t`` on the last axis as ``Linear(diag(s), t)``."""
    s, t = ew.channel_vectors(-1)
    return Linear(torch.diag(s), None if ew.shift is None else t)


def zero_rows(template: AffineOp, rows: int, axis: int, ndim: int) -> AffineOp:
    """The map of ``template``'s input giving ``rows`` output channels of zeros on ``axis`` (a
    linear map on the last axis, a conv on axis 1 with ``template``'s window, so that its
    output has the same spatial size)."""
    axis %= ndim
    if isinstance(template, Elementwise):
        if axis == ndim - 1:
            template = elementwise_as_linear(template)
        elif axis == 1 and ndim > 2:
            template = elementwise_as_conv(template, ndim - 2)
    if isinstance(template, Linear) and axis == ndim - 1:
        return Linear(torch.zeros(rows, template.in_features, dtype=torch.float64), None)
    if isinstance(template, Conv) and axis == 1:
        return Conv(torch.zeros((rows, template.in_channels) + template.kernel_size, dtype=torch.float64), None,
                    template.stride, template.padding, template.dilation, 1, template.padding_mode)
    raise NotMergeable(MergeKind.AXIS, f"values of different sources concatenated on axis {axis}, not the axis "
                                       f"{template!r} maps")


def avg_pool_as_conv(channels: int, kernel: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], divisor: Optional[int]) -> Conv:
    """Average pooling as a depthwise conv whose kernel is ``1 / divisor`` everywhere.

    Exact when padded zeros are counted (``count_include_pad``) or there is no padding;
    ``divisor`` defaults to the window size.
    """
    nd = len(kernel)
    value = 1.0 / (divisor or math.prod(kernel))
    w = torch.full((channels, 1) + tuple(kernel), value, dtype=F64)
    return Conv(w, None, tuple(stride), tuple((p, p) for p in padding), (1,) * nd, channels)


def zero_pad_as_conv(channels: int, padding: Padding) -> Conv:
    """Constant zero padding ``(lo, hi)`` per spatial axis as an identity depthwise conv (a
    negative amount is a crop: ``x[..., -lo:size + hi]``)."""
    nd = len(padding)
    w = torch.ones((channels, 1) + (1,) * nd, dtype=F64)
    return Conv(w, None, (1,) * nd, tuple(padding), (1,) * nd, channels)



# --------------------------------------------------------------------------- compose

def compose(first: AffineOp, second: AffineOp) -> AffineOp:
    """The single op computing ``second(first(x))``."""
    if isinstance(first, Elementwise) and first.is_identity:
        return second
    if isinstance(second, Elementwise) and second.is_identity:
        return first
    if isinstance(first, Elementwise) and isinstance(second, Elementwise):
        return compose_elementwise(first, second)
    if isinstance(second, Elementwise):
        if second.is_constant:
            return constant_like(first, second)
        if isinstance(first, Conv):
            s, t = second.channel_vectors(1)
            return scale_conv_outputs(first, s, t if second.shift is not None else None)
        if isinstance(first, Linear):
            return scale_linear_outputs(first, second)
    if isinstance(first, Conv) and isinstance(second, Conv):
        return compose_conv(first, second)
    if isinstance(first, Elementwise) and isinstance(second, Conv):
        return compose_conv(elementwise_as_conv(first, second.nd), second)
    if isinstance(first, Linear) and isinstance(second, Linear):
        return compose_linear(first, second)
    if isinstance(first, Elementwise) and isinstance(second, Linear):
        return scale_linear_inputs(first, second)
    raise NotMergeable(MergeKind.NO_CLOSED_FORM, f"no closed form for {type(second).__name__} after {type(first).__name__}")


def constant_like(first: AffineOp, constant: Elementwise) -> AffineOp:
    """``c`` after ``first``, as the same kind of op: zero weights, the constant as bias."""
    if isinstance(first, Conv):
        _, t = constant.channel_vectors(1)
        return first.replace(weight=torch.zeros_like(first.weight), bias=t)
    if isinstance(first, Linear):
        _, t = constant.channel_vectors(-1)
        return Linear(torch.zeros(first.weight_shape, dtype=F64), t)
    raise NotMergeable(MergeKind.NO_CLOSED_FORM, "a constant after this op")


def compose_elementwise(first: Elementwise, second: Elementwise) -> Elementwise:
    """``(x * s1 + t1) * s2 + t2 = x * (s1 s2) + (t1 s2 + t2)``."""
    s1, t1, s2, t2 = first.scale, first.shift, second.scale, second.shift
    scale = s2 if s1 is None else (s1 if s2 is None else s1 * s2)
    shift = t1 if s2 is None or t1 is None else t1 * s2
    shift = t2 if shift is None else (shift if t2 is None else shift + t2)
    return Elementwise(scale, shift, second.shape)


def scale_conv_outputs(conv: Conv, scale: Tensor, shift: Optional[Tensor]) -> Conv:
    """Per-output-channel ``conv(x) * s + t``: ``W'[o] = s[o] W[o]``, ``b' = s b + t``; no bias
    where neither the conv nor the map has one (``t`` None: a LoRA's scaling of a bias-free conv),
    as ``scale_linear_outputs`` gives none."""
    if scale.numel() != conv.out_channels:
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "per-channel scale does not match the conv's output channels")
    w = conv.weight * scale.reshape((-1,) + (1,) * (len(conv.weight_shape) - 1))
    if shift is None:
        b = None if conv.bias is None else conv.bias * scale
    else:
        b = shift if conv.bias is None else conv.bias * scale + shift
    return conv.replace(weight=w, bias=b)


def scale_linear_outputs(linear: Linear, ew: Elementwise) -> Linear:
    """Per-feature ``(W x + b) * s + t = (s W) x + (s b + t)`` (rows scaled: no matrix product).
    Equal to ``compose_linear(linear, elementwise_as_linear(ew))``."""
    s, t = ew.channel_vectors(-1)
    if s.numel() != linear.out_features:
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "feature counts differ")
    b = t if linear.bias is None else linear.bias * s + t
    return Linear(deferred.scaled(_held(linear), rows=s), b if linear.bias is not None or ew.shift is not None else None)


def scale_linear_inputs(ew: Elementwise, linear: Linear) -> Linear:
    """Per-feature ``W (x * s + t) + b = (W diag(s)) x + (W t + b)`` (columns scaled).
    Equal to ``compose_linear(elementwise_as_linear(ew), linear)``."""
    s, t = ew.channel_vectors(-1)
    if s.numel() != linear.in_features:
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "feature counts differ")
    b = linear.bias
    if ew.shift is not None:
        b = deferred.matvec(_held(linear), t) if b is None else deferred.matvec(_held(linear), t) + b
    return Linear(deferred.scaled(_held(linear), cols=s), b)


def compose_linear(first: Linear, second: Linear) -> Linear:
    """``W2 (W1 x + b1) + b2 = (W2 W1) x + (W2 b1 + b2)``."""
    if first.out_features != second.in_features:
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "feature counts differ")
    w = deferred.product(_held(second), _held(first))
    b = None
    if first.bias is not None:
        b = deferred.matvec(_held(second), first.bias)
    if second.bias is not None:
        b = second.bias if b is None else b + second.bias
    return Linear(w, b)


def _held(linear: Linear):
    """The weight ``linear`` holds, as it holds it (a tensor of any dtype, or a
    :class:`repc.deferred.DeferredMatrix`): what a merged weight's expression is built on."""
    return Float64Field.stored(linear, "weight")


def _grouped(weight: Tensor, groups: int, new_groups: int) -> Tensor:
    """``[C_out, C_in/g, *k]`` -> ``[g', C_out/g', C_in/g', *k]`` at the coarser grouping."""
    w = regroup(weight, groups, new_groups)
    return w.reshape((new_groups, w.shape[0] // new_groups) + tuple(w.shape[1:]))


def compose_conv(first: Conv, second: Conv) -> Conv:
    """``conv2(conv1(x))`` as one conv.

    With ``g = gcd(g1, g2)`` groups, per group and axis,
    ``W[o, i, u] = sum_{m, a, t : d1 a + s1 d2 t = D u} W2[o, m, t] W1[m, i, a]`` with stride
    ``s1 s2``, dilation ``D = gcd(d1, s1 d2)``, the first conv's padding, and bias
    ``b = b2 + sum_{m, t} W2[o, m, t] b1[m]``.  Exact when the second conv does not pad
    (its taps then only read real outputs of the first).  When it pads, it is exact only if
    the first conv adds no bias and, along every axis the second one pads, spans one position
    with stride 1 (a pointwise map; or a 1xk conv before a kx1 one, RepNeXt's separable pairs):
    then each output of the first conv along that axis reads its own input row only, so the
    rows the second conv pads are the first conv of zero rows, zero; the composed conv pads the
    input by both paddings -- except a crop (negative padding) followed by padding on the same
    side: cropping then zero-padding is not padding less.
    """
    if first.nd != second.nd:
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "convs of different dimensionality")
    if first.out_channels != second.in_channels:
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "channel counts differ")
    nd = first.nd
    g = math.gcd(first.groups, second.groups)
    w1 = _grouped(first.weight, first.groups, g)  # [g, M/g, I/g, *k1]
    w2 = _grouped(second.weight, second.groups, g)  # [g, O/g, M/g, *k2]
    bias = _compose_bias(first, second, g)
    pads_second = any(p != (0, 0) for p in second.padding)
    if pads_second:
        if any(p != (0, 0) and (first.kernel_size[ax] != 1 or first.stride[ax] != 1)
               for ax, p in enumerate(second.padding)):
            raise NotMergeable(MergeKind.BORDER, "the second conv pads an axis along which the first conv is not a "
                                                 "stride-1 map of one position")
        if first.bias is not None and not negligible(first.bias, first.weight):
            raise NotMergeable(MergeKind.BORDER, "the second conv zero-pads a biased output (e.g. BN before a padded conv): the border would differ")
        if second.padding_mode != "zeros" or (first.padding_mode != "zeros" and any(p != (0, 0) for p in first.padding)):
            raise NotMergeable(MergeKind.BORDER, "non-zero padding modes do not compose")
        if any((p1[0] < 0 < p2[0]) or (p1[1] < 0 < p2[1]) for p1, p2 in zip(first.padding, second.padding)):
            raise NotMergeable(MergeKind.BORDER, "a crop before a padded conv: the padding would zero what the crop "
                                                 "removed, where the cropped input still holds it")
        if first.is_pointwise:
            w = torch.einsum("gom...,gmi->goi...", w2, w1.reshape(w1.shape[:3]))
            padding = tuple((p1[0] + p2[0], p1[1] + p2[1]) for p1, p2 in zip(first.padding, second.padding))
            return Conv(w.reshape((second.out_channels, first.in_channels // g) + second.kernel_size), bias,
                        second.stride, padding, second.dilation, g, "zeros")
    k1, k2 = first.kernel_size, second.kernel_size
    dil, size, step1, step2 = [], [], [], []
    for ax in range(nd):
        a_step = first.dilation[ax] if k1[ax] > 1 else 0
        b_step = first.stride[ax] * second.dilation[ax] if k2[ax] > 1 else 0
        d = math.gcd(a_step, b_step) or 1
        dil.append(d)
        step1.append(a_step // d)
        step2.append(b_step // d)
        size.append(step1[-1] * (k1[ax] - 1) + step2[-1] * (k2[ax] - 1) + 1)
    w = w1.new_zeros(w2.shape[:2] + (w1.shape[2],) + tuple(size))
    for tap in torch.cartesian_prod(*[torch.arange(k) for k in k2]).reshape(-1, nd).tolist():
        where = tuple(slice(step2[ax] * tap[ax], step2[ax] * tap[ax] + step1[ax] * (k1[ax] - 1) + 1, step1[ax] or 1)
                      for ax in range(nd))
        w[(Ellipsis,) + where] += torch.einsum("gom,gmi...->goi...", w2[(Ellipsis,) + tuple(tap)], w1)
    stride = tuple(a * b for a, b in zip(first.stride, second.stride))
    # (the second conv's padding is zero except along axes where the first spans one position)
    padding = tuple((p1[0] + p2[0], p1[1] + p2[1]) for p1, p2 in zip(first.padding, second.padding))
    return Conv(w.reshape((second.out_channels, first.in_channels // g) + tuple(size)), bias, stride,
                padding, tuple(dil), g, "zeros" if pads_second else first.padding_mode)


def negligible(bias: Tensor, weight: Tensor) -> bool:
    """A bias that is zero up to float32 rounding of a cancellation (``bn(x) - bn(0)``, computed
    by the model in its own precision): at most 1e-5 of the map's largest weight, or of 1."""
    return bool(bias.abs().max() <= 1e-5 * max(1.0, float(weight.abs().max())))


def _compose_bias(first: Conv, second: Conv, g: int) -> Optional[Tensor]:
    bias = second.bias
    if first.bias is not None:
        w2 = _grouped(second.weight, second.groups, g)  # [g, O/g, M/g, *k2]
        summed = w2.sum(dim=tuple(range(3, w2.dim())))
        carried = torch.einsum("gom,gm->go", summed, first.bias.reshape(g, -1)).reshape(-1)
        bias = carried if bias is None else bias + carried
    return bias


# --------------------------------------------------------------------------- sum / concat

def add(a: AffineOp, b: AffineOp) -> AffineOp:
    """The single op computing ``a(x) + b(x)``."""
    if isinstance(a, Elementwise) and not isinstance(b, Elementwise):
        a, b = b, a
    if isinstance(a, Elementwise) and isinstance(b, Elementwise):
        return add_elementwise(a, b)
    if isinstance(b, Elementwise):
        if isinstance(a, Conv):
            if b.is_constant:
                return add_bias(a, b.channel_vectors(1)[1])
            b = elementwise_as_conv(b, a.nd)
        else:
            if b.is_constant:
                return add_bias(a, b.channel_vectors(-1)[1])
            b = elementwise_as_linear(b)
    if isinstance(a, Linear) and isinstance(b, Linear):
        if a.weight_shape != b.weight_shape:
            raise NotMergeable(MergeKind.SHAPES_DIFFER, "linear maps of different shapes")
        return Linear(deferred.total([_held(a), _held(b)]), _add_optional(a.bias, b.bias))
    if isinstance(a, Conv) and isinstance(b, Conv):
        return add_convs(a, b)
    raise NotMergeable(MergeKind.NO_CLOSED_FORM, f"no closed form for {type(a).__name__} + {type(b).__name__}")


def add_elementwise(a: Elementwise, b: Elementwise) -> Elementwise:
    """``(x s1 + t1) + (x s2 + t2) = x (s1 + s2) + (t1 + t2)`` (a missing scale is 1)."""
    one = torch.ones((1,) * a.ndim, dtype=F64)
    scale = (one if a.scale is None else a.scale) + (one if b.scale is None else b.scale)
    return Elementwise(scale, _add_optional(a.shift, b.shift), a.shape)


def add_bias(op, shift: Tensor):
    """``op(x) + t`` for a per-output-channel constant ``t``: the bias grows by ``t``."""
    return op.replace(bias=_add_optional(op.bias, shift))


def _add_optional(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else (a if b is None else a + b)


def add_convs(a: Conv, b: Conv) -> Conv:
    """``conv_a(x) + conv_b(x)`` as one conv: kernels placed on a common tap grid and summed.

    Per axis, with the common dilation ``d = gcd(d_a, d_b)`` (a branch of dilation ``d_c``
    becomes a kernel with ``d_c / d - 1`` zeros between its taps) and ``lo = max(lo_a, lo_b)``,
    branch ``c`` lands at
    tap offset ``(lo - lo_c) / d`` (an integer, or the branches read different grids), and
    equal strides and equal right-hand offsets ``hi_c + d (K - shift_c - k_c)`` make the
    output grids agree for every input size.  Groups become ``gcd(g_a, g_b)``; identity and
    per-channel branches arrive as depthwise pointwise kernels.  Bias ``b_a + b_b``.
    """
    aligned, _ = align_convs([a, b], math.gcd(a.groups, b.groups))
    return aligned[0].replace(weight=aligned[0].weight + aligned[1].weight,
                              bias=_add_optional(aligned[0].bias, aligned[1].bias))


def on_dilation(conv: Conv, dilation: Sequence[int]) -> Conv:
    """The same conv written with a smaller ``dilation`` that divides its own: per axis, its
    taps spread ``d_conv / d`` apart with zeros between (a dilated kernel is a dense kernel
    with zeros on the finer grid).  Axes with one tap take ``dilation`` as they are."""
    w = conv.weight
    for ax, (d, own, k) in enumerate(zip(dilation, conv.dilation, conv.kernel_size)):
        if k == 1 or own == d:
            continue
        factor = own // d
        shape = list(w.shape)
        shape[2 + ax] = (k - 1) * factor + 1
        spread = w.new_zeros(shape)
        index = [slice(None)] * w.dim()
        index[2 + ax] = slice(0, None, factor)
        spread[tuple(index)] = w
        w = spread
    return conv.replace(weight=w, dilation=tuple(dilation))


def align_convs(convs: Sequence[Conv], groups: int, mixed_dilations: bool = True) -> Tuple[List[Conv], None]:
    """Rewrite each conv on one common kernel grid, padding, dilation and ``groups``: the
    dilation per axis is the gcd of the branches' (:func:`on_dilation`; with
    ``mixed_dilations=False`` branches of different dilations are refused)."""
    first = convs[0]
    nd = first.nd
    if any(c.nd != nd for c in convs):
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "convs of different dimensionality")
    if any(c.in_channels != first.in_channels for c in convs):
        raise NotMergeable(MergeKind.SHAPES_DIFFER, "input channel counts differ")
    if any(c.stride != first.stride for c in convs):
        strides = sorted({c.stride for c in convs})
        raise NotMergeable(MergeKind.GRIDS_DIFFER, f"strides differ: {strides}")
    modes = {c.padding_mode for c in convs if any(p != (0, 0) for p in c.padding)}
    if len(modes) > 1:
        raise NotMergeable(MergeKind.GRIDS_DIFFER, f"padding modes differ: {sorted(modes)}")
    mode = modes.pop() if modes else "zeros"
    for ax in range(nd):
        ds = {c.dilation[ax] for c in convs if c.kernel_size[ax] > 1}
        if len(ds) > 1 and not mixed_dilations:
            raise NotMergeable(MergeKind.GRIDS_DIFFER, f"dilations differ on spatial axis {ax}: {sorted(ds)}")
    common = tuple(math.gcd(*[c.dilation[ax] for c in convs if c.kernel_size[ax] > 1]) or 1 for ax in range(nd))
    convs = [on_dilation(c, common) for c in convs]
    dilation, padding, size, shifts = [], [], [], [[] for _ in convs]
    for ax in range(nd):
        d = common[ax]
        lo = max(c.padding[ax][0] for c in convs)
        for i, c in enumerate(convs):
            offset = lo - c.padding[ax][0]
            if offset % d:
                raise NotMergeable(MergeKind.GRIDS_DIFFER, f"branches are offset by {offset} on axis {ax}, not a multiple of the dilation {d}")
            shifts[i].append(offset // d)
        k = max(s[ax] + c.kernel_size[ax] for s, c in zip(shifts, convs))
        his = {c.padding[ax][1] + d * (k - s[ax] - c.kernel_size[ax]) for s, c in zip(shifts, convs)}
        if len(his) > 1:
            raise NotMergeable(MergeKind.GRIDS_DIFFER, f"padding offsets differ on axis {ax}: the branches' output grids do not align")
        dilation.append(d)
        padding.append((lo, his.pop()))
        size.append(k)
    out = []
    for c, shift in zip(convs, shifts):
        w = regroup(c.weight, c.groups, groups)
        if tuple(size) == tuple(c.kernel_size):
            big = w  # already on the common grid (shifts are then 0): no copy
        else:
            big = w.new_zeros(w.shape[:2] + tuple(size))
            big[(Ellipsis,) + tuple(slice(s, s + k) for s, k in zip(shift, c.kernel_size))] = w
        out.append(Conv(big, c.bias, first.stride, tuple(padding), tuple(dilation), groups, mode))
    return out, None


def concat(ops: Sequence[AffineOp], axis: int, ndim: int) -> AffineOp:
    """``cat([op_1(x), ..., op_n(x)], axis)`` as one op that stacks their output channels.

    Convs (axis 1) are aligned as in :func:`add_convs` at one group, then their kernels and
    biases are stacked; linear maps (last axis) stack their rows.
    """
    axis %= ndim
    if any(isinstance(op, Conv) for op in ops):
        if axis != 1:
            raise NotMergeable(MergeKind.AXIS, f"concatenation on axis {axis}, not the conv channel axis")
        nd = next(op.nd for op in ops if isinstance(op, Conv))
        convs = [elementwise_as_conv(op, nd) if isinstance(op, Elementwise) else op for op in ops]
        if not all(isinstance(c, Conv) for c in convs):
            raise NotMergeable(MergeKind.NO_CLOSED_FORM, "concatenation mixes convs with other maps")
        # (not on a finer common grid: each part would be read back out of the stacked kernel with
        # the zeros of the others' grids, costing more than it did, whatever the whole costs)
        aligned, _ = align_convs(convs, 1, mixed_dilations=False)
        return _stack(aligned, lambda w, b: aligned[0].replace(weight=w, bias=b))
    if any(isinstance(op, Linear) for op in ops) or axis == ndim - 1:
        if axis != ndim - 1:
            raise NotMergeable(MergeKind.AXIS, f"concatenation on axis {axis}, not the feature axis")
        linears = [elementwise_as_linear(op) if isinstance(op, Elementwise) else op for op in ops]
        if not all(isinstance(l, Linear) for l in linears):
            raise NotMergeable(MergeKind.NO_CLOSED_FORM, "concatenation mixes linear maps with other maps")
        return _stack(linears, Linear)
    raise NotMergeable(MergeKind.AXIS, f"concatenation of elementwise maps on axis {axis}")


def _stack(ops, build):
    w = torch.cat([op.weight for op in ops], 0)
    if all(op.bias is None for op in ops):
        return build(w, None)
    b = torch.cat([op.bias if op.bias is not None else op.weight.new_zeros(op.weight.shape[0]) for op in ops])
    return build(w, b)


def select_outputs(op: AffineOp, start: int, stop: int) -> AffineOp:
    """Output channels ``start:stop`` of a conv or linear map (rows of its weight and bias)."""
    if isinstance(op, Linear):  # (views of the tensors it holds, read in float64 where used)
        w, b = Float64Field.stored(op, "weight"), Float64Field.stored(op, "bias")
        return op.replace(weight=w[start:stop], bias=None if b is None else b[start:stop])
    if isinstance(op, Conv):
        w = regroup(op.weight, op.groups, 1)[start:stop]
        return op.replace(weight=w, bias=None if op.bias is None else op.bias[start:stop], groups=1)
    raise NotMergeable(MergeKind.NO_CLOSED_FORM, "only conv and linear outputs can be sliced")


def select_inputs(op: AffineOp, start: int, stop: int) -> AffineOp:
    """The part of a conv or linear map that reads input channels ``start:stop``.

    ``op(x) = sum_blocks op[:, block](x[block])`` with the bias kept on the returned piece.
    """
    if isinstance(op, Linear):
        return op.replace(weight=Float64Field.stored(op, "weight")[:, start:stop])
    if isinstance(op, Conv):
        w = regroup(op.weight, op.groups, 1)[:, start:stop].contiguous()
        return op.replace(weight=w, groups=1)
    raise NotMergeable(MergeKind.NO_CLOSED_FORM, "only conv and linear inputs can be split")


def apply(op: AffineOp, x: Tensor) -> Tensor:
    """``op(x)`` in float64 with torch's own functions (the reference semantics of each op)."""
    x = x.to(F64)
    if isinstance(op, Conv):
        pads = [p for lo_hi in reversed(op.padding) for p in lo_hi]
        if any(pads):
            x = torch.nn.functional.pad(x, pads, mode="constant" if op.padding_mode == "zeros" else op.padding_mode)
        conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[op.nd]
        return conv(x, op.weight, op.bias, op.stride, 0, op.dilation, op.groups)
    if isinstance(op, Linear):
        return torch.nn.functional.linear(x, op.weight, op.bias)
    if isinstance(op, Dense):
        y = torch.nn.functional.linear(x.flatten(1), op.weight, op.bias)
        return y.reshape((-1,) + tuple(op.out_shape))
    if op.scale is not None:
        x = x * op.scale
    return x if op.shift is None else x + op.shift


def scale_op(op: AffineOp, factor: float) -> AffineOp:
    """``factor * op(x)``."""
    if isinstance(op, Elementwise):
        return compose_elementwise(op, Elementwise(torch.tensor(float(factor), dtype=F64).reshape((1,) * op.ndim), None, op.shape))
    b = None if op.bias is None else op.bias * factor
    if isinstance(op, Conv):
        return op.replace(weight=op.weight * factor, bias=b)
    return Linear(deferred.scaled(_held(op), rows=torch.tensor(float(factor), dtype=F64)), b)
