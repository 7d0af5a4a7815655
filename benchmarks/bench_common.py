"""Timing helpers shared by the benchmarks.

* :func:`interleaved_medians` -- latency of several callables measured round-robin (each
  round runs every callable, in a rotated order), so that a burst of load from other
  processes hits all of them alike; the median over rounds is reported.
* :class:`PhaseTimer` -- exclusive wall/CPU time per named phase, gathered by wrapping
  functions of the code under test for the duration of a ``with`` block (nothing is edited
  on disk; a function that no longer exists is reported as missing, not as an error).
* :func:`growth_exponent` -- ``log(t2 / t1) / log(n2 / n1)``: 1 for linear growth, 2 for
  quadratic.
* :func:`format_table`, :func:`write_json` (atomic: a partial file is never left behind),
  :func:`machine_note`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads for torch."""
    if threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def machine_note(threads: int) -> str:
    """One line saying where and how the figures were taken."""
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return (f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} CPU cores visible, "
            f"torch threads {threads}, load average {load}")


# ----------------------------------------------------------------------------- latency

@dataclass
class Latency:
    name: str
    samples: List[float] = field(default_factory=list)  # seconds per call, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        """The fastest round: the least disturbed by other processes."""
        return min(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.1 = the middle half lies within 10%)."""
        if len(self.samples) < 4:
            return (max(self.samples) - min(self.samples)) / self.median if self.samples else 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median


def interleaved_medians(fns: Dict[str, Callable[[], Any]], rounds: int, calls_per_round: int,
                        warmup: int = 2) -> Dict[str, Latency]:
    """Median seconds per call of each callable, measured in interleaved rounds.

    Every round times ``calls_per_round`` back-to-back calls of each callable; the order of
    the callables rotates from round to round so none always runs first (cold) or last.
    """
    if rounds < 1 or calls_per_round < 1:
        raise ValueError("rounds and calls_per_round must be at least 1")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    results = {name: Latency(name) for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(calls_per_round):
                fn()
            results[name].samples.append((time.perf_counter() - start) / calls_per_round)
    return results


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


# ----------------------------------------------------------------------------- phases

class PhaseTimer:
    """Exclusive time per phase: time spent in a nested phase is not counted in its parent."""

    def __init__(self) -> None:
        self.wall: Dict[str, float] = {}
        self.cpu: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self.missing: List[str] = []
        self._stack: List[List[Any]] = []  # [phase, wall start, cpu start, child wall, child cpu]

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.calls.clear()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        frame = [name, time.perf_counter(), time.process_time(), 0.0, 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            wall = time.perf_counter() - frame[1]
            cpu = time.process_time() - frame[2]
            self.wall[name] = self.wall.get(name, 0.0) + wall - frame[3]
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu - frame[4]
            self.calls[name] = self.calls.get(name, 0) + 1
            if self._stack:
                self._stack[-1][3] += wall
                self._stack[-1][4] += cpu

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        timed.__wrapped__ = fn
        return timed

    @contextlib.contextmanager
    def instrument(self, targets: Sequence[Tuple[str, str, str]]) -> Iterator["PhaseTimer"]:
        """Wrap ``module:attr.path`` callables as phases while the block runs.

        ``targets`` are ``(module, dotted attribute, phase name)``, e.g.
        ``("repc.passes.collapse", "RegionMatcher.run", "matching")``.  A target that does
        not exist (the code under test changed) is listed in ``self.missing``.
        """
        undo = []
        try:
            for module_name, attr_path, phase in targets:
                try:
                    holder = importlib.import_module(module_name)
                    *parents, attr = attr_path.split(".")
                    owner = holder
                    for p in parents:
                        holder, owner = owner, getattr(owner, p)
                        if isinstance(owner, types.ModuleType):
                            # ``import copy`` then ``copy.deepcopy``: wrap the function for this
                            # reader only (patching the module would also time its recursion)
                            proxy = _ModuleView(owner)
                            setattr(holder, p, proxy)
                            undo.append((holder, p, owner))
                            owner = proxy
                    original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
                except (ImportError, AttributeError, KeyError):
                    self.missing.append(f"{module_name}:{attr_path}")
                    continue
                if isinstance(original, (staticmethod, classmethod)):
                    self.missing.append(f"{module_name}:{attr_path} (not a plain function)")
                    continue
                setattr(owner, attr, self.wrap(original, phase))
                undo.append((owner, attr, original))
            yield self
        finally:
            for owner, attr, original in reversed(undo):
                setattr(owner, attr, original)


class _ModuleView:
    """Stands in for a module inside one reader's namespace; attributes set here shadow it."""

    def __init__(self, module: types.ModuleType):
        self.__dict__["_module"] = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def growth_exponent(n1: float, t1: float, n2: float, t2: float) -> float:
    """The k in ``t ~ n^k`` between two measurements (1 = linear, 2 = quadratic)."""
    if min(n1, n2, t1, t2) <= 0 or n1 == n2:
        return float("nan")
    return math.log(t2 / t1) / math.log(n2 / n1)


# ----------------------------------------------------------------------------- output

def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align_right_from: int = 1) -> str:
    """A plain-text table; columns from ``align_right_from`` on are right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if i >= align_right_from else c.ljust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SystemExit(f"cannot write {path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".bench-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fmt_ratio(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}x"


# ----------------------------------------------------------------------------- models

def randomized_relative(model: "torch.nn.Module", seed: int = 0) -> "torch.nn.Module":
    """Every parameter moved off its init by a tenth of its own spread, every BatchNorm given
    random statistics near the init's; eval mode.  Keeps a deep network's function of order one
    (absolute noise on small weights makes it chaotic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # off its init by a tenth of its own spread (an absolute 0.1 where it has none: zero
            # biases, unit norm scales); absolute noise on wide convs' small weights makes deep
            # networks chaotic (GhostNetV3: float32 and float64 forms 0.8 apart)
            spread = p.std().item() if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * (spread if spread > 0 else 1.0))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()
