"""A latency cost model for canonical ops, calibrated on the machine once and cached.

Whether one conv beats three is a question of time, not of multiply-adds: small and depthwise
convs are dominated by per-op overhead and memory traffic, large dense ones by arithmetic.
Each emitted op is one of a few kinds (:data:`KINDS`: dense, grouped and depthwise conv,
linear, elementwise, padding) and its predicted time is

    t = overhead[kind] + macs * seconds_per_mac[kind] + bytes * seconds_per_byte[kind]

with ``bytes`` the weights read plus the activations read and written.  :func:`calibrate` times
a short grid of ops per kind, built as repc emits them (a few seconds in all) and fits the three coefficients of each
kind by non-negative least squares; :func:`latency_model` does that once per device, dtype,
thread count and torch version and caches the fit as JSON (``$REPC_CACHE_DIR``, else
``~/.cache/repc``).  A model is a plain value: the same coefficients give the same predictions.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .ops import AffineOp, Conv, Dense, Elementwise, Linear, flops, params

KINDS = ("dense_conv", "grouped_conv", "depthwise_conv", "linear", "elementwise", "pad")
CALIBRATION_VERSION = 2  # in the cache's file name: a changed calibration grid is measured again


@dataclass(frozen=True)
class OpFeatures:
    """What an op's time depends on in the model: its kind, multiply-adds and bytes moved."""
    kind: str
    macs: float
    bytes: float


@dataclass(frozen=True)
class LatencyModel:
    """Per-kind ``(overhead s, s per multiply-add, s per byte)``; predicts seconds."""
    coefficients: Dict[str, Tuple[float, float, float]]
    device: str = "cpu"
    dtype: str = "float32"
    source: str = "given"  # "calibrated", "cache" or "given"

    def time(self, features: OpFeatures) -> float:
        overhead, per_mac, per_byte = self.coefficients[features.kind]
        return overhead + features.macs * per_mac + features.bytes * per_byte

    def op_seconds(self, op: AffineOp, in_shape, out_shape, itemsize: int) -> float:
        """Predicted time of ``op`` as repc emits it (padding, the op, then scale and shift)."""
        return sum(self.time(f) for f in op_features(op, in_shape, out_shape, itemsize))

    def to_json(self) -> str:
        return json.dumps({"device": self.device, "dtype": self.dtype,
                           "coefficients": {k: list(v) for k, v in self.coefficients.items()}})

    @classmethod
    def from_json(cls, text: str, source: str = "cache") -> "LatencyModel":
        data = json.loads(text)
        coefficients = {k: tuple(float(x) for x in v) for k, v in data["coefficients"].items()}
        if set(coefficients) != set(KINDS) or any(len(v) != 3 or min(v) < 0 for v in coefficients.values()):
            raise ValueError("not a repc latency model")
        return cls(coefficients, data.get("device", "cpu"), data.get("dtype", "float32"), source)


def conv_kind(op: Conv) -> str:
    if op.groups == 1:
        return "dense_conv"
    return "depthwise_conv" if op.groups == op.in_channels else "grouped_conv"


def op_features(op: AffineOp, in_shape, out_shape, itemsize: int) -> List[OpFeatures]:
    """The emitted pieces of ``op`` on tensors of the given shapes, as :class:`OpFeatures`."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if isinstance(op, Conv):
        pieces = []
        if any(lo != hi or lo < 0 for lo, hi in op.padding):  # emitted as F.pad, then the conv
            padded = math.prod(in_shape[:2]) * math.prod(
                s + lo + hi for s, (lo, hi) in zip(in_shape[2:], op.padding))
            pieces.append(OpFeatures("pad", 0.0, float((n_in + padded) * itemsize)))
        weights = params(op)
        pieces.append(OpFeatures(conv_kind(op), float(flops(op, in_shape, out_shape)),
                                 float((n_in + n_out + weights) * itemsize)))
        return pieces
    if isinstance(op, (Linear, Dense)):
        weights = params(op)
        return [OpFeatures("linear", float(flops(op, in_shape, out_shape)), float((n_in + n_out + weights) * itemsize))]
    steps = (op.scale is not None) + (op.shift is not None)
    return [OpFeatures("elementwise", 0.0, float(2 * n_out * itemsize))] * steps


def add_features(shape, itemsize: int) -> OpFeatures:
    """One elementwise sum of two tensors of ``shape``."""
    return OpFeatures("elementwise", 0.0, float(3 * math.prod(shape) * itemsize))


# ----------------------------------------------------------------------------- calibration

def _grid(dtype: torch.dtype, device) -> Dict[str, List[Tuple[OpFeatures, Callable[[], torch.Tensor]]]]:
    """Per kind, ops of several sizes as (features, a call running it once), each built the way
    repc emits it (:func:`repc.passes.emit.build_op`: a module call, so its overhead counts)."""
    from .passes.emit import build_op  # (emit is a pass; the model only needs it to calibrate)

    itemsize = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    def emitted(op, x):
        built, x = build_op(op, dtype, device), x.to(device=device, dtype=dtype)
        return lambda: built(x)

    grid: Dict[str, List] = {k: [] for k in KINDS}
    for c, hw, k in itertools.product((16, 64, 128), (8, 28), (1, 3)):
        x = rand(1, c, hw, hw)
        for kind, op in (("dense_conv", Conv(rand(c, c, k, k), None, (1, 1), ((k // 2,) * 2,) * 2, (1, 1), 1)),
                         ("depthwise_conv", Conv(rand(c, 1, k + 2, k + 2), None, (1, 1),
                                                 (((k + 2) // 2,) * 2,) * 2, (1, 1), c)),
                         ("grouped_conv", Conv(rand(c, 4, k, k), None, (1, 1), ((k // 2,) * 2,) * 2, (1, 1), c // 4))):
            grid[kind].append((op_features(op, x.shape, x.shape, itemsize)[-1], emitted(op, x)))
        scale = Elementwise(rand(1, c, 1, 1), None, tuple(x.shape))
        grid["elementwise"].append((op_features(scale, x.shape, x.shape, itemsize)[0], emitted(scale, x)))
        padded = x.shape[0] * c * (hw + 2) ** 2
        xd = x.to(device=device, dtype=dtype)
        grid["pad"].append((OpFeatures("pad", 0.0, float((x.numel() + padded) * itemsize)),
                            lambda x=xd: F.pad(x, (1, 1, 1, 1))))
    for tokens, d_in, d_out in itertools.product((16, 256), (64, 384), (64, 768)):
        x, op = rand(tokens, d_in), Linear(rand(d_out, d_in), None)
        grid["linear"].append((op_features(op, x.shape, (tokens, d_out), itemsize)[0], emitted(op, x)))
    return grid


def fastest_seconds(run: Callable[[], torch.Tensor], device, repeats: int) -> float:
    """Seconds of one call: the fastest of ``repeats`` after three warm-up calls (the first
    calls of a shape set up kernels; the fastest run is the one the neighbours disturbed least)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(3):
            run()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
    return min(times)


def fit(samples: Sequence[Tuple[OpFeatures, float]]) -> Tuple[float, float, float]:
    """Non-negative least squares for ``t = a + b * macs + c * bytes`` over ``samples``, in
    relative error (each sample weighted by ``1 / t``: times span orders of magnitude): the best
    fit among those of every subset of the three terms whose coefficients are all >= 0."""
    best, best_error = (0.0, 0.0, 0.0), math.inf
    rows = [(1.0 / t, f.macs / t, f.bytes / t) for f, t in samples]
    times = torch.ones(len(samples), dtype=torch.float64)
    for terms in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
        a = torch.tensor([[r[i] for i in terms] for r in rows], dtype=torch.float64)
        if not bool(a.abs().sum(0).gt(0).all()):
            continue
        scale = a.abs().max(0).values
        solution = torch.linalg.lstsq(a / scale, times.unsqueeze(1)).solution.squeeze(1) / scale
        if bool((solution < 0).any()):
            continue
        error = float(((a @ solution - times) ** 2).sum())
        if error < best_error:
            coefficients = [0.0, 0.0, 0.0]
            for i, v in zip(terms, solution.tolist()):
                coefficients[i] = v
            best, best_error = tuple(coefficients), error
    return best


def calibrate(device="cpu", dtype: torch.dtype = torch.float32, repeats: int = 7) -> LatencyModel:
    """Time the calibration grid on ``device`` in ``dtype`` and fit each kind's coefficients."""
    coefficients = {}
    for kind, entries in _grid(dtype, device).items():
        samples = [(features, fastest_seconds(run, device, repeats)) for features, run in entries]
        coefficients[kind] = fit(samples)
    return LatencyModel(coefficients, str(torch.device(device)), str(dtype).replace("torch.", ""), "calibrated")


def cache_path(device, dtype: torch.dtype) -> str:
    """Where the calibration for this device, dtype, thread count and torch version is kept."""
    root = os.environ.get("REPC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "repc")
    name = f"latency-v{CALIBRATION_VERSION}-{torch.device(device).type}-{str(dtype).replace('torch.', '')}-" \
           f"t{torch.get_num_threads()}-torch{torch.__version__.split('+')[0]}.json"
    return os.path.join(root, name)


def latency_model(device="cpu", dtype: torch.dtype = torch.float32) -> LatencyModel:
    """The cached calibration for ``device`` and ``dtype``, calibrating (and caching) it first if
    there is none; a cache that cannot be read or written is recalibrated / skipped silently."""
    path = cache_path(device, dtype)
    try:
        with open(path) as f:
            return LatencyModel.from_json(f.read())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    model = calibrate(device, dtype)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(model.to_json())
        os.replace(tmp, path)  # whole or not at all
    except OSError:
        pass
    return model

