"""Small graph edits the preparation passes share."""

from __future__ import annotations

from torch import Tensor


def buffer_node(gm, graph, value: Tensor, dtype):
    """A get_attr of ``value`` (cast to ``dtype``) registered on ``gm`` under a fresh name."""
    name, i = "_repc_constant", 0
    while hasattr(gm, f"{name}_{i}"):
        i += 1
    gm.register_buffer(f"{name}_{i}", value.to(dtype).clone())
    return graph.get_attr(f"{name}_{i}")
