"""The pass manager (:mod:`repc.passes.manager`) and the preparation list it runs."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from repc.passes import manager
from repc.passes.manager import Pass, PassContext, PassError, run_passes
from repc.passes.prepare import PREPARATION, prepare
from repc.passes.record import record_values


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        y += 1  # traced as an out-of-place add
        return y


def _context():
    gm = fx.symbolic_trace(_Model())
    return PassContext(gm, (torch.randn(2, 4),))


def _count_recordings(monkeypatch):
    calls = []
    record = manager.record_values

    def counting(gm, inputs):
        calls.append(gm)
        return record(gm, inputs)

    monkeypatch.setattr(manager, "record_values", counting)
    return calls


def test_values_are_recorded_once_and_again_only_after_a_change(monkeypatch):
    calls = _count_recordings(monkeypatch)
    context = _context()
    reads = Pass("reads", lambda c: len(c.values) * 0)
    idle = Pass("idle", lambda c: 0, reads_values=False)

    def edit(c):
        (add,) = [n for n in c.gm.graph.nodes if n.target is operator.add]
        add.target = operator.sub
        c.gm.recompile()
        return 1

    log = run_passes([idle, reads, reads, Pass("edit", edit, reads_values=False), idle, reads], context)
    # recorded before the first read; after the edit, only the edited node and its readers run again
    assert len(calls) == 1 and context.recordings == 1 and context.updates == 1
    assert [r.edits for r in log.records] == [0, 0, 0, 1, 0, 0] and log.changed
    want = record_values(context.gm, context.example_inputs)
    (sub,) = [n for n in context.gm.graph.nodes if n.target is operator.sub]
    assert torch.equal(context.values[sub], want[sub])


def test_values_after_an_edit_are_those_of_a_fresh_recording_and_only_the_edit_runs_again():
    """A pass that changes a node's value (an add made a sub): the updated values are what
    recording the graph again gives, and only the changed node is given to run again."""
    context = _context()
    context.values  # noqa: B018
    ran = []
    original = manager.update_values

    def counting(gm, inputs, values, edited, before):
        ran.append({n.name for n in edited})
        return original(gm, inputs, values, edited, before)

    def edit(c):
        (add,) = [n for n in c.gm.graph.nodes if n.target is operator.add]
        add.target = operator.sub
        c.gm.recompile()
        return 1

    import unittest.mock as mock
    with mock.patch.object(manager, "update_values", counting):
        run_passes([Pass("edit", edit, reads_values=False), Pass("reads", lambda c: 0)], context)
    assert ran == [{"add"}]
    fresh = record_values(context.gm, context.example_inputs)
    for node in context.gm.graph.nodes:
        if node.op != "output":
            assert torch.equal(torch.as_tensor(context.values[node]), torch.as_tensor(fresh[node])), node.name


def test_passes_that_change_nothing_cost_one_recording(monkeypatch):
    calls = _count_recordings(monkeypatch)
    context = PassContext(fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU())), (torch.randn(2, 4),))
    log = prepare(context)
    assert not log.changed and len(calls) == 1
    assert [r.name for r in log.records] == [p.name for p in PREPARATION]


def test_a_failing_pass_is_named():
    def broken(c):
        raise KeyError("no such node")

    with pytest.raises(PassError, match="graph preparation pass broken: KeyError") as caught:
        run_passes([Pass("broken", broken)], _context())
    assert caught.value.pass_name == "broken"


def test_a_pass_that_leaves_an_ill_formed_graph_is_caught_by_the_lint():
    def reorder(c):
        graph = c.gm.graph
        (add,) = [n for n in graph.nodes if n.target is operator.add]
        (placeholder,) = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(placeholder):
            graph.call_function(operator.neg, (add,))  # reads a value defined after it
        return 1

    with pytest.raises(PassError, match="reorder: left an ill-formed graph"):
        run_passes([Pass("reorder", reorder, reads_values=False)], _context())


def test_the_preparation_passes_keep_the_function():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.q, self.k = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = self.ln(x)
            scores = (self.q(h) @ self.k(h).transpose(-2, -1)) / 8 ** 0.5
            out = torch.relu(scores)
            out.mul_(2)
            return out

    model = Model().eval()
    with torch.no_grad():
        model.ln.weight.normal_(), model.ln.bias.normal_()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 5, 8)
    context = PassContext(gm, (x,))
    log = prepare(context)
    edited = {r.name for r in log.records if r.edits}
    assert {"functionalize_inplace", "split_norm_affine", "push_scales_into_matmul"} <= edited, log
    torch.testing.assert_close(gm(x), model(x))


def test_a_node_only_rewired_to_an_input_of_the_same_value_keeps_its_value_without_running(monkeypatch):
    """A pass puts ``fc * 1.0`` between the linear and the add (as splitting a norm's affine off
    puts ``core * w + b`` before the linears that read the norm): only the new node runs; the
    add, rewired to a value equal to the one it read, keeps its value."""
    from repc.passes import record

    context = _context()
    context.values  # noqa: B018
    ran = []
    run_node = record.ValueRecorder.run_node

    def counting(self, n):
        ran.append(n.name)
        return run_node(self, n)

    monkeypatch.setattr(record.ValueRecorder, "run_node", counting)

    def insert(c):
        (fc,) = [n for n in c.gm.graph.nodes if n.op == "call_module"]
        (add,) = [n for n in c.gm.graph.nodes if n.target is operator.add]
        with c.gm.graph.inserting_after(fc):
            same = c.gm.graph.call_function(operator.mul, (fc, 1.0))
        add.replace_input_with(fc, same)
        c.gm.recompile()
        return 1

    run_passes([Pass("insert", insert, reads_values=False), Pass("reads", lambda c: 0)], context)
    assert ran == ["mul"], ran
    fresh = record_values(context.gm, context.example_inputs)
    for node in context.gm.graph.nodes:
        if node.op != "output":
            assert torch.equal(torch.as_tensor(context.values[node]), torch.as_tensor(fresh[node])), node.name
