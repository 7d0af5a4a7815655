"""``torch.compile(model, backend="repc")``: registration, validity, freezing, fusion, graph breaks."""

import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import linear_blocks as lb
from repc.backend import BackendOptionError, fuse_graph, guard_filter, repc_backend
from repc.examples import MobileOneUnit, RepVGGBlock, example_net, randomize_bn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """An inner backend that keeps every graph it is handed and runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


def compiled(model, recorder=None, **kwargs):
    return torch.compile(model, backend="repc", options={"inner": recorder or "eager"}, **kwargs)


def call_targets(gm):
    """Every op of the graph as a name: functions and methods by name, modules by class."""
    modules = dict(gm.named_modules())
    names = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            names.append(type(modules[n.target]).__name__)
        elif n.op in ("call_function", "call_method"):
            names.append(n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target)))
    return names


def count_convs(gm):
    return sum(name in ("Conv2d", "conv2d") for name in call_targets(gm))


def count_batch_norms(gm):
    return sum("batch_norm" in name or name.startswith("BatchNorm") for name in call_targets(gm))


def repvgg_stack(width=8, blocks=3, seed=0):
    torch.manual_seed(seed)
    layers = [RepVGGBlock(3, width, stride=2)] + [RepVGGBlock(width, width) for _ in range(blocks - 1)]
    return randomize_bn(nn.Sequential(*layers), seed).eval()


def assert_close(got, want, tol=1e-5):
    scale = want.abs().max().clamp_min(1e-12)
    assert ((got - want).abs().max() / scale).item() < tol


# ----------------------------------------------------------------------------- registration

def test_backend_name_resolves_in_a_process_that_never_imported_repc(tmp_path):
    script = textwrap.dedent("""
        import sys
        import torch
        import torch.nn as nn

        torch.manual_seed(0)
        branch = lambda k: nn.Sequential(nn.Conv2d(4, 4, k, padding=k // 2, bias=False), nn.BatchNorm2d(4))

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = branch(3), branch(1)

            def forward(self, x):
                return torch.relu(self.a(x) + self.b(x))

        model = Block().eval()
        with torch.no_grad():
            for bn in (model.a[1], model.b[1]):
                bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 2); bn.bias.uniform_(-1, 1)
        seen = []
        def record(gm, example_inputs):
            seen.append(gm)
            return gm.forward
        assert not any(name == "repc" or name.startswith("repc.") for name in sys.modules)
        fast = torch.compile(model, backend="repc", options={"inner": record})
        x = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            deviation = (fast(x) - model(x)).abs().max().item()
        convs = sum(n.op == "call_module" and isinstance(seen[0].get_submodule(n.target), nn.Conv2d)
                    or n.target is torch.conv2d for n in seen[0].graph.nodes)
        print("loaded", "repc.backend" in sys.modules, "deviation", deviation, "convs", convs)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    words = done.stdout.split()
    assert words[words.index("loaded") + 1] == "True"
    assert float(words[words.index("deviation") + 1]) < 1e-5
    assert words[words.index("convs") + 1] == "1"  # the two conv-BN branches became one conv


# ----------------------------------------------------------------------------- fusion

def test_repvgg_stack_compiles_to_one_conv_per_block_and_no_batch_norm():
    model = repvgg_stack(blocks=3)
    recorder = Recorder()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got, want = compiled(model, recorder)(x), model(x)
    assert_close(got, want)
    (graph,) = recorder.graphs
    assert count_batch_norms(graph) == 0
    assert count_convs(graph) == 3
    assert [p.op for p in graph.graph.nodes].count("placeholder") == 1  # only x: weights are frozen in


class BranchyNet(nn.Module):
    """RepVGG and MobileOne stages, then a linear -> BatchNorm1d -> dropout -> linear head."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        self.stages = nn.Sequential(RepVGGBlock(3, width, stride=2), RepVGGBlock(width, width),
                                    MobileOneUnit(width, 2 * width, stride=2))
        self.head = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.BatchNorm1d(2 * width), nn.Dropout(0.1),
                                  nn.Linear(2 * width, classes))

    def forward(self, x):
        return self.head(self.stages(x).mean((2, 3)))


def test_branchy_net_with_a_linear_head_matches_eager_with_every_batch_norm_folded():
    torch.manual_seed(0)
    model = randomize_bn(BranchyNet()).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = Recorder()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(compiled(model, recorder)(x), model(x))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # the model is never touched
    assert not any(m.training for m in model.modules())
    (graph,) = recorder.graphs
    names = call_targets(graph)
    assert count_batch_norms(graph) == 0
    assert "dropout" not in names  # eval-mode dropout is an identity and vanishes
    assert count_convs(graph) == 4  # two RepVGG blocks, MobileOne depthwise and pointwise
    assert sum(name in ("Linear", "linear") for name in names) == 1  # the head is one linear map


def test_example_net_with_a_diverse_branch_block_compiles_to_one_conv_per_block():
    model = example_net(width=8)  # the DBB's zero padding reaches the backend as torch._C._nn.pad
    recorder = Recorder()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(compiled(model, recorder)(x), model(x))
    (graph,) = recorder.graphs
    assert count_batch_norms(graph) == 0
    assert count_convs(graph) == 6  # stem, 2 RepVGG, DBB, MobileOne depthwise and pointwise


def test_mobileone_stack_with_dynamic_shapes_is_fused_and_runs_on_other_sizes():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(RepVGGBlock(3, 8, stride=2), MobileOneUnit(8, 16), MobileOneUnit(16, 16))).eval()
    recorder = Recorder()
    fast = compiled(model, recorder, dynamic=True)
    with torch.no_grad():
        for shape in ((2, 3, 16, 16), (5, 3, 20, 20)):
            x = torch.randn(shape)
            assert_close(fast(x), model(x))
    (graph,) = recorder.graphs  # one symbolic graph serves both sizes
    assert count_batch_norms(graph) == 0
    assert count_convs(graph) == 5


def test_each_subgraph_around_a_graph_break_is_fused_on_its_own(capsys):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = repvgg_stack(blocks=2, seed=1), RepVGGBlock(8, 8)

        def forward(self, x):
            y = self.first(x)
            print("between the stages")  # a graph break
            if y.mean().item() > -1e9:  # a data-dependent branch: another break
                y = y * 1.0
            return self.second(y)

    model = randomize_bn(Broken(), 2).eval()
    recorder = Recorder()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got, want = compiled(model, recorder)(x), model(x)
    assert_close(got, want)
    assert "between the stages" in capsys.readouterr().out
    with_convs = [g for g in recorder.graphs if count_convs(g)]
    assert len(recorder.graphs) >= 2 and len(with_convs) == 2
    assert sorted(count_convs(g) for g in with_convs) == [1, 2]
    assert all(count_batch_norms(g) == 0 for g in recorder.graphs)


def test_small_repvgg_net_through_inductor_matches_eager(caplog):
    model = repvgg_stack(width=4, blocks=2, seed=3)
    x = torch.randn(1, 3, 8, 8)
    fast = torch.compile(model, backend="repc")  # the default inner backend: inductor
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="repc.backend"):
        assert_close(fast(x), model(x), tol=1e-4)
    assert "2 region(s) merged" in caplog.text


class InductorSpy:
    """Records, for every graph Inductor compiles, whether freezing was on and how many convs it has."""

    def __init__(self, monkeypatch):
        import torch._inductor.compile_fx as compile_fx_module
        self.calls = []
        self._compile_fx = compile_fx_module.compile_fx
        monkeypatch.setattr(compile_fx_module, "compile_fx", self)

    def __call__(self, gm, example_inputs, *args, **kwargs):
        import torch._inductor.config as inductor_config
        self.calls.append({"freezing": inductor_config.freezing, "grad": torch.is_grad_enabled(),
                           "convs": count_convs(gm), "batch_norms": count_batch_norms(gm)})
        return self._compile_fx(gm, example_inputs, *args, **kwargs)


def test_default_inner_backend_compiles_fused_graphs_with_inductor_freezing(monkeypatch):
    spy = InductorSpy(monkeypatch)
    model = repvgg_stack(width=4, blocks=2, seed=5)
    x = torch.randn(2, 3, 12, 12)
    fast = torch.compile(model, backend="repc")
    with torch.no_grad():
        assert_close(fast(x), model(x), tol=1e-4)
    assert spy.calls == [{"freezing": True, "grad": False, "convs": 2, "batch_norms": 0}]
    import torch._inductor.config as inductor_config
    assert inductor_config.freezing is False  # the setting is the compile's own, not left behind


def test_inductor_freezing_also_applies_when_grad_is_enabled_but_nothing_requires_it(monkeypatch):
    spy = InductorSpy(monkeypatch)
    model = repvgg_stack(width=4, blocks=2, seed=6).requires_grad_(False)
    x = torch.randn(2, 3, 12, 12)
    out = torch.compile(model, backend="repc")(x)  # grad mode on, as in a plain script
    assert not out.requires_grad
    assert_close(out, model(x), tol=1e-4)
    assert [c["freezing"] for c in spy.calls] == [True] and spy.calls[0]["batch_norms"] == 0


def test_a_fused_graph_that_inductor_cannot_freeze_is_compiled_without_freezing(monkeypatch, caplog):
    spy = InductorSpy(monkeypatch)
    compile_fx = spy._compile_fx

    def refuse_freezing(gm, example_inputs, *args, **kwargs):
        import torch._inductor.config as inductor_config
        if inductor_config.freezing:
            raise NotImplementedError("no freezing for this graph")
        return compile_fx(gm, example_inputs, *args, **kwargs)

    spy._compile_fx = refuse_freezing
    model = repvgg_stack(width=4, blocks=2, seed=8)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="repc.backend"):
        assert_close(torch.compile(model, backend="repc")(x), model(x), tol=1e-4)
    assert "freezing failed on a fused graph (NotImplementedError: no freezing for this graph)" in caplog.text
    assert [(c["freezing"], c["batch_norms"]) for c in spy.calls] == [(True, 0), (False, 0)]  # still fused


def test_an_unfused_training_graph_goes_to_inductor_without_freezing(monkeypatch):
    spy = InductorSpy(monkeypatch)
    model = repvgg_stack(width=4, blocks=2, seed=7).train()
    x = torch.randn(4, 3, 12, 12)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        assert_close(torch.compile(model, backend="repc")(x), reference(x), tol=1e-4)
    assert [(c["freezing"], c["batch_norms"]) for c in spy.calls] == [(False, 5)]


def test_linear_and_dynamic_shape_graphs_through_frozen_inductor_match_eager(monkeypatch):
    spy = InductorSpy(monkeypatch)
    torch.manual_seed(0)
    attention = lb.randomize(lb.LoRASelfAttention(16, 4)).eval()
    ffn = lb.randomize(lb.RePaViTFFN(16)).eval()
    tokens = torch.randn(2, 9, 16)
    conv = randomize_bn(nn.Sequential(RepVGGBlock(3, 8, stride=2), MobileOneUnit(8, 16))).eval()
    with torch.no_grad():
        assert_close(torch.compile(attention, backend="repc")(tokens), attention(tokens), tol=1e-4)
        assert_close(torch.compile(ffn, backend="repc")(tokens), ffn(tokens), tol=1e-4)
        fast = torch.compile(conv, backend="repc", dynamic=True)
        for shape in ((2, 3, 16, 16), (3, 3, 20, 24)):
            x = torch.randn(shape)
            assert_close(fast(x), conv(x), tol=1e-4)
    assert len(spy.calls) >= 3 and all(c["freezing"] for c in spy.calls)
    assert spy.calls[-1]["batch_norms"] == 0 and spy.calls[-1]["convs"] == 3


def test_a_graph_with_a_fixed_size_head_compiles_without_printing_to_stderr(capfd):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(RepVGGBlock(3, 4, stride=2), nn.Flatten(1), nn.Linear(4 * 4 * 4, 10))).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert_close(compiled(model)(x), model(x))
    assert capfd.readouterr().err == ""  # the checks' trial sizes that the head rejects stay quiet


# ----------------------------------------------------------------------------- guard_filter

def filtered(model, recorder, **kwargs):
    return torch.compile(model, backend="repc", options={"inner": recorder, "guard_filter_fn": guard_filter}, **kwargs)


def test_guard_filter_drops_the_guards_on_the_models_tensors_and_structure():
    model = repvgg_stack(blocks=2)
    x = torch.randn(2, 3, 16, 16)
    kept = {}
    for name, keep in (("all", lambda entries: [True] * len(entries)), ("filtered", guard_filter)):
        def record(entries, name=name, keep=keep):
            flags = list(keep(entries))
            kept[name] = [(e.name, e.guard_type) for e, k in zip(entries, flags) if k]
            return flags
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(copy.deepcopy(model), backend="repc", options={"inner": "eager", "guard_filter_fn": record})(x)
    assert not any(kind == "TENSOR_MATCH" and "_parameters" in name for name, kind in kept["filtered"])
    assert any(kind == "TENSOR_MATCH" and "_parameters" in name for name, kind in kept["all"])
    assert any(kind == "TENSOR_MATCH" and name == "args[0]" for name, kind in kept["filtered"])  # the input
    assert any(name.endswith(".training") for name, kind in kept["filtered"])
    assert "GRAD_MODE" in {kind for _, kind in kept["filtered"]}
    assert len(kept["filtered"]) < len(kept["all"]) / 3


def test_guard_filter_still_recompiles_for_training_and_the_compiled_model_trains():
    model = repvgg_stack(blocks=2)
    recorder = Recorder()
    fast = filtered(model, recorder)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert_close(fast(x), model(x))
    assert count_batch_norms(recorder.graphs[-1]) == 0
    reference = copy.deepcopy(model).train()
    model.train()
    with torch.no_grad():
        assert_close(fast(x), reference(x))  # batch statistics: the training flag's guard recompiled
    assert len(recorder.graphs) == 2 and count_batch_norms(recorder.graphs[-1]) == 5
    assert torch.equal(model[0].dense[1].running_mean, reference[0].dense[1].running_mean)


def test_guard_filter_sends_calls_whose_weights_require_grad_again_to_the_unfused_graph():
    model = repvgg_stack(blocks=2).requires_grad_(False)
    recorder = Recorder()
    fast = filtered(model, recorder)
    x = torch.randn(2, 3, 16, 16)
    assert_close(fast(x), model(x))  # grad mode on, nothing requires grad: fused
    assert len(recorder.graphs) == 1 and count_batch_norms(recorder.graphs[0]) == 0
    model.requires_grad_(True)  # fine-tuning: with the tensor guards gone, dynamo does not recompile
    out = fast(x)
    assert out.requires_grad
    out.sum().backward()
    want = copy.deepcopy(model)
    want(x).sum().backward()
    assert torch.allclose(model[0].dense[0].weight.grad, want[0].dense[0].weight.grad, rtol=1e-4, atol=1e-5)


def test_guard_filter_keeps_every_guard_of_a_frame_whose_graph_was_left_unfused():
    model = repvgg_stack(blocks=2).train()
    recorder = Recorder()
    fast = filtered(model, recorder)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        fast(x)
        model.requires_grad_(False)  # the unfused graph reads the parameters: their guards must hold
        fast(x)
    assert len(recorder.graphs) == 2  # the second call recompiled


# ----------------------------------------------------------------------------- validity

def test_training_mode_hands_the_graph_over_unchanged_and_updates_running_statistics():
    model = repvgg_stack(blocks=2).train()
    reference = copy.deepcopy(model)
    recorder = Recorder()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        got, want = compiled(model, recorder)(x), reference(x)
    assert_close(got, want)
    (graph,) = recorder.graphs
    assert count_batch_norms(graph) == 2 + 3  # the first block (3 -> 8 channels) has no identity BN
    assert count_convs(graph) == 4
    for mine, theirs in zip(model.modules(), reference.modules()):
        if isinstance(mine, nn.BatchNorm2d):  # the compiled model still trains its own statistics
            assert torch.equal(mine.running_mean, theirs.running_mean)
            assert not torch.equal(mine.running_mean, torch.zeros_like(mine.running_mean))


def test_grad_enabled_leaves_the_graph_unfused_with_a_warning_and_gradients_flow(caplog):
    model = repvgg_stack(blocks=2)
    recorder = Recorder()
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="repc.backend"):
        out = compiled(model, recorder)(x)
    assert "gradients are enabled" in caplog.text
    (graph,) = recorder.graphs
    assert count_batch_norms(graph) == 5 and count_convs(graph) == 4
    out.sum().backward()
    assert model[0].dense[0].weight.grad is not None


def test_one_compiled_model_fuses_for_inference_and_stays_unfused_for_training():
    model = repvgg_stack(blocks=2)
    recorder = Recorder()
    fast = compiled(model, recorder)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(fast(x), model(x))
    model.train()
    reference = copy.deepcopy(model)
    fast(x).sum().backward()  # dynamo recompiles: training mode and grad are guarded
    reference(x).sum().backward()
    assert [count_batch_norms(g) for g in recorder.graphs] == [0, 5]
    assert torch.allclose(model[1].dense[0].weight.grad, reference[1].dense[0].weight.grad, atol=1e-5)


def test_training_mode_dropout_alone_makes_the_graph_invalid():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Dropout(0.5))
    randomize_bn(model).eval()
    model[2].train()
    recorder = Recorder()
    with torch.no_grad():
        compiled(model, recorder)(torch.randn(2, 3, 8, 8))
    (graph,) = recorder.graphs
    assert count_batch_norms(graph) == 1 and "dropout" in call_targets(graph)


def test_a_graph_that_writes_into_a_buffer_is_left_unfused_and_the_write_reaches_the_model():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = RepVGGBlock(3, 4)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return self.block(x)

    model = randomize_bn(Counting()).eval()
    recorder = Recorder()
    fast = compiled(model, recorder)
    with torch.no_grad():
        fast(torch.randn(1, 3, 8, 8))
        fast(torch.randn(1, 3, 8, 8))
    assert model.calls.item() == 2
    assert count_batch_norms(recorder.graphs[0]) == 2


def test_a_graph_that_writes_into_its_input_is_left_unfused_and_the_caller_sees_the_write():
    class Clamping(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = RepVGGBlock(3, 4)

        def forward(self, x):
            x.clamp_(min=0)  # the caller's tensor changes
            return self.block(x)

    model = randomize_bn(Clamping()).eval()
    recorder = Recorder()
    x = torch.randn(1, 3, 8, 8)
    expected_input = x.clamp(min=0)
    with torch.no_grad():
        compiled(model, recorder)(x)
    assert torch.equal(x, expected_input)
    assert count_batch_norms(recorder.graphs[0]) == 2


# ----------------------------------------------------------------------------- freezing

def test_weights_are_frozen_at_compile_time_and_a_recompile_picks_up_new_ones():
    model = repvgg_stack(blocks=2, width=4)
    x = torch.randn(2, 3, 16, 16)
    fast = compiled(model)
    with torch.no_grad():
        before = model(x)
        assert_close(fast(x), before)
        model[1].dense[0].weight.mul_(2.0)
        after = model(x)
        assert not torch.allclose(before, after)
        assert_close(fast(x), before)  # the compiled model still computes with the old weights
        torch._dynamo.reset()
        assert_close(compiled(model)(x), after)


# ----------------------------------------------------------------------------- direct use

def test_fuse_graph_reports_rewrites_for_a_dynamo_graph():
    captured = []

    def capture(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    model = repvgg_stack(blocks=2)
    with torch.no_grad():
        torch.compile(model, backend=capture)(torch.randn(2, 3, 16, 16))
        gm, inputs = captured[0]
        outcome, fused, positions = fuse_graph(gm, inputs)
    assert outcome.fused and len(outcome.rewrites) == 2
    assert outcome.frozen == len(inputs) - 1 and len(positions) == 1
    assert count_convs(fused) == 2 and count_batch_norms(fused) == 0


def test_fuse_graph_on_a_traced_module_copies_its_submodules_instead_of_editing_them():
    model = repvgg_stack(blocks=2)
    traced = torch.fx.symbolic_trace(model)  # call_module nodes, ReLU(inplace=True) modules
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outcome, fused, positions = fuse_graph(traced, [x])
        assert_close(fused(x), model(x))
    assert outcome.fused and outcome.frozen == 0 and positions == [0]
    assert count_convs(fused) == 2 and count_batch_norms(fused) == 0
    assert all(block.act.inplace for block in model)  # repc computes out of place on its own copies
    assert count_batch_norms(traced) == 5


@pytest.mark.parametrize("options, message", [
    ({"innr": "eager"}, "unknown repc backend option(s) 'innr'"),
    ({"inner": "no_such_backend"}, "unknown inner backend 'no_such_backend'"),
    ({"inner": "repc"}, "cannot be repc itself"),
    ({"verify": "yes"}, "option 'verify' must be True or False"),
])
def test_bad_options_get_a_one_line_message(options, message):
    gm = torch.fx.symbolic_trace(nn.Conv2d(3, 3, 1))
    with pytest.raises(BackendOptionError) as info:
        repc_backend(gm, [torch.randn(1, 3, 4, 4)], options=options)
    assert message in str(info.value) and "\n" not in str(info.value)
