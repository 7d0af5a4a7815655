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

from __future__ import annotations

import contextlib
import copy
import itertools
import inspect
import operator
import re
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from .graph_predicates import IDENTITY_MODULES, fetch_attr
from .passes.collapse import EMITTED_FOR
from .progress import counter, each
from .report import ModuleSwap
from .values import holds_state
from .verify.calls import equal_values


class PreserveError(Exception):
    """The fused graph cannot be written back into the model's own modules; ``left_out``: the
    rewrites no swap applied (where that is why)."""

    def __init__(self, message: str, left_out: Sequence[str] = ()):
        super().__init__(message)
        self.left_out = list(left_out)


def common_path(paths: Sequence[str]) -> str:
    """The deepest module path enclosing all ``paths`` (dotted; "" is the root)."""
    split = [p.split(".") if p else [] for p in paths]
    if not split:
        return ""
    out = []
    for parts in zip(*split):
        if any(p != parts[0] for p in parts):
            break
        out.append(parts[0])
    return ".".join(out)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _within(path: str, scope: str) -> bool:
    return scope == "" or path == scope or path.startswith(scope + ".")


def node_path(node: fx.Node, prefix: str = "", captured=frozenset()) -> Optional[str]:
    """The path of the innermost module of the user's model that computed ``node``; None where
    the node carries no record (a node repc made).  ``captured``: the names of the nodes the
    front end captured (fx records no module for the model's own forward: those are the root's).
    ``prefix`` is a wrapper's name for the model, stripped."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = _without_slices(list(stack.values())[-1][0])
    elif node.op == "call_module" and node.name in captured:
        path = node.target
    elif node.name in captured:
        path = ""
    else:
        return None
    return _strip(path, prefix)


_SLICE = re.compile(r"\.slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)\.(\d+)")


def _without_slices(path: str) -> str:
    """A module path as export records one reached through a slice of a container
    (``layers.slice(None, 2, None).0``, from ``self.layers[:n]``): the item's own path (``layers.0``)."""
    def item(m):
        start, step = int(m.group(1)) if m.group(1) != "None" else 0, int(m.group(3)) if m.group(3) != "None" else 1
        if start < 0:
            return m.group(0)  # (from the end: the container's length is not known here)
        return f".{start + int(m.group(4)) * step}"
    return _SLICE.sub(item, path)


# ----------------------------------------------------------------------------- regions and tags

_DESCRIBED = re.compile(r"^(?P<key>.+?) \((?P<what>[^()]*)\)$")


def _region_nodes(source: fx.Graph, replaced: Sequence[str], collapse_prefix: str = "") -> List[fx.Node]:
    """The captured graph's nodes a rewrite lists as replaced (``"stem.0 (Conv2d)"`` names a
    module call by its target, ``"add_2 (add)"`` a node by its name)."""
    by_name = {n.name: n for n in source.nodes}
    by_target = {n.target: n for n in source.nodes if n.op == "call_module"}
    nodes = []
    for text in replaced:
        match = _DESCRIBED.match(text)
        key = match.group("key") if match else text
        key = key[len(collapse_prefix):] if collapse_prefix and key.startswith(collapse_prefix) else key
        node = by_target.get(key) if key in by_target else by_name.get(key)
        if node is not None:
            nodes.append(node)
    return nodes


@dataclass
class CapturedNode:
    """A node as the front end captured it, before repc's passes rewrote the graph."""
    path: Optional[str]  # its module path (no wrapper prefix stripped), None where unknown
    inputs: Tuple[str, ...]  # the names of the nodes it read


def snapshot(gm: fx.GraphModule) -> Dict[str, CapturedNode]:
    """Every node of a captured graph by name: its module path and inputs (kept to place the
    nodes repc's passes make: a norm split into its core and affine, a linear moved)."""
    names = {n.name for n in gm.graph.nodes}
    return {n.name: CapturedNode(node_path(n, "", names), tuple(a.name for a in n.all_input_nodes))
            for n in gm.graph.nodes}


def _strip(path: Optional[str], prefix: str) -> Optional[str]:
    if path is None or not prefix:
        return path
    stem = prefix.rstrip(".")
    return "" if path in (stem, "") else path[len(prefix):] if path.startswith(prefix) else path


def source_paths(source: fx.GraphModule, prefix: str, captured: Dict[str, CapturedNode]) -> Dict[fx.Node, Optional[str]]:
    """The module path of every node of the graph the rewrites name.  A node repc's passes made
    has the path its pass gave it (:func:`repc.passes.editing.took_place_of`), else (a norm's
    core split from its affine, a scale moved) the path of the captured node it took the place of
    (one that is gone and read the same values), else its first input's."""
    paths: Dict[fx.Node, Optional[str]] = {}
    present = {n.name for n in source.graph.nodes}
    gone: Dict[str, List[str]] = {}  # input name -> paths of the captured nodes that read it and are gone
    for name, c in captured.items():
        if name not in present and c.path is not None:
            for i in c.inputs:
                gone.setdefault(i, []).append(c.path)
    for node in source.graph.nodes:
        c = captured.get(node.name)
        path = c.path if c is not None else node_path(node) if node.meta.get("nn_module_stack") else None
        if path is None:
            data = [a for a in node.all_input_nodes if a.op != "get_attr"]
            took = [p for a in data for p in gone.get(a.name, ())]
            path = took[0] if took else next((paths[a] for a in data if paths.get(a) is not None), None)
        paths[node] = path
    return {n: _strip(p, prefix) for n, p in paths.items()}


def region_paths(source: fx.GraphModule, rewrites, prefix: str, captured, fused: Optional[fx.GraphModule] = None
                 ) -> Dict[str, str]:
    """Rewrite root -> the deepest module enclosing the nodes of its region that ``fused`` no
    longer holds as they were."""
    out = {}
    known = source_paths(source, prefix, captured)
    kept = set(copied_from(fused, source).values()) if fused is not None else set()
    for r in rewrites:
        nodes = _region_nodes(source.graph, r.replaced)
        # the nodes the rewrite changed: a layout op the region read through may stay as it was
        changed = [n for n in nodes if n not in kept] or nodes
        # a layout op merged through (a no-op ``view`` at the top) does not place the region: the
        # swapped module's outputs are checked to be what the model's code reads there
        changed = [n for n in changed if _target_name(n) not in _LAYOUT] or changed
        # nor does an identity (an eval dropout: RepViT's model-level ``head_drop`` before its
        # head's two BN-linears): the module after it is given the very same values
        changed = [n for n in changed if not _is_identity_op(n, source)] or changed
        paths = [known[n] for n in changed if known.get(n) is not None]
        out[r.root] = common_path(paths) if paths else ""
    return out


def module_scopes(source: fx.GraphModule, rewrites, roots, prefix: str, captured,
                  fused: Optional[fx.GraphModule] = None) -> Dict[str, Optional[str]]:
    """For the regions of the rewrites ``roots`` (ones no swap of a module applies), each region
    node's name -> the scope a build confined to them keeps it in
    (:func:`repc.passes.collapse.collapse`'s ``confine``):

    * a region that reaches out of the module placing it (a layout op of the caller merged in:
      EfficientViT's ``qkv(feat).view(B, -1, H, W)``, which no swap of the ``qkv`` module
      gives): that module's nodes keep together, each node outside it in its own module;
    * a region inside its module whose swap fails, or in the model's own forward (LeViT's
      distilled heads averaged): each child module's nodes keep together, the module's own
      nodes (None) join none (each head's BatchNorm then folds into its linear)."""
    chosen = [r for r in rewrites if r.root in roots]
    placed = region_paths(source, chosen, prefix, captured, fused)
    known = source_paths(source, prefix, captured)
    scopes: Dict[str, Optional[str]] = {}
    for r in chosen:
        at = placed[r.root]
        nodes = [(n, known[n]) for n in _region_nodes(source.graph, r.replaced) if known.get(n) is not None]
        reaches_out = any(not _within(path, at) for _, path in nodes)
        for node, path in nodes:  # (a node repc's passes made has no path: its neighbours place it)
            if reaches_out:
                scopes[node.name] = at if _within(path, at) else path
            elif path == at:
                scopes[node.name] = None
            else:
                child = (path[len(at) + 1:] if at else path).split(".")[0]
                scopes[node.name] = f"{at}.{child}" if at else child
    return scopes


def varying_scopes(gm: fx.GraphModule, captured: Dict[str, CapturedNode], varying: Dict[str, str],
                   prefix: str = "") -> Dict[str, Optional[str]]:
    """The scopes (for :func:`repc.passes.collapse.collapse`) that keep every region out of the
    forward of the modules in ``varying`` (whose forward stays the model's code: called with other
    arguments on the calls users make, their caller's code takes another branch there; given a
    cache, they update it) and of every module enclosing one (whose code decides how to call it).  Each node of ``gm`` (the
    prepared graph: a node repc's passes made has the path of the one it took the place of,
    :func:`source_paths`) under such a module keeps to the child of the deepest one enclosing it
    (a LoRA merge stays in its layer's ``mlp``); a node of such a module's own forward (a
    residual add) joins no region."""
    tainted = {""} if varying else set()
    for path in varying:
        parts = path.split(".") if path else []
        tainted.update(".".join(parts[:i]) for i in range(len(parts) + 1))
    scopes: Dict[str, Optional[str]] = {}
    for node, path in source_paths(gm, prefix, captured).items():
        if path is None or node.op in ("placeholder", "output", "get_attr"):
            continue
        parts = path.split(".") if path else []
        depth = max(i for i in range(len(parts) + 1) if ".".join(parts[:i]) in tainted)
        scopes[node.name] = None if depth == len(parts) else ".".join(parts[:depth + 1])
    return scopes


_LAYOUT = {"view", "reshape", "flatten", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "expand",
           "t", "view_as", "reshape_as"}


_IDENTITY_NAMES = {"identity", "dropout", "alias", "detach", "clone"}
_CASTS = {"to", "type", "float", "_to_copy", "type_as"}


def _is_identity_op(node: fx.Node, gm: fx.GraphModule) -> bool:
    """``node`` returns its input's values unchanged in eval mode (an ``nn.Identity``, a dropout)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.Identity) or (isinstance(module, IDENTITY_MODULES) and not module.training)
    if node.op == "call_function" and _target_name(node) == "dropout":
        return node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True) is False
    if node.op in ("call_function", "call_method") and _target_name(node) in _CASTS and node.args and \
            isinstance(node.args[0], fx.Node):  # a cast to the dtype the value has (a norm's ``.to(float32)``)
        dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
        return dtype is not None and dtype == getattr(node.args[0].meta.get("tensor_meta"), "dtype", None)
    return node.op in ("call_function", "call_method") and _target_name(node) in _IDENTITY_NAMES - {"dropout"}


def _target_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


_HINT = re.compile(r"^(?P<hint>.+?)_(fused|weight|bias)(_\d+)?(_scale|_shift)?(_\d+)?$")


def copied_from(fused: fx.GraphModule, source: fx.GraphModule) -> Dict[fx.Node, fx.Node]:
    """The nodes of ``fused`` that are copies of nodes of ``source`` (a copy shares its recorded
    shape metadata; names are no guide, as emitted nodes may take a source node's name first)."""
    by_meta = {id(n.meta["tensor_meta"]): n for n in source.graph.nodes if n.meta.get("tensor_meta") is not None}
    by_key = {(n.name, n.op, str(n.target)): n for n in source.graph.nodes}
    out = {}
    for node in fused.graph.nodes:
        if not node.meta or EMITTED_FOR in node.meta:
            continue  # emitted
        meta = node.meta.get("tensor_meta")
        found = by_meta.get(id(meta)) if meta is not None else by_key.get((node.name, node.op, str(node.target)))
        if found is not None and found.op == node.op:
            out[node] = found
    return out


def tag_nodes(fused: fx.GraphModule, source: fx.GraphModule, rewrites, prefix: str, captured
              ) -> Tuple[Dict[fx.Node, str], Dict[fx.Node, str]]:
    """Every node of ``fused`` with the module path that computes it: copied nodes from their
    record, emitted nodes from the region they merge (found from the names repc gives emitted
    modules and tensors, ``<root>_fused``, and passed along to the unnamed nodes next to them).
    Also the emitted nodes' rewrite (its root)."""
    regions = region_paths(source, rewrites, prefix, captured, fused)
    known = source_paths(source, prefix, captured)
    by_name = {n.name: p for n, p in known.items()}
    origin = copied_from(fused, source)
    tags: Dict[fx.Node, str] = {}
    owners: Dict[fx.Node, str] = {}
    new = []
    for node in fused.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        path = known.get(origin[node]) if node in origin else None
        if path is not None:
            tags[node] = path
        else:
            new.append(node)
    for node in new:
        root = node.meta.get(EMITTED_FOR)
        if root in regions:  # tagged by collapse with the rewrite that emitted it
            tags[node], owners[node] = regions[root], root
        elif node.op in ("call_module", "get_attr"):
            match = _HINT.match(str(node.target))
            hint = match.group("hint") if match else None
            if hint in regions:
                tags[node], owners[node] = regions[hint], hint
            elif by_name.get(hint) is not None:
                tags[node] = by_name[hint]
    pending = [n for n in new if n not in tags]
    while pending:
        progressed = False
        for node in list(pending):
            before = node.target in (F.pad, torch.flatten)  # runs before the emitted module
            neighbours = (list(node.users) + node.all_input_nodes) if before else \
                (node.all_input_nodes + list(node.users))
            # its own tensors first (the emitted norm's weight), then its emitted neighbours
            found = next((a for a in node.all_input_nodes if a.op == "get_attr" and a in tags and a in new), None)
            if found is None:
                found = next((n for n in neighbours if n in tags and n in new), None)
            if found is None:
                found = next((n for n in neighbours if n in tags), None)
            if found is not None:
                tags[node] = tags[found]
                if found in owners:
                    owners[node] = owners[found]
                pending.remove(node)
                progressed = True
        if not progressed:
            for node in pending:
                tags[node] = ""  # nothing to go by: the root (its swap is refused)
            break
    return tags, owners


# ----------------------------------------------------------------------------- the example's calls

@dataclass
class _Call:
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any
    count: int = 1


def record_calls(model: nn.Module, args, kwargs) -> Dict[str, _Call]:
    """Each submodule's first call on the example (its arguments and output) and how often it ran."""
    calls: Dict[str, _Call] = {}
    given: Dict[str, Tuple[Any, Any]] = {}
    hooks = []
    copies: Dict[int, Tuple[Any, int, torch.Tensor]] = {}  # id -> (weak reference, version, its copy)

    def copy_of(v: torch.Tensor) -> torch.Tensor:
        # one copy per tensor and version: a module's output is the next one's input, and a LoRA
        # layer's input that of its base layer, dropout and adapter
        hit = copies.get(id(v))
        if hit is not None and hit[0]() is v and hit[1] == v._version:
            return hit[2]
        out = v.clone()
        try:
            copies[id(v)] = (weakref.ref(v), v._version, out)
        except (TypeError, RuntimeError):  # (no weak reference or version: not shared)
            pass
        return out

    def kept(value):
        # copies: a later in-place op (timm's ReLU(inplace=True) after a BN) would change what
        # was recorded, and the module's own in-place write its argument
        return pytree.tree_map(lambda v: copy_of(v) if isinstance(v, torch.Tensor) else v, value)

    for name, module in model.named_modules():
        def before(m, a, k, name=name):
            if name not in calls and name not in given:
                given[name] = (kept(tuple(a)), kept(dict(k)))

        def hook(m, a, k, out, name=name):
            if name in calls:
                calls[name].count += 1
            else:
                a, k = given.pop(name, (tuple(a), dict(k)))
                calls[name] = _Call(a, k, kept(out))
        hooks.append(module.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def graph_values(gm: fx.GraphModule, flat_inputs) -> Dict[fx.Node, Any]:
    """Every node's value when ``gm`` runs on its flat inputs."""
    values: Dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*flat_inputs, enable_io_processing=False)
    return values


def _is_size(value) -> bool:
    """A size or other integer the graph computes from sizes (not a tensor, not a flag)."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def _sole_value_out(leaf, read_outside: List[fx.Node], values, taken) -> Optional[fx.Node]:
    """The one tensor a module's nodes give out of it, other than those already matched to its
    other outputs (``taken``), of the output's shape and float dtype; else None.  Only a
    candidate: the replacement must then recompute the module's call (``_refuse_unless_same_call``)."""
    if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
        return None
    alike = [n for n in read_outside if n not in taken and isinstance(values.get(n), torch.Tensor)
             and values[n].shape == leaf.shape and values[n].dtype == leaf.dtype]
    return alike[0] if len(alike) == 1 else None


def _refuse_unless_same_call(replacement: nn.Module, call: "_Call") -> None:
    """The replacement, run on the arguments the module was given on the example, returns its
    output up to float rounding (``_close``, by dtype): a module output matched by structure,
    not value."""
    try:
        with torch.no_grad():
            got = replacement(*call.args, **call.kwargs)
    except Exception as why:
        raise _Refused(f"run on its recorded inputs, it fails ({type(why).__name__})") from None
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(call.output)
    if len(got_leaves) != len(want_leaves) or not all(_close(g, w) for g, w in zip(got_leaves, want_leaves)):
        raise _Refused("one of its outputs is not a value of the fused graph (its one value read outside "
                       "differs from the module's output on the inputs it was given)")


def _same_kind(a, b) -> bool:
    """Tensors of one shape and dtype."""
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype


def _close(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    scale = b.abs().max().item() if b.numel() else 0.0
    # which graph value a module's argument or output is: deep in a network of merged ops a value
    # drifts further than the output's tolerance (LeViT's last stage: 1.1e-4 in float32); a wrong
    # match cannot pass, as the copy is verified like the graph
    tol = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}.get(a.dtype, 1e-3)
    return (a - b).abs().max().item() <= tol * max(scale, 1e-30) if a.numel() else True


def _module_chain(ops: List[fx.Node], start: Optional[fx.Node]) -> Optional[List[fx.Node]]:
    """``ops`` where they are calls of modules with plain names, the first on ``start`` and
    each other on the one before, nothing else reading them; else None."""
    if start is None or len(ops) < 2 or any(n.op != "call_module" or "." in n.target or n.kwargs for n in ops):
        return None
    before = start
    for n in ops:
        if n.args != (before,) or (before is not start and len(before.users) != 1):
            return None
        before = n
    return ops


def _as_written_in_place(layer: nn.Module, module: nn.Module, name: str, fresh_input: bool) -> nn.Module:
    """``layer``, or the module's own child ``name`` where that is the same layer written in place
    (``nn.ReLU(inplace=True)``, which repc's graph runs out of place) and its input is a value
    made just before for it alone (``fresh_input``): as the model wrote it, with no new tensor."""
    written = getattr(module, name, None)
    if fresh_input and type(written) is type(layer) and getattr(written, "inplace", False) is True \
            and getattr(layer, "inplace", True) is False and not list(written.parameters()):
        return written
    return layer


def in_the_layers_own_class(written: Optional[nn.Module], merged: nn.Module) -> nn.Module:
    """``merged`` (an ``nn.Linear``) held by a copy of the layer the model wrote there (its base
    layer, for a PEFT adapter wrapper), where that layer is a leaf of another class with one
    ``weight`` (and a ``bias`` where ``merged`` has one) and the merged weight, as it is or
    transposed, makes it compute ``merged``'s map on a random probe: GPT-2's ``Conv1D`` (its
    weight is ``in x out``) stays a ``Conv1D``, so ``save_pretrained`` / ``from_pretrained``
    round-trip as the plain architecture.  Else ``merged`` itself."""
    base = written.get_base_layer() if hasattr(written, "get_base_layer") else written
    if not isinstance(merged, nn.Linear) or base is None or type(base) is type(merged) or list(base.children()):
        return merged
    own = dict(base.named_parameters(recurse=False))
    if "weight" not in own or set(own) - {"weight", "bias"} or ("bias" in own) != (merged.bias is not None):
        return merged
    probe = torch.randn(3, merged.in_features, generator=torch.Generator().manual_seed(0)).to(merged.weight)
    with torch.no_grad():
        want = merged(probe)
        for weight in (merged.weight, merged.weight.t()):
            if weight.shape != own["weight"].shape:
                continue
            layer = copy.deepcopy(base)
            layer.weight.copy_(weight)
            if merged.bias is not None:
                layer.bias.copy_(merged.bias)
            try:
                got = layer(probe)
            except Exception:  # (a layer that does not take a (batch, features) input)
                continue
            if _close(got, want):
                return layer.eval()
    return merged


# ----------------------------------------------------------------------------- building the swaps

def _merged_away_name(module: nn.Module) -> str:
    return "Identity" if isinstance(module, nn.Identity) else f"{type(module).__name__} (identity statistics)"


class GraphForward:
    """A module's ``forward`` (an instance attribute) run as the code of an fx graph over the
    module's own attributes: they are read at each call, so ``.to()``, ``.half()`` and
    ``load_state_dict`` on the module reach what it computes with.  It keeps the graph's Python
    source (as a ``GraphModule`` pickles itself), so it pickles and deep-copies with its module."""

    def __init__(self, owner: nn.Module, graph: fx.Graph):
        from torch.fx.graph_module import _format_import_block
        from torch.package import sys_importer
        code = graph.python_code(root_module="self")
        self.owner, self.source = owner, _format_import_block(code.globals, sys_importer) + code.src
        self._function = None

    def __call__(self, *args, **kwargs):
        if self._function is None:
            from torch.fx.graph_module import _forward_from_src
            self._function = _forward_from_src(self.source, {})
        return self._function(self.owner, *args, **kwargs)

    def bound_to(self, owner: nn.Module) -> "GraphForward":
        """The same code run on ``owner``'s attributes."""
        other = copy.copy(self)
        other.owner = owner
        return other

    def __getstate__(self):
        return {"owner": self.owner, "source": self.source}

    def __setstate__(self, state):
        self.owner, self.source, self._function = state["owner"], state["source"], None


def _refuse_given_state(call: "_Call") -> None:
    """A module given an object its forward may update (a decoder layer's key/value cache): a
    graph of its forward would not update it (the calls users make say so before the build where
    there are several; this holds where the example is the only one)."""
    given = next((v for v in pytree.tree_leaves((call.args, call.kwargs)) if holds_state(v)), None)
    if given is not None:
        raise _Refused(f"it is given a {type(given).__name__}, which its forward may update in place")


_RENAMES = "a graph in its place would rename its parameters in the checkpoint save_pretrained writes"


class _Refused(Exception):
    """This module cannot be swapped (the reason goes to its parent's note)."""


def _forward_parameters(module: nn.Module):
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError) as why:
        raise _Refused("its forward's signature cannot be read") from why
    return params


def saved_names(module: nn.Module) -> Set[str]:
    """The names ``module``'s tensors have in a checkpoint of its architecture: its state dict's,
    with each PEFT layer's taken as its base layer's (``q_proj.base_layer.weight`` is
    ``q_proj.weight``; the adapter's own tensors are not the architecture's)."""
    peft_layers = [path for path, m in module.named_modules()
                   if is_peft(m) and isinstance(getattr(m, "base_layer", None), nn.Module)]
    names = set()
    for key in module.state_dict(keep_vars=True):
        owner = next((p for p in peft_layers if key == p or key.startswith(p + ".") or not p), None)
        if owner is None:
            names.add(key)
            continue
        inner = key[len(owner) + 1:] if owner else key
        if inner.startswith("base_layer."):
            names.add((owner + "." if owner else "") + inner[len("base_layer."):])
    return names


_KEEPING_NAMES = False


@contextlib.contextmanager
def keeping_parameter_names():
    """Within: every model is written back as one saved by parameter names is (as a model with
    ``save_pretrained``): each module in its place keeps its parameters' names.  For a part of
    such a model merged on its own (:mod:`repc.out_of_core`), whose merged weights go into the
    model's checkpoint under their names."""
    global _KEEPING_NAMES
    before, _KEEPING_NAMES = _KEEPING_NAMES, True
    try:
        yield
    finally:
        _KEEPING_NAMES = before


class Preserver:
    """Writes a fused graph back into a copy of the model (see the module docstring)."""

    def __init__(self, model: nn.Module, fused: fx.GraphModule, source: fx.GraphModule, captured, flat_inputs,
                 args, kwargs, rewrites, prefix: str = "", progress: bool = False,
                 varying: Optional[Dict[str, str]] = None, recorded: Optional[Dict[str, "_Call"]] = None):
        self.fused, self.source, self.rewrites, self.prefix = fused, source, rewrites, prefix
        self.varying = dict(varying or {})
        # a model saved by parameter names (transformers' save_pretrained, reloaded by its class):
        # a module in its place must keep its parameters' names, or the checkpoint reloads wrong
        self.checkpointed = _KEEPING_NAMES or callable(getattr(model, "save_pretrained", None))
        self.progress = progress
        # the copy's parameters are the model's own until the swaps are done (:func:`preserve`
        # copies those still shared then: most are replaced by fused ones, which need no copy)
        self.copy = copy.deepcopy(model, {id(p): p for p in model.parameters()})
        self.calls = recorded if recorded is not None else record_calls(self.copy, args, kwargs)
        self.values = graph_values(fused, flat_inputs)
        self.tags, self.owners = tag_nodes(fused, source, rewrites, prefix, captured)
        self.known = source_paths(source, prefix, captured)
        self.copies = copied_from(fused, source)  # fused node -> the source node it copies
        self.kept = set(self.copies.values())
        self.captured = {name: CapturedNode(_strip(c.path, prefix), c.inputs) for name, c in captured.items()}
        placed = region_paths(source, rewrites, prefix, captured, fused)
        # a rewrite that saves no multiply-adds and no parameters (an eval-mode dropout dropped from
        # a linear and its residual add) leaves its modules as they were: the same ops, the model's code
        self.unchanged = {r.root: placed[r.root] for r in rewrites if not r.saves}
        self.regions = {root: path for root, path in placed.items() if root not in self.unchanged}
        self.order = {n: i for i, n in enumerate(fused.graph.nodes)}
        self.swaps: List[ModuleSwap] = []

    def run(self) -> Tuple[nn.Module, List[ModuleSwap]]:
        pending = sorted(set(self.regions.values()), key=lambda p: (p.count(".") if p else -1, p))
        for root, path in self.unchanged.items():
            if not any(_within(path, p) for p in pending):
                module = self.copy.get_submodule(path) if path else self.copy
                self.swaps.append(ModuleSwap(path or "<model>", _class_name(module), "unchanged", [root],
                                             "the rewrite saves no multiply-adds or parameters here: the "
                                             "module is kept as written"))
        self._fold_forward()
        # chains of leaves (conv then bn): the merged module at the first, Identity at the others
        chains = {root: plan for root in each(self.regions, self.progress, "repc: regions")
                  for plan in [self._chain_plan(root)] if plan is not None}
        pending = sorted({p for root, p in self.regions.items() if root not in chains},
                         key=lambda p: (p.count(".") if p else -1, p))
        notes: Dict[str, str] = {}
        refused: Dict[str, str] = {}  # path -> why it could not be swapped
        done: List[str] = []
        bar = counter(len(pending), self.progress, "repc: modules swapped in")
        while pending:
            bar.update(1)
            path = pending.pop(0)
            if any(_within(path, d) for d in done if d):
                continue
            try:
                swap = self._swap(path)
            except _Refused as why:
                refused[path] = str(why)
                if path == "":
                    notes[""] = notes.get("", str(why))
                    continue
                parent = _parent(path)
                notes[parent] = f"{path}: {why}"
                pending.append(parent)
                bar.total = getattr(bar, "total", 0) + 1
                pending.sort(key=lambda p: (p.count(".") if p else -1, p))
                continue
            swap.note = notes.get(path, "")
            done = [d for d in done if not _within(d, path)] + [path]
            self.swaps = [s for s in self.swaps if not _within(s.path, path)] + [swap]
            if path == "":
                break  # (the model's forward is its whole graph now)
        bar.close()
        for root, (targets, merged) in chains.items():
            if any(_within(targets[0], d) for d in done):  # ("" is the model: its forward replaced)
                continue  # inside a module replaced as a whole
            had_bias = getattr(self.copy.get_submodule(targets[0]), "bias", None) is not None
            merged = self._set(targets[0], sharing_tensors(merged))
            after = [self._set(t, self._merged_away(self.copy.get_submodule(t))) for t in targets[1:]]
            if not had_bias and getattr(merged, "bias", None) is not None and isinstance(after[-1], _BatchNorm):
                # (the architecture's conv has no bias: the shift goes to the BatchNorm's, which it has)
                with torch.no_grad():
                    after[-1].bias.copy_(merged.bias)
                merged.register_parameter("bias", None)
            path = common_path(targets)
            module = self.copy.get_submodule(path) if path else self.copy
            self.swaps.append(ModuleSwap(path or "<model>", _class_name(module),
                                         f"{targets[0]} -> {type(merged).__name__}, "
                                         + ", ".join(f"{t} -> {_merged_away_name(m)}"
                                                     for t, m in zip(targets[1:], after)), [root]))
        # a region no module of the model encloses as a swap: left out, its modules as written
        left_out = [root for root, p in self.regions.items()
                    if root not in chains and not any(_within(p, d) for d in done)]
        applied = len(self.regions) - len(left_out)
        if left_out and not applied:
            why = notes.get("", "a region spans the model's own forward")
            raise PreserveError(f"no module of the model encloses a fused region that can be swapped ({why})", left_out)
        for root in left_out:
            p = self.regions[root]
            chain, why = [], "it spans the model's own forward" if p == "" else ""
            while p:
                if p in refused:
                    chain.append(f"{p}: {refused[p]}")
                p = _parent(p)
            module = self.copy.get_submodule(self.regions[root]) if self.regions[root] else self.copy
            note = chain[0] + (f" (and each module above it, up to {chain[-1].split(':')[0]})" if len(chain) > 1
                               else "") if chain else why
            self.swaps.append(ModuleSwap(self.regions[root] or "<model>", _class_name(module), "not applied", [root],
                                         note))
        self.swaps.sort(key=lambda s: self.order.get(next((n for n in self.tags if _within(self.tags[n], s.path)),
                                                          None), 0))
        return self.copy, self.swaps

    # -- one module ------------------------------------------------------------------------------
    def _rewrites_in(self, path: str) -> List[str]:
        return [root for root, p in self.regions.items() if _within(p, path)]

    def _swap(self, path: str) -> ModuleSwap:
        if path == "":
            return self._swap_forward_of_model()
        module = self.copy.get_submodule(path)
        self._refuse_varying(path)
        call = self.calls.get(path)
        if call is None:
            raise _Refused("not called on the example")
        if call.count != 1:
            raise _Refused(f"called {call.count} times on the example")
        _refuse_given_state(call)
        nodes = [n for n in self.fused.graph.nodes if n in self.tags and _within(self.tags[n], path)
                 and n.op != "get_attr"]
        if not nodes:
            raise _Refused("none of its ops are in the graph")
        replacement, becomes = self._subgraph(path, module, call, nodes)
        if self.checkpointed and (isinstance(replacement, (fx.GraphModule, nn.Sequential)) or
                                  saved_names(replacement) != saved_names(module)):
            raise _Refused(_RENAMES)  # (a conv in place of a conv-norm-activation block: its weights renamed)
        placed = self._set(path, replacement)
        becomes = becomes if placed is replacement else type(placed).__name__
        return ModuleSwap(path, _class_name(module), becomes, self._rewrites_in(path))

    def _swap_forward_of_model(self) -> ModuleSwap:
        """The model's own forward replaced by the fused graph (a region spans it: RepVGG's branches
        summed in the model's forward): the model keeps its class, attributes, methods, hooks and
        the modules the graph still calls (the same objects); the graph is its ``forward``, the
        merged modules its children under ``fused``, and the modules merged away are dropped
        (:class:`GraphForward`)."""
        self._refuse_varying("")
        if self.checkpointed:
            raise _Refused(_RENAMES)
        call = self.calls.get("")
        if call is None:
            raise _Refused("the model's own call was not recorded")
        _refuse_given_state(call)
        nodes = [n for n in self.fused.graph.nodes if n in self.tags and n.op != "get_attr"]
        gm, becomes = self._subgraph("", self.copy, call, nodes, into=self.copy)
        used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
        for name, module in list(self.copy.named_modules()):
            # a module of the model the graph no longer reads, nor anything in it (a BN folded into
            # its conv, a parametrized linear merged): dropped
            if name and not any(_within(u, name) or _within(name, u) for u in used):
                parent, _, leaf = name.rpartition(".")
                owner = _fetch_or_none(self.copy, parent) if parent else self.copy
                if owner is not None and leaf in getattr(owner, "_modules", {}):
                    delattr(owner, leaf)
        for tensor in [n for n, _ in self.copy.named_parameters(recurse=False)] + \
                [n for n, _ in self.copy.named_buffers(recurse=False)]:
            # and a tensor of the model's own that the graph no longer reads (the weights a
            # functional block passes to F.conv2d itself, merged into one conv)
            if not any(_within(tensor, u) for u in used):
                delattr(self.copy, tensor)
        object.__setattr__(self.copy, "forward", GraphForward(self.copy, gm.graph))  # (the class keeps its own)
        becomes = "forward: " + becomes.replace("GraphModule", "its graph", 1)
        return ModuleSwap("<model>", _class_name(self.copy), becomes, self._rewrites_in(""))

    def _merged_away(self, module: nn.Module) -> nn.Module:
        """What takes the place of a leaf merged into the one before it: ``nn.Identity``; in a
        model saved by parameter names, a BatchNorm that computes the identity (mean 0, variance
        1 - eps, weight 1, bias 0), so that its checkpoint keys stay and reload to that."""
        if not (self.checkpointed and isinstance(module, _BatchNorm)):
            return nn.Identity()
        identity = copy.deepcopy(module)
        with torch.no_grad():
            identity.running_mean.zero_()
            identity.running_var.fill_(1.0 - identity.eps)
            if identity.affine:
                identity.weight.fill_(1.0)
                identity.bias.zero_()
        return identity

    def _refuse_varying(self, *paths: str) -> None:
        """A module whose forward stays the model's code (:func:`repc.verify.calls.observe`): called
        with other arguments on one of the calls users make (``None`` for a mask that is all
        ones), it runs another branch of its caller's code there; given a cache, it updates it."""
        for path in paths:
            if path in self.varying:
                raise _Refused(self.varying[path])

    def _set(self, path: str, module: nn.Module) -> nn.Module:
        """Put ``module`` at ``path``, in the class of the layer written there where it is a
        merged linear that layer can hold (:func:`in_the_layers_own_class`); returns what was put."""
        parent, _, name = path.rpartition(".")
        owner = self.copy.get_submodule(parent) if parent else self.copy
        module = in_the_layers_own_class(getattr(owner, name, None), module)
        setattr(owner, name, module)
        return module

    def _fold_forward(self) -> List[str]:
        """An affine folded forward out of a leaf module ``U`` into the leaves ``D`` that alone
        read it (a LayerNorm's affine into the q, k, v projections after it): ``U`` becomes its
        part of the graph without the affine, each ``D`` its merged op on that value.  Both sides
        are swapped together, so the value between them may change; each ``D``'s output is checked
        to be what it gave on the example.  Returns the rewrites so placed."""
        by_name = {n.name: n for n in self.source.graph.nodes}
        groups: Dict[str, List[Tuple[str, str]]] = {}  # U -> [(rewrite root, D)]
        for root in self.regions:
            rewrite = next(r for r in self.rewrites if r.root == root)
            nodes = [n for n in _region_nodes(self.source.graph, rewrite.replaced) if n not in self.kept]
            root_node = by_name.get(root)
            if root_node is None or self.known.get(root_node) is None:
                continue
            d = self.known[root_node]
            others = {self.known[n] for n in nodes if self.known.get(n) is not None and not _within(self.known[n], d)}
            if len(others) != 1:
                continue
            u = others.pop()
            if not u or not d or _within(d, u) or _within(u, d):
                continue
            try:
                if any(True for _ in self.copy.get_submodule(u).children()):
                    continue  # U a leaf (a norm); D may be a wrapper (a LoRA linear)
                self.copy.get_submodule(d)
            except AttributeError:
                continue
            groups.setdefault(u, []).append((root, d))
        placed: List[str] = []
        for u, members in groups.items():
            ds = {d for _, d in members}
            u_names = {name for name, c in self.captured.items() if c.path == u}
            readers = [c for name, c in self.captured.items() if c.path != u and set(c.inputs) & u_names]
            if not readers or any(not any(_within(c.path or "", d) for d in ds) for c in readers):
                continue  # something else reads what U gives
            try:
                swaps = self._fold_group(u, members)
            except _Refused:
                continue
            placed.extend(root for root, _ in members)
            self.swaps.extend(swaps)
        for root in placed:
            del self.regions[root]
        return placed

    def _fold_group(self, u: str, members: List[Tuple[str, str]]) -> List[ModuleSwap]:
        calls = {p: self.calls.get(p) for p in [u] + [d for _, d in members]}
        self._refuse_varying(*calls)
        if any(c is None or c.count != 1 for c in calls.values()):
            raise _Refused("a module is not called once")
        roots = {root for root, _ in members}
        u_nodes = [n for n in self.fused.graph.nodes if n.op != "get_attr" and n in self.tags and
                   _within(self.tags[n], u) and self.owners.get(n) not in roots]
        outputs = [n for n in u_nodes if any(v not in u_nodes for v in n.users)]
        if len(outputs) != 1:
            raise _Refused(f"{u} gives {len(outputs)} values")
        new_u, becomes_u = self._subgraph(u, self.copy.get_submodule(u), calls[u], u_nodes,
                                          given_output=outputs[0])
        identity = _with_identity_affine(self.copy.get_submodule(u), calls[u], self.values.get(outputs[0]))
        if identity is not None:  # the model's own norm, its affine reset: the architecture stays
            new_u, becomes_u = identity, f"{type(identity).__name__} (affine reset to 1, 0)"
        built = []
        for root, d in members:
            nodes = [n for n in self.fused.graph.nodes if n.op != "get_attr" and n in self.tags and
                     (_within(self.tags[n], d) or self.owners.get(n) == root) and n not in u_nodes]
            # up to the value D gives: what reads it after (a fused qkv's slices) is its caller's code
            out = next((n for n in nodes if _close(self.values.get(n), calls[d].output)), None)
            if out is None:
                raise _Refused(f"{d}'s output is not a value of the fused graph")
            nodes = [n for n in nodes if n is out or n in _ancestors(out)]
            module = self.copy.get_submodule(d)
            built.append((d, root, module) + self._subgraph(d, module, calls[d], nodes, {outputs[0]: 0}))
        swaps = [ModuleSwap(u, _class_name(self.copy.get_submodule(u)), becomes_u, [root for root, _ in members],
                            f"its affine folded forward into {', '.join(d for _, d in members)}")]
        self._set(u, new_u)
        for d, root, module, new_d, becomes_d in built:
            placed = self._set(d, new_d)
            becomes_d = becomes_d if placed is new_d else type(placed).__name__
            swaps.append(ModuleSwap(d, _class_name(module), becomes_d, [root], f"takes {u}'s affine"))
        return swaps

    def _passed_in(self, node: fx.Node, path: str) -> bool:
        """``node`` copies a source node computed outside module ``path`` that nodes of ``path``
        read in the captured graph: a value the module's caller passed in."""
        source = self.copies.get(node)
        if source is None or _within(self.known.get(source) or "", path):
            return False
        return any(self.known.get(u) is not None and _within(self.known[u], path) for u in source.users)

    def _chain_plan(self, root: str) -> Optional[Tuple[List[str], nn.Module]]:
        """Where a region is a chain of leaf-module calls (each read only by the next: ``conv`` then
        ``bn``) merged into one emitted module, reading the first leaf's input and giving the last
        leaf's output: (the leaves' paths, the merged module); else None."""
        rewrite = next(r for r in self.rewrites if r.root == root)
        chain = _region_nodes(self.source.graph, rewrite.replaced)
        if len(chain) < 2 or len(chain) != len(rewrite.replaced) or any(n.op != "call_module" for n in chain):
            return None
        for a, b in zip(chain, chain[1:]):
            if b.args[:1] != (a,) or len(a.users) != 1 or len(b.all_input_nodes) != 1:
                return None
        mine = [n for n in self.fused.graph.nodes if n.meta.get(EMITTED_FOR) == root and n.op != "get_attr"]
        if len(mine) != 1 or mine[0].op != "call_module" or len(mine[0].args) != 1:
            return None
        targets = [n.target for n in chain]
        if any(self.calls.get(t) is None or self.calls[t].count != 1 or t in self.varying for t in targets):
            return None
        if self.checkpointed and not all(isinstance(self.copy.get_submodule(t), _BatchNorm) and
                                         self.copy.get_submodule(t).affine for t in targets[1:]):
            return None  # (what would take their place has none of their parameters: see _merged_away)
        merged = mine[0]
        first, last = self.calls[targets[0]], self.calls[targets[-1]]
        if not (first.args and _close(self.values.get(merged.args[0]), first.args[0])
                and _close(self.values.get(merged), last.output)):
            return None
        return targets, self.fused.get_submodule(merged.target)

    def _subgraph(self, path: str, module: nn.Module, call: _Call, nodes: List[fx.Node],
                  given_inputs: Optional[Dict[fx.Node, int]] = None, given_output: Optional[fx.Node] = None,
                  into: Optional[nn.Module] = None):
        """``module``'s part of the fused graph (``nodes``) as a GraphModule taking its forward's
        arguments.  ``given_inputs`` (node -> argument position) and ``given_output`` are read as
        they are, not matched by value (an affine folded forward changes the value between two
        modules, both swapped).  ``into``: the graph's modules and tensors are those of this
        module (the model, whose forward the graph becomes): its own where the fused graph
        holds them unchanged, the merged ones installed on it under ``fused``."""
        inside = set(nodes)
        given_inputs = given_inputs or {}
        params = _forward_parameters(module)
        bound = inspect.Signature(params).bind(*call.args, **call.kwargs)
        # each argument that is a tensor, by name: the values the graph must take from outside
        graph = fx.Graph()
        arguments: Dict[str, Any] = {}  # the forward's arguments on the example, and their nodes
        placeholders: Dict[str, fx.Node] = {}
        starred = []  # (label, placeholder, key): items of *args / **kwargs, read after the placeholders
        for p in params:
            value = bound.arguments.get(p.name)
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                star = "*" if p.kind == p.VAR_POSITIONAL else "**"
                node = graph.placeholder(star + p.name)
                items = enumerate(value or ()) if p.kind == p.VAR_POSITIONAL else (value or {}).items()
                for key, item in items:  # (items nothing reads are dropped at the end)
                    if isinstance(item, torch.Tensor):
                        label = f"{star}{p.name}[{key!r}]"
                        arguments[label] = item
                        starred.append((label, node, key))
                continue
            default = p.default if p.default is not inspect.Parameter.empty else inspect.Signature.empty
            placeholders[p.name] = graph.placeholder(p.name, default_value=default)
            if p.name in bound.arguments:
                arguments[p.name] = value
        for label, node, key in starred:
            placeholders[label] = graph.call_function(operator.getitem, (node, key))
        env: Dict[fx.Node, fx.Node] = {}
        attributes: Dict[str, Any] = {}
        names: Dict[str, str] = {}

        def from_outside(a: fx.Node, depth: int) -> fx.Node:
            if a in given_inputs:
                name = params[given_inputs[a]].name
                if name not in placeholders:
                    raise _Refused(f"its argument {name} is not a plain argument")
                return placeholders[name]
            if path == "" and a.op == "placeholder":
                # an input of the fused graph is an argument of the model's own forward, by name
                # (fx names a specialized one ``task_1``: its value is checked in the graph)
                base, _, suffix = str(a.target).rpartition("_")
                for name in (str(a.target), base if suffix.isdigit() else None):
                    if name in placeholders:
                        return placeholders[name]
            value = self.values.get(a)
            if isinstance(value, torch.Tensor):
                for name, given in arguments.items():
                    if isinstance(given, torch.Tensor) and _close(value, given):
                        return placeholders[name]
            elif isinstance(value, int) and not isinstance(value, bool):
                # a size read outside (export reads each input size once, at the top): read again
                # from the first tensor argument that has it on one axis only
                for name, given in arguments.items():
                    axes = [i for i, size in enumerate(given.shape) if size == value] \
                        if isinstance(given, torch.Tensor) else []
                    if len(axes) == 1:
                        return graph.call_method("size", (placeholders[name], axes[0]))
            # computed outside from sizes and constants only (a mask the model builds once for all
            # its layers): computed again inside
            if a.op in ("call_function", "call_method") and depth < 32:
                try:
                    return graph.node_copy(a, lambda b: arg(b, depth + 1))
                except _Refused:
                    pass
            # a copy of a value the captured graph passed into this module (one that its nodes
            # read there) is an argument: the one tensor argument of its shape and dtype, where
            # merges upstream moved the fused graph's value off the recorded one by more than
            # ``_close`` allows (bfloat16 rounding)
            if self._passed_in(a, path):
                alike = [name for name, given in arguments.items() if _same_kind(value, given)]
                if len(alike) == 1:
                    return placeholders[alike[0]]
            raise _Refused(f"it reads {a.name}, which is none of its forward's arguments")

        def arg(a: fx.Node, depth: int = 0) -> fx.Node:
            if a in env:
                return env[a]
            if a.op == "get_attr":
                env[a] = graph.get_attr(self._attribute(a.target, path, attributes, names))
            else:
                env[a] = from_outside(a, depth)
            return env[a]

        for node in nodes:
            new = graph.node_copy(node, arg)
            if node.op == "call_module":
                new.target = self._attribute(node.target, path, attributes, names)
            env[node] = new
        if into is not None:  # the model's own modules and tensors where unchanged, else installed
            for name, value in list(attributes.items()):
                own = _fetch_or_none(into, name)
                if own is None or not _same_content(own, value):
                    renamed = "fused." + name.replace(".", "_")
                    for n in graph.nodes:
                        if n.op in ("call_module", "get_attr") and n.target == name:
                            n.target = renamed
                    _install(into, renamed, value)
                attributes.pop(name)
        # the outputs: the forward's output leaves, each a graph value (read outside, or the last one equal)
        leaves, spec = pytree.tree_flatten(call.output)
        if not _builtin(spec):
            raise _Refused(f"it returns a {type(call.output).__name__}")
        # (a cast that changes nothing, read outside too: the caller's code reads the value it
        # already holds, the very tensor the cast returned on the example)
        # (a size computed inside and read outside -- export computes each size expression once
        # and every later layer reads it -- is computed again where it is read: not an output)
        read_outside = [n for n in nodes if any(u not in inside for u in n.users) and not self._alias(n)
                        and not _is_size(self.values.get(n))]
        candidates = read_outside + [n for n in reversed(nodes) if n not in read_outside]
        out_nodes, matched_nodes = [], []
        by_structure = False
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                out_nodes.append(leaf)
                continue
            if given_output is not None:
                if len(leaves) != 1 or given_output not in env:
                    raise _Refused("its output is not the value its readers were given")
                out_nodes.append(env[given_output])
                continue
            match = next((n for n in candidates if _close(self.values.get(n), leaf)), None)
            if match is None:
                match = next((a for a in env if a not in inside and _close(self.values.get(a), leaf)), None)
            if match is None and into is None:
                # where merges upstream moved the graph's values further than `_close` allows (an
                # attention amplifies float32 rounding; bfloat16): the one value it gives out of it
                # of the output's shape and dtype -- checked below on the inputs the module was given
                match = _sole_value_out(leaf, read_outside, self.values, set(matched_nodes))
                by_structure = by_structure or match is not None
            if match is None:
                raise _Refused("one of its outputs is not a value of the fused graph")
            out_nodes.append(env[match])
            matched_nodes.append(match)
        matched = {n for n in read_outside if env[n] in out_nodes}
        if len(matched) != len(read_outside):
            missing = next(n for n in read_outside if n not in matched)
            raise _Refused(f"{missing.name}, computed inside it, is read outside it")
        graph.output(pytree.tree_unflatten(out_nodes, spec))
        _drop_unread(graph)
        root = nn.Module() if into is None else into
        for target, value in attributes.items():
            _install(root, target, value)
        gm = fx.GraphModule(root, graph, class_name=f"Fused{type(module).__name__}")
        gm.eval()
        if by_structure:
            _refuse_unless_same_call(gm, call)
        ops = [n for n in graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        old_of = {new: old for old, new in env.items()}

        def no_op(n: fx.Node) -> bool:
            """A dtype cast or check that changes nothing on the example (peft's casts around LoRA)."""
            if n.target is torch.ops.aten._assert_tensor_metadata.default:
                return True
            old = old_of.get(n)
            return old is not None and n.op in ("call_method", "call_function") and bool(old.args) and \
                isinstance(old.args[0], fx.Node) and _target_name(n) in ("to", "type", "contiguous") and \
                self.values.get(old) is self.values.get(old.args[0])

        def through(n):
            while isinstance(n, fx.Node) and n.op != "placeholder" and no_op(n) and n.args:
                n = n.args[0]
            return n

        calls = [n for n in ops if not no_op(n)]
        # (the model's forward, ``into``, is always the graph: its modules are the model's children)
        if into is None and len(calls) == 1 and calls[0].op == "call_module" and len(leaves) == 1 and \
                not calls[0].kwargs and len(calls[0].args) == 1 and through(calls[0].args[0]) is placeholders.get(params[0].name) and \
                through(next(iter(graph.find_nodes(op="output"))).args[0]) is calls[0]:
            single = gm.get_submodule(calls[0].target)  # the region is one call of the merged module
            return single, type(single).__name__
        chain = _module_chain(ops, placeholders.get(params[0].name) if params else None)
        if into is None and chain is not None and len(call.args) == 1 and not call.kwargs and len(leaves) == 1 and \
                through(next(iter(graph.find_nodes(op="output"))).args[0]) is chain[-1]:
            # module calls in turn, each on the one before (a merged conv, then its activation): a
            # Sequential of them, which a call costs less Python than a GraphModule's
            layers = nn.Sequential(OrderedDict((n.target, _as_written_in_place(gm.get_submodule(n.target),
                                                                               module, n.target, i > 0))
                                               for i, n in enumerate(chain)))
            return layers.eval(), f"Sequential ({', '.join(type(m).__name__ for m in layers)})"
        kinds = ", ".join(dict.fromkeys(type(gm.get_submodule(n.target)).__name__ for n in ops
                                        if n.op == "call_module"))
        return gm, f"GraphModule ({len(ops)} ops{': ' + kinds if kinds else ''})"

    def _alias(self, node: fx.Node) -> bool:
        """``node`` returned its input itself on the example (a ``to`` to the dtype it has)."""
        return node.op in ("call_function", "call_method") and bool(node.args) and \
            isinstance(node.args[0], fx.Node) and _target_name(node) in ("to", "type", "contiguous", "alias") and \
            isinstance(self.values.get(node), torch.Tensor) and self.values.get(node) is self.values.get(node.args[0])

    def _attribute(self, target: str, path: str, attributes: Dict[str, Any], names: Dict[str, str]) -> str:
        """The sub-graph's name for the fused graph's attribute ``target``: its path below the
        swapped module where it is one of the model's, else a name for what it is."""
        if target in names:
            return names[target]
        value = fetch_attr(self.fused, target)
        if path and target.startswith(path + "."):
            name = target[len(path) + 1:]
        elif not path and _fetch_or_none(self.copy, target) is not None:
            name = target  # (the model's own, where the graph becomes the model's forward)
        else:
            kind = _KINDS.get(type(value).__name__, type(value).__name__.lower()) if isinstance(value, nn.Module) else \
                ("scale" if target.endswith("scale") else "shift" if target.endswith("shift")
                 else target.rsplit("_", 1)[-1] if not target.rsplit("_", 1)[-1].isdigit() else "tensor")
            name, i = kind, 1
            while name in attributes:
                i += 1
                name = f"{kind}_{i}"
        names[target] = name
        attributes[name] = sharing_tensors(value)
        return name


_KINDS = {"Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv", "Linear": "linear"}  # names of emitted modules


def _with_identity_affine(module: nn.Module, call: "_Call", want) -> Optional[nn.Module]:
    """A copy of ``module`` (a norm) with its ``weight`` set to ones and ``bias`` to zeros, where
    that computes ``want`` on the example (what remains of it once its affine is folded forward)."""
    named = dict(module.named_parameters(recurse=False))
    if not isinstance(want, torch.Tensor) or "weight" not in named or set(named) - {"weight", "bias"}:
        return None
    candidate = copy.deepcopy(module)
    with torch.no_grad():
        candidate.weight.fill_(1.0)
        if getattr(candidate, "bias", None) is not None:
            candidate.bias.zero_()
        args, kwargs = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                                       (call.args, call.kwargs))  # (records share their copies: not written)
        try:
            got = candidate(*args, **kwargs)
        except Exception:
            return None
    return candidate if _close(got, want) else None


def _ancestors(node: fx.Node) -> set:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _class_name(module: nn.Module) -> str:
    """``Linear`` for torch's own layers, ``peft.Linear``, ``transformers.BertLayer`` for others'."""
    cls = type(module)
    package = cls.__module__.split(".")[0]
    return cls.__qualname__ if package == "torch" else f"{package}.{cls.__qualname__}"


def _fetch_or_none(root: nn.Module, target: str):
    try:
        return fetch_attr(root, target)
    except AttributeError:
        return None


def _same_content(a, b) -> bool:
    """Two modules (or tensors) of one class holding equal tensors: the fused graph's copy of a
    module of the model it left as it was."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if type(a) is not type(b) or not isinstance(a, nn.Module):
        return False
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(_same_content(mine[k], theirs[k]) for k in mine)


def _install(root: nn.Module, target: str, value) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = root
    for part in owner_path.split(".") if owner_path else ():
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Module):
        owner.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value)


def _builtin(spec) -> bool:
    return spec.is_leaf() or spec.type in (tuple, list, dict) and all(_builtin(c) for c in spec.children())


def _drop_unread(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users \
                and not getattr(node.target, "__name__", "").startswith("_assert"):
            graph.erase_node(node)
    graph.lint()


def is_peft(module: nn.Module) -> bool:
    """A module of PEFT's classes (a LoRA layer, a ModulesToSaveWrapper, the PeftModel)."""
    return type(module).__module__.split(".")[0] == "peft"


def is_peft_layer(module: nn.Module) -> bool:
    """A layer PEFT put in the base model (LoRA's ``peft.Linear``, a ``ModulesToSaveWrapper``),
    not the PEFT model or the tuner that wrap the base model."""
    if not is_peft(module) or hasattr(module, "get_base_model"):
        return False
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return tuners is None or not isinstance(module, tuners.BaseTuner)


def unwrap_delegating(root: nn.Module, calls: Dict[str, "_Call"], chosen: Callable[[nn.Module], bool]
                      ) -> List[ModuleSwap]:
    """Each module of ``root`` that ``chosen`` picks whose call on the example (``calls``:
    :func:`record_calls`) is one call of a submodule of its own with the same arguments, giving
    the same output (PEFT's ``ModulesToSaveWrapper`` calling the copy it trains), replaced by
    that submodule; deepest first.  Returns the swaps."""
    swaps: List[ModuleSwap] = []
    named = [(path, m) for path, m in root.named_modules() if path and chosen(m)]
    for path, module in sorted(named, key=lambda item: -item[0].count(".")):
        call = calls.get(path)
        if call is None or call.count != 1 or _holds_tensors(module):
            continue
        given = (call.args, call.kwargs, call.output)
        inner = next((sub for sub, _ in module.named_modules() if sub and (c := calls.get(f"{path}.{sub}")) is not None
                      and c.count == 1 and equal_values((c.args, c.kwargs, c.output), given)), None)
        if inner is None or not _only_delegates(module, path, inner, calls):
            continue
        parent, _, name = path.rpartition(".")
        replacement = module.get_submodule(inner)
        setattr(root.get_submodule(parent) if parent else root, name, replacement)
        swaps.append(ModuleSwap(path, _class_name(module), _class_name(replacement), [],
                                f"its call is one of {inner}'s, which takes its place"))
    return swaps


def _holds_tensors(module: nn.Module) -> bool:
    """Parameters or buffers of its own (a parameter dict's entries are its own)."""
    return any(True for _ in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))


def _only_delegates(module: nn.Module, path: str, inner: str, calls: Dict[str, "_Call"]) -> bool:
    """Nothing of ``module`` but ``inner`` took part in its call: every other submodule (PEFT's
    untrained original, kept beside the copy it trains) was not called and holds no tensors its
    forward reads as they are (a parameter dict: LoRA's embedding factors)."""
    for sub, m in module.named_modules():
        if not sub or sub == inner or sub.startswith(inner + ".") or inner.startswith(sub + "."):
            continue
        if calls.get(f"{path}.{sub}") is not None or \
                (isinstance(m, (nn.ParameterDict, nn.ParameterList)) and _holds_tensors(m)):
            return False
    return True


def base_of_peft(model: nn.Module) -> Optional[nn.Module]:
    """The base model inside a PEFT wrapper (``PeftModel.get_base_model()``); None for anything else."""
    if not is_peft(model) or not hasattr(model, "get_base_model"):
        return None
    return model.get_base_model()


def preserve(model, fused, source, captured, flat_inputs, args, kwargs, rewrites, prefix: str = "",
             progress: bool = False, varying: Optional[Dict[str, str]] = None,
             recorded: Optional[Dict[str, "_Call"]] = None):
    """``model``'s copy with the fused regions swapped in, and the swaps (see the module docstring).
    ``source`` is the captured graph as the rewrites name it, ``captured`` the names of its nodes
    before repc's passes, ``flat_inputs`` what ``fused``'s placeholders take.  ``varying``: the
    modules whose forward stays the model's code (path -> why: called otherwise on the calls
    users make, or given a cache), which are not replaced.  ``recorded``: the model's module
    calls on the example (:func:`record_calls`), recorded before the compile wrote merged
    weights into the model's own tensors; the copy then shares every tensor with the model,
    which the compile consumed."""
    preserver = Preserver(model, fused, source, captured, flat_inputs, args, kwargs, rewrites, prefix, progress,
                          varying, recorded)
    preserved, swaps = preserver.run()
    base = base_of_peft(preserved)
    scope = preserved if base is None else base  # (the base model, or a model PEFT's layers were put in)
    inside = {id(m) for m in scope.modules() if m is not scope}
    if base is not None or any(is_peft(m) for m in scope.modules() if id(m) in inside):
        # PEFT's wrappers that only call the copy they train: that copy, as merge_and_unload gives
        swaps = swaps + unwrap_delegating(preserved, preserver.calls, lambda m: is_peft(m) and id(m) in inside)
    if recorded is None:
        own_copies(preserved, model)  # (the parameters of the modules kept as written)
    return preserved, swaps


def sharing_tensors(value):
    """A module of the fused graph as a new module object holding the very same tensors (the
    graph is repc's own and one of the two is dropped: its merged weights are not copied), so
    that changing the new module's structure leaves the graph's alone; a tensor as it is."""
    if not isinstance(value, nn.Module):
        return value
    return copy.deepcopy(value, {id(t): t for t in itertools.chain(value.parameters(), value.buffers())})


def own_copies(result: nn.Module, model: nn.Module) -> None:
    """Replace every module, parameter and buffer ``result`` still shares with ``model`` by a copy."""
    shared_modules = {id(m) for m in model.modules()}
    shared_tensors = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    memo = {}
    for name, mod in list(result.named_modules()):
        for child_name, child in list(mod.named_children()):
            if id(child) in shared_modules:
                setattr(mod, child_name, copy.deepcopy(child, memo))
    for mod in result.modules():
        for tensors in (mod._parameters, mod._buffers):
            for key, t in list(tensors.items()):
                if t is not None and id(t) in shared_tensors:
                    tensors[key] = copy.deepcopy(t, memo)

