"""Preparation pass: in-place ops made out of place.

:func:`functionalize_inplace` turns ``x.mul_(g)``, ``x += y``, ``relu(inplace=True)``... into
out-of-place ops with later readers rewired (of the value and of the names it has under an eval
``nn.Identity`` or ``detach``); a write through a view stays in place, and every alias of it is
tagged :data:`VIEW_MUTATED` (the matcher leaves those values where they are).
Which nodes write in place is :func:`repc.graph_predicates.in_place_kind`.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph_predicates import (IDENTITY_MODULES, alias_base, in_place_kind, inplace_position, may_alias,
                                out_of_place_target, target_name)


VIEW_MUTATED = "repc_view_mutated"  # node.meta key: this value is mutated in place through an alias


def functionalize_inplace(gm: fx.GraphModule, values: Optional[Dict[fx.Node, Any]] = None) -> int:
    """Make in-place ops out-of-place, rewiring later readers of the mutated value to the result.

    An in-place op ``m`` on ``v`` makes every reader of ``v`` that runs after ``m`` see ``m``'s
    output; with those readers pointed at ``m``, ``m`` can compute out of place and the graph is
    a pure data-flow graph again.  Where ``v`` has other names that are the same tensor (it
    went through an eval ``nn.Identity``, as timm's ``attn`` before its in-place ReLU), the later
    readers of every name are pointed at ``m``.  When ``v`` is a view of another value, or has
    views, the mutation reaches values that are not ``v``: such an op stays in place and every
    alias of it is marked ``VIEW_MUTATED`` (the matcher leaves those values, and their readers,
    where they are).  Runs on repc's own copy of the model only.  Returns how many ops were changed.

    ``values``, the nodes' values on the example where recorded: a cast whose value there has
    another dtype or device than its input is a copy, not a name of it (PEFT's LoRA casting its
    float32 sum back to bfloat16 before the caller adds into it in place).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    modules = dict(gm.named_modules())
    values = values or {}

    def aliasing(n: fx.Node) -> bool:
        return may_alias(n, modules) and not _cast_to_a_copy(n, values)
    changed = 0
    for node in list(gm.graph.nodes):
        kind = in_place_kind(node, modules)
        if kind is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        replacement = out_of_place_target(node) if kind in ("operator", "method", "function") else None
        stays = kind in ("setitem", "schema") or (kind in ("operator", "method", "function") and replacement is None)
        aliased = aliasing(mutated) or any(aliasing(u) for u in mutated.users)
        aliases = _aliases(mutated, aliasing) if aliased else [mutated]
        if stays or (aliased and not _whole_aliases(aliases, modules)):
            for alias in aliases:
                alias.meta[VIEW_MUTATED] = True
            node.meta[VIEW_MUTATED] = True
            continue
        if kind == "module":
            # the graph's leaves are the user's own modules: swap in an out-of-place copy
            out_of_place = copy.copy(modules[node.target])
            out_of_place.inplace = False
            parent, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, out_of_place)
            modules[node.target] = out_of_place
        elif kind == "flag":
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
            else:
                at = inplace_position(node.target)
                node.args = node.args[:at] + (False,) + node.args[at + 1:]
        else:
            node.target = replacement
        changed += 1
        for alias in aliases:  # (the same tensor under other names: each later reader sees the write)
            for user in list(alias.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(alias, node)
    if changed:
        gm.recompile()  # keep gm's forward in step with its graph
    return changed


_WHOLE_ALIAS_NAMES = frozenset({"identity", "detach", "alias"})


def _whole_aliases(aliases: List[fx.Node], modules) -> bool:
    """Every alias but the base is the base tensor itself (an eval ``nn.Identity`` or dropout,
    ``detach``: timm's ``attn = nn.Identity()`` before an in-place ReLU), and the base is
    computed by the graph (not an input or a parameter, whose write the caller would see): a
    write into any of them is then a new value that every later reader of any of them reads."""
    base = aliases[0]
    if base.op in ("placeholder", "get_attr"):
        return False
    for alias in aliases[1:]:
        if alias.op == "call_module":
            mod = modules.get(alias.target)
            if not (isinstance(mod, nn.Identity) or (isinstance(mod, IDENTITY_MODULES) and not mod.training)):
                return False
        elif not (alias.op in ("call_function", "call_method") and target_name(alias) in _WHOLE_ALIAS_NAMES):
            return False
    return True


def _aliases(node: fx.Node, aliasing: Callable[[fx.Node], bool]) -> List[fx.Node]:
    """``node``, the value it is a view of, and every view taken of those."""
    out, todo = [], [alias_base(node, aliasing)]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(u for u in n.users if aliasing(u) and u.args and u.args[0] is n)
    return out


_CASTS = frozenset({"float", "double", "half", "bfloat16", "to", "type", "type_as"})


def _cast_to_a_copy(node: fx.Node, values: Dict[fx.Node, Any]) -> bool:
    """A cast whose value on the example has another dtype or device than its input: a copy."""
    if node.op not in ("call_function", "call_method") or target_name(node) not in _CASTS or not node.args:
        return False
    out, source = values.get(node), values.get(node.args[0])
    return isinstance(out, torch.Tensor) and isinstance(source, torch.Tensor) and \
        (out.dtype != source.dtype or out.device != source.device)
