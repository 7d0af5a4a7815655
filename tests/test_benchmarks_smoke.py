"""The benchmark scripts run end to end in their tiny ``--quick`` configuration, and their helpers.

No timing assertions: the figures depend on the machine.  What is asserted is that each
script checks what it times (the hand-written deploy forms agree with the training forms,
the compiled stacks are verified), prints its table and writes valid JSON.
"""

import importlib.util
import json
import pathlib
import sys
import types

import pytest
import torch
import torch.nn as nn

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    key = f"repc_benchmarks_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


bench_latency = _load("bench_latency")
bench_compile_time = _load("bench_compile_time")
bench_vit = _load("bench_vit")
bench_models = _load("bench_models")
bench_cost_model = _load("bench_cost_model")
bench_heavy_ops = _load("bench_heavy_ops")
bench_timm = _load("bench_timm")
bench_compile_real = _load("bench_compile_real")
bench_llm_merge = _load("bench_llm_merge")
sys.path.insert(0, str(BENCHMARKS))  # the scripts import bench_common from beside them, as this does
import bench_common as common  # noqa: E402


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- scripts

def test_latency_quick_prints_a_row_per_model_and_writes_json(tmp_path, capsys, one_thread):
    out = tmp_path / "latency.json"
    assert bench_latency.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "repc/training" in printed and "repc/deploy" in printed
    table_rows = [line.split()[0] for line in printed.splitlines()[3:]]
    assert table_rows == list(bench_latency.MODELS)
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["results"]] == list(bench_latency.MODELS)
    for r in data["results"]:
        assert r["convs"]["repc"] == r["convs"]["deploy"] < r["convs"]["training"]
        assert r["ms"]["training"] > 0 and r["repc_over_deploy"] > 0


def test_vit_quick_merges_every_block_and_lowers_flops(tmp_path, capsys, one_thread):
    out = tmp_path / "vit.json"
    assert bench_vit.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "repc/training" in printed and "MACs before" in printed
    data = json.loads(out.read_text())
    assert data["flops"]["repc"] < data["flops"]["training"]
    rules = [r["rule"] for r in data["rewrites"]]
    assert sum("distribute" in r for r in rules) == data["config"]["depth"]  # one RePaViT FFN per block
    assert all(r["macs_after"] < r["macs_before"] for r in data["rewrites"])


def test_compile_time_quick_prints_growth_and_phase_tables(tmp_path, capsys, one_thread):
    out = tmp_path / "compile.json"
    assert bench_compile_time.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "us/node" in printed and "k first->last" in printed and "per-region checks" in printed
    data = json.loads(out.read_text())
    results = data["results"]
    assert [r["family"] for r in results] == ["mixed", "mixed"]
    assert results[0]["nodes"] < results[1]["nodes"]
    for r in results:
        assert r["verified"] and not r["rolled_back"]
        assert r["rewrites"] == 4 * r["blocks"] // 3  # RepVGG 1, MobileOne unit 2, DBB 1 per cycle of 3
        # the split accounts for the whole compile; hooks the core renamed are named, not fatal
        for clock in ("wall", "cpu"):
            timed = sum(v for k, v in r[f"phases_{clock}_s"].items() if not k.startswith("gc"))
            assert timed == pytest.approx(r[f"{clock}_s"], rel=0.02)
        assert len(r["missing_phases"]) <= len(bench_compile_time.PHASES) // 2
        for hook in r["missing_phases"]:
            assert hook in printed


def test_models_quick_compares_with_each_reference_conversion(tmp_path, capsys, one_thread):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "models.json"
    names = ["bert-lora", "repvgg-lib", "repnext-style", "repavit-paper", "zeroi2v-mha"]  # PEFT, a library net, papers
    assert bench_models.main(["--quick", "--models", *names, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model | front end |" in printed and "merge_and_unload" in printed and "hand-written deploy" in printed
    rows = [line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ")][1:]
    assert rows == names
    data = json.loads(out.read_text())
    for r in data["results"]:
        assert r["front_end"] in ("torch.export", "fx") and r["capture"] == "whole"
        assert r["verified"] and r["exact"] and r["max_rel_error"] < 1e-4
        assert r["heavy"]["after"] <= r["heavy"]["reference"]
        assert r["norms"]["after"] <= r["norms"]["reference"]
        # (RePaViT's deploy form runs more, narrower linears than its training form)
        assert r["heavy"]["reference"] < r["heavy"]["before"] or r["norms"]["reference"] < r["norms"]["before"]
        assert r["compile_s"] > 0 and r["export_s"] > 0 and r["repc_over_reference"] > 0


def test_compile_real_quick_compiles_each_model_in_its_own_process_split_by_phase(tmp_path, capsys):
    out = tmp_path / "real.json"
    assert bench_compile_real.main(["--quick", "--models", "vit-b", "repvgg-a2", "--pause", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "repc/export" in printed and "whole-model check" in printed and "target: median <= 2.5x" in printed
    results = json.loads(out.read_text())
    assert [r["model"] for r in results] == ["vit-b", "repvgg-a2"]
    assert [r["front_end"] for r in results] == ["torch.export", "fx"]
    for r in results:
        assert r["verified"] and r["rewrites"] > 0 and not r["missing_hooks"]
        assert sum(r["phases"].values()) == pytest.approx(r["compile_s"], rel=1e-6)
        assert r["phases"]["whole-model check"] > 0 and r["export_static_s"] > 0


def test_llm_merge_quick_runs_each_merge_in_its_own_process(tmp_path, capsys):
    pytest.importorskip("peft")
    out = tmp_path / "llm.json"
    bench_llm_merge.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "repc/export time" in printed and "peft s / +GiB" in printed
    results = json.loads(out.read_text())["quick"]
    assert set(results) == {"peft", "export", "repc"}
    for run in results.values():
        assert run["seconds"] > 0 and run["params"] == results["repc"]["params"] > 0


def test_llm_checkpoint_quick_merges_a_saved_directory_and_compares_it_with_peft(tmp_path, capsys):
    pytest.importorskip("peft")
    bench_llm_checkpoint = _load("bench_llm_checkpoint")
    out = tmp_path / "checkpoint.json"
    bench_llm_checkpoint.main(["--quick", "--json", str(out)])
    assert "repc fuse s / peak GiB" in capsys.readouterr().out
    results = json.loads(out.read_text())["quick"]
    assert set(results) == {"checkpoint", "copy", "export", "peft", "repc", "compare"}
    assert all(results[m]["seconds"] > 0 and results[m]["peak_gib"] > 0 for m in ("copy", "export", "peft", "repc"))
    assert results["compare"]["relative_difference"] < 1e-5  # (float32: the two merges agree)


def test_cost_model_quick_compares_each_way_of_merging_with_the_clock(tmp_path, capsys, one_thread, monkeypatch):
    from repc.latency import KINDS, LatencyModel

    given = LatencyModel({k: (1e-5, 1e-10, 1e-11) for k in KINDS})  # no calibration in the test
    monkeypatch.setattr(bench_cost_model, "latency_model", lambda device, dtype: given)
    out = tmp_path / "cost.json"
    bench_cost_model.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "latency within 5% of best" in printed and "3x3 + dilated 3x3 (c=16)" in printed
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(bench_cost_model.REGIONS)
    for r in rows:
        assert set(r["measured_s"]) == {"macs", "whole", "latency"} and min(r["measured_s"].values()) > 0
        assert r["convs"]["whole"] <= r["convs"]["macs"]


def test_heavy_ops_quick_counts_what_random_networks_keep_per_cost_model(tmp_path, capsys, one_thread, monkeypatch):
    from repc.latency import KINDS, LatencyModel

    given = LatencyModel({k: (1e-5, 1e-10, 1e-11) for k in KINDS})
    monkeypatch.setattr(bench_heavy_ops, "latency_model", lambda device, dtype: given)
    out = tmp_path / "heavy.json"
    assert bench_heavy_ops.main(["--quick", "--json", str(out)]) == 0
    assert "mean heavy ops kept" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["networks"] >= 5
    for fractions in data["fractions"].values():
        # (above 1 where an average pool merged with its BN became a depthwise conv)
        assert len(fractions) == data["networks"] and all(0 <= f <= 2 for f in fractions)


@pytest.mark.parametrize("kind", ["repvgg", "mobileone"])
def test_models_hand_written_deploy_form_is_one_conv_per_block_and_exact(kind):
    case = bench_models.library_case(kind, quick=True)
    net, deployed = case.model, case.reference
    blocks = sum(isinstance(m, (bench_models.LibraryRepVGGBlock, bench_models.LibraryMobileOneBlock))
                 for m in net.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == blocks + 1  # + the stem
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(3, 3, 20, 12)
    with torch.no_grad():
        assert bench_models.rel_error(deployed(x).logits, net(x).logits) < 1e-5


def test_bad_arguments_get_a_one_line_message(capsys):
    with pytest.raises(SystemExit):
        bench_latency.main(["--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_compile_time.main(["--sizes", "5"])
    assert "--sizes must be at least 10" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the deploy baseline

@pytest.mark.parametrize("block", [
    lambda: bench_latency.RepVGGBlock(4, 8, stride=2),
    lambda: bench_latency.RepVGGBlock(8, 8, groups=2),
    lambda: bench_latency.MobileOneUnit(4, 8, stride=2),
    lambda: bench_latency.DiverseBranchBlock(4, 6, stride=2),
    lambda: bench_latency.DiverseBranchBlock(4, 4),
], ids=["repvgg-s2", "repvgg-g2", "mobileone-s2", "dbb-s2", "dbb"])
def test_hand_written_deploy_form_is_one_conv_per_block_and_exact(block):
    torch.manual_seed(0)
    model = bench_latency.randomize_bn(block(), seed=3).eval()
    deployed = bench_latency.deploy(model)
    x = torch.randn(2, model_in_channels(model), 9, 9)
    with torch.no_grad():
        assert bench_latency.rel_deviation(deployed(x), model(x)) < 1e-5
    blocks = 2 if isinstance(model, bench_latency.MobileOneUnit) else 1
    assert bench_latency.count_convs(deployed) == blocks


def model_in_channels(model: nn.Module) -> int:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels


def test_deploy_refuses_an_unknown_block():
    with pytest.raises(TypeError, match="no hand-written deploy form for Linear"):
        bench_latency.deploy(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- helpers

def test_interleaved_medians_rotates_the_order_and_takes_the_median():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b"), "c": lambda: order.append("c")}
    result = common.interleaved_medians(fns, rounds=3, calls_per_round=1, warmup=0)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(r.samples) == 3 for r in result.values())
    lat = common.Latency("x", [3.0, 1.0, 100.0])
    assert lat.median == 3.0


class FakeClock:
    """Stands in for the ``time`` module inside common: time moves only when told to."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def process_time(self):
        return self.now / 2  # as if the process had half a core


def test_phase_timer_counts_nested_time_once(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(common, "time", clock)
    timer = common.PhaseTimer()
    with timer.phase("outer"):
        clock.now += 2.0
        with timer.phase("inner"):
            clock.now += 5.0
        with timer.phase("inner"):
            clock.now += 1.0
    assert timer.wall == {"inner": 6.0, "outer": 2.0}  # the inner 6 s are not counted in outer again
    assert timer.cpu == {"inner": 3.0, "outer": 1.0}
    assert timer.calls == {"inner": 2, "outer": 1}


@pytest.fixture
def reader_module(monkeypatch):
    """A module that reads ``copy.deepcopy`` through ``import copy`` and has a function of its own."""
    module = types.ModuleType("bench_smoke_reader")
    exec("import copy\n"
         "def work(x):\n"
         "    return copy.deepcopy(x)\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_phase_timer_wraps_functions_only_while_instrumenting(reader_module):
    import copy
    original = reader_module.work
    timer = common.PhaseTimer()
    targets = [("bench_smoke_reader", "work", "work"), ("bench_smoke_reader", "no_such_function", "x"),
               ("bench_smoke_reader", "copy.deepcopy", "copy")]
    with timer.instrument(targets):
        assert reader_module.work is not original
        assert reader_module.work([1, [2, [3]]]) == [1, [2, [3]]]
        assert copy.deepcopy.__module__ == "copy"  # the copy module itself is not patched
    assert reader_module.work is original and reader_module.copy is copy
    assert timer.calls == {"work": 1, "copy": 1}  # deepcopy's recursion is not timed call by call
    assert timer.missing == ["bench_smoke_reader:no_such_function"]


def test_growth_exponent_reads_linear_and_quadratic():
    assert common.growth_exponent(1000, 1.0, 2000, 2.0) == pytest.approx(1.0)
    assert common.growth_exponent(1000, 1.0, 3000, 9.0) == pytest.approx(2.0)
    assert common.growth_exponent(1000, 0.0, 2000, 1.0) != common.growth_exponent(1000, 0.0, 2000, 1.0)  # nan


def test_write_json_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    common.write_json(str(target), {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        common.write_json(str(target), {1j: "a complex key is not JSON"})  # fails half-way through dumping
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# ----------------------------------------------------------------------------- bench_timm (timm not here)

def test_bench_timm_says_where_timm_is_missing_and_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # (an import of it then fails, installed or not)
    assert bench_timm.main(["--models", "repvgg_a0"]) == 2
    assert "timm is not installed" in capsys.readouterr().out


def test_randomized_relative_moves_every_parameter_and_bn_statistic():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    fresh = [t.clone() for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    common.randomized_relative(model)
    moved = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    assert not model.training and all(not torch.equal(a, b) for a, b in zip(fresh, moved))


def test_bench_timm_renders_a_failed_model_as_a_row():
    ok = {"model": "a", "front_end": "fx", "output": "module-preserving", "before": (4, 2), "repc": (2, 0),
          "reference": (2, 0), "error": 1e-7, "reference_error": 1e-7, "noise": 1e-7, "compile_s": 1.0, "repc_over_reference": 0.98}
    table = bench_timm.render([ok, {"model": "b", "failed": "RuntimeError: no"}])
    assert "4 -> 2 (2)" in table and "failed: RuntimeError: no" in table


def test_bench_timm_counts_the_aten_ops_a_model_runs_where_no_graph_is_captured():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)).eval()
    x = torch.randn(1, 3, 6, 6)
    model(x)
    assert bench_timm.dispatched_counts(model, x) == (2, 1)
