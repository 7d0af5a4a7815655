"""What a swapped-in module is: a forward run as the code of a graph (:class:`GraphForward`),
the names a checkpoint gives its tensors (:func:`saved_names`, :func:`keeping_parameter_names`),
PEFT's layers and the wrappers that only delegate (:func:`is_peft_layer`,
:func:`unwrap_delegating`), and copies that share nothing with the model (:func:`own_copies`)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import inspect
import sys
from typing import Any, Callable, Dict, List, Optional, Set

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..capture_export import GUARD_WORDS, guard_expression, guard_holds, guard_inputs
from ..report import ModuleSwap
from ..values import holds_state
from ..verify.calls import equal_values
from .provenance import _Refused, _class_name
from .observation import _Call


# ----------------------------------------------------------------------------- building the swaps

def _merged_away_name(module: nn.Module) -> str:
    return "Identity" if isinstance(module, nn.Identity) else f"{type(module).__name__} (identity statistics)"


class GraphForward:
    """A module's ``forward`` (an instance attribute) run as the code of an fx graph over the
    module's own attributes: they are read at each call, so ``.to()``, ``.half()`` and
    ``load_state_dict`` on the module reach what it computes with.  It keeps the graph's Python
    source (as a ``GraphModule`` pickles itself), so it pickles and deep-copies with its module.
    ``output_spec``: the pytree spec of the module's output where it is not made of tuples, lists
    and dicts (a dataclass, a ``ModelOutput``): the graph gives its leaves, rebuilt with it."""

    def __init__(self, owner: nn.Module, graph: fx.Graph, output_spec=None):
        from torch.fx.graph_module import _format_import_block
        from torch.package import sys_importer
        code = graph.python_code(root_module="self")
        self.owner, self.source = owner, _format_import_block(code.globals, sys_importer) + code.src
        # (held as plain tuples: a TreeSpec warns where it is pickled or deep-copied)
        self.output_structure = None if output_spec is None else _structure(output_spec)
        self._function, self._spec = None, output_spec

    def __call__(self, *args, **kwargs):
        if self._function is None:
            from torch.fx.graph_module import _forward_from_src
            self._function = _forward_from_src(self.source, {})
        out = self._function(self.owner, *args, **kwargs)
        if self.output_structure is None:
            return out
        if self._spec is None:
            self._spec = _spec(self.output_structure)
        return pytree.tree_unflatten(list(out), self._spec)

    def bound_to(self, owner: nn.Module) -> "GraphForward":
        """The same code run on ``owner``'s attributes."""
        other = copy.copy(self)
        other.owner = owner
        return other

    def __getstate__(self):
        return {"owner": self.owner, "source": self.source, "output_structure": self.output_structure}

    def __setstate__(self, state):
        self.owner, self.source, self._function, self._spec = state["owner"], state["source"], None, None
        self.output_structure = state.get("output_structure")


def _structure(spec):
    """A pytree spec as nested tuples ``(type, context, children)``, a leaf as None."""
    return None if spec.is_leaf() else (spec.type, spec.context, tuple(_structure(c) for c in spec.children()))


def _spec(structure):
    return pytree.treespec_leaf() if structure is None else \
        pytree.TreeSpec(structure[0], structure[1], [_spec(c) for c in structure[2]])


class InputGuards:
    """Export's conditions on the model's inputs (what its graph holds for), checked before each
    call of a module-preserving result whose modules run parts of that graph: an input the graph
    does not hold for (the other side of ``if x.shape[-1] > 4`` in a module whose forward is now
    its part of the graph) is refused with export's condition, as the whole-model graph refuses
    it, instead of computing the example's branch.  A forward pre-hook (``with_kwargs``); each
    guard reads the inputs at the places (argument name, then items or attributes) the example
    had them, and is not applied to a call that leaves one of them out or gives a non-tensor
    there (a call of another structure: an attention mask left out).  It pickles as the guards'
    code; their parsed form and the forward's signature are made again on the first call."""

    def __init__(self, guards, places: Dict[int, tuple]):
        self.guards = list(guards)  # (code over the flat inputs P[i], the same over the arguments' names)
        self.places = places  # flat input of the capture -> (argument name, (kind, key)...)
        self._parsed, self._signature = None, None

    def __getstate__(self):
        return {"guards": self.guards, "places": self.places}

    def __setstate__(self, state):
        self.guards, self.places, self._parsed, self._signature = state["guards"], state["places"], None, None

    @classmethod
    def made(cls, module: nn.Module, guards, flat_inputs, args, kwargs) -> Optional["InputGuards"]:
        """The guards for ``module`` (the result's root) called as on the example ``(args,
        kwargs)``, whose tensor leaves ``flat_inputs`` (the capture's, by identity) the guards
        read; None where a guard reads an input the example's arguments do not place."""
        bound = _bound_arguments(module, args, kwargs)
        if bound is None:
            return None
        where: Dict[int, tuple] = {}
        for path, leaf in pytree.tree_flatten_with_path(bound)[0]:
            if isinstance(leaf, torch.Tensor):
                where.setdefault(id(leaf), (path[0].key,) + _plain_path(path[1:]))
        places = {i: where[id(v)] for i, v in enumerate(flat_inputs) if isinstance(v, torch.Tensor) and id(v) in where}
        read = {i for code, _ in guards for i in guard_inputs(guard_expression(code))}
        if not read <= set(places):
            return None
        return cls(guards, places)

    def __call__(self, module: nn.Module, args, kwargs):
        if self._signature is None:
            self._signature = inspect.signature(type(module).forward)
        bound = _bound_arguments(module, args, kwargs, self._signature)
        if bound is None:
            return None  # (the forward refuses the call itself)
        if self._parsed is None:
            self._parsed = [(expression, words, guard_inputs(expression))
                            for expression, words in ((guard_expression(code), words) for code, words in self.guards)]
        values = {i: _at(bound, place) for i, place in self.places.items()}
        for expression, words, read in self._parsed:
            if all(isinstance(values.get(i), torch.Tensor) for i in read) and not guard_holds(expression, values):
                raise AssertionError(f"{GUARD_WORDS} {words}")
        return None


def _bound_arguments(module: nn.Module, args, kwargs, signature=None) -> Optional[Dict[str, Any]]:
    """The call's arguments by the name of the module class's ``forward`` parameter (``signature``:
    that forward's, where the caller has it)."""
    try:
        bound = (signature or inspect.signature(type(module).forward)).bind(module, *args, **kwargs)
    except (TypeError, ValueError):
        return None
    arguments = dict(bound.arguments)
    arguments.pop(next(iter(arguments)), None)  # (the module itself)
    return arguments


def _plain_path(path) -> tuple:
    """A pytree key path as plain values: ``("attr", name)`` or ``("item", key)`` per step."""
    return tuple(("attr", k.name) if isinstance(k, pytree.GetAttrKey) else
                 ("item", k.key if isinstance(k, pytree.MappingKey) else k.idx) for k in path)


def _at(arguments: Dict[str, Any], place: tuple):
    """The value at ``place`` (an argument's name, then its steps) in the bound ``arguments``."""
    value = arguments.get(place[0])
    for kind, key in place[1:]:
        try:
            value = getattr(value, key) if kind == "attr" else value[key]
        except (AttributeError, KeyError, IndexError, TypeError):
            return None
    return value


def runs_graph_code(module: nn.Module, model: nn.Module) -> bool:
    """A module of ``module`` (a result) that is not one of ``model``'s runs graph code: a
    GraphModule, or a module whose forward is its part of a fused graph (:class:`GraphForward`)."""
    own = {id(m) for m in model.modules()}
    return any((id(m) not in own and isinstance(m, fx.GraphModule)) or isinstance(m.__dict__.get("forward"), GraphForward)
               for m in module.modules())


def _refuse_given_state(call: "_Call") -> None:
    """A module given an object its forward may update (a decoder layer's key/value cache): a
    graph of its forward would not update it (the calls users make say so before the build where
    there are several; this holds where the example is the only one)."""
    given = next((v for v in pytree.tree_leaves((call.args, call.kwargs)) if holds_state(v)), None)
    if given is not None:
        raise _Refused(f"it is given a {type(given).__name__}, which its forward may update in place")


_RENAMES = "a graph in its place would rename its parameters in the checkpoint save_pretrained writes"


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


def keeping_names() -> bool:
    """Whether models are written back as ones saved by parameter names are (within
    :func:`keeping_parameter_names`)."""
    return _KEEPING_NAMES


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
        replacement = module.get_submodule(inner)
        if not _same_called_alone(replacement, call):
            continue
        parent, _, name = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, name, replacement)
        swaps.append(ModuleSwap(path, _class_name(module), _class_name(replacement), [],
                                f"its call is one of {inner}'s, which takes its place"))
    return swaps


def _same_called_alone(inner: nn.Module, call: "_Call") -> bool:
    """``inner`` called on its own, outside the wrapper, gives the wrapper's output: the wrapper
    changes nothing around its call (PEFT's ``ParamWrapper`` swaps LoRA-updated weights into its
    base layer for the call, which then gives the adapted output inside it only)."""
    try:
        with torch.no_grad():
            again = call.run(inner)
    except Exception:
        return False
    return equal_values(again, call.output)


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

