"""Values of a graph's nodes on the example inputs: what the matcher and the passes read.

:func:`record_values` runs the graph once (shape propagation that also keeps each node's
value); :class:`ValueRecorder` keeps recorded values right in graphs that still write in place;
:func:`update_values` brings values recorded before an edit up to date by running only the
nodes the edit added or changed, and those whose inputs it changed.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves, tree_map

from ..graph_predicates import writes_in_place
from ..verify.check import deviation, seeded_call


class ValueRecorder(ShapeProp):
    """Shape propagation that also keeps every node's value on the example inputs.

    In a graph that still writes in place (``x.mul_(g)`` through an alias), a later op can
    change a tensor already recorded: just before such a write, the recorded values that share
    the written tensor's storage are replaced by copies.
    """

    def __init__(self, gm):
        super().__init__(gm)
        self.values: Dict[fx.Node, Any] = {}
        modules = dict(gm.named_modules())
        self._writes = {n for n in gm.graph.nodes if writes_in_place(n, modules)
                        and n.args and isinstance(n.args[0], fx.Node)}
        self._by_storage: Dict[int, List[fx.Node]] = {}  # recorded tensors by storage, where writes exist

    def run_node(self, n):
        if n in self._writes:
            written = self.env.get(n.args[0])
            if isinstance(written, torch.Tensor):
                for node in self._by_storage.pop(_storage(written), []):
                    self.values[node] = tree_map(_copy_tensor, self.values[node])
        out = super().run_node(n)
        self.values[n] = out
        if self._writes:
            for leaf in torch.utils._pytree.tree_leaves(out):
                if isinstance(leaf, torch.Tensor):
                    self._by_storage.setdefault(_storage(leaf), []).append(n)
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _copy_tensor(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def record_values(gm: fx.GraphModule, example_inputs: Tuple[Any, ...]) -> Dict[fx.Node, Any]:
    """Every node's value (and ``tensor_meta``) on the example inputs."""
    # real tensors, even when called from inside a dynamo backend (no ambient fake mode)
    with torch._guards.tracing(None), torch.no_grad():
        recorder = ValueRecorder(gm)
        seeded_call(recorder.propagate, *example_inputs)  # (drawing at random as the checks' calls do)
    return recorder.values


def update_values(gm: fx.GraphModule, example_inputs: Tuple[Any, ...], values: Dict[fx.Node, Any],
                  edited: Iterable[fx.Node], before: Optional[Dict[fx.Node, Any]] = None) -> Dict[fx.Node, Any]:
    """``values``, recorded before an edit of ``gm``, made right again: the nodes ``edited`` (new,
    or whose target or arguments the edit changed) and the nodes without a value run, in graph
    order, on the values of their inputs; a node whose value they change (beyond float rounding)
    makes its readers run too.  ``before``: an edited node's ``(op, target, args, kwargs)`` before
    the edit, where it existed: one only rewired to inputs of the same values (a linear now
    reading a norm's split-off affine) keeps its value without running.  Where the graph writes
    in place, or an input is new, everything is recorded again (:func:`record_values`)."""
    nodes = list(gm.graph.nodes)
    todo = {n for n in edited} | {n for n in nodes if n not in values}
    before = before or {}
    modules = dict(gm.named_modules())
    if any(n.op == "placeholder" for n in todo) or any(
            writes_in_place(n, modules) and n.args and isinstance(n.args[0], fx.Node) for n in nodes):
        return record_values(gm, example_inputs)
    with torch._guards.tracing(None), torch.no_grad():
        recorder = ValueRecorder(gm)
        recorder.env = {n: values[n] for n in nodes if n in values and n not in todo}
        moved = set()  # nodes that had a value and now have another
        for node in nodes:
            if node.op == "output":
                continue
            inputs_moved = any(a in moved for a in node.all_input_nodes)
            if node not in todo and not inputs_moved:
                continue
            old = values.get(node, _MISSING)
            if old is not _MISSING and not inputs_moved and node in before and \
                    _rewired_alike(before[node], node, values, recorder.env):
                recorder.env[node] = old
                continue
            recorder.env[node] = recorder.run_node(node)
            if old is not _MISSING and not _same_value(old, recorder.env[node]):
                moved.add(node)
        out = {n: recorder.env[n] for n in nodes if n in recorder.env}
        output = next((n for n in reversed(nodes) if n.op == "output"), None)
        if output is not None:
            out[output] = torch.fx.node.map_arg(output.args[0], lambda n: out[n])
    return out


def _rewired_alike(old_call, node: fx.Node, old_values: Dict[fx.Node, Any], env: Dict[fx.Node, Any]) -> bool:
    """``node`` calls what it called before the edit, on inputs of the same values."""
    op, target, args, kwargs = old_call
    if op != node.op or target != node.target:
        return False

    def same_node(a: fx.Node, b: fx.Node) -> bool:
        return a is b or (a in old_values and b in env and _same_value(old_values[a], env[b]))

    return same_arguments((args, kwargs), (node.args, dict(node.kwargs)), same_node)


def same_arguments(a, b, same_node=lambda x, y: x is y) -> bool:
    """Two call arguments alike: containers item by item, nodes by ``same_node`` (identity by
    default), tensors and modules by identity, other values by equality."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_arguments(x, y, same_node) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_arguments(a[k], b[k], same_node) for k in a)
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        return same_node(a, b)
    if isinstance(a, (fx.Node, torch.Tensor, torch.nn.Module)) or isinstance(b, (fx.Node, torch.Tensor, torch.nn.Module)):
        return a is b
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return a is b


_MISSING = object()


def _same_value(a, b) -> bool:
    """The same value up to float rounding (the passes keep the function; a cast, a merged
    affine round differently): tensors of the same dtypes, at most 1e-5 apart relative to ``b``
    (:func:`repc.verify.check.deviation`)."""
    dtypes = [[t.dtype for t in tree_leaves(v) if isinstance(t, torch.Tensor)] for v in (a, b)]
    return dtypes[0] == dtypes[1] and deviation(a, b) <= 1e-5
