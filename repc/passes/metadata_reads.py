"""Preparation pass: reads of a value's dtype, device, rank or shape do not pin that value.

:func:`detach_metadata_reads` replaces dtype, device and rank reads of computed values by the
constants they are, and moves shape reads up to a value no region absorbs;
:func:`metadata_read` says which metadata a node reads.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, Optional

import torch
import torch.fx as fx

from ..meanings import AffineCall, Combine, Constant, GraphFacts
from ..ops import Conv, Elementwise, Linear
from ..vocabulary import constant_facts, describe


_METADATA_ATTRIBUTES = {"dtype", "device"}  # the same on every input (the model's dtype and device)

_SHAPE_READS = {"size", "dim", "ndimension"}  # methods; and the attributes "shape" and "ndim"

_RANK_READS = {"ndim", "dim", "ndimension"}


def detach_metadata_reads(gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> int:
    """Keep reads of a value's dtype, device or shape from pinning that value.

    ``result.dtype`` (peft's LoRA) becomes the dtype itself, and ``y.ndim`` / ``y.dim()`` (a
    library norm's rank assert on a conv's output) the rank, except for an input's.
    ``x.shape`` / ``x.size()`` (timm's ``B, N, C = x.shape`` after a LayerNorm) is moved up the
    elementwise maps and sums that computed ``x`` with its shape, when it arrives at a value no
    region absorbs (the norm's core): ``x`` is then read only by what consumes its values and
    can be folded away.  Export's ``_assert_tensor_metadata`` on a computed value (left where a
    ``.to(dtype)`` was a no-op: peft's casts around LoRA and IA3) checks only what follows the
    weights, and is dropped.  Runs on repc's own copy; returns how many reads moved or dropped.
    """
    graph = gm.graph
    facts = None
    count = 0
    for node in list(graph.nodes):
        if _is_metadata_assert(node):
            # export's check that a ``.to(dtype)`` it elided changed nothing: on a computed value
            # (not an input) it checks what follows the weights, and would pin the value
            graph.erase_node(node)
            count += 1
            continue
        target = metadata_read(node)
        if target is None:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        if target in _METADATA_ATTRIBUTES | _RANK_READS:
            value = values.get(node)
            # an input's dtype or rank may differ from call to call; everything else follows the
            # weights (a dtype) or does not depend on the sizes (a rank: a norm's ``x.ndim == 4``)
            if isinstance(value, (torch.dtype, torch.device, int)) and not isinstance(value, bool) \
                    and source.op != "placeholder":
                for user in list(node.users):
                    user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
                    user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
                graph.erase_node(node)
                count += 1
            continue
        facts = facts or constant_facts(gm, values)
        start = source
        while _foldable_into_readers(source, facts):
            earlier = _same_shape_input(source, facts)
            if earlier is None:
                break
            source = earlier
        if source is not start and not _has_affine_meaning(source, facts):
            # moved onto a value no region absorbs (a norm's core, an activation, an input);
            # a conv or linear output would be pinned by the read instead.  Never past a value
            # several ops read (it stays a source): a region would read the shape of a value
            # beyond its sources, and its check at another size would see the example's shape
            node.replace_input_with(start, source)
            count += 1
    if count:
        count += _fold_literal_checks(graph)
        graph.lint()
        gm.recompile()
    return count


_LITERAL_OPS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.not_,
                operator.and_, operator.or_}
_ASSERTS = {torch._assert}


def _fold_literal_checks(graph: fx.Graph) -> int:
    """Comparisons whose operands are now literals (``4 == 4``, a rank read made a constant)
    become their value, and an assert of a literal True goes: a library norm's rank check would
    else run on every call of the fused model.  Returns how many nodes went."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs or \
                not all(isinstance(a, (bool, int, float, str)) for a in node.args):
            continue  # (only Python literals: a node or a tensor stays as it is)
        if node.target in _LITERAL_OPS:
            value = node.target(*node.args)
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)
            graph.erase_node(node)
            count += 1
        elif node.target in _ASSERTS and node.args and node.args[0] is True and not node.users:
            graph.erase_node(node)
            count += 1
    return count


def _foldable_into_readers(node: fx.Node, facts: GraphFacts) -> bool:
    """The ops that read ``node``'s values (not only its shape, dtype or device) can take it
    into their regions: there is one, or all are conv or linear maps of it."""
    readers = [u for u in node.users if metadata_read(u) is None]
    if len(readers) <= 1:
        return True
    for reader in readers:
        try:
            meaning = describe(reader, facts)
        except Exception:
            return False
        if not (isinstance(meaning, AffineCall) and meaning.input is node and isinstance(meaning.op, (Conv, Linear))):
            return False
    return True


def _has_affine_meaning(node: fx.Node, facts: GraphFacts) -> bool:
    try:
        return not isinstance(describe(node, facts), Constant)
    except Exception:
        return False


def _is_metadata_assert(node: fx.Node) -> bool:
    """``aten._assert_tensor_metadata(v, dtype=..., device=...)`` on a value other than an input."""
    return node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default \
        and bool(node.args) and isinstance(node.args[0], fx.Node) and node.args[0].op != "placeholder"


def metadata_read(node: fx.Node) -> Optional[str]:
    """"dtype" / "device" / "shape" ... when ``node`` reads that of its first argument, else None."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in _METADATA_ATTRIBUTES | {"shape", "ndim"}:
        return node.args[1]
    if node.op == "call_method" and node.target in _SHAPE_READS:
        return node.target
    return None


def _same_shape_input(node: fx.Node, facts: GraphFacts) -> Optional[fx.Node]:
    """The input of the elementwise map or sum that computes ``node``, when it has ``node``'s shape."""
    try:
        meaning = describe(node, facts)
    except Exception:
        return None
    if isinstance(meaning, AffineCall) and isinstance(meaning.op, Elementwise):
        candidate = meaning.input
    elif isinstance(meaning, Combine) and meaning.terms:
        candidate = meaning.terms[0][0]
    else:
        return None
    shape = facts.shape(node)
    return candidate if shape is not None and facts.shape(candidate) == shape else None
