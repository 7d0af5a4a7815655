"""Progress bars for long compiles: one bar over ``repc.compile``'s phases, one per region loop.

A bar appears only after a second (short compiles show nothing), only when stderr is a terminal,
and never with ``progress=False`` (the CLI's ``-q``).  Drawn by ``tqdm`` on stderr and removed
when done."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator, Optional, Sequence

DELAY_S = 1.0  # a bar shows once its work has taken this long


def wanted(progress: Optional[bool]) -> bool:
    """Whether to draw bars: not with ``progress=False``, and only where stderr is a terminal."""
    if progress is False:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Phases:
    """A bar over named phases: ``with phases.step("verify"): ...``."""

    def __init__(self, names: Sequence[str], enabled: bool, desc: str = "repc"):
        self.enabled, self.bar = enabled, None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=len(names), desc=desc, unit="phase", delay=DELAY_S, leave=False, file=sys.stderr,
                            bar_format="{desc}: {n_fmt}/{total_fmt} phases [{elapsed}] {postfix}")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def counter(total: int, enabled: bool, desc: str):
    """A bar to ``update()`` by hand (a work list that grows), or one that draws nothing."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, delay=DELAY_S, leave=False, file=sys.stderr)


def each(items: Iterable, enabled: bool, desc: str, total: Optional[int] = None) -> Iterable:
    """``items``, with a bar counting them where ``enabled``."""
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, total=total, delay=DELAY_S, leave=False, file=sys.stderr)
