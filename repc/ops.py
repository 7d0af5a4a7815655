"""The canonical vocabulary of affine maps that every rewrite speaks.

Every fusable node of a captured graph is described by one of these values, whatever the
front end produced (module, functional call, tensor method or operator).  They are immutable,
know nothing about fx, and read their tensors in float64 on the CPU.  The weight and bias of a
:class:`Conv` or :class:`Linear` are held as given (a model's own parameter is not copied) and
converted where they are read, so a compile holds the float64 copies of one region's weights at a
time, not of the whole model (:class:`Float64Field`).

* :class:`Conv` -- an N-d convolution over channel axis 1 (zero or other padding, possibly
  asymmetric, stride, dilation, groups).  Also stands for zero-padding and average pooling.
* :class:`Linear` -- ``x @ W.T + b`` over the last axis.
* :class:`Elementwise` -- ``x * scale + shift`` with constant tensors that broadcast to the
  activation without enlarging it: BatchNorm, scalar and per-channel scales, added
  constants, identity.  ``scale`` exactly zero makes it a constant function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .deferred import DeferredMatrix
from .reasons import MergeKind

Padding = Tuple[Tuple[int, int], ...]


class NotMergeable(Exception):
    """A closed form does not apply: :attr:`kind` (a :class:`repc.reasons.MergeKind`) says what
    kind of guard failed, the message which one in words."""

    def __init__(self, kind: MergeKind, words: str):
        super().__init__(words)
        self.kind = kind
        self.words = words


class Float64Field:
    """A tensor field of an op, stored as given and read as float64 on the CPU.

    Stored: the tensor itself, detached (a model's parameter shares its storage; nothing is
    copied), or the expression of a merged weight (:class:`repc.deferred.DeferredMatrix`).
    Read: that tensor where it already is a float64 CPU tensor (the op's own result of a closed
    form), else a float64 CPU tensor made at that read and owned by the caller (converted, or
    the expression computed).  Ops are
    immutable: nothing writes into the tensors it reads.  Shapes are read off
    :meth:`stored` without a conversion.
    """

    def __init__(self, name: str):
        self.name = name

    def __get__(self, op, owner=None):
        if op is None:
            return self
        t = op.__dict__[self.name]
        if isinstance(t, DeferredMatrix):
            return t.compute()
        if t is None or (t.dtype == torch.float64 and t.device.type == "cpu"):
            return t
        return t.to(device="cpu", dtype=torch.float64)

    def __set__(self, op, value):
        op.__dict__[self.name] = value.detach() if isinstance(value, Tensor) else value

    @staticmethod
    def stored(op, name: str):
        """The tensor ``op`` holds under ``name``, as given (for its shape, dtype, storage)."""
        return op.__dict__[name]


def _stored_replace(op, changes):
    """``op`` with ``changes``, the tensors it keeps passed on as stored (not converted)."""
    kept = {f.name: op.__dict__[f.name] for f in fields(op) if f.name not in changes}
    return type(op)(**kept, **changes)


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
    def weight_shape(self) -> torch.Size:
        return Float64Field.stored(self, "weight").shape

    @property
    def nd(self) -> int:
        return len(self.weight_shape) - 2

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.groups

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel_size) and all(s == 1 for s in self.stride)

    def replace(self, **changes) -> "Conv":
        return _stored_replace(self, changes)

    def __repr__(self) -> str:
        k = "x".join(map(str, self.kernel_size))
        return (f"Conv{self.nd}d({self.in_channels}->{self.out_channels}, k={k}, s={self.stride}, "
                f"p={self.padding}, d={self.dilation}, g={self.groups}, bias={self.bias is not None})")


@dataclass(frozen=True, eq=False)
class Linear:
    weight: Tensor  # [out, in]
    bias: Optional[Tensor]

    @property
    def weight_shape(self) -> torch.Size:
        return Float64Field.stored(self, "weight").shape

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    def replace(self, **changes) -> "Linear":
        return _stored_replace(self, changes)

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


for _op in (Conv, Linear):
    for _name in ("weight", "bias"):
        setattr(_op, _name, Float64Field(_name))

AffineOp = Union[Conv, Linear, Elementwise, Dense]



def identity(shape) -> Elementwise:
    return Elementwise(None, None, tuple(shape))


def as_float64(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` as a float64 CPU tensor of its own (never ``t`` itself)."""
    if t is None:
        return None
    out = t.detach().to(device="cpu", dtype=torch.float64)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


def conv_out_size(size: int, k: int, s: int, pad: Tuple[int, int], d: int) -> int:
    return (size + pad[0] + pad[1] - d * (k - 1) - 1) // s + 1


def flops(op: AffineOp, in_shape, out_shape) -> int:
    """Multiply-accumulates of ``op`` for one call on tensors of the given example shapes."""
    out_numel = math.prod(out_shape)
    if isinstance(op, Conv):
        return out_numel * op.weight_shape[1] * math.prod(op.kernel_size)
    if isinstance(op, Linear):
        return out_numel * op.in_features
    if isinstance(op, Dense):
        return out_shape[0] * op.weight.numel()
    return out_numel * ((op.scale is not None) + (op.shift is not None))


def params(op: AffineOp) -> int:
    if isinstance(op, (Conv, Linear)):
        bias = Float64Field.stored(op, "bias")
        return math.prod(op.weight_shape) + (0 if bias is None else bias.numel())
    if isinstance(op, Dense):
        return op.weight.numel() + (0 if op.bias is None else op.bias.numel())
    return sum(t.numel() for t in (op.scale, op.shift) if t is not None)
