"""The latency cost model (:mod:`repc.latency`): features of emitted ops, the non-negative fit,
the per-device cache.  Calibration itself times real ops; here its fit and cache are checked
with given timings, so nothing depends on this machine's speed."""

from __future__ import annotations

import torch

from repc import latency
from repc.latency import KINDS, LatencyModel, OpFeatures, fit, op_features
from repc.ops import Conv, Elementwise, Linear

F64 = torch.float64


def _model(**overrides) -> LatencyModel:
    coefficients = {k: (1e-5, 1e-10, 1e-11) for k in KINDS}
    coefficients.update(overrides)
    return LatencyModel(coefficients)


def test_features_of_emitted_ops():
    dw = Conv(torch.zeros(8, 1, 3, 3, dtype=F64), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 8)
    (f,) = op_features(dw, (1, 8, 5, 5), (1, 8, 5, 5), 4)
    assert f.kind == "depthwise_conv" and f.macs == 8 * 25 * 9 and f.bytes == (200 + 200 + 72) * 4
    cropped = Conv(torch.zeros(8, 8, 1, 1, dtype=F64), None, (1, 1), ((-1, -1), (0, 0)), (1, 1), 1)
    pad, conv = op_features(cropped, (1, 8, 5, 5), (1, 8, 3, 5), 4)
    assert pad.kind == "pad" and conv.kind == "dense_conv"
    ew = Elementwise(torch.ones(1, 8, 1, 1, dtype=F64), torch.ones(1, 8, 1, 1, dtype=F64), (1, 8, 5, 5))
    assert [f.kind for f in op_features(ew, (1, 8, 5, 5), (1, 8, 5, 5), 4)] == ["elementwise"] * 2
    (lin,) = op_features(Linear(torch.zeros(3, 4, dtype=F64), None), (10, 4), (10, 3), 2)
    assert lin.kind == "linear" and lin.macs == 120


def test_predictions_are_the_linear_model_of_the_features():
    model = _model(dense_conv=(2e-5, 1e-9, 0.0))
    conv = Conv(torch.zeros(4, 4, 3, 3, dtype=F64), None, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    macs = 4 * 36 * 4 * 9
    assert abs(model.op_seconds(conv, (1, 4, 6, 6), (1, 4, 6, 6), 4) - (2e-5 + macs * 1e-9)) < 1e-15


def test_the_fit_recovers_non_negative_coefficients_in_relative_error():
    truth = (3e-6, 2e-10, 5e-12)
    samples = [(OpFeatures("linear", m, b), truth[0] + m * truth[1] + b * truth[2])
               for m, b in [(1e3, 1e4), (1e5, 2e4), (1e6, 1e5), (1e7, 3e5), (1e8, 1e6), (5e4, 8e6)]]
    got = fit(samples)
    for g, t in zip(got, truth):
        assert abs(g - t) <= 1e-6 * t + 1e-18, (got, truth)
    # times that fall with more work: no negative coefficient, the best non-negative fit instead
    odd = [(OpFeatures("linear", m, 0.0), t) for m, t in [(1e3, 5e-5), (1e6, 4e-5), (1e7, 3e-5)]]
    assert min(fit(odd)) >= 0


def test_the_calibration_is_cached_per_device_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("REPC_CACHE_DIR", str(tmp_path))
    calls = []

    def calibrate(device="cpu", dtype=torch.float32, repeats=7):
        calls.append((device, dtype))
        return _model()

    monkeypatch.setattr(latency, "calibrate", calibrate)
    first = latency.latency_model("cpu", torch.float32)
    again = latency.latency_model("cpu", torch.float32)
    assert calls == [("cpu", torch.float32)] and again.coefficients == first.coefficients
    assert again.source == "cache"
    latency.latency_model("cpu", torch.float64)
    assert len(calls) == 2  # another dtype, another calibration
    path = latency.cache_path("cpu", torch.float32)
    with open(path, "w") as f:
        f.write("{not json")
    latency.latency_model("cpu", torch.float32)  # an unreadable cache is calibrated again
    assert len(calls) == 3


def test_a_cache_entry_that_is_not_a_model_is_refused():
    for text in ('{"coefficients": {"linear": [1, 2, 3]}}',
                 '{"coefficients": {%s}}' % ", ".join(f'"{k}": [1, -1, 0]' for k in KINDS)):
        try:
            LatencyModel.from_json(text)
        except ValueError:
            continue
        raise AssertionError(f"accepted {text}")
