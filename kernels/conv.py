"""Block-sparse Conv2d on the GPU (Triton): an implicit GEMM over the stored weight blocks.

A conv weight [O, C, KH, KW] is stored as BSR over the matrix ``Wr`` [O, KH * KW * Cp] whose
column ``(ky * KW + kx) * Cp + c`` holds ``W[o, c, ky, kx]``: taps outermost, input channels
innermost, ``C`` padded with zero channels to ``Cp``, a multiple of the block width, so every
[BR, BC] block covers BC consecutive input channels at one tap ("blocks aligned to input
channels"). :func:`conv_weight_to_bsr` builds it from a dense weight and a mask; a block is
stored when the mask keeps any of its entries (a block-pruned ticket keeps whole blocks).

The product, for output pixels p = (n, oy, ox) flattened: one program per (block row, tile of
BLOCK_P pixels) accumulates in fp32 ``tl.dot(W block [BR, BC], X slice [BC, BLOCK_P])`` over its
row's stored blocks, where the X slice is gathered straight from the NCHW input at the block's
tap (``iy = oy * sh - ph + ky * dh``, likewise ``ix``; zero outside the image and past ``C``): no
im2col buffer. Consecutive pixels read consecutive addresses along a row (stride 1), so the
gathers coalesce. fp16 / bf16 run on tensor cores; fp32 follows cuDNN's convolutions, TF32
while ``torch.backends.cudnn.allow_tf32`` is on (torch's default), else IEEE. Blocks BR, BC: powers of two from 16 to 128.

Written and tested under ``TRITON_INTERPRET=1`` against ``F.conv2d`` and compiled for sm_90 and
sm_80; not yet timed on a GPU (no tuning table: one launch shape, LAUNCH below).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import is_interpreting, on_device

__all__ = ["conv_weight_to_bsr", "triton_bsr_conv2d"]

_BLOCK_SIZES = (16, 32, 64, 128)


@triton.jit
def _bsr_conv2d_kernel(
    x_ptr, crow_ptr, col_ptr, val_ptr, bias_ptr, out_ptr,
    C, H, W, O, OH, OW, P, CP, KW,
    SH, SW, PH, PW, DH, DW,
    HAS_BIAS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"; only fp32 operands read it
):
    rb = tl.program_id(0)
    pid_p = tl.program_id(1)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < P
    n = p // (OH * OW)
    rest = p - n * (OH * OW)
    oy = rest // OW
    ox = rest - oy * OW
    ci = tl.arange(0, BC)
    ri = tl.arange(0, BR)
    acc = tl.zeros((BR, BLOCK_P), dtype=tl.float32)
    start = tl.load(crow_ptr + rb).to(tl.int64)  # block k's values at k * BR * BC: past 2**31 on big layers
    stop = tl.load(crow_ptr + rb + 1).to(tl.int64)
    for k in range(start, stop):
        col0 = tl.load(col_ptr + k).to(tl.int64) * BC
        tap = col0 // CP
        c = col0 - tap * CP + ci  # this block's input channels
        ky = tap // KW
        kx = tap - ky * KW
        iy = oy * SH - PH + ky * DH
        ix = ox * SW - PW + kx * DW
        inside = p_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xs = tl.load(x_ptr + ((n * C)[None, :] + c[:, None]) * (H * W) + (iy * W + ix)[None, :],
                     mask=(c < C)[:, None] & inside[None, :], other=0.0)
        w = tl.load(val_ptr + k * (BR * BC) + ri[:, None] * BC + ci[None, :])
        acc = tl.dot(w, xs, acc, input_precision=DOT_PRECISION)
    o = rb * BR + ri
    o_ok = o < O
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + ((n * O)[None, :] + o[:, None]) * (OH * OW) + rest[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=o_ok[:, None] & p_ok[None, :])


# 32 pixels a program over 8 warps: the gathered X slice's addresses and masks ([BC, BLOCK_P]
# of them) fit in registers. With 64 pixels over 4 warps, triton 3.6's ptxas (the GPU image's)
# spilled 485 words and dropped wgmma for 64 x 64 blocks; 32 over 8 compiles without spills and
# on tensor cores with triton 3.6 and 3.9 alike (tests/test_kernel_compile.py).
LAUNCH = {"BLOCK_P": 32, "num_warps": 8, "num_stages": 3}


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
    ``TRITON_INTERPRET=1``; float32 / float16 / bfloat16. Returns [N, O, OH, OW] in x's dtype.

    >>> import torch.nn.functional as F
    >>> w = torch.randn(16, 8, 3, 3) * (torch.rand(16, 8, 3, 3) < 0.3)
    >>> x = torch.randn(2, 8, 6, 6)
    >>> crow, col, values = conv_weight_to_bsr(w, None, (16, 16))
    >>> y = triton_bsr_conv2d(x, crow, col, values, out_channels=16, kernel_size=(3, 3), padding=(1, 1))
    >>> torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-4)
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
    if not (x.is_cuda or is_interpreting()) or len({x.device, crow.device, col.device, values.device}) != 1:
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
    out = torch.empty((N, out_channels, OH, OW), dtype=x.dtype, device=x.device)
    P = N * OH * OW
    if P == 0 or out_channels == 0:
        return out
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"triton_bsr_conv2d: bias must be [{out_channels}], got {tuple(bias.shape)}")
    precision = "tf32" if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32 else "ieee"
    grid = (crow.numel() - 1, triton.cdiv(P, LAUNCH["BLOCK_P"]))
    with on_device(x):
        _bsr_conv2d_kernel[grid](
            x.contiguous(), crow, col, values.contiguous(), bias if bias is not None else values, out,
            C, H, W, out_channels, OH, OW, P, cp, KW, SH, SW, PH, PW, DH, DW,
            HAS_BIAS=bias is not None, BR=BR, BC=BC, DOT_PRECISION=precision, **LAUNCH,
        )
    return out
