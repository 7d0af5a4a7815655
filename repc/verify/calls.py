"""The calls users make: the example's inputs varied the way real inputs vary.

A result is checked on random values of the example's shapes and on other sizes
(:func:`repc.verify.check.compare`), but the models people fuse also branch on *which* inputs
they are given and on the pattern of their integer inputs: transformers builds no attention mask
when the given one is all ones (and passes ``None`` down to its layers), nor when none is given.
A module of the model replaced by a graph traced down one of those branches is valid for that
branch only.  :func:`canonical_calls` lists, next to the example, the calls that pick the other
branches:

* every 0/1 integer or bool input of two or more axes (a mask): all ones, right padding, left
  padding (row ``i`` of a batch of ``B`` loses ``i * T // (2 B)`` positions or more, row 0 none),
  each where it is not the example's own mask already;
* every keyword input the forward has a default for (or takes through ``**kwargs``) left out,
  one at a time;
* another batch size and sequence length at once, each input of token ids (or segment ids)
  drawn across ``[0, max]`` of the example's, masks all ones.

:func:`observe` runs the original model on them with hooks on every module, keeps its outputs
(the references of the check) and the *structure* of each module's calls: which arguments were
tensors (their dtype and rank), ``None``, flags or other objects.  A module called with another
structure on one of them (:attr:`Observation.varying`) takes another branch of its caller's
code there: its forward is never replaced by a traced graph (:mod:`repc.preserve`).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..values import holds_state
from .check import seeded_call


@dataclass
class Call:
    """One call of the model: a name for the report, its inputs, and the original's output."""
    name: str
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    omits: Tuple[str, ...] = ()  # the keyword inputs of the example this call leaves out
    reference: Any = None


def _is_mask(t: Any) -> bool:
    """0/1 integers or bools over two or more axes, some of them 1 (all zeros: segment ids)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.is_floating_point() or t.is_complex() or not t.numel():
        return False
    return bool(((t == 0) | (t == 1)).all()) and bool(t.any())


def _is_ids(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and not t.is_floating_point() and not t.is_complex() \
        and t.dtype is not torch.bool and not _is_mask(t) and t.numel() > 0 and bool((t >= 0).all())


def _padded(mask: torch.Tensor, side: str) -> torch.Tensor:
    """All ones but the last (``side="right"``) or first (else) positions of rows 1.. along axis 1."""
    out = torch.ones_like(mask)
    rows, length = mask.shape[0], mask.shape[1]
    for i in range(1, rows if length > 1 else 0):  # (never a row masked whole)
        cut = max(1, min(length - 1, (i * length) // (2 * rows) + 1))
        if side == "right":
            out[i, length - cut:] = 0
        else:
            out[i, :cut] = 0
    return out


def _map_inputs(args, kwargs, fn):
    return tuple(fn(a) for a in args), {k: fn(v) for k, v in kwargs.items()}


def _omittable(model: nn.Module, kwargs: Dict[str, Any]) -> List[str]:
    """The keyword inputs the forward has a default for, or takes through ``**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return [k for k in kwargs if (k in params and params[k].default is not inspect.Parameter.empty)
            or (k not in params and var_kw)]


_UNSIZED = object()


def _resized(t: Any, batch: int, new_batch: int, length: Optional[int], new_length: Optional[int],
             gen: torch.Generator) -> Any:
    """``t`` at another batch (axis 0) and length (axis 1 where it has the token length), ids
    drawn in ``[0, max]`` of their own, masks all ones, other values drawn at random."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    shape = list(t.shape)
    if shape[0] == batch:
        shape[0] = new_batch
    if length is not None and t.dim() >= 2 and shape[1] == length:
        shape[1] = new_length
    if shape == list(t.shape):
        return t
    if _is_mask(t):
        return torch.ones(shape, dtype=t.dtype, device=t.device)
    if _is_ids(t):
        return torch.randint(0, int(t.max()) + 1, shape, generator=gen, dtype=torch.int64).to(t.dtype).to(t.device)
    if t.is_floating_point():
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * t.double().std().nan_to_num(1.0)
                + t.double().mean().nan_to_num(0.0)).to(t.dtype).to(t.device)
    return _UNSIZED  # (another integer input: not resized)


def canonical_calls(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], seed: int = 0) -> List[Call]:
    """The example and the calls that pick the model's other branches (see the module
    docstring); only the example where the inputs have no mask, no id and no keyword input
    that can be left out (a model of float inputs branches on sizes alone, which the check's
    other sizes cover)."""
    calls = [Call("example", tuple(args), dict(kwargs))]
    leaves = pytree.tree_leaves((args, kwargs))
    masks = [t for t in leaves if _is_mask(t)]
    ids = [t for t in leaves if _is_ids(t)]
    for pattern in ("all-ones", "right-padded", "left-padded") if masks else ():
        def fill(v, pattern=pattern):
            return pytree.tree_map(lambda t: (torch.ones_like(t) if pattern == "all-ones" else
                                              _padded(t, pattern.split("-")[0])) if _is_mask(t) else t, v)
        call = Call(f"{pattern} mask", *_map_inputs(args, kwargs, fill))
        if not any(_same_inputs(call, c) for c in calls):  # (the example's mask may be all ones already)
            calls.append(call)
    for name in _omittable(model, kwargs):
        if kwargs[name] is None or not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(kwargs[name])):
            continue
        calls.append(Call(f"without {name}", tuple(args), {k: v for k, v in kwargs.items() if k != name}, (name,)))
    tokens = masks + ids
    if tokens:
        batch, length = tokens[0].shape[0], tokens[0].shape[1]
        new_length = length - 1 if length > 2 else length + 1
        gen = torch.Generator().manual_seed(seed)
        resized = _map_inputs(args, kwargs, lambda v: pytree.tree_map(
            lambda t: _resized(t, batch, batch + 1, length, new_length, gen), v))
        if not any(v is _UNSIZED for v in pytree.tree_leaves(resized)):
            calls.append(Call(f"batch {batch + 1}, length {new_length}, random ids", *resized))
    return calls


def _same_inputs(a: Call, b: Call) -> bool:
    """Two calls with equal inputs (the same structure, equal tensors): one run tells both."""
    return equal_values((a.args, a.kwargs), (b.args, b.kwargs))


def equal_values(a: Any, b: Any) -> bool:
    """Two (nested) values of one structure with equal leaves: tensors of one dtype and shape,
    equal in every entry; numbers, flags and strings equal; any other object the same one."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    return all(_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def _equal(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype \
            and x.shape == y.shape and torch.equal(x, y)
    return x is y or (type(x) is type(y) and isinstance(x, (bool, int, float, str)) and x == y)


def _describe(value: Any) -> Any:
    """What a branch of Python code can tell apart in an argument: a tensor's dtype and rank,
    ``None``, a flag's or a string's value, another object's type."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.dim())
    if value is None or isinstance(value, (bool, str)):
        return value
    return type(value).__name__


def call_structure(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return str(spec), tuple(_describe(v) for v in leaves)


@dataclass
class Observation:
    """The original model run on the canonical calls: each call with its output, and the modules
    whose forward stays the model's code (path -> why): their calls differ in structure between
    them (the first call where they do), or they are given an object they may update in place (a
    decoder layer's key/value cache, which a graph of their forward would not update)."""
    calls: List[Call]
    varying: Dict[str, str] = field(default_factory=dict)


def observe(model: nn.Module, calls: List[Call], around_example=contextlib.nullcontext) -> Observation:
    """Run ``model`` on ``calls`` (the first is the example: the model failing on it raises; its
    module calls are recorded only where there are other calls to compare them with); calls the
    model itself refuses are dropped.  The example's call runs inside ``around_example()`` (a
    context that records what that run does, for a caller that would otherwise run it again)."""
    if len(calls) == 1:
        with torch.no_grad(), around_example():
            calls[0].reference = seeded_call(model, *calls[0].args, **calls[0].kwargs)
        return Observation(calls)
    structures: List[Dict[str, List[Any]]] = []
    hooks = []
    current: Dict[str, List[Any]] = {}
    given: Dict[str, str] = {}  # path -> the type of an object it is given (a cache it may update)
    for name, module in model.named_modules():
        def before(m, a, k, name=name):
            current.setdefault(name, []).append(call_structure(a, k))
            if name not in given:
                opaque = next((v for v in pytree.tree_leaves((a, k)) if holds_state(v)), None)
                if opaque is not None:
                    given[name] = type(opaque).__name__
        hooks.append(module.register_forward_pre_hook(before, with_kwargs=True))
    kept = []
    try:
        with torch.no_grad():
            for i, call in enumerate(calls):
                current = {}
                try:
                    with around_example() if i == 0 else contextlib.nullcontext():
                        out = seeded_call(model, *call.args, **call.kwargs)
                except Exception:
                    if i == 0:
                        raise
                    continue  # the model itself does not take this call
                call.reference = out
                structures.append(current)
                kept.append(call)
    finally:
        for h in hooks:
            h.remove()
    varying = {path: f"given a {kind}, which its forward may update in place" for path, kind in given.items()}
    first = structures[0]
    for call, seen in zip(kept[1:], structures[1:]):
        for path in set(first) | set(seen):
            if path not in varying and first.get(path) != seen.get(path):
                varying[path] = f"called with other arguments on the {call.name} input"
    return Observation(kept, varying)
