"""The ``torch.compile`` front door: ``torch.compile(model, backend="repc")``.

repc registers itself under the ``torch_dynamo_backends`` entry point, so the backend name
resolves in a process that never imported repc.  For every graph dynamo hands over (one per
piece between graph breaks), :func:`repc_backend`

1. decides whether fusing is valid: not when the graph trains (``batch_norm`` with
   ``training=True``, dropout with ``training=True``, a module in training mode), not when
   gradients are enabled and an input or parameter requires them, and not when the graph
   writes in place into the model's own tensors.  Such a graph goes to the inner backend
   unchanged;
2. *freezes* it: every placeholder that dynamo lifted from the model (parameters, buffers,
   tensor and number attributes of ``nn.Module`` s) becomes a ``get_attr`` of a constant
   holding a copy of its value at compile time; the user's inputs stay placeholders;
3. runs repc's collapse pass on the frozen graph (preparation passes, region matching, closed
   forms, per-region verification), then checks the fused graph against the frozen one as a whole;
4. compiles the fused graph with the inner backend (``options={"inner": "inductor"}`` by
   default; ``"eager"``, any registered backend name, or a backend callable) and returns a
   callable taking the full argument list dynamo passes (the frozen arguments are dropped).
   Inductor compiles a fused graph with its ``freezing`` setting on, since the weights are
   constants already; a graph left unfused goes to the inner backend as it is.

**Weights are frozen at compile time**, as with Inductor's ``freezing``: changing a
parameter, buffer or module attribute after the first call is not seen by the compiled
model (dynamo does not guard on tensor values).  Recompile after changing weights
(``torch._dynamo.reset()`` or a fresh ``torch.compile``).  Training mode and grad-enabled
calls with parameters that require grad are compiled unfused (dynamo recompiles when the
mode changes), so a model can be trained and served with the same compiled object.

Dynamo checks its guards on every call, and on a training-form model they cover every
parameter, buffer and submodule.  ``options={"guard_filter_fn": repc.backend.guard_filter}``
trims them to what a frozen model needs (see :func:`guard_filter`); ``torch.compile`` hands
that option to dynamo, not to this backend.

Options: ``inner`` (see above) and ``verify`` (default ``True``: the whole-graph check on the
example and on random inputs; the per-region checks of the collapse pass always run).
What happened to each graph is logged on the ``repc.backend`` logger: the rewrites at INFO,
a graph left unfused for a validity reason at INFO (WARNING when only gradients stood in
the way), a fusion that failed or did not verify at WARNING.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .graph_predicates import fetch_attr, may_alias, short_error, target_name, writes_in_place
from .passes.collapse import collapse
from .verify.check import compare

log = logging.getLogger("repc.backend")

OPTIONS = ("inner", "verify")

_BATCH_NORMS = {F.batch_norm: 5, torch.batch_norm: 5}  # target -> position of ``training``
_DROPOUTS = {F.dropout: (2, True), F.dropout1d: (2, True), F.dropout2d: (2, True), F.dropout3d: (2, True),
             F.alpha_dropout: (2, False), F.feature_alpha_dropout: (2, False),
             torch.dropout: (2, None), torch.alpha_dropout: (2, None), torch.feature_dropout: (2, None),
             torch.feature_alpha_dropout: (2, None)}  # target -> (position of ``training``, default)
_TRAINING_MODULES = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                     nn.AlphaDropout, nn.FeatureAlphaDropout)


class BackendOptionError(ValueError):
    """``options`` given to ``torch.compile(backend="repc")`` that the backend cannot use."""


@dataclass
class GraphOutcome:
    """What the backend did with one graph dynamo handed over."""

    fused: bool
    reason: str = ""  # why the graph went to the inner backend unchanged
    rewrites: list = field(default_factory=list)
    rejections: list = field(default_factory=list)
    frozen: int = 0  # placeholders bound to the model's tensors
    nodes_before: int = 0
    nodes_after: int = 0


def repc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Optional[Dict[str, Any]] = None,
                 mode: Optional[str] = None) -> Callable:
    """A dynamo backend: freeze, fuse with repc, and compile the result with the inner backend."""
    inner, verify = _parse_options(options, mode)
    example_inputs = list(example_inputs)
    outcome, fused, user_positions = fuse_graph(gm, example_inputs, verify=verify)
    if not outcome.fused:
        context = _compile_context()
        if context is not None:
            _UNFUSED_COMPILES.append(context)
        return inner(gm, example_inputs)
    user_inputs = [example_inputs[i] for i in user_positions]
    if _is_inductor(inner):
        compiled = _inductor_frozen(inner, fused, user_inputs)
    else:
        compiled = inner(fused, user_inputs)
    frozen_positions = [i for i in range(len(example_inputs)) if i not in set(user_positions)]

    def run(*args):
        if torch.is_grad_enabled() and any(args[i].requires_grad for i in frozen_positions):
            # only reachable when guard_filter dropped the guards that would have recompiled:
            # the model's tensors require grad again, and the frozen graph has no gradient
            return gm(*args)
        return compiled(*[args[i] for i in user_positions])

    return run


# Dynamo's contexts of the latest frame compiles that left a graph unfused.  Dynamo builds a
# frame's guards right after compiling its graphs, so the latest few are all guard_filter needs;
# holding them keeps identity comparisons sound.
_UNFUSED_COMPILES: "collections.deque" = collections.deque(maxlen=16)


def _compile_context():
    """Dynamo's context of the frame compile in progress, or None outside one."""
    try:
        return torch._guards.CompileContext.try_get()
    except Exception:
        return None


def guard_filter(entries: Sequence[Any]) -> List[bool]:
    """A ``guard_filter_fn`` that trims dynamo's per-call guards to what a frozen model needs.

    Use it as ``torch.compile(model, backend="repc", options={"guard_filter_fn":
    repc.backend.guard_filter})`` to serve a model for inference.  Dynamo checks these guards
    on every call.  On a training-form model they cover every parameter, buffer and submodule,
    and on small inputs they take a sizable share of each call.

    What it keeps:

    * every guard that is not on the model: inputs, globals, grad mode and other global state;
    * the model's plain values: ``training`` flags and any number, string or flag its forward
      reads.  ``model.train()`` or a changed setting still recompiles.

    What it drops: guards on the model's tensors and on its module structure (submodule types,
    dict keys, hook dicts).  The frozen graph does not read those tensors; it uses the copies
    taken at compile time.  Replacing, moving or retyping parameters, or adding hooks and
    submodules, is then not seen, just as changed weight values are not.  Recompile after such
    changes.

    Tensors that require grad again under grad mode send the call to the unfused graph, so
    gradients still flow.  If the frame compiled just now left any graph unfused (training mode,
    gradients, in-place writes), that graph reads the model's tensors directly, so every guard
    is kept.
    """
    context = _compile_context()
    if context is None or any(c is context for c in _UNFUSED_COMPILES):
        return [True] * len(entries)
    return [not _on_model(entry) or entry.guard_type in _VALUE_GUARDS for entry in entries]


_VALUE_GUARDS = ("CONSTANT_MATCH", "EQUALS_MATCH")


def _on_model(entry) -> bool:
    """Whether a guard checks something reached through an ``nn.Module`` dynamo did not specialize."""
    try:
        return bool(entry.orig_guard.source.is_unspecialized_nn_module())
    except Exception:  # a guard without a source: not the model's
        return False


def _is_inductor(inner: Callable) -> bool:
    try:
        return inner is torch._dynamo.lookup_backend("inductor")
    except Exception:  # no Inductor in this build of torch
        return False


def _inductor_frozen(inductor: Callable, fused: fx.GraphModule, example_inputs: List[Any]) -> Callable:
    """Compile a fused graph with Inductor's ``freezing``: its weights are constants already.

    repc has bound every parameter and buffer to a copy taken at compile time, so Inductor may
    fold them too (prepacked convolution and linear weights, constant-folded subgraphs).  Its
    freezing applies to graphs compiled without gradients; the fused graph needs none (repc
    fuses only when nothing requires grad), so it is compiled under ``no_grad``.
    """
    import torch._inductor.config as inductor_config
    from torch._dynamo.exc import RestartAnalysis
    try:
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return inductor(fused, example_inputs)
    except RestartAnalysis:  # dynamo's signal to trace the frame again (e.g. with a scalar made a tensor)
        raise
    except Exception as why:  # a freezing pass that cannot handle this graph: the plain compile still can
        log.warning("repc backend: Inductor's freezing failed on a fused graph (%s); compiling it without",
                    short_error(why))
        return inductor(fused, example_inputs)


def _parse_options(options, mode) -> Tuple[Callable, bool]:
    if mode is not None:
        raise BackendOptionError(f"the repc backend takes no mode ({mode!r}); choose the inner backend with "
                                 "options={'inner': ...}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BackendOptionError(f"unknown repc backend option(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(OPTIONS)}")
    inner = options.get("inner", "inductor")
    if isinstance(inner, str):
        if inner == "repc":
            raise BackendOptionError("the inner backend of repc cannot be repc itself")
        try:
            inner = torch._dynamo.lookup_backend(inner)
        except Exception as why:
            raise BackendOptionError(f"unknown inner backend {options['inner']!r}: {short_error(why)}") from None
    elif not callable(inner):
        raise BackendOptionError(f"the inner backend must be a backend name or callable, got {type(inner).__name__}")
    verify = options.get("verify", True)
    if not isinstance(verify, bool):
        raise BackendOptionError(f"option 'verify' must be True or False, got {verify!r}")
    return inner, verify


# ----------------------------------------------------------------------------- the pipeline

def fuse_graph(gm: fx.GraphModule, example_inputs: List[Any], *, verify: bool = True
               ) -> Tuple[GraphOutcome, Optional[fx.GraphModule], List[int]]:
    """Fuse one dynamo graph.

    Returns the outcome, the fused module (``None`` when the graph is to stay unchanged) and
    the positions in ``example_inputs`` of the arguments the fused module still takes.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        return _unchanged(gm, f"{len(placeholders)} placeholders for {len(example_inputs)} example inputs")
    frozen_positions = [i for i, (node, value) in enumerate(zip(placeholders, example_inputs))
                        if _is_model_state(node, value)]
    reason = training_reason(gm)
    if reason:
        return _unchanged(gm, reason)
    if torch.is_grad_enabled():
        needing = [p.target for p, v in zip(placeholders, example_inputs)
                   if isinstance(v, torch.Tensor) and v.requires_grad]
        if needing:
            return _unchanged(gm, f"gradients are enabled and {len(needing)} input(s) require grad "
                                  f"({needing[0]}{', ...' if len(needing) > 1 else ''}); "
                                  "call the model under torch.no_grad() or torch.inference_mode() to fuse it",
                              level=logging.WARNING)
    frozen_nodes = {placeholders[i] for i in frozen_positions}
    mutated = mutated_input(gm, frozen_nodes)
    if mutated:
        return _unchanged(gm, f"the graph writes in place into an input or the model's tensors ({mutated})")

    user_positions = [i for i in range(len(placeholders)) if i not in set(frozen_positions)]
    constants = _constants_root(gm, {placeholders[i]: example_inputs[i] for i in frozen_positions})
    user_inputs = tuple(_concrete(example_inputs[i]) for i in user_positions)
    try:
        with _real_tensors(), torch.no_grad():
            result = collapse(_frozen_module(gm, constants), user_inputs)
    except Exception as why:
        return _unchanged(gm, f"repc could not fuse it ({short_error(why)})", level=logging.WARNING)
    fused = result.module
    outcome = GraphOutcome(True, rewrites=result.rewrites, rejections=result.rejections,
                           frozen=len(frozen_positions), nodes_before=len(gm.graph.nodes),
                           nodes_after=len(fused.graph.nodes))
    kept = [n.target for n in fused.graph.find_nodes(op="placeholder")]
    if kept != [placeholders[i].target for i in user_positions]:
        return _unchanged(gm, "the fused graph does not take the user's inputs in order", level=logging.WARNING)
    if not result.rewrites:
        # nothing merged: the frozen graph would only differ by its bound constants
        return _unchanged(gm, "no region to merge", level=logging.INFO)
    if verify:
        try:
            with _real_tensors():
                check = compare(fused, _frozen_module(gm, constants), user_inputs)
        except Exception as why:
            return _unchanged(gm, f"the frozen graph does not run on its example ({short_error(why)})",
                              level=logging.WARNING)
        if not check.ok:
            where = check.error or f"deviation {check.max_deviation:.3g} > {check.tolerance:g}"
            return _unchanged(gm, f"the fused graph failed verification on the {check.failing_input} input ({where})",
                              level=logging.WARNING)
    log.info("repc backend: fused a graph of %d nodes into %d (%d region(s) merged: %s; %d value(s) frozen)",
             outcome.nodes_before, outcome.nodes_after, len(result.rewrites),
             ", ".join(r.root for r in result.rewrites), outcome.frozen)
    return outcome, fused, user_positions


@contextlib.contextmanager
def _real_tensors():
    """Run repc's pipeline on real tensors, outside dynamo's tracing context.

    The backend is called inside dynamo's ``TracingContext``; fx utilities such as
    ``ShapeProp`` pick up its fake mode from there and then mix fake and real tensors.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    with torch._guards.tracing(None), unset_fake_temporarily():
        yield


def _unchanged(gm: fx.GraphModule, reason: str, level: int = logging.INFO):
    log.log(level, "repc backend: graph of %d nodes left unfused: %s", len(gm.graph.nodes), reason)
    return GraphOutcome(False, reason=reason, nodes_before=len(gm.graph.nodes)), None, []


# ----------------------------------------------------------------------------- validity

def training_reason(gm: fx.GraphModule) -> Optional[str]:
    """Why ``gm`` computes a training step (batch statistics, random dropout), or None."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules.get(node.target)
            if isinstance(mod, _TRAINING_MODULES) and mod.training:
                return f"{type(mod).__name__} {node.target} is in training mode"
        if node.op != "call_function":
            continue
        if node.target in _BATCH_NORMS:
            training = _argument(node, _BATCH_NORMS[node.target], "training", False)
            if training is not False:
                return f"{node.name}: batch_norm with training={training} (model in training mode)"
        elif node.target in _DROPOUTS:
            position, default = _DROPOUTS[node.target]
            name = "training" if default is not None else "train"
            training = _argument(node, position, name, default)
            if training is not False and _argument(node, 1, "p", 0.5) != 0:
                return f"{node.name}: {target_name(node)} with {name}={training} (model in training mode)"
    return None


def mutated_input(gm: fx.GraphModule, frozen: set) -> Optional[str]:
    """The first in-place op that writes into something the caller can see, or None.

    That is an input (or a view of one), an attribute of the module, or a value computed from
    the model's state alone.  repc's pipeline computes out of place, so the caller would not
    see such a write.
    """
    state = set(frozen) | set(gm.graph.find_nodes(op="get_attr"))
    visible = state | set(gm.graph.find_nodes(op="placeholder"))
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        inputs = node.all_input_nodes
        if writes_in_place(node) and node.args and isinstance(node.args[0], fx.Node) and node.args[0] in visible:
            return f"{node.name}: {target_name(node)} on {node.args[0].name}"
        if inputs and all(a in state for a in inputs):
            state.add(node)
            visible.add(node)
        elif node.op in ("call_method", "call_function") and may_alias(node) and node.args \
                and node.args[0] in visible:
            visible.add(node)
    return None


def _argument(node: fx.Node, position: int, name: str, default):
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[position] if len(node.args) > position else default


# ----------------------------------------------------------------------------- freezing

def _is_model_state(node: fx.Node, value: Any) -> bool:
    """Whether dynamo lifted this placeholder from an ``nn.Module`` (a parameter, buffer or attribute)."""
    if not isinstance(value, torch.Tensor):  # sizes and numbers stay arguments
        return False
    source = getattr(node, "_dynamo_source", None)
    if source is None:
        return False
    try:
        guard_source = source.guard_source
        guard_source = guard_source() if callable(guard_source) else guard_source
        return bool(guard_source.is_unspecialized_nn_module() or guard_source.is_specialized_nn_module())
    except Exception:  # a source kind without a guard source: not the model's
        return False


def _constants_root(gm: fx.GraphModule, frozen: Dict[fx.Node, Any]) -> Dict[fx.Node, Tuple[str, Any]]:
    """A fresh name and a copy of the value of every frozen placeholder and every attribute ``gm`` reads."""
    values: Dict[fx.Node, Tuple[str, Any]] = {}
    with torch.no_grad():
        for i, (node, value) in enumerate(frozen.items()):
            values[node] = (f"frozen_{i}_{node.name}"[:120], value.detach().clone())
        for i, node in enumerate(n for n in gm.graph.nodes if n.op in ("get_attr", "call_module")):
            value = gm.get_submodule(node.target) if node.op == "call_module" else fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                value = value.detach().clone()
            values[node] = (f"attr_{i}_{node.target}".replace(".", "_")[:120], value)
    return values


def _frozen_module(gm: fx.GraphModule, constants: Dict[fx.Node, Tuple[str, Any]]) -> fx.GraphModule:
    """``gm`` with each frozen placeholder read from ``constants``; the user's inputs stay placeholders.

    The frozen tensors are shared between the modules built from one ``constants``; submodules
    are copied for each (repc's pipeline may edit them).  A frozen 0-d tensor read only through
    ``.item()`` is a number of the model (``eps``, ``momentum``) that dynamo wrapped into a
    tensor: those ``.item()`` calls become the number.
    """
    root = nn.Module()
    graph = fx.Graph()
    env: Dict[fx.Node, Any] = {}

    def arg(a):
        return env[a].value if isinstance(env[a], _Scalar) else env[a]

    for node in gm.graph.nodes:
        if node in constants:
            name, value = constants[node]
            if isinstance(value, nn.Module):
                root.add_module(name, copy.deepcopy(value))
                env[node] = graph.call_module(name, fx.node.map_arg(node.args, arg),
                                              fx.node.map_arg(node.kwargs, arg))
            elif node.op == "placeholder" and value.dim() == 0 and node.users and \
                    all(u.op == "call_method" and u.target == "item" for u in node.users):
                env[node] = _Scalar(value.item())
                continue
            else:
                if isinstance(value, torch.Tensor):
                    root.register_buffer(name, value)
                else:
                    setattr(root, name, value)
                env[node] = graph.get_attr(name)
            env[node].meta = dict(node.meta)
        elif node.op == "call_method" and node.target == "item" and isinstance(env.get(node.args[0]), _Scalar):
            env[node] = env[node.args[0]]
        else:
            env[node] = graph.node_copy(node, arg)
    return fx.GraphModule(root, graph, class_name="FrozenGraph")


@dataclass
class _Scalar:
    value: Any


def _concrete(value):
    """A symbolic size from dynamo as the number it stands for on this example."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        node = value.node
        hint = getattr(node, "hint", None)
        if hint is None:
            from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
            hint = guarding_hint_or_throw(value)
        return hint
    return value
