"""Training-time reference blocks for the linear family and for expert mixtures.

Written from the papers' descriptions (``../shared/PAPERS.md``), not from their code: LoRA,
GLoRA, ZeroI2V adapters, Weight-Inherited-Distillation compactors, RepQ-ViT's scales after
LayerNorm, BatchNorm on token layouts (LeViT), RePaViT's channel-idle FFN, the identity
activations of depth-reduced ViTs, RepMLP, linear and conv expert mixtures, RepMode's
task-gated diverse experts, EWA's mixtures of identical FFN experts and a top-k router.

Every adapter gets non-trivial weights (LoRA's ``B`` is *not* zero as at initialisation, or
the merge would be trivially right); call :func:`randomize` before use so that every
BatchNorm has random running statistics and the model is in eval mode.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.nn.utils.parametrizations import weight_norm

from repc.examples import randomize_bn

from blocks import EXAMPLES, assert_unchanged, rel_dev, snapshot  # shared with the conv-family tests


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters everywhere; eval mode."""
    return randomize_bn(model, seed).eval()


def _normal_(t: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return t.normal_(0.0, std)


def bn_tokens(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d over the channels of a ``(B, N, C)`` token tensor, transpose style."""
    return bn(x.transpose(1, 2)).transpose(1, 2)


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Module):
    """LoRA (Hu et al. 2021): ``W x + b + (alpha / r) * B A dropout(x)``, W frozen.

    ``B`` is random (a trained adapter), not zero as at initialisation.
    """

    def __init__(self, d_in, d_out, r=4, alpha=8.0, dropout=0.1, bias=True):
        super().__init__()
        self.base = nn.Linear(d_in, d_out, bias=bias)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        _normal_(self.lora_B.weight, 0.5)
        self.dropout = nn.Dropout(dropout)
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_B(self.lora_A(self.dropout(x)))


class FunctionalLoRA(nn.Module):
    """LoRA on raw parameters: ``F.linear(x, W, b) + (x @ A.T @ B.T) * s``."""

    def __init__(self, d_in, d_out, r=4, scale=0.75):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.randn(d_out))
        self.A = nn.Parameter(torch.randn(r, d_in) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.randn(d_out, r) * 0.5)
        self.scale = scale

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.A.T @ self.B.T) * self.scale


class PeftLoRALinear(nn.Module):
    """LoRA as peft's ``lora.Linear.forward`` writes it: the input cast to the adapter's dtype and
    the result cast back to the base layer's output dtype (no-ops in one dtype)."""

    def __init__(self, d_in=16, d_out=16, r=4, alpha=8):
        super().__init__()
        self.base_layer = nn.Linear(d_in, d_out)
        self.lora_A, self.lora_B = nn.Linear(d_in, r, bias=False), nn.Linear(r, d_out, bias=False)
        self.lora_dropout = nn.Dropout(0.1)
        self.scaling = alpha / r

    def forward(self, x):
        result = self.base_layer(x)
        torch_result_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result.to(torch_result_dtype)


class TimmAttentionInput(nn.Module):
    """A LayerNorm, then timm's Attention entry: ``B, N, C = x.shape`` of the norm's output, then
    the qkv projection split into heads."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.norm, self.qkv, self.heads = nn.LayerNorm(d), nn.Linear(d, 3 * d), heads

    def forward(self, x):
        x = self.norm(x)
        B, N, C = x.shape
        return self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's ``Conv1D``: a linear layer written as ``addmm`` on flattened tokens,
    with its weight stored transposed (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2MLP(nn.Module):
    """GPT-2's pre-norm MLP with Conv1D layers and the residual."""

    def __init__(self, d=16):
        super().__init__()
        self.ln_2, self.c_fc, self.c_proj = nn.LayerNorm(d), Conv1D(4 * d, d), Conv1D(d, 4 * d)

    def forward(self, x):
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class LoRASelfAttention(nn.Module):
    """Single-head self-attention whose q, k, v projections carry LoRA adapters (``explicit``:
    written with explicit matmuls and softmax; otherwise with ``F.scaled_dot_product_attention``)."""

    def __init__(self, d=16, r=4, explicit=True):
        super().__init__()
        self.q = LoRALinear(d, d, r)
        self.k = LoRALinear(d, d, r)
        self.v = LoRALinear(d, d, r)
        self.explicit = explicit
        self.scale = d ** -0.5

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if not self.explicit:
            return F.scaled_dot_product_attention(q, k, v)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1) @ v


class LoRAMultiHeadAttention(nn.Module):
    """Multi-head self-attention with LoRA on q, k, v and an output projection over the
    re-assembled heads (``proj(out.transpose(1, 2).reshape(b, n, d))``)."""

    def __init__(self, d=16, heads=2, r=4):
        super().__init__()
        self.heads = heads
        self.q = LoRALinear(d, d, r)
        self.k = LoRALinear(d, d, r)
        self.v = LoRALinear(d, d, r)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.heads

        def split(t):
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ScaledProductAttention(nn.Module):
    """Self-attention as current transformer code writes it (e.g. Hugging Face's eager path):
    separate q/k/v projections, heads split by ``view`` to the input's shape + ``transpose``,
    the scores scaled after the product (``* scaling``, or ``/ sqrt(head_dim)`` with
    ``divide``), and an additive attention mask."""

    def __init__(self, d=16, heads=2, divide=False):
        super().__init__()
        self.head_dim, self.divide = d // heads, divide
        self.scaling = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, hidden, mask):
        input_shape = hidden.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden).view(hidden_shape).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3))
        scores = scores / math.sqrt(self.head_dim) if self.divide else scores * self.scaling
        probs = (scores + mask).softmax(-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out)


# ----------------------------------------------------------------------------- parameter-only weights

class GLoRALinear(nn.Module):
    """GLoRA (Chavan et al. 2023): weight and bias computed from frozen ``W, b`` and supports.

    ``W' = W + W * A + Bu @ Bv`` (A a full scale tensor, Bu @ Bv a low-rank term) and
    ``b' = b + b * D + E``; then a plain ``F.linear``.
    """

    def __init__(self, d_in, d_out, r=3):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(d_out), requires_grad=False)
        self.A = nn.Parameter(torch.randn(d_out, d_in) * 0.1)
        self.Bu = nn.Parameter(torch.randn(d_out, r) * 0.3)
        self.Bv = nn.Parameter(torch.randn(r, d_in) * 0.3)
        self.D = nn.Parameter(torch.randn(d_out) * 0.1)
        self.E = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        weight = self.weight + self.weight * self.A + self.Bu @ self.Bv
        bias = self.bias + self.bias * self.D + self.E
        return F.linear(x, weight, bias)


class GLoRAConv(nn.Module):
    """GLoRA on a conv: ``W' = W + W * A + (Bu @ Bv).reshape(W.shape)`` (A per output channel)."""

    def __init__(self, cin, cout, k=3, r=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) / math.sqrt(cin * k * k))
        self.bias = nn.Parameter(torch.randn(cout))
        self.A = nn.Parameter(torch.randn(cout, 1, 1, 1) * 0.1)
        self.Bu = nn.Parameter(torch.randn(cout, r) * 0.3)
        self.Bv = nn.Parameter(torch.randn(r, cin * k * k) * 0.3)
        self.E = nn.Parameter(torch.randn(cout) * 0.1)
        self.k = k

    def forward(self, x):
        weight = self.weight + self.weight * self.A + (self.Bu @ self.Bv).reshape(self.weight.shape)
        return F.conv2d(x, weight, self.bias + self.E, padding=self.k // 2)


class LowRankDelta(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: ``W -> W + U @ V``."""

    def __init__(self, d_out, d_in, r=2):
        super().__init__()
        self.U = nn.Parameter(torch.randn(d_out, r) * 0.5)
        self.V = nn.Parameter(torch.randn(r, d_in) * 0.5)

    def forward(self, weight):
        return weight + self.U @ self.V


class ParametrizedMLP(nn.Module):
    """A linear with a registered low-rank parametrization, then a weight-normed linear."""

    def __init__(self, d=12, hidden=20):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        parametrize.register_parametrization(self.fc1, "weight", LowRankDelta(hidden, d))
        self.act = nn.GELU()
        self.fc2 = weight_norm(nn.Linear(hidden, d))
        with torch.no_grad():
            self.fc2.parametrizations.weight.original0.mul_(torch.rand(d, 1) + 0.5)  # g != |v|

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class GatedKernels(nn.Module):
    """A conv whose kernel is ``sum_i softmax(gate_logits[row])_i * K_i``: a fixed gate row."""

    def __init__(self, cin=4, cout=6, k=3, n=3, rows=4, row=2):
        super().__init__()
        self.kernels = nn.Parameter(torch.randn(n, cout, cin, k, k) / math.sqrt(cin * k * k))
        self.bias = nn.Parameter(torch.randn(cout))
        self.gate_logits = nn.Parameter(torch.randn(rows, n))
        self.row, self.k = row, k

    def forward(self, x):
        g = torch.softmax(self.gate_logits[self.row], 0)
        weight = (g.reshape(-1, 1, 1, 1, 1) * self.kernels).sum(0)
        return F.conv2d(x, weight, self.bias, padding=self.k // 2)


# ----------------------------------------------------------------------------- adapters, compactors, chains

class LinearAdapter(nn.Module):
    """ZeroI2V's linear adapter: ``x + up(down(x))`` with no nonlinearity."""

    def __init__(self, d, r=2):
        super().__init__()
        self.down = nn.Linear(d, r)
        self.up = nn.Linear(r, d)
        _normal_(self.up.weight, 0.5)

    def forward(self, x):
        return x + self.up(self.down(x))


class AdaptedLinear(nn.Module):
    """A frozen linear layer with ZeroI2V linear adapters before and/or after it."""

    def __init__(self, d_in=16, d_out=24, r=2, before=True, after=True):
        super().__init__()
        self.adapter_in = LinearAdapter(d_in, r) if before else nn.Identity()
        self.fc = nn.Linear(d_in, d_out)
        self.adapter_out = LinearAdapter(d_out, r) if after else nn.Identity()

    def forward(self, x):
        return self.adapter_out(self.fc(self.adapter_in(x)))


class AdaptedAttentionBlock(nn.Module):
    """ZeroI2V's placement in a transformer block built on ``nn.MultiheadAttention``: a linear
    adapter (``x + up(down(x)) * s``) on the attention's input (one adapted value as query, key
    and value), one on its output, one before the MLP, each after a LayerNorm."""

    def __init__(self, d=32, heads=4, r=4, batch_first=True, scale=0.5):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.adapter_attn_in, self.adapter_attn_out, self.adapter_mlp = (
            ScaledLinearAdapter(d, r, scale) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.adapter_attn_in(self.ln1(x))
        x = x + self.adapter_attn_out(self.attn(h, h, h, need_weights=False)[0])
        return x + self.fc2(F.gelu(self.fc1(self.adapter_mlp(self.ln2(x)))))


class ScaledLinearAdapter(LinearAdapter):
    """A linear adapter whose residual branch is scaled: ``x + up(down(x)) * scale``."""

    def __init__(self, d, r=2, scale=0.5):
        super().__init__(d, r)
        self.scale = scale

    def forward(self, x):
        return x + self.up(self.down(x)) * self.scale


class VideoEmbedding(nn.Module):
    """A video transformer's input: frames embedded by one linear, a positional embedding plus a
    temporal one expanded to batch x frames (``expand(B, T, N, d).reshape(B * T, N, d)``: its
    shape follows the input's batch), then a pre-norm residual linear and a mean over tokens."""

    def __init__(self, d=32, tokens=9, frames=4, patch=12):
        super().__init__()
        self.patch = nn.Linear(patch, d)
        self.pos = nn.Parameter(torch.randn(1, tokens, d))
        self.time = nn.Parameter(torch.randn(1, frames, d))
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):  # (B, T, N, patch)
        B, T, N, _ = x.shape
        h = self.patch(x.flatten(0, 1))
        h = h + self.pos + self.time.unsqueeze(2).expand(B, T, N, -1).reshape(B * T, N, -1)
        return (h + self.fc(self.norm(h))).mean(1)


class CompactedLinear(nn.Module):
    """Weight-Inherited Distillation: row/column compactors around an inherited teacher linear.

    The student computes ``R (W_t (C x) + b_t)``: ``C`` maps the student width up to the
    teacher's input width, ``R`` compacts the teacher's output rows to the student width.
    """

    def __init__(self, d_student_in=8, d_teacher_in=32, d_teacher_out=48, d_student_out=12):
        super().__init__()
        self.column = nn.Linear(d_student_in, d_teacher_in, bias=False)
        self.teacher = nn.Linear(d_teacher_in, d_teacher_out)
        self.row = nn.Linear(d_teacher_out, d_student_out, bias=False)

    def forward(self, x):
        return self.row(self.teacher(self.column(x)))


class LinearChain(nn.Module):
    """Linear layers back to back, nothing in between (widths as given)."""

    def __init__(self, *widths):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------- norms

class LNLinear(nn.Module):
    """``fc(LayerNorm(x))`` with a non-trivial LayerNorm affine (gamma, beta)."""

    def __init__(self, d=16, d_out=24, functional=False):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(d) * 1.5 + 0.25)
            self.norm.bias.copy_(torch.randn(d))
        self.fc = nn.Linear(d, d_out)
        self.functional = functional

    def forward(self, x):
        if self.functional:
            x = F.layer_norm(x, (x.shape[-1],), self.norm.weight, self.norm.bias, 1e-6)
        else:
            x = self.norm(x)
        return self.fc(x)


class RepQScaledLN(nn.Module):
    """RepQ-ViT: per-channel scale and shift applied after LayerNorm, then the q/k/v linear."""

    def __init__(self, d=16, d_out=48):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.channel_scale = nn.Parameter(torch.rand(d) * 2 + 0.1)
        self.channel_shift = nn.Parameter(torch.randn(d))
        self.qkv = nn.Linear(d, d_out)

    def forward(self, x):
        return self.qkv(self.norm(x) * self.channel_scale + self.channel_shift)


class LNThenAct(nn.Module):
    """``fc(gelu(LayerNorm(x)))``: nothing can absorb the LayerNorm's affine."""

    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(d) + 0.5)
            self.norm.bias.copy_(torch.randn(d))
        self.act = nn.GELU()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(self.act(self.norm(x)))


class TokenLinearBN(nn.Module):
    """``(B, N, C)`` tokens: BN1d before and/or after a linear, in the layouts ViTs write it.

    ``style``: ``"transpose"`` -- ``bn(x.transpose(1, 2)).transpose(1, 2)``;
    ``"flatten"`` -- LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``.
    """

    def __init__(self, d=16, d_out=24, style="transpose", before=True, after=True):
        super().__init__()
        self.bn_in = nn.BatchNorm1d(d) if before else None
        self.fc = nn.Linear(d, d_out)
        self.bn_out = nn.BatchNorm1d(d_out) if after else None
        self.style = style

    def _bn(self, bn, x):
        if self.style == "transpose":
            return bn(x.transpose(1, 2)).transpose(1, 2)
        return bn(x.flatten(0, 1)).reshape_as(x)

    def forward(self, x):
        if self.bn_in is not None:
            x = self._bn(self.bn_in, x)
        x = self.fc(x)
        if self.bn_out is not None:
            x = self._bn(self.bn_out, x)
        return x


# ----------------------------------------------------------------------------- RePaViT

class RePaViTFFN(nn.Module):
    """RePaViT's channel-idle FFN with a BN norm and the residual.

    ``y = x + fc2(cat([act(h[..., :k]), h[..., k:]]))``, ``h = fc1(BN(x))``: the activation
    covers only the first ``k = (1 - idle) * hidden`` channels.  ``form`` writes the split as
    slices (``"slice"``), ``split`` or ``chunk`` (then ``idle`` must be a multiple of 1/chunks),
    or as ``torch.where(mask, act(h), h)`` with a channel mask held as a buffer
    (``"mask_buffer"``) or built at every call from ``zeros_like(h)`` and a slice assignment
    (``"mask_zeros_like"``).
    """

    def __init__(self, d=32, ratio=4, idle=0.75, form="slice", chunks=4):
        super().__init__()
        hidden = ratio * d
        self.k = round(hidden * (1 - idle))
        self.hidden, self.form, self.chunks = hidden, form, chunks
        self.norm = nn.BatchNorm1d(d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)
        self.register_buffer("mask", torch.arange(hidden) < self.k)

    def forward(self, x):
        h = self.fc1(bn_tokens(self.norm, x))
        if self.form == "mask_buffer":
            h = torch.where(self.mask, self.act(h), h)
        elif self.form == "mask_zeros_like":
            mask = torch.zeros_like(h, dtype=torch.bool)
            mask[..., :self.k] = True
            h = torch.where(mask, self.act(h), h)
        elif self.form == "slice":
            h = torch.cat([self.act(h[..., :self.k]), h[..., self.k:]], -1)
        elif self.form == "split":
            active, idle = h.split([self.k, self.hidden - self.k], -1)
            h = torch.cat([self.act(active), idle], -1)
        else:
            parts = h.chunk(self.chunks, -1)
            n_active = self.k * self.chunks // self.hidden
            h = torch.cat([self.act(parts[i]) if i < n_active else parts[i] for i in range(self.chunks)], -1)
        return x + self.fc2(h)


class RePaViTPaperMlp(nn.Module):
    """RePaViT's FFN as the paper's code writes it: BatchNorm1d on tokens through transposes
    before fc1 and on the hidden channels after the activation, bias-free linears, the channel
    mask built at every call (``zeros_like`` then ``mask[:, :, :k] = True``; torch.export writes
    that as a lifted constant filled into a slice) and applied by ``torch.where``, the first
    ``k = d`` hidden channels activated, an optional layer scale, the residual."""

    def __init__(self, d=32, ratio=4, layer_scale=True):
        super().__init__()
        self.fc1 = nn.Linear(d, ratio * d, bias=False)
        self.fc2 = nn.Linear(ratio * d, d, bias=False)
        self.act = nn.GELU()
        self.act_channels = d
        self.norm1 = nn.BatchNorm1d(d)
        self.norm2 = nn.BatchNorm1d(ratio * d)
        self.ls = nn.Parameter(torch.ones(d) * 1e-5) if layer_scale else None

    def forward(self, x):
        shortcut = x
        x = self.norm1(x.transpose(-1, -2)).transpose(-1, -2)
        x = self.fc1(x)
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[:, :, :self.act_channels] = True
        x = torch.where(mask, self.act(x), x)
        x = self.norm2(x.transpose(-1, -2)).transpose(-1, -2)
        x = self.fc2(x)
        if self.ls is not None:
            x = x * self.ls
        return x + shortcut


class RePaViTPaperBlock(nn.Module):
    """Attention (BN norm, fused qkv, ``scaled_dot_product_attention``, the residual) then
    :class:`RePaViTPaperMlp`: the FFN's input is the attention's residual sum, which the FFN
    also reads through its own residual."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.norm = nn.BatchNorm1d(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.mlp = RePaViTPaperMlp(d)

    def forward(self, x):
        B, N, C = x.shape
        h = self.norm(x.transpose(-1, -2)).transpose(-1, -2)
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.mlp(x + self.proj(a))


# ----------------------------------------------------------------------------- depth reduction

class ResidualLinearStack(nn.Module):
    """Rethinking ViT depth: residual blocks ``x = x + fc(act(x))`` whose activations were
    trained into identities (``act`` built by the ``make_act`` factory)."""

    def __init__(self, d=16, depth=3, make_act=lambda d: nn.LeakyReLU(1.0)):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.acts = nn.ModuleList(make_act(d) for _ in range(depth))

    def forward(self, x):
        for fc, act in zip(self.fcs, self.acts):
            x = x + fc(act(x))
        return x


class ActivatedMLP(nn.Module):
    """``fc2(act(fc1(x)))``: merges into one linear iff ``act`` is an identity."""

    def __init__(self, d=16, hidden=16, act=None):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = act if act is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def all_ones_prelu() -> nn.PReLU:
    """A PReLU (one shared slope) trained into the identity."""
    act = nn.PReLU()
    with torch.no_grad():
        act.weight.fill_(1.0)
    return act


# ----------------------------------------------------------------------------- RepMLP

class RepMLPUnit(nn.Module):
    """RepMLP (Ding et al. 2021): an FC over the flattened ``(C, H, W)`` map plus parallel
    conv-BN branches (k x k, 'same' padding) on the same map, summed."""

    def __init__(self, c=3, h=4, w=4, kernels=(1, 3)):
        super().__init__()
        self.shape = (c, h, w)
        self.fc = nn.Linear(c * h * w, c * h * w)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, bias=False), nn.BatchNorm2d(c)) for k in kernels)

    def forward(self, x):
        out = self.fc(x.flatten(1)).reshape(x.shape)
        for b in self.branches:
            out = out + b(x)
        return out


# ----------------------------------------------------------------------------- expert mixtures

class StackMeanExperts(nn.Module):
    """``torch.stack([e(x) for e in experts]).mean(0)`` over linear experts."""

    def __init__(self, d=12, d_out=10, n=4):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, d_out) for _ in range(n))

    def forward(self, x):
        return torch.stack([e(x) for e in self.experts]).mean(0)


class SumDivExperts(nn.Module):
    """``sum(e(x) for e in experts) / n`` over linear experts."""

    def __init__(self, d=12, d_out=10, n=3):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, d_out) for _ in range(n))

    def forward(self, x):
        return sum(e(x) for e in self.experts) / len(self.experts)


class GatedExperts(nn.Module):
    """``sum_i g[i] * e_i(x)`` with ``g = softmax(gate_logits)``: a gate from parameters only."""

    def __init__(self, d=12, d_out=10, n=3):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, d_out) for _ in range(n))
        self.gate_logits = nn.Parameter(torch.randn(n))

    def forward(self, x):
        g = self.gate_logits.softmax(0)
        return sum(g[i] * e(x) for i, e in enumerate(self.experts))


class ConvExperts(nn.Module):
    """Conv-BN experts (same kernel size), gated by a parameter softmax, averaged by stack/mean."""

    def __init__(self, cin=4, cout=6, n=3, k=3):
        super().__init__()
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout)) for _ in range(n))
        self.gate_logits = nn.Parameter(torch.randn(n))

    def forward(self, x):
        g = torch.softmax(self.gate_logits, 0)
        return torch.stack([g[i] * e(x) for i, e in enumerate(self.experts)]).sum(0)


class RepModeBlock(nn.Module):
    """RepMode (Zhou et al. 2023): diverse conv experts (1x1, 3x3, 5x5 conv-BN, 1x1 conv then
    avg-pool-BN) mixed by a task-aware gate ``softmax(gate[task])``, then ReLU.  For a fixed
    task the gated sum of expert kernels is one conv."""

    def __init__(self, cin=4, cout=4, tasks=3):
        super().__init__()
        self.experts = nn.ModuleList([
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)),
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)),
            nn.Sequential(nn.Conv2d(cin, cout, 5, padding=2, bias=False), nn.BatchNorm2d(cout)),
            nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(cout)),
        ])
        self.gate = nn.Parameter(torch.randn(tasks, len(self.experts)))
        self.act = nn.ReLU()

    def forward(self, x, task: int):
        g = torch.softmax(self.gate[task], -1)
        out = 0
        for i, e in enumerate(self.experts):
            out = out + g[i] * e(x)
        return self.act(out)


class OneHotTaskExperts(nn.Module):
    """Linear experts gated by ``softmax(task_embedding @ gate)``, the task given as a tensor."""

    def __init__(self, d=12, n=3, tasks=4):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.gate = nn.Parameter(torch.randn(tasks, n))

    def forward(self, x, task_embedding):
        g = torch.softmax(task_embedding @ self.gate, -1)
        return sum(g[i] * e(x) for i, e in enumerate(self.experts))


class FFNExpert(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EWAMoE(nn.Module):
    """EWA (Huang et al. 2023): identical FFN experts pulled together during training, mixed
    uniformly, with the residual.  ``spread`` is how far each expert's weights are from the
    shared ones (relative); ``form`` picks ``stack(...).mean(0)`` or ``sum(...) / n``."""

    def __init__(self, d=16, hidden=32, n=4, spread=1e-2, form="mean", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shared = FFNExpert(d, hidden)
        self.experts = nn.ModuleList()
        for _ in range(n):
            e = FFNExpert(d, hidden)
            with torch.no_grad():
                for p, q in zip(e.parameters(), shared.parameters()):
                    p.copy_(q + spread * q.abs().mean() * torch.randn(q.shape, generator=g))
            self.experts.append(e)
        self.form = form

    def forward(self, x):
        if self.form == "mean":
            return x + torch.stack([e(x) for e in self.experts]).mean(0)
        return x + sum(e(x) for e in self.experts) / len(self.experts)


class TopKRouterMoE(nn.Module):
    """A token router: ``softmax(router(x))`` keeps its top-k gates per token; a data-dependent
    gate, hence not a linear map of ``x`` even with linear experts."""

    def __init__(self, d=12, n=4, k=2):
        super().__init__()
        self.router = nn.Linear(d, n)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.k = k

    def forward(self, x):
        gates = self.router(x).softmax(-1)
        top, index = gates.topk(self.k, -1)
        gates = torch.zeros_like(gates).scatter(-1, index, top)
        out = 0
        for i, e in enumerate(self.experts):
            out = out + gates[..., i:i + 1] * e(x)
        return out


# ----------------------------------------------------------------------------- checks shared by the tests

REL_TOL = 1e-5  # float32 merges sum the same products in another order; folding errors show at 1e-2



def input_variants(example, fixed_size: bool = False, keep=(), seed: int = 3):
    """Inputs of other values and shapes than the example: random values, batch + 1, batch 1,
    and (unless ``fixed_size``) more tokens for ``(B, N, C)`` or a larger map for ``(B, C, H, W)``.
    Non-tensor inputs, tensors that are not float and the inputs at ``keep`` stay as given."""
    gen = torch.Generator().manual_seed(seed)

    def shapes(t):
        s = list(t.shape)
        out = [s]
        if s:
            out += [[s[0] + 1] + s[1:], [1] + s[1:]]
        if not fixed_size and len(s) == 3:
            out.append([s[0], s[1] + 3, s[2]])
        if not fixed_size and len(s) >= 4:
            out.append(s[:2] + [n + 3 for n in s[2:]])
        return out

    vary = [isinstance(x, torch.Tensor) and x.is_floating_point() and i not in keep for i, x in enumerate(example)]
    count = min(len(shapes(x)) for x, v in zip(example, vary) if v)
    for i in range(count):
        yield tuple(torch.randn(shapes(x)[i], generator=gen, dtype=x.dtype) if v else x
                    for x, v in zip(example, vary))


def compile_exact(model: nn.Module, example, *, fixed_size: bool = False, keep=(), tol: float = REL_TOL,
                  **options):
    """``repc.compile`` the model and check the result.

    The result must not be rolled back, must pass its own verification, leave ``model``
    untouched, and match ``model`` on the example and on :func:`input_variants` (``keep``:
    positions of inputs such as a task embedding that keep their example value).
    """
    import repc

    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    before = snapshot(model)
    fused = repc.compile(model, example, **options)  # the default: the model's own class, modules swapped in
    EXAMPLES[fused] = example
    assert_unchanged(model, before)
    report = fused.repc_report
    assert not report.rolled_back, str(report)
    assert report.verification is not None and report.verification.ok, str(report)
    with torch.no_grad():
        assert rel_dev(fused(*example), model(*example)) <= tol, str(report)
        for inputs in input_variants(example, fixed_size, keep):
            dev = rel_dev(fused(*inputs), model(*inputs))
            assert dev <= tol, f"deviation {dev:.3g} on shapes {[getattr(x, 'shape', x) for x in inputs]}"
    return fused


_OP_KINDS = {
    "linear": (nn.Linear,), "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "bn": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
}
_FUNCTION_KINDS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
                   torch.conv2d: "conv", F.batch_norm: "bn", torch.batch_norm: "bn",
                   torch.matmul: "matmul", torch.mm: "matmul"}


def _run_counts(module: nn.Module, example) -> Tuple[Counter, list]:
    """What ``module`` runs on ``example``: (ops by kind, the leaf modules called in turn),
    counted as :func:`op_counts` counts a graph's nodes -- leaf modules by kind or class name,
    functions and methods outside them by name."""
    from torch.overrides import TorchFunctionMode

    counts, called, depth = Counter(), [], [0]

    def before(m, args):
        if depth[0] == 0 and not isinstance(m, _NO_OP_MODULES):
            counts[next((k for k, classes in _OP_KINDS.items() if type(m) in classes), type(m).__name__)] += 1
            called.append(m)
        depth[0] += 1

    def after(m, args, out):
        depth[0] -= 1

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if depth[0] == 0 and not name.startswith("__") and name not in _NOT_OPS:
                counts[_FUNCTION_KINDS.get(func, "matmul" if func is torch.Tensor.matmul else name)] += 1
            return func(*args, **(kwargs or {}))

    # (torch.nn's leaves; a library's own leaf, GPT-2's Conv1D, is counted by what it calls)
    leaves = [m for m in module.modules() if not any(True for _ in m.children())
              and type(m).__module__.startswith("torch.nn.modules")]
    hooks = [m.register_forward_pre_hook(before) for m in leaves] + [m.register_forward_hook(after) for m in leaves]
    try:
        with torch.no_grad(), Functions():
            module(*example)
    finally:
        for h in hooks:
            h.remove()
    return counts, called


_NO_OP_MODULES = (nn.Identity, nn.Dropout)  # (in eval mode: the identity)
_NOT_OPS = frozenset({"size", "dim", "shape", "dtype", "device", "numel", "is_floating_point"})


def graph_modules(module: nn.Module) -> List[torch.fx.GraphModule]:
    graphs = [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]
    assert graphs, "repc.compile returned no fx graph"
    return graphs


def op_counts(module: nn.Module):
    """How many ops of each kind the fused graphs run: ``linear`` / ``conv`` / ``bn`` (module
    or function), else the module class name or the function / method name."""
    import operator

    if module in EXAMPLES:
        return _run_counts(module, EXAMPLES[module])[0]
    counts = Counter()
    for gm in graph_modules(module):
        mods = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op == "call_module":
                mod = mods[node.target]
                kind = next((k for k, classes in _OP_KINDS.items() if type(mod) in classes), type(mod).__name__)
                counts[kind] += 1
            elif node.op == "call_function":
                if node.target is operator.matmul:
                    counts["matmul"] += 1
                else:
                    counts[_FUNCTION_KINDS.get(node.target, getattr(node.target, "__name__", str(node.target)))] += 1
            elif node.op == "call_method":
                counts[node.target] += 1
    return counts


def called_modules(module: nn.Module, kind=nn.Linear) -> list:
    """The modules of class ``kind`` that the fused graphs call, once per call."""
    if module in EXAMPLES:
        return [m for m in _run_counts(module, EXAMPLES[module])[1] if isinstance(m, kind)]
    out = []
    for gm in graph_modules(module):
        mods = dict(gm.named_modules())
        out += [mods[n.target] for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], kind)]
    return out


class MaskedLayer(nn.Module):
    """A token layer taking an optional mask, as transformers' layers do: ``None`` skips it."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = LoRALinear(d, d, r=2)

    def forward(self, x, mask=None):
        h = x + self.proj(self.norm(x))
        if mask is not None:
            h = h * mask[..., None]
        return h


class MaskedTokenModel(nn.Module):
    """Token ids and an optional 0/1 mask, in transformers' idiom: where the mask is all ones (and
    while not traced) the layers are given no mask, so that they skip it."""

    def __init__(self, vocab: int = 20, d: int = 8, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(MaskedLayer(d) for _ in range(layers))

    def forward(self, input_ids, attention_mask=None):
        mask = attention_mask
        if mask is not None and not torch.compiler.is_compiling() and bool(mask.all()):
            mask = None
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def masked_token_example(batch: int = 2, length: int = 6, vocab: int = 20):
    """Ids and a mask whose last row is right-padded."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(batch + length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length * 2 // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}
