"""The report people read: rows by module path, identical blocks grouped, rules in words, and
multiply-adds named MACs everywhere (FLOPs only where torch's counter counts FLOPs)."""

import json

import torch
import torch.nn as nn

import repc
from repc.examples import RepVGGBlock, randomize_bn
from repc.reasons import MergeRule
from repc.report import ModuleSwap, Report, Rewrite, _ranges, describe_region, describe_rules, rewrite_rows


def _rewrite(module, macs=(100, 80), params=(10, 8), rule="compose+sum", result="Conv2d(8->8, k=3x3, s=(1, 1))"):
    return Rewrite(rule, f"add_{module}", [f"{module}.a.0 (Conv2d)", f"{module}.a.1 (BatchNorm2d)",
                                            f"{module}.b.0 (Conv2d)", f"{module}.b.1 (BatchNorm2d)", "add (add)"],
                   [result], params[0], params[1], macs[0], macs[1], module=module)


def test_rules_and_regions_are_said_in_words():
    assert describe_rules((MergeRule.COMPOSE, MergeRule.SUM)) == "chained ops composed, branches summed"
    assert describe_rules(Rewrite("compose+layout", "x", [], [], 1, 1).rules) == \
        "chained ops composed, through reshapes and transposes"
    assert describe_rules(()) == "folded" and Rewrite("fold", "x", [], [], 1, 1).rule == "fold"
    assert describe_region(_rewrite("s.0")) == "2 conv + 2 BN branches → one 3×3 conv"
    chain = Rewrite("compose", "bn", ["conv (Conv2d)", "bn (BatchNorm2d)"], ["Conv2d(3->8, k=1x1)"], 1, 1, 2, 1)
    assert describe_region(chain) == "conv + BN → one 1×1 conv"
    lora = Rewrite("compose+sum", "add", ["q.base (Linear)", "q.A (Linear)", "q.B (Linear)", "mul (mul)", "add (add)"],
                   ["Linear(8->8, bias=True)"], 1, 1, 2, 1)
    assert describe_region(lora) == "3 linear + scale branches → one linear"


def test_identical_blocks_are_one_row_with_their_index_range():
    rewrites = [_rewrite(f"stages.1.{i}") for i in range(14)] + [_rewrite("stages.2.0", macs=(50, 40)),
                                                                  _rewrite("head", rule="compose")]
    rows = rewrite_rows(rewrites)
    assert rows[0][:4] == ("module", "what", "how", "×")
    assert [r[0] for r in rows[1:]] == ["stages.1.0–13", "stages.2.0", "head"]
    assert rows[1][3] == "×14" and rows[2][3] == "" and rows[1][5] == "100 -> 80"
    # blocks that differ (other counts) are not grouped; gaps in the range are written
    mixed = [_rewrite(f"b.{i}") for i in (0, 1, 2, 5)] + [_rewrite("b.3", params=(10, 9))]
    assert [r[0] for r in rewrite_rows(mixed)[1:]] == ["b.0–2,5", "b.3"]
    assert _ranges([3, 1, 2, 7, 9, 8]) == "1–3,7–9"


def test_macs_are_named_macs_in_the_json_and_the_former_names_still_read():
    r = Rewrite("compose", "x", [], [], 4, 2, flops_before=100, flops_after=60, shared_flops=10)
    assert (r.macs_before, r.macs_after, r.shared_macs) == (100, 60, 10)
    assert (r.flops_before, r.flops_after, r.shared_flops) == (100, 60, 10)
    report = Report(rewrites=[r])
    d = json.loads(report.to_json())
    assert d["macs_saved"] == 30 and report.macs_saved == report.flops_saved == 30
    assert {"macs_before", "macs_after", "shared_macs"} <= set(d["rewrites"][0])
    assert not any("flops" in key for key in d["rewrites"][0]) and "flops_saved" not in d


def test_a_compiled_model_reports_by_module_with_the_swaps_grouped():
    model = randomize_bn(nn.Sequential(nn.Sequential(*[RepVGGBlock(8, 8) for _ in range(6)]),
                                       nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))).eval()
    fused = repc.compile(model, torch.randn(2, 8, 8, 8), graph=False)
    report = fused.repc_report
    text = str(report)
    assert "compose+sum" not in text and "add_" not in text
    assert [r.module for r in report.rewrites][:6] == [f"0.{i}" for i in range(6)]
    lines = text.splitlines()
    block_rows = [l for l in lines if l.strip().startswith("0.0–5")]
    assert len(block_rows) == 2  # one rewrite row and one swap row for the six blocks
    assert "×6" in block_rows[0] and "2 conv + 3 BN branches → one 3×3 conv" in block_rows[0]
    assert "Sequential (Conv2d, ReLU)" in block_rows[1]
    assert "returned: the model's own class" in text
    assert any("1 -> Conv2d, 2 -> Identity" in l for l in lines)


def test_the_graph_output_says_why_it_was_returned():
    report = Report(rewrites=[_rewrite("a.0")], output="graph", output_note="a region spans the model's own forward")
    assert "returned: the whole-model graph (a torch.fx.GraphModule): a region spans the model's own forward" \
        in str(report)
    swaps = [ModuleSwap(f"s.{i}", "Block", "Conv2d") for i in range(3)] + \
        [ModuleSwap("s.3", "Block", "not applied", ["x"], "s.3: called 2 times on the example")]
    text = str(Report(rewrites=[_rewrite("a.0")], output="module-preserving", swaps=swaps))
    assert "s.0–2" in text and "×3" in text and "called 2 times" in text


def test_progress_bars_are_off_without_a_terminal_or_when_asked(monkeypatch, capsys):
    from repc import progress
    assert progress.wanted(False) is False
    monkeypatch.setattr(progress.sys, "stderr", __import__("io").StringIO())
    assert progress.wanted(None) is False and progress.wanted(True) is False  # not a terminal

    class Terminal(__import__("io").StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    assert progress.wanted(None) is True and progress.wanted(False) is False
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    phases = progress.Phases(["a", "b"], progress.wanted(None))
    with phases.step("a"):
        pass
    with phases.step("b"):
        pass
    assert phases.bar.n == 2
    phases.close()
    assert "phases" in terminal.getvalue()
    assert list(progress.each([1, 2, 3], False, "x")) == [1, 2, 3]


def test_a_rewrite_that_saves_nothing_is_not_counted_as_one():
    saving = Rewrite("compose", "bn", ["conv (Conv2d)", "bn (BatchNorm2d)"], ["Conv2d(3->8, k=1x1)"], 56, 32, 24, 24)
    idle = Rewrite("compose", "to_5", ["mul_1 (mul)", "to_5 (to)"], ["mul"], 0, 0, 64, 64)
    assert saving.saves and not idle.saves
    report = Report(rewrites=[saving, idle])
    assert str(report).startswith("repc: 1 rewrite(s) (and 1 that save nothing);")


class _GatedBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.proj, self.gate = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x) * torch.sigmoid(self.gate(x))  # (a product of two activations)


class _GatedStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_GatedBlock() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_regions_kept_are_named_by_the_module_that_computed_them_and_grouped_like_the_rewrites():
    model = _GatedStack().eval()
    fused = repc.compile(model, torch.randn(2, 8))
    report = fused.repc_report
    assert {r.module for r in report.rejected} == {"blocks.0", "blocks.1", "blocks.2"}
    kept = [line for line in str(report).splitlines() if line.strip().startswith("kept")]
    assert kept == ["  kept blocks.0–2 (×3): " + report.rejected[0].reason], kept
    assert "product of two activations" in kept[0]
    assert json.loads(report.to_json())["rejected"][0]["module"] == "blocks.0"
