"""Plain torch references for the sparse kernels: what the tests compare against.

Each densifies the sparse matrix (``to_dense`` works for CSR and BSR alike) and multiplies in a
chosen precision. fp64 is the truth; ``dtype=X.dtype`` gives torch's own result at the working
precision, the yardstick of the three-way tolerance rule (tests/conftest.py).
"""

from __future__ import annotations

import torch

__all__ = ["sparse_matmul_reference", "sparse_linear_reference", "sddmm_reference"]


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


def sddmm_reference(crow: torch.Tensor, col: torch.Tensor, dy: torch.Tensor, x: torch.Tensor,
                    blocksize: tuple[int, int] | None = None, *,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A sparse linear layer's weight gradient ``dy.T @ x`` computed densely in ``dtype`` and
    sampled at W's pattern (``crow`` / ``col``): [nnz] values for CSR (``blocksize`` None), or
    [nblocks, br, bc] blocks for BSR, in W's storage order.

    >>> import torch
    >>> crow, col = torch.tensor([0, 1, 1, 3]), torch.tensor([2, 0, 1])
    >>> dy, x = torch.ones(4, 3), torch.arange(12.0).reshape(4, 3)
    >>> sddmm_reference(crow, col, dy, x).tolist()  # column sums of x at columns 2, 0, 1
    [26.0, 18.0, 22.0]
    """
    full = dy.to(dtype).T @ x.to(device=dy.device, dtype=dtype)  # [M, K]
    crow, col = crow.to(dy.device).long(), col.to(dy.device).long()
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=dy.device),
                                   crow[1:] - crow[:-1])
    if blocksize is None:
        return full[rows, col]
    br, bc = blocksize
    M, K = full.shape
    blocks = full.reshape(M // br, br, K // bc, bc).permute(0, 2, 1, 3)  # [M/br, K/bc, br, bc]
    return blocks[rows, col]
