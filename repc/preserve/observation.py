"""The model's own calls on the example (:func:`record_calls`: each module's arguments and output)
and the comparisons that match them with the fused graph's values; a merged layer given back in
the layer's own class where that computes the same (:func:`in_the_layers_own_class`)."""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..verify.check import seeded_call
from .provenance import _Refused


# ----------------------------------------------------------------------------- the example's calls

@dataclass
class _Call:
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    output: Any
    count: int = 1

    def run(self, module: Callable) -> Any:
        """``module`` called on copies of the recorded arguments: the records share their copies
        (a module's output is the next one's input) and serve every write-back of a compile, so
        a module that writes its argument in place must not write them."""
        args, kwargs = pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                                       (self.args, self.kwargs))
        return module(*args, **kwargs)


def record_calls(model: nn.Module, args, kwargs) -> Dict[str, _Call]:
    """Each submodule's first call on the example (its arguments and output) and how often it ran."""
    with calls_recorded(model) as calls, torch.no_grad():
        seeded_call(model, *args, **kwargs)  # (drawing at random as the checks' calls do)
    return calls


@contextlib.contextmanager
def calls_recorded(model: nn.Module, calls: Optional[Dict[str, _Call]] = None,
                   budget: Optional[int] = None) -> Iterator[Dict[str, _Call]]:
    """While inside, each submodule's first call (its arguments and output, copied) and how often
    it ran are recorded into ``calls`` (a new dict where not given), which is yielded: what
    :func:`record_calls` records, for a caller that runs the model on the example itself
    (:func:`repc.verify.calls.observe`, whose run gives the check's reference too: the model is
    not run once more to place the regions).  ``budget``: the bytes the copies may take; past
    it, recording stops and ``calls`` is left empty (a net of large maps: the caller records
    again later, when it needs them, rather than hold them)."""
    calls = {} if calls is None else calls
    given: Dict[str, Tuple[Any, Any]] = {}
    hooks = []
    copies: Dict[int, Tuple[Any, int, torch.Tensor]] = {}  # id -> (weak reference, version, its copy)
    held = [0, False]  # bytes copied, over the budget

    def copy_of(v: torch.Tensor) -> torch.Tensor:
        # one copy per tensor and version: a module's output is the next one's input, and a LoRA
        # layer's input that of its base layer, dropout and adapter
        hit = copies.get(id(v))
        if hit is not None and hit[0]() is v and hit[1] == v._version:
            return hit[2]
        held[0] += v.numel() * v.element_size()
        if budget is not None and held[0] > budget and not held[1]:
            held[1] = True
            calls.clear()
            given.clear()
            copies.clear()
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
            if name not in calls and name not in given and not held[1]:
                arguments = (kept(tuple(a)), kept(dict(k)))
                if not held[1]:  # (the copies may have passed the budget)
                    given[name] = arguments

        def hook(m, a, k, out, name=name):
            if held[1]:
                return
            if name in calls:
                calls[name].count += 1
            else:
                a, k = given.pop(name, (tuple(a), dict(k)))
                output = kept(out)
                if not held[1]:
                    calls[name] = _Call(a, k, output)
        hooks.append(module.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()
        copies.clear()


def graph_values(gm: fx.GraphModule, flat_inputs) -> Dict[fx.Node, Any]:
    """Every node's value when ``gm`` runs on its flat inputs."""
    values: Dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.no_grad():
        seeded_call(Recorder(gm).run, *flat_inputs, enable_io_processing=False)
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
            got = call.run(replacement)
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


