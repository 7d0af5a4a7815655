"""Capture: an ``nn.Module`` to shape-annotated ``torch.fx`` graphs.

Standard ``torch.nn`` layers stay leaves so their weights stay attached.  A model that does
not trace as a whole is split: its largest traceable submodules are traced (each with the
inputs it really received on the example run) and the untraceable shells are kept as they
are, with the reason recorded.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .graph_predicates import alias_base, may_alias, short_error, writes_in_place


class CaptureError(Exception):
    pass


@dataclass
class Skipped:
    path: str
    reason: str


class _AssignableProxy(fx.Proxy):
    """A proxy that records item assignment (``y[:, :, :p] = v``) as an ``operator.setitem`` node
    instead of failing (DBB's BN-and-pad fills its border that way), and whose ``len`` is a
    shape's length on the example (see :class:`Tracer`)."""

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __len__(self) -> int:
        return _example_len(self)

    def __getattr__(self, name):
        if name in ("dtype", "device") and isinstance(self.tracer, Tracer):
            value = self.tracer.example_attribute(self, name)
            if value is not None:
                return value
        return _Attribute(self, name)


class _Attribute(fx.proxy.Attribute):
    """``x.shape`` and other attributes of a proxy: ``len(x.shape)`` is the example's rank."""

    def __len__(self) -> int:
        return _example_len(self)


def _example_len(proxy: fx.Proxy) -> int:
    size = proxy.tracer.example_size(proxy) if isinstance(proxy.tracer, Tracer) else None
    if size is None:
        return fx.Proxy.__len__(proxy)
    return len(size)


class Tracer(fx.Tracer):
    """fx's tracer, with item assignment recorded and shapes that can be unpacked.

    Given the example's arguments by name, a shape (``x.shape[:-1]``, ``x.size()``) can be
    iterated (``(*x.shape[:-1], -1, d)``) and measured (``len(x.shape)``): the graph built so
    far runs on the example to learn the shape's length, and the items are read one by one.
    That length is the tensor's rank, which does not change with the input's sizes.
    """

    # ``self.mask[:, :, :T, :T]`` with T read from the input records a slice (``trace`` retries
    # without when a buffer's value steers Python control flow)
    proxy_buffer_attributes = True

    def __init__(self, example_arguments: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.example_arguments = example_arguments
        self._example_values: Dict[fx.Node, Any] = {}
        self._modules_by_path: Optional[Dict[str, nn.Module]] = None  # (of the root, once it is traced)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _AssignableProxy(node, self)

    def iter(self, obj):
        size = self.example_size(obj) if isinstance(obj, fx.Proxy) else None
        if size is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(len(size))])

    def example_attribute(self, proxy: fx.Proxy, name: str):
        """A computed value's ``dtype`` or ``device`` on the example (``torch.finfo(x.dtype).min``);
        None for the model's inputs (theirs may change from call to call) or without an example."""
        if self.example_arguments is None or proxy.node.op == "placeholder":
            return None
        try:
            return getattr(self._example_value(proxy.node), name)
        except Exception:
            return None

    def example_size(self, proxy: fx.Proxy) -> Optional[torch.Size]:
        """The ``torch.Size`` that ``proxy`` holds on the example, or None (not a shape, or no example)."""
        if self.example_arguments is None:
            return None
        try:
            value = self._example_value(proxy.node)
        except Exception:
            return None
        return value if isinstance(value, torch.Size) else None

    @staticmethod
    def _writes_into_given(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
        """The tensor ``node`` writes into is an input or one of the model's (or a view of one)."""
        written = node.args[0] if node.args else None
        if not isinstance(written, fx.Node):
            return True
        return alias_base(written, lambda n: may_alias(n, modules)).op in ("placeholder", "get_attr")

    def _example_value(self, target: fx.Node):
        if self._modules_by_path is None:
            self._modules_by_path = dict(self.root.named_modules())
        modules = self._modules_by_path
        interpreter = fx.Interpreter(self.root, graph=self.graph)
        interpreter.env = self._example_values
        # the model's modules run for real here, not through the tracer's patched Module.__call__
        with torch.no_grad(), _real_calls():
            for node in self.graph.nodes:
                if node not in self._example_values:
                    if writes_in_place(node, modules) and self._writes_into_given(node, modules):
                        # running it would write into the example's or the model's tensors (a write
                        # into a value computed here changes no size, dtype or device read off it)
                        raise LookupError("an in-place write into an input or the model's tensors comes first")
                    if node.op == "placeholder":
                        name = node.target.lstrip("*")
                        if name not in self.example_arguments:
                            raise LookupError(f"no example value for the argument {name}")
                        self._example_values[node] = self.example_arguments[name]
                    else:
                        value = interpreter.run_node(node)
                        if any(isinstance(v, fx.Proxy) for v in torch.utils._pytree.tree_leaves(value)):
                            raise LookupError("the example ran into the tracer")
                        self._example_values[node] = value
                if node is target:
                    return self._example_values[node]
        raise LookupError("the node is not in the graph")


def _real_calls():
    """fx's tracing patches (``nn.Module.__call__``...) lifted for the duration, where torch has the helper."""
    try:
        from torch.fx._symbolic_trace import _maybe_revert_all_patches
    except ImportError:
        return contextlib.nullcontext()
    return _maybe_revert_all_patches()


def trace(module: nn.Module, concrete_args: Optional[Dict[str, Any]] = None,
          example_inputs: Optional[Tuple[Any, ...]] = None) -> fx.GraphModule:
    """Symbolically trace ``module``; standard ``torch.nn`` layers stay call_module leaves and
    item assignments are recorded (the graph then holds in-place ``setitem`` nodes).  With the
    positional ``example_inputs``, shapes can be unpacked in the forward (see :class:`Tracer`)."""
    with python_state_kept(module):
        return _trace(module, concrete_args, example_inputs)


def _trace(module: nn.Module, concrete_args, example_inputs) -> fx.GraphModule:
    arguments = _arguments_by_name(module, example_inputs)
    try:
        tracer = Tracer(arguments)
        graph = tracer.trace(module, concrete_args)
    except Exception as first:
        # a buffer read by Python control flow (``if self.initialized:``) needs its value, not a
        # proxy; a forward that writes a constant into a buffer would then really write it
        tracer = Tracer(arguments)
        tracer.proxy_buffer_attributes = False
        try:  # (the buffer's contents are put back by python_state_kept, around the trace)
            graph = tracer.trace(module, concrete_args)
        except Exception:
            raise first from None
    name = module.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


_CONTAINERS = (dict, list, set)


@contextlib.contextmanager
def python_state_kept(module: nn.Module):
    """Every submodule's Python attributes, the contents of the dicts, lists and sets they hold,
    and the values of its buffers, as they were before: tracing runs the forward's Python, which
    may store what it computes (timm's ``attention_bias_cache[str(x.device)] = ...`` then holds a
    proxy of a graph that is gone, which the next trace of that module reads back; transformers'
    long RoPE keeps ``long_inv_freq``, a fake tensor under ``torch.export``), and a forward, or
    a captured graph run on the model's own tensors, may write a buffer in place (the same RoPE
    writes the frequencies of the last input's length into ``inv_freq``)."""
    saved = []
    for m in module.modules():
        attributes = dict(m.__dict__)
        contents = {k: copy.copy(v) for k, v in attributes.items() if isinstance(v, _CONTAINERS)}
        saved.append((m, attributes, contents))
    buffers = {}  # id -> (buffer, its version, its value), each buffer once
    for _, b in module.named_buffers(remove_duplicate=False):
        if id(b) not in buffers:
            try:
                buffers[id(b)] = (b, b._version, b.clone())
            except RuntimeError:  # (an inference tensor, no version counter: not written in place)
                pass
    try:
        yield
    finally:
        for m, attributes, contents in saved:
            for k in [k for k in m.__dict__ if k not in attributes]:
                del m.__dict__[k]
            m.__dict__.update(attributes)
            for k, before in contents.items():  # (the same container, its contents as they were)
                now = attributes[k]
                now.clear()
                (now.extend if isinstance(now, list) else now.update)(before)
        with torch.no_grad():
            for buffer, version, before in buffers.values():
                if buffer._version != version:
                    buffer.copy_(before)


def _arguments_by_name(module: nn.Module, example_inputs: Optional[Tuple[Any, ...]]) -> Optional[Dict[str, Any]]:
    if example_inputs is None:
        return None
    try:
        bound = inspect.signature(module.forward).bind(*example_inputs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Tuple[Any, ...]) -> None:
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def record_submodule_inputs(model: nn.Module, example_inputs: Tuple[Any, ...]
                            ) -> Dict[str, Optional[Tuple[Any, ...]]]:
    """The positional inputs each submodule received first when ``model`` ran on the example;
    None for one first called with keyword arguments (a part traced alone takes positional ones)."""
    seen: Dict[str, Optional[Tuple[Any, ...]]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, args, kwargs, name=name):
            if kwargs:
                seen.setdefault(name, None)
            elif seen.get(name) is None:
                seen[name] = tuple(args)
        hooks.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def split_untraceable(model: nn.Module, example_inputs, reason: str) -> Tuple[List[Tuple[str, Tuple[Any, ...]]], List[Skipped]]:
    """Submodule paths (outermost first) that trace, with their example inputs; and what was skipped."""
    inputs = record_submodule_inputs(model, example_inputs)
    traceable: List[Tuple[str, Tuple[Any, ...]]] = []
    skipped = [Skipped("<model>", reason)]

    def visit(prefix: str, mod: nn.Module):
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.children()):
                continue  # a single layer on its own: nothing to fuse inside it
            if path not in inputs:
                if isinstance(child, (nn.ModuleList, nn.ModuleDict)) or type(child) is nn.Module:
                    visit(path, child)  # a container is never called itself, but its blocks may be
                else:
                    skipped.append(Skipped(path, "not called on the example inputs"))
                continue
            if inputs[path] is None:  # (a transformers encoder given output_hidden_states=...): its blocks
                skipped.append(Skipped(path, "called with keyword arguments: its parts are compiled"))
                visit(path, child)
                continue
            try:
                trace(child, example_inputs=inputs[path])
            except Exception as why:
                skipped.append(Skipped(path, short_error(why)))
                visit(path, child)
                continue
            traceable.append((path, inputs[path]))

    visit("", model)
    return traceable, skipped



