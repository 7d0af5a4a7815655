"""Regressions found by reviewing the preparation passes, the float64 cache and the dilation merge.

Each model is compiled without the whole-model check (``verify=False``), so a wrong rewrite
shows as a wrong result, not as a rollback; results are compared with the model on inputs of
other sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import repc


def _exact_without_the_check(model: nn.Module, example: torch.Tensor, *others: torch.Tensor):
    fused = repc.compile(model, (example,), verify=False)
    with torch.no_grad():
        for x in (example,) + others:
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    return fused


class _Masked(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True) if form == "inplace activation" else nn.GELU()
        self.register_buffer("mask", torch.arange(6) < 3)

    def forward(self, x):
        h = self.fc1(x)
        if self.form == "write through a view of the mask":
            m = torch.zeros_like(h, dtype=torch.bool)
            m[..., :4] = True
            m[..., :2].fill_(False)
            return self.fc2(torch.where(m, self.act(h), h))
        if self.form == "h written after the activation":
            a = self.act(h)
            h.add_(1.0)
            return self.fc2(torch.where(self.mask, a, h))
        return self.fc2(torch.where(self.mask, self.act(h), h))


@pytest.mark.parametrize("form", ["write through a view of the mask", "h written after the activation",
                                  "inplace activation"])
def test_a_masked_activation_is_split_only_where_the_mask_and_h_are_what_the_where_reads(form):
    torch.manual_seed(0)
    _exact_without_the_check(_Masked(form).eval(), torch.randn(2, 5, 8), torch.randn(3, 7, 8))


def test_a_mask_along_a_length_axis_is_not_taken_for_channels():
    class Length(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.act = nn.Conv1d(4, 6, 1), nn.Conv1d(6, 4, 1), nn.GELU()

        def forward(self, x):  # (N, C, L): the mask runs along L
            h = self.c1(x)
            m = torch.zeros_like(h, dtype=torch.bool)
            m[..., :3] = True
            return self.c2(torch.where(m, self.act(h), h))

    torch.manual_seed(0)
    _exact_without_the_check(Length().eval(), torch.randn(2, 4, 8), torch.randn(3, 4, 12))


def test_a_crop_of_a_value_written_in_place_later_stays_a_view():
    class CropThenWrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0, self.c1 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=(0, 1))

        def forward(self, x):
            h = self.c0(x)
            c = h[:, :, 1:-1]
            h.mul_(2.0)  # reaches c, a view of h
            return self.c1(c)

    torch.manual_seed(0)
    _exact_without_the_check(CropThenWrite().eval(), torch.randn(2, 3, 8, 8), torch.randn(3, 3, 10, 9))


def _conv_bn(channels=64):
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


def test_weights_made_in_inference_mode_still_fold():
    torch.manual_seed(0)
    with torch.inference_mode():
        model = _conv_bn()
    fused = _exact_without_the_check(model, torch.randn(2, 64, 8, 8), torch.randn(1, 64, 9, 7))
    assert len(fused.repc_report.rewrites) == 1


def test_an_edit_through_data_between_two_compiles_is_read_by_the_second():
    torch.manual_seed(0)
    model = _conv_bn()
    x = torch.randn(2, 64, 8, 8)
    repc.compile(model, (x,))
    model[0].weight.data.mul_(2.0)  # no version counter sees this
    _exact_without_the_check(model, x, torch.randn(1, 64, 9, 7))


def test_a_compiled_models_buffers_are_its_own():
    """In a float64 model, writing into the compiled model's tensors leaves the next compile of
    the original unchanged."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gamma = nn.Linear(16, 4096), nn.Parameter(torch.rand(4096) + 0.5)

        def forward(self, x):
            return torch.relu(self.fc(x)) * self.gamma

    torch.manual_seed(0)
    model = Scaled().double().eval()
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = repc.compile(model, (x,))
    with torch.no_grad():
        for t in list(first.parameters()) + list(first.buffers()):
            t.zero_()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original's are apart
    again = repc.compile(model, (x,), verify=False)
    y = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(again(y), model(y))


def test_a_concat_of_branches_of_different_dilations_does_not_cost_more_than_written():
    import fuzz_networks as fnet

    with open(__file__.replace("test_pass_finds.py", "pass_finds_dilated_concat.txt")) as f:
        spec = eval(f.read(), vars(fnet))
    model = fnet.build_network(spec)
    x = fnet.example_input(spec)

    def conv_macs(m):
        # every conv run, as a module or a function (the default output may call either)
        from torch.overrides import TorchFunctionMode

        total = [0]

        class Count(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func in (torch.nn.functional.conv2d, torch.conv2d):
                    weight = args[1] if len(args) > 1 else kwargs["weight"]
                    total[0] += out.numel() * weight[0].numel()
                return out

        with torch.no_grad(), Count():
            m(x)
        return total[0]

    fused = repc.compile(model, (x,))
    assert fused.repc_report.verification.ok
    assert conv_macs(fused) <= 1.01 * conv_macs(model), str(fused.repc_report)
