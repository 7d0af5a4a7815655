"""Module-preserving output: the fused whole-model graph written back into a copy of the user's model.

``repc.compile`` fuses one graph of the whole model.  This module gives the user back *their
own model* instead: a ``copy.deepcopy`` of it in which each fused region is replaced at the
smallest module that computed it, everything else (class, methods, attributes, hooks, the
modules repc did not touch) as it was.

* Every node of the fused graph carries the module path that computed it: a node copied from
  the captured graph has the ``nn_module_stack`` both front ends record; a node repc emitted
  for a merged region (no metadata) is given the region's path, the deepest module enclosing
  all nodes of the region in the captured graph.
* For each such region path, outermost first, the module there is replaced by

  - the merged leaves of a chain (``conv`` then ``bn``, siblings called in turn, nothing else
    reading between them): the first becomes the merged module, the others ``nn.Identity``;
  - the emitted module itself, where that module's part of the graph is one call of it (a LoRA
    ``lora.Linear`` becomes a plain ``nn.Linear`` with the merged weight);
  - otherwise a small ``GraphModule`` of its part of the graph (a RepVGG block: its one merged
    conv and its activation), taking the forward's arguments by name;
  - for an affine folded forward out of a leaf into the leaves that alone read it (a LayerNorm's
    affine into the q, k, v projections after it): the leaf keeps its class with its affine reset
    to 1 and 0 (else its part of the graph), each reader becomes its merged op.

  The module's inputs and outputs must be values of the graph: its forward's tensor arguments
  and outputs, recorded with hooks on the example, are matched by value with the graph's values
  there (a size read from an input is read again inside).  Where that fails (a module called
  twice, an input the graph does not hold, an output computed elsewhere), the parent is tried
  instead, up to the model itself, whose ``forward`` then becomes the fused graph (an instance
  attribute: its class, methods, attributes, hooks and the modules the graph still calls stay).
* A module called with other arguments on the calls users make (``varying``: a layer given
  ``None`` for an all-ones mask), or given an object its forward may update (a cache), is never
  replaced: its caller's code takes another branch there, or its update would be lost.
  Regions that no swap places are left out (:class:`PreserveError` where none is placed).

The caller verifies the result as a whole, as it verifies the graph.
"""

from .layers import (GraphForward, InputGuards, base_of_peft, is_peft, is_peft_layer, keeping_parameter_names,
                     own_copies, runs_graph_code, saved_names, sharing_tensors, unwrap_delegating)
from .observation import calls_recorded, in_the_layers_own_class, record_calls
from .planning import Preserver, preserve
from .provenance import PreserveError, Provenance, node_path, snapshot, source_paths, varying_scopes

__all__ = ["GraphForward", "InputGuards", "Preserver", "PreserveError", "Provenance", "base_of_peft",
           "calls_recorded", "in_the_layers_own_class", "is_peft", "is_peft_layer", "keeping_parameter_names",
           "node_path", "own_copies", "preserve", "record_calls", "runs_graph_code", "saved_names", "sharing_tensors",
           "snapshot", "source_paths", "unwrap_delegating", "varying_scopes"]
