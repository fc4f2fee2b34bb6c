"""BSR x dense for decode-sized N (1 to 16) on the GPU (Triton): work split by stored blocks.

The row kernel (bsr.py) launches one program per block row: a decode shape such as 8192 x 8192
with 64-blocks has 128 block rows, fewer programs than an H100 has SMs, and each program reads
one row's blocks one after another. Here the stored blocks themselves are split: program ``i``
takes the equal range ``[i * chunk, (i + 1) * chunk)`` of block indices (the order of
``col_indices`` / ``values``), so every program reads the same number of bytes however the
nonzeros fall over the rows, and the grid is a few programs per SM.

- **Finding the first row.** A program counts the block rows that start before its range with a
  k-ary search over ``crow_indices`` inside the kernel: ``SEARCH`` (512) entries per step, so
  one dependent load for up to 512 block rows, two up to 262,144. A row-id array per block would
  cost one load, but building it is two or three extra kernel launches per call (or a cache tied
  to the tensor); the search costs one or two L2 round trips and no launch. The program then
  walks forward row by row (each row's end is prefetched one row ahead).
- **Combining split rows, one launch.** A row wholly inside one program's range is stored
  directly (rows without blocks too: each is owned by the program whose range holds its start,
  so it comes out 0). A row cut by range boundaries has 2+ contributors: each stores its fp32
  partial [BR, N] in its own slot (a program has a head slot, for the row it continues, and a
  tail slot, for the row it leaves unfinished) and bumps the row's arrival counter; the last to
  arrive sums the slots in program order, casts, stores the row, and puts the counter back to 0.
  So there is no memset before and no cast kernel after: one launch, no host synchronization.
  The counters (int32, one per block row) live in a zeroed buffer kept per device and stream,
  which every launch leaves zeroed; the slots need no zeroing (each is written before it is
  read) and come from torch's caching allocator.
- **Determinism.** The only atomic is the counter; partial sums are added in a fixed order
  (program order, each in fp32), so a call's result is bitwise reproducible for a given matrix,
  N and grid. It is not bitwise equal to bsr.py's result (which sums a row's blocks in one
  sequence): the split points change the summation order, and they move with the config and the
  SM count, so two GPU models (or two autotuned configs) may differ in the last bits, within the
  dtype's rounding.
- **The body is a register GEMV, no tl.dot** (N is 1 to 16; tl.dot would pad it to 16). Each
  step loads ``U`` blocks of the row at once as ``[VEC, U, BR, BC / VEC]``, ``VEC`` elements =
  16 bytes contiguous (one ``ld.global.v4`` per thread and vector), and the X slices under
  them. Products are summed in fp32 over ``VEC`` only (inside a thread); the accumulator
  ``[N, U, BR, BC / VEC]`` keeps the other axes, so no step needs a cross-thread reduction:
  one is done per row, at its end. ``U * BR * BC`` of 1-8 K elements keeps 2-16 KB of values
  in flight per program, several programs per SM.

Reached through ``triton_bsr_matmul`` / ``triton_bsr_linear`` (bsr.py), which check the
operands and send N <= 16 here (:func:`launch_bsr_decode`). Layouts as there: X [K, N]
row-major, or a linear layer's x [N, K] row-major read as X^T, with y written as [N, M]. Blocks:
BR, BC powers of two from 16 to 128, square or not; values fp32 / fp16 / bf16, accumulated in
fp32; indices int32 or int64.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import TunedLaunch, is_interpreting, next_pow2, on_device, rounded_as_on_gpu

__all__ = ["DECODE_MAX_N", "launch_bsr_decode"]

#: The widest N this kernel takes; the row kernel's tl.dot tiles serve wider ones.
DECODE_MAX_N = 16


@triton.jit
def _rows_before(crow_ptr, R, p, SEARCH: tl.constexpr):
    """How many of the R block rows start before block index p: #{r < R : crow[r] < p}.

    crow never decreases, so each step samples SEARCH evenly spaced entries of the unknown
    range and keeps the gap after the last sample below p; one step when R <= SEARCH."""
    offs = tl.arange(0, SEARCH)
    lo = R * 0  # every row before lo starts before p; from lo + span on, none does
    span = R
    while span > 0:
        step = (span + SEARCH - 1) // SEARCH
        inside = offs * step < span
        starts = tl.load(crow_ptr + lo + offs * step, mask=inside, other=0)
        below = tl.sum((inside & (starts < p)).to(tl.int32), axis=0)
        new_lo = tl.where(below > 0, lo + (below - 1) * step + 1, lo)
        span = tl.where(below > 0, tl.minimum(step - 1, lo + span - new_lo), 0)
        lo = new_lo
    return lo


@triton.jit
def _bsr_decode_kernel(
    crow_ptr, col_ptr, val_ptr, x_ptr, y_ptr,
    part_ptr,  # fp32 [2 * programs, NP, BR]: each program's head and tail partial rows
    count_ptr,  # int32 [R], zero on entry and on exit: arrivals at each split row
    R,  # block rows (M / BR)
    N, NNZB,
    N_SM,  # programs = about PPS per SM
    stride_x,  # X[k, n] is at k * stride_x + n, or at n * stride_x + k when X_T
    stride_y,  # Y[m, n] is at m * stride_y + n, or at n * stride_y + m when Y_T
    NNZB_BUCKET,  # autotune key only (next power of two of NNZB)
    BR: tl.constexpr, BC: tl.constexpr,
    NP: tl.constexpr,  # N rounded up to a power of two
    VEC: tl.constexpr,  # elements per 16-byte vector load of the values
    X_T: tl.constexpr, Y_T: tl.constexpr,
    SEARCH: tl.constexpr,
    PPS: tl.constexpr,  # programs per SM
    U: tl.constexpr,  # blocks per step
):
    BCL: tl.constexpr = BC // VEC
    pid = tl.program_id(0)
    is_last = pid == tl.num_programs(0) - 1
    chunk = tl.maximum(tl.cdiv(NNZB, N_SM * PPS), 1)  # the launcher's grid uses the same
    p0 = pid.to(tl.int64) * chunk
    p1 = tl.minimum(p0 + chunk, NNZB)

    # The first row: the one holding p0 if it began earlier (our "head" row), else the first
    # to start at p0 or later. Three independent loads, one round trip.
    r0 = _rows_before(crow_ptr, R, p0, SEARCH)
    before = tl.load(crow_ptr + tl.maximum(r0 - 1, 0))
    at = tl.load(crow_ptr + r0)
    after = tl.load(crow_ptr + tl.minimum(r0 + 1, R))
    head = at > p0
    r = tl.where(head, r0 - 1, r0)
    row_start = tl.where(head, before, at)
    row_end = tl.where(head, at, after)

    # Layout by dimension order: Triton spreads threads over a tensor's last dimensions first,
    # so the per-step tensors put the block's rows (BR) and lanes (BCL, one 16-byte vector
    # each) last, across threads, and N, VEC and U first, inside each thread: the sum over
    # VEC is then a chain of FMAs in one thread, and acc needs no cross-thread traffic.
    offs_u = tl.arange(0, U)
    offs_r = tl.arange(0, BR)
    offs_l = tl.arange(0, BCL)
    offs_v = tl.arange(0, VEC)
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)  # n * stride can pass 2**31 on large problems
    # one block as [VEC, 1, BR, BCL]: element (v, r, l) is the block's row r, column l*VEC + v
    blk_offs = (offs_v[:, None, None, None] + offs_r[None, None, :, None] * BC
                + offs_l[None, None, None, :] * VEC)
    col_in_blk = offs_v[:, None, None] + offs_l[None, None, :] * VEC  # [VEC, 1, BCL]
    part_offs = offs_n[:, None] * BR + offs_r[None, :]  # one [NP, BR] slot

    # Rows that start in [p0, p1) are ours; the last program also takes the empty rows
    # that start at NNZB.
    while (r < R) & ((row_start < p1) | is_last):
        next_end = tl.load(crow_ptr + tl.minimum(r + 2, R))  # in flight during the row
        lo = tl.maximum(row_start, p0)
        hi = tl.minimum(row_end, p1)
        acc = tl.zeros((NP, U, BR, BCL), dtype=tl.float32)
        # Block columns run one step ahead: a step's X slices depend on them, so loaded a step
        # early they let the step's values, X slices and next columns travel together (one
        # round trip a step, not two: the H200 found these calls latency-bound).
        ahead = tl.load(col_ptr + lo + offs_u, mask=lo + offs_u < hi, other=0)
        for q in range(lo, hi, U):
            blk = q + offs_u
            in_row = blk < hi
            bcol = ahead.to(tl.int64)
            ahead = tl.load(col_ptr + blk + U, mask=blk + U < hi, other=0)
            w = tl.load(val_ptr + blk.to(tl.int64)[None, :, None, None] * (BR * BC) + blk_offs,
                        mask=in_row[None, :, None, None], other=0.0).to(tl.float32)
            k = bcol[None, :, None] * BC + col_in_blk  # [VEC, U, BCL]; K = whole blocks
            if X_T:
                x_ptrs = x_ptr + offs_n64[:, None, None, None] * stride_x + k[None]
            else:
                x_ptrs = x_ptr + k[None] * stride_x + offs_n64[:, None, None, None]
            xs = tl.load(x_ptrs, mask=mask_n[:, None, None, None] & in_row[None, None, :, None],
                         other=0.0).to(tl.float32)  # [NP, VEC, U, BCL]
            acc += tl.sum(w[None] * xs[:, :, :, None, :], axis=1)
        part = tl.sum(tl.sum(acc, axis=3), axis=1)  # [NP, BR], the one cross-thread sum

        rows = r.to(tl.int64) * BR + offs_r
        if Y_T:
            y_ptrs = y_ptr + offs_n64[:, None] * stride_y + rows[None, :]
        else:
            y_ptrs = y_ptr + rows[None, :] * stride_y + offs_n64[:, None]
        if (row_start >= p0) & (row_end <= p1):  # all of the row is ours
            tl.store(y_ptrs, part.to(y_ptr.dtype.element_ty), mask=mask_n[:, None])
        else:
            slot = 2 * pid + (row_start < p0).to(tl.int32)  # tail slot 2 * pid, head 2 * pid + 1
            tl.store(part_ptr + slot * (BR * NP) + part_offs, part)
            # Every thread's slot store happens before the counter's release (and the last
            # arriver's loads after its acquire): the CUTLASS semaphore pattern.
            tl.debug_barrier()
            first = row_start // chunk
            final = (row_end - 1) // chunk
            arrived = tl.atomic_add(count_ptr + r, 1, sem="acq_rel", scope="gpu")
            if arrived == final - first:  # the others are done: sum the slots in order
                # the first program left this row unfinished (its tail slot); the others
                # continued it (their head slots)
                # (slot offsets fit int32: 2 * programs * BR * NP is a few million at most)
                total = tl.load(part_ptr + 2 * first * (BR * NP) + part_offs,
                                cache_modifier=".cg")
                for c in range(first + 1, final + 1):
                    total += tl.load(part_ptr + (2 * c + 1) * (BR * NP) + part_offs,
                                     cache_modifier=".cg")
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask_n[:, None])
                tl.store(count_ptr + r, 0)  # zero again for the next launch on this stream
        r += 1
        row_start = row_end
        row_end = next_end


def _cfg(pps: int, tile: int, warps: int) -> triton.Config:
    # TILE (values per step) becomes U = TILE / (BR * BC) blocks in _prune_decode
    return triton.Config({"PPS": pps, "TILE": tile}, num_warps=warps, num_stages=1)


# Few programs per SM with many values per step, or more programs with fewer: both keep
# 16-64 KB of an SM's loads in flight. num_stages=1: the step loop is short (a row's blocks
# in the range) and its loads are registers, not a software pipeline through shared memory.
# The first two (1-2 programs per SM, up to 8 blocks of 64 x 64 a step at N = 1) came after
# the H200 run: there the tuner took 8 programs per SM of ~2 blocks each, and the calls were
# latency-bound (11-30 % of copy bandwidth); longer programs with more loads a step pay each
# program's fixed chain of round trips (row search, join) once over more bytes.
DECODE_CONFIGS: list[triton.Config] = [
    _cfg(1, 32768, 8), _cfg(2, 16384, 8),
    _cfg(2, 8192, 8), _cfg(4, 4096, 4), _cfg(4, 8192, 8),
    _cfg(8, 2048, 4), _cfg(8, 4096, 4),
]

#: Accumulator registers (fp32) per thread a config may take: acc holds TILE / VEC * NP values.
ACC_REGS = 64
#: Registers per thread a step's values may take (U blocks of 16-bit or fp32 values over the
#: threads): fp32 steps of 8 K values on 8 warps spilled 8-135 words on triton 3.6 (sm_90).
VALUE_REGS = 64
#: Largest X tile per step, U * BC * NP elements: each thread keeps VEC * NP of X per block
#: lane it covers, so with short blocks (BR = 16) and wide N, more blocks per step spilled
#: (seen compiling 16 x 16, U = 16 and 16 x 128, U = 2 at N = 16 for sm_80 / sm_90).
X_TILE = 1024
#: (NP, element bytes, warps) that spill registers to local memory on triton 3.9 (not on 3.6),
#: seen in every config of that kind compiled for sm_90 (tests/test_kernel_compile.py).
SPILLING = {(16, 2, 8), (4, 4, 4)}


def decode_configs(configs: list[triton.Config], np_: int, br: int, bc: int, elem_bytes: int
                   ) -> list[triton.Config]:
    """The configs for N padded to ``np_`` and [br, bc] blocks, as launch constants: ``TILE``
    turned into ``U`` blocks per step (at least one, and at most ``X_TILE / (BC * NP)``),
    dropping those whose accumulator would pass ``ACC_REGS`` registers per thread (the fp32
    ``[NP, U, BR, BC / VEC]`` per step) or whose step's values would pass ``VALUE_REGS``, and
    duplicates. Never empty: the smallest tile is
    kept if nothing fits."""
    vec = 16 // elem_bytes
    kept, seen = [], set()
    for c in configs:
        u = max(1, min(c.kwargs["TILE"] // (br * bc), X_TILE // (bc * np_)))
        regs = u * br * bc // vec * np_ // (32 * c.num_warps)
        value_regs = u * br * bc * elem_bytes // 4 // (32 * c.num_warps)
        key = (c.kwargs["PPS"], u, c.num_warps)
        spills = (np_, elem_bytes, c.num_warps) in SPILLING
        if regs <= ACC_REGS and value_regs <= VALUE_REGS and key not in seen and not spills:
            seen.add(key)
            kept.append(triton.Config({"PPS": c.kwargs["PPS"], "U": u},
                                      num_warps=c.num_warps, num_stages=c.num_stages))
    if not kept:  # e.g. 128 x 128 fp32 blocks at N = 16: one block per step, most warps
        c = max(configs, key=lambda c: (c.num_warps, -c.kwargs["TILE"]))
        kept.append(triton.Config({"PPS": c.kwargs["PPS"], "U": 1}, num_warps=c.num_warps,
                                  num_stages=c.num_stages))
    return kept


def _prune_decode(configs: list[triton.Config], named_args: dict, **kwargs
                  ) -> list[triton.Config]:
    kept = decode_configs(configs, kwargs["NP"], kwargs["BR"], kwargs["BC"],
                          16 // kwargs["VEC"])
    return kept[:1] if is_interpreting() else kept  # the interpreter cannot time configs


decode_kernel = triton.autotune(
    configs=DECODE_CONFIGS,
    key=["R", "N_SM", "NNZB_BUCKET", "BR", "BC", "NP", "VEC", "X_T", "Y_T"],
    prune_configs_by={"early_config_prune": _prune_decode},
)(_bsr_decode_kernel)

tuned_decode = TunedLaunch(decode_kernel)

#: Programs' worth of SMs under the interpreter: a small, odd grid, so tests split rows.
INTERPRETER_SMS = 3

SEARCH = 512


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs to size the grid by: the device's, or ``INTERPRETER_SMS`` on the CPU interpreter."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def programs(nnzb: int, n_sm: int, pps: int) -> int:
    """The grid: ``chunk = ceil(nnzb / (n_sm * pps))`` blocks each (the kernel computes the
    same), as many programs as it takes to cover nnzb, and one for an empty matrix (its rows
    still need zeros)."""
    chunk = max(triton.cdiv(nnzb, n_sm * pps), 1)
    return max(triton.cdiv(nnzb, chunk), 1)


# Arrival counters per (device, stream): launches on one stream run one after another, and
# each leaves its counters at zero, so the next can use them without a memset. Two streams
# get two buffers, so concurrent launches never share a counter.
_counters: dict[tuple, torch.Tensor] = {}


def _counters_for(device: torch.device, rows: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _counters.get(key)
    if buf is None or buf.numel() < rows:
        buf = torch.zeros(max(rows, 1024), dtype=torch.int32, device=device)
        _counters[key] = buf
    return buf


def launch_bsr_decode(W: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, *, N: int, x_t: bool,
            stride_x: int, y_t: bool, stride_y: int, config: dict | None = None,
            n_sm: int | None = None) -> None:
    """Launch over an already checked problem: autotuned, or with ``config`` (PPS, U,
    num_warps) one config; ``n_sm`` overrides the SM count the grid is sized by (tests use both
    to split rows in many ways)."""
    if rounded_as_on_gpu(Y, lambda wide: launch_bsr_decode(
            W, X, wide, N=N, x_t=x_t, stride_x=stride_x, y_t=y_t, stride_y=stride_y,
            config=config, n_sm=n_sm)):
        return
    M, K = W.shape
    crow, col, val = W.crow_indices(), W.col_indices(), W.values()
    nnzb, br, bc = val.shape
    rows = M // br
    np_ = next_pow2(N)
    n_sm = n_sm or sm_count(X.device)
    top = config["PPS"] if config else max(c.kwargs["PPS"] for c in DECODE_CONFIGS)
    parts = torch.empty((2 * programs(nnzb, n_sm, top), br, np_), dtype=torch.float32,
                        device=X.device)
    counts = _counters_for(X.device, rows)
    args = (crow, col, val, X, Y, parts, counts, rows, N, nnzb, n_sm, stride_x, stride_y,
            next_pow2(nnzb))
    constants = dict(BR=br, BC=bc, NP=np_, VEC=16 // val.element_size(), X_T=x_t, Y_T=y_t,
                     SEARCH=SEARCH)
    grid = lambda meta: (programs(nnzb, n_sm, meta["PPS"]),)  # noqa: E731
    with on_device(X):
        if config is not None:
            _bsr_decode_kernel[grid](*args, **constants, **config)
        else:
            key = (rows, n_sm, args[-1], br, bc, np_, x_t, y_t, crow.dtype, col.dtype,
                   val.dtype, X.device)
            tuned_decode(key, grid, args, constants)
