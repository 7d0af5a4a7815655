"""Built-in training-form example networks, written from the papers' descriptions.

They are used by the demo (``python -m repc.demo``), the CLI's ``--example`` and the
benchmarks.  Every BatchNorm gets random running statistics so that folding errors show.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.5 + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 2 - 1)
    return model


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1, dilation=1, nd=2):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
    return nn.Sequential(conv(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False), bn(cout))


class RepVGGBlock(nn.Module):
    """RepVGG: 3x3 conv-BN + 1x1 conv-BN + BN identity (when shapes allow), summed, then ReLU."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.pointwise = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class MobileOneBlock(nn.Module):
    """MobileOne: k over-parameterized k x k conv-BN branches + 1x1 conv-BN + BN skip, summed."""

    def __init__(self, cin, cout, kernel=3, stride=1, groups=1, branches=3):
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(cin, cout, kernel, stride, kernel // 2, groups) for _ in range(branches))
        self.scale = conv_bn(cin, cout, 1, stride, 0, groups) if kernel > 1 else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        out = 0
        for b in self.branches:
            out = out + b(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.skip is not None:
            out = out + self.skip(x)
        return self.act(out)


class MobileOneUnit(nn.Module):
    """A MobileOne unit: depthwise 3x3 block then pointwise 1x1 block."""

    def __init__(self, cin, cout, stride=1, branches=3):
        super().__init__()
        self.depthwise = MobileOneBlock(cin, cin, 3, stride, groups=cin, branches=branches)
        self.pointwise = MobileOneBlock(cin, cout, 1, 1, branches=branches)

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class DiverseBranchBlock(nn.Module):
    """DBB: k x k conv-BN, 1x1 conv-BN, 1x1 conv -> BN-and-pad -> k x k conv-BN, 1x1 conv -> BN-and-pad -> avg-pool-BN.

    BN-and-pad (the border filled with the BN's output for a zero input) is written as BN
    applied after zero padding, which computes exactly that; the k x k conv and the pool that
    follow it do not pad again.
    """

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        p = k // 2
        self.origin = conv_bn(cin, cout, k, stride, p)
        self.one = conv_bn(cin, cout, 1, stride, 0)
        self.seq = nn.Sequential(nn.Conv2d(cin, cin, 1, bias=False), nn.ZeroPad2d(p), nn.BatchNorm2d(cin),
                                 *conv_bn(cin, cout, k, stride, 0))
        self.avg = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.ZeroPad2d(p), nn.BatchNorm2d(cout),
                                 nn.AvgPool2d(k, stride, 0), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.origin(x) + self.one(x) + self.seq(x) + self.avg(x))


class ExampleNet(nn.Module):
    """A small training-form network: stem, RepVGG, DBB and MobileOne stages, linear head."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem = RepVGGBlock(3, width, stride=2)
        self.stage1 = nn.Sequential(RepVGGBlock(width, width), RepVGGBlock(width, width, groups=2))
        self.stage2 = nn.Sequential(DiverseBranchBlock(width, width), MobileOneUnit(width, 2 * width, stride=2))
        self.head = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.BatchNorm1d(2 * width), nn.Dropout(0.1),
                                  nn.Linear(2 * width, classes))

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def example_net(width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(ExampleNet(width), seed).eval()
