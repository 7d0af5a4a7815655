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


def took_place_of(old, *new) -> None:
    """The ``new`` nodes compute what ``old`` did: they carry its module path (its
    ``nn_module_stack``), so that the module-preserving output places them where ``old`` was."""
    stack = old.meta.get("nn_module_stack")
    if stack:
        for node in new:
            node.meta["nn_module_stack"] = dict(stack)
