"""The pass manager: graph preparation passes run from a named, ordered list.

A :class:`Pass` is a name and a function of a :class:`PassContext` returning how many edits it
made (0: the graph is unchanged).  :func:`run_passes` runs a list in order; after a pass that
changed the graph it lints the graph and marks the nodes it added or changed: before the next
pass that reads values or shapes (or when the caller reads :attr:`PassContext.values`) only
those, and the nodes whose inputs they change, run again (:func:`update_values`), so a run of
passes costs one recording of the whole graph.  A pass that
fails raises :class:`PassError` naming it.  The list repc runs is
:data:`repc.passes.prepare.PREPARATION`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx

from ..graph_predicates import short_error
from .record import record_values, same_arguments, update_values


class PassError(RuntimeError):
    """A preparation pass failed or left an ill-formed graph; :attr:`pass_name` says which."""

    def __init__(self, pass_name: str, words: str):
        super().__init__(f"graph preparation pass {pass_name}: {words}")
        self.pass_name = pass_name


class PassContext:
    """The graph the passes edit, its example inputs, and its recorded values, kept fresh lazily."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Tuple[Any, ...],
                 values: Optional[Dict[fx.Node, Any]] = None):
        self.gm = gm
        self.example_inputs = example_inputs
        self._values = values
        self._edited: Set[fx.Node] = set()  # nodes added or changed since the values were recorded
        self._before: Dict[fx.Node, Any] = {}  # an edited node's call as the values were recorded for it
        self._calls: Optional[Dict[fx.Node, Any]] = None  # each node's call (op, target, arguments) before a pass
        self.recordings = 0  # how many times the whole graph ran (compile-time accounting)
        self.updates = 0  # how many times the values were brought up to date after an edit

    @property
    def values(self) -> Dict[fx.Node, Any]:
        """Every node's value on the example inputs (and its ``tensor_meta``), brought up to date
        if the graph changed since."""
        if self._values is None:
            self._values = record_values(self.gm, self.example_inputs)
            self._edited, self._before = set(), {}
            self.recordings += 1
        elif self._edited:
            current = set(self.gm.graph.nodes)
            self._values = update_values(self.gm, self.example_inputs, self._values,
                                         {n for n in self._edited if n in current}, self._before)
            self._edited, self._before = set(), {}
            self.updates += 1
        return self._values

    def before_pass(self) -> None:
        """Note each node's target and arguments, to tell afterwards which a pass changed."""
        self._calls = {n: _call_of(n) for n in self.gm.graph.nodes} if self._values is not None else None

    def changed(self) -> None:
        """The graph was edited: the nodes it added or changed (or, with nothing noted before the
        edit, every value) are recorded again."""
        if self._values is None or self._calls is None:
            self._values = None
            return
        for node in self.gm.graph.nodes:
            if node not in self._calls or not same_arguments(self._calls[node], _call_of(node)):
                self._edited.add(node)
                if node in self._calls:
                    self._before.setdefault(node, self._calls[node])  # (as first recorded)
        self._calls = None


def _call_of(node: fx.Node):
    return node.op, node.target, node.args, dict(node.kwargs)


@dataclass(frozen=True)
class Pass:
    """A named graph preparation pass: ``run(context)`` edits ``context.gm`` and returns how
    many edits it made.  ``reads_values``: it reads recorded values or shapes, which are then
    recorded first if the graph changed since."""
    name: str
    run: Callable[[PassContext], int]
    reads_values: bool = True


@dataclass
class PassRecord:
    """What one pass did in one run."""
    name: str
    edits: int


@dataclass
class PassLog:
    records: List[PassRecord] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.edits for r in self.records)


def run_passes(passes: Sequence[Pass], context: PassContext) -> PassLog:
    """Run ``passes`` in order on ``context.gm``; lint after every pass that changed the graph."""
    log = PassLog()
    for p in passes:
        if p.reads_values:
            context.values  # noqa: B018 (recorded now, before the pass, if stale)
        context.before_pass()
        try:
            edits = int(p.run(context) or 0)
        except PassError:
            raise
        except Exception as why:
            raise PassError(p.name, short_error(why)) from why
        log.records.append(PassRecord(p.name, edits))
        if edits:
            context.changed()
            try:
                context.gm.graph.lint()
            except Exception as why:
                raise PassError(p.name, f"left an ill-formed graph ({short_error(why)})") from why
    return log
