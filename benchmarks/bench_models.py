"""Real and library-style models: repc against each model's own conversion, on CPU.

Per model the script reports:

* the **front end** ``repc.compile`` used (``torch.export``, or fx where export fails) and
  whether the model was captured whole or in parts;
* **heavy ops** (conv / linear / matmul / mm / addmm / bmm / baddbmm calls and
  ``nn.Linear`` / ``nn.Conv*`` modules) and **norm layers** (layer / batch / group norm,
  modules and calls) before -> after repc, next to the **reference** conversion's.  All three
  are counted the same way: on the graph ``torch.export`` captures (unfused, for the original
  and the reference) and on repc's result;
* whether the result is **exact**: the maximum relative error ``max|fused - original| /
  max|original|`` on an input of another batch and sequence / spatial size than the example
  (ViT: another batch only, its position embeddings fix the image size), below 1e-4;
* **compile time** of ``repc.compile`` (with its verification, the default) and of
  ``torch.export`` alone on the same model (``torch.export.export``, non-strict, every axis
  ``Dim.AUTO``: the call repc's capture makes);
* **latency** of the original, of the original as ``torch.export`` runs it (``program.module()``,
  unfused: how much of repc's gain is only capture, no Python of the model's per call), of the
  reference and of repc's result: median of interleaved rounds (:func:`common.interleaved_medians`),
  one thread by default, and the ratios repc/reference and repc/exported (below 1: repc's result
  is faster); "best repc/reference" compares the fastest rounds, "max IQR" (interquartile range
  over median, the largest of the forms) says how noisy the timings were.

The references:

* LoRA models (PEFT ``get_peft_model`` on ``BertModel``, ``ViTModel``, ``GPT2Model``): PEFT's own
  ``merge_and_unload()``;
* the library-style RepVGG and MobileOne nets: their deploy form, written by hand below (each
  block's branches merged in float64 into one conv, as the papers' ``reparameterize()`` does);
  checked against the training form before anything is timed;
* plain ``BertModel`` / ``ViTModel`` / ``GPT2Model``: no conversion exists, so the reference is
  the model itself (what repc can still fold there: LayerNorm affines into the next linear,
  the attention scale into the query projection).

Every parameter is moved off its initialisation and every BatchNorm gets random statistics
(zero biases, unit norms and zero LoRA ``B`` matrices would hide folding errors).

    .venv/bin/python benchmarks/bench_models.py              # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_models.py --models bert bert-lora --rounds 11
    .venv/bin/python benchmarks/bench_models.py --quick      # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import repc
from repc.capture_export import export_graph
from repc.report import op_counts
from repc.examples.library_style import ConvNorm, RankCheckedBatchNorm, drop_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_common.py, beside this script
import bench_common as common  # noqa: E402

F64 = torch.float64
EXACT = 1e-4  # max relative error for "exact"


def exported_counts(model: nn.Module, args, kwargs) -> Tuple[int, int]:
    """The counts of ``model`` as written: its graph as torch.export captures it (what repc reads)."""
    return op_counts(export_graph(model, tuple(args), dict(kwargs)).gm)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


class CallWith(nn.Module):
    """``model(*args, **kwargs)`` with ``args`` and ``kwargs`` as two inputs, so that a forward
    taking ``*args, **kwargs`` (PEFT's wrapper) can be exported with dynamic shapes too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, args, kwargs):
        return self.model(*args, **kwargs)


def export_alone(model: nn.Module, args, kwargs):
    """``torch.export.export`` of ``model``, non-strict, every axis of every tensor input
    ``Dim.AUTO``: the export repc's capture makes, without repc's work on its graph."""
    auto = lambda v: {i: torch.export.Dim.AUTO for i in range(v.dim())} if isinstance(v, torch.Tensor) else None
    shapes = torch.utils._pytree.tree_map(auto, (tuple(args), dict(kwargs)))
    return torch.export.export(CallWith(model), (tuple(args), dict(kwargs)), strict=False,
                               dynamic_shapes={"args": shapes[0], "kwargs": shapes[1]})


# ----------------------------------------------------------------------------- randomization

def randomized(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Every parameter moved off its init, every BatchNorm given random statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.5 + 0.5)
    return model.eval()


# ----------------------------------------------------------------------------- library-style conv nets
# Written the way timm-like libraries write them: a BatchNorm subclass asserting its input's rank
# and calling the functional form, drop_path, in-place activations, a dataclass output.

@dataclass
class NetOutput:
    logits: torch.Tensor
    features: Optional[torch.Tensor] = None


class LibraryRepVGGBlock(nn.Module):
    """3x3 and 1x1 conv-norm branches, a norm identity where shapes allow, drop path, in-place ReLU."""

    def __init__(self, cin, cout, stride=1, drop=0.1):
        super().__init__()
        self.conv_kxk = ConvNorm(cin, cout, 3, stride)
        self.conv_1x1 = ConvNorm(cin, cout, 1, stride)
        self.identity = RankCheckedBatchNorm(cin) if cin == cout and stride == 1 else None
        self.drop = drop
        self.attn = nn.Identity()  # timm's, where the block has no SE
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        B, C, H, W = x.shape  # a shape read the block does not otherwise need
        y = self.conv_kxk(x) + self.conv_1x1(x)
        y = drop_path(y, self.drop, self.training)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(self.attn(y))


class LibraryMobileOneBlock(nn.Module):
    """k parallel kxk conv-norm branches, a 1x1 conv-norm "scale" branch (kxk blocks only) and a
    norm skip where shapes allow, summed, in-place ReLU (depthwise with groups=cin)."""

    def __init__(self, cin, cout, k, stride=1, groups=1, branches=3):
        super().__init__()
        self.kernel_size = k
        self.branches = nn.ModuleList(ConvNorm(cin, cout, k, stride, groups) for _ in range(branches))
        self.scale = ConvNorm(cin, cout, 1, stride, groups) if k > 1 else None
        self.skip = RankCheckedBatchNorm(cin) if cin == cout and stride == 1 else None
        self.se = nn.Identity()  # timm's, where the block has no SE
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = 0
        if self.skip is not None:
            out = self.skip(x)
        if self.scale is not None:
            out = out + self.scale(x)
        for branch in self.branches:
            out = out + branch(x)
        return self.act(self.se(out))


class LibraryMobileOneUnit(nn.Sequential):
    def __init__(self, cin, cout, stride=1, branches=3):
        super().__init__(LibraryMobileOneBlock(cin, cin, 3, stride, groups=cin, branches=branches),
                         LibraryMobileOneBlock(cin, cout, 1, 1, branches=branches))


class LibraryNet(nn.Module):
    def __init__(self, stem: int, stages: nn.Module, width: int, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, stem, 3, stride=2), nn.ReLU(inplace=True))
        self.stages = stages
        self.head = nn.Linear(width, classes)

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward(self, x, return_features: bool = False):
        f = self.forward_features(x)
        return NetOutput(self.head(f.mean((2, 3))), f if return_features else None)


def library_repvgg(widths: List[Tuple[int, int, int]]) -> LibraryNet:
    """``widths``: (cin, cout, stride) per block."""
    blocks = nn.Sequential(*[LibraryRepVGGBlock(a, b, s) for a, b, s in widths])
    return LibraryNet(widths[0][0], blocks, widths[-1][1])


def library_mobileone(widths: List[Tuple[int, int, int]], branches: int = 3) -> LibraryNet:
    units = nn.Sequential(*[LibraryMobileOneUnit(a, b, s, branches) for a, b, s in widths])
    return LibraryNet(widths[0][0], units, widths[-1][1])


# ----------------------------------------------------------------------------- hand-written deploy form
# The reference for the library nets: each block's branches merged by hand into one conv
# (float64, then cast), independent of repc.

def bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``x * scale + shift``."""
    std = torch.sqrt(bn.running_var.to(F64) + bn.eps)
    scale = bn.weight.to(F64) / std
    return scale, bn.bias.to(F64) - bn.running_mean.to(F64) * scale


def fold(conv_norm: ConvNorm, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A conv-norm branch as (kxk kernel, bias): the BN folded, a smaller kernel padded to k."""
    conv, bn = conv_norm[0], conv_norm[1]
    scale, shift = bn_affine(bn)
    w = conv.weight.to(F64) * scale.reshape(-1, 1, 1, 1)
    p = (k - w.shape[-1]) // 2
    return F.pad(w, (p, p, p, p)), shift


def norm_identity(bn: nn.BatchNorm2d, groups: int, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A BN on the block's input as a kxk (grouped) conv: the identity kernel times the BN scale."""
    c = bn.num_features
    per_group = c // groups
    w = torch.zeros(c, per_group, k, k, dtype=F64)
    for i in range(c):
        w[i, i % per_group, k // 2, k // 2] = 1.0
    scale, shift = bn_affine(bn)
    return w * scale.reshape(-1, 1, 1, 1), shift


def merged_conv(parts: List[Tuple[torch.Tensor, torch.Tensor]], like: nn.Conv2d) -> nn.Conv2d:
    w = sum(p[0] for p in parts)
    b = sum(p[1] for p in parts)
    k = w.shape[-1]
    conv = nn.Conv2d(like.in_channels, like.out_channels, k, like.stride, k // 2, groups=like.groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(w.to(like.weight.dtype))
        conv.bias.copy_(b.to(like.weight.dtype))
    return conv


def deploy_block(block: nn.Module) -> nn.Module:
    if isinstance(block, LibraryRepVGGBlock):
        parts = [fold(block.conv_kxk, 3), fold(block.conv_1x1, 3)]
        if block.identity is not None:
            parts.append(norm_identity(block.identity, 1, 3))
        return nn.Sequential(merged_conv(parts, block.conv_kxk[0]), nn.ReLU(inplace=True))
    if isinstance(block, LibraryMobileOneBlock):
        k, like = block.kernel_size, block.branches[0][0]
        parts = [fold(b, k) for b in block.branches]
        if block.scale is not None:
            parts.append(fold(block.scale, k))
        if block.skip is not None:
            parts.append(norm_identity(block.skip, like.groups, k))
        return nn.Sequential(merged_conv(parts, like), nn.ReLU(inplace=True))
    raise TypeError(f"no hand-written deploy form for {type(block).__name__}")


def deploy(net: LibraryNet) -> LibraryNet:
    """The net's deploy form: the stem's conv-norm folded, every block one conv + ReLU."""
    out = copy.deepcopy(net)
    out.stem[0] = merged_conv([fold(net.stem[0], 3)], net.stem[0][0])
    blocks = []
    for block in net.stages:
        if isinstance(block, LibraryMobileOneUnit):
            blocks.extend(deploy_block(b) for b in block)
        else:
            blocks.append(deploy_block(block))
    out.stages = nn.Sequential(*blocks)
    return out.eval()


# ----------------------------------------------------------------------------- the papers' ViT blocks
# RePaViT and ZeroI2V written the way their code writes them, and each paper's own
# reparameterization written by hand (float64, independent of repc) as the reference.

class RePaViTAttention(nn.Module):
    """RePaViT's attention: BatchNorm on the tokens through transposes, a bias-free fused qkv,
    ``scaled_dot_product_attention``, the output projection and the residual."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.BatchNorm1d(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        h = self.norm(x.transpose(-1, -2)).transpose(-1, -2)
        q, k, v = self.qkv(h).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)) + x


class RePaViTMlp(nn.Module):
    """RePaViT's channel-idle FFN as its code writes it: BatchNorm before fc1 and on the hidden
    channels, the mask built at each call (``zeros_like``, ``mask[:, :, :d] = True``) and applied
    with ``torch.where``, a layer scale, the residual."""

    def __init__(self, d: int, ratio: int = 4):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, ratio * d, bias=False), nn.Linear(ratio * d, d, bias=False)
        self.act, self.act_channels = nn.GELU(), d
        self.norm1, self.norm2 = nn.BatchNorm1d(d), nn.BatchNorm1d(ratio * d)
        self.ls = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = self.fc1(self.norm1(x.transpose(-1, -2)).transpose(-1, -2))
        mask = torch.zeros_like(h, dtype=torch.bool)
        mask[:, :, :self.act_channels] = True
        h = torch.where(mask, self.act(h), h)
        return self.fc2(self.norm2(h.transpose(-1, -2)).transpose(-1, -2)) * self.ls + x


class DeployRePaViTAttention(nn.Module):
    def __init__(self, qkv: nn.Linear, proj: nn.Linear, heads: int):
        super().__init__()
        self.qkv, self.proj, self.heads = qkv, proj, heads

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)) + x


class DeployRePaViTMlp(nn.Module):
    """The paper's ``RePaMlp``: ``ffn3(act(ffn2(x))) + ffn1(x)``."""

    def __init__(self, ffn1: nn.Linear, ffn2: nn.Linear, ffn3: nn.Linear):
        super().__init__()
        self.ffn1, self.ffn2, self.ffn3, self.act = ffn1, ffn2, ffn3, nn.GELU()

    def forward(self, x):
        return self.ffn3(self.act(self.ffn2(x))) + self.ffn1(x)


def linear_of(weight: torch.Tensor, bias: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding float64 ``weight`` and ``bias`` cast to ``like``'s dtype."""
    out = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        out.weight.copy_(weight.to(like.dtype))
        out.bias.copy_(bias.to(like.dtype))
    return out


def deploy_repavit(model: nn.Sequential) -> nn.Sequential:
    """Each block reparameterized as the paper does: the BNs folded into qkv, fc1 and fc2; fc1
    and fc2 cut to the ``d`` activated channels; the idle channels' path, the layer scale and the
    residual one ``d x d`` linear beside them."""
    blocks = []
    for attn, mlp in zip(model[0::2], model[1::2]):
        s, t = bn_affine(attn.norm)
        w = attn.qkv.weight.to(F64)
        qkv = linear_of(w * s, w @ t, attn.qkv.weight)
        proj = copy.deepcopy(attn.proj)
        s1, t1 = bn_affine(mlp.norm1)
        s2, t2 = bn_affine(mlp.norm2)
        k, ls = mlp.act_channels, mlp.ls.to(F64)
        w1, w2 = mlp.fc1.weight.to(F64), mlp.fc2.weight.to(F64)
        ffn2 = linear_of(w1[:k] * s1, w1[:k] @ t1, mlp.fc1.weight)
        ffn3 = linear_of(ls[:, None] * w2[:, :k] * s2[:k], ls * (w2 @ t2), mlp.fc2.weight)
        idle = ls[:, None] * (w2[:, k:] * s2[k:]) @ (w1[k:] * s1)
        ffn1 = linear_of(idle + torch.eye(idle.shape[0], dtype=F64), ls * (w2[:, k:] @ (s2[k:] * (w1[k:] @ t1))),
                         mlp.fc1.weight)
        blocks += [DeployRePaViTAttention(qkv, proj, attn.heads), DeployRePaViTMlp(ffn1, ffn2, ffn3)]
    return nn.Sequential(*blocks).eval()


class ScaledAdapter(nn.Module):
    """ZeroI2V's linear adapter: ``x + up(down(x)) * scale``."""

    def __init__(self, d: int, r: int, scale: float = 0.5):
        super().__init__()
        self.down, self.up, self.scale = nn.Linear(d, r), nn.Linear(r, d), scale

    def forward(self, x):
        return x + self.up(self.down(x)) * self.scale

    def affine(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` with ``adapter(x) = M x + c``, float64."""
        up, down = self.up.weight.to(F64), self.down.weight.to(F64)
        m = torch.eye(up.shape[0], dtype=F64) + self.scale * up @ down
        return m, self.scale * (up @ self.down.bias.to(F64) + self.up.bias.to(F64))


class ZeroI2VBlock(nn.Module):
    """A pre-norm block on ``nn.MultiheadAttention`` with ZeroI2V's adapters on the attention's
    input and output and before the MLP."""

    def __init__(self, d: int, heads: int, r: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.adapter_in, self.adapter_out, self.adapter_mlp = (ScaledAdapter(d, r) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.adapter_in(self.ln1(x))
        x = x + self.adapter_out(self.attn(h, h, h, need_weights=False)[0])
        return x + self.fc2(F.gelu(self.fc1(self.adapter_mlp(self.ln2(x)))))


class DeployZeroI2VBlock(nn.Module):
    """The block with its adapters and norm affines folded into the attention's in- and
    out-projections and fc1, as ZeroI2V's reparameterization leaves it."""

    def __init__(self, block: ZeroI2VBlock):
        super().__init__()
        d = block.fc1.in_features
        self.ln1, self.ln2 = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm(d, elementwise_affine=False)
        self.attn, self.fc1, self.fc2 = copy.deepcopy(block.attn), copy.deepcopy(block.fc1), copy.deepcopy(block.fc2)
        m, c = block.adapter_in.affine()
        g, b = block.ln1.weight.to(F64), block.ln1.bias.to(F64)
        w, bias = block.attn.in_proj_weight.to(F64), block.attn.in_proj_bias.to(F64)
        m_out, c_out = block.adapter_out.affine()
        wo, bo = block.attn.out_proj.weight.to(F64), block.attn.out_proj.bias.to(F64)
        m_mlp, c_mlp = block.adapter_mlp.affine()
        g2, b2 = block.ln2.weight.to(F64), block.ln2.bias.to(F64)
        w1, b1 = block.fc1.weight.to(F64), block.fc1.bias.to(F64)
        with torch.no_grad():
            self.attn.in_proj_weight.copy_(w @ m * g)
            self.attn.in_proj_bias.copy_(w @ (m @ b + c) + bias)
            self.attn.out_proj.weight.copy_(m_out @ wo)
            self.attn.out_proj.bias.copy_(m_out @ bo + c_out)
            self.fc1.weight.copy_(w1 @ m_mlp * g2)
            self.fc1.bias.copy_(w1 @ (m_mlp @ b2 + c_mlp) + b1)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


# ----------------------------------------------------------------------------- RepNeXt-style net
# RepNeXt's idiom (multi-scale depthwise mixers: a square kernel, rectangular ones, a dilated 2x2
# and 1xk -> kx1 pairs with no norm between, summed; at stride 2 the pair strides (1, 2) then
# (2, 1)), channel chunks mixed at three scales beside an identity chunk, a BN after the mixer,
# a 1x1 conv-BN MLP and the residual; the reference folds each mixer into one depthwise conv by
# hand and keeps the norms, as the paper's own fuse() does.

def _dw(c: int, k: Tuple[int, int], stride=(1, 1), dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    pad = tuple(dilation * (n - 1) // 2 for n in k)
    return nn.Conv2d(c, c, k, stride, pad, dilation, groups=c, bias=bias)


class MultiScaleMixer(nn.Module):
    """``square(x) + rects(x) + dilated 2x2(x) + pairs(x)``: every term a depthwise map of ``x``."""

    def __init__(self, c: int, k: int, stride: int = 1):
        super().__init__()
        s = (stride, stride)
        self.square = _dw(c, (k, k), s)
        self.rects = nn.ModuleList([_dw(c, (k - 2, k - 4), s), _dw(c, (k - 4, k - 2), s)] if k >= 5 else [])
        self.dilated = nn.Conv2d(c, c, 2, stride, 1, 2, groups=c)
        self.pairs = nn.ModuleList(nn.Sequential(_dw(c, (1, n), (1, stride), bias=False), _dw(c, (n, 1), (stride, 1), bias=False))
                                   for n in ((k, k - 2) if k >= 5 else (k,)))

    def forward(self, x):
        out = self.square(x) + self.dilated(x)
        for conv in self.rects:
            out = out + conv(x)
        for pair in self.pairs:
            out = out + pair(x)
        return out


class RepNeXtStyleBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        q = c // 4
        self.small, self.medium = MultiScaleMixer(q, 3), MultiScaleMixer(q, 7)
        self.large = nn.Sequential(_dw(q, (1, 11)), _dw(q, (11, 1)))
        self.norm = nn.BatchNorm2d(c)
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.GELU(),
                                 nn.Conv2d(2 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        i, s, m, l = torch.chunk(x, 4, dim=1)
        mixed = torch.cat((i, self.small(s), self.medium(m), self.large(l)), dim=1)
        return x + self.mlp(self.norm(mixed))


class RepNeXtStyleDown(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.small, self.medium = MultiScaleMixer(c, 3, stride=2), MultiScaleMixer(c, 7, stride=2)
        self.norm = nn.BatchNorm2d(2 * c)

    def forward(self, x):
        return self.norm(torch.cat((self.small(x), self.medium(x)), dim=1))


def _placed(conv: nn.Conv2d, k: int) -> torch.Tensor:
    """A depthwise conv's kernel as a centred ``k x k`` one (a dilated kernel spread out)."""
    w = conv.weight.to(F64)
    d = conv.dilation[0]
    if d > 1:
        spread = w.new_zeros(w.shape[:2] + tuple(d * (n - 1) + 1 for n in w.shape[2:]))
        spread[:, :, ::d, ::d] = w
        w = spread
    ph, pw = (k - w.shape[2]) // 2, (k - w.shape[3]) // 2
    return F.pad(w, (pw, pw, ph, ph))


def deploy_mixer(mixer: MultiScaleMixer) -> nn.Conv2d:
    """One depthwise conv: the kernels summed at the square's size, each 1xk -> kx1 pair as the
    outer product of its two kernels (no bias between)."""
    k = mixer.square.kernel_size[0]
    terms = [mixer.square, mixer.dilated, *mixer.rects]
    w = sum(_placed(t, k) for t in terms)
    for first, second in mixer.pairs:
        outer = second.weight.to(F64)[:, :, :, 0:1] * first.weight.to(F64)[:, :, 0:1, :]
        w = w + F.pad(outer, [(k - outer.shape[-1]) // 2] * 2 + [(k - outer.shape[-2]) // 2] * 2)
    return merged_conv([(w, sum(t.bias.to(F64) for t in terms))], mixer.square)


class DeployRepNeXtStyleBlock(nn.Module):
    def __init__(self, block: RepNeXtStyleBlock):
        super().__init__()
        self.small, self.medium = deploy_mixer(block.small), deploy_mixer(block.medium)
        self.large, self.norm, self.mlp = copy.deepcopy(block.large), copy.deepcopy(block.norm), copy.deepcopy(block.mlp)

    def forward(self, x):
        i, s, m, l = torch.chunk(x, 4, dim=1)
        return x + self.mlp(self.norm(torch.cat((i, self.small(s), self.medium(m), self.large(l)), dim=1)))


class DeployRepNeXtStyleDown(nn.Module):
    def __init__(self, down: RepNeXtStyleDown):
        super().__init__()
        self.small, self.medium, self.norm = deploy_mixer(down.small), deploy_mixer(down.medium), copy.deepcopy(down.norm)

    def forward(self, x):
        return self.norm(torch.cat((self.small(x), self.medium(x)), dim=1))


class RepNeXtStyleNet(nn.Module):
    def __init__(self, widths=(32, 64), depth: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.GELU())
        layers = []
        for i, c in enumerate(widths):
            if i:
                layers.append(RepNeXtStyleDown(widths[i - 1]))
            layers += [RepNeXtStyleBlock(c) for _ in range(depth)]
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return NetOutput(self.head(self.layers(self.stem(x)).mean((2, 3))))


def deploy_repnext(net: RepNeXtStyleNet) -> RepNeXtStyleNet:
    out = copy.deepcopy(net)
    out.layers = nn.Sequential(*[DeployRepNeXtStyleBlock(m) if isinstance(m, RepNeXtStyleBlock) else
                                 DeployRepNeXtStyleDown(m) for m in net.layers])
    return out.eval()


def repnext_case(quick: bool) -> Case:
    widths, depth = ((16, 32), 1) if quick else ((64, 128, 256), 2)
    model = randomized(RepNeXtStyleNet(widths, depth), scale=0.05)
    sizes = ((2, 32), (3, 40), (1, 32)) if quick else ((2, 64), (3, 80), (1, 160))
    return Case(model, deploy_repnext(model), "RepNeXt's fuse, by hand", image_args, lambda out: out.logits, *sizes)


def paper_vit_case(kind: str, quick: bool) -> Case:
    """Weights moved off their init by 0.02 (trained ViT weights' scale: larger, the attention's
    softmax saturates and the model's own float32 rounding moves its output by 1e-3)."""
    d, heads, depth = (32, 4, 2) if quick else (384, 6, 4)
    if kind == "repavit":
        model = randomized(nn.Sequential(*[m for _ in range(depth)
                                           for m in (RePaViTAttention(d, heads), RePaViTMlp(d))]), scale=0.02)
        reference, name = deploy_repavit(model), "the paper's RePaMlp"
    else:
        model = randomized(nn.Sequential(*[ZeroI2VBlock(d, heads, 8) for _ in range(depth)]), scale=0.02)
        reference, name = nn.Sequential(*[DeployZeroI2VBlock(b) for b in model]).eval(), "ZeroI2V's merge"

    def make(batch, length):
        return (torch.randn(batch, length, d, generator=torch.Generator().manual_seed(batch * 1000 + length)),), {}

    sizes = ((2, 9), (3, 13), (1, 17)) if quick else ((2, 65), (3, 50), (1, 197))
    return Case(model, reference, name, make, lambda out: out, *sizes)


# ----------------------------------------------------------------------------- the models

@dataclass
class Case:
    """One benchmark row: how to build it, its inputs, and its reference conversion."""
    model: nn.Module
    reference: nn.Module
    reference_name: str
    make_inputs: Callable[[int, int], Tuple[tuple, Dict[str, Any]]]  # (batch, size) -> (args, kwargs)
    output: Callable[[Any], torch.Tensor]  # the tensor compared
    example: Tuple[int, int]  # (batch, size) compile example
    check: Tuple[int, int]  # another batch and size: the exactness check
    timed: Tuple[int, int]  # the latency input
    check_note: str = ""


def token_inputs(vocab: int):
    def make(batch, length):
        g = torch.Generator().manual_seed(batch * 1000 + length)
        return (), {"input_ids": torch.randint(0, vocab, (batch, length), generator=g),
                    "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    return make


def image_kwargs(size: int):
    def make(batch, _):
        g = torch.Generator().manual_seed(batch)
        return (), {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    return make


def image_args(batch, size):
    return (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch * 1000 + size)),), {}


def hf_config(name: str, quick: bool):
    import transformers
    d, layers, heads, ffn, vocab = (32, 2, 4, 64, 50) if quick else (128, 4, 4, 512, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "bert":
            return transformers.BertModel(transformers.BertConfig(
                hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                vocab_size=vocab, max_position_embeddings=256)), vocab
        if name == "vit":
            image, patch = (16, 4) if quick else (64, 8)
            return transformers.ViTModel(transformers.ViTConfig(
                hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn,
                image_size=image, patch_size=patch)), image
        if name == "gpt2":
            return transformers.GPT2Model(transformers.GPT2Config(
                n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=256, use_cache=False,
                bos_token_id=0, eos_token_id=0)), vocab
    raise KeyError(name)


def lora_targets(name: str, model: nn.Module) -> List[str]:
    if name == "gpt2":
        return ["c_attn", "c_proj"]
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return [t for t in ("q_proj", "v_proj", "query", "value") if t in names]  # ViT in transformers 5: q_proj/v_proj


def hf_case(name: str, lora: bool, quick: bool) -> Case:
    base, size = hf_config(name, quick)
    if lora:
        import peft
        config = peft.LoraConfig(r=4 if quick else 8, lora_alpha=16, target_modules=lora_targets(name, base),
                                 lora_dropout=0.1, fan_in_fan_out=name == "gpt2")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = randomized(peft.get_peft_model(base, config))
            reference, reference_name = copy.deepcopy(model).merge_and_unload().eval(), "merge_and_unload"
    else:
        model = randomized(base)
        reference, reference_name = model, "none (the model)"
    if name == "vit":
        make, note = image_kwargs(size), "other batch only"
        example, check, timed = (2, 0), (3, 0), (1, 0)
    else:
        make, note = token_inputs(size), ""
        example, check, timed = ((2, 7), (3, 11), (1, 16)) if quick else ((2, 32), (3, 45), (1, 128))
    return Case(model, reference, reference_name, make, lambda out: out.last_hidden_state,
                example, check, timed, note)


def library_case(kind: str, quick: bool) -> Case:
    if kind == "repvgg":
        widths = [(8, 8, 1), (8, 16, 2), (16, 16, 1)] if quick else \
            [(32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2), (128, 128, 1)]
        model = randomized(library_repvgg(widths), scale=0.1)
    else:
        widths = [(8, 8, 1), (8, 16, 2)] if quick else [(32, 64, 1), (64, 64, 2), (64, 128, 1), (128, 128, 1)]
        model = randomized(library_mobileone(widths, branches=2 if quick else 3), scale=0.1)
    sizes = ((2, 16), (3, 20), (1, 16)) if quick else ((2, 32), (3, 48), (1, 96))
    return Case(model, deploy(model), "hand-written deploy", image_args, lambda out: out.logits, *sizes)


MODELS: Dict[str, Callable[[bool], Case]] = {
    "bert": lambda q: hf_case("bert", False, q),
    "bert-lora": lambda q: hf_case("bert", True, q),
    "vit": lambda q: hf_case("vit", False, q),
    "vit-lora": lambda q: hf_case("vit", True, q),
    "gpt2": lambda q: hf_case("gpt2", False, q),
    "gpt2-lora": lambda q: hf_case("gpt2", True, q),
    "repvgg-lib": lambda q: library_case("repvgg", q),
    "mobileone-lib": lambda q: library_case("mobileone", q),
    "repnext-style": repnext_case,
    "repavit-paper": lambda q: paper_vit_case("repavit", q),
    "zeroi2v-mha": lambda q: paper_vit_case("zeroi2v", q),
}


# ----------------------------------------------------------------------------- one row

def bench_model(name: str, args) -> Dict[str, Any]:
    case = MODELS[name](args.quick)
    model, reference = case.model, case.reference
    ex_args, ex_kwargs = case.make_inputs(*case.example)

    start = time.perf_counter()
    fused = repc.compile(model, ex_args, ex_kwargs)  # the default: the model's own class where it applies
    compile_s = time.perf_counter() - start
    report = fused.repc_report
    # after repc.compile: it registered the dataclass output with pytree, as export needs
    start = time.perf_counter()
    program = export_alone(model, ex_args, ex_kwargs)
    export_s = time.perf_counter() - start
    exported = program.module()  # the original as torch.export runs it: unfused, no Python of the model's

    before = exported_counts(model, ex_args, ex_kwargs)
    after = op_counts(fused) if isinstance(fused, fx.GraphModule) else exported_counts(fused, ex_args, ex_kwargs)
    ref = before if reference is model else exported_counts(reference, ex_args, ex_kwargs)

    ck_args, ck_kwargs = case.make_inputs(*case.check)
    with torch.no_grad():
        want = case.output(model(*ck_args, **ck_kwargs))
        err = rel_error(case.output(fused(*ck_args, **ck_kwargs)), want)
        ref_err = rel_error(case.output(reference(*ck_args, **ck_kwargs)), want)
    if ref_err > EXACT:  # the reference must itself be the model, or the comparison means nothing
        raise SystemExit(f"{name}: the reference ({case.reference_name}) deviates from the model by {ref_err:.2e}")

    t_args, t_kwargs = case.make_inputs(*case.timed)
    forms = {"original": model, "repc": fused, "exported": lambda *a, **k: exported(a, k)}
    if reference is not model:
        forms["reference"] = reference
    with torch.inference_mode():
        exact_export = rel_error(case.output(exported(t_args, t_kwargs)), case.output(model(*t_args, **t_kwargs)))
        if exact_export > EXACT:
            raise SystemExit(f"{name}: torch.export's module deviates from the model by {exact_export:.2e}")
        calls = args.calls
        if calls is None:  # about 5 ms of the original per round
            once = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(*t_args, **t_kwargs)
                once.append(time.perf_counter() - t0)
            calls = max(1, min(50, int(0.005 / max(min(once), 1e-6))))
        lat = common.interleaved_medians({k: (lambda m=m: m(*t_args, **t_kwargs)) for k, m in forms.items()},
                                         args.rounds, calls)
    ms = {k: v.median * 1e3 for k, v in lat.items()}
    ms.setdefault("reference", ms["original"])
    best = {k: v.best * 1e3 for k, v in lat.items()}
    best.setdefault("reference", best["original"])
    timed_shape = [list(v.shape) for v in list(t_args) + list(t_kwargs.values()) if isinstance(v, torch.Tensor)][0]
    return {
        "model": name, "front_end": report.front_end, "output": report.output,
        "capture": "in parts" if "parts" in report.front_end else "whole",
        "not_captured": [f"{s.path}: {s.reason}" for s in report.skipped],
        "front_ends_declined": dict(getattr(report, "front_ends_declined", {})),  # e.g. why not torch.export
        "verified": bool(report.verification and report.verification.ok), "rolled_back": report.rolled_back,
        "rewrites": len(report.rewrites),
        "heavy": {"before": before[0], "after": after[0], "reference": ref[0]},
        "norms": {"before": before[1], "after": after[1], "reference": ref[1]},
        "reference": case.reference_name,
        "check_input": list(case.check), "check_note": case.check_note,
        "max_rel_error": err, "exact": err < EXACT,
        "compile_s": compile_s, "export_s": export_s,
        "timed_input": timed_shape, "ms": ms, "best_ms": best,
        "iqr_rel": {k: v.spread for k, v in lat.items()},
        "repc_over_reference": common.ratio(ms["repc"], ms["reference"]),
        "repc_over_original": common.ratio(ms["repc"], ms["original"]),
        "repc_over_exported": common.ratio(ms["repc"], ms["exported"]),
        "best_repc_over_reference": common.ratio(best["repc"], best["reference"]),
        "rounds": args.rounds, "calls_per_round": calls,
    }


def warm_up() -> None:
    """One export and one compile of a tiny net first, so that the first row's times do not
    include torch.export's and repc's one-time start-up (imports, caches)."""
    net = randomized(nn.Sequential(ConvNorm(3, 4, 3), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    export_alone(net, (x,), {})
    repc.compile(net, (x,), graph=True)


def render(results: List[Dict[str, Any]]) -> str:
    """A markdown table."""
    headers = ["model", "front end", "capture", "heavy ops before → repc (reference)",
               "norms before → repc (reference)", "reference", "max rel err", "exact",
               "repc.compile s", "torch.export s", "input", "original ms", "exported ms", "reference ms",
               "repc ms", "repc/reference", "best repc/reference", "repc/exported", "max IQR"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        h, n = r["heavy"], r["norms"]
        mark = lambda c: f"{c['before']} → {c['after']} ({c['reference']})" + (" **more**" if c["after"] > c["reference"] else "")
        exact = ("yes" if r["exact"] else "**no**") + (f" ({r['check_note']})" if r["check_note"] else "")
        cells = [r["model"], r["front_end"], r["capture"], mark(h), mark(n), r["reference"],
                 f"{r['max_rel_error']:.1e}", exact, f"{r['compile_s']:.2f}", f"{r['export_s']:.2f}",
                 "×".join(map(str, r["timed_input"])),
                 f"{r['ms']['original']:.3f}", f"{r['ms']['exported']:.3f}", f"{r['ms']['reference']:.3f}",
                 f"{r['ms']['repc']:.3f}", common.fmt_ratio(r["repc_over_reference"]),
                 common.fmt_ratio(r["best_repc_over_reference"]), common.fmt_ratio(r["repc_over_exported"]),
                 f"{max(r['iqr_rel'].values()) * 100:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                   help="models to run (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=31, help="interleaved rounds; the median is reported (default 31)")
    p.add_argument("--calls", type=int, default=None, help="calls per model per round (default: about 5 ms worth)")
    p.add_argument("--quick", action="store_true", help="tiny models, 3 rounds of 1 call (smoke test)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 3, 1
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.calls is not None and args.calls < 1:
        p.error("--calls must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    warm_up()
    results = []
    for name in args.models:
        results.append(bench_model(name, args))
        print(f"{name}: done ({results[-1]['compile_s']:.1f} s to compile)", file=sys.stderr, flush=True)
    print(f"models vs their own conversion; latency: median of {args.rounds} interleaved rounds; "
          f"{common.machine_note(args.threads)}; {time.strftime('%Y-%m-%d')}")
    print()
    print(render(results))
    failed = [r["model"] for r in results if not (r["exact"] and r["verified"])]
    if failed:
        print(f"\nnot exact or not verified: {', '.join(failed)}")
    if args.json:
        common.write_json(args.json, {"benchmark": "models", "machine": common.machine_note(args.threads),
                                      "threads": args.threads, "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
