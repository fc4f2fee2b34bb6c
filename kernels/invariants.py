"""The index invariants a kernel relies on before it follows a CSR / BSR tensor's pointers.

torch builds sparse tensors unchecked when asked to (``check_invariants=False``), and then a
column index past the end makes scipy's loops and Triton read out of bounds (garbage that
changes per call, or a segmentation fault), and decreasing row pointers give wrong sums.
:func:`check_index_invariants` refuses such tensors with a ValueError that points at the entry.

What is checked (all a kernel needs to stay in bounds and sum each stored value once):

* a 2-D CSR / BSR tensor; for BSR, values ``[nnz, br, bc]`` whose blocks tile the shape;
* ``crow_indices`` and ``col_indices`` 1-D, both int32 or both int64;
* ``crow_indices`` has ``rows + 1`` entries (block rows for BSR), starts at 0, never
  decreases and ends at ``nnz``, the number of column indices;
* the values hold ``nnz`` entries (blocks), and every column index is in ``[0, cols)``.

Not checked: sorted, unique columns within a row (every kernel here sums any order; the
canonical form is :func:`sparse_lth.formats.check_format`'s job).

Cost: O(rows + nnz) on the tensor's device and one host synchronization, so callers that run
the same weight many times check once (``SparseLinear`` does, at construction) and pass
``check_invariants=False`` to the kernels afterwards.
"""

from __future__ import annotations

import torch

__all__ = ["check_index_invariants"]

_INDEX_DTYPES = (torch.int32, torch.int64)
_LAYOUT_NAMES = {torch.sparse_csr: "CSR", torch.sparse_bsr: "BSR"}


def _grid(W: torch.Tensor, name: str) -> tuple[int, int, str]:
    """(rows, cols) of the index grid (block rows / columns for BSR) and the unit's name."""
    values = W.values()
    if W.layout == torch.sparse_csr:
        if values.dim() != 1:
            raise ValueError(f"{name}: CSR values must be 1-D, got shape {tuple(values.shape)} "
                             "(hybrid tensors with dense dimensions are not supported)")
        return W.shape[0], W.shape[1], ""
    if values.dim() != 3:
        raise ValueError(f"{name}: BSR values must be [blocks, rows, cols], got shape {tuple(values.shape)}")
    br, bc = values.shape[1:]
    if br < 1 or bc < 1 or W.shape[0] % br or W.shape[1] % bc:
        raise ValueError(f"{name}: shape {tuple(W.shape)} is not a whole number of {br}x{bc} blocks")
    return W.shape[0] // br, W.shape[1] // bc, "block "


def _first(condition: torch.Tensor) -> int:
    return int(condition.nonzero()[0, 0])


def _explain(crow: torch.Tensor, col: torch.Tensor, nnz: int, cols: int, name: str, unit: str) -> None:
    """The slow path, reached only when a check failed: find the first offending entry."""
    where = f"{name} ({'BSR block' if unit else 'CSR'} indices)"
    if int(crow[0]) != 0:
        raise ValueError(f"{where}: crow_indices[0] is {int(crow[0])}, must be 0")
    drops = crow[1:] < crow[:-1]
    if bool(drops.any()):
        row = _first(drops)
        raise ValueError(f"{where}: crow_indices decreases at {unit}row {row} "
                         f"({int(crow[row])} then {int(crow[row + 1])})")
    if int(crow[-1]) != nnz:
        raise ValueError(f"{where}: crow_indices[-1] is {int(crow[-1])}, must equal the number of "
                         f"stored {'blocks' if unit else 'values'} ({nnz})")
    bad = (col < 0) | (col >= cols)
    k = _first(bad)
    row = int(torch.searchsorted(crow, torch.tensor(k, dtype=crow.dtype, device=crow.device), right=True)) - 1
    raise ValueError(f"{where}: column index {int(col[k])} at position {k} ({unit}row {row}) is out of "
                     f"range [0, {cols})")


def check_index_invariants(W: torch.Tensor, name: str = "W") -> None:
    """Raise ValueError unless the CSR / BSR tensor ``W`` is safe for a kernel to follow (see
    the module doc for the list); ``name`` starts the message.

    >>> import torch
    >>> check_index_invariants(torch.eye(3).to_sparse_csr())  # fine: returns None
    >>> bad = torch.sparse_csr_tensor(torch.tensor([0, 2]), torch.tensor([0, 7]), torch.ones(2), (1, 3),
    ...                               check_invariants=False)
    >>> check_index_invariants(bad, "fc.weight")
    Traceback (most recent call last):
    ...
    ValueError: fc.weight (CSR indices): column index 7 at position 1 (row 0) is out of range [0, 3)
    """
    if not isinstance(W, torch.Tensor) or W.layout not in _LAYOUT_NAMES:
        got = W.layout if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"{name} must be a torch sparse CSR or BSR tensor, got {got}")
    if W.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it holds no indices to check or multiply")
    if W.dim() != 2:
        raise ValueError(f"{name} must be a 2-D sparse matrix (no batch dimensions), got shape {tuple(W.shape)}")
    crow, col = W.crow_indices(), W.col_indices()
    if crow.dtype not in _INDEX_DTYPES or col.dtype != crow.dtype:
        raise ValueError(f"{name}: crow_indices and col_indices must both be int32 or both int64, got "
                         f"{crow.dtype} and {col.dtype}")
    if crow.dim() != 1 or col.dim() != 1:
        raise ValueError(f"{name}: crow_indices and col_indices must be 1-D, got shapes "
                         f"{tuple(crow.shape)} and {tuple(col.shape)}")
    rows, cols, unit = _grid(W, name)
    nnz = col.numel()
    if crow.numel() != rows + 1:
        raise ValueError(f"{name}: crow_indices has {crow.numel()} entries, expected {rows + 1} "
                         f"({unit}rows + 1 for shape {tuple(W.shape)})")
    if W.values().shape[0] != nnz:
        raise ValueError(f"{name}: {nnz} column indices but {W.values().shape[0]} stored "
                         f"{'blocks' if unit else 'values'}")
    if not _holds(crow, col, nnz, cols):
        _explain(crow, col, nnz, cols, name, unit)


def _holds(crow: torch.Tensor, col: torch.Tensor, nnz: int, cols: int) -> bool:
    """The value checks, cheapest first. On the CPU numpy's reductions cost ~1 us each against
    torch's ~5 us (a LeNet layer is checked in ~10 us instead of ~30); elsewhere one stacked
    result keeps it to a single host synchronization."""
    if crow.device.type == "cpu":
        c, k = crow.numpy(), col.numpy()
        return bool(c[0] == 0 and c[-1] == nnz and (c[1:] >= c[:-1]).all()
                    and (nnz == 0 or (k.min() >= 0 and k.max() < cols)))
    flags = [crow[0] != 0, crow[-1] != nnz, (crow[1:] < crow[:-1]).any()]
    if nnz:
        low, high = torch.aminmax(col)
        flags += [low < 0, high >= cols]
    return not any(torch.stack(flags).tolist())
