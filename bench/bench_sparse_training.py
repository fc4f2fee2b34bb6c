"""One training step of a wide linear layer, sparse-trained against masked dense (sparse
training issue: at least 6x at 10% density, 10x at 5%, 20x at 2% for 4096 x 4096, batch 64,
fp32, 2 CPU cores; parameter plus Adam state at 5% at most 10% of the dense layer's bytes).
Recorded, never asserted.

- masked dense: ``nn.Linear`` forward and backward (the input's gradient too: a layer inside a
  network), the weight's gradient masked, fused Adam (the search's optimizer), the
  weight re-masked (what a search round does today, ``training.training_step``);
- sparse: ``TrainableSparseLinear`` (forward, the transposed product for dx, SDDMM for the
  stored values' gradient: ``sparse_lth.nn.ops``), Adam on the stored values.

Both step on the same input and output gradient (``y.backward(dy)``: the loss is not what is
measured), from the same weights; one step of each is checked equal first. Layer width is the
size's ``mlp_width`` (4096 by default, 256 small), batch 64. Each density times the sparse step
and its speed-up over masked dense, alternated in bursts (harness.run_speedup, median of
bursts). Bytes: the layer's parameters plus Adam's state after a step, each variant; and the
sparse layer's index buffers (the pattern and its transpose, int32) apart.

CPU: CSR at 10 / 5 / 2 %, and 32 x 32 blocks (BSR) at 5 %. CUDA (``--bench-device cuda``):
bf16, 32 x 32 and 64 x 64 blocks at 5 % (the goal: 2x the masked-dense step on cuBLAS), and CSR at 5 %.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

from harness import bench_devices, machine_info, run_speedup, size_config
from sparse_lth.nn import TrainableSparseLinear
from sparse_lth.optim import Adam

BATCH = 64
#: The interleaved budget of these benchmarks, in multiples of the size's usual one.
STEADY_BUDGET = 20
CPU_CASES = [("csr", None, 0.1), ("csr", None, 0.05), ("csr", None, 0.02), ("bsr", 32, 0.05)]
CUDA_CASES = [("bsr", 32, 0.05), ("bsr", 64, 0.05), ("csr", None, 0.05)]


def _mask(out: int, inp: int, fmt: str, block: int | None, density: float, gen: torch.Generator) -> torch.Tensor:
    if fmt == "csr":
        return torch.rand(out, inp, generator=gen) < density
    tiles = torch.rand(out // block, inp // block, generator=gen) < density
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)


def _state_bytes(opt: Adam) -> int:
    """The parameters' bytes and Adam's two moments (its step counts are scalars)."""
    return sum(t.numel() * t.element_size() for t in [*opt.params, *opt.exp_avgs, *opt.exp_avg_sqs])


def make_steps(width: int, fmt: str, block: int | None, density: float, device: str, dtype: torch.dtype, *,
               inp: int | None = None, batch: int = BATCH, input_grad: bool = True,
               ) -> tuple[dict[str, Callable[[], None]], dict[str, nn.Module], torch.Tensor]:
    """The masked-dense and sparse steps of one layer [width, inp or width] from the same weights
    and inputs; ``input_grad=False``: a network's first layer (no gradient for its input)."""
    inp = inp or width
    gen = torch.Generator().manual_seed(0)
    dense = nn.Linear(inp, width)
    mask = _mask(width, inp, fmt, block, density, gen)
    with torch.no_grad():
        dense.weight.mul_(mask)
    dense = dense.to(device=device, dtype=dtype)
    mask = mask.to(device)
    # in the weight's dtype once, as training.masked_weights does: a bool mask would make every
    # mul_ convert it again (a 64 MB temporary a step at 4096 x 4096, freshly faulted in)
    alive = mask.to(dtype)
    sparse = TrainableSparseLinear.from_linear(dense, mask=mask, format=fmt, blocksize=block or 32)
    # a layer inside a network: the input's gradient is computed too (the transposed product).
    # Two inputs and output gradients in turn: a training step meets a new batch, so no step may
    # find its input still packed from the step before (the CPU kernels keep the last one packed).
    xs = [torch.randn(batch, inp, generator=gen).to(device=device, dtype=dtype).requires_grad_(input_grad)
          for _ in range(2)]
    dys = [torch.randn(batch, width, generator=gen).to(device=device, dtype=dtype) for _ in range(2)]
    # the search's own optimizer (training.make_optimizer): torch's fused Adam, for both
    opt_dense = Adam(dense.parameters(), lr=1e-3)
    opt_sparse = Adam(sparse.parameters(), lr=1e-3)

    turns = {"dense": 0, "sparse": 0}

    def batch_for(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        turns[kind] += 1
        return xs[turns[kind] % 2], dys[turns[kind] % 2]

    def masked_dense_step() -> None:
        x, dy = batch_for("dense")
        opt_dense.zero_grad()
        dense(x).backward(dy)
        dense.weight.grad.mul_(alive)
        opt_dense.step()
        with torch.no_grad():
            dense.weight.mul_(alive)

    def sparse_step() -> None:
        x, dy = batch_for("sparse")
        opt_sparse.zero_grad()
        sparse(x).backward(dy)
        opt_sparse.step()

    steps = {"dense": masked_dense_step, "sparse": sparse_step}
    layers = {"dense": dense, "sparse": sparse, "opt_dense": opt_dense, "opt_sparse": opt_sparse}
    return steps, layers, mask


def check_one_step(steps: dict[str, Callable[[], None]], layers: dict[str, nn.Module], dtype: torch.dtype) -> float:
    """One step of each from the same start: the same weights after it (rounding apart); returns
    the largest difference."""
    steps["dense"]()
    steps["sparse"]()
    sparse, dense = layers["sparse"].dense_weight(), layers["dense"].weight.detach()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(sparse, dense, **tol)
    return float((sparse.float() - dense.float()).abs().max())


def _cases(config: pytest.Config) -> list:
    out = []
    for device in bench_devices(config):
        for fmt, block, density in (CUDA_CASES if device == "cuda" else CPU_CASES):
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            out.append(pytest.param(device, dtype, fmt, block, density,
                                    id=f"{device}-{fmt}{block or ''}-d{density}"))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sparse_case" in metafunc.fixturenames:
        metafunc.parametrize("device,dtype,fmt,block,density", _cases(metafunc.config))
        metafunc.parametrize("sparse_case", [None], ids=[""])


def test_sparse_training_step(benchmark, pytestconfig, sparse_case, device, dtype, fmt, block, density) -> None:
    cfg = size_config(pytestconfig)
    width = cfg.mlp_width
    steps, layers, mask = make_steps(width, fmt, block, density, device, dtype)
    check_one_step(steps, layers, dtype)
    dense_bytes, sparse_bytes = _state_bytes(layers["opt_dense"]), _state_bytes(layers["opt_sparse"])
    benchmark.group = f"sparse training step {width}x{width} B={BATCH} {device}"
    benchmark.extra_info.update({
        "kind": "sparse_training_step", "device": device, **machine_info(device), "dtype": str(dtype),
        "shape": [width, width], "batch": BATCH, "format": fmt, "block": block, "density": density,
        "stored": int(layers["sparse"].values.numel()), "state_bytes_dense": dense_bytes,
        "state_bytes_sparse": sparse_bytes, "bytes_fraction": sparse_bytes / dense_bytes,
        "index_bytes": sum(b.numel() * b.element_size() for b in layers["sparse"].buffers()),
    })
    # Bursts long enough for several sparse steps in a row, as a search runs them: with the
    # suite's usual budget each sparse burst was one step right after a dense one (whose 64 MB
    # of fresh gradient pages it met cold), 10-25 % slower than the steps of a round.
    cfg = dataclasses.replace(cfg, interleaved_s=cfg.interleaved_s * STEADY_BUDGET)
    speedup = run_speedup(benchmark, steps["dense"], steps["sparse"], device, cfg)
    if speedup is not None:
        print(f"\n{device} {fmt}{block or ''} d={density}: sparse step {speedup:.2f}x masked dense, "
              f"state {sparse_bytes / dense_bytes:.3f} of dense")
