"""The canonical vocabulary of affine maps that every rewrite speaks.

Every fusable node of a captured graph is described by one of these values, whatever the
front end produced (module, functional call, tensor method or operator).  They hold their
tensors in float64, are immutable, and know nothing about fx.

* :class:`Conv` -- an N-d convolution over channel axis 1 (zero or other padding, possibly
  asymmetric, stride, dilation, groups).  Also stands for zero-padding and average pooling.
* :class:`Linear` -- ``x @ W.T + b`` over the last axis.
* :class:`Elementwise` -- ``x * scale + shift`` with constant tensors that broadcast to the
  activation without enlarging it: BatchNorm, scalar and per-channel scales, added
  constants, identity.  ``scale`` exactly zero makes it a constant function.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from .reasons import MergeKind

Padding = Tuple[Tuple[int, int], ...]


class NotMergeable(Exception):
    """A closed form does not apply: :attr:`kind` (a :class:`repc.reasons.MergeKind`) says what
    kind of guard failed, the message which one in words."""

    def __init__(self, kind: MergeKind, words: str):
        super().__init__(words)
        self.kind = kind
        self.words = words


@dataclass(frozen=True, eq=False)
class Conv:
    weight: Tensor  # [C_out, C_in / groups, *kernel]
    bias: Optional[Tensor]  # [C_out] or None
    stride: Tuple[int, ...]
    padding: Padding  # (before, after) per spatial axis
    dilation: Tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)

    def replace(self, **changes) -> "Conv":
        return replace(self, **changes)

    def __repr__(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        return (f"Conv{self.nd}d({self.in_channels}->{self.out_channels}, k={k}, s={self.stride}, "
                f"p={self.padding}, d={self.dilation}, g={self.groups}, bias={self.bias is not None})")


@dataclass(frozen=True, eq=False)
class Linear:
    weight: Tensor  # [out, in]
    bias: Optional[Tensor]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def __repr__(self) -> str:
        return f"Linear({self.in_features}->{self.out_features}, bias={self.bias is not None})"


@dataclass(frozen=True, eq=False)
class Elementwise:
    """``x * scale + shift``; tensors have ``ndim`` dims, each of size 1 or the activation's."""

    scale: Optional[Tensor]
    shift: Optional[Tensor]
    shape: Tuple[int, ...] = field(default=())  # the activation's example shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_identity(self) -> bool:
        return self.scale is None and self.shift is None

    @property
    def is_constant(self) -> bool:
        return self.scale is not None and bool((self.scale == 0).all())

    def varying_axes(self) -> set:
        axes = set()
        for t in (self.scale, self.shift):
            if t is not None:
                axes |= {i for i, n in enumerate(t.shape) if n != 1}
        return axes

    def channel_vectors(self, axis: int) -> Tuple[Tensor, Tensor]:
        """(scale, shift) as vectors along ``axis``; raises if they vary along another axis."""
        axis = axis % self.ndim
        extra = self.varying_axes() - {axis}
        if extra:
            raise NotMergeable(MergeKind.AXIS, f"elementwise constant varies along axes {sorted(extra)}, not only the channel axis {axis}")
        n = self.shape[axis]

        def vec(t: Optional[Tensor], default: float) -> Tensor:
            if t is None:
                return torch.full((n,), default, dtype=torch.float64)
            return t.reshape(-1).expand(n).clone() if t.numel() == 1 else t.reshape(n).clone()

        return vec(self.scale, 1.0), vec(self.shift, 0.0)

    def __repr__(self) -> str:
        if self.is_identity:
            return "Identity"
        parts = []
        if self.scale is not None:
            parts.append("scale" + ("" if self.scale.numel() > 1 else f"={self.scale.item():g}"))
        if self.shift is not None:
            parts.append("shift")
        return f"Elementwise({', '.join(parts)})"


@dataclass(frozen=True, eq=False)
class Dense:
    """Any affine map at a fixed per-sample shape: ``y.flatten(1) = x.flatten(1) @ W.T + b``.

    Read off a region by probing when no closed form covers it (a fully-connected layer over a
    flattened feature map next to convolutions, as in RepMLP).  Shape-specialized.
    """

    weight: Tensor  # [prod(out_shape), prod(in_shape)]
    bias: Optional[Tensor]
    in_shape: Tuple[int, ...]  # per sample (without the batch axis)
    out_shape: Tuple[int, ...]

    def __repr__(self) -> str:
        return f"Dense({'x'.join(map(str, self.in_shape))}->{'x'.join(map(str, self.out_shape))}, shape-specialized)"


AffineOp = Union[Conv, Linear, Elementwise, Dense]


def identity(shape) -> Elementwise:
    return Elementwise(None, None, tuple(shape))


_FLOAT64: Optional[Dict[int, Tuple["weakref.ref", int, Tensor]]] = None  # id -> (ref, version, float64 copy)
_CACHED_FROM = 4096  # entries: smaller tensors are converted at every call


@contextlib.contextmanager
def float64_cache():
    """Within the block, :func:`as_float64` converts each large tensor once (while it is not
    written to): one compile reads the same weights in several passes.  The copies are dropped
    when the block ends, so edits made between compiles (``p.data.mul_``, which no version
    counter sees) are always read."""
    global _FLOAT64
    outer = _FLOAT64
    _FLOAT64 = {} if outer is None else outer
    try:
        yield
    finally:
        _FLOAT64 = outer


def as_float64(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` as a float64 CPU tensor of its own (never ``t`` itself; inside
    :func:`float64_cache`, one shared read-only copy per large tensor)."""
    if t is None:
        return None
    cache = _FLOAT64
    key = id(t)
    if cache is not None:
        try:
            version = t._version
        except RuntimeError:  # an inference tensor has no version counter: not cached
            cache = None
        else:
            hit = cache.get(key)
            if hit is not None and hit[0]() is t and hit[1] == version:
                return hit[2]
    out = t.detach().to(device="cpu", dtype=torch.float64)
    if out.data_ptr() == t.data_ptr():  # (already a float64 CPU tensor: a copy of its own)
        out = out.clone()
    if cache is not None and t.numel() >= _CACHED_FROM:
        try:
            ref = weakref.ref(t, lambda _, key=key, cache=cache: cache.pop(key, None))
        except TypeError:
            return out
        cache[key] = (ref, version, out)
    return out


def conv_out_size(size: int, k: int, s: int, pad: Tuple[int, int], d: int) -> int:
    return (size + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def flops(op: AffineOp, in_shape, out_shape) -> int:
    """Multiply-accumulates of ``op`` for one call on tensors of the given example shapes."""
    out_numel = math.prod(out_shape)
    if isinstance(op, Conv):
        return out_numel * op.weight.shape[1] * math.prod(op.kernel_size)
    if isinstance(op, Linear):
        return out_numel * op.in_features
    if isinstance(op, Dense):
        return out_shape[0] * op.weight.numel()
    return out_numel * ((op.scale is not None) + (op.shift is not None))


def params(op: AffineOp) -> int:
    if isinstance(op, (Conv, Linear, Dense)):
        return op.weight.numel() + (0 if op.bias is None else op.bias.numel())
    return sum(t.numel() for t in (op.scale, op.shift) if t is not None)
