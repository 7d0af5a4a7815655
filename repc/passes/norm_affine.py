"""Preparation pass: a norm's affine parameters as a separate elementwise map.

:func:`split_norm_affine` writes ``LayerNorm`` / ``GroupNorm`` with affine parameters as the
bare norm (tagged :data:`NORM_CORE`) followed by ``* w + b`` (tagged :data:`NORM_AFFINE`), so
the affine folds into the next conv or linear; the collapse pass puts an unabsorbed affine
back into its norm.
"""

from __future__ import annotations

import operator

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph_predicates import fetch_attr
from ..vocabulary import bind
from .editing import buffer_node


NORM_CORE = "repc_norm_core"  # node.meta key: (function, normalized axes, where) of a norm without affine

NORM_AFFINE = "repc_norm_affine"  # node.meta key: the norm whose affine tail this node is


def split_norm_affine(gm: fx.GraphModule) -> int:
    """Write ``LayerNorm``/``GroupNorm`` with affine parameters as the bare norm then ``* w + b``.

    ``LN(x; w, b) = LN(x) * w + b`` (and per channel for GroupNorm): the affine tail is then an
    ordinary elementwise map that folds into the next linear or conv (RepQ-ViT's scales, LN
    affine into the following projection).  Where nothing absorbs it, the writer puts it back
    into the norm (see ``NORM_CORE``).  Runs on repc's own copy.  Returns how many were split.
    """
    modules = dict(gm.named_modules())
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        spec = None
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            mod = modules[node.target]
            if isinstance(mod, nn.LayerNorm) and mod.weight is not None:
                spec = (F.layer_norm, (list(mod.normalized_shape), None, None, mod.eps), mod.weight, mod.bias,
                        len(mod.normalized_shape), "last")
            elif isinstance(mod, nn.GroupNorm) and mod.affine:
                spec = (F.group_norm, (mod.num_groups, None, None, mod.eps), mod.weight, mod.bias, 1, "channel")
        elif node.op == "call_function" and node.target is F.layer_norm:
            b = bind(node.args[1:], node.kwargs, ["normalized_shape", "weight", "bias", "eps"],
                      {"weight": None, "bias": None, "eps": 1e-5})
            w, bias = b["weight"], b["bias"]
            if isinstance(w, fx.Node) and w.op == "get_attr" and (bias is None or isinstance(bias, fx.Node) and bias.op == "get_attr"):
                spec = (F.layer_norm, (list(b["normalized_shape"]), None, None, b["eps"]),
                        fetch_attr(gm, w.target), None if bias is None else fetch_attr(gm, bias.target),
                        len(b["normalized_shape"]), "last")
        if spec is None:
            continue
        fn, rest, weight, bias, naxes, where = spec
        x = node.args[0]
        meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        if meta is None:
            continue
        ndim = len(meta.shape)
        with graph.inserting_before(node):
            core = graph.call_function(fn, (x,) + tuple(rest))
            core.meta[NORM_CORE] = (fn, naxes, where)
            core.meta.update({k: v for k, v in node.meta.items() if k == "tensor_meta"})
            out = graph.call_function(operator.mul, (core, _constant_node(gm, graph, weight, ndim, where)))
            out.meta[NORM_AFFINE] = node.name
            if bias is not None:
                out = graph.call_function(operator.add, (out, _constant_node(gm, graph, bias, ndim, where)))
                out.meta[NORM_AFFINE] = node.name
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


def _constant_node(gm, graph, tensor, ndim, where):
    value = tensor.detach()
    if where == "channel":
        value = value.reshape((-1,) + (1,) * (ndim - 2))  # broadcast over the spatial axes of (N, C, *)
    return buffer_node(gm, graph, value, value.dtype)
