"""Transformer networks that repc compiled with a rollback, shrunk to plain modules (issue 13,
and the transformer fuzzer, tests/test_fuzz_transformers.py).  Each test states what went
wrong.  The expectation is the fuzzer's: no whole-model rollback, no merge taken back by its
own check, and the original function on other batch sizes and sequence lengths."""

import math

import pytest
import torch
import torch.nn as nn

import repc
from repc.examples import randomize_bn


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if p.dim() > 1 else 2))
    return randomize_bn(model, seed).eval()


def assert_clean(model: nn.Module, x: torch.Tensor, others=((3, 4), (1, 7))):
    fused = repc.compile(model, x)
    report = fused.repc_report
    assert report.verification.ok and not report.rolled_back, str(report)
    assert not [r for r in report.rejected if r.reason.startswith("rolled back:")], str(report)
    with torch.no_grad():
        for b, t in others:
            y = torch.randn(b, t, x.shape[-1])
            want = model(y)
            assert torch.allclose(fused(y), want, atol=1e-5 * want.abs().max().item()), (b, t)
    return report


class FusedQKVAttention(nn.Module):
    def __init__(self, d=8, heads=2, read="chunk", scale="div"):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.d, self.heads, self.read, self.scale = d, heads, read, scale

    def forward(self, x):
        B, T, _ = x.shape
        d, dh = self.d, self.d // self.heads
        qkv = self.qkv(x)
        q, k, v = qkv.chunk(3, -1) if self.read == "chunk" else qkv.split(d, -1)
        q, k, v = (t.view(B, T, self.heads, dh).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1)
        scores = scores / math.sqrt(dh) if self.scale == "div" else scores * 0.37
        return self.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d))


@pytest.mark.parametrize("read", ["chunk", "split"])
@pytest.mark.parametrize("scale", ["div", "mul"])
def test_scale_after_the_product_of_a_fused_qkv_folds_into_q_only(read, scale):
    """Issue 13: the scale was folded into the whole qkv projection (k and v scaled too,
    deviation 0.5-0.7 with verify=False), so the whole-model check rolled back every rewrite.
    Now only q's rows of qkv take it, and no multiply over the scores is left."""
    model = randomized(FusedQKVAttention(read=read, scale=scale))
    report = assert_clean(model, torch.randn(2, 5, 8))
    assert report.rewrites


class AdapterBnExperts(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.down, self.up, self.bn = nn.Linear(d, 2), nn.Linear(2, d), nn.BatchNorm1d(d)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.gate = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = x + self.up(self.down(x))
        h = self.bn(h.flatten(0, 1)).reshape_as(h)
        g = self.gate.softmax(0)
        out = g[0] * self.experts[0](h)
        for i in (1, 2):
            out = out + g[i] * self.experts[i](h)
        return out


def test_adapter_then_bn_on_flattened_tokens_then_gated_experts_merges_whole():
    """Issue 13: one expert absorbed the adapter's output ``h`` (its readers, the shared BN's
    nodes, were in that expert's region) while the others read ``h`` as a source.  Their sum
    then both computed ``h`` and read it, and its check, drawing ``x`` and ``h`` independently
    at another batch, rejected it ("rolled back: deviation 0.65").  The sum now takes ``h`` in:
    the whole block is one linear."""
    model = randomized(AdapterBnExperts())
    report = assert_clean(model, torch.randn(2, 5, 8))
    assert len(report.rewrites) == 1, str(report)


def test_bn_on_the_flattened_residual_stream_reads_its_own_shape():
    """Found by the transformer fuzzer (two attention blocks, the second with a BatchNorm1d on
    ``h.flatten(0, 1)`` viewed back with ``B, T, d = h.shape``): the shape read was moved past
    the residual sum ``h`` to the model input, outside the BN's region, so the region's check at
    another batch viewed with the example's batch size and took the merge back ("rolled back:
    deviation inf")."""
    from fuzz_transformers import Attention, Block, Lin, Norm, TransformerSpec, build_transformer, example_tokens
    attention = Attention(heads=1, read='chunk', scale='div', qkv=(Lin(bias=False),), proj=Lin(bias=False))
    spec = TransformerSpec(d=4, blocks=(Block(attention, Norm('layer')), Block(attention, Norm('bn_flatten', 'view'))),
                           tokens=2, batch=1)
    assert_clean(build_transformer(spec), example_tokens(spec))


def test_a_token_reshape_that_undoes_the_flatten_around_a_bn_stays_beside_it():
    """Found by the transformer fuzzer (1,000 networks, at 0d08b26): two adapter blocks, the
    second after a BatchNorm1d on ``h.reshape(-1, d)`` reshaped back to tokens.  The pass moving
    token layouts below linear maps moved that reshape past the adapter, away from the flatten
    it undoes; the matcher, which reads flatten -> BN -> reshape as one per-channel map, then
    saw a linear on a pending layout and read the region off as a dense map for the example's
    size, which its check took back ("rolled back: the dense map ... fits the example's
    per-sample size only").  A layout change that undoes another around elementwise maps now
    stays where it is."""
    from fuzz_transformers import Adapter, Block, Lin, Norm, TransformerSpec, build_transformer, example_tokens
    adapter = Adapter(rank=1, act='identity', residual=False, scale=0.5, down=Lin(bias=False, scale=2.0),
                      up=Lin(bias=False, scale=2.0))
    spec = TransformerSpec(d=4, blocks=(Block(adapter, Norm('layer', 'reshape'), residual=True),
                                        Block(adapter, Norm('bn_flatten', 'reshape'), residual=False)),
                           tokens=3, batch=1)
    report = assert_clean(build_transformer(spec), example_tokens(spec))
    assert not any(r.shape_specialized for r in report.rewrites), str(report)
