"""Planning and building the swaps: for each region, outermost first, the module that computed it
replaced by its merged leaves, the emitted module, or a graph of its part (:class:`Preserver`),
and :func:`preserve`, the entry point."""

from __future__ import annotations

import copy
import inspect
import operator
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils import _pytree as pytree

from ..graph_predicates import SYMBOLIC_SIZES, fetch_attr
from ..passes.collapse import EMITTED_FOR
from ..progress import counter, each
from ..report import ModuleSwap
from .provenance import (CapturedNode, PreserveError, Provenance, _Refused, _class_name, _parent, _region_nodes,
                         _strip, _target_name, _within, common_path)
from .observation import (_Call, _as_written_in_place, _close, _is_size, _module_chain, _refuse_unless_same_call,
                          _same_kind, _sole_value_out, graph_values, in_the_layers_own_class, record_calls)
from .layers import (GraphForward, _RENAMES, _forward_parameters, _merged_away_name, _refuse_given_state, base_of_peft,
                     is_peft, is_peft_layer, keeping_names, own_copies, saved_names, sharing_tensors,
                     unwrap_delegating)


class Preserver:
    """Writes a fused graph back into a copy of the model (see the module docstring)."""

    def __init__(self, model: nn.Module, fused: fx.GraphModule, source: fx.GraphModule, captured, flat_inputs,
                 args, kwargs, rewrites, prefix: str = "", progress: bool = False,
                 varying: Optional[Dict[str, str]] = None, recorded: Optional[Dict[str, "_Call"]] = None,
                 provenance: Optional[Provenance] = None):
        self.fused, self.source, self.rewrites, self.prefix = fused, source, rewrites, prefix
        self.varying = dict(varying or {})
        # a model saved by parameter names (transformers' save_pretrained, reloaded by its class):
        # a module in its place must keep its parameters' names, or the checkpoint reloads wrong
        self.checkpointed = keeping_names() or callable(getattr(model, "save_pretrained", None))
        self.progress = progress
        # the copy's parameters are the model's own until the swaps are done (:func:`preserve`
        # copies those still shared then: most are replaced by fused ones, which need no copy)
        self.copy = copy.deepcopy(model, {id(p): p for p in model.parameters()})
        self.calls = recorded if recorded is not None else record_calls(self.copy, args, kwargs)
        self.values = graph_values(fused, flat_inputs)
        provenance = provenance or Provenance(source, prefix, captured, fused)
        self.tags, self.owners = provenance.tag_nodes(rewrites)
        self.known = provenance.paths
        self.copies = provenance.copies  # fused node -> the source node it copies
        self.kept = provenance.kept
        self.captured = {name: CapturedNode(_strip(c.path, prefix), c.inputs) for name, c in captured.items()}
        placed = provenance.region_paths(rewrites)
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
            chain, why = [], "" if p else "it spans the model's own forward" + \
                (f", which stays as written: {refused['']}" if "" in refused else "")
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
        plain = self._plain_layer(gm, call)
        if plain is not None:  # (a PEFT layer compiled on its own: its plain merged layer, as PEFT merges it)
            original, self.copy = _class_name(self.copy), plain
            return ModuleSwap("<model>", original, type(plain).__name__, self._rewrites_in(""))
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
        # (an instance attribute: the class keeps its own forward)
        object.__setattr__(self.copy, "forward", GraphForward(self.copy, gm.graph, gm.meta["output_spec"]))
        becomes = "forward: " + becomes.replace("GraphModule", "its graph", 1)
        return ModuleSwap("<model>", _class_name(self.copy), becomes, self._rewrites_in(""))

    def _plain_layer(self, gm: fx.GraphModule, call: _Call) -> Optional[nn.Module]:
        """Where the model is a PEFT layer (a wrapper, as the PEFT model is) whose graph calls one
        merged module and gives the layer's output on the example: that module (LoRA's
        ``peft.Linear`` becomes the ``nn.Linear`` PEFT's merge gives); else None, and the layer
        keeps its class.  The graph's shape checks go with it: the merged layer holds for every
        input its class takes."""
        if not is_peft_layer(self.copy):
            return None
        called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        if len(called) != 1:
            return None
        plain = gm.get_submodule(called[0])
        try:
            _refuse_unless_same_call(plain, call)
        except _Refused:
            return None
        return plain.eval()

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
        if self.checkpointed and any(isinstance(new, (fx.GraphModule, nn.Sequential)) or
                                     saved_names(new) != saved_names(old)
                                     for old, new in [(self.copy.get_submodule(u), new_u)] +
                                     [(module, new_d) for _, _, module, new_d, _ in built]):
            raise _Refused(_RENAMES)  # (a norm's shift given to a linear without bias: a key the architecture lacks)
        swaps = [ModuleSwap(u, _class_name(self.copy.get_submodule(u)), becomes_u, [root for root, _ in members],
                            f"its affine folded forward into {', '.join(d for _, d in members)}")]
        self._set(u, new_u)
        for d, root, module, new_d, becomes_d in built:
            placed = self._set(d, new_d)
            becomes_d = becomes_d if placed is new_d else type(placed).__name__
            swaps.append(ModuleSwap(d, _class_name(module), becomes_d, [root], f"takes {u}'s affine"))
        return swaps

    def _axis_holding(self, size: fx.Node, value: int, passed_in: List[fx.Node], arguments: Dict[str, Any]
                      ) -> Optional[Tuple[str, int]]:
        """(argument, axis) that holds the size ``size`` computes outside a module (``value`` on
        the example), to read it again inside; None where none does.

        Where export traced the sizes (:data:`SYMBOLIC_SIZES`), the axis of a tensor passed in
        whose size is the same expression: a size equal on the example alone (an image's height
        and a token width, both 8) is another size.  Otherwise, the first tensor argument that
        has the value on one axis only."""
        expr = size.meta.get(SYMBOLIC_SIZES)
        traced = [b for b in passed_in if isinstance(b.meta.get(SYMBOLIC_SIZES), tuple)]
        if expr is not None and not isinstance(expr, tuple) and traced:
            for b in traced:
                shape = b.meta[SYMBOLIC_SIZES]
                if shape.count(expr) != 1:
                    continue
                for name, given in arguments.items():
                    if isinstance(given, torch.Tensor) and _close(self.values.get(b), given):
                        return name, shape.index(expr)
            return None
        for name, given in arguments.items():
            axes = [i for i, n in enumerate(given.shape) if n == value] if isinstance(given, torch.Tensor) else []
            if len(axes) == 1:
                return name, axes[0]
        return None

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
        passed_in = list(dict.fromkeys(b for n in nodes for b in n.all_input_nodes if b not in inside))

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
                # from an axis of an argument that holds it
                held = self._axis_holding(a, value, passed_in, arguments)
                if held is not None:
                    return graph.call_method("size", (placeholders[held[0]], held[1]))
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
        if not _builtin(spec) and into is None:
            raise _Refused(f"it returns a {type(call.output).__name__}")
        # (a cast that changes nothing, read outside too: the caller's code reads the value it
        # already holds, the very tensor the cast returned on the example)
        # (a size computed inside and read outside -- export computes each size expression once
        # and every later layer reads it -- is computed again where it is read: not an output)
        # (and the node that builds a dataclass output from its leaves: the forward rebuilds it)
        structured = None if _builtin(spec) else type(call.output)
        read_outside = [n for n in nodes if any(u not in inside for u in n.users) and not self._alias(n)
                        and not _is_size(self.values.get(n)) and type(self.values.get(n)) is not structured]
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
        # (the model's own forward returning a dataclass or ``ModelOutput``: the graph gives its
        # leaves, which the forward rebuilds with the spec, see GraphForward)
        graph.output(pytree.tree_unflatten(out_nodes, spec) if _builtin(spec) else tuple(out_nodes))
        _drop_unread(graph)
        root = nn.Module() if into is None else into
        for target, value in attributes.items():
            _install(root, target, value)
        gm = fx.GraphModule(root, graph, class_name=f"Fused{type(module).__name__}")
        gm.meta["output_spec"] = None if _builtin(spec) else spec
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
        try:
            got = call.run(candidate)
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


def preserve(model, fused, source, captured, flat_inputs, args, kwargs, rewrites, prefix: str = "",
             progress: bool = False, varying: Optional[Dict[str, str]] = None,
             recorded: Optional[Dict[str, "_Call"]] = None, in_place: bool = False,
             provenance: Optional[Provenance] = None):
    """``model``'s copy with the fused regions swapped in, and the swaps (see the module docstring).
    ``source`` is the captured graph as the rewrites name it, ``captured`` the names of its nodes
    before repc's passes, ``flat_inputs`` what ``fused``'s placeholders take.  ``varying``: the
    modules whose forward stays the model's code (path -> why: called otherwise on the calls
    users make, or given a cache), which are not replaced.  ``recorded``: the model's module
    calls on the example (:func:`record_calls`, :func:`calls_recorded`), where the caller
    recorded them (recorded here otherwise); never written.  ``in_place``: the compile wrote
    merged weights into the model's own tensors (the calls were recorded before): the copy
    shares every tensor with the model, which the compile consumed.  ``provenance``: where ``source``'s nodes come from
    (:class:`Provenance`), where the caller has it."""
    preserver = Preserver(model, fused, source, captured, flat_inputs, args, kwargs, rewrites, prefix, progress,
                          varying, recorded, provenance)
    preserved, swaps = preserver.run()
    base = base_of_peft(preserved)
    scope = preserved if base is None else base  # (the base model, or a model PEFT's layers were put in)
    inside = {id(m) for m in scope.modules() if m is not scope}
    if base is not None or any(is_peft(m) for m in scope.modules() if id(m) in inside):
        # PEFT's wrappers that only call the copy they train: that copy, as merge_and_unload gives
        swaps = swaps + unwrap_delegating(preserved, preserver.calls, lambda m: is_peft(m) and id(m) in inside)
    if not in_place:
        own_copies(preserved, model)  # (the parameters of the modules kept as written)
    return preserved, swaps


