"""The architecture fuzzer's conv family (tests/test_fuzz.py).

:func:`networks` draws random branchy training-form conv networks, each as a plain frozen
description (:class:`NetworkSpec`) whose ``repr`` is
valid Python, and :func:`build_network` to turn one into an ``nn.Module`` in eval mode with
randomized BatchNorm statistics.  A network is a chain of blocks; a block applies several
branches to the same input and sums them (with weights 1, -1, 0.5 or 2) or concatenates them
on the channel axis, or splits the input's channels among them (channel slices written as
indexing, ``narrow``, ``split`` or ``chunk``) and concatenates their outputs, then an optional
activation; sums and activations may be written in place.  Branches are chains of convs
(kernels 1x1 to 5x5, 1xk / kx1, strides, dilation, groups, bias on/off, padding written on the
conv, as ``padding='same'``, as a ZeroPad2d module, or as ZeroPad2d then BatchNorm: DBB's
BN-and-pad; reflect / replicate / circular padding modes), BatchNorms, average pools (with padding counted or not), per-channel and scalar
scales with optional shifts, identity-like activations (``Identity``, ``LeakyReLU(1.0)``,
``Dropout`` in eval, ``PReLU`` at 1) and nonlinear ones, identity branches, and branches that
re-use the modules of an earlier branch (a shared module called twice).  The layers are called as
modules or, in a *functional* network, as ``torch.nn.functional`` calls on the modules' tensors.  A block may also be
applied twice with the same modules.  An optional tail reduces the map (``mean`` over space,
``flatten``, which specializes the model to one spatial size, or ``tokens``: ``(N, H*W, C)``)
and applies blocks of linear branches (linear, low-rank pairs, BatchNorm1d, LayerNorm, scales).

Every branch of a block maps an input of size ``n`` (per spatial axis) to
``floor((n + e - 1) / s) + 1`` for the block's stride ``s`` and *slack* ``e`` (padding minus
the kernel's reach), whatever its kernels, so the branches agree on every input size, not only
the example's: the fuzzer compares the compiled model on other sizes too.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from repc.examples import randomize_bn

IDENTITY_ACTIVATIONS = ("identity", "leaky1", "dropout", "prelu1")
NONLINEAR_ACTIVATIONS = ("relu", "gelu", "leaky")
ACTIVATIONS = IDENTITY_ACTIVATIONS + NONLINEAR_ACTIVATIONS
PAD_STYLES = ("conv", "same", "module", "module_bn")

Pair = Tuple[int, int]


@dataclass(frozen=True)
class ConvLayer:
    """A 2-d conv; ``padding`` is (lo, hi) per axis, written as ``pad_with`` says:
    ``conv`` (the conv's own symmetric padding), ``same`` (``padding='same'``), ``module``
    (``nn.ZeroPad2d`` before a conv without padding) or ``module_bn`` (``ZeroPad2d``, then a
    ``BatchNorm2d`` of the input channels, then the conv: the border is filled with the BN's
    output for a zero input).  ``padding_mode`` other than ``zeros`` goes with ``conv``."""

    out_channels: int
    kernel: Pair = (1, 1)
    stride: Pair = (1, 1)
    padding: Tuple[Pair, Pair] = ((0, 0), (0, 0))
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = False
    pad_with: str = "conv"
    padding_mode: str = "zeros"


@dataclass(frozen=True)
class PoolLayer:
    """Average pooling; ``pad_with`` is ``pool`` (symmetric, padded zeros counted), ``module``
    (``nn.ZeroPad2d`` then a pool without padding) or ``exclude_pad`` (symmetric,
    ``count_include_pad=False``: not affine at the border)."""

    kernel: Pair = (2, 2)
    stride: Pair = (1, 1)
    padding: Tuple[Pair, Pair] = ((0, 0), (0, 0))
    pad_with: str = "pool"


@dataclass(frozen=True)
class NormLayer:
    """``kind='batch'``: ``BatchNorm2d`` (``BatchNorm1d`` in a linear tail) over the current
    channels; ``kind='layer'``: ``LayerNorm`` over the features (linear tails only)."""

    kind: str = "batch"


@dataclass(frozen=True)
class ScaleLayer:
    """``x * s (+ t)``: ``s`` a per-channel parameter or the Python scalar ``value``; ``t`` a
    per-channel parameter when ``shift``."""

    per_channel: bool = True
    value: float = 0.5
    shift: bool = False


@dataclass(frozen=True)
class ActLayer:
    """An activation by name, one of :data:`ACTIVATIONS`."""

    kind: str = "identity"


@dataclass(frozen=True)
class LinearLayer:
    out_features: int
    bias: bool = True


Layer = Union[ConvLayer, PoolLayer, NormLayer, ScaleLayer, ActLayer, LinearLayer]


@dataclass(frozen=True)
class Branch:
    """A chain of layers; with ``shares = j``, branch ``j``'s modules run first (again)."""

    layers: Tuple[Layer, ...] = ()
    shares: Optional[int] = None


@dataclass(frozen=True)
class Block:
    """Branches on one input, combined by ``sum`` (times ``weights``) or ``cat`` (channels), or
    ``split``: branch ``i`` reads the ``splits[i]`` channels after the previous branches' (a
    slice written as ``slice_with``: ``getitem``, ``narrow``, ``split`` or ``chunk``) and the
    outputs are concatenated; then ``activation`` (``none`` or one of :data:`ACTIVATIONS`).
    ``inplace``: the sum is accumulated with ``+=`` / ``-=`` and the activation runs in place.
    The block runs ``repeat`` times with the same modules."""

    branches: Tuple[Branch, ...]
    combine: str = "sum"
    weights: Tuple[float, ...] = ()
    activation: str = "none"
    repeat: int = 1
    splits: Tuple[int, ...] = ()
    slice_with: str = "getitem"
    inplace: bool = False


@dataclass(frozen=True)
class Tail:
    """``reduce`` the map (``mean`` over space, ``flatten``, or ``tokens``: ``(N, H*W, C)``),
    then blocks of linear branches."""

    reduce: str = "mean"
    blocks: Tuple[Block, ...] = ()


@dataclass(frozen=True)
class NetworkSpec:
    in_channels: int
    size: Pair  # the example's spatial size
    blocks: Tuple[Block, ...]
    tail: Optional[Tail] = None
    batch: int = 2
    seed: int = 0
    functional: bool = False  # layers called as torch.nn.functional calls on the modules' tensors


# ------------------------------------------------------------------------------- sizes

def layer_size(layer: Layer, n: int, axis: int) -> Optional[int]:
    """Size on spatial ``axis`` after ``layer`` for an input of size ``n``; None if invalid."""
    if isinstance(layer, ConvLayer):
        lo, hi = layer.padding[axis]
        if layer.padding_mode != "zeros" and max(lo, hi) >= n:
            return None  # reflect needs a padding smaller than the input
        reach = layer.dilation[axis] * (layer.kernel[axis] - 1) + 1
        span = n + lo + hi - reach
        return None if span < 0 else span // layer.stride[axis] + 1
    if isinstance(layer, PoolLayer):
        lo, hi = layer.padding[axis]
        span = n + lo + hi - layer.kernel[axis]
        return None if span < 0 else span // layer.stride[axis] + 1
    return n


def branch_size(block: Block, index: int, n: int, axis: int) -> Optional[int]:
    branch = block.branches[index]
    if branch.shares is not None:
        n = branch_size(block, branch.shares, n, axis)
    for layer in branch.layers:
        if n is None:
            return None
        n = layer_size(layer, n, axis)
    return n


def block_size(block: Block, n: int, axis: int) -> Optional[int]:
    for _ in range(block.repeat):
        sizes = {branch_size(block, i, n, axis) for i in range(len(block.branches))}
        if len(sizes) != 1 or None in sizes:
            return None
        n = sizes.pop()
        if n < 1:
            return None
    return n


def output_size(spec: NetworkSpec, n: int, axis: int) -> Optional[int]:
    """Spatial size on ``axis`` before the tail, or None if some layer does not fit."""
    for block in spec.blocks:
        n = block_size(block, n, axis)
        if n is None:
            return None
    return n


def min_size(spec: NetworkSpec, axis: int, limit: int = 64) -> Optional[int]:
    """The smallest input size on ``axis`` every layer accepts (None if none up to ``limit``)."""
    for n in range(1, limit + 1):
        if output_size(spec, n, axis) is not None:
            return n
    return None


def accepted_sizes(spec: NetworkSpec, axis: int, upto: int) -> List[int]:
    """Input sizes on ``axis`` the network accepts, up to ``upto`` (only its example size when
    the tail flattens the map)."""
    if spec.tail is not None and spec.tail.reduce == "flatten":
        return [spec.size[axis]]
    return [n for n in range(1, upto + 1) if output_size(spec, n, axis) is not None]


# ------------------------------------------------------------------------------- channels

def _broadcast(a: Optional[int], b: Optional[int]) -> Optional[int]:
    """The channel count of ``a``- and ``b``-channel tensors broadcast together (None: they do not)."""
    if a is None or b is None or (a != b and 1 not in (a, b)):
        return None
    return b if a == 1 else a


def layer_channels(layer: Layer, built: int, n: Optional[int]) -> Optional[int]:
    """Channels after ``layer`` (its modules built for ``built`` channels) on an input of ``n``
    channels; None if the modules reject it.  Convs, norms and linears need their own count;
    a per-channel scale or shift broadcasts (so one built for 1 channel takes any count); pools
    and activations (``PReLU`` has one weight) take any."""
    if n is None:
        return None
    if isinstance(layer, ConvLayer):
        return layer.out_channels if n == built else None
    if isinstance(layer, LinearLayer):
        return layer.out_features if n == built else None
    if isinstance(layer, NormLayer):
        return n if n == built else None
    if isinstance(layer, ScaleLayer):
        return _broadcast(n, built) if layer.per_channel or layer.shift else n
    return n


def _layer_out(layer: Layer, c: int) -> int:
    return layer_channels(layer, c, c)


def _built_channels(block: Block, index: int, cin: int) -> int:
    """The channels branch ``index``'s modules are built for (the first of its own layers)."""
    branch = block.branches[index]
    if branch.shares is not None:
        c = _built_channels(block, branch.shares, cin)
        for layer in block.branches[branch.shares].layers:
            c = _layer_out(layer, c)
        return c
    return block.splits[index] if block.combine == "split" else cin


def _slice_channels(block: Block, n: int) -> Optional[List[int]]:
    """The channels of each slice of a split block on ``n`` input channels (None: it fails).
    Indexing ignores channels past the last slice (or cuts the slices short); ``narrow`` needs
    every slice inside the input; ``split`` needs the slices to cover it exactly; ``chunk``
    cuts the input into pieces of ``ceil(n / k)`` channels, which may be fewer than ``k``."""
    if block.slice_with == "split":
        return list(block.splits) if sum(block.splits) == n else None
    if block.slice_with == "chunk":
        k = len(block.splits)
        size = -(-n // k)
        pieces = [min(size, n - start) for start in range(0, n, size)] if size else []
        return pieces[:k] if len(pieces) >= k else None
    out, start = [], 0
    for part in block.splits:
        if block.slice_with == "narrow" and start + part > n:
            return None
        out.append(max(0, min(start + part, n) - start))
        start += part
    return out


def block_channels(block: Block, cin: int, n: Optional[int]) -> Optional[int]:
    """Channels after ``block`` (built for ``cin`` input channels) on an input of ``n``
    channels, or None if some module rejects it."""
    for _ in range(block.repeat):
        if n is None:
            return None
        inputs = _slice_channels(block, n) if block.combine == "split" else [n] * len(block.branches)
        if inputs is None:
            return None
        outs: List[Optional[int]] = []
        for i, branch in enumerate(block.branches):
            c = outs[branch.shares] if branch.shares is not None else inputs[i]
            built = _built_channels(block, i, cin)
            for layer in branch.layers:
                c = layer_channels(layer, built, c)
                built = _layer_out(layer, built)
            outs.append(c)
        if None in outs:
            return None
        if block.combine == "sum":
            n = outs[0]
            for c in outs[1:]:  # ``+=`` writes into the first branch's tensor: it cannot grow
                n = (n if c in (n, 1) else None) if block.inplace else _broadcast(n, c)
        else:
            n = sum(outs)
    return n


def accepted_channels(spec: NetworkSpec, n: int) -> Optional[int]:
    """Output channels (features, with a tail) of the network on an input of ``n`` channels
    at the example's size, or None if some module rejects it.  ``n`` is at least the network's
    own channel count: fewer can cut a split's slices down to empty tensors, which some ops
    take and some refuse."""
    if n < spec.in_channels:
        raise ValueError(f"{n} channels: the claim covers {spec.in_channels} channels or more")
    c, built = n, spec.in_channels
    for block in spec.blocks:
        c = block_channels(block, built, c)
        built = block_channels(block, built, built)
    if spec.tail is not None and c is not None:
        if spec.tail.reduce == "flatten":
            area = math.prod(output_size(spec, size, axis) for axis, size in enumerate(spec.size))
            c, built = c * area, built * area
        for block in spec.tail.blocks:
            c = block_channels(block, built, c)
            built = block_channels(block, built, built)
    return c


# ------------------------------------------------------------------------------- modules

class Scale(nn.Module):
    """``x * s (+ t)`` over channel axis 1 of a map (``ndim`` 4), the last axis otherwise."""

    def __init__(self, layer: ScaleLayer, channels: int, ndim: int, generator: torch.Generator):
        super().__init__()
        view = (1, channels, 1, 1) if ndim == 4 else (1,) * (ndim - 1) + (channels,)
        self.per_channel, self.value, self.has_shift = layer.per_channel, float(layer.value), layer.shift
        if layer.per_channel:
            self.scale = nn.Parameter(torch.rand(view, generator=generator) * 1.5 + 0.25)
        if layer.shift:
            self.shift = nn.Parameter(torch.rand(view, generator=generator) * 2 - 1)

    def forward(self, x):
        y = x * self.scale if self.per_channel else x * self.value
        if self.has_shift:
            y = y + self.shift
        return y


def activation_module(kind: str, inplace: bool = False) -> nn.Module:
    table = {"identity": nn.Identity, "leaky1": lambda: nn.LeakyReLU(1.0, inplace),
             "dropout": lambda: nn.Dropout(0.5, inplace), "prelu1": lambda: nn.PReLU(1, init=1.0),
             "relu": lambda: nn.ReLU(inplace), "gelu": nn.GELU, "leaky": lambda: nn.LeakyReLU(0.1, inplace)}
    if kind not in table:
        raise ValueError(f"unknown activation {kind!r}; expected one of {', '.join(table)}")
    return table[kind]()


def _zero_pad(padding: Tuple[Pair, Pair]) -> nn.Module:
    (top, bottom), (left, right) = padding
    return nn.ZeroPad2d((left, right, top, bottom))


def layer_modules(layer: Layer, channels: int, ndim: int, generator: torch.Generator) -> Tuple[List[nn.Module], int]:
    """The modules computing ``layer`` on ``channels`` input channels, and the output channels."""
    if isinstance(layer, ConvLayer):
        mods: List[nn.Module] = []
        if layer.pad_with in ("module", "module_bn"):
            mods.append(_zero_pad(layer.padding))
            if layer.pad_with == "module_bn":
                mods.append(nn.BatchNorm2d(channels))
            padding: Any = 0
        elif layer.pad_with == "same":
            padding = "same"
        elif layer.pad_with == "conv":
            if any(lo != hi for lo, hi in layer.padding):
                raise ValueError(f"a conv's own padding is symmetric, got {layer.padding}")
            padding = tuple(lo for lo, _ in layer.padding)
        else:
            raise ValueError(f"unknown padding style {layer.pad_with!r}; expected one of {', '.join(PAD_STYLES)}")
        if layer.padding_mode != "zeros" and layer.pad_with != "conv":
            raise ValueError("a padding mode other than zeros goes with the conv's own padding")
        mods.append(nn.Conv2d(channels, layer.out_channels, layer.kernel, layer.stride, padding,
                              layer.dilation, layer.groups, layer.bias, layer.padding_mode))
        return mods, layer.out_channels
    if isinstance(layer, PoolLayer):
        if layer.pad_with == "module":
            return [_zero_pad(layer.padding), nn.AvgPool2d(layer.kernel, layer.stride, 0)], channels
        if any(lo != hi for lo, hi in layer.padding):
            raise ValueError(f"a pool's own padding is symmetric, got {layer.padding}")
        return [nn.AvgPool2d(layer.kernel, layer.stride, tuple(lo for lo, _ in layer.padding),
                             count_include_pad=layer.pad_with != "exclude_pad")], channels
    if isinstance(layer, NormLayer):
        if layer.kind == "layer":
            if ndim == 4:
                raise ValueError("LayerNorm layers go in linear tails")
            norm = nn.LayerNorm(channels)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(channels, generator=generator) * 1.5 + 0.25)
                norm.bias.copy_(torch.rand(channels, generator=generator) * 2 - 1)
            return [norm], channels
        if ndim == 3:
            raise ValueError("BatchNorm1d over tokens needs the channel axis second: use a LayerNorm")
        return [nn.BatchNorm2d(channels) if ndim == 4 else nn.BatchNorm1d(channels)], channels
    if isinstance(layer, ScaleLayer):
        return [Scale(layer, channels, ndim, generator)], channels
    if isinstance(layer, ActLayer):
        return [activation_module(layer.kind)], channels
    if isinstance(layer, LinearLayer):
        return [nn.Linear(channels, layer.out_features, layer.bias)], layer.out_features
    raise TypeError(f"not a layer: {layer!r}")


class FuzzNet(nn.Module):
    """The network a :class:`NetworkSpec` describes (see :func:`build_network`)."""

    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        channels = spec.in_channels
        self.body = nn.ModuleList()
        for block in spec.blocks:
            mods, channels = self._block_modules(block, channels, 4, gen)
            self.body.append(mods)
        self.head = nn.ModuleList()
        if spec.tail is not None:
            if spec.tail.reduce == "flatten":
                h, w = (output_size(spec, n, axis) for axis, n in enumerate(spec.size))
                channels = channels * h * w
            elif spec.tail.reduce not in ("mean", "tokens"):
                raise ValueError(f"unknown tail reduction {spec.tail.reduce!r}; expected mean, flatten or tokens")
            ndim = 3 if spec.tail.reduce == "tokens" else 2
            for block in spec.tail.blocks:
                mods, channels = self._block_modules(block, channels, ndim, gen)
                self.head.append(mods)

    @staticmethod
    def _block_modules(block: Block, channels: int, ndim: int, gen) -> Tuple[nn.ModuleList, int]:
        branches = nn.ModuleList()
        outs = []
        if block.combine == "split" and (sum(block.splits) != channels or len(block.splits) != len(block.branches)):
            raise ValueError(f"split {block.splits} of {channels} channels among {len(block.branches)} branches")
        for i, branch in enumerate(block.branches):
            c = outs[branch.shares] if branch.shares is not None else \
                (block.splits[i] if block.combine == "split" else channels)
            seq = nn.ModuleList()
            for layer in branch.layers:
                mods, c = layer_modules(layer, c, ndim, gen)
                seq.append(nn.Sequential(*mods) if len(mods) > 1 else mods[0])
            branches.append(seq)
            outs.append(c)
        if block.combine == "sum":
            if len(set(outs)) != 1:
                raise ValueError(f"summed branches have different channel counts {outs}")
            out = outs[0]
        elif block.combine in ("cat", "split"):
            out = sum(outs)
        else:
            raise ValueError(f"unknown block combination {block.combine!r}; expected sum, cat or split")
        if block.repeat > 1 and out != channels:
            raise ValueError("a repeated block must keep the channel count")
        mods = nn.ModuleList([branches])
        if block.activation != "none":
            mods.append(activation_module(block.activation, block.inplace))
        return mods, out

    def _branch(self, block: Block, branches: nn.ModuleList, index: int, x):
        branch = block.branches[index]
        if branch.shares is not None:
            x = self._branch(block, branches, branch.shares, x)
        for mod in branches[index]:
            x = call_functional(mod, x) if self.spec.functional else mod(x)
        return x

    @staticmethod
    def _slices(block: Block, x, dim: int):
        if block.slice_with in ("split", "chunk"):  # indexed, not iterated: fx traces a proxy
            parts = torch.split(x, list(block.splits), dim) if block.slice_with == "split" \
                else x.chunk(len(block.splits), dim)
            return [parts[i] for i in range(len(block.splits))]
        out, start = [], 0
        for n in block.splits:
            if block.slice_with == "narrow":
                out.append(x.narrow(dim, start, n))
            elif dim == 1:
                out.append(x[:, start:start + n])
            else:
                out.append(x[..., start:start + n])
            start += n
        return out

    def _block(self, block: Block, mods: nn.ModuleList, x, dim: int):
        """``dim``: the channel axis (1 in the body, -1 in the tail), a Python int so that fx
        traces the block without control flow on tensors."""
        for _ in range(block.repeat):
            if block.combine == "split":
                ys = [self._branch(block, mods[0], i, part) for i, part in enumerate(self._slices(block, x, dim))]
            else:
                ys = [self._branch(block, mods[0], i, x) for i in range(len(block.branches))]
            if block.combine in ("cat", "split"):
                out = torch.cat(ys, dim)
            elif block.inplace:
                weights = block.weights or (1.0,) * len(ys)
                out = ys[0] if weights[0] == 1.0 else ys[0] * weights[0]
                for w, y in zip(weights[1:], ys[1:]):
                    if w == 1.0:
                        out += y
                    elif w == -1.0:
                        out -= y
                    else:
                        out.add_(y, alpha=w)
            else:
                weights = block.weights or (1.0,) * len(ys)
                out = ys[0] if weights[0] == 1.0 else ys[0] * weights[0]
                for w, y in zip(weights[1:], ys[1:]):
                    if w == 1.0:
                        out = out + y
                    elif w == -1.0:
                        out = out - y
                    else:
                        out = out + y * w
            if len(mods) > 1:
                x = call_functional(mods[1], out) if self.spec.functional else mods[1](out)
            else:
                x = out
        return x

    def forward(self, x):
        for block, mods in zip(self.spec.blocks, self.body):
            x = self._block(block, mods, x, 1)
        if self.spec.tail is not None:
            if self.spec.tail.reduce == "mean":
                x = x.mean((2, 3))
            elif self.spec.tail.reduce == "tokens":
                x = x.flatten(2).transpose(1, 2)
            else:
                x = torch.flatten(x, 1)
            for block, mods in zip(self.spec.tail.blocks, self.head):
                x = self._block(block, mods, x, -1)
        return x


def call_functional(mod: nn.Module, x):
    """``mod(x)`` written as ``torch.nn.functional`` calls on the module's own tensors."""
    if isinstance(mod, nn.Sequential):
        for m in mod:
            x = call_functional(m, x)
        return x
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            pad = [p for p in reversed(mod.padding) for _ in range(2)]
            return F.conv2d(F.pad(x, pad, mode=mod.padding_mode), mod.weight, mod.bias, mod.stride, 0,
                            mod.dilation, mod.groups)
        return F.conv2d(x, mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return F.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
    if isinstance(mod, nn.Linear):
        return F.linear(x, mod.weight, mod.bias)
    if isinstance(mod, nn.AvgPool2d):
        return F.avg_pool2d(x, mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode, mod.count_include_pad,
                            mod.divisor_override)
    if isinstance(mod, nn.ZeroPad2d):
        return F.pad(x, list(mod.padding))
    if isinstance(mod, nn.ReLU):
        return F.relu(x, inplace=mod.inplace)
    if isinstance(mod, nn.LeakyReLU):
        return F.leaky_relu(x, mod.negative_slope, mod.inplace)
    if isinstance(mod, nn.GELU):
        return F.gelu(x)
    if isinstance(mod, nn.Dropout):
        return F.dropout(x, mod.p, False, mod.inplace)
    if isinstance(mod, nn.PReLU):
        return F.prelu(x, mod.weight)
    if isinstance(mod, nn.Identity):
        return x
    return mod(x)


def build_network(spec: NetworkSpec) -> nn.Module:
    """The ``nn.Module`` a spec describes: weights from ``spec.seed``, BatchNorm statistics
    randomized, in eval mode.  The global random state is left alone."""
    with _isolated_rng(spec.seed):
        model = FuzzNet(spec)
    return randomize_bn(model, spec.seed).eval()


def example_input(spec: NetworkSpec, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((spec.batch, spec.in_channels) + tuple(spec.size), generator=gen)


@contextmanager
def _isolated_rng(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------- strategies

def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split(draw, total: int, symmetric: bool) -> Pair:
    """(lo, hi) with lo + hi = total; symmetric when asked and possible."""
    if symmetric and total % 2 == 0:
        return total // 2, total // 2
    lo = draw(st.integers(0, total))
    return lo, total - lo


@st.composite
def conv_layers(draw, cin: int, cout: int, stride: Pair = (1, 1), slack: Pair = (0, 0),
                max_kernel: int = 5) -> ConvLayer:
    """A conv ``cin -> cout`` with the given stride whose output size is
    ``floor((n + slack - 1) / stride) + 1`` on each axis."""
    square = draw(st.booleans())
    kernel, dilation, padding = [], [], []
    for axis in range(2):
        e = slack[axis]
        if axis == 1 and square and (kernel[0] - 1) * dilation[0] + e >= 0:
            k, d = kernel[0], dilation[0]
        else:
            options = [(k, d) for k in range(1, max_kernel + 1) for d in ((1, 2) if k > 1 else (1,))
                       if d * (k - 1) + e >= 0]
            k, d = draw(st.sampled_from(sorted(options, key=lambda kd: (abs(kd[0] - 2), kd[1]))))
        kernel.append(k)
        dilation.append(d)
    symmetric = draw(st.booleans())
    for axis in range(2):
        padding.append(_split(draw, slack[axis] + dilation[axis] * (kernel[axis] - 1), symmetric))
    styles = []
    if all(lo == hi for lo, hi in padding):
        styles.append("conv")
    if stride == (1, 1) and all(lo == (lo + hi) // 2 for lo, hi in padding) and slack == (0, 0):
        styles.append("same")
    styles += ["module", "module_bn"]
    groups = draw(st.sampled_from(_divisors(math.gcd(cin, cout))))
    style = draw(st.sampled_from(styles))
    mode = "zeros"
    if style == "conv" and any(lo for lo, _ in padding):
        mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    return ConvLayer(cout, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), groups,
                     draw(st.booleans()), style, mode)


@st.composite
def pool_layers(draw, stride: Pair, slack: Pair) -> Optional[PoolLayer]:
    """An average pool with the given stride and slack, or None if none fits."""
    kernel, padding = [], []
    for axis in range(2):
        options = [k for k in range(1, 4) if k - 1 + slack[axis] >= 0]
        if not options:
            return None
        k = draw(st.sampled_from(options))
        kernel.append(k)
        padding.append(_split(draw, k - 1 + slack[axis], draw(st.booleans())))
    symmetric_ok = all(lo == hi and lo <= k // 2 for (lo, hi), k in zip(padding, kernel))
    styles = ["module"] + (["pool", "exclude_pad"] if symmetric_ok else [])
    return PoolLayer(tuple(kernel), tuple(stride), tuple(padding), draw(st.sampled_from(styles)))


def _norms(linear: bool, tokens: bool) -> List[NormLayer]:
    if tokens:
        return [NormLayer("layer")]
    return [NormLayer("batch"), NormLayer("layer")] if linear else [NormLayer("batch")]


@st.composite
def post_layers(draw, channels: int, linear: bool = False, max_layers: int = 2, tokens: bool = False) -> Tuple[Layer, ...]:
    """Size- and channel-preserving layers: norms, scales, activations, 1x1 convs / square linears."""
    layers = []
    for _ in range(draw(st.integers(0, max_layers))):
        kind = draw(st.sampled_from(["norm", "scale", "act", "mix"]))
        if kind == "norm":
            layers.append(draw(st.sampled_from(_norms(linear, tokens))))
        elif kind == "scale":
            layers.append(ScaleLayer(draw(st.booleans()), draw(st.sampled_from([0.5, -1.0, 2.0, 0.25])),
                                     draw(st.booleans())))
        elif kind == "act":
            layers.append(ActLayer(draw(st.sampled_from(ACTIVATIONS))))
        elif linear:
            layers.append(LinearLayer(channels, draw(st.booleans())))
        else:
            layers.append(ConvLayer(channels, groups=draw(st.sampled_from(_divisors(channels))),
                                    bias=draw(st.booleans())))
    return tuple(layers)


@st.composite
def conv_branches(draw, cin: int, cout: int, stride: Pair, slack: Pair, earlier: Sequence[int],
                  max_channels: int) -> Optional[Branch]:
    """One branch of a conv block, or None when the drawn kind does not fit the geometry.

    ``earlier`` lists the output channels of the block's earlier branches; a *shared* branch
    re-runs one of them (its modules called a second time) and adds its own post layers.
    """
    kinds = ["conv", "chain", "pool", "identity", "scale"] + (["shared"] if earlier else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "shared":
        j = draw(st.integers(0, len(earlier) - 1))
        return Branch(draw(post_layers(earlier[j])), shares=j)
    if kind in ("identity", "scale"):
        if stride != (1, 1) or slack != (0, 0) or cin != cout:
            return None
        if kind == "identity":
            return Branch(draw(st.sampled_from([(), (NormLayer(),), (ActLayer("dropout"),)])))
        return Branch((ScaleLayer(draw(st.booleans()), draw(st.sampled_from([0.5, -1.0, 2.0])), draw(st.booleans())),))
    layers: List[Layer] = []
    if kind == "pool":
        pool = draw(pool_layers(stride, slack))
        if pool is None:
            return None
        if cin != cout:
            layers.append(ConvLayer(cout, groups=draw(st.sampled_from(_divisors(math.gcd(cin, cout)))),
                                    bias=draw(st.booleans())))
            if draw(st.booleans()):
                layers.append(NormLayer())
        layers.append(pool)
    else:
        c = cin
        if kind == "chain":
            mid = draw(st.integers(1, max_channels))
            layers.append(ConvLayer(mid, groups=draw(st.sampled_from(_divisors(math.gcd(cin, mid)))),
                                    bias=draw(st.booleans())))
            layers.extend(draw(post_layers(mid, max_layers=1)))
            c = mid
        layers.append(draw(conv_layers(c, cout, stride, slack)))
    if draw(st.booleans()):
        layers.append(NormLayer())
    layers.extend(draw(post_layers(cout, max_layers=1)))
    return Branch(tuple(layers))


def _fresh(branch: Branch) -> bool:
    """The branch returns a tensor of its own (not its input or a view of it), so ``+=`` on it
    and in-place activations after it leave the block's input alone."""
    return branch.shares is None and any(not (isinstance(layer, ActLayer) and layer.kind in ("identity", "dropout"))
                                         for layer in branch.layers)


@st.composite
def _splits(draw, channels: int, max_parts: int) -> Tuple[Tuple[int, ...], str]:
    """Channel counts of a split of ``channels`` into 2..max_parts parts, and how it is written."""
    n = draw(st.integers(2, max(2, min(channels, max_parts))))
    if channels % n == 0 and draw(st.booleans()):
        parts = (channels // n,) * n
    else:
        cuts = sorted(draw(st.sets(st.integers(1, channels - 1), min_size=n - 1, max_size=n - 1)))
        parts = tuple(b - a for a, b in zip([0] + cuts, cuts + [channels]))
    styles = ["getitem", "narrow", "split"] + (["chunk"] if len(set(parts)) == 1 else [])
    return parts, draw(st.sampled_from(styles))


@st.composite
def conv_blocks(draw, cin: int, max_branches: int = 4, max_channels: int = 8) -> Block:
    """A block of conv branches on ``cin`` channels (see the module docstring)."""
    combine = draw(st.sampled_from(["sum", "sum", "cat"] + (["split"] if cin >= 2 else [])))
    stride = draw(st.sampled_from([(1, 1), (2, 2), (1, 2), (2, 1)]))
    slack = draw(st.sampled_from([(0, 0), (-1, -1), (-2, -2), (0, -1), (-2, 0)]))
    splits, slice_with = draw(_splits(cin, max_branches)) if combine == "split" else ((), "getitem")
    n = len(splits) if splits else draw(st.integers(1, max_branches))
    cout = draw(st.sampled_from([cin] + [c for c in range(1, max_channels + 1) if c != cin])) if combine == "sum" else None
    branches: List[Branch] = []
    outs: List[int] = []
    for i in range(n):
        c_in = splits[i] if splits else cin
        c = cout if combine == "sum" else draw(st.sampled_from([c_in] + list(range(1, max(2, max_channels // 2) + 1))))
        earlier = [] if splits else outs
        branch = None
        for _attempt in range(3):
            branch = draw(conv_branches(c_in, c, stride, slack, earlier, max_channels))
            if branch is not None:
                break
        if branch is None:
            branch = Branch((draw(conv_layers(c_in, c, stride, slack)),))
        if branch.shares is not None:
            c = outs[branch.shares]
        branches.append(branch)
        outs.append(c)
    weights = tuple([1.0] + [draw(st.sampled_from([1.0, -1.0, 0.5, 2.0])) for _ in branches[1:]]) \
        if combine == "sum" else ()
    out = outs[0] if combine == "sum" else sum(outs)
    activation = draw(st.sampled_from(("none",) + ACTIVATIONS))
    repeat = draw(st.sampled_from([1, 1, 1, 2])) if out == cin else 1
    inplace = (combine != "sum" or _fresh(branches[0])) and draw(st.booleans())
    return Block(tuple(branches), combine, weights, activation, repeat, splits, slice_with, inplace)


@st.composite
def linear_blocks(draw, features: int, max_branches: int = 3, max_features: int = 12, tokens: bool = False) -> Block:
    """A block of linear branches on ``features`` inputs: linear, low-rank pair, norms, scale."""
    combine = draw(st.sampled_from(["sum", "sum", "cat"] + (["split"] if features >= 2 else [])))
    splits, slice_with = draw(_splits(features, max_branches)) if combine == "split" else ((), "getitem")
    out = draw(st.sampled_from([features] + [f for f in range(1, max_features + 1) if f != features]))
    branches: List[Branch] = []
    for i in range(len(splits) if splits else draw(st.integers(1, max_branches))):
        f_in = splits[i] if splits else features
        o = out if combine == "sum" else draw(st.integers(1, 6))
        kind = draw(st.sampled_from(["linear", "lowrank", "identity"]))
        if kind == "identity" and o == f_in:
            layers: Tuple[Layer, ...] = draw(st.sampled_from(
                [(), (ScaleLayer(True, 1.0, True),)] + [(norm,) for norm in _norms(True, tokens)]))
        elif kind == "lowrank":
            r = draw(st.integers(1, 3))
            layers = (LinearLayer(r, False), LinearLayer(o, draw(st.booleans())))
        else:
            layers = (LinearLayer(o, draw(st.booleans())),)
        layers += draw(post_layers(o, linear=True, max_layers=1, tokens=tokens))
        branches.append(Branch(layers))
    weights = tuple([1.0] + [draw(st.sampled_from([1.0, -1.0, 0.5])) for _ in branches[1:]]) if combine == "sum" else ()
    activation = draw(st.sampled_from(("none",) + ACTIVATIONS))
    inplace = (combine != "sum" or _fresh(branches[0])) and draw(st.booleans())
    return Block(tuple(branches), combine, weights, activation, 1, splits, slice_with, inplace)


def _block_out(block: Block, cin: int) -> int:
    outs = []
    for i, b in enumerate(block.branches):
        c = outs[b.shares] if b.shares is not None else (block.splits[i] if block.combine == "split" else cin)
        for layer in b.layers:
            if isinstance(layer, (ConvLayer, LinearLayer)):
                c = layer.out_channels if isinstance(layer, ConvLayer) else layer.out_features
        outs.append(c)
    return outs[0] if block.combine == "sum" else sum(outs)


@st.composite
def networks(draw, max_blocks: int = 3, max_branches: int = 4, max_channels: int = 8,
             tails: bool = True) -> NetworkSpec:
    """Random branchy conv networks (see the module docstring) that accept their example input."""
    cin = draw(st.integers(1, max_channels))
    blocks: List[Block] = []
    c = cin
    for _ in range(draw(st.integers(1, max_blocks))):
        block = draw(conv_blocks(c, max_branches, max_channels))
        trial = NetworkSpec(cin, (1, 1), tuple(blocks + [block]))
        if min_size(trial, 0, 32) is None or min_size(trial, 1, 32) is None:
            break
        blocks.append(block)
        c = _block_out(block, c)
    if not blocks:
        blocks.append(Block((Branch((ConvLayer(c, (3, 3), padding=((1, 1), (1, 1))),)),)))
    body = NetworkSpec(cin, (1, 1), tuple(blocks))
    size = tuple(min_size(body, axis, 32) + draw(st.integers(0, 4)) for axis in range(2))
    tail = None
    if tails and draw(st.booleans()):
        reduce = draw(st.sampled_from(["mean", "mean", "flatten", "tokens"]))
        features = c
        if reduce == "flatten":
            h, w = (output_size(body, n, axis) for axis, n in enumerate(size))
            features = c * h * w
            if features > 64:
                reduce, features = "mean", c
        tail_blocks = []
        for _ in range(draw(st.integers(1, 2))):
            block = draw(linear_blocks(features, tokens=reduce == "tokens"))
            tail_blocks.append(block)
            features = _block_out(block, features)
        tail = Tail(reduce, tuple(tail_blocks))
    return NetworkSpec(cin, size, tuple(blocks), tail, draw(st.integers(1, 3)), draw(st.integers(0, 2 ** 16)),
                       draw(st.booleans()))
