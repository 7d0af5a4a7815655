"""Differential checks: a fused model (or region) against the original on concrete inputs.

Deviation is ``max |fused - original| / max(max |original|, eps)`` over every output tensor.
It passes when it is at most the tolerance of the output dtype: a merged op sums the same
products in another order, so its error grows with the dtype's epsilon and the fan-in;
``TOLERANCE`` leaves about three orders of magnitude of room for that, while a folding error
(a wrong border, a missed bias, a swapped channel) shows up at 1e-2 and above.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_map

TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-4)


def deviation(fused: Any, original: Any) -> float:
    """Largest relative deviation between two (nested) outputs; inf if their structure differs."""
    a, spec_a = tree_flatten(_plain_containers(fused))
    b, spec_b = tree_flatten(_plain_containers(original))
    if spec_a != spec_b or len(a) != len(b):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor) or x.shape != y.shape:
                return float("inf")
            if not y.is_floating_point():
                if not torch.equal(x, y):
                    return float("inf")
                continue
            x64, y64 = x.detach().double(), y.detach().double()
            if not torch.isfinite(y64).all():
                same = (x64 == y64) | (torch.isnan(x64) & torch.isnan(y64))
                if not same[~torch.isfinite(y64)].all():
                    return float("inf")
                keep = torch.isfinite(y64)
                x64, y64 = x64[keep], y64[keep]
            if y64.numel() == 0:
                continue
            scale = max(float(y64.abs().max()), torch.finfo(y.dtype).eps)
            worst = max(worst, float((x64 - y64).abs().max()) / scale)
        elif x != y:
            return float("inf")
    return worst


def output_dtype(out: Any) -> torch.dtype:
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return leaves[0].dtype if leaves else torch.float32


def input_variants(example_inputs: Tuple[Any, ...], seed: int = 0, fixed=()) -> List[Tuple[str, Tuple[Any, ...]]]:
    """The example itself, random values of its shape, another batch size, other spatial sizes.

    Inputs at the ``fixed`` positions (arguments the model was specialized to) stay as given.
    """
    gen = torch.Generator().manual_seed(seed)

    def randomize(t, batch=0, spatial=0):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        shape = list(t.shape)
        if batch and shape:
            shape[0] += batch
        if spatial and len(shape) >= 3:
            shape[2:] = [s + spatial if s > 1 else s for s in shape[2:]]
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=t.dtype, device=t.device)

    def vary(**change):
        return tuple(x if i in fixed else tree_map(lambda t: randomize(t, **change), x)
                     for i, x in enumerate(example_inputs))

    variants = [("example", example_inputs), ("random", vary()), ("batch+1", vary(batch=1))]
    if any(isinstance(t, torch.Tensor) and t.dim() >= 3
           for i, x in enumerate(example_inputs) if i not in fixed for t in tree_flatten(x)[0]):
        variants.append(("spatial+3", vary(spatial=3)))
    return variants


@dataclass
class CheckResult:
    ok: bool
    max_deviation: float
    tolerance: float
    checked: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failing_input: Optional[str] = None
    error: Optional[str] = None
    within_noise: List[str] = field(default_factory=list)  # passed only by the rounding-noise floor


NOISE_FACTOR = 4.0


def perturbed_copies(model: torch.nn.Module, count: int = 2, seed: int = 0) -> List[torch.nn.Module]:
    """Copies of ``model`` whose floating parameters and buffers are each moved by an ulp
    (times ``1 +- eps`` at random): what re-rounding the weights alone does to the function."""
    gen = torch.Generator().manual_seed(seed)
    copies = []
    for _ in range(count):
        c = copy.deepcopy(model)
        with torch.no_grad():
            for t in list(c.parameters()) + list(c.buffers()):
                if t.is_floating_point():
                    sign = torch.randint(0, 2, t.shape, generator=gen).to(t.device) * 2 - 1
                    t.mul_(1 + sign.to(t.dtype) * torch.finfo(t.dtype).eps)
        copies.append(c)
    return copies


def _plain_containers(value: Any) -> Any:
    """fx's immutable dicts and lists (what a traced graph's output holds) as plain ones."""
    from torch.fx.immutable_collections import immutable_dict, immutable_list
    if type(value) in (dict, immutable_dict):
        return {k: _plain_containers(v) for k, v in value.items()}
    if type(value) in (list, immutable_list):
        return [_plain_containers(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain_containers(v) for v in value)
    return value  # other containers (named tuples, OrderedDict subclasses) are compared as they are


def quiet_call(fn: Callable, inputs: Tuple[Any, ...]):
    """``fn(*inputs)`` for a trial input that ``fn`` may reject.

    A ``GraphModule`` whose generated code raises prints that code to stderr before the
    exception propagates; the caller handles the exception, so the print is only noise.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*inputs)


def compare(fused: Callable, original: Callable, example_inputs: Tuple[Any, ...],
            tol: Optional[float] = None, fixed=(), noise_floor: bool = True) -> CheckResult:
    """Run both on every input variant the original accepts; the worst deviation decides.

    Beyond the tolerance, when ``original`` is a module and ``noise_floor`` is on, the input is
    run again on copies of the original with its weights moved by an ulp: an ill-conditioned
    output (a GELU's far tail after a sum) that rounding alone moves that much passes when the
    fused model deviates at most ``NOISE_FACTOR`` times as much, while a merge that computes
    another function stays far above it.  An explicit ``tol`` is applied as it is."""
    copies: List[torch.nn.Module] = []
    within_noise: List[str] = []
    worst, tol_used = 0.0, tol
    checked, skipped = [], []
    with torch.no_grad():
        for name, inputs in input_variants(example_inputs, fixed=fixed):
            try:
                ref = quiet_call(original, inputs)
            except Exception:
                if name == "example":
                    raise
                skipped.append(name)  # the model itself does not accept this shape
                continue
            this_tol = tol if tol is not None else tolerance(output_dtype(ref))
            tol_used = this_tol if tol_used is None else min(tol_used, this_tol)
            try:
                got = quiet_call(fused, inputs)
            except Exception as why:
                return CheckResult(False, float("inf"), this_tol, checked, skipped, name,
                                   f"{type(why).__name__}: {why}")
            dev = deviation(got, ref)
            accepted = dev <= this_tol
            if not accepted and noise_floor and tol is None and isinstance(original, torch.nn.Module) \
                    and dev != float("inf"):  # (a tolerance the caller chose is taken as it is)
                copies = copies or perturbed_copies(original)
                noise = max(deviation(c(*inputs), ref) for c in copies)
                accepted = dev <= NOISE_FACTOR * noise
                if accepted:
                    within_noise.append(name)
            worst = max(worst, dev)
            checked.append(name)
            if not accepted:
                return CheckResult(False, worst, this_tol, checked, skipped, name, within_noise=within_noise)
    return CheckResult(True, worst, tol_used if tol_used is not None else 1e-4, checked, skipped,
                       within_noise=within_noise)
