"""A compile's weights as a program: the tensor ops that computed a compiled module's weights from
the module's own, recorded while it was compiled and run again on another module made and
called as that one.

A language model repeats one layer.  Each layer after the first takes the first one's capture
(:class:`repc.capture_export.CaptureCache`), yet compiling it still matches, computes the
closed forms, places the merge and runs the checks' forward passes (some twenty of the layer).
Its merged weights are the same closed forms of other weights.  :class:`WeightRecorder` records,
while one module is compiled, every tensor op the compile runs (a ``TorchDispatchMode``), and
:meth:`WeightRecorder.program` keeps the ops the compiled module's weights come from (backwards
from them, with the writes in place into what they read): a :class:`WeightProgram`.  Run on
another module's weights (:meth:`WeightProgram.run`), it gives that module's compiled weights
without a compile.

A program is kept only where

* each weight of the compiled module is one of the module's own, or computed by recorded ops
  from them (a weight computed outside torch's ops, in NumPy say, is not);
* every weight of the module that the compiled module no longer holds (a LoRA layer's base
  weight and factors) is read by the program: a merge that left out a term because of its values
  (a zero factor) is not replayed on a module where that term is not zero;
* nothing is written into the module's own weights;
* no op it keeps reads the values of a tensor of more than :data:`CONSTANT_NUMEL` entries that
  the recording did not see made (one made from NumPy or Python data, which may hold the recorded
  module's own weights by another road; reading only its shape, as ``empty_like`` does, is fine);
* running it on the recorded module's own weights gives its compiled weights again, each entry
  within an ulp of its dtype (the rounding of a float64 sum taken in another order: a random
  draw, or a write the recording did not see, fails this).

A program sees no decision the compile took on the values in Python (a merge refused for a
non-finite weight), nor a per-module constant it read (a scale held as an attribute):
:func:`replay_key` holds the modules' float and bool attributes, and whoever runs a program
checks the result against the module itself (:func:`check_replayed`).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .capture_export import CaptureCache
from .preserve import GraphForward


CONSTANT_NUMEL = 64  # tensors the recording did not see made, larger than this: not read by a kept program
# ops that read a tensor's shape, dtype and device, not its values (a module built empty, then written)
_VALUE_BLIND = frozenset(getattr(torch.ops.aten, name) for name in (
    "empty_like", "new_empty", "new_empty_strided", "zeros_like", "ones_like", "full_like", "uniform_", "normal_",
    "fill_", "zero_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"))


@dataclass(frozen=True)
class _Ref:
    """Output ``index`` of recorded node ``node``."""
    node: int
    index: int


@dataclass(frozen=True)
class _Source:
    name: str  # a weight of the module, by its state-dict name


class _Const:
    """A tensor the recording did not see made (an input of the compile, a tensor made from
    Python data): replayed as it is."""

    def __init__(self, value: torch.Tensor):
        self.value = value


@dataclass
class _Node:
    op: Any  # an OpOverload, or a _Source
    spec: Any = None  # the pytree spec of (args, kwargs)
    leaves: Tuple[Any, ...] = ()  # _Ref, _Const or a Python value per leaf
    writes: Tuple[_Ref, ...] = ()  # what it writes into in place: each written tensor's base, as recorded


def _attributes(module: nn.Module) -> Tuple:
    """``module``'s float and bool attributes (also inside dicts, lists and tuples): the
    constants a compile reads into closed forms (a LoRA layer's scaling) and its flags.
    Integers and strings are left out: sizes are in the shapes, and a layer's index or name
    differs from layer to layer."""

    def plain(value: Any):
        if isinstance(value, (bool, float)):
            return value
        if isinstance(value, dict):
            kept = tuple((k, plain(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
            return tuple((k, v) for k, v in kept if v is not None) or None
        if isinstance(value, (list, tuple)):
            kept = tuple(plain(v) for v in value)
            return kept if any(v is not None for v in kept) else None
        return None

    kept = ((name, plain(value)) for name, value in sorted(vars(module).items()) if not name.startswith("_"))
    return tuple((name, value) for name, value in kept if value is not None)


def replay_key(module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[Tuple]:
    """Modules that may share a :class:`WeightProgram`: :meth:`CaptureCache.key`'s structure,
    weights and call, and each submodule's :func:`_attributes`; None where the call holds an
    object (its state may change what is computed)."""
    key = CaptureCache.key(module, args, kwargs, False)
    if key is None:
        return None
    return key, tuple(_attributes(m) for m in module.modules())


def module_weights(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module``'s parameters and buffers by state-dict name, a tensor held under several names
    under each."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return {n: t for n, t in named.items() if t is not None}


def _memory(t: torch.Tensor) -> Tuple[Optional[Tuple], Any]:
    """``t``'s address, shape, strides and dtype, and its storage (None, None without one)."""
    if t.device.type == "meta" or type(t).__name__ == "FakeTensor":
        return None, None
    try:
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype), t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # (a tensor without storage)
        return None, None


class WeightRecorder(TorchDispatchMode):
    """Records every tensor op run within it; the module's weights are the sources.

    A tensor is known by the object an op returned (held weakly), else by its memory: the
    address, shape, strides and dtype of the last recorded op that returned or wrote such a
    tensor, in the same storage, still alive (``nn.Parameter(t)`` makes a new object of ``t``'s
    memory without an op; memory freed and taken again is another storage)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.sources = module_weights(module)
        self.nodes: List[_Node] = []
        self.by_object: Dict[int, Tuple[weakref.ref, _Ref]] = {}
        self.by_address: Dict[Tuple, Tuple[_Ref, weakref.ref]] = {}
        self.failed: Optional[str] = None  # why the recording stopped, where it did
        for name, t in self.sources.items():
            self.nodes.append(_Node(_Source(name)))
            self._returned(t, _Ref(len(self.nodes) - 1, 0))

    def _returned(self, t: torch.Tensor, ref: _Ref) -> None:
        key = id(t)
        try:
            handle = weakref.ref(t, lambda _, key=key, table=self.by_object: table.pop(key, None))
        except TypeError:
            return
        self.by_object[key] = (handle, ref)
        address, storage = _memory(t)
        if address is not None:
            self.by_address[address] = (ref, weakref.ref(storage))

    def known(self, t: torch.Tensor) -> Optional[_Ref]:
        held = self.by_object.get(id(t))
        if held is not None and held[0]() is t:
            return held[1]
        address, storage = _memory(t)
        held = self.by_address.get(address) if address is not None else None
        return held[0] if held is not None and held[1]() is storage else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.failed is None:
            try:
                self._record(func, args, kwargs, out)
            except Exception as why:  # (the compile goes on as if unrecorded; no program is kept)
                self.failed = f"{type(why).__name__}: {why}"
        return out

    def _record(self, func, args, kwargs, out) -> None:
        leaves, spec = tree_flatten((args, kwargs))
        recorded = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                ref = self.known(leaf)
                recorded.append(ref if ref is not None else _Const(leaf))
            else:
                recorded.append(leaf)
        writes = []
        for i, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            written = args[i] if i < len(args) else kwargs.get(argument.name)
            if isinstance(written, torch.Tensor):
                base = written._base if written._base is not None else written
                ref = self.known(base)
                if ref is not None:
                    writes.append(ref)
        node = len(self.nodes)
        self.nodes.append(_Node(func, spec, tuple(recorded), tuple(writes)))
        for i, t in enumerate(tree_flatten(out)[0]):
            if isinstance(t, torch.Tensor):
                self._returned(t, _Ref(node, i))

    def program(self, compiled: nn.Module) -> Tuple[Optional["WeightProgram"], str]:
        """The ops ``compiled``'s weights come from, as a :class:`WeightProgram` checked on the
        recorded module's own weights; (None, why) where it cannot be kept."""
        if self.failed is not None:
            return None, f"the recording failed ({self.failed})"
        outputs: Dict[str, _Ref] = {}
        for name, t in module_weights(compiled).items():
            ref = self.known(t)
            if ref is None:
                return None, f"the compiled {name} was not computed by a recorded op"
            outputs[name] = ref
        needed: Set[int] = set()
        stack = [r.node for r in outputs.values()]
        writers: Dict[int, List[int]] = {}
        for i, node in enumerate(self.nodes):
            for w in node.writes:
                writers.setdefault(w.node, []).append(i)
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(leaf.node for leaf in self.nodes[n].leaves if isinstance(leaf, _Ref))
            stack.extend(writers.get(n, ()))  # (a write in place into it, through a view or not)
        source_nodes = {i: node.op.name for i, node in enumerate(self.nodes) if isinstance(node.op, _Source)}
        for i in needed:
            for w in self.nodes[i].writes:
                if w.node in source_nodes:
                    return None, f"the compile writes into the module's {source_nodes[w.node]}"
        for i in sorted(needed):
            node = self.nodes[i]
            big = next((leaf.value for leaf in node.leaves if isinstance(leaf, _Const)
                        and leaf.value.numel() > CONSTANT_NUMEL), None)
            if big is not None and getattr(node.op, "overloadpacket", None) not in _VALUE_BLIND:
                return None, (f"{node.op} reads a tensor of {big.numel()} values the recording did not see computed "
                              "(made from Python or NumPy data, which may come from the module's weights)")
        read = {id(self.sources[source_nodes[i]]) for i in needed if i in source_nodes}  # (a tensor of several names)
        gone = [n for n, t in self.sources.items() if n not in outputs and id(t) not in read and t.is_floating_point()]
        if gone:
            return None, f"the module's {gone[0]} is neither kept nor read by the ops of the compiled weights"
        program = WeightProgram([self.nodes[i] if i in needed else None for i in range(len(self.nodes))], outputs)
        replayed = program.run(self.sources)
        for name, t in module_weights(compiled).items():
            if not _same_but_rounding(replayed[name], t):
                return None, f"the ops recorded do not give the compiled {name} again"
        return program, ""


def _same_but_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """``got`` is ``want``, each entry at most an ulp of ``want``'s dtype apart: a product in
    float64 summed in another order (BLAS splits its sums by the operands' alignment in memory,
    which differs from run to run) can round to the neighbouring value when cast to the
    weight's dtype."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if torch.equal(got, want) or not want.is_floating_point():
        return torch.equal(got, want)
    info = torch.finfo(want.dtype)
    a, b = got.double(), want.double()
    return bool(((a - b).abs() <= info.eps * b.abs() + info.tiny).all())


class WeightProgram:
    """Recorded ops from a module's weights to its compiled weights (:class:`WeightRecorder`)."""

    def __init__(self, nodes: List[Optional[_Node]], outputs: Dict[str, _Ref]):
        self.nodes, self.outputs = nodes, outputs
        last: Dict[int, int] = {}
        for i, node in enumerate(nodes):
            if node is not None:
                for leaf in node.leaves:
                    if isinstance(leaf, _Ref):
                        last[leaf.node] = i
        kept = {r.node for r in outputs.values()}
        self.free_after: Dict[int, List[int]] = {}
        for n, i in last.items():
            if n not in kept:
                self.free_after.setdefault(i, []).append(n)

    def run(self, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The compiled weights of a module whose weights (by state-dict name) are ``weights``."""
        values: Dict[int, List[Any]] = {}

        def value(leaf):
            if isinstance(leaf, _Ref):
                return values[leaf.node][leaf.index]
            return leaf.value if isinstance(leaf, _Const) else leaf

        with torch.no_grad():
            for i, node in enumerate(self.nodes):
                if node is None:
                    continue
                if isinstance(node.op, _Source):
                    values[i] = [weights[node.op.name]]
                    continue
                args, kwargs = tree_unflatten([value(leaf) for leaf in node.leaves], node.spec)
                values[i] = tree_flatten(node.op(*args, **kwargs))[0]
                for n in self.free_after.get(i, ()):
                    values.pop(n, None)
        return {name: values[r.node][r.index] for name, r in self.outputs.items()}


def with_weights(compiled: nn.Module, weights: Dict[str, torch.Tensor]) -> nn.Module:
    """A module of ``compiled``'s classes and attributes holding ``weights`` (by state-dict
    name) instead of its own (a forward placement gave a module, :class:`GraphForward`, runs on
    the new module); ``compiled`` is not changed, and no weight is copied."""
    copies: Dict[int, nn.Module] = {}

    def shallow(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            c = copy.copy(module)
            c._parameters, c._buffers = dict(module._parameters), dict(module._buffers)
            c._modules = {}
            if isinstance(vars(module).get("forward"), GraphForward):  # (a forward of the fused graph, on c)
                c.forward = module.forward.bound_to(c)
            copies[id(module)] = c
            for name, child in module._modules.items():
                c._modules[name] = shallow(child) if child is not None else None
        return copies[id(module)]

    root = shallow(compiled)
    for name, t in weights.items():
        path, _, leaf = name.rpartition(".")
        owner = root.get_submodule(path) if path else root
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t
    return root


def check_replayed(replayed: nn.Module, module: nn.Module, args: tuple, kwargs: Dict[str, Any],
                   tolerance: Optional[float] = None, seed: int = 0, expected: Any = None) -> Tuple[float, Optional[str]]:
    """``replayed`` against ``module`` on the call ``(args, kwargs)`` and on random values of its
    shapes, by :func:`repc.verify.check.compare` (relative deviation, the dtype's tolerance
    unless one is given, and beyond it the rounding-noise floor of copies of ``module`` moved by
    an ulp).  Returns (the largest deviation, None) or (it, why the check failed).  The module a
    program was recorded on was compiled and checked in full (other sizes, masks, the calls users
    make); a module it is replayed on computes with the same code, so its own weights are what
    is checked here.  ``expected``: ``module``'s output on the call, where the caller has it."""
    from .api import _flat_calling
    from .verify.check import Variant, _draw, compare

    gen = torch.Generator().manual_seed(seed)
    drawn = tree_map(lambda t: _draw(t, t.shape, gen) if isinstance(t, torch.Tensor) and t.is_floating_point()
                     else t, (args, kwargs))
    flat, as_flat = _flat_calling(args, kwargs)
    drawn_flat, _ = _flat_calling(*drawn)
    held = {i for i, v in enumerate(flat) if not isinstance(v, torch.Tensor)}
    with torch.no_grad():
        reference = as_flat(module)(*drawn_flat)
    result = compare(as_flat(replayed), as_flat(module), flat, tolerance, held, expected=expected,
                     variants=([Variant("random values of its shapes", drawn_flat, reference)], []))
    if result.ok:
        return result.max_deviation, None
    return result.max_deviation, f"on the {result.failing_input}: " + \
        (result.error or f"deviation {result.max_deviation:.2e} > tolerance {result.tolerance:g}")
