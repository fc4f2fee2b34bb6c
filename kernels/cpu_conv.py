"""CPU sparse Conv2d: direct sparse convolution, compiled with numba.

``cpu_sparse_conv2d(x, crow, col, values, bias, kernel_size, stride, padding, dilation)`` computes
``F.conv2d(x, W, bias, stride, padding, dilation)`` (groups 1, zeros padding) for a weight ``W``
[out, in, kh, kw] stored as CSR over its ``[out, in * kh * kw]`` view, the layout
``W.reshape(out, -1).to_sparse_csr()`` gives. Work and weight bytes scale with the stored values.

How it runs (Park et al., ICLR 2017, "Faster CNNs with direct sparse convolutions"):

- Each stored weight ``W[o, c, ky, kx]`` adds one shifted copy of input plane ``c``, scaled, into
  output plane ``o``; there is no im2col of the input. The input is packed: padded, split
  into its ``stride x stride`` phases (so a strided tap is a plain shift inside one phase), and
  laid out ``[in, phase, rows, cols, batch]``. In that layout every output row of every image is
  in one contiguous run, and every stored weight is one offset into the packed input: the inner
  loop is ``acc[j] += w * packed[offset + j]``, which LLVM vectorizes. The few columns past each
  output row that only shifts read (``(cols - out_w) / cols`` of the work) are computed and
  dropped. The batch innermost keeps that waste what it is for one image (with images stacked
  by rows, a 7x7 map would also waste the rows between images: 81 / 49 positions, not 63 / 49).
  The kernel writes each block's outputs straight into [N, out, H, W] (no transpose after; it
  was 10-30% of a batch-16 call at 98% sparsity), and the pack reads each image's rows in order
  (reading one pixel of every image in turn ran 2.3x slower where the images lie a multiple of
  4 KiB apart, 256 channels of 14x14: their lines fight over the same L1 sets).
- A 1x1 conv (stride 1, no padding) is the same loop with zero shifts: CSR [out, in] times
  X [in, pixels] (Elsen et al., CVPR 2020), nothing dropped. For one image of at least one
  register block of pixels that is x's own layout, so the kernel reads x in place (no pack; its
  short last block starts a whole block back from its end instead of reading past it).
- A strided 1x1 conv without padding reads only ``x[:, :, ::sh, ::sw]``: it runs as a stride-1
  conv on that.
- Each thread packs its own slice of the batch into its own buffer and computes that slice's
  outputs: min(threads, N) slices, and at batch 1 every thread packs the one image and takes a
  share of its output channels. No thread reads what another wrote: with one packed input
  shared by both cores of the 2-core VM, half of it moved from the other core's cache on every
  call (and back when the next pack rewrote it), 1.0-1.5x slower depending on the VM's phase
  (bench/RESULTS.md, "Each thread packs its own slice").
- Register blocking: 64 consecutive outputs (4 zmm of fp32; 128 in 8 zmm on longer runs, see
  ``_WIDE_SPAN``) stay in registers while the loop runs over all of one output channel's
  stored weights; per weight that is 4 (8) vector loads and multiply-adds, no accumulator
  traffic. (Blocking across output channels, as dense direct conv does, has little to reuse
  here: with unstructured sparsity two output channels rarely share an input tap.) Blocks are
  grouped in tiles whose input slab (all channels) stays in L2; a thread takes its share of
  its slice's (tile, output-channel group) items, tile-major.
- Loops index with unsigned integers: numba's negative-index wraparound on signed indices
  defeats vectorization (measured: 1 vs 17 GFMA/s on one core).

Threads follow ``torch.get_num_threads()`` (capped by numba's pool, whose start leaves torch's
count as it was: ``_numba.threads``). fp32 and fp64 are computed
natively; other floating dtypes in fp32 and cast back. The sums run in the stored order with
each multiply-add fused (``fastmath={"contract"}``, no reassociation: 1.01-1.08x over separate
multiplies and adds); results match F.conv2d to rounding, not bitwise.

Everything but the arithmetic (geometry, tiling, where each stored weight reads) is worked out
once per input signature by :func:`prepare_cpu_sparse_conv2d`; :class:`~sparse_lth.nn.SparseConv2d`
keeps the launch, so its batch-1 call costs the kernel plus ~10 us of Python.

numba compiles each kernel on its first call per dtype (a few seconds), then keeps it on disk
where it can (``_numba.njit_cached``): :func:`warm_up` does it ahead of time.

This module imports torch, numpy and numba only (the register block and thread lock from ``_numba``).
"""

from __future__ import annotations

import sys
import warnings

import numba
import numpy as np
import torch
from numba import prange

from ._numba import BLOCK as _BLOCK
from ._numba import THREADS_LOCK as _THREADS_LOCK
from ._numba import WIDE_BLOCK as _WIDE
from ._numba import aligned_empty, kept_empty, njit_cached
from ._numba import register_block as _register_block
from ._numba import register_block_wide as _register_block_wide
from ._numba import threads as _threads
from .invariants import check_index_invariants

__all__ = ["cpu_sparse_conv2d", "kept_launch", "prepare_cpu_sparse_conv2d", "CpuConvLaunch", "conv2d_taps",
           "conv2d_geometry", "warm_up"]

_NATIVE = {torch.float32: np.float32, torch.float64: np.float64}
#: Bytes of input one tile reads across all channels: a tile's slab stays in a core's L2
#: (512 KiB to 2 MiB on current x86) while its output channels take turns reading it.
_SLAB_BYTES = 256 * 1024
#: The longest accumulator tile (elements): 16 KiB of fp32, half of a typical L1D.
_MAX_TILE = 4096
#: Items (tile x channel group) per thread: a few, so uneven rows even out under static scheduling.
_ITEMS_PER_THREAD = 8
#: Prepared launches kept per cache (one per input signature: shape, dtype, threads).
_KEPT_LAUNCHES = 8
#: Runs of at least this many positions use the wide register block (``WIDE_BLOCK`` outputs):
#: measured 1.06-1.10x at batch 16 and 64 on 28x28 and 14x14 maps, 0.95-1.06x on one 28x28
#: image (838). Shorter runs of at least one wide block use it where its blocks cover no more
#: positions than 64-blocks would (:func:`_wide`): 1.09-1.10x on one 14x14 image (222
#: positions), 1.10-1.16x on a thread's 8 images of 7x7 (488); 0.66x on one 7x7 image (61).
_WIDE_SPAN = 900


# -- the kernels ---------------------------------------------------------------------------------
@njit_cached(fastmath=False)
def _pack(x, packed, first, per, inner, pad_top, pad_left, sh, sw, hph, wph):
    """One thread's slice of the input, images ``first`` to ``first + per - 1`` of x [N, C, H, W]
    (those past N zeros): packed[(c * sh * sw + py * sw + px) * S + ((g * hph + r) * wph + q) * M + m]
    = x_padded[first + g * M + m, c, r * sh + py, q * sw + px], zeros outside x, with M = ``inner``
    images innermost (1 or ``per``) and S = per * hph * wph. The tail past the planes is zeroed
    too: the last tile reads into it."""
    n_, c_, h, w = x.shape
    phases = sh * sw
    outer = per // inner
    s = per * hph * wph
    flat = x.reshape(-1)  # x is C-contiguous (the caller's .contiguous())
    image = np.uint64(c_ * h * w)
    m_ = np.uint64(inner)
    for c in range(c_):
        for p in range(phases):
            py = p // sw
            px = p - py * sw
            # columns q whose source ix = q * sw + px - pad_left lies inside the row: [q0, q1)
            q0 = min(wph, max(0, (pad_left - px + sw - 1) // sw))
            q1 = max(q0, min(wph, (w - 1 + pad_left - px) // sw + 1))
            ix0 = q0 * sw + px - pad_left
            for g in range(outer):
                for r in range(hph):
                    iy = r * sh + py - pad_top
                    d = np.uint64((c * phases + p) * s + (g * hph + r) * wph * inner)
                    if iy < 0 or iy >= h:
                        for q in range(np.uint64(wph * inner)):
                            packed[d + q] = 0
                        continue
                    for q in range(np.uint64(q0 * inner)):
                        packed[d + q] = 0
                    kept = max(0, min(inner, n_ - first - g * inner))  # images past N: zeros
                    for m in range(inner):
                        dm = d + np.uint64(q0) * m_ + np.uint64(m)
                        if m >= kept:
                            for q in range(np.uint64(q1 - q0)):
                                packed[dm + q * m_] = 0
                            continue
                        # each image's row read in order (written every M-th where M > 1)
                        src = np.uint64(first + g * inner + m) * image + np.uint64((c * h + iy) * w + ix0)
                        for q in range(np.uint64(q1 - q0)):
                            packed[dm + q * m_] = flat[src + q * np.uint64(sw)]
                    for q in range(np.uint64(q1 * inner), np.uint64(wph * inner)):
                        packed[d + q] = 0
    for i in range(c_ * phases * s, packed.shape[0]):
        packed[i] = 0


@njit_cached(fastmath=False)
def _pack_plain(x, packed, first, per, pad_top, pad_left, hph, wph):
    """What ``_pack`` computes for stride 1 and the images stacked by rows (``inner`` 1): each
    plane zeroed whole, then the image's rows copied in. 3-4x faster than ``_pack``'s row-by-row
    clipping on small maps (256 planes of 14x14: 10 against 38 us), where a batch-1 conv at 98%
    sparsity spends as long packing as multiplying."""
    n_, c_, h, w = x.shape
    plane = hph * wph
    s = per * plane
    rows = max(0, min(h, hph - pad_top))
    cols = np.uint64(max(0, min(w, wph - pad_left)))
    for c in range(c_):
        for g in range(per):
            d0 = np.uint64(c * s + g * plane)
            for i in range(np.uint64(plane)):
                packed[d0 + i] = 0
            if first + g >= n_:
                continue
            for iy in range(rows):
                d = d0 + np.uint64((iy + pad_top) * wph + pad_left)
                for q in range(cols):
                    packed[d + q] = x[first + g, c, iy, q]
    for i in range(c_ * s, packed.shape[0]):
        packed[i] = 0


@njit_cached(parallel=True, fastmath=False)
def _offsets(taps, s, wph, inner, out):
    """Where each stored weight reads in a packed slice: plane * S + (row shift * wph + col shift) * M."""
    for k in prange(taps.shape[0]):
        out[k] = np.uint64(taps[k, 0]) * np.uint64(s) + np.uint64((taps[k, 1] * wph + taps[k, 2]) * inner)


@numba.njit(inline="always")
def _block_sum(acc, stage, width, b, packed, offs, vals, lo, hi, s0):
    """stage[q] = b + sum over k in [lo, hi) of vals[k] * packed[offs[k] + s0 + q], q < width,
    summed in ``acc`` (a register block of ``width``, a constant at each inlined call)."""
    for q in range(width):
        acc[q] = b
    for k in range(lo, hi):
        w = vals[k]
        base = offs[k] + np.uint64(s0)
        for q in range(width):
            acc[q] += w * packed[base + np.uint64(q)]
    for q in range(width):
        stage[q] = acc[q]


@njit_cached(fastmath={"contract"})
def _direct(packed, crow, offs, vals, bias, out, first, hph, wph, inner, span, tile, group, clip, wide, i0, i1):
    """Items ``i0`` to ``i1 - 1`` of one slice (what one thread computes):
    out[first + g * M + m, o, y, x] = bias[o] + sum over o's stored weights k of
    vals[k] * packed[offs[k] + j], j = ((g * hph + y) * wph + x) * M + m (M = ``inner`` images
    innermost, groups of them stacked by rows; images past N are computed, not kept) for j below
    ``span``; items are (tile of j, group of output channels), tile-major, blocks of ``_WIDE`` positions
    where ``wide`` else ``_BLOCK`` (``tile`` a multiple). ``clip``: ``packed`` has no zero tail
    (it is the input itself, at least one block long), so a short last block reads the whole
    block that ends where it ends."""
    n_, o_, ho, wo = out.shape
    row = wo * inner  # the kept part of a packed row
    row_in = wph * inner
    flat = out.reshape(-1)
    image_size = np.uint64(o_ * ho * wo)
    ngroups = (o_ + group - 1) // group
    step = _WIDE if wide else _BLOCK
    acc = numba.carray(_register_block(vals.dtype), _BLOCK)
    acc_wide = numba.carray(_register_block_wide(vals.dtype), _WIDE)
    stage = np.empty(_WIDE, dtype=out.dtype)  # acc's values, read back at computed indices
    for item in range(i0, i1):
        t = item // ngroups  # tile-major: consecutive items reuse one slab
        g = item - t * ngroups
        j0 = t * tile
        j1 = min(j0 + tile, span)
        for o in range(g * group, min(o_, (g + 1) * group)):
            b = bias[o]
            lo, hi = crow[o], crow[o + 1]
            for p0 in range(j0, j1, step):
                p1 = min(p0 + step, j1)
                # where the registers start: at p0, or for a short last block without a zero tail
                # to read (``clip``) a whole block back from p1 (a few positions computed twice)
                s0 = p1 - step if clip and p1 - p0 < step else p0
                if wide:
                    _block_sum(acc_wide, stage, _WIDE, b, packed, offs, vals, lo, hi, s0)
                else:
                    _block_sum(acc, stage, _BLOCK, b, packed, offs, vals, lo, hi, s0)
                # keep the output part of each packed row this block touches
                for r in range(p0 // row_in, (p1 - 1) // row_in + 1):
                    image = r // hph  # the group of M images
                    y = r - image * hph
                    kept = min(inner, n_ - first - image * inner)  # images past N: not kept
                    if y >= ho or kept <= 0:
                        continue
                    first_x = max(0, p0 - r * row_in)
                    last_x = min(row, p1 - r * row_in)
                    shift = np.uint64(r * row_in - s0)
                    if inner == 1:
                        for x in range(np.uint64(first_x), np.uint64(last_x)):
                            out[first + image, o, y, x] = stage[shift + x]
                        continue
                    # the batch innermost: position x of the row is pixel x // M of image x % M
                    m_ = np.uint64(inner)
                    at = np.uint64((((first + image * inner) * o_ + o) * ho + y) * wo)
                    ufirst, ulast = np.uint64(first_x), np.uint64(last_x)
                    for m in range(np.uint64(kept)):
                        # pixels px with first_x <= px * M + m < last_x
                        px0 = (ufirst + m_ - np.uint64(1) - m) // m_ if ufirst > m else np.uint64(0)
                        px1 = (ulast + m_ - np.uint64(1) - m) // m_ if ulast > m else np.uint64(0)
                        dst = at + m * image_size
                        src = shift + m
                        for px in range(px0, px1):
                            flat[dst + px] = stage[src + px * m_]


@njit_cached(parallel=True, fastmath={"contract"})
def _conv(x, packed, crow, offs, vals, bias, out, pad_top, pad_left, sh, sw, hph, wph, inner, per, span, tile,
          group, wide, mode, slices, threads):
    """The whole conv, each thread on its own slice of the batch: thread t packs slice
    ``t % slices`` (``per`` images, ``inner`` of them innermost) into its own row ``packed[t]``
    and computes its share of that slice's items (``span`` positions, ``CpuConvLaunch.span``);
    threads that share a slice (fewer images than threads) each pack it. Nothing one thread
    writes is read by another: a pack shared by the threads ran 1.0-1.5x slower on the 2-core
    VM, most in its slow phases (the other core's half of the packed input moved over on every
    call, and back when the next pack rewrote it).
    ``mode``: 0 reads ``x`` in place (``packed`` is its flat view, one row: a 1x1 conv of one
    image), 1 packs with ``_pack_plain``, 2 with ``_pack``."""
    o_ = out.shape[1]
    items = ((span + tile - 1) // tile) * ((o_ + group - 1) // group)
    for t in prange(threads):
        part = t % slices
        rank = t // slices  # among the threads of this slice
        sharing = threads // slices + (1 if part < threads % slices else 0)
        first = part * per
        own = packed[0] if mode == 0 else packed[t]
        if mode == 1:
            _pack_plain(x, own, first, per, pad_top, pad_left, hph, wph)
        elif mode == 2:
            _pack(x, own, first, per, inner, pad_top, pad_left, sh, sw, hph, wph)
        _direct(own, crow, offs, vals, bias, out, first, hph, wph, inner, span, tile, group, mode == 0, wide,
                rank * items // sharing, (rank + 1) * items // sharing)


# -- geometry ------------------------------------------------------------------------------------
def _pair(value, what: str, name: str = "cpu_sparse_conv2d") -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name}: {what} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def conv2d_geometry(in_hw: tuple[int, int], kernel_size, stride=1, padding=0, dilation=1, *,
                    name: str = "cpu_sparse_conv2d") -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """((top, bottom, left, right) padding, (out_h, out_w)) of a conv as ``F.conv2d`` defines it,
    ``padding`` an int, a pair, ``"valid"`` or ``"same"`` (stride 1 only, the extra pixel of an
    odd total on the bottom / right, as torch puts it). Errors are ValueErrors starting ``name``.

    >>> conv2d_geometry((7, 7), 3, stride=2, padding=1)
    ((1, 1, 1, 1), (4, 4))
    >>> conv2d_geometry((6, 6), (2, 4), padding="same")
    ((0, 1, 1, 2), (6, 6))
    """
    (kh, kw), (sh, sw), (dh, dw) = _pair(kernel_size, "kernel_size", name), _pair(stride, "stride", name), \
        _pair(dilation, "dilation", name)
    if min(kh, kw, sh, sw, dh, dw) < 1:
        raise ValueError(f"{name}: kernel_size, stride and dilation must be positive, got "
                         f"{(kh, kw)}, {(sh, sw)}, {(dh, dw)}")
    if padding == "valid":
        pads = (0, 0, 0, 0)
    elif padding == "same":
        if (sh, sw) != (1, 1):
            raise ValueError(f"{name}: padding='same' needs stride 1 (as in torch), got "
                             f"stride {(sh, sw)}")
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    elif isinstance(padding, str):
        raise ValueError(f"{name}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    else:
        ph, pw = _pair(padding, "padding", name)
        if min(ph, pw) < 0:
            raise ValueError(f"{name}: padding must be non-negative, got {(ph, pw)}")
        pads = (ph, ph, pw, pw)
    h, w = in_hw
    out_h = (h + pads[0] + pads[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + pads[2] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{name}: input {h}x{w} padded by {pads} is smaller than the dilated "
                         f"kernel {(dh * (kh - 1) + 1, dw * (kw - 1) + 1)}")
    return pads, (out_h, out_w)


def conv2d_taps(col_indices: torch.Tensor, kernel_size, stride=1, dilation=1) -> np.ndarray:
    """[nnz, 3] int64: for each stored weight (column ``c * kh * kw + ky * kw + kx`` of the CSR
    matrix) the packed plane it reads (``c * sh * sw + phase``) and its row and column shift
    inside that phase. Depends on the pattern alone, not the input: a layer computes it once
    and passes it as ``taps``.

    >>> conv2d_taps(torch.tensor([0, 4, 9]), 3).tolist()
    [[0, 0, 0], [0, 1, 1], [1, 0, 0]]
    """
    (kh, kw), (sh, sw), (dh, dw) = _pair(kernel_size, "kernel_size"), _pair(stride, "stride"), \
        _pair(dilation, "dilation")
    col = col_indices.detach().to("cpu", torch.int64)
    c, tap = col // (kh * kw), col % (kh * kw)
    ry, rx = (tap // kw) * dh, (tap % kw) * dw  # offsets in the padded input
    plane = c * (sh * sw) + (ry % sh) * sw + (rx % sw)
    return torch.stack([plane, ry // sh, rx // sw], 1).numpy()


# -- the entry point -----------------------------------------------------------------------------
def cpu_sparse_conv2d(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      values: torch.Tensor, bias: torch.Tensor | None = None, *, kernel_size, stride=1,
                      padding=0, dilation=1, taps: np.ndarray | None = None, cache: dict | None = None,
                      check_invariants: bool = True) -> torch.Tensor:
    """``F.conv2d(x, W, bias, stride, padding, dilation)`` with ``W`` [out, in, kh, kw] given as
    CSR over ``[out, in * kh * kw]`` (``crow_indices`` [out + 1], ``col_indices`` and ``values``
    [nnz]); ``x`` [N, in, H, W] on the CPU, a floating dtype matching ``values``. Returns a new
    contiguous [N, out, out_h, out_w] tensor of ``x``'s dtype.

    ``taps``: :func:`conv2d_taps` of this pattern, stride and dilation, computed here when not
    given. ``cache``: a dict the caller keeps with this weight, its taps and this geometry (stride,
    padding, dilation), where the call prepared for each input signature is kept
    (:func:`prepare_cpu_sparse_conv2d`: O(nnz) to prepare, a sizeable share of a very sparse
    call). ``check_invariants=False`` skips the index checks (for a caller that checked once;
    taps or indices that do not match then read out of bounds).

    >>> import torch, torch.nn.functional as F
    >>> w = torch.randn(4, 3, 3, 3) * (torch.rand(4, 3, 3, 3) < 0.3)
    >>> W = w.reshape(4, -1).to_sparse_csr()
    >>> x = torch.randn(2, 3, 9, 9)
    >>> y = cpu_sparse_conv2d(x, W.crow_indices(), W.col_indices(), W.values(), kernel_size=3, stride=2, padding=1)
    >>> y.shape, torch.allclose(y, F.conv2d(x, w, stride=2, padding=1), atol=1e-5)
    (torch.Size([2, 4, 5, 5]), True)
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"cpu_sparse_conv2d: x must be a 4-D tensor [N, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.device.type != "cpu" or values.device.type != "cpu" or (bias is not None and bias.device.type != "cpu"):
        raise ValueError(f"cpu_sparse_conv2d: x, values and bias must be on the CPU, got {x.device}, "
                         f"{values.device} and {None if bias is None else bias.device}")
    if not x.dtype.is_floating_point or x.dtype != values.dtype:
        raise ValueError(f"cpu_sparse_conv2d: x and values must share one floating dtype, got {x.dtype} and "
                         f"{values.dtype}")
    out_channels = crow_indices.numel() - 1
    if check_invariants:
        kh, kw = _pair(kernel_size, "kernel_size")
        if values.dim() != 1:
            raise ValueError(f"cpu_sparse_conv2d: values must be 1-D, got shape {tuple(values.shape)}")
        with warnings.catch_warnings():  # torch's "CSR is beta" notice says nothing to our users
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            matrix = torch.sparse_csr_tensor(crow_indices, col_indices, values, (out_channels, x.shape[1] * kh * kw),
                                             check_invariants=False)
        check_index_invariants(matrix, "cpu_sparse_conv2d weight")
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"cpu_sparse_conv2d: bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    cache = {} if cache is None else cache
    if taps is not None:
        cache.setdefault("taps", taps)
    launch = kept_launch(x, crow_indices, col_indices, values, kernel_size=kernel_size, stride=stride, padding=padding,
                         dilation=dilation, cache=cache)
    return launch(x, values, bias)


def kept_launch(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, *,
                kernel_size, stride, padding, dilation, cache: dict) -> CpuConvLaunch:
    """The launch for ``x``'s shape, dtype and the thread count kept in ``cache`` (as for
    :func:`cpu_sparse_conv2d`: a dict kept with this weight and geometry), prepared and kept
    there on first use; a few input signatures are kept. Checks nothing (see
    :func:`prepare_cpu_sparse_conv2d`): what :class:`sparse_lth.nn.SparseConv2d` calls on each
    forward, having checked its input once."""
    key = ("launch", x.shape, x.dtype, _threads())
    launch = cache.get(key)
    if launch is None:
        for old in [k for k in cache if isinstance(k, tuple) and k[0] == "launch"][:-_KEPT_LAUNCHES + 1]:
            del cache[old]
        launch = cache[key] = prepare_cpu_sparse_conv2d(x, crow_indices, col_indices, values, kernel_size=kernel_size,
                                                        stride=stride, padding=padding, dilation=dilation, cache=cache)
    return launch


def prepare_cpu_sparse_conv2d(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                              values: torch.Tensor, *, kernel_size, stride=1, padding=0, dilation=1,
                              taps: np.ndarray | None = None, cache: dict | None = None) -> CpuConvLaunch:
    """:func:`cpu_sparse_conv2d` worked out once for inputs of ``x``'s shape and dtype and for
    ``torch.get_num_threads()`` threads: the output geometry, the tiling and where each stored
    weight reads. The returned launch, called as ``launch(x, values, bias)``, checks nothing (a
    caller that keys it on the input's shape and dtype, as :class:`sparse_lth.nn.SparseConv2d`
    does, checked once): at batch 1 the checks and plans cost as much as a 98%-sparse kernel.
    ``values`` keeps the pattern the launch was prepared for (its entries may change). A strided
    1x1 conv without padding is planned as a stride-1 conv on ``x[:, :, ::sh, ::sw]``, which the
    launch takes from ``x`` itself (``launch.subsample``). ``cache``: as for
    :func:`cpu_sparse_conv2d` (the taps, their largest shifts and the row pointers kept there).

    >>> import torch, torch.nn.functional as F
    >>> w = torch.randn(4, 3, 3, 3) * (torch.rand(4, 3, 3, 3) < 0.3)
    >>> W = w.reshape(4, -1).to_sparse_csr()
    >>> x = torch.randn(1, 3, 6, 6)
    >>> launch = prepare_cpu_sparse_conv2d(x, W.crow_indices(), W.col_indices(), W.values(), kernel_size=3, padding=1)
    >>> torch.allclose(launch(x, W.values(), None), F.conv2d(x, w, padding=1), atol=1e-5)
    True
    """
    cache = {} if cache is None else cache
    n, c, h, w = x.shape
    pads, (out_h, out_w) = conv2d_geometry((h, w), kernel_size, stride, padding, dilation)
    sh, sw = _pair(stride, "stride")
    if taps is None:
        taps = cache.get("taps")
    if taps is None:  # the pattern's alone: the same for every input size
        taps = cache["taps"] = conv2d_taps(col_indices, kernel_size, stride, dilation)
    if "shift_max" not in cache:
        cache["shift_max"] = (int(taps[:, 1].max(initial=0)), int(taps[:, 2].max(initial=0)))
    dy_max, dx_max = cache["shift_max"]
    crow = cache.get("crow")
    if crow is None:  # int64 always: one compiled signature for int32 and int64 indices
        crow = cache["crow"] = crow_indices.detach().to(torch.int64).numpy()
    shape, subsample = tuple(x.shape), None
    if _pair(kernel_size, "kernel_size") == (1, 1) and (sh, sw) != (1, 1) and pads == (0, 0, 0, 0):
        # A strided 1x1 conv reads x[:, :, ::sh, ::sw] and nothing else: the launch takes that
        # (a copy of 1 / (sh * sw) of x) and runs it at stride 1 (in place for one image),
        # rather than packing all sh * sw phases to read one. ResNet's stride-2 projections at
        # 90-95%: 1.23-1.56x faster, 1.8-2.9x dense against 1.35-1.92x.
        shape, subsample = (n, c, out_h, out_w), (sh, sw)
        taps = taps.copy()
        taps[:, 0] //= sh * sw  # every tap in phase 0 of its channel: plane c * sh * sw -> c
        sh = sw = 1
    return CpuConvLaunch(shape, x.dtype, crow, taps, pads[0], pads[2], (sh, sw), (out_h, out_w),
                         (dy_max, dx_max), _threads(), subsample)


class CpuConvLaunch:
    """One input signature's :func:`cpu_sparse_conv2d`, everything but the arithmetic worked out:
    made by :func:`prepare_cpu_sparse_conv2d`, called as ``launch(x, values, bias)``."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, crow: np.ndarray, taps: np.ndarray,
                 pad_top: int, pad_left: int, stride: tuple[int, int], out_hw: tuple[int, int],
                 shift_max: tuple[int, int], threads: int, subsample: tuple[int, int] | None = None) -> None:
        n, c, _, _ = shape
        (sh, sw), (out_h, out_w), (dy_max, dx_max) = stride, out_hw, shift_max
        self.shape, self.dtype, self.threads = shape, dtype, threads
        self.subsample = subsample  # (sh, sw): the input is x[:, :, ::sh, ::sw], the plan for that
        self.work_dtype = dtype if dtype in _NATIVE else torch.float32  # other floats: computed in fp32, cast back
        self.native = _NATIVE[self.work_dtype]
        self.out_channels = crow.shape[0] - 1
        self.crow, self.pad_top, self.pad_left, self.stride = crow, pad_top, pad_left, stride
        self.out_shape = (n, self.out_channels, out_h, out_w)
        self.empty = n == 0 or self.out_channels == 0
        self._spare: np.ndarray | None = None  # the last output's memory (``_output``)
        if self.empty:
            return
        # Each thread packs and computes its own slice of the batch (``_conv``): min(threads, N)
        # slices of ``per`` images, the last padded with zero images where they do not divide N.
        self.slices = min(threads, n)
        self.per = per = -(-n // self.slices)
        # Within a slice, the batch innermost where the rows between stacked images would be a
        # tenth of the work or more (small maps, e.g. 7x7 and 14x14 under a 3x3 kernel); else
        # images stacked by rows, which packs and writes out in plain row order (1x1 convs, large
        # maps; the batch innermost measured 0.68-0.93x on 28x28 and 56x56 maps at batch 4-16).
        self.inner = inner = per if per > 1 and 10 * dy_max >= out_h else 1
        # Phase planes just tall and wide enough for the outputs plus the largest stored shift: rows
        # and columns past that are never read (their outputs are not kept).
        self.hph, self.wph = hph, wph = out_h + dy_max, out_w + dx_max
        planes, plane_elems = c * sh * sw, hph * wph * per
        # flat positions up to the slice's last output (``per // inner`` groups stacked by rows)
        self.span = span = ((per // inner - 1) * hph + out_h - 1) * wph * inner + out_w * inner
        itemsize = np.dtype(self.native).itemsize
        self.wide = _wide(span)
        block = _WIDE if self.wide else _BLOCK
        self.tile = tile = _tile(span, planes, itemsize, block)
        ntiles = -(-span // tile)
        sharing = -(-threads // self.slices)  # threads on one slice, at most
        self.group = max(1, min(16, ntiles * self.out_channels // (_ITEMS_PER_THREAD * sharing)))
        # The last tile runs past the last output by up to tile - 1 positions (garbage, not kept):
        # a zero tail keeps its reads inside the buffer. Each thread's row starts on a 4 KiB page
        # (fp32), so no two threads write one line.
        reach = (planes - 1) * plane_elems + ntiles * tile + (dy_max * wph + dx_max) * inner
        self.row_size = -(-max(planes * plane_elems, reach) // 1024) * 1024
        plain = sh == sw == 1 and inner == 1
        # A 1x1 conv, stride 1, no padding, one image: the packed input would be a copy of x
        # (planes [in, H * W], nothing shifted), so the kernel reads x itself. The pack costs as
        # much as a third of such a call at 98% sparsity (x cold after the previous layer). The
        # kernel's last block then ends at the input's end: at least one block of pixels.
        self.in_place = plain and n == 1 and shift_max == (0, 0) and (pad_top, pad_left) == (0, 0) \
            and (hph, wph) == shape[2:] and span >= block
        self.mode = 0 if self.in_place else 1 if plain else 2  # _conv's: in place, _pack_plain, _pack
        self.offsets = np.empty(taps.shape[0], dtype=np.uint64)
        with _THREADS_LOCK:
            numba.set_num_threads(threads)
            _offsets(taps, plane_elems, wph, inner, self.offsets)
        self.zero_bias = np.zeros(self.out_channels, self.native)

    def __call__(self, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.empty:
            return torch.empty(self.out_shape, dtype=self.dtype)
        if self.subsample is not None:
            x = x[:, :, ::self.subsample[0], ::self.subsample[1]]
        xs, vals = _as_work(x, self.work_dtype), _as_work(values, self.work_dtype)
        b = self.zero_bias if bias is None else _as_work(bias, self.work_dtype)
        with _THREADS_LOCK:
            out = self._output()
            numba.set_num_threads(self.threads)
            if self.in_place:
                packed = xs.reshape(1, -1)
            else:  # one row per thread, in memory kept between calls (its pages faulted in once)
                packed = kept_empty(("cpu_conv", "packed"), self.threads * self.row_size,
                                    self.native).reshape(self.threads, self.row_size)
            _conv(xs, packed, self.crow, self.offsets, vals, b, out, self.pad_top, self.pad_left, *self.stride,
                  self.hph, self.wph, self.inner, self.per, self.span, self.tile, self.group, self.wide, self.mode,
                  self.slices, self.threads)
        result = torch.from_numpy(out)
        return result if self.dtype == self.work_dtype else result.to(self.dtype)

    def _output(self) -> np.ndarray:
        """The array the kernel writes: the one this launch returned last time where nothing
        holds it any more, else a new one (kept for next time). A freshly allocated output is
        fresh pages wherever glibc maps it afresh or has trimmed its heap, and faulting them in
        can cost more than the kernel: a 1x1 conv of one 28x28 image, 256 channels at 98%, ran
        483 us with 360 page faults a call under a small ``MALLOC_MMAP_THRESHOLD_``, 146 us with
        none on a kept output (1.04-1.22x at batch 1 with glibc's defaults). The returned tensor
        shares the array's memory (as ``torch.from_numpy`` does): its storage cannot be resized.
        Callers hold THREADS_LOCK."""
        spare = self._spare
        # free when only this launch refers to it: the attribute, this name, getrefcount's argument
        # (a returned tensor, or any view of it, holds the array through its storage)
        if spare is None or sys.getrefcount(spare) > 3:
            spare = self._spare = aligned_empty(int(np.prod(self.out_shape)), self.native).reshape(self.out_shape)
        return spare


def _as_work(t: torch.Tensor, work: torch.dtype) -> np.ndarray:
    """``t`` as a contiguous numpy array of ``work``, without a copy where it already is one
    (each skipped torch call is ~0.5 us of a ~20 us batch-1 call)."""
    t = t.detach()
    if t.dtype != work:
        t = t.to(work)
    return (t if t.is_contiguous() else t.contiguous()).numpy()


def _wide(span: int) -> bool:
    """Whether a run of ``span`` positions takes the wide register block (see ``_WIDE_SPAN``).

    >>> _wide(61), _wide(122), _wide(222), _wide(300), _wide(900)
    (False, False, True, False, True)
    """
    return span >= _WIDE_SPAN or (span >= _WIDE and -(-span // _WIDE) * _WIDE == -(-span // _BLOCK) * _BLOCK)


def _tile(span: int, planes: int, itemsize: int, block: int = _BLOCK) -> int:
    """Accumulator tile length, a multiple of ``block``: the whole run when small, else as long
    as the L2 slab allows, at least one block and at most ``_MAX_TILE``."""
    cap = max(block, min(_MAX_TILE, _SLAB_BYTES // max(1, planes * itemsize)) // block * block)
    count = -(-span // cap)  # tiles of about equal length, none much shorter than cap
    per_tile = -(-span // count)
    return -(-per_tile // block) * block


def warm_up(dtypes=(torch.float32,)) -> None:
    """Compile the kernels for ``dtypes`` now (numba compiles on first use: seconds per dtype).

    >>> warm_up()
    """
    for dtype in dtypes:
        x = torch.zeros(1, 1, 3, 3, dtype=dtype)
        for stride in (1, 2):  # stride 1 packs with _pack_plain, others with _pack
            cpu_sparse_conv2d(x, torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, dtype=dtype), kernel_size=1,
                              stride=stride)
