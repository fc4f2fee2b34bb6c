#!/usr/bin/env python
"""The sparse training issue's GPU point: one training step of a 4096 x 4096 linear layer
(forward, backward with the input's gradient, Adam), batch 64, bf16, 5% density, sparse
(``TrainableSparseLinear``, BSR with 32 x 32 and 64 x 64 blocks, then CSR) against masked dense on
cuBLAS (``bench_sparse_training.make_steps``: the same steps as the CPU benchmark). Goal: the
sparse step at least 2x the masked-dense step with both block sizes.

Per case, five steps, timed interleaved (``--reps`` bursts of ``--calls`` steps each, host wall
time per step with one synchronize a burst, medians):

* ``dense``: the masked-dense step, eager (the baseline of every ratio);
* ``sparse``: the sparse step, eager: the layer's autograd.Function runs the custom ops' bodies
  (``ops.linear_bias``), no dispatcher in between;
* ``sparse_ops``: the same layer's products through the custom ops, as before that path (an
  H200 gave 0.42-0.46x at batch 64, bound by their Python dispatch);
* ``dense_graph`` / ``sparse_graph``: each step captured whole in a CUDA graph after three
  warm-up steps on a side stream (PyTorch's whole-network capture), replayed: what a user who
  captures their step gets, and where the GPU's own time decides.

Then the goal points again at batch 2048 while ``--budget`` (seconds from the start) lasts. Each
case first checks one eager step of each side equal (bf16 tolerance). A case or a capture that
fails is recorded with its error and the rest goes on.

    python3 bench/gpu_training.py --out $OUT     # on the GPU (gpu_followup.sh calls it)

``--dry-run`` runs it on the CPU on a 512-wide layer in fp32 without the graphs (the numbers
mean nothing; it proves the script; tests/test_trainable.py runs it).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench_sparse_training import check_one_step, make_steps  # bench/ is on the path when run as a script
from harness import add_graphed, interleaved

CASES = [("bsr", 32, 64), ("bsr", 64, 64), ("csr", None, 64), ("bsr", 32, 2048), ("bsr", 64, 2048)]
DENSITY = 0.05


def through_the_ops(layer, opt) -> Callable[[], None]:
    """A sparse step whose products go through the custom ops (``ops.linear`` and its registered
    backward), not the layer's eager path."""
    from sparse_lth.nn import ops

    def step(x: torch.Tensor, dy: torch.Tensor) -> None:
        opt.zero_grad()
        y = ops.linear(x, layer.crow_indices, layer.col_indices, layer.values, layer.matrix_shape[0],
                       layer.crow_t, layer.col_t, layer.perm)
        (y + layer.bias).backward(dy)
        opt.step()

    return step


def measure(fmt: str, block: int | None, batch: int, width: int, device: str, dtype: torch.dtype, args) -> dict:
    steps, layers, _ = make_steps(width, fmt, block, DENSITY, device, dtype, batch=batch)
    err = check_one_step(steps, layers, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=gen).to(device, dtype).requires_grad_()
    dy = torch.randn(batch, width, generator=gen).to(device, dtype)
    ops_step = through_the_ops(layers["sparse"], layers["opt_sparse"])
    timed = {"dense": steps["dense"], "sparse": steps["sparse"], "sparse_ops": lambda: ops_step(x, dy)}
    errors = add_graphed(timed, ("dense", "sparse")) if device == "cuda" else {}
    for step in timed.values():  # a first call of each outside the clock (first-use costs)
        step()
    seconds = interleaved(timed, device, args.reps, dict.fromkeys(timed, args.calls)).seconds
    ms = {name: s * 1e3 for name, s in seconds.items()}
    return {"format": fmt, "block": block, "batch": batch, "shape": [width, width], "density": DENSITY,
            "dtype": str(dtype), "stored": int(layers["sparse"].values.numel()), "check_max_abs_err": float(err),
            "ms": ms, "speedup_vs_dense": {k: ms["dense"] / v for k, v in ms.items() if k != "dense"},
            "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget", type=float, default=70.0, help="seconds from the start; later cases skipped")
    args = ap.parse_args()
    start = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    width = 512 if args.dry_run else 4096
    args.out.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict], skipped: list[str]) -> None:
        info = {"device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(),
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "seconds": time.perf_counter() - start, "skipped": skipped, "rows": rows}
        (args.out / "training.json").write_text(json.dumps(info, indent=1))

    rows, skipped = [], []
    for fmt, block, batch in CASES:
        if time.perf_counter() - start > args.budget * 0.8:
            skipped.append(f"{fmt}{block or ''} B={batch}")
            continue
        try:
            rows.append(measure(fmt, block, batch, width, device, dtype, args))
        except Exception as exc:  # noqa: BLE001 - the next case still runs
            rows.append({"format": fmt, "block": block, "batch": batch, "failed": f"{type(exc).__name__}: {exc}"[:600]})
        row = rows[-1]
        speed = "  ".join(f"{k} {v:.2f}x" for k, v in row.get("speedup_vs_dense", {}).items())
        print(f"{fmt}{block or ''} B={batch}: dense {row.get('ms', {}).get('dense', float('nan')):.3f} ms  {speed}"
              f"{'  FAILED ' + row['failed'] if 'failed' in row else ''}"
              f"{'  ' + str(row['errors']) if row.get('errors') else ''}", flush=True)
        save(rows, skipped)  # after every case: a run its timeout cuts keeps what it measured
    save(rows, skipped)
    if skipped:
        print("skipped (budget):", ", ".join(skipped))


if __name__ == "__main__":
    main()
