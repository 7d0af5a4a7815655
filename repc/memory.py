"""Giving the memory a compile freed back to the system.

A compile computes each merged region's float64 tensors, writes them out in the model's dtype
and drops them (:class:`repc.patterns.regions.FormCache`).  glibc's allocator keeps most of what
is freed that way in its heap, and the interleaved sizes fragment it: a LoRA'd 126M-parameter
Llama, whose forms never hold more than 36 MiB at once, grew its resident memory by 0.5 GiB in
the matcher alone.  :class:`FreedMemory` counts the bytes dropped and, past a threshold, asks the
allocator to return its free pages (``malloc_trim``), so that resident memory follows what is
held.  Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

_TRIM_EVERY = 256 * 2 ** 20  # bytes dropped between two returns: fewer returns, fewer pages touched again


def _malloc_trim() -> Optional[object]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # (not glibc: its allocator returns memory its own way)
        return None


_TRIM = _malloc_trim()


class FreedMemory:
    """Bytes dropped since memory was last given back; gives it back every ``every`` bytes."""

    def __init__(self, every: int = _TRIM_EVERY):
        self.every, self.dropped = every, 0

    def dropped_bytes(self, n: int) -> None:
        self.dropped += n
        if self.dropped >= self.every:
            self.give_back()

    def give_back(self) -> None:
        self.dropped = 0
        if _TRIM is not None:
            _TRIM(0)
