"""Plain torch references for the sparse kernels: what the tests compare against.

Each densifies the sparse matrix (``to_dense`` works for CSR and BSR alike) and multiplies in a
chosen precision. fp64 is the truth; ``dtype=X.dtype`` gives torch's own result at the working
precision, the yardstick of the three-way tolerance rule (tests/conftest.py).
"""

from __future__ import annotations

import torch

__all__ = ["sparse_matmul_reference", "sparse_linear_reference"]


def sparse_matmul_reference(W: torch.Tensor, X: torch.Tensor, *,
                            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``W @ X`` computed densely in ``dtype`` (on W's device), for sparse W [M, K], X [K, N].

    >>> import torch
    >>> W = torch.eye(3).to_sparse_csr()
    >>> sparse_matmul_reference(W, torch.ones(3, 2)).dtype
    torch.float64
    """
    return W.to_dense().to(dtype) @ X.to(device=W.device, dtype=dtype)


def sparse_linear_reference(W: torch.Tensor, x: torch.Tensor, *,
                            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A linear layer's ``x @ W.T`` computed densely in ``dtype``, for x [..., K], W [M, K].

    >>> import torch
    >>> W = torch.eye(3).to_sparse_bsr((1, 1))
    >>> sparse_linear_reference(W, torch.ones(4, 5, 3)).shape
    torch.Size([4, 5, 3])
    """
    return x.to(device=W.device, dtype=dtype) @ W.to_dense().to(dtype).T
