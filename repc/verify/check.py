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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..values import is_opaque, object_state

TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-4)


def deviation(fused: Any, original: Any) -> float:
    """Largest relative deviation between two (nested) outputs; inf if their structure differs.

    Non-finite entries: a NaN or Inf in ``fused`` where ``original`` is finite is infinitely far
    from it; where ``original`` is NaN or Inf, ``fused`` must hold the same value there (NaN for
    NaN, the same signed Inf) and the finite entries are compared.  (:func:`compare` does not
    compare around the original's non-finite values on the example: it fails, saying so.)
    """
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
            finite = torch.isfinite(y64)
            if not finite.all():
                same = (x64 == y64) | (torch.isnan(x64) & torch.isnan(y64))
                if not same[~finite].all():
                    return float("inf")
                x64, y64 = x64[finite], y64[finite]
            if y64.numel() == 0:
                continue
            if not torch.isfinite(x64).all():
                return float("inf")  # NaN or Inf where the original is finite
            scale = max(float(y64.abs().max()), torch.finfo(y.dtype).eps)
            worst = max(worst, float((x64 - y64).abs().max()) / scale)
        elif is_opaque(y):  # (a cache object: compared by the tensors it holds)
            if type(x) is not type(y):
                return float("inf")
            worst = max(worst, deviation(object_state(x), object_state(y)))
            if worst == float("inf"):
                return worst
        elif x != y:
            return float("inf")
    return worst


def _why_infinite(got: Any, ref: Any, dev: float) -> Optional[str]:
    """Why a result is infinitely far from the original (None where it is not)."""
    if dev != float("inf"):
        return None
    if non_finite(ref) is not None:
        return f"the original produces {non_finite(ref)} there, and the result does not match them"
    if non_finite(got) is not None:
        return f"the result produces {non_finite(got)} where the original is finite"
    if not same_structure(got, ref):
        return "the result's output is not structured as the original's (the whole-model graph computes " \
               "no object its output holds, such as a cache)"
    return None


def same_structure(a: Any, b: Any) -> bool:
    """Whether two outputs have the same containers, keys and leaf kinds (tensor or not)."""
    leaves_a, spec_a = tree_flatten(_plain_containers(a))
    leaves_b, spec_b = tree_flatten(_plain_containers(b))
    return spec_a == spec_b and all(isinstance(x, torch.Tensor) == isinstance(y, torch.Tensor)
                                    for x, y in zip(leaves_a, leaves_b))


def non_finite(out: Any) -> Optional[str]:
    """What is not finite in a (nested) output, ``"NaN in 3 of 512 values"``; None if all is finite."""
    kinds, bad, total = _non_finite_counts(out)
    if not bad:
        return None
    return f"{kinds} in {bad:,} of {total:,} values"


def _non_finite_counts(out: Any) -> Tuple[str, int, int]:
    """(``"NaN"``, ``"Inf"`` or ``"NaN and Inf"``; non-finite entries; all entries) of the floating leaves."""
    nan = inf = total = 0
    for t in tree_flatten(_plain_containers(out))[0]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            total += t.numel()
            nan += int(torch.isnan(t).sum())
            inf += int(torch.isinf(t).sum())
    return " and ".join(k for k, n in (("NaN", nan), ("Inf", inf)) if n), nan + inf, total


def output_dtype(out: Any) -> torch.dtype:
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return leaves[0].dtype if leaves else torch.float32


# ----------------------------------------------------------------------------- input sizes

FLOOR = 7  # the smallest size tried on an axis other than the batch: every 3x3 border is still there


class SizeProbe:
    """Inputs of the example's structure with random values and other sizes, run on a model.

    The floating-point, integer and bool tensors among the example inputs (nested ones too; those at the ``fixed``
    positions stay as given) are grouped in *ties*: an axis of every such tensor with the same
    size there, keyed ``(axis, size)`` -- the batch of an image and of its mask, the tokens of a
    sequence and of its attention bias -- which change together.  :meth:`run` gives the model
    inputs with some ties at other sizes (everything else at the example's) and returns them
    with the model's output, or None when the model rejects them: one forward pass per trial.
    ``channels=False`` leaves out axis 1 of inputs of four or more axes (a map's channels).
    :func:`probe_sizes` and :func:`input_variants` are built on it (and it is the mechanism of
    :func:`repc.verify.equivalence.probe_free_sizes`: ``probe_sizes`` with that function's
    candidates returns what it returns).
    """

    def __init__(self, model: Callable, example_inputs: Sequence[Any], fixed=(), seed: int = 0,
                 channels: bool = True):
        self.model, self.example_inputs, self.fixed = model, tuple(example_inputs), set(fixed)
        self.gen = torch.Generator().manual_seed(seed)
        self.flat: List[Optional[Tuple[List[Any], Any]]] = []
        self.ties: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
        for i, x in enumerate(self.example_inputs):
            if i in self.fixed:
                self.flat.append(None)
                continue
            leaves, spec = tree_flatten(x)
            self.flat.append((leaves, spec))
            for j, t in enumerate(leaves):
                if _varied(t):
                    for axis, size in enumerate(t.shape):
                        if channels or not (axis == 1 and t.dim() >= 4):
                            self.ties.setdefault((axis, size), []).append((i, j))

    @property
    def varies(self) -> bool:
        """Whether any input gets new values (a tensor not held fixed)."""
        return any(flat is not None and any(_varied(t) for t in flat[0]) for flat in self.flat)

    def inputs(self, sizes: Mapping[Tuple[int, int], int] = {}) -> Tuple[Any, ...]:
        """Random values (:func:`_draw`) for every varied tensor, with the ties in ``sizes`` at
        the sizes given."""
        shapes: Dict[Tuple[int, int], List[int]] = {}
        for (axis, _), size in sizes.items():
            for member in self.ties[(axis, _)]:
                shapes.setdefault(member, list(self._leaf(member).shape))[axis] = size
        out = []
        for i, flat in enumerate(self.flat):
            if flat is None:
                out.append(self.example_inputs[i])
                continue
            leaves, spec = flat
            new = [_draw(t, shapes.get((i, j), t.shape), self.gen) if _varied(t) else t
                   for j, t in enumerate(leaves)]
            out.append(tree_unflatten(new, spec))
        return tuple(out)

    def run(self, sizes: Mapping[Tuple[int, int], int] = {}):
        """``(inputs, output)`` of the model on random inputs at ``sizes``; None if it rejects them."""
        inputs = self.inputs(sizes)
        try:
            with torch.no_grad():
                return inputs, quiet_call(self.model, inputs)
        except Exception:
            return None

    def ties_of(self, sizes: Sequence[Tuple[int, int, int]]) -> List[Tuple[Tuple[int, int], int]]:
        """``(leaf, axis, size)`` (``leaf`` counting the flat leaves of all inputs, in order) as
        ``(tie, size)``, each tie once, leaving out the leaves and axes not varied."""
        members: Dict[int, Tuple[int, int]] = {}
        for i, x in enumerate(self.example_inputs):
            for j in range(len(tree_flatten(x)[0])):
                members[len(members)] = (i, j)
        out: Dict[Tuple[int, int], int] = {}
        for leaf, axis, size in sizes:
            member = members.get(leaf)
            if member is None or self.flat[member[0]] is None:
                continue
            shape = self._leaf(member).shape
            tie = (axis, shape[axis]) if axis < len(shape) else None
            if tie in self.ties and member in self.ties[tie]:
                out.setdefault(tie, size)
        return list(out.items())

    def shapes(self, inputs: Tuple[Any, ...]) -> str:
        """The varied tensors' shapes, ``2x3x7x7`` (the first three, comma-separated)."""
        shapes = ["x".join(map(str, t.shape)) for i, flat in enumerate(self.flat) if flat is not None
                  for t, ex in zip(tree_flatten(inputs[i])[0], flat[0]) if _varied(ex)]
        return ", ".join(shapes[:3]) + (", ..." if len(shapes) > 3 else "")

    def _leaf(self, member: Tuple[int, int]) -> torch.Tensor:
        i, j = member
        return self.flat[i][0][j]


def _varied(t: Any) -> bool:
    """A tensor the checks give new values: floating point, or integer / bool with values to
    draw from (token ids, masks)."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or not t.is_complex() and t.numel() > 0)


def _draw(t: torch.Tensor, shape, gen: torch.Generator) -> torch.Tensor:
    """Random values of ``t``'s kind at ``shape``: standard normal (drawn in float32, then cast)
    for floating point, else entries of ``t`` itself (ids stay in the vocabulary, masks 0/1)."""
    if t.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=t.dtype, device=t.device)
    pick = torch.randint(0, t.numel(), tuple(shape), generator=gen)
    return t.reshape(-1)[pick.to(t.device)]


def probe_sizes(model: Callable, example_inputs: Sequence[Any],
                candidates: Callable[[int, int], Sequence[int]], fixed=()) -> Dict[Tuple[int, int], Tuple[int, ...]]:
    """Sizes each axis of each top-level varied input (see :class:`SizeProbe`) may take, as far as ``model``
    accepts them: each tie (see :class:`SizeProbe`) tried at ``candidates(axis, size)`` with
    everything else at the example's sizes.  Returns ``{(input, axis): sizes}`` for the axes
    with more than one accepted size, the example's size first."""
    probe = SizeProbe(model, example_inputs, fixed)
    free: Dict[Tuple[int, int], Tuple[int, ...]] = {}
    for (axis, size), members in probe.ties.items():
        accepted = [size]
        for c in candidates(axis, size):
            if c >= 1 and c not in accepted and probe.run({(axis, size): c}) is not None:
                accepted.append(c)
        if len(accepted) > 1:
            for i, j in members:
                if not isinstance(example_inputs[i], (tuple, list, dict)):  # a tensor at the top level
                    free[(i, axis)] = tuple(accepted)
    return free


def small_sizes(axis: int, size: int) -> List[int]:
    """Sizes to try for a tie in :func:`input_variants`, cheapest first.

    Batch (axis 0): 2 (1 when the example's is 2), then 1, then one more than the example's.
    Other axes: :data:`FLOOR` and ``FLOOR + 1`` (both parities), then the example's size halved
    as long as it divides (models that need multiples of their total stride), then one more
    than the example's when it has no halves above the floor; for an example size at or below
    ``FLOOR + 1``: one more, one less (at least 2), two more; none for a size of 1 (as before,
    such axes keep it)."""
    if axis == 0:
        first = 1 if size == 2 else 2
        sizes = [first, 1, size + 1]
    elif size == 1:
        sizes = []  # a broadcast axis, or a 1x1 example map that capture may have specialized to 1
    elif size <= FLOOR + 1:
        sizes = [size + 1, size - 1 if size > 2 else 0, size + 2]
    else:
        halves, n = [], size
        while n % 2 == 0 and n // 2 > FLOOR + 1:
            n //= 2
            halves.append(n)
        sizes = [FLOOR, FLOOR + 1] + halves[::-1] + ([] if halves else [size + 1])
    return [s for i, s in enumerate(sizes) if s >= 1 and s != size and s not in sizes[:i]]


@dataclass
class Variant:
    name: str
    inputs: Tuple[Any, ...]
    reference: Any = None  # the original's output on them, when already computed


def input_variants(example_inputs: Tuple[Any, ...], seed: int = 0, fixed=(), original: Optional[Callable] = None,
                   skipped: Optional[List[str]] = None, beyond: Sequence[Tuple[int, int, int]] = ()) -> List[Variant]:
    """The inputs the whole-model check runs: the example itself, random values of its shape,
    and random values at other sizes on every axis ``original`` accepts them on, small.

    * ``example``: the example inputs (their reference is left to the caller).
    * ``random <shapes>``: random values at the example's per-sample shapes; at a smaller batch
      (2 or 1) when the example's batch is larger and the model accepts it.  Left out where the
      next variant varies the batch alone (the model accepts no other size on any other axis):
      that one is random values at the example's per-sample shapes already.
    * ``random <shapes>`` again: another batch size and other sizes on every other axis the
      model accepts, all at once, each the cheapest :func:`small_sizes` the model takes.  The
      axes are probed greedily on ``original`` (a smaller batch first, then the largest axes,
      so that the later trials run small), each trial one forward pass; the accepted trial's output is kept as the
      reference.  Axes of equal size that are only accepted together (a model that needs
      square maps) are tried together.
    * ``random <shapes>`` beyond a size: for each ``(leaf, axis, size)`` of ``beyond`` (``leaf``
      counting the flat leaves of the inputs, in order; a size just above the largest or below
      the smallest an exported graph holds for), random values with that axis, and those tied
      to it, at ``size`` (at the smaller batch where one was accepted), where the model accepts
      it: a branch on a size that the example is at one end of is taken only past it.

    The channels of a map (axis 1 of an input with four or more axes) are not varied: every
    merged conv fixes them, as the model's own convs do, and a model of pools and sums only
    (that takes any number of channels) is fused for the example's.  Inputs at the ``fixed``
    positions (arguments the model was specialized to) stay as given.  Without ``original``
    only the example and random values of its shape are returned.  The ties the model accepts
    no other size on are appended to ``skipped`` (``axis 2 (size 16)``).
    """
    probe = SizeProbe(original, example_inputs, fixed, seed, channels=False)
    variants = [Variant("example", tuple(example_inputs))]
    if not probe.varies:
        return variants
    if original is None:
        inputs = probe.inputs()
        return variants + [Variant("random", inputs)]
    batch = [t for t in probe.ties if t[0] == 0]
    others = sorted((t for t in probe.ties if t[0] != 0), key=lambda t: (-t[1], t[0]))
    chosen: Dict[Tuple[int, int], int] = {}
    last = None
    rejected = []
    shrinking = [t for t in batch if small_sizes(*t)[0] < t[1]]  # a smaller batch first: later trials run on it
    accepted: Dict[frozenset, Any] = {}  # (the runs at a smaller batch alone, which the variants below reuse)
    for tie in shrinking + others + [t for t in batch if t not in shrinking]:
        for size in small_sizes(*tie):
            sizes = {**chosen, tie: size}
            got = probe.run(sizes)
            if got is not None:
                chosen[tie], last = size, got
                if all(t in shrinking for t in sizes):
                    accepted[frozenset(sizes.items())] = got
                break
        else:
            rejected.append(tie)
    for size, group in _by_size(t for t in rejected if t[0] != 0).items():
        if len(group) > 1:  # equal axes the model accepts only together (square maps)
            for s in small_sizes(1, size):
                got = probe.run({**chosen, **{t: s for t in group}})
                if got is not None:
                    chosen.update({t: s for t in group})
                    rejected = [t for t in rejected if t not in group]
                    last = got
                    break
    if skipped is not None:
        skipped.extend(f"axis {axis} (size {size})" for axis, size in sorted(rejected))
    # random values at the example's per-sample shapes, at a smaller batch where one was accepted
    smaller = {t: chosen[t] for t in batch if t in chosen and chosen[t] < t[1]}
    full = (accepted.get(frozenset(smaller.items())) or probe.run(smaller)) if smaller else None
    # (where only the batch varied, a model of fixed sizes, the last variant is random values at
    # the example's per-sample shapes already: both models need not run on them twice)
    batch_only = last is not None and all(axis == 0 for axis, _ in chosen)
    if full is not None:
        variants.append(Variant(f"random {probe.shapes(full[0])}", *full))
    elif not batch_only:
        inputs = probe.inputs()
        variants.append(Variant(f"random {probe.shapes(inputs)}", inputs))
    if last is not None:
        variants.append(Variant(f"random {probe.shapes(last[0])}", *last))
    for tie, size in probe.ties_of(beyond):
        got = probe.run({**smaller, tie: size})
        if got is not None:
            variants.append(Variant(f"random {probe.shapes(got[0])}", *got))
    return variants


def _by_size(ties) -> Dict[int, List[Tuple[int, int]]]:
    groups: Dict[int, List[Tuple[int, int]]] = {}
    for axis, size in ties:
        groups.setdefault(size, []).append((axis, size))
    return groups


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
        with warnings.catch_warnings():  # (torch's own, copying the pytree specs a model may hold)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
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


CALL_SEED = 0  # the random state every compared call starts from


def seeded_call(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` from the random state :data:`CALL_SEED`, the caller's own random
    state left as it was: a model that draws at random in eval mode (ViT-MAE's token mask where
    no ``noise`` is given) draws the same in the original and in the result compared with it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CALL_SEED)
        return fn(*args, **kwargs)


def quiet_call(fn: Callable, inputs: Tuple[Any, ...]):
    """``fn(*inputs)`` for a trial input that ``fn`` may reject, from the random state
    :data:`CALL_SEED` (:func:`seeded_call`).

    A ``GraphModule`` whose generated code raises prints that code to stderr before the
    exception propagates; the caller handles the exception, so the print is only noise.
    """
    with contextlib.redirect_stderr(io.StringIO()):
        return seeded_call(fn, *inputs)


def variants_with_references(original: Callable, example_inputs: Tuple[Any, ...], fixed=(),
                             skipped: Optional[List[str]] = None, beyond: Sequence[Tuple[int, int, int]] = ()
                             ) -> List[Variant]:
    """The :func:`input_variants` beyond the example, each with ``original``'s output on it; those
    the original refuses are left out (named in ``skipped``)."""
    skipped = [] if skipped is None else skipped
    out = []
    with torch.no_grad():
        for variant in input_variants(example_inputs, fixed=fixed, original=original, skipped=skipped,
                                      beyond=beyond)[1:]:
            if variant.reference is None:
                try:
                    variant.reference = quiet_call(original, variant.inputs)
                except Exception:
                    skipped.append(variant.name)  # the model itself does not accept these inputs
                    continue
            out.append(variant)
    return out


def compare(fused: Callable, original: Optional[Callable], example_inputs: Tuple[Any, ...],
            tol: Optional[float] = None, fixed=(), noise_floor: bool = True, expected: Any = None,
            variants: Optional[Tuple[List[Variant], List[str]]] = None,
            beyond: Sequence[Tuple[int, int, int]] = ()) -> CheckResult:
    """Run both on every input variant (:func:`input_variants`, sizes ``beyond`` included); the
    worst deviation decides.

    ``expected``: the original's output on the example, when the caller already has it (it is
    not computed again).  ``variants``: the variants with their references and the ones skipped
    (:func:`variants_with_references`), computed before the original changed (a compile that
    writes into the model); ``original`` is then None and not run.  The original giving NaN or Inf on the example fails the check with
    ``error`` saying so: nothing is compared around them.  On the other inputs the fused model
    must give the same NaN or Inf where the original does (:func:`deviation`).  Cost: one pass
    of the fused model on the example, one of each model on random values of the example's
    per-sample shape, and small passes (the probes of :func:`input_variants` and the small
    variant).

    Beyond the tolerance, when ``original`` is a module and ``noise_floor`` is on, the input is
    run again on copies of the original with its weights moved by an ulp: an ill-conditioned
    output (a GELU's far tail after a sum) that rounding alone moves that much passes when the
    fused model deviates at most ``NOISE_FACTOR`` times as much, while a merge that computes
    another function stays far above it.  An explicit ``tol`` is applied as it is."""
    copies: List[torch.nn.Module] = []
    within_noise: List[str] = []
    checked: List[str] = []
    skipped: List[str] = []
    state = {"worst": 0.0, "tol": tol}

    def check(name: str, inputs: Tuple[Any, ...], ref: Any) -> Optional[CheckResult]:
        """None when ``fused`` agrees with ``ref`` on ``inputs``; the failed result otherwise."""
        nonlocal copies
        this_tol = tol if tol is not None else tolerance(output_dtype(ref))
        state["tol"] = this_tol if state["tol"] is None else min(state["tol"], this_tol)
        try:
            got = quiet_call(fused, inputs)
        except Exception as why:
            return CheckResult(False, float("inf"), this_tol, checked, skipped, name, f"{type(why).__name__}: {why}")
        dev = deviation(got, ref)
        accepted = dev <= this_tol
        if not accepted and noise_floor and tol is None and isinstance(original, torch.nn.Module) \
                and dev != float("inf"):  # (a tolerance the caller chose is taken as it is)
            copies = copies or perturbed_copies(original)
            noise = max(deviation(seeded_call(c, *inputs), ref) for c in copies)
            accepted = dev <= NOISE_FACTOR * noise
            if accepted:
                within_noise.append(name)
        state["worst"] = max(state["worst"], dev)
        checked.append(name)
        if accepted:
            return None
        return CheckResult(False, state["worst"], this_tol, checked, skipped, name, _why_infinite(got, ref, dev),
                           within_noise=within_noise)

    with torch.no_grad():
        if expected is None:
            expected = quiet_call(original, example_inputs)  # an original failing on the example raises
        kinds, bad, total = _non_finite_counts(expected)
        if bad:
            return CheckResult(False, float("inf"), tol if tol is not None else tolerance(output_dtype(expected)),
                               checked, skipped, "example",
                               f"the original model produces {kinds} on the example input ({bad:,} of {total:,} "
                               "output values), so there is nothing to compare the result with; check its weights, "
                               "statistics and the example")
        failed = check("example", tuple(example_inputs), expected)
        if failed is not None:
            return failed
        if variants is None:
            variants = (variants_with_references(original, example_inputs, fixed, skipped, beyond), [])
        skipped.extend(variants[1])
        for variant in variants[0]:
            failed = check(variant.name, variant.inputs, variant.reference)
            if failed is not None:
                return failed
    return CheckResult(True, state["worst"], state["tol"] if state["tol"] is not None else 1e-4, checked, skipped,
                       within_noise=within_noise)


def compare_calls(fused: Callable, original: Optional[torch.nn.Module], calls, result: CheckResult,
                  tol: Optional[float] = None, structure_kept: bool = False) -> CheckResult:
    """``result`` (a passed :func:`compare`) extended by the calls users make
    (:func:`repc.verify.calls.canonical_calls`, the original's outputs already computed): each
    run on ``fused`` and compared like the check's inputs, rounding-noise floor included (where
    ``original`` is given: it is not run otherwise).
    ``structure_kept``: ``fused`` takes exactly the example's inputs (a whole-model graph), so
    calls that leave an input out are skipped, saying so."""
    if not result.ok:
        return result
    checked, skipped, within_noise = list(result.checked), list(result.skipped), list(result.within_noise)
    worst = result.max_deviation
    copies: List[torch.nn.Module] = []
    for call in calls[1:]:
        if structure_kept and call.omits:
            skipped.append(f"{call.name} (the graph takes every input of the example)")
            continue
        this_tol = tol if tol is not None else tolerance(output_dtype(call.reference))
        with torch.no_grad():
            try:
                got = quiet_call(lambda *a: fused(*a, **call.kwargs), call.args)
            except Exception as why:
                return CheckResult(False, float("inf"), this_tol, checked, skipped, call.name,
                                   f"{type(why).__name__}: {why}", within_noise)
            dev = deviation(got, call.reference)
            accepted = dev <= this_tol
            if not accepted and tol is None and dev != float("inf") and isinstance(original, torch.nn.Module):
                copies = copies or perturbed_copies(original)
                noise = max(deviation(seeded_call(c, *call.args, **call.kwargs), call.reference) for c in copies)
                accepted = dev <= NOISE_FACTOR * noise
                if accepted:
                    within_noise.append(call.name)
        worst = max(worst, dev)
        checked.append(call.name)
        if not accepted:
            return CheckResult(False, worst, this_tol, checked, skipped, call.name, _why_infinite(got, call.reference,
                                                                                                    dev), within_noise)
    return CheckResult(True, worst, result.tolerance, checked, skipped, within_noise=within_noise)
