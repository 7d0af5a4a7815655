"""Layers written the way timm-like libraries write them, for tests and benchmarks of capture.

A BatchNorm subclass that asserts its input's rank and calls the functional form, timm's
``drop_path`` (an identity in eval), and a conv-norm pair built from them.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class RankCheckedBatchNorm(nn.BatchNorm2d):
    """A library's norm layer: asserts its input's rank, then calls the functional form."""

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected a 4-d input, got {x.ndim}")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    if drop_prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - drop_prob)
    return x * keep / (1 - drop_prob)


class ConvNorm(nn.Sequential):
    """A bias-free conv (padding ``k // 2``) then a :class:`RankCheckedBatchNorm`."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), RankCheckedBatchNorm(cout))
