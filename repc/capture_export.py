"""Capture through ``torch.export`` (non-strict): the model's Python runs as Python.

Wrappers forwarding ``*args, **kwargs``, decorators, asserts on ranks, shape reads and
size-dependent branches, keyword inputs and ``ModelOutput`` dataclasses all run as the model
wrote them; export records the tensor ops as an ATen graph with the parameters and buffers
lifted.  This module turns that into the graph the rest of repc reads:

* every axis of every tensor input is exported as ``Dim.AUTO`` (export keeps static what the
  model needs static), from an example whose batch is at least 2 (export specializes axes of
  size 1);
* the parameters and buffers are attributes again (``get_attr``), the inputs and outputs flat
  (one placeholder per tensor leaf of ``(args, kwargs)``, a tuple of output leaves), and the
  model's calling convention (its pytree specs) is kept aside for the result;
* export's guards (the conditions under which the graph is the model: static sizes, ranges,
  equal sizes, the conditions of size-dependent branches) become ``torch._assert`` nodes, so
  the fused result refuses inputs its graph does not hold for instead of computing something
  else;
* ATen calls are written as torch-level calls (:mod:`repc.aten`).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import inspect
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .aten import lower_aten
from .capture import CaptureError, python_state_kept
from .graph_predicates import SYMBOLIC_SIZES, fetch_attr, short_error
from .values import has_opaque, without_opaque


@dataclass
class ExportedGraph:
    """A model captured by ``torch.export``, as a flat torch-level graph."""
    gm: fx.GraphModule  # placeholders: the tensor leaves of (args, kwargs); output: a tuple of leaves
    flat_inputs: Tuple[Any, ...]  # the example's leaves, in placeholder order
    in_spec: Any  # pytree spec of (args, kwargs)
    out_spec: Any  # pytree spec of the model's output
    guards: List[Tuple[str, str]]  # export's conditions on the inputs: (code over ``P[i]``, words)
    argument_names: List[str]  # one per positional input, then the keyword inputs' names
    prefix: str = ""  # the name of the model in its nodes' module paths where export was given a wrapper
    # (flat input, axis, a size just outside those the graph holds for): one above each size export
    # bounded from above, one below each it bounded from below beyond its own floor of 2, where the
    # example took one side of a test on a size (``if x.shape[-1] > 12``)
    sizes_outside: List[Tuple[int, int, int]] = dataclasses.field(default_factory=list)

    def fresh(self) -> "ExportedGraph":
        """This capture with a graph of its own to edit (the same tensors and leaf modules): a
        second build of the model (confined to its modules) need not export it again."""
        gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph), class_name=type(self.gm).__name__)
        return dataclasses.replace(self, gm=gm)

    def give_signature(self, gm: fx.GraphModule, defaults: Dict[str, Any]) -> None:
        """Give ``gm`` (this capture's flat graph, fused) the model's calling convention.

        Where every input is a single value (a tensor, a number, None) and the output is made
        of tuples, lists and dicts, the placeholders take the arguments' names and the output
        node the output's structure: a plain graph.  An argument given as None, and the
        forward's optional arguments the example left out (``defaults``, at their default),
        are arguments too, and refuse other values (the graph computed that value's path).
        Otherwise (nested inputs, a ``ModelOutput``) the graph flattens and rebuilds them with
        the model's pytree specs."""
        graph = gm.graph
        placeholders = graph.find_nodes(op="placeholder")
        output = graph.find_nodes(op="output")[0]
        args_spec, kwargs_spec = self.in_spec.children()
        plain_inputs = len(placeholders) == len(self.argument_names) and \
            all(spec.is_leaf() for spec in args_spec.children() + kwargs_spec.children())
        if not (plain_inputs and _builtin_containers(self.out_spec)):
            graph.set_codegen(fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(self.argument_names, self.in_spec,
                                                                            self.out_spec)))
            gm.recompile()
            return
        output.args = (pytree.tree_unflatten(list(output.args[0]), self.out_spec),)
        fixed = {}  # arguments the graph computed one value's path for: None, or a default left out
        for node, name, value in zip(placeholders, self.argument_names, self.flat_inputs):
            node.target = name
            if value is None:  # (export guards the other non-tensor values it was given)
                fixed[name] = None
        last = placeholders[-1] if placeholders else None
        for name, value in defaults.items():
            with graph.inserting_after(last) if last is not None else graph.inserting_before(None):
                last = graph.placeholder(name, default_value=value)
            fixed[name] = value
        for name, value in fixed.items():
            node = next(n for n in graph.find_nodes(op="placeholder") if n.target == name)
            with graph.inserting_after(last):
                same = graph.call_function(operator.is_ if value is None else operator.eq, (node, value))
            with graph.inserting_after(same):
                last = graph.call_function(torch._assert, (same, f"{name} has been specialized to {value!r}"))
        gm.recompile()


class _Called(nn.Module):
    """``model(*args, **kwargs)`` with ``args`` and ``kwargs`` as two plain inputs: how a forward
    that takes ``*args, **kwargs`` (a PEFT wrapper) is exported with dynamic shapes."""

    def __init__(self, model: nn.Module, plain_output: bool = False):
        super().__init__()
        self.model, self.plain_output = model, plain_output

    def forward(self, args, kwargs):
        out = self.model(*args, **kwargs)
        return without_opaque(out) if self.plain_output else out


GUARD_WORDS = "repc: the fused graph holds only where"  # how a failed guard of an exported graph begins
_EXPORT_META = ("example_value", "unbacked_bindings", "tensor_meta")  # fake tensors, export's shapes ("val" goes last)


class CaptureCache:
    """Exported programs kept by the structure of what was exported, so that a module made and
    called as one exported before (each decoder layer of a language model after the first) is
    given that program with its own weights instead of being exported again.

    The key holds the classes of the module and of every submodule, the names, shapes and
    dtypes of its parameters and buffers, and the call: the structure of the inputs, each
    tensor's shape and dtype, every other input's value.  It does not hold the modules' other
    attributes (a layer's index, a per-layer constant), so a program taken from the cache is
    the module's own only where those do not change its code's ops: whoever takes one verifies
    the result against the module itself, and captures afresh where that fails
    (:attr:`took`).  The programs kept hold no weights (theirs are put on the meta device)."""

    def __init__(self):
        self.programs: Dict[Any, Any] = {}
        self.took = False  # whether the last capture came from the cache

    @staticmethod
    def key(module: nn.Module, args, kwargs, plain_output: bool) -> Optional[Tuple]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        call = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                call.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device.type))
            elif leaf is None or isinstance(leaf, (bool, int, float, str)):
                call.append(("value", type(leaf), leaf))
            else:
                return None  # (an object: its state may change the trace)
        structure = tuple((path, type(m)) for path, m in module.named_modules(remove_duplicate=False))
        weights = tuple((name, tuple(t.shape), t.dtype) for name, t in
                        list(module.named_parameters(remove_duplicate=False)) +
                        list(module.named_buffers(remove_duplicate=False)))
        return structure, weights, str(spec), tuple(call), plain_output

    def take(self, key, module: nn.Module):
        """The program kept under ``key``, with ``module``'s own weights; None if there is none."""
        self.took = False
        kept = self.programs.get(key)
        if kept is None:
            return None
        own = dict(module.named_parameters(remove_duplicate=False))
        own.update(module.named_buffers(remove_duplicate=False))
        try:
            state = {name: own[name] for name in kept.state_dict}
        except KeyError:
            return None
        constants = {name: own.get(name, value) for name, value in kept.constants.items()}
        try:
            ep = kept._update(kept.graph_module, kept.graph_signature, state_dict=state, constants=constants)
        except Exception:  # (torch's own checks of a program: exported afresh)
            return None
        self.took = True
        return ep

    def keep(self, key, ep) -> None:
        def weightless(t):
            if not isinstance(t, torch.Tensor):
                return t
            empty = torch.empty_like(t, device="meta")
            return nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty

        try:
            self.programs[key] = ep._update(ep.graph_module, ep.graph_signature,
                                            state_dict={name: weightless(t) for name, t in ep.state_dict.items()},
                                            constants=dict(ep.constants))
        except Exception:  # (torch's own checks of a program: this one is not kept)
            pass


_CAPTURES: Optional[CaptureCache] = None


@contextlib.contextmanager
def reusing_captures(cache: Optional[CaptureCache]):
    """Within: :func:`export_graph` takes and keeps programs in ``cache`` (None: it does not)."""
    global _CAPTURES
    before, _CAPTURES = _CAPTURES, cache
    try:
        yield cache
    finally:
        _CAPTURES = before


def export_program(model: nn.Module, args: Tuple[Any, ...], kwargs: Optional[Dict[str, Any]] = None):
    """``torch.export`` of ``model`` with every axis it allows dynamic (``Dim.AUTO``, from an example
    whose batch is at least 2), or fixed to the example's shapes where that fails."""
    kwargs = kwargs or {}
    for example_args, example_kwargs in _examples(args, kwargs):
        try:
            return torch.export.export(model, example_args, example_kwargs, strict=False,
                                       dynamic_shapes=_auto_shapes(model, example_args, example_kwargs))
        except Exception:
            continue
    return torch.export.export(model, tuple(args), kwargs, strict=False)


def export_graph(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any = None
                 ) -> ExportedGraph:
    """Capture ``model`` on ``(args, kwargs)`` through ``torch.export``; :class:`CaptureError` says why not.

    ``output``, the model's output on them where the caller has it: where it holds objects
    export takes no output of (a decoder's key/value cache), the graph is captured with those
    set to None (:func:`repc.values.without_opaque`): it computes the rest, and is not the
    model's function as a whole (its output differs there, so no check passes it as one)."""
    leaves, in_spec = pytree.tree_flatten((args, kwargs))  # non-tensor leaves: export guards their value
    names = _argument_names(model, args, kwargs)
    plain_output = has_opaque(output)
    wrapped = names is None or plain_output
    exported = _Called(model, plain_output) if wrapped else model
    cache = _CAPTURES
    if cache is not None:
        cache.took = False
    key = cache.key(exported, args, kwargs, plain_output) if cache is not None else None
    ep = cache.take(key, exported) if key is not None else None
    first_error = None
    for example_args, example_kwargs in (_examples(args, kwargs) if ep is None else ()):
        if wrapped:
            example_args, example_kwargs = (example_args, example_kwargs), {}
        try:
            # (export runs the forward's Python on fake tensors; what it stores is put back, so
            # torch's warning about a tensor attribute assigned during export says nothing here)
            with python_state_kept(model), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The tensor attribute .* was assigned during export")
                ep = torch.export.export(exported, example_args, example_kwargs, strict=False,
                                         dynamic_shapes=_auto_shapes(exported, example_args, example_kwargs))
            break
        except Exception as why:  # a model export cannot run as Python under fake tensors
            first_error = first_error or why
    if ep is not None and key is not None and not cache.took:
        cache.keep(key, ep)
    if ep is None:
        raise CaptureError(f"torch.export failed: {short_error(first_error)}")
    unlifted = ep.module(check_guards=False)
    try:
        guards = _guard_code(ep, unlifted)
    except Exception as why:  # (torch's own helpers for them, which may change between versions)
        raise CaptureError(f"torch.export's guards could not be read: {short_error(why)}") from why
    prefix = "model." if wrapped else ""
    outside = _sizes_outside(ep, unlifted)
    gm = _flat_graph(unlifted, guards, prefix)
    lower_aten(gm)
    calls_of_standard_modules(gm, model, prefix)
    modules_for_layer_calls(gm)
    for node in gm.graph.nodes:
        symbolic = _symbolic_sizes(node.meta.pop("val", None))
        if symbolic is not None:
            node.meta[SYMBOLIC_SIZES] = symbolic
    if names is None:
        names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    return ExportedGraph(gm, tuple(leaves), in_spec, unlifted._out_spec, guards, names, prefix, outside)


def _symbolic_sizes(value) -> Any:
    """What export knows of a node's sizes, where one is symbolic: a size's expression over the
    inputs' size symbols (a sympy expression), or a tensor's, one per axis (an int where fixed)."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape):
        return tuple(size.node.expr if isinstance(size, torch.SymInt) else int(size) for size in value.shape)
    return None


def _sizes_outside(ep, unlifted: fx.GraphModule) -> List[Tuple[int, int, int]]:
    """(flat input, axis, size) one above the largest and one below the smallest size export
    holds each input axis to (its range constraint; below only where that is above export's own
    floor of 2 for a dynamic size): the graph computes the branch the example took, which holds
    within them only.  The checks try those sizes, where the model may take its other branch."""
    from torch.utils._sympy.numbers import int_oo
    outside = []
    for i, node in enumerate(unlifted.graph.find_nodes(op="placeholder")):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        for axis, size in enumerate(value.shape):
            if not isinstance(size, torch.SymInt):
                continue
            bounds = ep.range_constraints.get(size.node.expr)
            if bounds is None:
                continue
            if bounds.upper != int_oo and getattr(bounds.upper, "is_Integer", False):
                outside.append((i, axis, int(bounds.upper) + 1))
            if getattr(bounds.lower, "is_Integer", False) and int(bounds.lower) > 2:
                outside.append((i, axis, int(bounds.lower) - 1))
    return outside


def register_output_dataclasses(output: Any) -> List[type]:
    """Register the dataclass types found in ``output`` (a model's ``Output(logits=..., ...)``)
    with pytree, as export needs to flatten them; types pytree knows already are left alone.
    Returns the types registered (the registration is process-wide, as libraries do it)."""
    import dataclasses
    registered, seen = [], set()

    def visit(value):
        if id(value) in seen:
            return
        seen.add(id(value))
        cls = type(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and cls not in pytree.SUPPORTED_NODES:
            try:
                torch.export.register_dataclass(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
                registered.append(cls)
            except Exception:
                return  # (a type pytree cannot take: compared as a whole, export refuses it)
        if cls in pytree.SUPPORTED_NODES:
            for child in pytree.tree_flatten(value, is_leaf=lambda v: v is not value)[0]:
                visit(child)
    visit(output)
    return registered


def _builtin_containers(spec) -> bool:
    """Whether a pytree spec is made of leaves, tuples, lists and dicts only (what fx's output holds)."""
    return spec.is_leaf() or spec.type in (tuple, list, dict) and all(_builtin_containers(c) for c in spec.children())


def _argument_names(model: nn.Module, args, kwargs) -> Optional[List[str]]:
    """The forward's names for the positional inputs, then the keywords; None where it takes
    ``*args`` or ``**kwargs`` for them (export is then given the inputs as two plain values)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    parameters = bound.signature.parameters
    if any(parameters[n].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
           for n in bound.arguments):
        return None
    return list(bound.arguments)


def _examples(args, kwargs):
    """The example with batch axes of size 1 made 2 (export would fix them to 1), then as given.

    A leading axis of 1 where another input of the same rank has a larger one is a broadcast
    axis, not a batch (the rotary tables of a decoder layer beside its hidden states): made 2,
    export would tie it to the other's batch, a relation the example itself does not hold."""
    batched_ranks = {t.dim() for t in pytree.tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] > 1}

    def widen(t):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == 1 and t.dim() not in batched_ranks:
            return torch.cat([t, t])
        return t
    widened = pytree.tree_map(widen, (args, kwargs))
    if any(a is not b for a, b in zip(pytree.tree_leaves(widened), pytree.tree_leaves((args, kwargs)))):
        yield widened
    yield args, kwargs


def _auto_shapes(model: nn.Module, args, kwargs) -> Dict[str, Any]:
    """``Dim.AUTO`` on every axis of every tensor input, by the forward's argument names."""
    auto = torch.export.Dim.AUTO
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: pytree.tree_map(lambda t: {i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor)
                                  else None, value)
            for name, value in bound.arguments.items()}


def _guard_code(ep, unlifted: fx.GraphModule) -> List[Tuple[str, str]]:
    """Export's conditions on the inputs (what ``ep.module()`` checks): (code over the flat
    inputs ``P[i]``, the same over the inputs' names)."""
    from torch.export import _unlift
    placeholders = unlifted.graph.find_nodes(op="placeholder")
    signature = inspect.signature(unlifted.forward)
    paths = _unlift._get_input_paths(ep.example_inputs, signature)
    code = _unlift._get_input_guards_for_graph(placeholders, ep.range_constraints, paths)
    code.extend(_unlift._force_gm_signature_match(_unlift._force_ep_signature_match(ep._guards_code, paths),
                                                  signature))
    return [(_replace_paths(c, paths, lambda i, path: f"P[{i}]"),
             _replace_paths(c, paths, lambda i, path: path[0].key + pytree.keystr(path[1:]))) for c in code]


def _replace_paths(code: str, paths, name) -> str:
    """``L['x']['k']`` -> ``name(i, path)`` for the i-th flat input: ``P[i]`` in the code the
    graph runs, ``x['k']`` in its message."""
    for i, path in sorted(enumerate(paths), key=lambda p: -len(pytree.keystr(p[1]))):
        code = code.replace("L" + pytree.keystr(path), name(i, path))
    return code


def _flat_graph(unlifted: fx.GraphModule, guards: List[Tuple[str, str]], prefix: str) -> fx.GraphModule:
    """``unlifted``'s graph with a flat signature and output, its guards as assert nodes; the
    attributes under ``prefix`` (the wrapped model's) named as the model names them."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    source = list(unlifted.graph.nodes)
    placeholders = [n for n in source if n.op == "placeholder"]
    for node in placeholders:
        env[node] = graph.placeholder(node.target)
        env[node].meta.update(_kept_meta(node))
    inputs = [env[n] for n in placeholders]
    attributes: Dict[str, Any] = {}  # the new graph's attribute and module targets -> their values
    translator = _GuardTranslator(graph, inputs)  # one for all: each size is read once
    for code, words in dict.fromkeys(guards):
        condition = translator.visit(guard_expression(code))
        graph.call_function(torch._assert, (condition, f"{GUARD_WORDS} {words}"))
    for node in source:
        if node.op == "placeholder":
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        if node.op == "output":
            leaves = node.args[0]
            graph.output(tuple(fx.node.map_arg(leaves, env.__getitem__)))
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
        env[node].meta = _kept_meta(node)
        if node.op == "get_attr":
            if prefix and node.target.startswith(prefix):
                env[node].target = node.target[len(prefix):]
            attributes[env[node].target] = fetch_attr(unlifted, node.target)
        elif node.op == "call_module":
            attributes[node.target] = unlifted.get_submodule(node.target)
    return fx.GraphModule(attributes, graph, class_name=type(unlifted).__name__)


def _kept_meta(node: fx.Node) -> Dict[str, Any]:
    return {k: v for k, v in node.meta.items() if k not in _EXPORT_META}


_COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
                ast.Gt: operator.gt, ast.GtE: operator.ge}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Pow: operator.pow, ast.Div: operator.truediv}


_FUNCTIONS = {"max": max, "min": min, "Max": max, "Min": min, "abs": abs}  # as sympy's printer writes them
# as export writes a guard on a size the model computed with them (``min(ws, H)`` on a SymInt)
_MODULE_FUNCTIONS = {("torch", "sym_max"): max, ("torch", "sym_min"): min, ("torch", "sym_not"): operator.not_,
                     ("torch", "sym_float"): float, ("torch", "sym_int"): int, ("math", "floor"): math.floor,
                     ("math", "ceil"): math.ceil, ("math", "trunc"): math.trunc}


class _GuardTranslator(ast.NodeVisitor):
    """A guard's Python (``P[0].size()[3] % 2 == 0``) as fx nodes over the graph's placeholders."""

    def __init__(self, graph: fx.Graph, inputs: List[fx.Node]):
        self.graph, self.inputs = graph, inputs
        self.reads: Dict[str, fx.Node] = {}  # ``P[0].size()[3]`` -> its node, shared by the guards

    def _read(self, node, build):
        key = ast.dump(node)
        if key not in self.reads:
            self.reads[key] = build()
        return self.reads[key]

    def generic_visit(self, node):
        raise CaptureError(f"an export guard repc cannot write as graph code: {ast.unparse(node)}")

    def visit_Constant(self, node):
        return node.value

    def visit_Compare(self, node):
        left, out = self.visit(node.left), None
        for op, right in zip(node.ops, node.comparators):
            right = self.visit(right)
            if type(op) not in _COMPARISONS:
                self.generic_visit(node)
            term = self.graph.call_function(_COMPARISONS[type(op)], (left, right))
            out = term if out is None else self.graph.call_function(operator.and_, (out, term))
            left = right
        return out

    def visit_BinOp(self, node):
        if type(node.op) not in _BINARY:
            self.generic_visit(node)
        return self.graph.call_function(_BINARY[type(node.op)], (self.visit(node.left), self.visit(node.right)))

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.USub):
            return self.graph.call_function(operator.neg, (self.visit(node.operand),))
        if isinstance(node.op, ast.Not):
            return self.graph.call_function(operator.not_, (self.visit(node.operand),))
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
        values = [self.visit(v) for v in node.values]
        out = values[0]
        for v in values[1:]:
            out = self.graph.call_function(combine, (out, v))
        return out

    def visit_Subscript(self, node):
        if isinstance(node.value, ast.Name) and node.value.id == "P":
            return self.inputs[node.slice.value]
        return self._read(node, lambda: self.graph.call_function(operator.getitem, (self.visit(node.value),
                                                                                    self.visit(node.slice))))

    def visit_Call(self, node):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "size" and not node.args and not node.keywords:
            return self._read(node, lambda: self.graph.call_method("size", (self.visit(func.value),)))
        if isinstance(func, ast.Name) and func.id in _FUNCTIONS and not node.keywords:
            return self.graph.call_function(_FUNCTIONS[func.id], tuple(self.visit(a) for a in node.args))
        named = (func.value.id, func.attr) if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
            else None
        if named in _MODULE_FUNCTIONS and not node.keywords:
            return self.graph.call_function(_MODULE_FUNCTIONS[named], tuple(self.visit(a) for a in node.args))
        self.generic_visit(node)


class _Computed:
    """What :class:`_GuardTranslator` writes as graph nodes, computed on values instead: a guard
    evaluated on a call's inputs (:func:`guard_holds`)."""

    @staticmethod
    def call_function(fn, args, kwargs=None):
        return fn(*args, **(kwargs or {}))

    @staticmethod
    def call_method(name, args, kwargs=None):
        return getattr(args[0], name)(*args[1:], **(kwargs or {}))


def guard_expression(code: str) -> ast.expr:
    """Export's guard ``code`` (over the flat inputs ``P[i]``), parsed."""
    return ast.parse(code, mode="eval").body


def guard_inputs(expression: ast.expr) -> List[int]:
    """The flat inputs ``P[i]`` a guard's expression reads."""
    return sorted({n.slice.value for n in ast.walk(expression)
                   if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "P"})


class _ComputedTranslator(_GuardTranslator):
    """:class:`_GuardTranslator` on values: a size read twice is read again (cheaper than the
    key that would share it)."""

    def _read(self, node, build):
        return build()


def guard_holds(expression: ast.expr, inputs: Dict[int, Any]) -> bool:
    """A guard's expression on the values ``inputs`` (flat input -> value)."""
    return bool(_ComputedTranslator(_Computed, inputs).visit(expression))


# ----------------------------------------------------------------------------- layers as modules

def _innermost_module(node: fx.Node) -> Optional[Tuple[str, str]]:
    """(path, class name) of the innermost module that computed ``node`` (export's tag)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def calls_of_standard_modules(gm: fx.GraphModule, model: nn.Module, prefix: str) -> int:
    """Where one node is a whole call of one of the model's standard ``torch.nn`` layers (an
    ``nn.Conv2d``, ``nn.Linear``, ``nn.ReLU``... without children) on one input, write it as a
    call of that module, at its path: the graph reads as the fx front end's, which keeps these
    layers as leaves.  Returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        tag = _innermost_module(node)
        if tag is None or not tag[0] or not tag[1].startswith("torch.nn.modules.") or not tag[0].startswith(prefix):
            continue
        path = tag[0][len(prefix):]
        data = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(data) != 1 or node.args[:1] != (data[0],) or _innermost_module(data[0]) == tag or \
                any(_innermost_module(u) == tag for u in node.users):
            continue  # part of a call that takes several ops, or other inputs
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if any(True for _ in module.children()) or f"{type(module).__module__}.{type(module).__qualname__}" != tag[1]:
            continue
        _call_module_instead(gm, node, path, module, data[0])
        count += 1
    if count:
        _erase_unread_attributes(gm)
        gm.recompile()
    return count


def _call_module_instead(gm: fx.GraphModule, node: fx.Node, path: str, module: nn.Module, x: fx.Node) -> None:
    """``node`` replaced by ``module(x)``, the module registered at ``path``."""
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(path, (x,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def _erase_unread_attributes(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)


def _conv_module(x_val, weight, bias, stride=1, padding=0, dilation=1, groups=1):
    ndim = weight.dim() - 2
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
    return cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding, dilation, groups,
               bias=bias is not None, device="meta")


def _linear_module(x_val, weight, bias=None):
    return nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")


def _batch_norm_module(x_val, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    if training or running_mean is None or x_val is None or not 2 <= x_val.dim() <= 5:
        return None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x_val.dim()]
    return cls(running_mean.shape[0], eps=eps, momentum=momentum, affine=weight is not None, device="meta")


def _layer_norm_module(x_val, normalized_shape, weight=None, bias=None, eps=1e-5):
    return nn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=weight is not None, bias=bias is not None,
                        device="meta")


def _group_norm_module(x_val, num_groups, weight=None, bias=None, eps=1e-5):
    if weight is None or bias is None:
        return None
    return nn.GroupNorm(num_groups, weight.shape[0], eps=eps, device="meta")


# torch-level layer call -> (how to build its module, the argument names the module's tensors come from)
_LAYERS = {
    torch.conv1d: (_conv_module, {"weight": 1, "bias": 2}),
    torch.conv2d: (_conv_module, {"weight": 1, "bias": 2}),
    torch.conv3d: (_conv_module, {"weight": 1, "bias": 2}),
    torch.nn.functional.linear: (_linear_module, {"weight": 1, "bias": 2}),
    torch.batch_norm: (_batch_norm_module, {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}),
    torch.nn.functional.layer_norm: (_layer_norm_module, {"weight": 2, "bias": 3}),
    torch.nn.functional.group_norm: (_group_norm_module, {"weight": 2, "bias": 3}),
}


def modules_for_layer_calls(gm: fx.GraphModule) -> int:
    """Write each layer call on the model's own tensors (``torch.conv2d(x, W, b, ...)`` with
    ``W``, ``b`` attributes) as a call of a standard module holding those tensors, at the path
    they came from (``stages.0.conv``): the graph then reads as the fx front end's does, and
    the result keeps the model's names.  Returns how many calls became modules."""
    count = 0
    for node in list(gm.graph.nodes):
        layer = _LAYERS.get(node.target) if node.op == "call_function" else None
        if layer is None or node.kwargs or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        build, tensor_args = layer
        args = list(node.args) + [None] * (max(tensor_args.values()) + 1 - len(node.args))
        if any(not (a is None or isinstance(a, fx.Node) and a.op == "get_attr") for i, a in enumerate(args)
               if i in tensor_args.values() and i < len(args)) or tensor_args["weight"] >= len(args) \
                or args[tensor_args["weight"]] is None:
            continue
        tensors = {name: fetch_attr(gm, args[i].target) if i < len(args) and args[i] is not None else None
                   for name, i in tensor_args.items()}
        values = [tensors.get(_name_of(tensor_args, i), a) if i > 0 else node.args[0].meta.get("val")
                  for i, a in enumerate(args)]
        try:
            module = build(*values)
        except Exception:
            module = None
        if module is None:
            continue
        module.eval()  # the model is in eval mode (BatchNorm with its running statistics)
        for name, tensor in tensors.items():
            if tensor is not None:
                _set_tensor(module, name, tensor)
        owner = args[tensor_args["weight"]].target.rpartition(".")[0]
        _call_module_instead(gm, node, _module_path(gm, owner, tensors), module, node.args[0])
        count += 1
    if count:
        _erase_unread_attributes(gm)
        gm.recompile()
    return count


def _name_of(tensor_args: Dict[str, int], index: int) -> Optional[str]:
    return next((name for name, i in tensor_args.items() if i == index), None)


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    if name in module._parameters:
        module._parameters[name] = tensor if isinstance(tensor, nn.Parameter) else \
            nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    else:
        module._buffers[name] = tensor


def _module_path(gm: fx.GraphModule, owner: str, tensors: Dict[str, Optional[torch.Tensor]]) -> str:
    """Where the layer's module goes: the path its tensors came from when nothing else lives
    there and they have the names the layer gives them (the model's own conv at
    ``stages.0.conv``), else a fresh name beside it (not over peft VeRA's ``vera_A`` dict,
    whose one tensor ``default`` other layers read too)."""
    try:
        existing = gm.get_submodule(owner) if owner else None
    except AttributeError:
        existing = None
    if existing is not None and not any(True for _ in existing.children()) and \
            all(tensors.get(name) is t or name == "num_batches_tracked"
                for name, t in list(existing.named_parameters(recurse=False)) + list(existing.named_buffers(recurse=False))):
        return owner
    base = (owner + "." if owner else "") + "layer"
    name, i = base, 1
    while _exists(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _exists(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False
