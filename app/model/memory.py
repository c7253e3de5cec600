"""Give freed heap memory back to the operating system (glibc's `malloc_trim`).

Tokenizing a megabyte of text takes ~100 MB of short-lived buffers in the tokenizer's thread;
glibc keeps what a thread's arena freed for later instead of unmapping it, so one such request
would leave the process that much bigger for good. Trimming after large inputs brings it back.
Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    # The process's own symbols: no library lookup (find_library would run ldconfig).
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    def __init__(self) -> None:
        self._trim = _find_malloc_trim()

    def release(self) -> None:
        """Return free memory at the top of every arena's heap, and whole free pages within."""
        if self._trim is not None:
            self._trim(0)
