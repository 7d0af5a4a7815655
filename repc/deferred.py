"""Merged linear weights computed where they are read.

A merged linear map's weight is a product, sum or scaling of the weights it merges: a LoRA
layer's is ``W + s (B A)``.  The matcher needs its shape only; the writer needs its values once,
to cast them to the model's dtype.  :class:`DeferredMatrix` records such an expression over the
tensors it merges (held as given: a model's parameters are not copied) and computes it in float64
when it is read (:func:`repc.ops.Float64Field`), into one tensor of its own:

* a scaling of a product scales the product's smaller factor (``s (B A) = (s B) A``);
* a product added to a sum is accumulated in place (``addmm_``), so that ``W + s (B A)``
  allocates one full-size tensor, where computing each step apart allocates four;
* a product applied to a vector (a merged bias, ``(W2 W1) b``) is never formed
  (:func:`matvec`: ``W2 (W1 b)``).

Small results are computed at once (:data:`EAGER_NUMEL`): deferring them saves nothing.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

F64 = torch.float64
EAGER_NUMEL = 1 << 16  # results with at most this many entries are tensors, not expressions

Matrix = Union[Tensor, "DeferredMatrix"]


def value(m: Matrix) -> Tensor:
    """``m`` as a float64 CPU tensor: a tensor already so as it is (read only), else a new one."""
    if isinstance(m, DeferredMatrix):
        return m.compute()
    if m.dtype == F64 and m.device.type == "cpu":
        return m
    return m.to(device="cpu", dtype=F64)


def owned(m: Matrix) -> Tensor:
    """``m`` as a float64 CPU tensor the caller may write into."""
    if isinstance(m, DeferredMatrix):
        return m.compute()
    out = m.to(device="cpu", dtype=F64)
    return out.clone() if out.data_ptr() == m.data_ptr() else out


class DeferredMatrix:
    """A float64 matrix, as the expression that computes it; :meth:`compute` gives a new tensor."""

    dtype = F64
    device = torch.device("cpu")
    is_floating_point = staticmethod(lambda: True)

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    def dim(self) -> int:
        return 2

    @property
    def ndim(self) -> int:
        return 2

    def numel(self) -> int:
        return math.prod(self.shape)

    def size(self, axis: Optional[int] = None):
        return self.shape if axis is None else self.shape[axis]

    def compute(self) -> Tensor:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> Matrix:
        raise NotImplementedError

    def cols(self, start: int, stop: int) -> Matrix:
        raise NotImplementedError

    def __getitem__(self, key):
        """``m[a:b]`` (rows) or ``m[:, a:b]`` (columns), as an expression."""
        if isinstance(key, slice) and key.step in (None, 1):
            return self.rows(*_bounds(key, self.shape[0]))
        if isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice) \
                and key[1].step in (None, 1):
            return self.cols(*_bounds(key[1], self.shape[1]))
        return self.compute()[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({'x'.join(map(str, self.shape))})"


def _bounds(key: slice, n: int) -> Tuple[int, int]:
    start, stop, _ = key.indices(n)
    return start, max(start, stop)


def _rows(m: Matrix, start: int, stop: int) -> Matrix:
    return m.rows(start, stop) if isinstance(m, DeferredMatrix) else m[start:stop]


def _cols(m: Matrix, start: int, stop: int) -> Matrix:
    return m.cols(start, stop) if isinstance(m, DeferredMatrix) else m[:, start:stop]


class Product(DeferredMatrix):
    """``left @ right``."""

    def __init__(self, left: Matrix, right: Matrix):
        self.left, self.right = left, right

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.left.shape[0], self.right.shape[1]))

    def compute(self) -> Tensor:
        return value(self.left) @ value(self.right)

    def rows(self, start, stop):
        return product(_rows(self.left, start, stop), self.right)

    def cols(self, start, stop):
        return product(self.left, _cols(self.right, start, stop))


class Sum(DeferredMatrix):
    """``terms[0] + terms[1] + ...``."""

    def __init__(self, terms: Sequence[Matrix]):
        self.terms = list(terms)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.terms[0].shape)

    def compute(self) -> Tensor:
        # one buffer: the first term that is not a product (converted or computed), every product
        # accumulated into it in place
        first = next((t for t in self.terms if not isinstance(t, Product)), self.terms[0])
        out = owned(first)
        for term in self.terms:
            if term is first:
                continue
            if isinstance(term, Product):
                out.addmm_(value(term.left), value(term.right))
            else:
                out.add_(value(term))
        return out

    def rows(self, start, stop):
        return total([_rows(t, start, stop) for t in self.terms])

    def cols(self, start, stop):
        return total([_cols(t, start, stop) for t in self.terms])


class Scaled(DeferredMatrix):
    """``inner * rows[:, None] * cols[None, :]`` (a vector or a 0-d tensor each, or None)."""

    def __init__(self, inner: Matrix, rows: Optional[Tensor], cols: Optional[Tensor]):
        self.inner, self.row_scale, self.col_scale = inner, rows, cols

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.inner.shape)

    def compute(self) -> Tensor:
        out = owned(self.inner)
        if self.row_scale is not None:
            out.mul_(self.row_scale.reshape(-1, 1) if self.row_scale.dim() else self.row_scale)
        if self.col_scale is not None:
            out.mul_(self.col_scale.reshape(1, -1) if self.col_scale.dim() else self.col_scale)
        return out

    def rows(self, start, stop):
        r = self.row_scale
        return scaled(_rows(self.inner, start, stop), r[start:stop] if r is not None and r.dim() else r,
                      self.col_scale)

    def cols(self, start, stop):
        c = self.col_scale
        return scaled(_cols(self.inner, start, stop), self.row_scale,
                      c[start:stop] if c is not None and c.dim() else c)


# ----------------------------------------------------------------------------- constructors

def _small(shape) -> bool:
    return math.prod(shape) <= EAGER_NUMEL


def product(left: Matrix, right: Matrix) -> Matrix:
    """``left @ right``: a tensor where small, else deferred."""
    shape = (left.shape[0], right.shape[1])
    if _small(shape):
        return value(left) @ value(right)
    return Product(left, right)


def total(terms: Sequence[Matrix]) -> Matrix:
    """The sum of ``terms`` (matrices of one shape)."""
    flat: List[Matrix] = []
    for t in terms:
        flat.extend(t.terms if isinstance(t, Sum) else [t])
    if _small(flat[0].shape):
        out = owned(flat[0])
        for t in flat[1:]:
            out.add_(value(t))
        return out
    return Sum(flat)


def scaled(m: Matrix, rows: Optional[Tensor] = None, cols: Optional[Tensor] = None) -> Matrix:
    """``m * rows[:, None] * cols[None, :]`` (float64 vectors or 0-d tensors, or None).  A
    product takes the scalings into its factors: ``(s B) A`` costs ``B``'s size, not ``BA``'s."""
    if rows is None and cols is None:
        return m
    if isinstance(m, Product):
        left = scaled(m.left, rows, None) if rows is not None else m.left
        right = scaled(m.right, None, cols) if cols is not None else m.right
        return product(left, right)
    if isinstance(m, Scaled):
        rows = _times(m.row_scale, rows)
        cols = _times(m.col_scale, cols)
        m = m.inner
    if _small(m.shape):
        out = owned(m)
        if rows is not None:
            out.mul_(rows.reshape(-1, 1) if rows.dim() else rows)
        if cols is not None:
            out.mul_(cols.reshape(1, -1) if cols.dim() else cols)
        return out
    return Scaled(m, rows, cols)


def _times(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else (a if b is None else a * b)


def matvec(m: Matrix, v: Tensor) -> Tensor:
    """``m @ v`` for a float64 vector ``v``, without forming ``m`` where it is an expression
    (``(W2 W1) b = W2 (W1 b)``)."""
    if isinstance(m, Product):
        return matvec(m.left, matvec(m.right, v))
    if isinstance(m, Sum):
        out = matvec(m.terms[0], v)
        for t in m.terms[1:]:
            out = out + matvec(t, v)
        return out
    if isinstance(m, Scaled):
        c = m.col_scale
        out = matvec(m.inner, v if c is None else v * c)
        return out if m.row_scale is None else out * m.row_scale
    return value(m) @ v


BLOCK_BYTES = 1 << 22  # float64 rows computed at once by write_into


def write_into(out: Tensor, m: Matrix) -> None:
    """``out.copy_(m)``, ``m`` computed in float64 a block of rows at a time and each block cast
    into ``out`` (a merged weight in the model's dtype): no float64 matrix of ``m``'s size."""
    if not isinstance(m, DeferredMatrix):
        out.copy_(m)
        return
    n, k = m.shape
    step = max(1, BLOCK_BYTES // (8 * max(1, k)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        out[start:stop].copy_(value(m.rows(start, stop)))
