"""Where each node of a captured or fused graph comes from: the module path that computed it, the
regions of the rewrites and the module scopes that enclose them (the module-preserving output
places each region there, and the report names it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..graph_predicates import IDENTITY_MODULES
from ..passes.collapse import EMITTED_FOR


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


class Provenance:
    """Where each node of the graph the rewrites name comes from, computed once per fused graph and
    shared by placement (:class:`repc.preserve.planning.Preserver`), the scopes of a build confined
    to modules, and the report's module names: each node's module path (:func:`source_paths`), the
    source node each node of ``fused`` copies (:func:`copied_from`), each rewrite's module."""

    def __init__(self, source: fx.GraphModule, prefix: str, captured: Dict[str, CapturedNode],
                 fused: Optional[fx.GraphModule] = None):
        self.source, self.prefix, self.captured, self.fused = source, prefix, captured, fused
        self.paths = source_paths(source, prefix, captured)  # source node -> its module path
        self.copies = copied_from(fused, source) if fused is not None else {}  # fused node -> source node
        self.kept = set(self.copies.values())
        self._regions: Dict[str, str] = {}

    def region_paths(self, rewrites) -> Dict[str, str]:
        """Rewrite root -> the deepest module enclosing the nodes of its region that ``fused`` no
        longer holds as they were."""
        for r in rewrites:
            if r.root not in self._regions:
                nodes = _region_nodes(self.source.graph, r.replaced)
                # the nodes the rewrite changed: a layout op the region read through may stay as it was
                changed = [n for n in nodes if n not in self.kept] or nodes
                # a layout op merged through (a no-op ``view`` at the top) does not place the region: the
                # swapped module's outputs are checked to be what the model's code reads there
                changed = [n for n in changed if _target_name(n) not in _LAYOUT] or changed
                # nor does an identity (an eval dropout: RepViT's model-level ``head_drop`` before its
                # head's two BN-linears): the module after it is given the very same values
                changed = [n for n in changed if not _is_identity_op(n, self.source)] or changed
                paths = [self.paths[n] for n in changed if self.paths.get(n) is not None]
                self._regions[r.root] = common_path(paths) if paths else ""
        return {r.root: self._regions[r.root] for r in rewrites}

    def computed_by(self) -> Dict[str, Optional[str]]:
        """Node name -> the module that computed it (the report's rejections)."""
        return {n.name: p for n, p in self.paths.items()}

    def module_scopes(self, rewrites, roots) -> Dict[str, Optional[str]]:
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
        placed = self.region_paths(chosen)
        scopes: Dict[str, Optional[str]] = {}
        for r in chosen:
            at = placed[r.root]
            nodes = [(n, self.paths[n]) for n in _region_nodes(self.source.graph, r.replaced)
                     if self.paths.get(n) is not None]
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

    def tag_nodes(self, rewrites) -> Tuple[Dict[fx.Node, str], Dict[fx.Node, str]]:
        """Every node of ``fused`` with the module path that computes it: copied nodes from their
        record, emitted nodes from the region they merge (found from the names repc gives emitted
        modules and tensors, ``<root>_fused``, and passed along to the unnamed nodes next to them).
        Also the emitted nodes' rewrite (its root)."""
        fused = self.fused
        regions = self.region_paths(rewrites)
        known, origin = self.paths, self.copies
        by_name = {n.name: p for n, p in known.items()}
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


class _Refused(Exception):
    """This module cannot be swapped (the reason goes to its parent's note)."""


def _class_name(module: nn.Module) -> str:
    """``Linear`` for torch's own layers, ``peft.Linear``, ``transformers.BertLayer`` for others'."""
    cls = type(module)
    package = cls.__module__.split(".")[0]
    return cls.__qualname__ if package == "torch" else f"{package}.{cls.__qualname__}"


