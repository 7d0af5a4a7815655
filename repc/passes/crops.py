"""Preparation pass: a spatial crop that only convolutions read, written as negative padding.

ACNet and DBB implementations align a ``1x3`` branch with a ``3x3`` one by cropping its input
(``x[:, :, 1:-1, :]``, a ``CropLayer``) instead of padding less.  :func:`crops_as_padding`
rewrites such a crop -- one contiguous slice on one spatial axis of an ``(N, C, *spatial)``
value, every reader a convolution of that many spatial axes -- as ``F.pad`` with the negative
amounts, which is the same crop: ``F.pad(x, (-1, -1))`` drops one entry on each side.  The
vocabulary reads it as a zero-padding conv with negative padding, so the crop composes into
the conv that reads it, and branches cropped differently share one kernel grid.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph_predicates import call_target
from .inplace import VIEW_MUTATED

_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def crops_as_padding(gm: fx.GraphModule) -> int:
    """Rewrite spatial crops read only by convolutions as negative ``F.pad`` (reads the
    recorded ``tensor_meta`` shapes); returns how many."""
    graph = gm.graph
    modules = None
    count = 0
    for node in list(graph.nodes):
        if call_target(node) is not operator.getitem or not node.users:
            continue
        if node.meta.get(VIEW_MUTATED) or (isinstance(node.args[0], fx.Node) and node.args[0].meta.get(VIEW_MUTATED)):
            continue  # a view of a value written in place later: a copy taken here would miss the write
        shape = getattr(node.args[0].meta.get("tensor_meta"), "shape", None) if isinstance(node.args[0], fx.Node) else None
        crop = _spatial_crop(node.args[1], tuple(shape)) if shape is not None else None
        if crop is None:
            continue
        modules = modules if modules is not None else dict(gm.named_modules())
        spatial = len(shape) - 2
        if not all(_conv_dims(user, modules) == spatial and user.args[0] is node for user in node.users):
            continue
        axis, lo, hi = crop
        pad = [0, 0] * spatial
        at = 2 * (len(shape) - 1 - axis)  # F.pad lists the last axis first
        pad[at], pad[at + 1] = -lo, -hi
        with graph.inserting_before(node):
            padded = graph.call_function(F.pad, (node.args[0], pad))
        padded.meta.update(node.meta)
        node.replace_all_uses_with(padded)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def _spatial_crop(index, shape: Tuple[int, ...]) -> Optional[Tuple[int, int, int]]:
    """``(axis, cut before, cut after)`` if ``x[index]`` keeps one contiguous range of one
    spatial axis (axis 2 on) of a value of ``shape`` and everything else, cutting the same
    amounts at every size (``1:-1``, ``2:``), else None."""
    if len(shape) < 3:
        return None
    if not isinstance(index, tuple):
        index = (index,)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - len(index) + 1) + index[at + 1:]
    if len(index) > len(shape) or not all(isinstance(i, slice) for i in index):
        return None
    cut = [(axis, s) for axis, s in enumerate(index) if s != slice(None)]
    if len(cut) != 1:
        return None
    axis, s = cut[0]
    if axis < 2 or s.step not in (None, 1) or not all(isinstance(v, (int, type(None))) for v in (s.start, s.stop)):
        return None
    if (s.start or 0) < 0 or (s.stop is not None and s.stop >= 0):
        return None  # a cut that depends on the size (an end counted from the start, a start from the end)
    start, stop, _ = s.indices(shape[axis])
    if stop <= start:
        return None
    return axis, start, shape[axis] - stop


def _conv_dims(node: fx.Node, modules) -> Optional[int]:
    """How many spatial axes the convolution ``node`` has (zero padding mode only), or None
    if ``node`` is not a convolution of its first argument."""
    if node.op == "call_module":
        mod = modules.get(node.target)
        dims = _CONV_MODULES.get(type(mod))
        return dims if dims is not None and mod.padding_mode == "zeros" and len(node.args) == 1 else None
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS and node.args:
        return _CONV_FUNCTIONS[node.target]
    return None

