"""Values a model passes around that are neither tensors nor plain data: caches and the like.

transformers' decoders return their key/value cache (a ``DynamicCache``) with the logits and
update it in place in every layer.  ``torch.export`` takes no such object in an output, pytree
cannot flatten it, and a graph traced through a forward that updates one does not update it.

* :func:`is_opaque` -- a value pytree sees as a leaf that is not a tensor, a number, a string,
  ``None`` or a type; :func:`holds_state`, such a value that is no module or function (a cache).
* :func:`without_opaque` -- a model's output with such values set to ``None`` (what repc
  captures: the ops that compute the rest).
* :func:`object_state` -- such a value as the plain data of its attributes, nested objects
  included (a cache's per-layer keys and values), so that two of them compare by content.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

_PLAIN = (torch.Tensor, int, float, bool, str, complex, type(None), type, torch.dtype, torch.device)


def is_opaque(value: Any) -> bool:
    return not isinstance(value, _PLAIN)


def holds_state(value: Any) -> bool:
    """An opaque value a forward may update in place (a cache): not a module or a function,
    which a forward is given to call (PEFT's DoRA layer is given its LoRA layers)."""
    return is_opaque(value) and not isinstance(value, torch.nn.Module) and not callable(value)


def has_opaque(tree: Any) -> bool:
    """Whether a (nested) value holds an opaque leaf."""
    return any(is_opaque(leaf) for leaf in pytree.tree_leaves(tree))


def without_opaque(tree: Any) -> Any:
    return pytree.tree_map(lambda leaf: None if is_opaque(leaf) else leaf, tree)


def object_state(value: Any, depth: int = 4) -> Any:
    """``value``'s attributes as plain containers, recursively (``depth`` levels of objects):
    ``(type name, {attribute: state})`` for an object, lists, tuples and dicts item by item,
    everything else as it is.  Callables are left out (a bound method differs per object)."""
    if isinstance(value, (list, tuple)):
        return type(value)(object_state(v, depth) for v in value)
    if isinstance(value, dict):
        return {k: object_state(v, depth) for k, v in value.items()}
    if not is_opaque(value) or depth == 0 or not hasattr(value, "__dict__"):
        return value
    return (type(value).__qualname__, {k: object_state(v, depth - 1) for k, v in sorted(vars(value).items())
                                       if not callable(v) or isinstance(v, type)})
