#!/usr/bin/env python
"""Stress the BSR decode kernel's cross-program join on a real GPU: many launches over random
block patterns (heavy rows cut among many programs, runs of empty rows), random SM counts for
the grid (1 up to twice the device's), every config the launcher may pick, both layouts, fp16 /
bf16 / fp32. Each launch writes into a NaN-poisoned output, is checked against a float64
product, is run twice to prove the join bitwise reproducible for a fixed grid, and must leave
the arrival counters at zero. Ends by itself within ``--budget`` seconds.

    python3 bench/gpu_stress.py --out $OUT --budget 90     # on the GPU: stress.json, a summary

On a CPU machine ``--dry-run`` runs a few launches under TRITON_INTERPRET=1 (proves the script).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

# float64 error of the kernel over float64 error of torch's own product in the same dtype: the
# kernel must not be much worse than torch (floors for products whose torch error is ~0)
RATIO, FLOOR = 4.0, {"float32": 2e-3, "float16": 4e-3, "bfloat16": 3e-2}


def random_pattern(rng: random.Random, torch, rows: int, cols: int):
    # empty and one-block matrices are edge cases: a few of them, most calls split real rows
    kind = rng.choices(["uniform", "heavy_row", "empty_runs", "one_block", "empty"],
                       weights=[4, 3, 3, 1, 1])[0]
    density = rng.choice([0.02, 0.1, 0.3, 0.7, 1.0])
    keep = torch.rand(rows, cols) < density
    if kind == "heavy_row":
        keep[rng.randrange(rows)] = True
    elif kind == "empty_runs":
        start = rng.randrange(rows)
        keep[start:start + rng.randint(1, max(rows // 2, 1))] = False
    elif kind == "one_block":
        keep[:] = False
        keep[rng.randrange(rows), rng.randrange(cols)] = True
    elif kind == "empty":
        keep[:] = False
    return kind, keep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=90.0)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from sparse_lth.kernels import bsr_decode

    start = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    sms = bsr_decode.sm_count(dev)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    # a small menu of compile-time shapes (each new one compiles), everything else at run time
    blocks = [(16, 16), (64, 64), (32, 64)] if not args.dry_run else [(16, 16)]
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    if args.dry_run:  # the interpreter's dot of bf16 is wrong; fp16 and fp32 are enough here
        dtypes = [torch.float16]
    ns = [1, 5, 16] if not args.dry_run else [1, 3]
    max_blocks = 160 if not args.dry_run else 6
    calls = args.calls if not args.dry_run else 6
    cases, failures, worst = [], [], {}
    for i in range(calls):
        if time.perf_counter() - start > args.budget:
            break
        br, bc = rng.choice(blocks)
        dtype = rng.choice(dtypes)
        N = rng.choice(ns)
        linear = rng.random() < 0.5
        rows, cols = rng.randint(1, max_blocks), rng.randint(1, max_blocks // 2 or 1)
        kind, keep = random_pattern(rng, torch, rows, cols)
        # built on the device: on the CPU, drawing the larger matrices took most of each call
        mask = keep.to(dev).repeat_interleave(br, 0).repeat_interleave(bc, 1)
        dense = torch.randn(rows * br, cols * bc, device=dev) * mask
        W = dense.to(dtype).to_sparse_bsr((br, bc))
        if rng.random() < 0.5:
            W = torch.sparse_bsr_tensor(W.crow_indices().int(), W.col_indices().int(),
                                        W.values(), W.shape)
        M, K = W.shape
        elem = torch.finfo(dtype).bits // 8
        from triton import next_power_of_2
        configs = bsr_decode.decode_configs(bsr_decode.DECODE_CONFIGS, next_power_of_2(N), br,
                                            bc, elem)
        c = rng.choice(configs)
        config = dict(PPS=c.kwargs["PPS"], U=c.kwargs["U"], num_warps=c.num_warps)
        n_sm = rng.choice([1, 2, 3, 7, sms // 2 or 1, sms, 2 * sms])
        if linear:
            X = torch.randn(N, K, device=dev).to(dtype)
            ref = (X.double() @ W.to_dense().double().t())
            peer = X @ W.to_dense().t()
            layout = dict(x_t=True, stride_x=K, y_t=True, stride_y=M)
            shape = (N, M)
        else:
            X = torch.randn(K, N, device=dev).to(dtype)
            ref = W.to_dense().double() @ X.double()
            peer = W.to_dense() @ X
            layout = dict(x_t=False, stride_x=N, y_t=False, stride_y=N)
            shape = (M, N)
        outs = []
        for _ in range(2):
            Y = torch.full(shape, float("nan"), dtype=dtype, device=dev)
            bsr_decode.launch_bsr_decode(W, X, Y, N=N, config=config, n_sm=n_sm, **layout)
            outs.append(Y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        norm = ref.norm().item() or 1.0
        err = (outs[0].double() - ref).norm().item() / norm
        peer_err = (peer.double() - ref).norm().item() / norm
        limit = max(RATIO * peer_err, FLOOR[str(dtype).split(".")[1]])
        counters = sum(int(b.abs().sum()) for b in bsr_decode._counters.values())
        case = dict(i=i, block=[br, bc], dtype=str(dtype).split(".")[1], N=N, linear=linear,
                    shape=[M, K], nnzb=int(W.values().shape[0]), pattern=kind, n_sm=n_sm,
                    config=config, err=err, peer_err=peer_err,
                    finite=bool(torch.isfinite(outs[0]).all()),
                    reproducible=bool(torch.equal(outs[0], outs[1])), counters=counters)
        ok = case["finite"] and err <= limit and case["reproducible"] and counters == 0
        case["ok"] = ok
        cases.append(case)
        key = case["dtype"]
        worst[key] = max(worst.get(key, 0.0), err)
        if not ok:
            failures.append(case)
            print("FAIL", json.dumps(case), flush=True)
            for b in bsr_decode._counters.values():  # so one failure does not poison the rest
                b.zero_()
    summary = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                   triton=__import__("triton").__version__, sms=sms, calls=len(cases),
                   failures=len(failures), worst_err=worst,
                   seconds=round(time.perf_counter() - start, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stress.json").write_text(json.dumps(dict(summary=summary, cases=cases),
                                                     indent=1))
    print("STRESS", json.dumps(summary), flush=True)
    return 1 if failures or not cases else 0


if __name__ == "__main__":
    raise SystemExit(main())
