"""Symbolic proofs of the closed forms in :mod:`repc.algebra`, with sympy.

**Reading a closed form off its float64 code.**  The closed forms proven here are
*multi-affine* in their operands: grouping the operands (one group per op, or per tensor),
every entry of the result is a polynomial of degree at most one in the entries of each group
-- weights only ever multiply weights of *other* ops (``W2 W1``, ``s W``, ``W_a + W_b``,
``W2 b1 + b2``).  Such a function is fixed by its values on one-hot operands: with ``F(T)``
the result when each group ``g`` in ``T`` holds the basis vector ``e_{i_g}`` and the other
groups are zero, the coefficient of ``prod_{g in S} v[g, i_g]`` is
``sum_{T subset of S} (-1)^{|S| - |T|} F(T)``.  :func:`lift` evaluates the closed form on all
those operands (exactly, in float64: the entries are sums of products of 0, 1 and fixed
constants such as 1/9), turns each coefficient into the nearest rational with a small
denominator (checking it is within 1e-12), and rebuilds the result's tensors as polynomials in
symbols standing for the operands' entries.  It then evaluates the closed form at a random
point and checks the polynomials agree there: a closed form that is not multi-affine in the
declared groups cannot pass that check, so the reading is sound.  The closed form must take
one code path for all those operands (a branch on a value, such as "is this scale zero",
makes :func:`lift` refuse with :class:`ProofError`).

**Proving.**  :func:`prove` evaluates the region as written and the merged op on a *symbolic
input*, each with reference semantics written here from the definitions (:func:`conv`,
:func:`linear`, :func:`avg_pool`, :func:`affine`; not from repc.algebra), and checks that the
difference is zero for every output element, and that the output shapes agree.  Inputs are
single samples (``[C, *spatial]`` for convs, ``[features]`` for linear maps): every op acts on
samples independently.  The polynomials are elements of sympy's sparse polynomial ring over
QQ (:mod:`sympy.polys.rings`), which are always in expanded canonical form, so ``diff == 0``
is exactly ``sympy.expand(diff) == 0``, only faster.  A proof holds for the operand shapes and
input sizes it was run on; the tests run each closed form on several geometries (groups and
channels > 1, strides, dilations, asymmetric padding, two input sizes).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, fields, is_dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from sympy import QQ
from sympy.polys.rings import PolyElement, ring

from ..ops import AffineOp, Conv, Elementwise, Linear

F64 = torch.float64


class ProofError(Exception):
    """The closed form cannot be read off symbolically (not multi-affine, or value-dependent)."""


# =============================================================================== symbols

class SymbolSpace:
    """Declares named symbolic tensors, then builds one polynomial ring over all of them.

        space = SymbolSpace()
        w = space.tensor("w", (4, 2, 3, 3))
        x = space.tensor("x", (4, 5, 6))
        space.build()
        w.values  # an object array of ring generators
    """

    def __init__(self):
        self.tensors: List["SymTensor"] = []
        self.ring = None

    def tensor(self, name: str, shape: Sequence[int]) -> "SymTensor":
        if self.ring is not None:
            raise ProofError("declare every symbol before build()")
        t = SymTensor(name, tuple(shape), self)
        self.tensors.append(t)
        return t

    def op(self, name: str, template: AffineOp) -> "SymOp":
        """Symbols for every tensor ``template`` has (weight/bias, or scale/shift)."""
        parts = {f: self.tensor(f"{name}_{f}", tuple(getattr(template, f).shape))
                 for f in _tensor_fields(template) if getattr(template, f) is not None}
        return SymOp(template, parts)

    def build(self):
        names = [f"{t.name}_{'_'.join(map(str, idx))}" if t.shape else t.name
                 for t in self.tensors for idx in np.ndindex(*t.shape)]
        if len(set(names)) != len(names):
            raise ProofError("symbol names collide")
        self.ring, *gens = ring(names, QQ) if names else (ring("_unused", QQ)[0],)
        k = 0
        for t in self.tensors:
            n = math.prod(t.shape)
            arr = np.empty(n, dtype=object)
            for i in range(n):
                arr[i] = gens[k + i]
            t.values = arr.reshape(t.shape)
            k += n
        return self.ring

    def zero(self):
        return self.ring.zero

    def constant(self, value) -> PolyElement:
        return self.ring(_rational(value))


@dataclass(eq=False)
class SymTensor:
    name: str
    shape: Tuple[int, ...]
    space: SymbolSpace
    values: Optional[np.ndarray] = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(eq=False)
class SymOp:
    """A canonical op whose tensors are symbolic: ``template`` gives its type and geometry."""

    template: AffineOp
    parts: Dict[str, SymTensor]

    def tensor(self, field_name: str) -> Optional[np.ndarray]:
        part = self.parts.get(field_name)
        return None if part is None else part.values

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts.values())


def _tensor_fields(op: AffineOp) -> Tuple[str, ...]:
    return ("scale", "shift") if isinstance(op, Elementwise) else ("weight", "bias")


def _rational(value) -> Fraction:
    """The nearest fraction with a denominator up to 10^6 when it is within 1e-12; else exact."""
    value = float(value)
    frac = Fraction(value).limit_denominator(10 ** 6)
    if abs(float(frac) - value) <= 1e-12 * max(1.0, abs(value)):
        return frac
    return Fraction(value)


def _qq(value):
    f = _rational(value)
    return QQ(f.numerator, f.denominator)


# =============================================================================== reference semantics

def _sum(terms, zero):
    acc = zero
    for t in terms:
        acc = acc + t
    return acc


def conv(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], stride: Sequence[int],
         padding: Sequence[Tuple[int, int]], dilation: Sequence[int], groups: int, zero) -> np.ndarray:
    """``y[o, j] = b[o] + sum_{i < C/g, t} W[o, i, t] x[g(o) C/g + i, s j - lo + d t]``, with
    ``g(o) = o // (O / groups)`` and ``x`` zero outside its extent."""
    channels, spatial = x.shape[0], x.shape[1:]
    out_channels, cin_g, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    if channels != cin_g * groups or out_channels % groups:
        raise ProofError(f"conv of {channels} channels with a {weight.shape} kernel in {groups} groups")
    sizes = [(n + lo + hi - d * (k - 1) - 1) // s + 1
             for n, (lo, hi), d, k, s in zip(spatial, padding, dilation, kernel, stride)]
    if any(n < 1 for n in sizes):
        raise ProofError("the input is smaller than the conv's window")
    out = np.empty((out_channels,) + tuple(sizes), dtype=object)
    per_group = out_channels // groups
    for o in range(out_channels):
        base = (o // per_group) * cin_g
        for j in itertools.product(*map(range, sizes)):
            terms = [] if bias is None else [bias[o]]
            for i in range(cin_g):
                for t in itertools.product(*map(range, kernel)):
                    pos = tuple(s * jj - lo + d * tt for s, jj, (lo, _), d, tt in zip(stride, j, padding, dilation, t))
                    if all(0 <= p < n for p, n in zip(pos, spatial)):
                        terms.append(weight[(o, i) + t] * x[(base + i,) + pos])
            out[(o,) + j] = _sum(terms, zero)
    return out


def avg_pool(x: np.ndarray, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
             divisor: Optional[int], zero) -> np.ndarray:
    """``y[c, j] = (1 / divisor) sum_t x[c, s j - p + t]`` with padded zeros counted; the divisor
    defaults to the window size."""
    spatial = x.shape[1:]
    sizes = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(spatial, padding, kernel, stride)]
    factor = QQ(1, divisor or math.prod(kernel))
    out = np.empty((x.shape[0],) + tuple(sizes), dtype=object)
    for c in range(x.shape[0]):
        for j in itertools.product(*map(range, sizes)):
            terms = []
            for t in itertools.product(*map(range, kernel)):
                pos = tuple(s * jj - p + tt for s, jj, p, tt in zip(stride, j, padding, t))
                if all(0 <= q < n for q, n in zip(pos, spatial)):
                    terms.append(x[(c,) + pos])
            out[(c,) + j] = _sum(terms, zero) * factor
    return out


def zero_pad(x: np.ndarray, padding: Sequence[Tuple[int, int]], zero) -> np.ndarray:
    out = np.full((x.shape[0],) + tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:], padding)), zero, dtype=object)
    out[(slice(None),) + tuple(slice(lo, lo + n) for n, (lo, _) in zip(x.shape[1:], padding))] = x
    return out


def linear(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], zero) -> np.ndarray:
    """``y[..., o] = b[o] + sum_i W[o, i] x[..., i]``."""
    out = np.empty(x.shape[:-1] + (weight.shape[0],), dtype=object)
    for idx in np.ndindex(*x.shape[:-1]):
        for o in range(weight.shape[0]):
            terms = ([] if bias is None else [bias[o]]) + [weight[o, i] * x[idx + (i,)] for i in range(weight.shape[1])]
            out[idx + (o,)] = _sum(terms, zero)
    return out


def affine(x: np.ndarray, scale: Optional[np.ndarray], shift: Optional[np.ndarray]) -> np.ndarray:
    """``x * scale + shift`` with numpy broadcasting (a missing scale is 1, a missing shift 0)."""
    y = x if scale is None else x * scale
    return y if shift is None else y + shift


def _sample_view(t: Optional[np.ndarray], ndim: int) -> Optional[np.ndarray]:
    """An Elementwise tensor (batch axis first) viewed on one sample of ``ndim`` axes."""
    if t is None:
        return None
    if t.ndim == ndim + 1:
        if t.shape[0] != 1:
            raise ProofError("an elementwise constant that varies along the batch axis")
        return t[0]
    return t


def apply(op: Union["SymOp", "LiftedOp", AffineOp], x: np.ndarray, space: SymbolSpace) -> np.ndarray:
    """``op(x)`` with the reference semantics; symbolic tensors from a :class:`SymOp` or a
    :class:`LiftedOp`, or exact constants from a float op."""
    if isinstance(op, (SymOp, LiftedOp)):
        template = op.template

        def get(name):
            return op.tensor(name)
    else:
        template = op

        def get(name):
            t = getattr(op, name)
            return None if t is None else constants(t)
    zero = space.zero()
    if isinstance(template, Conv):
        if template.padding_mode != "zeros" and any(p != (0, 0) for p in template.padding):
            raise ProofError("only zero padding has reference semantics here")
        return conv(x, get("weight"), get("bias"), template.stride, template.padding, template.dilation,
                    template.groups, zero)
    if isinstance(template, Linear):
        return linear(x, get("weight"), get("bias"), zero)
    return affine(x, _sample_view(get("scale"), x.ndim), _sample_view(get("shift"), x.ndim))


def constants(t: torch.Tensor) -> np.ndarray:
    """A float tensor as an object array of exact rationals (nearest small fraction)."""
    flat = [_qq(v) for v in t.detach().to(F64).reshape(-1).tolist()]
    arr = np.empty(len(flat), dtype=object)
    arr[:] = flat
    return arr.reshape(tuple(t.shape))


# =============================================================================== lifting a closed form

Operand = Union[SymOp, SymTensor]


def _concrete(operand: Operand, vector: torch.Tensor):
    """``operand`` with its entries (in declaration order) set to ``vector``."""
    if isinstance(operand, SymTensor):
        return vector.reshape(operand.shape).clone()
    changes, k = {}, 0
    for name, part in operand.parts.items():
        changes[name] = vector[k:k + part.size].reshape(part.shape).clone()
        k += part.size
    return _replace(operand.template, **changes)


def _replace(op: AffineOp, **changes):
    values = {f.name: getattr(op, f.name) for f in fields(op)}
    values.update(changes)
    return type(op)(**values)


def _flatten_result(result) -> Tuple[Any, List[Optional[torch.Tensor]]]:
    """(structure, tensors) of a closed form's result: an op, a tensor or a tuple of them."""
    if isinstance(result, torch.Tensor):
        return ("tensor", tuple(result.shape)), [result]
    if isinstance(result, (tuple, list)):
        parts = [_flatten_result(r) for r in result]
        return ("tuple", tuple(p[0] for p in parts)), [t for p in parts for t in p[1]]
    if is_dataclass(result):
        names = _tensor_fields(result)
        tensors = [getattr(result, n) for n in names]
        geometry = tuple((f.name, getattr(result, f.name)) for f in fields(result)
                         if f.name not in names)
        shapes = tuple(None if t is None else tuple(t.shape) for t in tensors)
        return (type(result).__name__, geometry, shapes), tensors
    raise ProofError(f"a closed form returned {type(result).__name__}")


@dataclass
class Lifted:
    """A closed form's result with polynomial tensors: ``op`` (a :class:`SymOp`-like view, for
    op results) or ``tensors`` (for tensor results), both over ``space.ring``."""

    structure: Any
    tensors: List[Optional[np.ndarray]]
    template: Any = None

    def as_op(self) -> "LiftedOp":
        if not is_dataclass(self.template):
            raise ProofError("the closed form did not return an op")
        return LiftedOp(self.template, dict(zip(_tensor_fields(self.template), self.tensors)))


@dataclass
class LiftedOp:
    """A merged op: the closed form's result (``template``: type and geometry) with polynomial
    tensors."""

    template: AffineOp
    values: Dict[str, Optional[np.ndarray]]

    def tensor(self, name):
        return self.values.get(name)


def lift(closed_form: Callable, operands: Sequence[Operand], space: SymbolSpace, seed: int = 0) -> Lifted:
    """The result of ``closed_form(*concrete operands)`` with each entry a polynomial in the
    operands' symbols (see the module docstring).  ``space`` must be built."""
    if space.ring is None:
        raise ProofError("build the symbol space before lifting")
    sizes = [op.size for op in operands]
    evaluations: Dict[Tuple[Optional[int], ...], List[Optional[torch.Tensor]]] = {}
    structure = None
    template = None

    def evaluate(choice):
        nonlocal structure, template
        args = []
        for operand, size, i in zip(operands, sizes, choice):
            v = torch.zeros(size, dtype=F64)
            if i is not None:
                v[i] = 1.0
            args.append(_concrete(operand, v))
        try:
            result = closed_form(*args)
        except Exception as why:
            raise ProofError(f"the closed form raised on a basis operand: {type(why).__name__}: {why}") from why
        struct, tensors = _flatten_result(result)
        if structure is None:
            structure, template = struct, result
        elif struct != structure:
            raise ProofError("the closed form's result changes structure with the operands' values "
                             "(a value-dependent branch): prove the branch's own closed form instead")
        return [None if t is None else t.detach().to(F64).reshape(-1) for t in tensors]

    for choice in itertools.product(*[[None] + list(range(n)) for n in sizes]):
        evaluations[choice] = evaluate(choice)

    gens = [op_symbols(operand) for operand in operands]
    ring_ = space.ring
    n_out = len(evaluations[tuple([None] * len(operands))])
    polys: List[Optional[List[PolyElement]]] = []
    for k in range(n_out):
        base = evaluations[tuple([None] * len(operands))][k]
        if base is None:
            polys.append(None)
            continue
        out = [ring_.zero] * base.numel()
        for choice, values in evaluations.items():
            support = [g for g, i in enumerate(choice) if i is not None]
            coef = torch.zeros_like(base)
            for r in range(len(support) + 1):
                for subset in itertools.combinations(support, r):
                    sub = tuple(choice[g] if g in subset else None for g in range(len(choice)))
                    sign = (-1) ** (len(support) - r)
                    coef = coef + sign * evaluations[sub][k]
            nonzero = torch.nonzero(coef.abs() > 1e-13).reshape(-1).tolist()
            if not nonzero:
                continue
            monomial = ring_.one
            for g in support:
                monomial = monomial * gens[g][choice[g]]
            for e in nonzero:
                out[e] = out[e] + monomial * _qq(float(coef[e]))
        polys.append(out)

    lifted_tensors = []
    for t, p in zip(_flatten_result(template)[1], polys):
        if p is None:
            lifted_tensors.append(None)
            continue
        arr = np.empty(len(p), dtype=object)
        arr[:] = p
        lifted_tensors.append(arr.reshape(tuple(t.shape)))
    lifted = Lifted(structure, lifted_tensors, template)
    _check_at_random_point(closed_form, operands, sizes, lifted, space, seed)
    return lifted


def op_symbols(operand: Operand) -> List[PolyElement]:
    """The generators of ``operand``'s entries in the order :func:`lift` sets them."""
    if isinstance(operand, SymTensor):
        return list(operand.values.reshape(-1))
    return [g for part in operand.parts.values() for g in part.values.reshape(-1)]


def _check_at_random_point(closed_form, operands, sizes, lifted: Lifted, space: SymbolSpace, seed: int) -> None:
    """The polynomials must equal the closed form at a random point (multi-affinity check)."""
    rng = random.Random(seed)
    point = {}
    args = []
    for operand, size in zip(operands, sizes):
        v = torch.tensor([rng.uniform(0.5, 2.0) * rng.choice((-1, 1)) for _ in range(size)], dtype=F64)
        args.append(_concrete(operand, v))
        for g, value in zip(op_symbols(operand), v.tolist()):
            point[g] = value
    _, tensors = _flatten_result(closed_form(*args))
    gens = space.ring.gens
    for want, got in zip(tensors, lifted.tensors):
        if want is None or got is None:
            continue
        for w, poly in zip(want.reshape(-1).tolist(), got.reshape(-1)):
            value = 0.0
            for monom, coef in poly.terms():
                term = float(coef)
                for i, e in enumerate(monom):
                    if e:
                        term *= point[gens[i]] ** e
                value += term
            if abs(value - w) > 1e-9 * max(1.0, abs(w)):
                raise ProofError("the closed form is not multi-affine in the declared operand groups: "
                                 f"its reading is off by {abs(value - w):.3g} at a random point")


# =============================================================================== proving

@dataclass
class ProofResult:
    """``ok`` when the merged side equals the original side on every output element."""

    name: str
    ok: bool
    elements: int
    shape: Tuple[int, ...] = ()
    residual: Optional[str] = None  # the first non-zero difference, or why the shapes differ

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"{self.name}: proven on {self.elements} output elements {self.shape}"
        return f"{self.name}: NOT proven: {self.residual}"


def prove(name: str, original: np.ndarray, merged: np.ndarray) -> ProofResult:
    """Compare two object arrays of polynomials element by element (expanded difference 0)."""
    if original.shape != merged.shape:
        return ProofResult(name, False, 0, tuple(original.shape),
                           f"output shapes differ: {tuple(merged.shape)} merged vs {tuple(original.shape)} as written")
    for idx in np.ndindex(*original.shape):
        diff = merged[idx] - original[idx]
        if diff != 0:
            text = str(diff.as_expr()) if isinstance(diff, PolyElement) else str(diff)
            return ProofResult(name, False, original.size, tuple(original.shape),
                               f"at {idx}: merged - original = {text[:300]}")
    return ProofResult(name, True, original.size, tuple(original.shape))


# =============================================================================== catalogue
#
# Each prove_* builds symbols, lifts one closed form, and compares the merged op with the
# region as written, on a symbolic input.  Templates give the geometry; their tensor values
# are ignored (only shapes and which tensors are present matter).

def conv_template(cin: int, cout: int, kernel: Sequence[int], stride=None, padding=None, dilation=None,
                  groups: int = 1, bias: bool = True) -> Conv:
    nd = len(kernel)
    stride = tuple(stride or (1,) * nd)
    dilation = tuple(dilation or (1,) * nd)
    padding = tuple(padding or ((0, 0),) * nd)
    return Conv(torch.zeros((cout, cin // groups) + tuple(kernel), dtype=F64),
                torch.zeros(cout, dtype=F64) if bias else None, stride, padding, dilation, groups)


def linear_template(fin: int, fout: int, bias: bool = True) -> Linear:
    return Linear(torch.zeros(fout, fin, dtype=F64), torch.zeros(fout, dtype=F64) if bias else None)


def channel_affine_template(channels: int, nd: int, scale: bool = True, shift: bool = True) -> Elementwise:
    """A per-channel ``x * s + t`` on ``(N, C, *spatial)`` (``nd`` spatial axes; 0: features last)."""
    if nd == 0:
        view, shape = (1, channels), (1, channels)
    else:
        view, shape = (1, channels) + (1,) * nd, (1, channels) + (1,) * nd
    return Elementwise(torch.zeros(view, dtype=F64) if scale else None,
                       torch.zeros(view, dtype=F64) if shift else None, shape)


def _input(space: SymbolSpace, shape) -> SymTensor:
    return space.tensor("x", shape)


def prove_composition(name: str, closed_form: Callable, ops: Sequence[AffineOp], input_shape: Sequence[int]) -> ProofResult:
    """``closed_form(op_1, ..., op_n)`` against ``op_n(...op_1(x))``."""
    space = SymbolSpace()
    sym = [space.op(f"a{i}", op) for i, op in enumerate(ops)]
    x = _input(space, input_shape)
    space.build()
    merged = lift(closed_form, sym, space).as_op()
    y = x.values
    for op in sym:
        y = apply(op, y, space)
    return prove(name, y, apply_lifted(merged, x.values, space))


def prove_sum(name: str, closed_form: Callable, ops: Sequence[AffineOp], input_shape: Sequence[int],
              weights: Optional[Sequence[float]] = None) -> ProofResult:
    """``closed_form(op_1, ..., op_n)`` against ``sum_i w_i op_i(x)``."""
    space = SymbolSpace()
    sym = [space.op(f"a{i}", op) for i, op in enumerate(ops)]
    x = _input(space, input_shape)
    space.build()
    merged = lift(closed_form, sym, space).as_op()
    weights = weights or [1] * len(ops)
    original = None
    for w, op in zip(weights, sym):
        term = apply(op, x.values, space) * _qq(w)
        original = term if original is None else original + term
    return prove(name, original, apply_lifted(merged, x.values, space))


def prove_concat(name: str, closed_form: Callable, ops: Sequence[AffineOp], input_shape: Sequence[int],
                 axis: int = 0) -> ProofResult:
    """``closed_form(op_1, ..., op_n)`` against ``cat([op_i(x)], axis)`` (sample axes)."""
    space = SymbolSpace()
    sym = [space.op(f"a{i}", op) for i, op in enumerate(ops)]
    x = _input(space, input_shape)
    space.build()
    merged = lift(closed_form, sym, space).as_op()
    original = np.concatenate([apply(op, x.values, space) for op in sym], axis=axis)
    return prove(name, original, apply_lifted(merged, x.values, space))


def prove_rewrite(name: str, closed_form: Callable, op: AffineOp, original: Callable[[np.ndarray, SymOp, SymbolSpace], np.ndarray],
                  input_shape: Sequence[int]) -> ProofResult:
    """``closed_form(op)`` against ``original(x, op)`` (e.g. a regrouped or sliced op)."""
    space = SymbolSpace()
    sym = space.op("a", op)
    x = _input(space, input_shape)
    space.build()
    merged = lift(closed_form, [sym], space).as_op()
    return prove(name, original(x.values, sym, space), apply_lifted(merged, x.values, space))


def prove_constant_op(name: str, op: AffineOp, original: Callable[[np.ndarray, SymbolSpace], np.ndarray],
                      input_shape: Sequence[int]) -> ProofResult:
    """A closed form without operands (avg-pool or padding as a conv) against its definition."""
    space = SymbolSpace()
    x = _input(space, input_shape)
    space.build()
    return prove(name, original(x.values, space), apply(op, x.values, space))


def apply_lifted(op: LiftedOp, x: np.ndarray, space: SymbolSpace) -> np.ndarray:
    """The merged op read off by :func:`lift`, applied with the reference semantics."""
    return apply(op, x, space)


def prove_batchnorm_affine(channels: int = 3, eps: float = 0.25) -> ProofResult:
    """``x * scale + shift == (x - mean) * gamma / sqrt(var + eps) + beta``, symbolic in mean,
    gamma, beta and x; ``var`` takes values where ``1 / sqrt(var + eps)`` is exact in binary
    (var + eps = 1/4, 1, 4, 16), so eps must really be added for the proof to go through."""
    from .. import algebra

    roots = [2, 1, Fraction(1, 2), Fraction(1, 4)]
    space = SymbolSpace()
    mean, gamma, beta = (space.tensor(n, (channels,)) for n in ("mean", "gamma", "beta"))
    x = space.tensor("x", (channels,))
    space.build()
    var = torch.tensor([float(1 / Fraction(roots[c % 4]) ** 2) - eps for c in range(channels)], dtype=F64)
    scale, shift = lift(lambda m, g, b: algebra.batchnorm_affine(m, var, eps, g, b),
                        [mean, gamma, beta], space).tensors
    r = np.array([QQ(Fraction(roots[c % 4]).numerator, Fraction(roots[c % 4]).denominator)
                  for c in range(channels)], dtype=object)
    original = (x.values - mean.values) * gamma.values * r + beta.values
    return prove("batchnorm_affine", original, x.values * scale + shift)


def prove_scale_conv_outputs(conv: Conv, input_shape: Sequence[int]) -> ProofResult:
    """``conv(x) * s + t`` (a BN or per-channel scale after the conv) folded into the conv."""
    from .. import algebra

    space = SymbolSpace()
    c = space.op("w", conv)
    s = space.tensor("s", (conv.out_channels,))
    t = space.tensor("t", (conv.out_channels,))
    x = _input(space, input_shape)
    space.build()
    merged = lift(algebra.scale_conv_outputs, [c, s, t], space).as_op()
    view = (-1,) + (1,) * (len(input_shape) - 1)
    original = apply(c, x.values, space) * s.values.reshape(view) + t.values.reshape(view)
    return prove("scale_conv_outputs", original, apply_lifted(merged, x.values, space))


def prove_gated_linear_experts(gates: Sequence[float] = (0.5, 0.25, 0.25), fin: int = 3, fout: int = 2) -> ProofResult:
    """A gated sum of linear experts ``sum_i g_i E_i(x)`` as one linear map: the closed form the
    matcher uses (``add`` of ``scale_op``) against the sum as written."""
    from .. import algebra

    def merged(*experts):
        out = algebra.scale_op(experts[0], gates[0])
        for g, e in zip(gates[1:], experts[1:]):
            out = algebra.add(out, algebra.scale_op(e, g))
        return out

    return prove_sum("gated_linear_experts", merged, [linear_template(fin, fout)] * len(gates), (fin,), gates)


def prove_expert_weights_averaging(weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3), fin: int = 3,
                                   fout: int = 2) -> Optional[ProofResult]:
    """Experts Weights Averaging on *linear* experts is exact: with ``sum_i w_i = 1``, the expert
    whose parameters are ``sum_i w_i theta_i`` (``repc.passes.average_experts._mean``) computes
    ``sum_i w_i E_i(x)``.  None when that pass does not exist."""
    try:
        from ..passes.average_experts import _mean
    except ImportError:
        return None

    def averaged(*experts):
        return Linear(_mean([e.weight for e in experts], list(weights)), _mean([e.bias for e in experts], list(weights)))

    return prove_sum("expert_weights_averaging", averaged, [linear_template(fin, fout)] * len(weights), (fin,), weights)


# ------------------------------------------------------------------------------- the catalogue

def _catalogue() -> Dict[str, Callable[[], Optional[ProofResult]]]:
    from .. import algebra

    c = conv_template
    pad1 = ((1, 1), (1, 1))

    def add_with_channel_affine(conv_, ew):
        return algebra.add_convs(conv_, algebra.elementwise_as_conv(ew, conv_.nd))

    def linear_then_affine(lin, ew):
        return algebra.scale_linear_outputs(lin, ew)

    def affine_then_linear(ew, lin):
        return algebra.scale_linear_inputs(ew, lin)

    def sliced_outputs(x, op, space, start=1, stop=3):
        return apply(op, x, space)[start:stop]

    def regrouped_original(x, op, space):
        return apply(op, x, space)

    proofs: Dict[str, Callable[[], Optional[ProofResult]]] = {
        # BN folding: the BN as an affine map, then into the conv after / before it
        "batchnorm_affine": lambda: prove_batchnorm_affine(3),
        "bn_after_conv (scale_conv_outputs, groups 2, padded)":
            lambda: prove_scale_conv_outputs(c(4, 4, (3, 3), padding=pad1, groups=2), (4, 4, 5)),
        "bn_after_conv (1x3, stride 2, no bias)":
            lambda: prove_scale_conv_outputs(c(2, 4, (1, 3), stride=(2, 2), padding=((0, 0), (1, 1)), bias=False), (2, 5, 5)),
        "conv then BN through compose (its zero-scale branch included)":
            lambda: prove_composition("compose_conv_bn", algebra.compose,
                                      [c(4, 4, (3, 3), padding=pad1, groups=2, bias=False), channel_affine_template(4, 2)],
                                      (4, 3, 4)),
        "bn_before_unpadded_conv (compose, groups 2)":
            lambda: prove_composition("bn_before_conv", algebra.compose,
                                      [channel_affine_template(4, 2), c(4, 2, (3, 3), groups=2)], (4, 4, 5)),
        "scale_before_padded_conv (compose, no shift)":
            lambda: prove_composition("scale_before_padded_conv", algebra.compose,
                                      [channel_affine_template(4, 2, shift=False), c(4, 2, (3, 3), padding=pad1, groups=2)],
                                      (4, 4, 5)),
        # kernel padding and branch sums
        "add_convs 3x3 (groups 2) + 1x1 (depthwise)":
            lambda: prove_sum("add_convs", algebra.add_convs, [c(4, 4, (3, 3), padding=pad1, groups=2),
                                                               c(4, 4, (1, 1), groups=4)], (4, 4, 5)),
        "add_convs 3x3 + 1x3 (ACNet)":
            lambda: prove_sum("add_convs", algebra.add_convs, [c(2, 2, (3, 3), padding=pad1),
                                                               c(2, 2, (1, 3), padding=((0, 0), (1, 1)))], (2, 4, 5)),
        "add_convs 1x3 + 3x1 (both shifted)":
            lambda: prove_sum("add_convs", algebra.add_convs, [c(2, 2, (1, 3), padding=((0, 0), (1, 1))),
                                                               c(2, 2, (3, 1), padding=((1, 1), (0, 0)))], (2, 4, 5)),
        "add_convs 2x2 asymmetric pad + 3x3":
            lambda: prove_sum("add_convs", algebra.add_convs, [c(2, 2, (2, 2), padding=((0, 1), (0, 1))),
                                                               c(2, 2, (3, 3), padding=pad1)], (2, 4, 5)),
        "add_convs dilated 3x3 + 1x1":
            lambda: prove_sum("add_convs", algebra.add_convs, [c(2, 2, (3, 3), padding=((2, 2), (2, 2)), dilation=(2, 2)),
                                                               c(2, 2, (1, 1))], (2, 5, 5)),
        "add_convs stride 2, odd size":
            lambda: prove_sum("add_convs", algebra.add_convs, [c(2, 4, (3, 3), stride=(2, 2), padding=pad1, groups=2),
                                                               c(2, 4, (1, 1), stride=(2, 2), groups=2)], (2, 5, 5)),
        "add_convs stride 2, even size":
            lambda: prove_sum("add_convs", algebra.add_convs, [c(2, 4, (3, 3), stride=(2, 2), padding=pad1, groups=2),
                                                               c(2, 4, (1, 1), stride=(2, 2), groups=2)], (2, 6, 4)),
        # identity kernels per group, regrouping, channel maps as convs
        "add identity to grouped conv (RepVGG skip)":
            lambda: prove_sum("conv_plus_identity", algebra.add,
                              [c(4, 4, (3, 3), padding=pad1, groups=2), Elementwise(None, None, (1, 4, 4, 5))], (4, 4, 5)),
        "add BN identity branch (elementwise_as_conv)":
            lambda: prove_sum("conv_plus_bn_identity", add_with_channel_affine,
                              [c(4, 4, (3, 3), padding=pad1, groups=2), channel_affine_template(4, 2)], (4, 4, 5)),
        "elementwise_as_conv":
            lambda: prove_rewrite("elementwise_as_conv", lambda ew: algebra.elementwise_as_conv(ew, 2),
                                  channel_affine_template(3, 2), lambda x, op, space: apply(op, x, space), (3, 3, 4)),
        "regroup 4 -> 2 groups":
            lambda: prove_rewrite("regroup", lambda op: op.replace(weight=algebra.regroup(op.weight, 4, 2), groups=2),
                                  c(4, 8, (1, 3), padding=((0, 0), (1, 1)), groups=4), regrouped_original, (4, 3, 4)),
        "regroup 2 -> 1 group":
            lambda: prove_rewrite("regroup", lambda op: op.replace(weight=algebra.regroup(op.weight, 2, 1), groups=1),
                                  c(4, 2, (3, 3), padding=pad1, groups=2), regrouped_original, (4, 3, 4)),
        # 1x1 -> kxk and general composition
        "compose_conv unpadded second: 3x3/2 padded grouped then 2x2 grouped":
            lambda: prove_composition("compose_conv", algebra.compose_conv,
                                      [c(2, 4, (3, 3), stride=(2, 2), padding=pad1, groups=2), c(4, 2, (2, 2), groups=2)],
                                      (2, 7, 8)),
        "compose_conv unpadded second: dilated then 2x2/2":
            lambda: prove_composition("compose_conv", algebra.compose_conv,
                                      [c(2, 2, (3, 3), padding=((2, 2), (2, 2)), dilation=(2, 2)),
                                       c(2, 2, (2, 2), stride=(2, 2), bias=False)], (2, 5, 6)),
        "compose_conv 1x1 (bias) then unpadded 3x3":
            lambda: prove_composition("compose_conv", algebra.compose_conv,
                                      [c(4, 4, (1, 1), groups=2), c(4, 2, (3, 3), groups=2)], (4, 4, 5)),
        "compose_conv 1x1 (no bias) then padded 3x3":
            lambda: prove_composition("compose_conv", algebra.compose_conv,
                                      [c(4, 4, (1, 1), groups=2, bias=False), c(4, 2, (3, 3), padding=pad1, groups=2)],
                                      (4, 4, 5)),
        "compose_conv 1x3/(1,2) (no bias) then padded 3x1/(2,1), depthwise (RepNeXt's separable pair)":
            lambda: prove_composition("compose_conv", algebra.compose_conv,
                                      [c(2, 2, (1, 3), stride=(1, 2), padding=((0, 0), (1, 1)), groups=2, bias=False),
                                       c(2, 2, (3, 1), stride=(2, 1), padding=((1, 1), (0, 0)), groups=2)], (2, 5, 6)),
        "compose_conv 1-d: k3/2 then k2 dilated":
            lambda: prove_composition("compose_conv", algebra.compose_conv,
                                      [c(2, 2, (3,), stride=(2,), padding=((1, 1),)), c(2, 2, (2,), dilation=(2,))], (2, 11)),
        # pooling and padding as convs
        "avg_pool_as_conv 3x3/1 pad 1":
            lambda: prove_constant_op("avg_pool_as_conv", algebra.avg_pool_as_conv(3, (3, 3), (1, 1), (1, 1), None),
                                      lambda x, space: avg_pool(x, (3, 3), (1, 1), (1, 1), None, space.zero()), (3, 4, 5)),
        "avg_pool_as_conv 2x3/2 no pad":
            lambda: prove_constant_op("avg_pool_as_conv", algebra.avg_pool_as_conv(2, (2, 3), (2, 2), (0, 0), None),
                                      lambda x, space: avg_pool(x, (2, 3), (2, 2), (0, 0), None, space.zero()), (2, 5, 6)),
        "avg_pool_as_conv 3x3/2 pad 1 divisor 4":
            lambda: prove_constant_op("avg_pool_as_conv", algebra.avg_pool_as_conv(2, (3, 3), (2, 2), (1, 1), 4),
                                      lambda x, space: avg_pool(x, (3, 3), (2, 2), (1, 1), 4, space.zero()), (2, 5, 4)),
        "zero_pad_as_conv asymmetric":
            lambda: prove_constant_op("zero_pad_as_conv", algebra.zero_pad_as_conv(2, ((0, 1), (2, 0))),
                                      lambda x, space: zero_pad(x, ((0, 1), (2, 0)), space.zero()), (2, 3, 3)),
        # concatenation and slicing
        "concat convs: 3x3 (groups 2), 1x1, identity":
            lambda: prove_concat("concat", lambda *ops: algebra.concat(ops, 1, 4),
                                 [c(4, 2, (3, 3), padding=pad1, groups=2), c(4, 2, (1, 1)),
                                  Elementwise(None, None, (1, 4, 3, 4))], (4, 3, 4)),
        "concat linears and a feature affine":
            lambda: prove_concat("concat", lambda *ops: algebra.concat(ops, 1, 2),
                                 [linear_template(3, 2), linear_template(3, 1, bias=False),
                                  channel_affine_template(3, 0)], (3,)),
        "select_outputs of a grouped conv":
            lambda: prove_rewrite("select_outputs", lambda op: algebra.select_outputs(op, 1, 3),
                                  c(4, 4, (3, 3), padding=pad1, groups=2), sliced_outputs, (4, 3, 4)),
        "select_inputs of a grouped conv (pieces sum to the conv)":
            lambda: prove_sum_of_input_pieces(c(4, 2, (3, 3), padding=pad1, groups=2), 1, (4, 3, 4)),
        "scale_op (x0.5) of a conv":
            lambda: prove_rewrite("scale_op", lambda op: algebra.scale_op(op, 0.5), c(2, 2, (3, 3), padding=pad1),
                                  lambda x, op, space: apply(op, x, space) * QQ(1, 2), (2, 3, 4)),
        # linear family
        "compose_linear":
            lambda: prove_composition("compose_linear", algebra.compose_linear,
                                      [linear_template(3, 4), linear_template(4, 2)], (3,)),
        "linear then BN1d (scale_linear_outputs)":
            lambda: prove_composition("linear_then_bn", linear_then_affine,
                                      [linear_template(3, 4), channel_affine_template(4, 0)], (3,)),
        "LayerNorm affine (gamma, beta) into the next linear (scale_linear_inputs)":
            lambda: prove_composition("ln_affine_into_linear", affine_then_linear,
                                      [channel_affine_template(4, 0), linear_template(4, 2)], (4,)),
        "compose_elementwise":
            lambda: prove_composition("compose_elementwise", algebra.compose_elementwise,
                                      [channel_affine_template(3, 1), channel_affine_template(3, 1)], (3, 2)),
        "add_elementwise":
            lambda: prove_sum("add_elementwise", algebra.add_elementwise,
                              [channel_affine_template(3, 1), channel_affine_template(3, 1)], (3, 2)),
        "LoRA: W + B A":
            lambda: prove_lora(),
        "gated sum of linear experts": lambda: prove_gated_linear_experts(),
        "Experts Weights Averaging of linear experts": lambda: prove_expert_weights_averaging(),
    }
    return proofs


def prove_sum_of_input_pieces(conv_: Conv, split: int, input_shape: Sequence[int]) -> ProofResult:
    """``select_inputs(op, 0, k)(x[:k]) + select_inputs(op, k, C)(x[k:])`` minus the second bias
    equals ``op(x)``: the pieces of a conv over an input split (bias kept on each piece)."""
    from .. import algebra

    channels = input_shape[0]
    space = SymbolSpace()
    sym = space.op("a", conv_)
    x = _input(space, input_shape)
    space.build()
    first = lift(lambda op: algebra.select_inputs(op, 0, split), [sym], space).as_op()
    second = lift(lambda op: algebra.select_inputs(op, split, channels).replace(bias=None), [sym], space).as_op()
    merged = apply_lifted(first, x.values[:split], space) + apply_lifted(second, x.values[split:], space)
    return prove("select_inputs", apply(sym, x.values, space), merged)


def prove_lora(fin: int = 3, fout: int = 3, rank: int = 2) -> ProofResult:
    """LoRA: ``W x + b + B (A x)`` as one linear map ``add(W, compose_linear(A, B))``."""
    from .. import algebra

    space = SymbolSpace()
    w = space.op("w", linear_template(fin, fout))
    a = space.op("a", linear_template(fin, rank, bias=False))
    b = space.op("b", linear_template(rank, fout, bias=False))
    x = _input(space, (fin,))
    space.build()
    merged = lift(lambda w_, a_, b_: algebra.add(w_, algebra.compose_linear(a_, b_)), [w, a, b], space).as_op()
    original = apply(w, x.values, space) + apply(b, apply(a, x.values, space), space)
    return prove("lora", original, apply_lifted(merged, x.values, space))


PROOFS = _catalogue()


def prove_all(names: Optional[Sequence[str]] = None) -> List[ProofResult]:
    """Run the catalogue (or the named entries); entries whose closed form does not exist are left out."""
    out = []
    for name in names or PROOFS:
        result = PROOFS[name]()
        if result is not None:
            result.name = name
            out.append(result)
    return out


if __name__ == "__main__":  # python -m repc.verify.proofs
    import time

    for name in PROOFS:
        start = time.perf_counter()
        result = PROOFS[name]()
        if result is None:
            print(f"{name}: closed form not present")
            continue
        result.name = name
        print(f"{'OK ' if result else 'FAIL'} {result}  [{time.perf_counter() - start:.2f}s]")
