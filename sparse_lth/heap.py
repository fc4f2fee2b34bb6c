"""Keep freed memory in the process's heap (glibc), so that each training step reuses its buffers.

glibc hands a freed block larger than its mmap threshold (128 KB at first, raised to the size of
blocks freed since, 32 MB at most) back to the system, and maps a new one on the next request,
whose pages are then faulted in and zeroed again. A training step of 784-4096-4096-10 frees
and reallocates its 64 MB weight gradient every step: about 17,000 page faults a step, and
85-92 ms a step on this project's 2-core VM against 70-77 ms with those blocks kept
(bench/RESULTS.md). The price is a larger
resident set: memory freed stays with the process for its next request (755 against 650 MB in
that run), so this is a setting for a program that trains, such as ``sparse-lth search``, not
something a library should do behind a user's back.
"""

from __future__ import annotations

import ctypes
import functools
import os

# mallopt's parameter numbers (glibc's <malloc.h>)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap, and the heap gives nothing back until this much is free.
THRESHOLD = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name (musl), no libc.so.6
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to :data:`THRESHOLD` for the rest of the process.

    Returns True where glibc took both settings, False where there is no glibc (macOS, musl,
    Windows: nothing changes there). Process-wide and permanent; calling it again does nothing.
    (tests/test_heap.py runs it in processes of their own.)

    >>> from sparse_lth.heap import keep_freed_memory
    >>> keep_freed_memory()  # doctest: +SKIP
    True
    """
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD) == 1
    return mmap_ok and trim_ok
