"""The architecture fuzzer's transformer family (tests/test_fuzz_transformers.py).

:func:`transformers` draws random training-form transformer networks on ``(B, T, d)``
tokens, each as a plain frozen description (:class:`TransformerSpec`) whose ``repr`` is valid
Python, and :func:`build_transformer` turns one into an ``nn.Module`` in eval mode with every
parameter and every BatchNorm statistic randomized (default initialisation hides folding
errors: a zero LoRA ``B``, unit norm weights, zero biases, BN at mean 0 and variance 1).

A network is a chain of blocks ``x = x + gamma * mixer(norm(x))`` (or without the residual,
or with ``gamma`` a per-channel LayerScale, a number or 1), then an optional norm and a linear
head.  The norms are pre-LN (``LayerNorm``), RMS scaling (``x * rsqrt(mean(x^2) + eps) * w``),
BatchNorm1d on the token layout (``bn(h.transpose(1, 2)).transpose(1, 2)``, or
``bn(h.flatten(0, 1))`` reshaped back with ``reshape``, ``reshape_as`` or ``view``), or none.
The mixers:

* **attention**: q, k, v from one fused projection read through ``chunk(3, -1)``,
  ``split(d, -1)`` or slices, or from three projections; heads by ``view``/``transpose``; the
  scale written as ``(q @ k.transpose(-2, -1)) / math.sqrt(dh)``, ``* const``, on q before
  the product, or through ``F.scaled_dot_product_attention``; an output projection;
* **ffn**: ``fc2(act(fc1(h)))``, the activation on all channels or only on the first ``k``
  (RePaViT: ``cat([act(h[..., :k]), h[..., k:]])``, or via ``split``/``chunk``), optionally a
  BatchNorm on the hidden tokens;
* **adapter**: ``up(down(h))`` (linear, or with an activation between), ``h + s * ...`` or not;
* **experts**: linear experts averaged (``stack(...).mean(0)``) or gated
  (``sum(g[i] * e(h))``, ``g`` the softmax of a parameter);
* **shared**: one linear called twice (``lin(lin(h))``, or with an activation between).

Every linear may be a LoRA linear: ``base(x) + s * B(A(dropout(x)))``.  Nothing depends on the
example's batch or sequence length, so the compiled model is compared on other sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from repc.examples import randomize_bn

NORMS = ("layer", "rms", "bn_transpose", "bn_flatten", "none")
BN_RESHAPES = ("reshape", "reshape_as", "view")
QKV_READS = ("chunk", "split", "slice", "separate")
SCALES = ("div", "mul", "q", "sdpa")
ACTS = ("gelu", "relu", "identity")


@dataclass(frozen=True)
class Lin:
    """A linear map; with ``rank``, a LoRA linear ``base(x) + scale * B(A(dropout(x)))``."""

    bias: bool = True
    rank: Optional[int] = None
    scale: float = 2.0


@dataclass(frozen=True)
class Norm:
    """One of :data:`NORMS`; ``reshape`` (one of :data:`BN_RESHAPES`) for ``bn_flatten``."""

    kind: str = "layer"
    reshape: str = "reshape"


@dataclass(frozen=True)
class Attention:
    heads: int = 1
    read: str = "chunk"  # one of QKV_READS
    scale: str = "div"  # one of SCALES
    qkv: Tuple[Lin, ...] = (Lin(),)  # one fused projection, or three with read='separate'
    proj: Lin = Lin()


@dataclass(frozen=True)
class FFN:
    hidden: int
    act: str = "gelu"
    active: Optional[int] = None  # only the first `active` hidden channels see the activation
    slice_with: str = "getitem"  # getitem, split or chunk (chunk: active = hidden / 2)
    bn: bool = False  # a BatchNorm1d on the hidden tokens (transpose layout)
    fc1: Lin = Lin()
    fc2: Lin = Lin()


@dataclass(frozen=True)
class Adapter:
    rank: int
    act: str = "identity"
    residual: bool = True
    scale: float = 0.5
    down: Lin = Lin()
    up: Lin = Lin()


@dataclass(frozen=True)
class Experts:
    experts: Tuple[Lin, ...]
    gated: bool = False


@dataclass(frozen=True)
class Shared:
    lin: Lin = Lin()
    act: str = "identity"


Mixer = Union[Attention, FFN, Adapter, Experts, Shared]


@dataclass(frozen=True)
class Block:
    mixer: Mixer
    norm: Norm = Norm()
    residual: bool = True
    gamma: str = "none"  # none, number (0.5) or channels (a LayerScale parameter)


@dataclass(frozen=True)
class TransformerSpec:
    d: int
    blocks: Tuple[Block, ...]
    tokens: int = 4
    batch: int = 2
    head: Optional[int] = None  # a final LayerNorm and a linear to `head` outputs
    seed: int = 0


# ----------------------------------------------------------------------------- modules

def _activation(kind: str) -> nn.Module:
    return {"gelu": nn.GELU, "relu": nn.ReLU, "identity": nn.Identity}[kind]()


class LoRALinear(nn.Module):
    def __init__(self, spec: Lin, d_in: int, d_out: int):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=spec.bias)
        self.lora_A = nn.Linear(d_in, spec.rank, bias=False)
        self.lora_B = nn.Linear(spec.rank, d_out, bias=False)
        self.dropout = nn.Dropout(0.1)
        self.scale = spec.scale

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))


def linear(spec: Lin, d_in: int, d_out: int) -> nn.Module:
    return nn.Linear(d_in, d_out, bias=spec.bias) if spec.rank is None else LoRALinear(spec, d_in, d_out)


class RMSScale(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class TokenNorm(nn.Module):
    def __init__(self, spec: Norm, d: int):
        super().__init__()
        self.kind, self.reshape = spec.kind, spec.reshape
        if spec.kind == "layer":
            self.norm = nn.LayerNorm(d)
        elif spec.kind == "rms":
            self.norm = RMSScale(d)
        elif spec.kind in ("bn_transpose", "bn_flatten"):
            self.norm = nn.BatchNorm1d(d)
        elif spec.kind != "none":
            raise ValueError(f"unknown norm {spec.kind!r}; expected one of {', '.join(NORMS)}")

    def forward(self, h):
        if self.kind == "none":
            return h
        if self.kind == "bn_transpose":
            return self.norm(h.transpose(1, 2)).transpose(1, 2)
        if self.kind == "bn_flatten":
            flat = self.norm(h.flatten(0, 1))
            B, T, d = h.shape
            if self.reshape == "reshape_as":
                return flat.reshape_as(h)
            if self.reshape == "view":
                return flat.view(B, T, -1)
            return flat.reshape(B, T, d)
        return self.norm(h)


class AttentionMixer(nn.Module):
    def __init__(self, spec: Attention, d: int):
        super().__init__()
        self.spec, self.d, self.dh = spec, d, d // spec.heads
        if spec.read == "separate":
            self.q, self.k, self.v = (linear(s, d, d) for s in spec.qkv)
        else:
            self.qkv = linear(spec.qkv[0], d, 3 * d)
        self.proj = linear(spec.proj, d, d)
        self.scale_value = self.dh ** -0.5

    def forward(self, h):
        spec, d = self.spec, self.d
        B, T, _ = h.shape
        if spec.read == "separate":
            q, k, v = self.q(h), self.k(h), self.v(h)
        else:
            qkv = self.qkv(h)
            if spec.read == "chunk":
                q, k, v = qkv.chunk(3, -1)
            elif spec.read == "split":
                q, k, v = qkv.split(d, -1)
            else:
                q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        q, k, v = (t.view(B, T, spec.heads, self.dh).transpose(1, 2) for t in (q, k, v))
        if spec.scale == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            if spec.scale == "q":
                q = q * self.scale_value
            scores = q @ k.transpose(-2, -1)
            if spec.scale == "div":
                scores = scores / math.sqrt(self.dh)
            elif spec.scale == "mul":
                scores = scores * self.scale_value
            o = scores.softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, T, d))


class FFNMixer(nn.Module):
    def __init__(self, spec: FFN, d: int):
        super().__init__()
        self.spec = spec
        self.fc1, self.fc2 = linear(spec.fc1, d, spec.hidden), linear(spec.fc2, spec.hidden, d)
        self.act = _activation(spec.act)
        self.bn = nn.BatchNorm1d(spec.hidden) if spec.bn else None

    def forward(self, h):
        spec = self.spec
        h = self.fc1(h)
        if spec.active is None:
            h = self.act(h)
        else:
            k = spec.active
            if spec.slice_with == "split":
                a, b = h.split([k, spec.hidden - k], -1)
            elif spec.slice_with == "chunk":
                a, b = h.chunk(2, -1)
            else:
                a, b = h[..., :k], h[..., k:]
            h = torch.cat([self.act(a), b], -1)
        if self.bn is not None:
            h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        return self.fc2(h)


class AdapterMixer(nn.Module):
    def __init__(self, spec: Adapter, d: int):
        super().__init__()
        self.spec = spec
        self.down, self.up = linear(spec.down, d, spec.rank), linear(spec.up, spec.rank, d)
        self.act = _activation(spec.act)

    def forward(self, h):
        y = self.up(self.act(self.down(h)))
        return h + self.spec.scale * y if self.spec.residual else y


class ExpertsMixer(nn.Module):
    def __init__(self, spec: Experts, d: int):
        super().__init__()
        self.spec = spec
        self.experts = nn.ModuleList(linear(s, d, d) for s in spec.experts)
        if spec.gated:
            self.gate = nn.Parameter(torch.zeros(len(spec.experts)))

    def forward(self, h):
        if not self.spec.gated:
            return torch.stack([e(h) for e in self.experts]).mean(0)
        g = self.gate.softmax(0)
        out = g[0] * self.experts[0](h)
        for i in range(1, len(self.experts)):
            out = out + g[i] * self.experts[i](h)
        return out


class SharedMixer(nn.Module):
    def __init__(self, spec: Shared, d: int):
        super().__init__()
        self.lin, self.act = linear(spec.lin, d, d), _activation(spec.act)

    def forward(self, h):
        return self.lin(self.act(self.lin(h)))


_MIXERS = {Attention: AttentionMixer, FFN: FFNMixer, Adapter: AdapterMixer, Experts: ExpertsMixer, Shared: SharedMixer}


class TransformerBlock(nn.Module):
    def __init__(self, spec: Block, d: int):
        super().__init__()
        self.spec = spec
        self.norm = TokenNorm(spec.norm, d)
        self.mixer = _MIXERS[type(spec.mixer)](spec.mixer, d)
        if spec.gamma == "channels":
            self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x):
        y = self.mixer(self.norm(x))
        if self.spec.gamma == "channels":
            y = self.gamma * y
        elif self.spec.gamma == "number":
            y = y * 0.5
        return x + y if self.spec.residual else y


class FuzzTransformer(nn.Module):
    def __init__(self, spec: TransformerSpec):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(b, spec.d) for b in spec.blocks)
        self.head = None if spec.head is None else nn.Sequential(nn.LayerNorm(spec.d), nn.Linear(spec.d, spec.head))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x if self.head is None else self.head(x)


def randomize_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn at random (in place): matrices at ``N(0, 1/fan_in)``, norm and
    scale vectors in [0.5, 1.5], biases and gates ``N(0, 0.5)``; BatchNorm statistics random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name.endswith("bias") or name.endswith("gate"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return randomize_bn(model, seed)


def build_transformer(spec: TransformerSpec) -> nn.Module:
    """The ``nn.Module`` a spec describes, every parameter and BN statistic random, in eval
    mode.  The global random state is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = FuzzTransformer(spec)
    return randomize_parameters(model, spec.seed).eval()


def example_tokens(spec: TransformerSpec, seed: int = 0, batch: Optional[int] = None,
                   tokens: Optional[int] = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch or spec.batch, tokens or spec.tokens, spec.d), generator=gen)


# ----------------------------------------------------------------------------- strategies

@st.composite
def lins(draw, lora: bool = True) -> Lin:
    if lora and draw(st.booleans()):
        return Lin(draw(st.booleans()), draw(st.integers(1, 3)), draw(st.sampled_from([0.5, 2.0, 1.0])))
    return Lin(draw(st.booleans()))


@st.composite
def norms(draw) -> Norm:
    kind = draw(st.sampled_from(NORMS))
    return Norm(kind, draw(st.sampled_from(BN_RESHAPES)) if kind == "bn_flatten" else "reshape")


@st.composite
def attentions(draw, d: int) -> Attention:
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
    read = draw(st.sampled_from(QKV_READS))
    qkv = tuple(draw(lins()) for _ in range(3 if read == "separate" else 1))
    return Attention(heads, read, draw(st.sampled_from(SCALES)), qkv, draw(lins()))


@st.composite
def ffns(draw, d: int) -> FFN:
    hidden = draw(st.sampled_from([d, 2 * d, 4 * d]))
    partial = draw(st.sampled_from([None, "getitem", "split", "chunk"]))
    active, slice_with = None, "getitem"
    if partial is not None:
        slice_with = partial
        active = hidden // 2 if partial == "chunk" or hidden < 2 else draw(st.integers(1, hidden - 1))
        if partial == "chunk" and hidden % 2:
            slice_with, active = "getitem", max(1, hidden // 2)
    return FFN(hidden, draw(st.sampled_from(ACTS[:2])), active, slice_with, draw(st.booleans()), draw(lins()),
               draw(lins()))


@st.composite
def mixers(draw, d: int) -> Mixer:
    kind = draw(st.sampled_from(["attention", "attention", "ffn", "ffn", "adapter", "experts", "shared"]))
    if kind == "attention":
        return draw(attentions(d))
    if kind == "ffn":
        return draw(ffns(d))
    if kind == "adapter":
        return Adapter(draw(st.integers(1, 3)), draw(st.sampled_from(["identity", "identity", "gelu"])),
                       draw(st.booleans()), draw(st.sampled_from([0.5, 1.0, 2.0])), draw(lins(lora=False)),
                       draw(lins(lora=False)))
    if kind == "experts":
        return Experts(tuple(draw(lins()) for _ in range(draw(st.integers(2, 3)))), draw(st.booleans()))
    return Shared(draw(lins()), draw(st.sampled_from(["identity", "relu"])))


@st.composite
def transformers(draw, max_blocks: int = 3) -> TransformerSpec:
    """Random transformer networks (see the module docstring)."""
    d = draw(st.sampled_from([4, 6, 8]))
    blocks = tuple(Block(draw(mixers(d)), draw(norms()), draw(st.sampled_from([True, True, False])),
                         draw(st.sampled_from(["none", "number", "channels"])))
                   for _ in range(draw(st.integers(1, max_blocks))))
    head = draw(st.sampled_from([None, None, 3, d]))
    return TransformerSpec(d, blocks, draw(st.integers(2, 5)), draw(st.integers(1, 3)), head,
                           draw(st.integers(0, 2 ** 16)))
