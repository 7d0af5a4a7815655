"""Values of a graph's nodes on the example inputs: what the matcher and the passes read.

:func:`record_values` runs the graph once (shape propagation that also keeps each node's
value); :class:`ValueRecorder` keeps recorded values right in graphs that still write in place.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

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
        recorder.propagate(*example_inputs)
    return recorder.values
