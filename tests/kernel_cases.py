"""What the Triton kernel tests share: where they run, their dtypes, seeded data, NaN-poisoned
outputs, and the three-way error rule (a module of its own: test files import it by name, like
tolerances.py)."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from tolerances import TOLERANCE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: torch's beta notices on every sparse tensor built: noise in these tests.
QUIET_SPARSE_WARNINGS = pytest.mark.filterwarnings(
    "ignore:Sparse (CSR|BSR) tensor support is in beta:UserWarning",
    "ignore:Sparse invariant checks are implicitly disabled:UserWarning",
)


def require_kernel_runtime():
    """Skip the calling test module unless the Triton kernels can run here: triton installed,
    and CUDA or the interpreter (``TRITON_INTERPRET=1``). Returns the triton module."""
    triton = pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not set", allow_module_level=True)
    return triton


def seeded(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh data per case, same on every run
    (crc32, not hash(): str hashes change between processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rand_dense(*shape: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def nan_like(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_within_three_way(out: torch.Tensor, exact: torch.Tensor, torch_at_dtype: torch.Tensor,
                     dtype: torch.dtype) -> None:
    """Kernel error vs fp64 (``exact``) <= factor x torch's own error at the dtype
    (``torch_at_dtype``) + atol x scale; no NaN (an unwritten, NaN-poisoned output)."""
    assert out.dtype == dtype and out.shape == exact.shape
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN outputs"
    if not out.numel():
        return
    err_kernel = (out.double() - exact).abs().max().item()
    err_torch = (torch_at_dtype.double() - exact).abs().max().item()
    scale = max(exact.abs().max().item(), 1.0)
    tol = TOLERANCE[dtype]
    bound = tol["factor"] * err_torch + tol["atol"] * scale
    assert err_kernel <= bound, (f"{dtype}: kernel error {err_kernel:.3g} > bound {bound:.3g} "
                                 f"(torch's own error {err_torch:.3g})")
