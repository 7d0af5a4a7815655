"""Values of a graph's nodes on the example inputs: what the matcher and the passes read.

:func:`record_values` runs the graph once (shape propagation that also keeps each node's
value); :class:`ValueRecorder` keeps recorded values right in graphs that still write in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_map

from ..graph_predicates import writes_in_place


class ValueRecorder(ShapeProp):
    """Shape propagation that also keeps every node's value on the example inputs.

    In a graph that still writes in place (``x.mul_(g)`` through an alias), a later op can
    change a tensor already recorded: just before such a write, the recorded values that share
    the written tensor's storage are replaced by copies.
    """

    def __init__(self, gm, previous: Optional["Recording"] = None):
        super().__init__(gm)
        self.values: Dict[fx.Node, Any] = {}
        self.modules = dict(gm.named_modules())
        self._writes = {n for n in gm.graph.nodes if writes_in_place(n, self.modules)
                        and n.args and isinstance(n.args[0], fx.Node)}
        self._by_storage: Dict[int, List[fx.Node]] = {}  # recorded tensors by storage, where writes exist
        # (a graph that writes in place is run whole: a kept value could be one a write changes)
        self.previous = previous if previous is not None and not self._writes else None
        self.kept = 0  # nodes whose previous value was kept

    def run_node(self, n):
        if self.previous is not None and self.previous.still_computes(n, self.modules):
            self.values[n] = self.previous.values[n]
            self.kept += 1
            return self.values[n]
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


@dataclass
class Recording:
    """Recorded values and, per node, the call that computed it: its op, target, argument
    objects (fx gives a node new ones whenever an edit rewires it) and called module."""
    values: Dict[fx.Node, Any]
    calls: Dict[fx.Node, Tuple[Any, ...]]

    def still_computes(self, node: fx.Node, modules: Dict[str, Any]) -> bool:
        """Whether ``node`` is a node recorded here whose call is unchanged (attribute reads and
        placeholders are read again: cheap, and an attribute may have been replaced)."""
        call = self.calls.get(node)
        return call is not None and node.op not in ("placeholder", "get_attr") and _same_call(call, _call(node, modules))


def _call(node: fx.Node, modules: Dict[str, Any]) -> Tuple[Any, ...]:
    return node.op, node.target, node.args, node.kwargs, modules.get(node.target) if node.op == "call_module" else None


def _same_call(a: Tuple[Any, ...], b: Tuple[Any, ...]) -> bool:
    op_a, target_a, *objects_a = a
    op_b, target_b, *objects_b = b
    return op_a == op_b and target_a == target_b and all(x is y for x, y in zip(objects_a, objects_b))


def record_values(gm: fx.GraphModule, example_inputs: Tuple[Any, ...],
                  previous: Optional[Recording] = None) -> Dict[fx.Node, Any]:
    """Every node's value (and ``tensor_meta``) on the example inputs; with ``previous`` (the
    recording before a value-preserving edit), only the nodes made or rewired since are run."""
    return record(gm, example_inputs, previous).values


def record(gm: fx.GraphModule, example_inputs: Tuple[Any, ...], previous: Optional[Recording] = None) -> Recording:
    """:func:`record_values` with the calls it recorded, for the next incremental recording."""
    # real tensors, even when called from inside a dynamo backend (no ambient fake mode)
    with torch._guards.tracing(None), torch.no_grad():
        recorder = ValueRecorder(gm, previous)
        recorder.propagate(*example_inputs)
    modules = recorder.modules
    return Recording(recorder.values, {n: _call(n, modules) for n in recorder.values})
