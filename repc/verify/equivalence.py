"""``repc.verify``: a Hypothesis-driven differential check of a fused model against its original.

    result = verify(original, fused, example_inputs)
    assert result, result            # result.ok; str(result) says what was checked or what failed
    result.max_deviation, result.failing_input

Hypothesis draws input cases (:mod:`repc.verify.strategies`): other batch sizes and other
sizes on every axis the *original* accepts them on (found by probing it once per candidate
size; axes it rejects, such as channels or the spatial axes of a model that flattens its map,
stay at the example's size), values from the ``normal``, ``large``, ``near_zero``, ``positive``
and ``zeros`` distributions, and optionally other dtypes (both models are then copied and
cast).  Cases the original itself rejects are discarded; a case on which the fused model
raises or deviates fails, and Hypothesis shrinks it towards the example's sizes, normal
values and seed 0 before it is returned as ``failing_input``.

**Deviation** (:func:`repc.verify.check.deviation`): per output tensor,
``max |fused - original| / max(max |original|, eps)``, the worst over all output tensors;
infinite when the output structures or shapes differ.

**Non-finite values** (:func:`non_finite`): a NaN or Inf in the fused output where the
original's entry is finite fails the case.  The original giving NaN or Inf on the example
inputs fails the check, saying so: there is nothing to compare the fused model with (NaN in its
weights or statistics, or in the example).  On a drawn case where the original gives NaN or Inf
(an overflow on ``large`` values), the fused model must give the same value there (NaN for NaN,
the same signed Inf) and the finite entries are compared; the result lists those cases
(``original_non_finite``, and a warning in its text): those entries are not verified.

**Tolerance**: by default ``sqrt(eps)`` of the least precise floating dtype among the
original's output and both models' parameters and buffers -- half of the significand's bits
must agree: 1.5e-8 for float64, 3.5e-4 for float32, 3.1e-2 for float16, 8.8e-2 for bfloat16.
A merged op sums the same products in another order and rounds its weights once, so its
error is a few eps times the fan-in; ``sqrt(eps)`` leaves room for fan-ins and cancellations of
``1 / sqrt(eps)`` (about 2,900 in float32), while a folding error (a wrong border, a lost bias,
a swapped channel) is a deviation of order one.  Override with ``tolerance=``: a number, a
``{dtype: number}`` mapping (other dtypes keep the default) or a function of the dtype.

**Rounding-noise floor**: when a case deviates beyond the tolerance and the original is an
``nn.Module``, the case is run again on :data:`NOISE_SAMPLES` copies of the original whose
floating-point parameters and buffers are each multiplied by ``1 + eps`` or ``1 - eps`` at
random (an ulp or two): the re-rounding a merge inflicts on weights.  The case passes when the fused model
deviates at most :data:`NOISE_FACTOR` times as much as the worst of those copies.  An
ill-conditioned case (large inputs driven into a GELU's tail, where the output is 1e-5 of the
activations feeding it) is then judged by what rounding alone does to the original, while a
merge that computes another function stays far above it.  ``noise_floor=False`` turns it off.

**Cost**: one forward pass of the original per probed size (two or three per free axis),
then one of each model per case: ``max_examples`` (default 10) drawn cases plus the example.
On 3,000-node training-form stacks (benchmarks/bench_compile_time.py) that took 0.7-0.8x
the CPU time of ``repc.compile`` itself.

The checks run under ``torch.no_grad``; neither model is modified (casting to another dtype
works on copies).  Hypothesis runs with its example database off, so nothing is written to
disk, and with a fixed seed (``seed=``), so a result is reproducible.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from .check import deviation, quiet_call
from .strategies import DISTRIBUTIONS, EXAMPLE, InputCase, example_case, input_cases, is_varied

Tolerance = Union[None, float, Mapping[torch.dtype, float], Callable[[torch.dtype], float]]

NOISE_SAMPLES = 2  # perturbed copies of the original behind the rounding-noise floor
NOISE_FACTOR = 4.0  # a fused model may deviate this many times the perturbed copies' worst deviation


class VerificationError(ValueError):
    """The models or the example inputs cannot be compared as given."""


def default_tolerance(dtype: torch.dtype) -> float:
    """``sqrt(eps(dtype))``: the relative deviation a correct merge stays below."""
    return math.sqrt(torch.finfo(dtype).eps)


def resolve_tolerance(tolerance: Tolerance, dtype: torch.dtype) -> float:
    if tolerance is None:
        return default_tolerance(dtype)
    if callable(tolerance):
        return float(tolerance(dtype))
    if isinstance(tolerance, Mapping):
        return float(tolerance.get(dtype, default_tolerance(dtype)))
    return float(tolerance)


def least_precise(dtypes) -> torch.dtype:
    floats = [d for d in dtypes if d is not None and d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps) if floats else torch.float32


def _floating_dtypes(obj: Any) -> List[torch.dtype]:
    if isinstance(obj, nn.Module):
        return [t.dtype for t in list(obj.parameters()) + list(obj.buffers()) if t.is_floating_point()]
    return []


def output_dtypes(out: Any) -> List[torch.dtype]:
    return [t.dtype for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def mode_dependent_in_training(model: nn.Module) -> List[str]:
    """Submodules whose output depends on training mode and that are in it: batch norms that
    would use (and update) batch statistics, dropouts that would drop."""
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.batchnorm._NormBase) and (m.track_running_stats or isinstance(m, nn.modules.batchnorm._BatchNorm)):
            found.append(name or "<model>")
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(name or "<model>")
    return found


# ----------------------------------------------------------------------------- one case

@dataclass
class CaseResult:
    """The outcome of one input case: ``skipped`` when the original rejects it."""

    case: InputCase
    deviation: float = 0.0
    tolerance: float = 0.0
    error: Optional[str] = None
    skipped: bool = False
    noise: Optional[float] = None  # the rounding-noise floor, when it was measured
    original_non_finite: Optional[str] = None  # where the original's output is NaN or Inf, if it is

    @property
    def ok(self) -> bool:
        return self.skipped or (self.error is None and self.deviation <= self.tolerance)


class ModelPair:
    """The original and fused callables, with copies cast to other dtypes made on demand."""

    def __init__(self, original: Callable, fused: Callable):
        self.original, self.fused = original, fused
        self._cast: Dict[torch.dtype, Tuple[Callable, Callable]] = {}
        self._perturbed: Dict[Tuple[Optional[torch.dtype], int], nn.Module] = {}

    def perturbed(self, dtype: Optional[torch.dtype], sample: int) -> Optional[nn.Module]:
        """A copy of the original (at ``dtype``) with every floating-point parameter and buffer
        multiplied by ``1 + eps`` or ``1 - eps`` at random (computed in float64, rounded back: each
        entry moves by an ulp or two); None if it is not a module."""
        original, _ = self.at(dtype)
        if not isinstance(original, nn.Module):
            return None
        key = (dtype, sample)
        if key not in self._perturbed:
            copy_ = copy.deepcopy(original)
            gen = torch.Generator().manual_seed(sample)
            with torch.no_grad():
                for t in list(copy_.parameters()) + list(copy_.buffers()):
                    if t.is_floating_point():
                        sign = torch.randint(0, 2, t.shape, generator=gen, dtype=torch.float64) * 2 - 1
                        moved = t.detach().double().cpu() * (1 + torch.finfo(t.dtype).eps * sign)
                        t.copy_(moved.to(dtype=t.dtype, device=t.device))
            self._perturbed[key] = copy_
        return self._perturbed[key]

    def at(self, dtype: Optional[torch.dtype]) -> Tuple[Callable, Callable]:
        if dtype is None:
            return self.original, self.fused
        if dtype not in self._cast:
            pair = []
            for name, model in (("original", self.original), ("fused", self.fused)):
                if not isinstance(model, nn.Module):
                    raise VerificationError(f"the {name} model is not an nn.Module, so it cannot be cast to {dtype}")
                pair.append(copy.deepcopy(model).to(dtype))
            self._cast[dtype] = tuple(pair)
        return self._cast[dtype]

    def model_dtypes(self) -> List[torch.dtype]:
        """Parameter and buffer dtypes of the models as given: a model fused in float32 keeps
        float32-rounded merged weights even when checked on a float64 copy."""
        return _floating_dtypes(self.original) + _floating_dtypes(self.fused)


def check_case(models: ModelPair, example_inputs: Sequence[Any], case: InputCase,
               tolerance: Tolerance = None, noise_floor: bool = True) -> CaseResult:
    """Run both models on ``case``; the original raising means the case does not apply.  Beyond
    the tolerance, the rounding-noise floor decides (see the module docstring)."""
    inputs = case.materialize(example_inputs)
    original, fused = models.at(case.dtype)
    with torch.no_grad():
        try:
            ref = quiet_call(original, inputs)
        except Exception:
            return CaseResult(case, skipped=True)
        dtype = least_precise(output_dtypes(ref) + models.model_dtypes())
        tol = resolve_tolerance(tolerance, dtype)
        try:
            got = quiet_call(fused, inputs)
        except Exception as why:
            return CaseResult(case, math.inf, tol, f"{type(why).__name__}: {str(why).strip().splitlines()[0] if str(why).strip() else ''}")
        failure, note = non_finite(got, ref)
        if failure is not None:
            return CaseResult(case, math.inf, tol, failure, original_non_finite=note)
        if note is not None and _holds_non_finite(inputs):
            note += " (an input holds NaN or Inf)"
        if note is not None and case.distribution == EXAMPLE:
            return CaseResult(case, math.inf, tol, f"the original model gives {note} on the example inputs, so "
                              "there is nothing to compare the fused model with there; check its weights, "
                              "statistics and the example", original_non_finite=note)
        dev = deviation(got, ref)
        if dev <= tol or not noise_floor or not math.isfinite(dev):
            return CaseResult(case, dev, tol, original_non_finite=note)
        noise = 0.0
        for sample in range(NOISE_SAMPLES):
            copy_ = models.perturbed(case.dtype, sample)
            if copy_ is None:
                return CaseResult(case, dev, tol, original_non_finite=note)
            noise = max(noise, deviation(copy_(*inputs), ref))
    return CaseResult(case, dev, max(tol, NOISE_FACTOR * noise), noise=noise, original_non_finite=note)


def _kinds(mask: torch.Tensor, values: torch.Tensor) -> str:
    """``"NaN"``, ``"Inf"`` or ``"NaN and Inf"``: what ``values`` holds where ``mask`` is set."""
    nan = bool(torch.isnan(values[mask]).any())
    inf = bool(torch.isinf(values[mask]).any())
    return " and ".join(k for k, present in (("NaN", nan), ("Inf", inf)) if present)


def non_finite(fused_out: Any, original_out: Any) -> Tuple[Optional[str], Optional[str]]:
    """``(failure, note)`` about NaN and Inf in two outputs of the same structure.

    ``failure``: the fused output is NaN or Inf where the original's is finite, or differs from a
    NaN or Inf of the original's.  ``note``: where the original's output is NaN or Inf (those
    entries cannot be checked against anything).  Both None when every entry is finite.
    """
    got, ref = tree_flatten(fused_out)[0], tree_flatten(original_out)[0]
    if len(got) != len(ref):
        return None, None  # the structures differ: the deviation says so
    several = len(ref) > 1
    failure, notes = None, []
    for i, (x, y) in enumerate(zip(got, ref)):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.is_floating_point()
                and x.is_floating_point() and x.shape == y.shape):
            continue
        x, y = x.detach(), y.detach().to(x.dtype)
        where = f"output {i}" if several else "the output"
        finite_x, finite_y = torch.isfinite(x), torch.isfinite(y)
        new = ~finite_x & finite_y
        if new.any() and failure is None:
            failure = (f"the fused model gives {_kinds(new, x)} in {int(new.sum())} of {x.numel()} entries of "
                       f"{where} where the original's are finite")
        if finite_y.all():
            continue
        lost = ~finite_y & ~((x == y) | (torch.isnan(x) & torch.isnan(y)))
        if lost.any() and failure is None:
            failure = (f"the original gives {_kinds(~finite_y, y)} in {int((~finite_y).sum())} of {y.numel()} "
                       f"entries of {where}, and the fused model gives something else at {int(lost.sum())} of them")
        notes.append(f"{_kinds(~finite_y, y)} in {int((~finite_y).sum())} of {y.numel()} entries of {where}")
    return failure, ("; ".join(notes) if notes else None)


def _holds_non_finite(inputs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in tree_flatten(inputs)[0])


# ----------------------------------------------------------------------------- shapes

def probe_free_sizes(original: Callable, example_inputs: Sequence[Any]) -> Dict[Tuple[int, int], Tuple[int, ...]]:
    """Sizes each axis of each floating-point input may take, as far as ``original`` accepts them.

    Axes are probed in *ties*: the same axis of every input with the same size there (the batch
    of an image and of its mask, the tokens of a sequence and of its attention bias) changes
    together, as :func:`~repc.verify.strategies.input_cases` draws them.  Each tie is tried at a
    few other sizes (batch: 1 and n+1; other axes: n-1, n+1 and n+2, both parities, so strided
    grids are exercised) with everything else at the example's sizes; one forward pass of the
    original per candidate.  Returns ``{(input, axis): sizes}`` for the axes with more than one
    accepted size, the example's size first.
    """
    ties: Dict[Tuple[int, int], List[int]] = {}
    for i, t in enumerate(example_inputs):
        if is_varied(t):
            for axis, size in enumerate(t.shape):
                ties.setdefault((axis, size), []).append(i)
    free: Dict[Tuple[int, int], Tuple[int, ...]] = {}
    gen = torch.Generator().manual_seed(0)
    for (axis, size), members in ties.items():
        candidates = [1, size + 1] if axis == 0 else [size - 1, size + 1, size + 2]
        accepted = [size]
        for c in candidates:
            if c < 1 or c in accepted:
                continue
            trial = list(example_inputs)
            for i in members:
                shape = list(trial[i].shape)
                shape[axis] = c
                t = example_inputs[i]
                trial[i] = torch.randn(shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
            try:
                with torch.no_grad():
                    quiet_call(original, trial)
            except Exception:
                continue
            accepted.append(c)
        if len(accepted) > 1:
            for i in members:
                free[(i, axis)] = tuple(accepted)
    return free


# ----------------------------------------------------------------------------- the result

@dataclass
class VerifyResult:
    """What :func:`verify` found.

    ``max_deviation`` and ``tolerance`` come from the case with the largest
    ``deviation / tolerance`` (the failing case when there is one).  ``failing_input`` is the
    shrunk failing tuple of inputs, ``failing_case`` its description, ``error`` what the fused
    model raised on it (if it raised).
    """

    ok: bool
    max_deviation: float
    tolerance: float
    cases_checked: int
    cases_skipped: int = 0
    failing_input: Optional[Tuple[Any, ...]] = None
    failing_case: Optional[InputCase] = None
    error: Optional[str] = None
    free_sizes: Dict[Tuple[int, int], Tuple[int, ...]] = field(default_factory=dict)
    shapes_checked: List[Tuple[Optional[Tuple[int, ...]], ...]] = field(default_factory=list)
    original_non_finite: List[str] = field(default_factory=list)  # cases on which the original gave NaN/Inf

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        shapes = "; ".join(", ".join("-" if s is None else "x".join(map(str, s)) for s in shapes)
                           for shapes in self.shapes_checked[:6])
        more = f" and {len(self.shapes_checked) - 6} more" if len(self.shapes_checked) > 6 else ""
        if self.ok:
            text = (f"verification passed: max deviation {self.max_deviation:.2e} (tolerance {self.tolerance:.2g}) "
                    f"over {self.cases_checked} input cases; shapes {shapes}{more}")
        else:
            what = self.error or f"deviation {self.max_deviation:.3g} > tolerance {self.tolerance:.2g}"
            text = f"verification FAILED on {self.failing_case.describe()}: {what}"
        failed = f"{self.failing_case.describe()}: " if self.failing_case is not None else None
        others = [n for n in self.original_non_finite if not (failed and n.startswith(failed))]
        if others:
            shown = "; ".join(others[:2]) + (f"; and {len(others) - 2} more" if len(others) > 2 else "")
            text += (f"\nWARNING: the original model itself gives NaN or Inf on {len(others)} "
                     f"input case(s) ({shown}): there the fused model was only required to give the same "
                     "NaN/Inf, and those entries are not verified")
        return text


class _Mismatch(Exception):
    def __init__(self, result: CaseResult):
        super().__init__(result.error or f"deviation {result.deviation:.3g} > {result.tolerance:.2g}")
        self.result = result


# ----------------------------------------------------------------------------- verify

def verify(original: Callable, fused: Callable, example_inputs: Any, *, max_examples: int = 10,
           tolerance: Tolerance = None, distributions: Sequence[str] = DISTRIBUTIONS,
           dtypes: Optional[Sequence[torch.dtype]] = None, vary_shapes: bool = True, seed: int = 0,
           noise_floor: bool = True) -> VerifyResult:
    """Check that ``fused`` computes what ``original`` computes, on Hypothesis-drawn inputs.

    ``example_inputs``: a tuple of positional inputs (a single tensor is accepted) on which the
    original runs.  ``max_examples`` bounds the drawn cases (the example itself is always
    checked first).  ``tolerance``: see the module docstring.  ``distributions``: a subset of
    :data:`~repc.verify.strategies.DISTRIBUTIONS`.  ``dtypes``: check also (or only) at these
    dtypes, on cast copies of both models (``None`` in the list: the models as given).
    ``vary_shapes=False`` keeps the example's shapes.  ``noise_floor``: see the module docstring.
    Returns a :class:`VerifyResult` (truthy
    when it passed); raises :class:`VerificationError` with a one-line message when the models
    cannot be compared (not callable, in training mode, the original fails on the example).
    """
    try:
        from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
        from hypothesis import seed as hypothesis_seed
        from hypothesis.errors import Flaky, Unsatisfiable
    except ImportError as why:  # pragma: no cover - hypothesis is a declared dependency
        raise VerificationError("repc.verify needs the hypothesis package: pip install hypothesis") from why
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    for name, model in (("original", original), ("fused", fused)):
        if not callable(model):
            raise VerificationError(f"the {name} model is not callable (got {type(model).__name__})")
        if isinstance(model, nn.Module):
            training = mode_dependent_in_training(model)
            if training:
                raise VerificationError(f"the {name} model is in training mode ({', '.join(training[:3])}"
                                        f"{'...' if len(training) > 3 else ''}): call .eval() first, or outputs are random")
    if max_examples < 1:
        raise VerificationError("max_examples must be at least 1")
    try:
        with torch.no_grad():
            original(*example_inputs)
    except Exception as why:
        text = str(why).strip().splitlines()
        raise VerificationError(f"the original model fails on the example inputs: {type(why).__name__}: "
                                f"{text[0] if text else ''}"[:300]) from why

    models = ModelPair(original, fused)
    free = probe_free_sizes(original, example_inputs) if vary_shapes else {}
    dtype_options = list(dtypes) if dtypes else [None]
    strategy = input_cases(example_inputs, free, distributions, dtype_options, vary=vary_shapes)
    results: List[CaseResult] = []
    first_failure: List[CaseResult] = []

    def run(case: InputCase) -> None:
        from hypothesis import reject
        r = check_case(models, example_inputs, case, tolerance, noise_floor)
        results.append(r)
        if r.skipped:
            reject()
        if not r.ok:
            if not first_failure:
                first_failure.append(r)
            raise _Mismatch(r)

    test = given(strategy)(run)
    for d in reversed(dtype_options):  # the example inputs themselves first, at each dtype
        test = example(example_case(example_inputs, d))(test)
    test = settings(max_examples=max_examples, database=None, deadline=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, print_blob=False,
                    report_multiple_bugs=False,
                    phases=(Phase.explicit, Phase.generate, Phase.shrink))(test)
    test = hypothesis_seed(seed)(test)

    failure: Optional[CaseResult] = None
    try:
        test()
    except _Mismatch as mismatch:
        failure = mismatch.result  # the shrunk case
    except Flaky:
        failure = first_failure[0] if first_failure else None
    except Unsatisfiable:
        pass
    checked = [r for r in results if not r.skipped]
    skipped = len(results) - len(checked)
    shapes = list(dict.fromkeys(r.case.shapes for r in checked))
    non_finite_cases = list(dict.fromkeys(f"{r.case.describe()}: {r.original_non_finite}" for r in checked
                                          if r.original_non_finite))
    if failure is not None:
        return VerifyResult(False, failure.deviation, failure.tolerance, len(checked), skipped,
                            failure.case.materialize(example_inputs), failure.case, failure.error, free, shapes,
                            non_finite_cases)
    worst = max(checked, key=lambda r: r.deviation / r.tolerance if r.tolerance else math.inf, default=None)
    if worst is None:
        raise VerificationError("no input case could be run on the original model")
    return VerifyResult(True, worst.deviation, worst.tolerance, len(checked), skipped,
                        free_sizes=free, shapes_checked=shapes, original_non_finite=non_finite_cases)
