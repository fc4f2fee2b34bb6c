"""Block-sparse Conv2d on the GPU (Triton): an implicit GEMM over the stored weight blocks.

A conv weight [O, C, KH, KW] is stored as BSR over the matrix ``Wr`` [O, KH * KW * Cp] whose
column ``(ky * KW + kx) * Cp + c`` holds ``W[o, c, ky, kx]``: taps outermost, input channels
innermost, ``C`` padded with zero channels to ``Cp``, a multiple of the block width, so every
[BR, BC] block covers BC consecutive input channels at one tap ("blocks aligned to input
channels"). :func:`conv_weight_to_bsr` builds it from a dense weight and a mask; a block is
stored when the mask keeps any of its entries (a block-pruned ticket keeps whole blocks).

The product, for output pixels p = (n, oy, ox) flattened: one program per (tile of BLOCK_P
pixels, block row) accumulates in fp32 ``tl.dot(X slice [BLOCK_P, BC], W block^T [BC, BR])``
over its row's stored blocks, where the X slice is gathered straight from the input at the
block's tap (``iy = oy * sh - ph + ky * dh``, likewise ``ix``; zero outside the image and past
``C``): no im2col buffer. Pixels are the dot's M (64 or 128, :func:`conv_launch`), so every block
shape runs on Hopper's wgmma, which needs 64 rows. A channels-last input (NHWC memory,
``x.to(memory_format=torch.channels_last)``) gives each pixel's BC channels as one run of
adjacent addresses, loaded 16 bytes at a time, and the output comes back channels-last, as
``F.conv2d`` keeps it; an NCHW input is gathered along pixel rows (a warp's loads coalesce) and
gives NCHW. fp16 / bf16 run on tensor cores; fp32 follows cuDNN's convolutions, TF32 while
``torch.backends.cudnn.allow_tf32`` is on (torch's default), else IEEE. Blocks BR, BC: powers of
two from 16 to 128. Stride, padding, dilation and the kernel width are compile-time constants:
a model compiles one kernel per conv geometry.

Written and tested under ``TRITON_INTERPRET=1`` against ``F.conv2d``, compiled for sm_90 and
sm_80 (tests/test_kernel_compile.py reads the code: wgmma, 16-byte channel loads, no spills).
The first version (NCHW only, [BR, BLOCK_P] tiles of 32 pixels over 8 warps) ran 0.63-0.92x
cuDNN at batch 1 and 0.29-0.57x at batch 32 on an H200 (bench/RESULTS.md); this one is not yet
timed on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton import HOPPER_SHARED_BYTES, is_interpreting, on_device, shared_limit_of

__all__ = ["conv_weight_to_bsr", "triton_bsr_conv2d", "prepare_bsr_conv2d", "ConvLaunch", "conv_launch"]

_BLOCK_SIZES = (16, 32, 64, 128)
_WIDE_TILE_PIXELS = 4096  # 128-pixel tiles from here on: 32 or more programs a block row (a guess, untimed)
_SHARED_SLACK = 1024  # the pipeline's barriers and the epilogue's scratch, over its buffers


@triton.jit
def _bsr_conv2d_kernel(
    x_ptr, crow_ptr, col_ptr, val_ptr, bias_ptr, out_ptr,
    C, H, W, O, OH, OW, P, BLOCKS_PER_TAP, BLOCK_ROWS,
    KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DH: tl.constexpr, DW: tl.constexpr,
    HAS_BIAS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BLOCK_P: tl.constexpr,
    OUT_CHANNELS_LAST: tl.constexpr,  # out in NHWC memory (torch.channels_last), else NCHW; x always NHWC
    EVEN_C: tl.constexpr,  # C a multiple of BC: no channel mask, so channel runs load as vectors
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only fp32 operands read it
):
    # Block rows vary fastest: the programs that share a tile of pixels run together and find
    # its input in L2.
    pid = tl.program_id(0)
    rb = pid % BLOCK_ROWS
    p = (pid // BLOCK_ROWS) * BLOCK_P + tl.arange(0, BLOCK_P)  # int32: P < 2**31 (launcher)
    p_ok = p < P
    n = p // (OH * OW)
    rest = p - n * (OH * OW)
    oy = rest // OW
    ox = rest - oy * OW
    iy0 = oy * SH - PH
    ix0 = ox * SW - PW
    # Element offset in x (NHWC) of each pixel's first tap: negative where the tap falls in the
    # padding (those lanes are masked). A pixel's BC channels are adjacent: 16-byte loads.
    x_pix = n.to(tl.int64) * H * W * C + (iy0 * W + ix0).to(tl.int64) * C
    ci = tl.arange(0, BC)
    ri = tl.arange(0, BR)
    acc = tl.zeros((BLOCK_P, BR), dtype=tl.float32)
    start = tl.load(crow_ptr + rb).to(tl.int64)  # block k's values at k * BR * BC: past 2**31 on big layers
    stop = tl.load(crow_ptr + rb + 1).to(tl.int64)
    for k in range(start, stop):
        col = tl.load(col_ptr + k)
        tap = col // BLOCKS_PER_TAP
        c0 = (col - tap * BLOCKS_PER_TAP) * BC  # this block's first input channel
        ky = tap // KW
        kx = tap - ky * KW
        iy = iy0 + ky * DH
        ix = ix0 + kx * DW
        inside = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        ptrs = x_ptr + (x_pix + (ky * DH * W + kx * DW) * C + c0)[:, None] + ci[None, :]
        if EVEN_C:
            xs = tl.load(ptrs, mask=inside[:, None], other=0.0)
        else:
            xs = tl.load(ptrs, mask=inside[:, None] & (c0 + ci < C)[None, :], other=0.0)
        w = tl.load(val_ptr + k * (BR * BC) + ri[:, None] * BC + ci[None, :])  # [BR, BC]
        acc = tl.dot(xs, tl.trans(w), acc, input_precision=DOT_PRECISION)
    o = rb * BR + ri
    o_ok = o < O
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    if OUT_CHANNELS_LAST:
        out = out_ptr + p.to(tl.int64)[:, None] * O + o[None, :]
    else:
        out = out_ptr + (n.to(tl.int64) * O * OH * OW + rest)[:, None] + (o * (OH * OW)).to(tl.int64)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & o_ok[None, :])


def conv_launch(br: int, bc: int, elem_bytes: int, pixels: int, shared_limit: int = HOPPER_SHARED_BYTES, *,
                tensor_cores: bool = True) -> dict:
    """The launch for [br, bc] blocks, ``elem_bytes`` operands and ``pixels`` = N * OH * OW
    outputs; ``tensor_cores`` False for IEEE fp32 (FMA).

    Pixels are the dot's M: 64 or 128 a program (one Hopper warpgroup's wgmma rows, or two)
    whatever the block, so 16- and 32-row blocks run on wgmma too; 64 where the map is small
    (batch 1: more programs) and for fp32 (TF32), 32 on FMA, and 8 warps for fp32: larger fp32
    tiles spill (compile test, triton 3.6 and 3.9). As many pipeline stages (up to 3) as shared
    memory holds.

    >>> conv_launch(32, 32, 2, 32 * 56 * 56)
    {'BLOCK_P': 128, 'num_warps': 4, 'num_stages': 3}
    >>> conv_launch(32, 32, 2, 7 * 7)["BLOCK_P"], conv_launch(32, 32, 4, 7 * 7, tensor_cores=False)["BLOCK_P"]
    (64, 32)
    """
    if not tensor_cores:
        block_p = 32
    else:
        block_p = 128 if elem_bytes < 4 and pixels >= _WIDE_TILE_PIXELS else 64
    stage = (block_p + br) * bc * elem_bytes
    stages = next((s for s in (3, 2) if s * stage + _SHARED_SLACK <= shared_limit), 1)
    warps = 8 if elem_bytes == 4 or block_p * br >= 128 * 128 else 4
    return {"BLOCK_P": block_p, "num_warps": warps, "num_stages": stages}


def conv_weight_to_bsr(weight: torch.Tensor, mask: torch.Tensor | None, blocksize: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(crow, col, values)``: ``weight`` [O, C, KH, KW] (entries where ``mask`` is False zeroed)
    as BSR over ``Wr`` [O padded to BR, KH * KW * Cp] (module doc), ``values`` [blocks, BR, BC].
    A block is stored when the mask (or, without one, the weight) keeps any of its entries.

    >>> w = torch.zeros(16, 16, 3, 3); w[:, :, 1, 1] = 1.0      # only the centre tap
    >>> crow, col, values = conv_weight_to_bsr(w, None, (16, 16))
    >>> crow.tolist(), col.tolist(), tuple(values.shape)          # one block, at tap 4
    ([0, 1], [4], (1, 16, 16))
    """
    br, bc = blocksize
    if br not in _BLOCK_SIZES or bc not in _BLOCK_SIZES:
        raise ValueError(f"conv_weight_to_bsr: blocks must be powers of two from 16 to 128, got {blocksize}")
    if weight.dim() != 4:
        raise ValueError(f"conv_weight_to_bsr: weight must be [O, C, KH, KW], got {tuple(weight.shape)}")
    alive = weight != 0 if mask is None else mask.to(device=weight.device, dtype=torch.bool)
    if alive.shape != weight.shape:
        raise ValueError(f"conv_weight_to_bsr: mask {tuple(alive.shape)} does not match weight {tuple(weight.shape)}")
    O, C, KH, KW = weight.shape
    cp, op = -(-C // bc) * bc, -(-O // br) * br

    def as_matrix(t: torch.Tensor) -> torch.Tensor:  # [O, C, KH, KW] -> [Op, KH * KW * Cp]
        t = torch.nn.functional.pad(t.permute(0, 2, 3, 1), (0, cp - C))
        return torch.nn.functional.pad(t.reshape(O, KH * KW * cp), (0, 0, 0, op - O))

    values_full = as_matrix(torch.where(alive, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)))
    kept = as_matrix(alive.to(weight.dtype)) != 0
    tiles = kept.reshape(op // br, br, -1, bc).any(dim=3).any(dim=1)  # [block rows, block cols]
    rows, cols = tiles.nonzero(as_tuple=True)
    crow = torch.zeros(op // br + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = torch.cumsum(tiles.sum(dim=1), 0)
    blocks = values_full.reshape(op // br, br, -1, bc).permute(0, 2, 1, 3)[rows, cols]
    return crow, cols.to(torch.int32), blocks.contiguous()


def triton_bsr_conv2d(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                      bias: torch.Tensor | None = None, *, out_channels: int, kernel_size: tuple[int, int],
                      stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                      dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """``F.conv2d(x, W, bias, stride, padding, dilation)`` for ``x`` [N, C, H, W] and ``W`` given by
    :func:`conv_weight_to_bsr` (``out_channels`` = O). CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``; float32 / float16 / bfloat16. Returns [N, O, OH, OW] in x's dtype,
    channels-last in memory when x is (read in place; any other x is copied to channels-last
    first and the output is NCHW). :func:`prepare_bsr_conv2d` does its checks once for calls
    that repeat.

    >>> import torch.nn.functional as F
    >>> w = torch.randn(16, 8, 3, 3) * (torch.rand(16, 8, 3, 3) < 0.3)
    >>> x = torch.randn(2, 8, 6, 6)
    >>> crow, col, values = conv_weight_to_bsr(w, None, (16, 16))
    >>> y = triton_bsr_conv2d(x, crow, col, values, out_channels=16, kernel_size=(3, 3), padding=(1, 1))
    >>> torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-4)
    True
    """
    return prepare_bsr_conv2d(x, crow, col, values, bias, out_channels=out_channels, kernel_size=kernel_size,
                              stride=stride, padding=padding, dilation=dilation)(x, bias)


@dataclass(frozen=True)
class ConvLaunch:
    """One block-sparse conv, checked for one input signature (shape, dtype, device, memory
    format, TF32 switch): calling it with such an input launches the kernel and returns the
    output, with none of :func:`triton_bsr_conv2d`'s checks (a few microseconds of Python a
    call at batch 1, where a GPU conv's time is mostly the host's). Made by
    :func:`prepare_bsr_conv2d`."""

    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # crow, col, values
    sizes: tuple[int, ...]  # the kernel's runtime integers, in its order
    constexprs: dict
    programs: int  # 0: an empty output, nothing launched
    out_shape: tuple[int, int, int, int]
    out_channels_last: bool

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The conv of ``x``, plus ``bias`` (given exactly when the launch was prepared with one:
        the layer passes its current bias each call)."""
        if (bias is not None) != self.constexprs["HAS_BIAS"]:
            raise ValueError("ConvLaunch: give a bias exactly when the launch was prepared with one")
        out = torch.empty(self.out_shape, dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last if self.out_channels_last else torch.contiguous_format)
        if self.programs:
            with on_device(x):
                _bsr_conv2d_kernel[(self.programs,)](
                    x.contiguous(memory_format=torch.channels_last), *self.weights,
                    bias if self.constexprs["HAS_BIAS"] else self.weights[2], out, *self.sizes, **self.constexprs)
        return out


def prepare_bsr_conv2d(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                       bias: torch.Tensor | None = None, *, out_channels: int, kernel_size: tuple[int, int],
                       stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                       dilation: tuple[int, int] = (1, 1)) -> ConvLaunch:
    """:func:`triton_bsr_conv2d`'s checks and launch choice for inputs like ``x``, done once: the
    returned :class:`ConvLaunch` runs the conv on any input of ``x``'s shape, dtype, device and
    memory format (what ``SparseConv2d`` keeps per input size on CUDA); ``bias`` is checked here
    and given to each call (``launch(x, bias)``), so a bias replaced later is the one added.

    >>> w = torch.randn(16, 8, 3, 3) * (torch.rand(16, 8, 3, 3) < 0.3)
    >>> conv = prepare_bsr_conv2d(torch.empty(2, 8, 6, 6), *conv_weight_to_bsr(w, None, (16, 16)),
    ...                           out_channels=16, kernel_size=(3, 3), padding=(1, 1))
    >>> x = torch.randn(2, 8, 6, 6)
    >>> torch.allclose(conv(x), torch.nn.functional.conv2d(x, w, padding=1), atol=1e-4)
    True
    """
    if x.dim() != 4:
        raise ValueError(f"triton_bsr_conv2d: x must be [N, C, H, W], got {tuple(x.shape)}")
    if values.dim() != 3 or values.shape[1] not in _BLOCK_SIZES or values.shape[2] not in _BLOCK_SIZES:
        raise ValueError(f"triton_bsr_conv2d: values must be [blocks, BR, BC], BR and BC powers of two from 16 "
                         f"to 128, got {tuple(values.shape)}")
    if x.dtype != values.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"triton_bsr_conv2d: x and values must share float32 / float16 / bfloat16, got "
                         f"{x.dtype} and {values.dtype}")
    devices = {x.device, crow.device, col.device, values.device} | ({bias.device} if bias is not None else set())
    if not (x.is_cuda or is_interpreting()) or len(devices) != 1:
        raise ValueError("triton_bsr_conv2d: every tensor on one CUDA device (or the CPU under TRITON_INTERPRET=1)")
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = kernel_size, stride, padding, dilation
    BR, BC = int(values.shape[1]), int(values.shape[2])
    cp = -(-C // BC) * BC
    if crow.numel() != -(-out_channels // BR) + 1:
        raise ValueError(f"triton_bsr_conv2d: crow has {crow.numel()} entries, {out_channels} output channels in "
                         f"blocks of {BR} need {-(-out_channels // BR) + 1}")
    OH = (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1
    OW = (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"triton_bsr_conv2d: input {H}x{W} is smaller than the kernel's reach")
    P = N * OH * OW
    if max(P, out_channels * OH * OW, C * H * W) >= 2**31:  # the kernel's int32 offsets within an image
        raise ValueError(f"triton_bsr_conv2d: at most 2**31 - 1 output pixels, and elements an image in and out; "
                         f"got {P} pixels, {C * H * W} in and {out_channels * OH * OW} out "
                         "(split the batch or the map)")
    # The kernel reads NHWC (torch's channels_last): an NCHW input is copied into it, one pass
    # over x. The output keeps the input's format, as F.conv2d does.
    out_channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"triton_bsr_conv2d: bias must be [{out_channels}], got {tuple(bias.shape)}")
    precision = "tf32" if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32 else "ieee"
    launch = conv_launch(BR, BC, x.element_size(), P, shared_limit_of(x),
                         tensor_cores=x.dtype != torch.float32 or precision == "tf32")
    block_rows = crow.numel() - 1
    programs = block_rows * triton.cdiv(P, launch["BLOCK_P"]) if P and out_channels else 0
    return ConvLaunch(
        (crow, col, values.contiguous()),
        (C, H, W, out_channels, OH, OW, P, cp // BC, block_rows),
        dict(KW=KW, SH=SH, SW=SW, PH=PH, PW=PW, DH=DH, DW=DW, HAS_BIAS=bias is not None, BR=BR, BC=BC,
             OUT_CHANNELS_LAST=out_channels_last, EVEN_C=C % BC == 0, DOT_PRECISION=precision, **launch),
        programs, (N, out_channels, OH, OW), out_channels_last)
