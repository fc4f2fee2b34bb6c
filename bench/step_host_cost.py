#!/usr/bin/env python
"""The host's share of a training step: Python, autograd and dispatch, with the Triton kernels
stubbed out. On a GPU a small step (4096 x 4096 at batch 64) is bound by this, not by the
kernels (an H200 worked 92 us of a 1.6 ms sparse step), so a CPU can say what a path costs
there before a GPU measures it.

One tiny layer (128 x 128, BSR 32 x 32 at half the blocks, batch 64, one thread) takes three
steps, timed interleaved (medians of 15 bursts of 200 steps):

* ``dense``: the masked-dense step (``bench_sparse_training.make_steps``'s, on ``nn.Linear``);
* ``sparse_eager``: ``ops.linear_bias`` with the Triton backend: the layer's eager path;
* ``sparse_ops``: ``ops.linear`` and its registered backward, the custom ops' dispatch.

The Triton launchers return empty tensors (a launch itself costs 15-45 us on an H200,
bench/launch_cost.py); everything else (the sparse tensors built, the values gathered into the
transposed order, the checks, autograd, the fused Adam) runs as in a step.

    TRITON_INTERPRET=1 python bench/step_host_cost.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend accepts CPU tensors

import torch  # noqa: E402

from bench_sparse_training import make_steps  # noqa: E402  (bench/ is on the path when run as a script)
from harness import interleaved  # noqa: E402
from sparse_lth import kernels  # noqa: E402
from sparse_lth.nn import ops  # noqa: E402

WIDTH, BATCH, BLOCK = 128, 64, 32


def _stub_kernels() -> None:
    kernels.triton_bsr_linear = lambda W, x, **_: torch.empty(x.shape[0], W.shape[0], dtype=x.dtype)
    kernels.triton_bsr_sddmm = lambda crow, col, block, dy, x, **_: torch.empty(col.numel(), *block, dtype=x.dtype)


def steps() -> dict:
    """The masked-dense step of bench_sparse_training and two sparse steps of its layer."""
    made, layers, _ = make_steps(WIDTH, "bsr", BLOCK, 0.5, "cpu", torch.float32, batch=BATCH)
    sparse, opt = layers["sparse"], layers["opt_sparse"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTH, generator=gen).requires_grad_()
    dy = torch.randn(BATCH, WIDTH, generator=gen)
    pattern = (sparse.crow_indices, sparse.col_indices, sparse.values)
    transposed = (sparse.crow_t, sparse.col_t, sparse.perm)

    def sparse_eager() -> None:
        opt.zero_grad()
        ops.linear_bias(x, *pattern, sparse.bias, WIDTH, *transposed, backend="triton").backward(dy)
        opt.step()

    def sparse_ops() -> None:
        opt.zero_grad()
        (ops.linear(x, *pattern, WIDTH, *transposed, "triton") + sparse.bias).backward(dy)
        opt.step()

    return {"dense": made["dense"], "sparse_eager": sparse_eager, "sparse_ops": sparse_ops}


def main() -> None:
    torch.set_num_threads(1)
    _stub_kernels()
    timed = steps()
    for step in timed.values():
        for _ in range(50):
            step()
    seconds = interleaved(timed, "cpu", 15, dict.fromkeys(timed, 200)).seconds
    dense = seconds["dense"]
    for name, s in seconds.items():
        us = s * 1e6
        print(f"{name:13s} {us:7.1f} us a step  ({s / dense:.2f}x the masked-dense step's host time)")


if __name__ == "__main__":
    main()
