"""Hypothesis strategies for repc's verifier: input cases.

:func:`input_cases` draws concrete inputs for a differential check of a fused
model against its original.  A case is a small value (:class:`InputCase`): one shape per
positional input, a value distribution, a dtype and a seed; :meth:`InputCase.materialize`
turns it into tensors.  Sizes are drawn only on the axes the model accepts other sizes on
(batch, spatial or token axes, found by probing the original; see
:func:`repc.verify.equivalence.probe_free_sizes`); everything else keeps the example's size.
The distributions (:data:`DISTRIBUTIONS`) are ``normal``, ``large`` (magnitude
:func:`large_magnitude`), ``near_zero`` (magnitude :func:`small_magnitude`), ``positive``
(``|normal|``, what follows a ReLU) and ``zeros`` (the output is then the biases alone,
border effects included).  Hypothesis shrinks a failing case towards the example's sizes,
the ``normal`` distribution and seed 0.

The architecture fuzzer's network generators are test tooling: ``tests/fuzz_networks.py`` (conv
networks) and ``tests/fuzz_transformers.py`` (transformer blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from hypothesis import strategies as st

# =============================================================================== input cases

DISTRIBUTIONS = ("normal", "large", "near_zero", "positive", "zeros")
EXAMPLE = "example"  # the pseudo-distribution of the example inputs themselves


def large_magnitude(dtype: torch.dtype) -> float:
    """Scale of the ``large`` distribution: ``min(1e3, max(dtype) ** 0.25)`` (16 for float16)."""
    return float(min(1e3, torch.finfo(dtype).max ** 0.25))


def small_magnitude(dtype: torch.dtype) -> float:
    """Scale of the ``near_zero`` distribution: ``max(1e-4, tiny(dtype) ** 0.25)``.

    Values stay normal numbers after a few products by weights of order one (0.088 for
    float16, whose smallest normal number is 6e-5; 1e-4 otherwise).
    """
    return float(max(1e-4, torch.finfo(dtype).tiny ** 0.25))


def draw_values(shape: Sequence[int], distribution: str, dtype: torch.dtype, generator: torch.Generator,
                device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """A tensor of ``shape`` from one of :data:`DISTRIBUTIONS`, drawn in float64 then cast."""
    if distribution == "zeros":
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    v = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    if distribution == "large":
        v = v * large_magnitude(dtype)
    elif distribution == "near_zero":
        v = v * small_magnitude(dtype)
    elif distribution == "positive":
        v = v.abs()
    elif distribution != "normal":
        raise ValueError(f"unknown value distribution {distribution!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    return v.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class InputCase:
    """One set of positional inputs: a shape per floating-point tensor input (``None`` for
    inputs kept as given), the value distribution, the dtype (``None``: each input's own) and
    the seed of the values."""

    shapes: Tuple[Optional[Tuple[int, ...]], ...]
    distribution: str = "normal"
    dtype: Optional[torch.dtype] = None
    seed: int = 0

    def materialize(self, example_inputs: Sequence[Any]) -> Tuple[Any, ...]:
        """The inputs; the ``example`` distribution is the example inputs themselves (cast to
        ``dtype`` when one is set)."""
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for shape, ex in zip(self.shapes, example_inputs):
            if shape is None:
                out.append(ex)
            elif self.distribution == EXAMPLE:
                if tuple(ex.shape) != tuple(shape):
                    raise ValueError(f"the example case has shape {shape}, the example input {tuple(ex.shape)}")
                out.append(ex if self.dtype is None else ex.to(self.dtype))
            else:
                out.append(draw_values(shape, self.distribution, self.dtype or ex.dtype, gen, ex.device))
        return tuple(out)

    def describe(self) -> str:
        shapes = ", ".join("-" if s is None else "x".join(map(str, s)) for s in self.shapes)
        dtype = "" if self.dtype is None else f", {str(self.dtype).replace('torch.', '')}"
        if self.distribution == EXAMPLE:
            return f"the example inputs{dtype}"
        return f"{self.distribution} values of shape {shapes}{dtype}, seed {self.seed}"


def is_varied(t: Any) -> bool:
    """Inputs the checker draws new values for: floating-point tensors."""
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def example_case(example_inputs: Sequence[Any], dtype: Optional[torch.dtype] = None) -> InputCase:
    """The example inputs themselves (at ``dtype`` if given)."""
    return InputCase(tuple(tuple(t.shape) if is_varied(t) else None for t in example_inputs), EXAMPLE, dtype)


def input_cases(example_inputs: Sequence[Any], free_sizes: Optional[Mapping[Tuple[int, int], Sequence[int]]] = None,
                distributions: Sequence[str] = DISTRIBUTIONS, dtypes: Sequence[Optional[torch.dtype]] = (None,),
                vary: bool = True) -> st.SearchStrategy[InputCase]:
    """Input cases for ``example_inputs``.

    ``free_sizes[(i, axis)]`` lists the sizes input ``i`` may take on ``axis`` (the example's
    size first, so shrinking goes back to it); axes not listed keep the example's size.  An
    axis is drawn once for all inputs that have the same size on it in the example (a batch,
    or the tokens of a sequence and of its mask, change together).  With ``vary`` false, only
    the example's shapes are drawn.
    """
    free_sizes = dict(free_sizes or {})
    example_shapes = [tuple(t.shape) if is_varied(t) else None for t in example_inputs]
    for name in distributions:
        if name not in DISTRIBUTIONS:
            raise ValueError(f"unknown value distribution {name!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    if not distributions or not dtypes:
        raise ValueError("at least one distribution and one dtype are needed")

    @st.composite
    def cases(draw) -> InputCase:
        shapes: List[Optional[Tuple[int, ...]]] = []
        tied: Dict[Tuple[int, int], int] = {}  # (axis, example size) -> drawn size
        for i, shape in enumerate(example_shapes):
            if shape is None:
                shapes.append(None)
                continue
            new = list(shape)
            for axis, size in enumerate(shape):
                options = list(free_sizes.get((i, axis), ())) if vary else []
                if len(options) <= 1:
                    continue
                if (axis, size) not in tied:
                    tied[(axis, size)] = draw(st.sampled_from(options))
                new[axis] = tied[(axis, size)]
            shapes.append(tuple(new))
        return InputCase(tuple(shapes), draw(st.sampled_from(list(distributions))), draw(st.sampled_from(list(dtypes))),
                         draw(st.integers(0, 2 ** 16)))

    return cases()
