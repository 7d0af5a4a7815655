"""Training-time reference blocks for the conv family, written from the papers' descriptions.

They complement :mod:`repc.examples` (RepVGG, MobileOne, the branchy DBB) with the other
blocks of the family and with the front-end forms a user may write them in: module style,
functional style with raw parameters and buffers, tensor methods, operators, in-place ops.
Every BatchNorm must get random statistics before use (:func:`randomize` below does it for
``nn.BatchNorm*`` modules and for the raw buffers of the functional blocks).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from repc.examples import randomize_bn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics everywhere (module BNs and :class:`RawBatchNormStats` holders); eval mode."""
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RawBatchNormStats):
                for prefix in m.bn_prefixes:
                    getattr(m, prefix + "_rm").copy_(torch.rand(getattr(m, prefix + "_rm").shape, generator=g) * 2 - 1)
                    getattr(m, prefix + "_rv").copy_(torch.rand(getattr(m, prefix + "_rv").shape, generator=g) + 0.5)
                    getattr(m, prefix + "_g").copy_(torch.rand(getattr(m, prefix + "_g").shape, generator=g) + 0.5)
                    getattr(m, prefix + "_b").copy_(torch.rand(getattr(m, prefix + "_b").shape, generator=g) * 2 - 1)
    return model.eval()


def conv_bn(cin, cout, k, stride=1, padding=0, dilation=1, groups=1, bias=False, nd=2) -> nn.Sequential:
    """A conv (any kernel shape, e.g. ``(1, k)``) followed by BatchNorm."""
    return nn.Sequential(CONV[nd](cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=bias),
                         BN[nd](cout))


class RepVGG(nn.Module):
    """RepVGG (Ding et al. 2021): k x k conv-BN + 1x1 conv-BN + BN identity, summed, then ReLU.

    Generalised over dimensionality, dilation of the k x k branch, groups, stride and conv bias.
    """

    def __init__(self, cin, cout, stride=1, groups=1, dilation=1, k=3, nd=2, bias=False, identity=True):
        super().__init__()
        self.dense = conv_bn(cin, cout, k, stride, dilation * (k // 2), dilation, groups, bias, nd)
        self.pointwise = conv_bn(cin, cout, 1, stride, 0, 1, groups, bias, nd)
        self.identity = BN[nd](cin) if identity and cin == cout and stride == 1 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class SeparablePairMixer(nn.Module):
    """RepNeXt's multi-scale depthwise mixer, in its idiom: a 1xk conv then a kx1 conv with no norm
    between (at stride 2: 1xk with stride (1, 2), then kx1 with stride (2, 1)) and its BN, beside
    a kxk conv-BN and a 2x2 conv-BN with dilation 2, summed with a BN of the input at stride 1."""

    def __init__(self, c, k=3, stride=1):
        super().__init__()
        self.square = conv_bn(c, c, k, stride, k // 2, groups=c)
        self.dilated = conv_bn(c, c, 2, stride, 1, dilation=2, groups=c)
        self.pair = nn.Sequential(
            nn.Conv2d(c, c, (1, k), stride=(1, stride), padding=(0, k // 2), groups=c, bias=False),
            nn.Conv2d(c, c, (k, 1), stride=(stride, 1), padding=(k // 2, 0), groups=c, bias=False),
            nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c) if stride == 1 else None

    def forward(self, x):
        out = self.square(x) + self.dilated(x) + self.pair(x)
        return out if self.identity is None else out + self.identity(x)


class ConvBNSiLU(nn.Module):
    """YOLO's ``Conv``: conv, BN, SiLU."""

    def __init__(self, cin, cout, k=1, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class CSPBlock(nn.Module):
    """A YOLO-style CSP block: two branches computed apart, concatenated, then a 1x1 conv-BN-SiLU."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.cv1, self.cv2 = ConvBNSiLU(cin, mid), ConvBNSiLU(cin, mid)
        self.m = nn.Sequential(ConvBNSiLU(mid, mid, 3), ConvBNSiLU(mid, mid, 3))
        self.cv3 = ConvBNSiLU(2 * mid, cout)

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class ACNet(nn.Module):
    """ACNet (Ding et al. 2019): k x k, 1 x k and k x 1 conv-BN branches on one input, summed."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, dilation=1, bias=False):
        super().__init__()
        p = dilation * (k // 2)
        self.square = conv_bn(cin, cout, k, stride, p, dilation, groups, bias)
        self.hor = conv_bn(cin, cout, (1, k), stride, (0, p), dilation, groups, bias)
        self.ver = conv_bn(cin, cout, (k, 1), stride, (p, 0), dilation, groups, bias)

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class ACNetCropped(nn.Module):
    """ACNet as its original code writes a layer that pads less than ``k // 2``: the ``1 x k``
    and ``k x 1`` branches read their input cropped (a ``CropLayer``, ``x[:, :, c:-c]``) instead
    of padding less."""

    def __init__(self, cin, cout, k=3, stride=1, padding=0):
        super().__init__()
        self.crop = k // 2 - padding
        self.square = conv_bn(cin, cout, k, stride, padding)
        self.hor = conv_bn(cin, cout, (1, k), stride, (0, padding))
        self.ver = conv_bn(cin, cout, (k, 1), stride, (padding, 0))

    def forward(self, x):
        c = self.crop
        return self.square(x) + self.hor(x[:, :, c:-c, :]) + self.ver(x[:, :, :, c:-c])


class DBBConcat(nn.Module):
    """DBB's depth concatenation: branches with one stride, concatenated on channels by
    ``torch.cat``, then consumed by a 1x1 conv-BN (which does not pad)."""

    def __init__(self, cin, cout, mid=4, stride=1):
        super().__init__()
        self.square = conv_bn(cin, mid, 3, stride, 1)
        self.point = conv_bn(cin, mid, 1, stride, 0)
        self.hor = conv_bn(cin, mid, (1, 3), stride, (0, 1))
        self.fuse = conv_bn(3 * mid, cout, 1)

    def forward(self, x):
        return self.fuse(torch.cat([self.square(x), self.point(x), self.hor(x)], dim=1))


class DBBSlices(nn.Module):
    """Branches concatenated on channels, then the halves of the concat read by slices and
    recombined: ``y[:, :c] * s + y[:, c:]`` (a permuted channel mix of two branches)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.a = conv_bn(c, c, 3, 1, 1)
        self.b = conv_bn(c, c, 1)
        self.post = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.cat((self.a(x), self.b(x)), 1)
        return self.post(y[:, :self.c] * 0.5 + y[:, self.c:])


class DBBHalves(nn.Module):
    """Like :class:`DBBSlices`, with ``chunk``, ``torch.split`` or ``narrow`` reading the halves."""

    def __init__(self, c, form="chunk"):
        super().__init__()
        self.c, self.form = c, form
        self.a = conv_bn(c, c, 3, 1, 1)
        self.b = conv_bn(c, c, (3, 1), 1, (1, 0))

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        if self.form == "chunk":
            lo, hi = y.chunk(2, dim=1)
        elif self.form == "split":
            lo, hi = torch.split(y, [self.c, self.c], dim=1)
        else:
            lo, hi = y.narrow(1, 0, self.c), torch.narrow(y, 1, self.c, self.c)
        return hi - lo


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + layer_scale * (mixer(x) - norm(x))``.

    ``mixer`` is a depthwise k x k conv-BN (with, as in FastViT's MobileOne mixer, a 1x1
    depthwise conv-BN scale branch and a BN skip), ``norm`` a BatchNorm, ``layer_scale`` a
    ``(C, 1, 1)`` parameter.
    """

    def __init__(self, dim, k=3, rich=True):
        super().__init__()
        self.conv = conv_bn(dim, dim, k, 1, k // 2, groups=dim)
        self.scale = conv_bn(dim, dim, 1, groups=dim) if rich else None
        self.skip = nn.BatchNorm2d(dim) if rich else None
        self.norm = nn.BatchNorm2d(dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)

    def mixer(self, x):
        y = self.conv(x)
        if self.scale is not None:
            y = y + self.scale(x) + self.skip(x)
        return y

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class RepVGGDW(nn.Module):
    """RepViT's token mixer: ``BN(dwconv3x3_bn(x) + dwconv1x1(x) + x)``."""

    def __init__(self, dim):
        super().__init__()
        self.conv = conv_bn(dim, dim, 3, 1, 1, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, 1, 0, groups=dim)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class LinearBN(nn.Module):
    """LeViT's Linear_BN on ``(B, C)``: a linear map then BatchNorm1d."""

    def __init__(self, cin, cout, bias=False):
        super().__init__()
        self.l = nn.Linear(cin, cout, bias=bias)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        return self.bn(self.l(x))


class BNLinear(nn.Module):
    """LeViT's BN_Linear (the classifier head) on ``(B, C)``: BatchNorm1d then a linear map."""

    def __init__(self, cin, cout, bias=True):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.l = nn.Linear(cin, cout, bias=bias)

    def forward(self, x):
        return self.l(self.bn(x))


class LeViTMLP(nn.Module):
    """A LeViT-style residual MLP on ``(B, C)``: Linear-BN, Hardswish, Linear-BN, plus x."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.up = LinearBN(dim, hidden)
        self.act = nn.Hardswish()
        self.down = LinearBN(hidden, dim)

    def forward(self, x):
        return x + self.down(self.act(self.up(x)))


class RepViTBlock(nn.Module):
    """A RepViT block: RepVGGDW token mixer, then a residual 1x1 conv-BN / GELU / 1x1 conv-BN."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.token_mixer = RepVGGDW(dim)
        self.channel_mixer = nn.Sequential(conv_bn(dim, hidden, 1), nn.GELU(), conv_bn(hidden, dim, 1))

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.channel_mixer(x)


class FastViTBlock(nn.Module):
    """A FastViT RepMixer block: RepMixer, then a ConvFFN (dw 7x7 conv-BN, 1x1, GELU, 1x1)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.mixer = RepMixer(dim)
        self.ffn = nn.Sequential(conv_bn(dim, dim, 7, 1, 3, groups=dim), nn.Conv2d(dim, hidden, 1), nn.GELU(),
                                 nn.Conv2d(hidden, dim, 1))

    def forward(self, x):
        x = self.mixer(x)
        return x + self.ffn(x)


# ----------------------------------------------------------------------------- functional style

class RawBatchNormStats(nn.Module):
    """Holds raw BN buffers/parameters ``<prefix>_rm, _rv, _g, _b`` for functional blocks."""

    bn_prefixes: tuple = ()

    def add_bn(self, prefix: str, c: int) -> None:
        self.register_buffer(prefix + "_rm", torch.zeros(c))
        self.register_buffer(prefix + "_rv", torch.ones(c))
        self.register_parameter(prefix + "_g", nn.Parameter(torch.ones(c)))
        self.register_parameter(prefix + "_b", nn.Parameter(torch.zeros(c)))
        self.bn_prefixes = self.bn_prefixes + (prefix,)

    def bn(self, x, prefix: str):
        return F.batch_norm(x, getattr(self, prefix + "_rm"), getattr(self, prefix + "_rv"),
                            getattr(self, prefix + "_g"), getattr(self, prefix + "_b"), False, 0.1, 1e-5)


class FunctionalRepVGG(RawBatchNormStats):
    """RepVGG written with raw parameters: ``F.conv2d``, ``F.batch_norm``, ``torch.add``, ``+``."""

    def __init__(self, c, bias=True):
        super().__init__()
        self.w3 = nn.Parameter(torch.randn(c, c, 3, 3) * 0.2)
        self.b3 = nn.Parameter(torch.randn(c) * 0.1) if bias else None
        self.w1 = nn.Parameter(torch.randn(c, c, 1, 1) * 0.2)
        self.add_bn("bn3", c)
        self.add_bn("bn1", c)
        self.add_bn("bnid", c)

    def forward(self, x):
        dense = F.batch_norm(F.conv2d(x, self.w3, self.b3, padding=1), self.bn3_rm, self.bn3_rv, self.bn3_g,
                             self.bn3_b, False, 0.1, 1e-5)
        point = self.bn(F.conv2d(x, self.w1), "bn1")
        return F.relu(torch.add(dense, point) + self.bn(x, "bnid"))


class FunctionalRepMixer(RawBatchNormStats):
    """RepMixer with a depthwise ``torch.conv2d``, ``x.sub``, ``x.add`` and a per-channel ``*``."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.randn(c, 1, 3, 3) * 0.3)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.add_bn("mix", c)
        self.add_bn("norm", c)

    def forward(self, x):
        mixed = self.bn(torch.conv2d(x, self.w, None, 1, 1, 1, self.c), "mix")
        return x.add(self.layer_scale * mixed.sub(self.bn(x, "norm")))


class MethodStyleBlock(nn.Module):
    """Branches combined with tensor methods, scalar scales, ``-`` and in-place ops:
    ``out = 2 * conv_bn_a(x) - b(x) * 0.5``; ``out += x``; ``out.mul_(s)``; ReLU(inplace)."""

    def __init__(self, c):
        super().__init__()
        self.a = conv_bn(c, c, 3, 1, 1)
        self.b = conv_bn(c, c, 1)
        self.c = conv_bn(c, c, (1, 3), 1, (0, 1))
        self.s = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = 2 * self.a(x) - self.b(x) * 0.5
        out += x
        out = out.add(self.c(x))
        out.mul_(self.s)
        return self.act(out)


# ----------------------------------------------------------------------------- reference evaluation

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def run_op(op, x):
    """Evaluate a canonical :mod:`repc.ops` op with torch's functional ops (``F.pad`` then
    ``F.convNd``, ``F.linear``, ``x * scale + shift``), independently of repc's emitter."""
    from repc.ops import Conv, Linear

    if isinstance(op, Conv):
        pad = [p for lo_hi in reversed(op.padding) for p in lo_hi]
        if any(pad):
            x = F.pad(x, pad, mode="constant" if op.padding_mode == "zeros" else op.padding_mode)
        return CONV_FN[op.nd](x, op.weight, op.bias, op.stride, 0, op.dilation, op.groups)
    if isinstance(op, Linear):
        return F.linear(x, op.weight, op.bias)
    y = x if op.scale is None else x * op.scale
    return y if op.shift is None else y + op.shift


# ----------------------------------------------------------------------------- checks shared by the tests

def snapshot(model: nn.Module):
    """Everything ``repc.compile`` must leave alone: state, train flags, requires_grad."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_unchanged(model: nn.Module, before) -> None:
    state, flags, grads = before
    now = model.state_dict()
    assert state.keys() == now.keys()
    for k in state:
        assert torch.equal(state[k], now[k]), f"compile mutated {k}"
    assert flags == [(n, m.training) for n, m in model.named_modules()]
    assert grads == [(n, p.requires_grad) for n, p in model.named_parameters()]


def rel_dev(got, want) -> float:
    """``max |got - want| / max |want|`` over (nested) outputs, in float64."""
    if isinstance(want, (tuple, list)):
        return max(rel_dev(g, w) for g, w in zip(got, want))
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12))


# the example each family suite's ``compile_exact`` compiled a result on (by result): the
# default result's ops are counted as it runs on it
EXAMPLES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


_RUN_KINDS = {F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.linear: "linear", F.batch_norm: "bn",
              F.layer_norm: "ln", torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.bmm: "matmul"}


def ops_run(module: nn.Module, *inputs, **kwargs):
    """How many convs, linears, BatchNorms, LayerNorms and matmuls ``module`` runs on the inputs,
    however it is written (modules, functions, a graph as its forward): counted as they run."""
    from collections import Counter
    from torch.overrides import TorchFunctionMode

    counts = Counter()

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kind = _RUN_KINDS.get(func)
            if kind is not None:
                counts[kind] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        module(*inputs, **kwargs)
    return counts
