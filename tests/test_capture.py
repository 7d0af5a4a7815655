"""Capture (repc.capture): tracing with item assignment and shapes that unpack on the example."""

import copy
import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import repc
from repc.capture import python_state_kept, trace

from blocks import ops_run


class HeadSplit(nn.Module):
    """Splits the last axis into heads the way current transformer code does: ``(*shape[:-1], -1, d)``."""

    def __init__(self, d=8, head_dim=4):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.head_dim = head_dim

    def forward(self, x):
        hidden_shape = (*x.shape[:-1], -1, self.head_dim)
        return self.proj(x).view(hidden_shape).transpose(-3, -2) * len(x.shape)


def test_a_shape_unpacks_and_measures_on_the_example_and_the_graph_stays_size_generic():
    model = HeadSplit().eval()
    gm = trace(model, example_inputs=(torch.randn(2, 5, 8),))
    assert not any(n.op == "call_function" and n.target is len for n in gm.graph.nodes)
    for shape in ((2, 5, 8), (3, 7, 8)):  # the batch and token counts are read from the input
        x = torch.randn(shape)
        assert torch.equal(gm(x), model(x))
    items = [n for n in gm.graph.nodes if n.target is operator.getitem]
    assert len(items) == 3  # the slice of the shape, then its two items


def test_without_an_example_an_unpacked_shape_still_fails_to_trace():
    with pytest.raises(fx.proxy.TraceError):
        trace(HeadSplit())


def test_iterating_a_tensor_is_not_specialized_to_the_example_batch():
    class RowLoop(nn.Module):
        def forward(self, x):
            return torch.stack([row * 2 for row in x])

    with pytest.raises(fx.proxy.TraceError):
        trace(RowLoop(), example_inputs=(torch.randn(3, 4),))


def test_arguments_are_matched_to_the_example_by_name():
    class TwoInputs(nn.Module):
        def forward(self, x, scale=None):
            return x.reshape(*x.shape[:-2], -1) * scale

    model = TwoInputs()
    x, s = torch.randn(2, 3, 4, 5), torch.tensor(0.5)
    gm = trace(model, example_inputs=(x, s))
    assert torch.equal(gm(x, s), model(x, s))


class CausalMask(nn.Module):
    """nanoGPT's causal attention mask: a buffer sliced by the sequence length of the input."""

    def __init__(self, block_size=8):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)))

    def forward(self, x):
        t = x.size(1)
        scores = self.fc(x) @ x.transpose(-2, -1)
        return scores.masked_fill(self.mask[:t, :t] == 0, float("-inf")).softmax(-1)


def test_a_buffer_sliced_by_an_input_size_traces_and_stays_size_generic():
    model = CausalMask().eval()
    gm = trace(model)
    for shape in ((2, 5, 4), (1, 7, 4)):
        x = torch.randn(shape)
        assert torch.equal(gm(x), model(x))


def test_blocks_in_a_module_list_are_fused_when_the_model_does_not_trace_whole():
    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(2))

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow: the model does not trace whole
                for block in self.blocks:
                    x = torch.relu(block(x))
            return x

    model = Blocks().eval()
    x = torch.randn(3, 4)
    fused = repc.compile(model, (x,))
    assert len(fused.repc_report.rewrites) == 2  # each block's two linears become one
    assert ops_run(fused, x) == Counter(linear=2)
    assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_a_buffer_that_steers_python_control_flow_is_read_as_its_value():
    class ActNorm(nn.Module):  # Glow's ActNorm: a flag buffer decides the path
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("initialized", torch.tensor(1))

        def forward(self, x):
            if self.initialized.item() == 0:
                raise RuntimeError("not initialized")
            return self.fc(x)

    model = ActNorm().eval()
    x = torch.randn(2, 4)
    gm = trace(model)
    assert torch.equal(gm(x), model(x))


def test_unpacking_a_shape_never_runs_a_write_into_the_models_buffers():
    class Cache(nn.Module):  # writes into its own buffer, then unpacks a shape
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(4))

        def forward(self, x):
            self.seen[0] = 1.0
            return x.view(*x.shape[:-1], 2, 2)

    model = Cache()
    x = torch.randn(3, 4)
    try:
        trace(model, example_inputs=(x,))
    except Exception:
        pass  # whether it traces or not, tracing must not run the write
    assert torch.equal(model.seen, torch.zeros(4))


class GatedAfterAnInPlaceAct(nn.Module):
    """RepMLP's global perceptron: an in-place ReLU on a computed value, then a shape unpacked."""

    def __init__(self, write_into_input=False):
        super().__init__()
        self.conv, self.write_into_input = nn.Conv2d(4, 4, 1), write_into_input

    def forward(self, x):
        if self.write_into_input:
            x.mul_(2)  # into the caller's tensor
        gate = torch.sigmoid(torch.relu_(x.mean((2, 3), keepdim=True)))
        return self.conv(x).flatten(1).reshape(*x.size()) * gate


def test_a_shape_unpacked_after_an_in_place_op_on_a_computed_value_traces():
    model = GatedAfterAnInPlaceAct().eval()
    x = torch.randn(2, 4, 6, 6)
    gm = trace(model, example_inputs=(x,))  # (the write into the mean changes no size read off it)
    y = torch.randn(3, 4, 5, 7)
    assert torch.equal(gm(y), model(y))
    # a write into the input itself is never run to learn a size: the caller's tensor stays
    writer, kept = GatedAfterAnInPlaceAct(write_into_input=True).eval(), x.clone()
    try:
        trace(writer, example_inputs=(x,))
    except Exception:
        pass
    assert torch.equal(x, kept)


def test_learning_the_shape_of_a_submodules_output_runs_it_outside_the_trace():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            y = self.proj(x)
            scores = y.view(*y.shape[:-1], 2, 4)
            return scores.masked_fill(scores == 0, torch.finfo(y.dtype).min)  # GPT-2's mask value

    model = Heads().eval()
    gm = trace(model, example_inputs=(torch.randn(2, 3, 8),))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["proj"]  # no stray calls
    assert not any(n.op == "get_attr" and n.target.startswith("_tensor_constant") for n in gm.graph.nodes)
    x = torch.randn(5, 7, 8)
    assert torch.equal(gm(x), model(x))


def test_an_inputs_dtype_is_not_baked_into_the_graph():
    class Cast(nn.Module):
        def forward(self, x):
            return (x.float() * 2).to(x.dtype)

    gm = trace(Cast(), example_inputs=(torch.randn(3),))
    x = torch.randn(3, dtype=torch.float64)
    assert gm(x).dtype == torch.float64


class CachedBias(nn.Module):
    """timm's attention-bias cache: eval calls store a tensor under the device's name."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.cache = {}
        self.scale = 0.5

    def forward(self, x):
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return x * self.scale + self.cache[key]


def test_tracing_leaves_the_modules_python_state_as_it_was():
    # under fx, str(x.device) names a proxy, which the cache would keep: the next trace of the
    # module would read back a proxy of a graph that is gone
    module = CachedBias()
    x = torch.randn(2, 4)
    for _ in range(2):  # (the second trace read the first one's proxy)
        gm = trace(module, example_inputs=(x,))
        assert module.cache == {} and not hasattr(module, "_tensor_constant0")
        assert torch.allclose(gm(x), module(x)) and set(module.cache) == {"cpu"}
        module.cache.clear()


class LengthDependentFrequencies(nn.Module):
    """transformers' long RoPE: a tensor kept as a plain attribute on the first call, and a
    buffer written in place with the frequencies of the input's length (long above 6)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("short", torch.linspace(0.5, 1.0, 4), persistent=False)
        self.register_buffer("freq", self.short.clone(), persistent=False)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        long = getattr(self, "long", None)
        if long is None:
            long = self.short * 3
        self.long = long
        self.freq.copy_(torch.where(torch.tensor(x.shape[1]) > 6, long, self.short))
        return self.fc(x) * torch.cos(torch.arange(x.shape[1])[:, None] * self.freq)


def test_python_state_kept_puts_back_attributes_and_buffers_written_in_place():
    module = LengthDependentFrequencies()
    before = module.freq.clone()
    with python_state_kept(module):
        module(torch.randn(2, 9, 4))
        assert hasattr(module, "long") and not torch.equal(module.freq, before)
    assert not hasattr(module, "long") and torch.equal(module.freq, before)


def test_a_compile_leaves_a_model_that_keeps_state_as_it_was_and_its_result_follows_the_length():
    # torch.export left a fake tensor in the attribute (the model could no longer be copied) and
    # the captured graph, run on the model's own buffers, wrote into them
    torch.manual_seed(0)
    model = LengthDependentFrequencies().eval()
    x = torch.randn(2, 5, 4)
    fused = repc.compile(model, (x,))
    assert not hasattr(model, "long") and torch.equal(model.freq, model.short)
    copy.deepcopy(model)
    assert fused.repc_report.verification.ok
    for length in (3, 5, 9):
        y = torch.randn(3, length, 4)
        with torch.no_grad():
            assert torch.allclose(fused(y), LengthDependentFrequencies.forward(copy.deepcopy(model), y), atol=1e-6)


class ReadsItsPartsAttributes(nn.Module):
    """EfficientViT's window attention: the caller's Python reads its child's plain attributes."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.attn.resolution = 7

    def forward(self, x):
        if x.sum() > -1e9 and self.attn.resolution == 7:  # data-dependent: fused in parts
            x = self.attn(x)
        return x


def test_a_part_fused_on_its_own_keeps_the_attributes_its_caller_reads():
    model = ReadsItsPartsAttributes().eval()
    x = torch.randn(3, 4)
    fused = repc.compile(model, (x,))
    report = fused.repc_report
    assert report.front_end == "fx (in parts)" and len(report.rewrites) == 1 and not report.rolled_back, report
    assert isinstance(fused.attn, fx.GraphModule) and fused.attn.resolution == 7
    assert torch.allclose(fused(x), model(x), atol=1e-5)


class EncoderWithFlags(nn.Module):
    """A transformers-style encoder: called with keyword flags, its blocks called positionally."""

    def __init__(self, c=4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
                                    for _ in range(2))

    def forward(self, x, output_hidden_states=False):
        states = []
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return (x, states) if output_hidden_states else x


class UntraceableTop(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = EncoderWithFlags()

    def forward(self, x):
        if float(x.sum()) > -1e9:  # (a data-dependent branch: fx cannot trace the model whole)
            x = x + 0
        return self.encoder(x, output_hidden_states=False)


def test_the_blocks_of_a_module_called_with_keywords_are_compiled_in_parts():
    from repc.examples import randomize_bn
    model = UntraceableTop()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    model.eval()
    x = torch.randn(2, 4, 8, 8)
    fused = repc.compile(model, (x,), front_end="fx")
    report = fused.repc_report
    assert len(report.rewrites) == 2, report  # (each block's conv and BN; before: the encoder was skipped whole)
    assert type(fused) is UntraceableTop and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(s.path == "encoder" and "keyword" in s.reason for s in report.skipped), report.skipped
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), atol=1e-5)
