"""repc.replay: the ops that computed a compiled module's weights, recorded while it compiled and
run on another module made and called as that one."""

import pytest
import torch
import torch.nn as nn

import repc
from repc.replay import WeightRecorder, check_replayed, module_weights, replay_key, with_weights

from blocks import RepVGG, randomize
from linear_blocks import LoRALinear


class LoRAMLP(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.up, self.down = LoRALinear(d, 2 * d), LoRALinear(2 * d, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


BLOCKS = {
    # merged weights linear in the trained ones (W + s B A), and not (a BN's scale over the root of
    # its running variance, three branches summed): both are ops on the block's own weights
    "lora mlp": (lambda: LoRAMLP(), lambda: torch.randn(2, 5, 16)),
    "repvgg": (lambda: RepVGG(8, 8), lambda: torch.randn(2, 8, 6, 6)),
}


def _layer(name, seed):
    factory, example = BLOCKS[name]
    torch.manual_seed(seed)
    block = randomize(factory(), seed).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return block, example()


def _compiled(block, x, recorder=None):
    if recorder is None:
        return repc.compile(block, (x,))
    with recorder:
        return repc.compile(block, (x,))


@pytest.mark.parametrize("name", list(BLOCKS))
def test_a_program_recorded_on_one_layer_gives_another_layers_compiled_weights(name):
    first, x = _layer(name, 0)
    recorder = WeightRecorder(first)
    compiled = _compiled(first, x, recorder)
    program, why = recorder.program(compiled)
    assert program is not None, why
    other, _ = _layer(name, 1)
    assert replay_key(other, (x,), {}) == replay_key(first, (x,), {})
    replayed = program.run(module_weights(other))
    want = module_weights(_compiled(other, x))
    assert replayed.keys() == want.keys()
    for key, t in want.items():  # (float64 sums in another order: an ulp at most)
        assert torch.allclose(replayed[key], t, rtol=1e-6, atol=1e-7), key
    merged = with_weights(compiled, replayed)
    assert merged is not compiled and all(a is not b for a, b in zip(merged.modules(), compiled.modules()))
    dev, failure = check_replayed(merged, other, (x,), {})
    assert failure is None and dev < 1e-5
    with torch.no_grad():
        assert torch.allclose(merged(x), other(x), rtol=1e-4, atol=1e-5)


def test_a_program_replayed_with_wrong_weights_fails_its_check():
    first, x = _layer("lora mlp", 0)
    recorder = WeightRecorder(first)
    compiled = _compiled(first, x, recorder)
    program, why = recorder.program(compiled)
    other, _ = _layer("lora mlp", 1)
    weights = program.run(module_weights(other))
    weights["up.weight"] = weights["up.weight"] * 1.01  # (a term replayed with another scale)
    dev, failure = check_replayed(with_weights(compiled, weights), other, (x,), {})
    assert failure is not None and "deviation" in failure and dev > 1e-3


def test_a_weight_dropped_by_the_compile_and_not_read_refuses_the_program():
    # a "merge" that left the adapter out (as one could for a zero factor): replayed on a layer
    # whose factor is not zero it would drop a real term, so no program is kept
    block, x = _layer("lora mlp", 0)
    recorder = WeightRecorder(block)
    with recorder, torch.no_grad():
        up = nn.Linear(16, 32)
        up.weight.copy_(block.up.base.weight)
        up.bias.copy_(block.up.base.bias)
        dropped = nn.Module()
        dropped.up = up
    program, why = recorder.program(dropped)
    assert program is None and "neither kept nor read" in why


def test_a_weight_computed_outside_torch_ops_refuses_the_program():
    block, x = _layer("lora mlp", 0)
    recorder = WeightRecorder(block)
    with recorder:
        held = nn.Module()
        held.weight = nn.Parameter(torch.from_numpy(block.up.base.weight.detach().numpy() * 2), requires_grad=False)
        held.kept = nn.Parameter(block.up.base.bias, requires_grad=False)
    program, why = recorder.program(held)
    assert program is None and "values the recording did not see computed" in why


def test_a_random_draw_in_the_ops_refuses_the_program():
    block, x = _layer("lora mlp", 0)
    recorder = WeightRecorder(block)
    with recorder:
        noisy = nn.Module()
        noisy.weight = nn.Parameter(block.up.base.weight + torch.randn_like(block.up.base.weight), requires_grad=False)
        noisy.rest = nn.Parameter(torch.cat([p.reshape(-1) for n, p in block.named_parameters()
                                             if n != "up.base.weight"]), requires_grad=False)
    program, why = recorder.program(noisy)
    assert program is None and "do not give the compiled weight again" in why


def test_replay_keys_hold_float_attributes_not_layer_indices():
    a, x = _layer("lora mlp", 0)
    b, _ = _layer("lora mlp", 1)
    b.layer_index = 7  # (differs from layer to layer: not a constant of the merge)
    assert replay_key(a, (x,), {}) == replay_key(b, (x,), {})
    b.down.scale = a.down.scale * 2  # (a LoRA scale: read into the merged weight)
    assert replay_key(a, (x,), {}) != replay_key(b, (x,), {})
    assert replay_key(a, (x[:1],), {}) != replay_key(a, (x,), {})  # (another call)


class SharedFactor(nn.Module):
    """Two LoRA layers holding one ``lora_A`` (as VeRA's layers hold one projection buffer)."""

    def __init__(self, d=16):
        super().__init__()
        self.up, self.side, self.down = LoRALinear(d, 2 * d), LoRALinear(d, 2 * d), LoRALinear(2 * d, d)
        self.side.lora_A = self.up.lora_A

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) + self.side(x))


def test_a_weight_held_under_two_names_and_merged_keeps_the_program():
    blocks = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        block = SharedFactor().eval()
        with torch.no_grad():
            for p in block.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        blocks.append(block)
    first, other = blocks
    x = torch.randn(2, 5, 16)
    assert module_weights(first)["up.lora_A.weight"] is module_weights(first)["side.lora_A.weight"]
    recorder = WeightRecorder(first)
    compiled = _compiled(first, x, recorder)
    assert not any("lora" in name for name in module_weights(compiled))  # (both layers merged: the factor is gone)
    program, why = recorder.program(compiled)
    assert program is not None, why
    dev, failure = check_replayed(with_weights(compiled, program.run(module_weights(other))), other, (x,), {})
    assert failure is None and dev < 1e-5, failure


def test_a_recording_that_fails_lets_the_compile_go_on_and_keeps_no_program(monkeypatch):
    block, x = _layer("lora mlp", 0)
    recorder = WeightRecorder(block)

    def broken(*args):
        raise RuntimeError("bookkeeping")

    monkeypatch.setattr(recorder, "_record", broken)
    compiled = _compiled(block, x, recorder)
    assert compiled.repc_report.verification.ok and compiled.repc_report.rewrites
    program, why = recorder.program(compiled)
    assert program is None and why == "the recording failed (RuntimeError: bookkeeping)"
