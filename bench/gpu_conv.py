#!/usr/bin/env python
"""The block-sparse Triton conv (kernels/conv.py) against cuDNN on a GPU: the issue's point of
3x3 convs at 90% block sparsity with 32 x 32 blocks, fp16 / bf16, ResNet-like stages.

Each shape: a dense conv weight pruned to whole (32 output x 32 input channel) tiles per tap,
kept at ``--density``; the Triton conv as ``SparseConv2d`` runs it (``prepare_bsr_conv2d``'s
launch, checked once) checked against ``F.conv2d`` on the masked weight,
then both timed interleaved (``harness.interleaved``: ``--reps`` rounds of a ``--calls``-call
burst each, medians; host wall time per call, one synchronize a burst: what a model pays), cuDNN
with ``torch.backends.cudnn.benchmark`` on. Every point twice: with an NCHW input (the Triton
conv copies it to channels-last first, and its output is NCHW) and a channels-last one (read in
place; what an fp16 CNN on tensor cores usually runs, cuDNN included). On the GPU both calls are
also captured in CUDA graphs and replayed (``graph_speedup``): the GPU's own time, without the
host's launch cost that bounds a batch-1 call (what a model under CUDA graphs pays).

    python3 bench/gpu_conv.py --out $OUT        # on the GPU machine: conv.json, a table on stdout

On a CPU machine ``--dry-run`` runs it under TRITON_INTERPRET=1 on tiny shapes (the numbers
mean nothing; it proves the script; tests/test_triton_conv.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from harness import add_graphed, interleaved  # bench/ is on the path when run as a script

# (batch, channels, map size): ResNet-50-like 3x3 stages, at batch 1 and 32
SHAPES = [(b, c, hw) for b in (1, 32) for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7))]
DRY_SHAPES = [(1, 32, 6), (2, 32, 5)]
FORMATS = ("nchw", "channels_last")


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

    from sparse_lth.kernels import conv_weight_to_bsr, prepare_bsr_conv2d

    device = "cpu" if args.dry_run else "cuda"
    dtypes = (torch.float32,) if args.dry_run else (torch.float16, torch.bfloat16)
    torch.backends.cudnn.benchmark = True
    args.out.mkdir(parents=True, exist_ok=True)
    device_name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()

    def save(rows: list[dict]) -> None:
        info = {"device": device_name, "torch": torch.__version__, "rows": rows}
        (args.out / "conv.json").write_text(json.dumps(info, indent=1))

    rows = []
    gen = torch.Generator().manual_seed(0)
    for batch, channels, hw in (DRY_SHAPES if args.dry_run else SHAPES):
        tiles = torch.rand(channels // 32, channels // 32, 3, 3, generator=gen) < args.density
        mask = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)
        for dtype in dtypes:
            w = (torch.randn(channels, channels, 3, 3, generator=gen) * mask).to(device, dtype)
            crow, col, values = conv_weight_to_bsr(w, mask.to(device), (32, 32))
            nchw = torch.randn(batch, channels, hw, hw, generator=gen).to(device, dtype)
            for fmt in FORMATS:
                # channels-last: the input and cuDNN's weight both, as model.to(memory_format=...) leaves them
                x, wd = ((nchw, w) if fmt == "nchw" else
                         (nchw.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)))
                # the launch SparseConv2d keeps for this input (its checks done once, here)
                launch = prepare_bsr_conv2d(x, crow, col, values, out_channels=channels, kernel_size=(3, 3),
                                            padding=(1, 1))
                fns = {"cudnn": lambda x=x, wd=wd: F.conv2d(x, wd, padding=1),
                       "sparse": lambda x=x, launch=launch: launch(x)}  # no bias
                got, want = fns["sparse"](), fns["cudnn"]()
                err = (got.float() - want.float()).abs().max().item()
                scale = want.float().abs().max().item()
                # both calls also captured in CUDA graphs: the GPU's time, no launch cost
                errors = add_graphed(fns, ("cudnn", "sparse")) if device == "cuda" else {}
                times = interleaved(fns, device, args.reps, {name: args.calls for name in fns}).seconds
                rows.append({"batch": batch, "channels": channels, "hw": hw, "dtype": str(dtype).split(".")[-1],
                             "format": fmt, "density_blocks": float(tiles.float().mean()), "block": [32, 32],
                             "max_abs_err": err, "scale": scale, "cudnn_ms": times["cudnn"] * 1e3,
                             "sparse_ms": times["sparse"] * 1e3, "speedup": times["cudnn"] / times["sparse"],
                             "sparse_channels_last_out": got.is_contiguous(memory_format=torch.channels_last)
                             and not got.is_contiguous(),
                             "graph_speedup": (times["cudnn_graph"] / times["sparse_graph"]
                                               if {"cudnn_graph", "sparse_graph"} <= times.keys() else None),
                             "graph_ms": {k[:-6]: v * 1e3 for k, v in times.items() if k.endswith("_graph")},
                             "errors": errors})
                r = rows[-1]
                print(f"B={batch:<3} C={channels:<4} {hw:>3}x{hw:<3} {r['dtype']:<9} {fmt:<13} blocks "
                      f"{r['density_blocks']:.2f} cuDNN {r['cudnn_ms']:.4f} ms  sparse {r['sparse_ms']:.4f} ms  "
                      f"{r['speedup']:.2f}x  graphed {r['graph_speedup'] or float('nan'):.2f}x  "
                      f"err {err:.2g}/{scale:.2g}", flush=True)
                save(rows)  # after every point: a run cut short by its timeout keeps what it measured
    print("summary (speed-up over cuDNN: min / median / max over the shapes):")
    for key in sorted({(r["batch"], r["format"], r["dtype"]) for r in rows}):
        for what in ("speedup", "graph_speedup"):
            s = [r[what] for r in rows if (r["batch"], r["format"], r["dtype"]) == key and r[what] is not None]
            if s:
                print(f"  batch {key[0]:<3} {key[1]:<13} {key[2]:<9} {what:<13} "
                      f"{min(s):.2f} / {statistics.median(s):.2f} / {max(s):.2f}x")


if __name__ == "__main__":
    main()
