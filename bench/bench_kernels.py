"""Kernel level: ``Y = W @ X`` for a sparse ``W`` [M, K] and dense ``X`` [K, N], every backend.

Cases are generated from ``--bench-size`` (harness.SIZE_CONFIGS) and the backend registry
(backends.BACKENDS): shape x dtype x device x structure x density x backend x batch N.
pytest-benchmark groups them by operation, shape, batch, dtype and device, so each group holds
the dense baseline beside every sparse backend at every density; ``sparse-lth report`` turns
the JSON into speed-ups over dense, bytes over dense and crossover densities.

Every case first checks its output against the dense product once (a wrong kernel cannot
score) and records the representation's bytes, the density and its GFLOP/s in ``extra_info``.
Every sparse case also measures its speed-up over dense itself, in the same run: dense
``torch.mm`` on the same masked weight and the same X, alternated with the sparse call in short
bursts (harness.run_speedup; ``extra_info["speedup_interleaved"]``, the median of bursts).
That ratio, not dense time / time from two benchmarks timed minutes apart, is what the report
shows. Under ``--benchmark-disable`` it is skipped.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from backends import BACKENDS, BASELINE, Backend, Weight, operand_bytes, to_torch
from harness import (SHORT_DTYPE, assert_close, bench_devices, bench_dtypes, machine_info, run_benchmark,
                     run_speedup, size_config)

OP = "matmul"


@dataclass(frozen=True)
class Case:
    """One benchmark: which product, which weight, which backend."""

    M: int
    K: int
    N: int
    dtype: torch.dtype
    device: str
    structure: str  # "dense" (baseline) | "unstructured" | "block16" | ...
    density: float
    backend: str

    @property
    def blocksize(self) -> int | None:
        return int(self.structure[len("block"):]) if self.structure.startswith("block") else None

    @property
    def layout(self) -> str:
        return {"dense": "dense", "unstructured": "csr"}.get(self.structure, "bsr")

    @property
    def group(self) -> str:
        return f"{OP} {self.M}x{self.K} N={self.N} {SHORT_DTYPE[self.dtype]} {self.device}"

    @property
    def id(self) -> str:
        return (f"{self.backend}-{self.structure}-d{self.density:g}-N{self.N}-{self.M}x{self.K}-"
                f"{SHORT_DTYPE[self.dtype]}-{self.device}")


def generate_cases(config: pytest.Config) -> list[Case]:
    """All cases for this session, ordered so consecutive cases share one weight (cached)."""
    cfg = size_config(config)
    cases = []
    for device in bench_devices(config):
        for dtype in bench_dtypes(config, device):
            for (M, K), batches in cfg.shapes.items():
                weights = [("dense", 1.0)] + [(s, d) for s in cfg.structures for d in cfg.densities]
                for structure, density in weights:
                    probe = Case(M, K, 1, dtype, device, structure, density, "")
                    for backend in BACKENDS.values():
                        if not backend.supports(probe.layout, device, dtype, probe.blocksize):
                            continue
                        cases += [Case(M, K, N, dtype, device, structure, density, backend.name) for N in batches]
    return cases


_CASES: dict[str, Case] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Parametrized by the id string (what pytest-benchmark writes to its JSON as the param);
    # the test looks its Case up. extra_info carries every field for the report.
    if "case_id" in metafunc.fixturenames:
        cases = generate_cases(metafunc.config)
        _CASES.update((c.id, c) for c in cases)
        metafunc.parametrize("case_id", [c.id for c in cases], ids=[c.id for c in cases])


# -- operands, cached across consecutive cases ----------------------------------------------------
def _exact_mask(rows: int, cols: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """A random bool mask with exactly round(density * rows * cols) entries alive (at least one),
    so that every backend and structure is measured at the density the grid names."""
    alive = max(1, round(density * rows * cols))
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[torch.randperm(rows * cols, generator=gen)[:alive]] = True
    return mask.reshape(rows, cols)


class _Problem:
    """The weight of one (shape, dtype, device, structure, density), with its operands per
    backend and its inputs and dense references per batch: built once, reused by the next cases."""

    def __init__(self, case: Case):
        M, K = case.M, case.K
        seed = zlib.crc32(f"{M}x{K} {case.structure} {case.density}".encode())  # stable across runs
        gen = torch.Generator().manual_seed(seed)
        if case.structure == "dense":
            mask = torch.ones(M, K, dtype=torch.bool)
        elif case.blocksize is None:
            mask = _exact_mask(M, K, case.density, gen)
        else:  # whole b x b tiles, the tile density exact
            b = case.blocksize
            mask = _exact_mask(M // b, K // b, case.density, gen).repeat_interleave(b, 0).repeat_interleave(b, 1)
        # Scaled like a Glorot layer, so fp16 products stay in range at any K.
        dense = (torch.randn(M, K, generator=gen) * K ** -0.5) * mask
        self.mask = mask.to(case.device)
        self.dense = dense.to(device=case.device, dtype=case.dtype)
        self.nnz = int(mask.sum())
        self.operands: dict[str, Any] = {}
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def weight(self, case: Case) -> Weight:
        return Weight(self.dense, self.mask, case.layout, case.blocksize)

    def operand(self, backend: Backend, case: Case) -> Any:
        if backend.name not in self.operands:
            self.operands[backend.name] = backend.prepare(self.weight(case))
        return self.operands[backend.name]

    def input_and_reference(self, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        """X [K, N] and the dense product, in fp64 on the CPU (fp32 on a GPU: fp64 is slow there)."""
        if case.N not in self.inputs:
            gen = torch.Generator().manual_seed(case.K * 7919 + case.N)
            X = torch.randn(case.K, case.N, generator=gen).to(device=case.device, dtype=case.dtype)
            ref_dtype = torch.float64 if case.device == "cpu" else torch.float32
            self.inputs[case.N] = (X, self.dense.to(ref_dtype) @ X.to(ref_dtype))
        return self.inputs[case.N]


_cache: dict[tuple, _Problem] = {}


def problem(case: Case) -> _Problem:
    key = (case.M, case.K, case.dtype, case.device, case.structure, case.density)
    if key not in _cache:
        _cache.clear()  # one weight at a time: large sizes hold hundreds of MB each
        _cache[key] = _Problem(case)
    return _cache[key]


# -- the benchmark --------------------------------------------------------------------------------
def test_matmul(benchmark, case_id: str, pytestconfig: pytest.Config) -> None:
    cfg = size_config(pytestconfig)
    case = _CASES[case_id]
    backend = BACKENDS[case.backend]
    prob = problem(case)
    operand = prob.operand(backend, case)
    X, ref = prob.input_and_reference(case)

    try:  # the first call also warms up (Triton compiles and autotunes here)
        out = to_torch(backend.run(operand, X))
    except (RuntimeError, NotImplementedError) as e:
        if backend.peer:
            pytest.skip(f"{backend.name} refuses {case.layout} {case.dtype} on {case.device}: {str(e).splitlines()[0]}")
        raise
    assert_close(out, ref, case.dtype, case.id)

    M, K, N = case.M, case.K, case.N
    dense_bytes = M * K * torch.empty((), dtype=case.dtype).element_size()
    weight_bytes = operand_bytes(operand)
    benchmark.group = case.group
    benchmark.extra_info.update({
        "kind": "kernel", "op": OP, "M": M, "K": K, "N": N, "shape": f"{M}x{K}",
        "dtype": SHORT_DTYPE[case.dtype], "device": case.device, **machine_info(case.device),
        "backend": backend.name, "backend_label": backend.label, "layout": case.layout,
        "structure": case.structure, "blocksize": case.blocksize,
        "density": prob.nnz / (M * K), "density_nominal": case.density,
        "sparsity_pct": round(100 * (1 - case.density), 2), "nnz": prob.nnz,
        "weight_bytes": weight_bytes, "dense_bytes": dense_bytes, "bytes_ratio": weight_bytes / dense_bytes,
        "baseline": backend.name == BASELINE, "flops": 2 * prob.nnz * N, "dense_flops": 2 * M * K * N,
    })
    def run() -> object:
        return backend.run(operand, X)

    if backend.name == BASELINE:
        run_benchmark(benchmark, run, case.device, cfg)
    else:
        # Against the dense product of this very weight (pruned entries zero) and X: the same
        # shapes, inputs and output; a dense product's cost does not depend on the values.
        dense = BACKENDS[BASELINE]
        dense_operand = prob.operand(dense, case)
        run_speedup(benchmark, lambda: dense.run(dense_operand, X), run, case.device, cfg)
    if not benchmark.disabled:
        median = float(benchmark.stats.stats.median)
        benchmark.extra_info["gflops"] = 2 * prob.nnz * N / median / 1e9
        benchmark.extra_info["gflops_dense_equiv"] = 2 * M * K * N / median / 1e9
