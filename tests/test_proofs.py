"""Symbolic proofs of the closed forms (repc.verify.proofs), and checks that the proofs can fail."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sympy import QQ

from repc import algebra
from repc.verify import proofs
from repc.verify.proofs import (PROOFS, ProofError, SymbolSpace, apply, constants, conv_template, lift,
                                prove_composition, prove_sum)


@pytest.mark.parametrize("name", list(PROOFS))
def test_closed_form_is_proven(name):
    result = PROOFS[name]()
    assert result is not None, f"{name}: the closed form is missing"
    assert result.ok, str(result)
    assert result.elements > 0


def _as_numbers(arr):
    return np.vectorize(lambda v: float(QQ.to_sympy(v)) if not isinstance(v, (int, float)) else float(v),
                        otypes=[float])(arr)


@pytest.mark.parametrize("stride,padding,dilation,groups,size", [
    ((1, 1), ((1, 1), (1, 1)), (1, 1), 1, (5, 6)),
    ((2, 1), ((0, 1), (2, 0)), (1, 2), 2, (6, 7)),
    ((2, 2), ((1, 1), (0, 0)), (2, 1), 4, (7, 5)),
])
def test_reference_conv_matches_torch(stride, padding, dilation, groups, size):
    """The proofs' conv is written from the definition; it must agree with torch's."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (4,) + size, generator=gen).double()
    w = torch.randint(-3, 4, (4, 4 // groups, 3, 2), generator=gen).double()
    b = torch.randint(-3, 4, (4,), generator=gen).double()
    want = F.conv2d(F.pad(x[None], [p for lo_hi in reversed(padding) for p in lo_hi]), w, b, stride,
                    dilation=dilation, groups=groups)[0]
    got = proofs.conv(constants(x), constants(w), constants(b), stride, padding, dilation, groups, QQ(0))
    assert np.array_equal(_as_numbers(got), want.numpy())


def test_reference_pool_and_linear_match_torch():
    x = torch.randint(-4, 5, (2, 5, 6)).double()
    want = F.avg_pool2d(x[None], (3, 2), (2, 1), (1, 1), count_include_pad=True)[0]
    got = proofs.avg_pool(constants(x), (3, 2), (2, 1), (1, 1), None, QQ(0))
    assert np.allclose(_as_numbers(got), want.numpy(), rtol=0, atol=1e-12)
    w, b, v = torch.randint(-3, 4, (3, 4)).double(), torch.randint(-3, 4, (3,)).double(), torch.randint(-3, 4, (4,)).double()
    got = proofs.linear(constants(v), constants(w), constants(b), QQ(0))
    assert np.array_equal(_as_numbers(got), F.linear(v, w, b).numpy())


def test_misplaced_kernel_is_not_proven():
    """A wrong closed form (the 1x1 branch in the corner of the 3x3 kernel) fails its proof."""

    def misplaced(a, b):
        merged = algebra.add_convs(a, b)
        w = a.weight.clone()
        w[..., :1, :1] += b.weight
        return merged.replace(weight=w)

    ops = [conv_template(2, 2, (3, 3), padding=((1, 1), (1, 1))), conv_template(2, 2, (1, 1))]
    assert prove_sum("add_convs", algebra.add_convs, ops, (2, 3, 4)).ok
    result = prove_sum("misplaced", misplaced, ops, (2, 3, 4))
    assert not result.ok and "merged - original" in result.residual
    assert "NOT proven" in str(result)


def test_biased_pointwise_before_padded_conv_is_wrong_only_at_the_border():
    """Why compose_conv refuses a biased 1x1 before a padded kxk: the naive closed form (bias
    carried through every tap) is proven wrong on the border and right in the interior."""
    first = conv_template(2, 2, (1, 1), bias=True)
    second = conv_template(2, 2, (3, 3), padding=((1, 1), (1, 1)), bias=False)

    def naive(f, s):
        merged = algebra.compose_conv(f.replace(bias=None), s)
        carried = torch.einsum("omhw,m->o", s.weight, f.bias)
        return merged.replace(bias=carried)

    with pytest.raises(ProofError, match="border"):
        prove_composition("compose_conv", algebra.compose_conv, [first, second], (2, 4, 5))
    space = SymbolSpace()
    sym = [space.op("f", first), space.op("s", second)]
    x = space.tensor("x", (2, 4, 5))
    space.build()
    merged = lift(naive, sym, space).as_op()
    original = apply(sym[1], apply(sym[0], x.values, space), space)
    got = proofs.apply_lifted(merged, x.values, space)
    wrong = {idx for idx in np.ndindex(*original.shape) if got[idx] - original[idx] != 0}
    border = {idx for idx in np.ndindex(*original.shape) if idx[1] in (0, 3) or idx[2] in (0, 4)}
    assert wrong == border


def test_value_dependent_closed_form_is_refused():
    """``compact_groups`` picks the group count from which kernel blocks are zero: one-hot
    operands change the result's structure, so the reading is refused rather than proven wrong
    or right by accident."""
    space = SymbolSpace()
    sym = space.op("a", conv_template(4, 4, (1, 1)))
    space.build()
    with pytest.raises(ProofError, match="value-dependent"):
        lift(algebra.compact_groups, [sym], space)


def test_non_multiaffine_closed_form_is_refused():
    def squared(op):
        return op.replace(weight=op.weight * op.weight)

    space = SymbolSpace()
    sym = space.op("a", conv_template(1, 1, (1, 2), bias=False))
    space.build()
    with pytest.raises(ProofError, match="not multi-affine"):
        lift(squared, [sym], space)


def test_shapes_that_differ_are_reported():
    space = SymbolSpace()
    x = space.tensor("x", (2, 3))
    space.build()
    result = proofs.prove("shape", x.values, x.values[:, :2])
    assert not result.ok and "shapes differ" in result.residual


def test_symbols_must_be_declared_before_the_ring_is_built():
    space = SymbolSpace()
    space.tensor("x", (2,))
    space.build()
    with pytest.raises(ProofError, match="before build"):
        space.tensor("y", (2,))
