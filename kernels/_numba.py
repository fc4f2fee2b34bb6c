"""What the numba CPU kernels share: the compile cache, the register block, a prefetch, the
thread count and lock, and work arrays kept between calls.

This module imports torch, numba and numba's llvmlite (the IR of the prefetch intrinsic) only.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

#: Outputs accumulated in registers at once: 4 zmm of fp32 (8 of fp64). 64 is what LLVM's loop
#: vectorizer (16 lanes, interleaved 4x) turns into exactly one unrolled step; 16 or 32 get fully
#: unrolled first and come out scalar (measured: 19 vs 4 GFMA/s on one core). numba's disk cache
#: knows a kernel's own file only: after changing this, delete kernels/__pycache__/*.nb[ic].
BLOCK = 64

# numba's workqueue layer (its fallback where neither TBB nor OpenMP loads) aborts the process on
# launches from two Python threads at once: calls take turns.
THREADS_LOCK = threading.Lock()

#: Work arrays up to this size are kept between calls, one per key (:func:`kept_empty`).
SCRATCH_BYTES = 16 << 20
_KEPT: dict[tuple, np.ndarray] = {}


def threads() -> int:
    """Threads for one kernel call: torch's count, capped by numba's pool (started here, once)."""
    if not _POOL_STARTED:
        _start_pool()
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


_POOL_STARTED = False
_POOL_LOCK = threading.Lock()  # not THREADS_LOCK: callers may hold that while they ask threads()


def _start_pool() -> None:
    """Start numba's thread pool, keeping torch's thread count: numba's OpenMP layer shares
    libgomp with torch, and starting its pool after torch has run an op resets torch's count to
    numba's pool size (a ``torch.set_num_threads(1)`` read 2 after the first sparse call on the
    2-core VM, and torch's own ops then ran on 2 threads)."""
    global _POOL_STARTED
    with _POOL_LOCK:
        if not _POOL_STARTED:
            count = torch.get_num_threads()
            numba.get_num_threads()  # starts the pool
            if torch.get_num_threads() != count:
                torch.set_num_threads(count)
            _POOL_STARTED = True


def njit_cached(**options):
    """``numba.njit(**options)`` with its compiled code cached on disk where numba finds a
    writable place (``__pycache__`` beside the module, else the user's cache folder), without
    where it finds none: a parallel kernel takes seconds to compile, once per process otherwise
    (a LeNet round that trains one layer sparse would spend more on compiling than it saves)."""
    def decorate(fn):
        if not fn.__module__.startswith("sparse_lth."):
            # Imported under another name (``pytest --doctest-modules kernels/x.py`` imports
            # ``kernels.x``): the cache files are shared by path, and an entry compiled here would
            # name a module the package cannot import when it loads the entry.
            return numba.njit(cache=False, **options)(fn)
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(cache=False, **options)(fn)
    return decorate


#: A wider register block (8 zmm of fp32) for the direct conv's long runs: per stored weight one
#: broadcast and loop step serve twice the outputs (where it pays: ``cpu_conv._WIDE_SPAN``).
WIDE_BLOCK = 128


def _stack_block(size: int):
    """An intrinsic giving a ``size``-element array on the stack of the caller's dtype."""
    @intrinsic
    def block(typingctx, dtype):
        def codegen(context, builder, signature, args):
            return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=size)
        return types.CPointer(dtype.dtype)(dtype), codegen
    return block


#: ``register_block(dtype)``: a ``BLOCK``-element array on the stack (a pointer; wrap it with
#: ``numba.carray``). Read and written only at constant indices in fully unrolled loops, LLVM
#: keeps it in vector registers: the register blocking of Park et al. (4 zmm of fp32 outputs
#: held across a row's weights). ``register_block_wide``: the same with ``WIDE_BLOCK`` elements.
register_block = _stack_block(BLOCK)
register_block_wide = _stack_block(WIDE_BLOCK)


#: Stored entries ahead whose dense row :func:`prefetch` asks for. Measured on the 2-core VM of
#: bench/RESULTS.md (4096 x 4096, batch 64, fp32, caches cold as in a training step): the forward
#: 0.84-0.87x the time without at 10 %, 0.86-0.90x at 5 %, 0.96x at 2 %; 10-13 and 20-32 ahead
#: did less, 64 ahead made it slower.
PREFETCH_AHEAD = 16


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring the cache line holding ``array[index]`` into L1 (LLVM's
    ``llvm.prefetch``: a read, kept in all levels): the sparse products read a dense row picked
    by a column index, which the hardware prefetchers cannot guess, from a panel larger than L2."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]])
        i32 = ir.IntType(32)
        pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())  # "p0i8" typed, "p0" opaque
        signature_ir = ir.FunctionType(ir.VoidType(), [pointer.type, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, signature_ir, "llvm.prefetch." + pointer.type.intrinsic_name)
        builder.call(fn, [pointer, i32(0), i32(3), i32(1)])  # read, locality 3, data cache
        return context.get_dummy_value()
    return types.void(array, types.uint64), codegen


@numba.njit(inline="always")
def prefetch_row(panel, at):
    """Prefetch the first two cache lines of the dense row starting at ``panel[at]`` (the
    other two of a 64-float row measured no gain: the hardware's adjacent-line prefetch)."""
    prefetch(panel, at)
    prefetch(panel, at + np.uint64(64 // panel.itemsize))


def aligned_empty(size: int, dtype) -> np.ndarray:
    """An empty 1-D array of ``size`` elements starting on a 64-byte line (numpy aligns to 16):
    on a misaligned panel every 64-byte vector load spans two lines (a sparse product measured
    1.15-1.4x slower)."""
    item = np.dtype(dtype).itemsize
    raw = np.empty(size + 64 // item, dtype=dtype)
    skip = (-raw.ctypes.data % 64) // item
    return raw[skip:skip + size]


def is_kept(size: int, dtype) -> bool:
    """Whether :func:`kept_empty` keeps an array of this many elements."""
    return size * np.dtype(dtype).itemsize <= SCRATCH_BYTES


def kept_empty(key: tuple, size: int, dtype) -> np.ndarray:
    """A 64-byte aligned work array of ``size`` elements, the same memory on every call with this
    ``key`` and dtype up to SCRATCH_BYTES (a fresh one above). Callers hold THREADS_LOCK and are
    done with the array before they release it. Why keep them: on the 2-core VM of
    bench/RESULTS.md a freshly mapped 1 MB array costs ~1 ms of page faults when first written,
    as much as a sparse product at 2 % density, and glibc maps large arrays afresh or not
    depending on the process's history (a 1x1 conv at batch 16 measured 0.6x or 1.7x dense)."""
    if not is_kept(size, dtype):
        return aligned_empty(size, dtype)
    kept = _KEPT.get((key, np.dtype(dtype)))
    if kept is None or kept.size < size:
        kept = _KEPT[(key, np.dtype(dtype))] = aligned_empty(size, dtype)
    return kept[:size]
