"""Merged linear weights as expressions (:mod:`repc.deferred`): each equals the float64 result it
stands for, sliced, applied to a vector or written a block of rows at a time, and a LoRA merge
computes one full-size tensor."""

from __future__ import annotations

import pytest
import torch

from repc import deferred
from repc.deferred import Product, Scaled, Sum, matvec, product, scaled, total, write_into

F64 = torch.float64


@pytest.fixture
def always_deferred(monkeypatch):
    monkeypatch.setattr(deferred, "EAGER_NUMEL", 0)


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _lora(dtype=torch.float32):
    """``W + s (B A)`` built as the algebra builds it, and the float64 value it stands for."""
    w, b, a = _randn(12, 10, dtype=dtype, seed=1), _randn(12, 3, dtype=dtype, seed=2), _randn(3, 10, dtype=dtype, seed=3)
    s = torch.tensor(0.7, dtype=F64)
    merged = total([w, scaled(product(b, a), rows=s)])
    return merged, w.double() + 0.7 * (b.double() @ a.double())


def test_a_lora_merge_is_one_sum_whose_scaling_went_into_the_small_factor(always_deferred):
    merged, want = _lora()
    assert isinstance(merged, Sum) and merged.shape == (12, 10)
    (base, low_rank) = merged.terms
    assert isinstance(low_rank, Product) and low_rank.left.shape == (12, 3)  # (s B) A: the scaling on B
    got = merged.compute()
    assert got.dtype == F64 and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert merged.compute() is not got  # each read is a tensor of its own


def test_rows_columns_and_vectors_of_an_expression(always_deferred):
    merged, want = _lora(torch.bfloat16)
    assert torch.allclose(merged[3:7].compute(), want[3:7], atol=1e-12)
    assert torch.allclose(merged[:, 2:9].compute(), want[:, 2:9], atol=1e-12)
    cols = scaled(merged, cols=torch.linspace(0.5, 2, 10, dtype=F64))
    assert isinstance(cols, Scaled)
    assert torch.allclose(cols[1:4].compute(), (want * torch.linspace(0.5, 2, 10, dtype=F64))[1:4], atol=1e-12)
    v = torch.randn(10, dtype=F64)
    assert torch.allclose(matvec(merged, v), want @ v, atol=1e-12)
    assert torch.allclose(matvec(cols, v), (want * torch.linspace(0.5, 2, 10, dtype=F64)) @ v, atol=1e-12)


def test_written_into_the_model_dtype_a_block_of_rows_at_a_time(always_deferred, monkeypatch):
    monkeypatch.setattr(deferred, "BLOCK_BYTES", 8 * 10 * 5)  # 5 rows a block: 3 blocks, the last short
    merged, want = _lora()
    out = torch.empty(12, 10, dtype=torch.float16)
    write_into(out, merged)
    assert torch.equal(out, want.to(torch.float16))  # rounded once, from float64


def test_small_results_are_tensors():
    merged, want = _lora()  # (12 x 10: below the threshold)
    assert isinstance(merged, torch.Tensor) and torch.allclose(merged, want, atol=1e-12)
