#!/usr/bin/env python
"""The block-sparse Triton conv (kernels/conv.py) against cuDNN on a GPU: the issue's point of
3x3 convs at 90% block sparsity with 32 x 32 blocks, fp16 / bf16, ResNet-like stages.

Each shape: a dense conv weight pruned to whole (32 output x 32 input channel) tiles per tap,
kept at ``--density``; ``triton_bsr_conv2d`` checked against ``F.conv2d`` on the masked weight,
then both timed as the median of ``--reps`` bursts of ``--calls`` calls (host wall time per call,
one synchronize a burst: what a model pays), cuDNN with ``torch.backends.cudnn.benchmark`` on.

    python3 bench/gpu_conv.py --out $OUT        # on the GPU machine: conv.json, a table on stdout

On a CPU machine ``--dry-run`` runs it under TRITON_INTERPRET=1 on tiny shapes (the numbers
mean nothing; it proves the script; tests/test_triton_conv.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from launch_cost import per_call_us  # bench/ is on the path when run as a script

# (batch, channels, map size): ResNet-50-like 3x3 stages, at batch 1 and 32
SHAPES = [(b, c, hw) for b in (1, 32) for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7))]
DRY_SHAPES = [(1, 32, 6), (2, 32, 5)]


def per_call_ms(fn, calls: int, reps: int, sync) -> float:
    return per_call_us(fn, calls, reps, sync) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F

    from sparse_lth.kernels import conv_weight_to_bsr, triton_bsr_conv2d

    device = "cpu" if args.dry_run else "cuda"
    dtypes = (torch.float32,) if args.dry_run else (torch.float16, torch.bfloat16)
    sync = (lambda: None) if args.dry_run else torch.cuda.synchronize
    torch.backends.cudnn.benchmark = True
    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch, channels, hw in (DRY_SHAPES if args.dry_run else SHAPES):
        tiles = torch.rand(channels // 32, channels // 32, 3, 3, generator=gen) < args.density
        mask = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)
        for dtype in dtypes:
            w = (torch.randn(channels, channels, 3, 3, generator=gen) * mask).to(device, dtype)
            x = torch.randn(batch, channels, hw, hw, generator=gen).to(device, dtype)
            crow, col, values = conv_weight_to_bsr(w, mask.to(device), (32, 32))
            sparse = lambda: triton_bsr_conv2d(x, crow, col, values, out_channels=channels,  # noqa: E731
                                               kernel_size=(3, 3), padding=(1, 1))
            dense = lambda: F.conv2d(x, w, padding=1)  # noqa: E731
            err = (sparse().float() - dense().float()).abs().max().item()
            scale = dense().float().abs().max().item()
            ms_dense = per_call_ms(dense, args.calls, args.reps, sync)
            ms_sparse = per_call_ms(sparse, args.calls, args.reps, sync)
            rows.append({"batch": batch, "channels": channels, "hw": hw, "dtype": str(dtype).split(".")[-1],
                         "density_blocks": float(tiles.float().mean()), "block": [32, 32],
                         "max_abs_err": err, "scale": scale, "cudnn_ms": ms_dense, "sparse_ms": ms_sparse,
                         "speedup": ms_dense / ms_sparse})
            r = rows[-1]
            print(f"B={batch:<3} C={channels:<4} {hw:>3}x{hw:<3} {r['dtype']:<9} blocks {r['density_blocks']:.2f} "
                  f"cuDNN {ms_dense:.4f} ms  sparse {ms_sparse:.4f} ms  {r['speedup']:.2f}x  err {err:.2g}/{scale:.2g}",
                  flush=True)
    info = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
            "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conv.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
