"""Dense <-> CSR / BSR: torch sparse layouts, scipy arrays, and byte accounting.

This module is data only: it never imports training, lottery or kernels.

Canonical form
--------------
Every CSR / BSR matrix made or accepted here is *canonical*, the form scipy calls
``has_canonical_format``:

* ``crow_indices`` has ``rows + 1`` entries (block rows + 1 for BSR), starts at 0, never
  decreases and ends at the number of stored entries (blocks);
* within a row, column indices are strictly increasing: sorted, no duplicates, each in
  ``[0, cols)`` (block columns for BSR);
* values are finite (no NaN / Inf).

:func:`check_format` checks this and raises a ``ValueError`` naming the tensor, its shape and
the first offending index.

Index dtypes follow scipy: int32 where every index and the largest dimension fit, int64
otherwise (then scipy and torch share the same buffers without copying). Values may be
fp16, bf16, fp32 or fp64; scipy.sparse supports neither half type, so :func:`to_scipy` upcasts
those to fp32 (see there).

Shapes that are not multiples of the block
------------------------------------------
``to_bsr(w, b, pad=True)`` pads the matrix with zero rows / columns up to whole blocks and
returns the padded BSR tensor; the logical shape is then the caller's to keep.
:class:`SparseWeight` is the small container that keeps it: a CSR / BSR matrix plus the
logical (possibly N-D, e.g. conv) shape of the weight it stands for, and
:func:`to_sparse_weight` makes one from any weight (``(out, in * kh * kw)`` matrix view).

Stored pattern
--------------
Without a mask the stored entries are the nonzeros (``w != 0``; a ``-0.0`` counts as zero
and comes back as ``+0.0``). With ``mask=`` the stored entries are exactly the alive ones,
zeros included, so a mask is never inferred from ``weight == 0``; pruned entries read back
as ``+0.0``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

__all__ = [
    "SparseWeight",
    "check_format",
    "from_scipy",
    "nbytes",
    "padded_shape",
    "sparse_state",
    "to_bsr",
    "to_csr",
    "to_dense",
    "to_scipy",
    "to_sparse_weight",
]

Blocksize = Union[int, tuple[int, int]]
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = np.iinfo(np.int32).max
_SPARSE_LAYOUTS = (torch.sparse_csr, torch.sparse_bsr)


# -- small helpers ------------------------------------------------------------------------------
_beta_notice_spent = False  # torch's "CSR / BSR is beta" notice: once per process, either layout


def _make(layout: torch.layout, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
          size: tuple[int, int]) -> torch.Tensor:
    """Build the torch tensor; invariants are checked by us, and torch's "sparse CSR / BSR is
    beta" notice says nothing to our users. torch gives it once per process, on the first
    compressed tensor of either layout: only our first is built inside a warnings filter (10 us
    a call, in a training step that builds two)."""
    global _beta_notice_spent
    build = torch.sparse_csr_tensor if layout == torch.sparse_csr else torch.sparse_bsr_tensor
    if _beta_notice_spent:
        return build(crow, col, values, size=size, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse (BSR|CSR) tensor support is in beta.*")
        tensor = build(crow, col, values, size=size, check_invariants=False)
    _beta_notice_spent = True
    return tensor


def _blocksize(blocksize: Any, name: str) -> tuple[int, int]:
    """(br, bc) from an int or a pair of positive ints."""
    pair = (blocksize, blocksize) if isinstance(blocksize, (int, np.integer)) else blocksize
    try:
        br, bc = pair
        ok = all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b > 0 for b in (br, bc))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}: blocksize must be a positive int or a pair of positive ints, got {blocksize!r}")
    return int(br), int(bc)


def _available_memory() -> int | None:
    """Bytes the machine can still hand out: /proc/meminfo's MemAvailable, else free pages
    (``sysconf``); None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_allocation(nbytes: int, what: str, remedy: str) -> None:
    """Refuse (``ValueError``) to allocate more than the machine has, instead of dying of it."""
    available = _available_memory()
    if available is not None and nbytes > available:
        raise ValueError(f"{what} would need {nbytes:,} bytes of memory, but only {available:,} are "
                         f"available; {remedy}")


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a weight is stored as: ``(out, in * kh * kw)``; 0-/1-D as one row."""
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def _index_dtype(nnz: int, shape: tuple[int, int]) -> torch.dtype:
    """scipy's rule: int32 when the count of entries and every dimension fit, else int64."""
    return torch.int32 if max(nnz, *shape, 0) <= _INT32_MAX else torch.int64


def _check_finite(weight: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: {int(bad.sum())} non-finite value(s) (NaN / Inf) in a tensor of shape "
            f"{tuple(weight.shape)}, first at index {first} = {weight[first].item()}"
        )


def _check_weight(weight: Any, name: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {weight.layout}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D matrix, got shape {tuple(weight.shape)} "
                         "(use to_sparse_weight for conv or 1-D weights)")
    if weight.dtype not in VALUE_DTYPES:
        raise ValueError(f"{name}: values must be fp16, bf16, fp32 or fp64, got {weight.dtype}")
    _check_finite(weight, name)


def _pattern(weight: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    if mask is None:
        return weight != 0
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask must be a bool tensor, got "
                         f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape != weight.shape:
        raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, weight has {tuple(weight.shape)}")
    return mask.to(weight.device)


def _compress(pattern: torch.Tensor, index_dtype: torch.dtype | None, shape: tuple[int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """crow / col indices of a 2-D bool pattern (row-major, hence canonical)."""
    counts = pattern.sum(dim=1)
    crow = torch.zeros(pattern.shape[0] + 1, dtype=torch.int64, device=pattern.device)
    torch.cumsum(counts, dim=0, out=crow[1:])
    col = pattern.nonzero()[:, 1]
    dtype = index_dtype or _index_dtype(col.numel(), shape)
    if dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {dtype}")
    return crow.to(dtype), col.to(dtype)


# -- dense -> sparse ----------------------------------------------------------------------------
def to_csr(weight: torch.Tensor, *, mask: torch.Tensor | None = None,
           index_dtype: torch.dtype | None = None, name: str = "weight") -> torch.Tensor:
    """A 2-D dense weight as a canonical torch ``sparse_csr`` tensor.

    Stores the nonzeros, or with ``mask`` exactly the alive entries (zeros included).
    Indices are int32 where they fit (else int64) unless ``index_dtype`` says otherwise.
    Raises ``ValueError`` for NaN / Inf, a non-2-D weight or a mask of another shape.

    >>> w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    >>> x = to_csr(w)
    >>> x.crow_indices().tolist(), x.col_indices().tolist(), x.values().tolist()
    ([0, 1, 3], [1, 0, 2], [2.0, 1.0, 3.0])
    >>> torch.equal(to_dense(x), w)
    True
    """
    _check_weight(weight, name)
    pattern = _pattern(weight, mask, name)
    shape = (weight.shape[0], weight.shape[1])
    crow, col = _compress(pattern, index_dtype, shape)
    return _make(torch.sparse_csr, crow, col, weight[pattern], shape)


def padded_shape(shape: tuple[int, int], blocksize: Blocksize) -> tuple[int, int]:
    """The matrix shape rounded up to whole blocks.

    >>> padded_shape((100, 70), 32)
    (128, 96)
    """
    br, bc = _blocksize(blocksize, "padded_shape")
    return -(-shape[0] // br) * br, -(-shape[1] // bc) * bc


def to_bsr(weight: torch.Tensor, blocksize: Blocksize, *, mask: torch.Tensor | None = None,
           pad: bool = False, index_dtype: torch.dtype | None = None, name: str = "weight") -> torch.Tensor:
    """A 2-D dense weight as a canonical torch ``sparse_bsr`` tensor of ``blocksize`` blocks.

    A block is stored when it holds a nonzero (with ``mask``: an alive entry); pruned entries
    inside a stored block are stored as zeros. A shape that is not a multiple of the block is
    an error unless ``pad=True``: then the result has shape ``padded_shape(w.shape, blocksize)``
    and the logical shape is the caller's to keep (see :class:`SparseWeight`). Padding that
    would need more memory than the machine has available (a block far larger than the
    matrix) is a ``ValueError`` saying how many bytes it needs and how many are free.

    >>> w = torch.zeros(4, 6); w[0, 5] = 1.0; w[3, 0] = 2.0
    >>> x = to_bsr(w, 2)
    >>> x.crow_indices().tolist(), x.col_indices().tolist(), tuple(x.values().shape)
    ([0, 1, 2], [2, 0], (2, 2, 2))
    >>> tuple(to_bsr(w[:3], 2, pad=True).shape)
    (4, 6)
    """
    _check_weight(weight, name)
    br, bc = _blocksize(blocksize, name)
    pattern = _pattern(weight, mask, name)
    rows, cols = weight.shape
    if (rows % br or cols % bc) and not pad:
        raise ValueError(
            f"{name}: shape {rows}x{cols} is not a multiple of blocksize {br}x{bc}; pass pad=True "
            f"to pad with zeros to {padded_shape((rows, cols), (br, bc))} (keep the logical shape, "
            "e.g. with to_sparse_weight)"
        )
    prows, pcols = padded_shape((rows, cols), (br, bc))
    if (prows, pcols) != (rows, cols):  # the padded weight, its pattern and the stored blocks
        _check_allocation(prows * pcols * (2 * weight.element_size() + 1),
                          f"{name}: padding {rows}x{cols} to whole {br}x{bc} blocks ({prows}x{pcols})",
                          "use a smaller block")
    w = weight if mask is None else weight.masked_fill(~pattern, 0)
    pad4 = (0, pcols - cols, 0, prows - rows)
    if pcols != cols or prows != rows:
        w = torch.nn.functional.pad(w, pad4)
        pattern = torch.nn.functional.pad(pattern, pad4)
    tiles = lambda t: t.reshape(prows // br, br, pcols // bc, bc).transpose(1, 2)  # noqa: E731
    block_pattern = tiles(pattern).any(dim=3).any(dim=2)
    crow, col = _compress(block_pattern, index_dtype, (prows, pcols))
    return _make(torch.sparse_bsr, crow, col, tiles(w)[block_pattern].contiguous(), (prows, pcols))


# -- sparse -> dense ----------------------------------------------------------------------------
def _rows_of(crow: torch.Tensor) -> torch.Tensor:
    counts = (crow[1:] - crow[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow.device), counts)


def _dense_from_parts(layout: torch.layout, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                      size: tuple[int, int]) -> torch.Tensor:
    """Dense matrix of (padded) ``size`` by scattering the stored values: bits are copied."""
    rows, col = _rows_of(crow), col.to(torch.int64)
    if layout == torch.sparse_csr:
        out = torch.zeros(size, dtype=values.dtype, device=values.device)
        out[rows, col] = values
        return out
    nnz, br, bc = values.shape
    out = torch.zeros(size[0] // br, size[1] // bc, br, bc, dtype=values.dtype, device=values.device)
    out[rows, col] = values
    return out.transpose(1, 2).reshape(size)


def to_dense(x: torch.Tensor | SparseWeight, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Dense tensor of a torch CSR / BSR matrix or a :class:`SparseWeight`, exact to the bit.

    ``shape`` crops a padded matrix back to its logical shape (and reshapes to N-D).

    >>> w = torch.arange(6.0).reshape(2, 3)
    >>> torch.equal(to_dense(to_bsr(w, 2, pad=True), shape=(2, 3)), w)
    True
    """
    if isinstance(x, SparseWeight):
        return x.to_dense() if shape is None else x.to_dense().reshape(shape)
    if not isinstance(x, torch.Tensor) or x.layout not in _SPARSE_LAYOUTS:
        raise TypeError(f"to_dense takes a torch sparse_csr / sparse_bsr tensor or a SparseWeight, got "
                        f"{x.layout if isinstance(x, torch.Tensor) else type(x).__name__}")
    dense = _dense_from_parts(x.layout, x.crow_indices(), x.col_indices(), x.values(), tuple(x.shape))
    if shape is None:
        return dense
    rows, cols = _matrix_shape(shape)
    if rows > dense.shape[0] or cols > dense.shape[1]:
        raise ValueError(f"shape {tuple(shape)} (matrix {rows}x{cols}) is larger than the "
                         f"matrix {tuple(dense.shape)}")
    return dense[:rows, :cols].reshape(shape)


# -- the container ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseWeight:
    """A torch CSR / BSR matrix plus the logical shape of the weight it stands for.

    ``matrix`` is the ``(out, in * kh * kw)`` view of the weight (one row for a 1-D weight),
    for BSR padded up to whole blocks; ``shape`` is the weight's own shape.

    >>> w = torch.randn(5, 3, 3, 3)
    >>> sw = to_sparse_weight(w, "bsr", blocksize=4)
    >>> tuple(sw.matrix.shape), sw.shape, torch.equal(sw.to_dense(), w)
    ((8, 28), (5, 3, 3, 3), True)
    """

    matrix: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not isinstance(self.matrix, torch.Tensor) or self.matrix.layout not in _SPARSE_LAYOUTS:
            raise ValueError("SparseWeight.matrix must be a torch sparse_csr or sparse_bsr tensor")
        rows, cols = _matrix_shape(self.shape)
        want = (rows, cols) if self.format == "csr" else padded_shape((rows, cols), self.blocksize)
        if tuple(self.matrix.shape) != want:
            raise ValueError(f"SparseWeight: a {self.format} matrix for shape {self.shape} must be "
                             f"{want[0]}x{want[1]}, got {tuple(self.matrix.shape)}")

    @property
    def format(self) -> str:
        return "csr" if self.matrix.layout == torch.sparse_csr else "bsr"

    @property
    def blocksize(self) -> tuple[int, int] | None:
        return tuple(self.matrix.values().shape[1:]) if self.format == "bsr" else None  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.matrix.dtype

    def density(self) -> float:
        """Fraction of the logical entries held in stored values (padding not counted)."""
        numel = math.prod(self.shape)
        return min(1.0, self.matrix.values().numel() / numel) if numel else 1.0

    def to_dense(self) -> torch.Tensor:
        return to_dense(self.matrix, shape=self.shape)


def sparse_state(weight: SparseWeight, bias: torch.Tensor | None) -> dict[str, SparseWeight | torch.Tensor]:
    """A sparse layer's ``sparse_state_dict``: ``{"weight": weight, "bias": bias}``, no bias key
    for a layer without one. :func:`~sparse_lth.checkpoint.save_sparse` saves a sparsified model
    through it, so the file loads into the dense model."""
    return {"weight": weight} if bias is None else {"weight": weight, "bias": bias}


def to_sparse_weight(weight: torch.Tensor, format: str = "csr", blocksize: Blocksize | None = None, *,
                     mask: torch.Tensor | None = None, name: str = "weight") -> SparseWeight:
    """Any weight (linear, conv, 1-D) as a :class:`SparseWeight` in ``format`` "csr" or "bsr".

    BSR pads to whole blocks. ``mask`` (bool, the weight's shape) picks the stored entries.

    >>> w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    >>> sw = to_sparse_weight(w, "bsr", 2)
    >>> sw.blocksize, tuple(sw.matrix.shape), torch.equal(sw.to_dense(), w)
    ((2, 2), (2, 4), True)
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(weight).__name__}")
    if mask is not None and isinstance(mask, torch.Tensor) and mask.shape != weight.shape:
        raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, weight has {tuple(weight.shape)}")
    matrix = weight.reshape(_matrix_shape(tuple(weight.shape)))
    m = mask.reshape(matrix.shape) if isinstance(mask, torch.Tensor) else mask
    if format == "csr":
        if blocksize is not None:
            raise ValueError(f"{name}: blocksize is only for format='bsr', got blocksize={blocksize!r} with 'csr'")
        return SparseWeight(to_csr(matrix, mask=m, name=name), tuple(weight.shape))
    if format == "bsr":
        if blocksize is None:
            raise ValueError(f"{name}: format='bsr' needs a blocksize (an int or (rows, cols))")
        return SparseWeight(to_bsr(matrix, blocksize, mask=m, pad=True, name=name), tuple(weight.shape))
    raise ValueError(f"{name}: format must be 'csr' or 'bsr', got {format!r}")


# -- validation ---------------------------------------------------------------------------------
def _check_compressed(crow: np.ndarray, col: np.ndarray, nrows: int, ncols: int, nvalues: int,
                      name: str, unit: str = "") -> None:
    """scipy's check_format for compressed rows, with messages that point at the entry."""
    shape = f"{nrows}x{ncols}{' ' + unit.strip() + 's' if unit else ''}"
    if crow.ndim != 1 or col.ndim != 1:
        raise ValueError(f"{name}: crow_indices and col_indices must be 1-D, got shapes "
                         f"{crow.shape} and {col.shape}")
    if crow.shape[0] != nrows + 1:
        raise ValueError(f"{name} ({shape}): crow_indices has {crow.shape[0]} entries, expected "
                         f"{nrows + 1} ({unit}rows + 1)")
    if col.shape[0] != nvalues:
        raise ValueError(f"{name} ({shape}): {col.shape[0]} column indices but {nvalues} stored values")
    if crow[0] != 0:
        raise ValueError(f"{name} ({shape}): crow_indices[0] is {int(crow[0])}, must be 0")
    if crow[-1] != col.shape[0]:
        raise ValueError(f"{name} ({shape}): crow_indices[-1] is {int(crow[-1])}, must equal the "
                         f"number of stored entries {col.shape[0]}")
    counts = np.diff(crow.astype(np.int64))
    if (counts < 0).any():
        row = int(np.argmax(counts < 0))
        raise ValueError(f"{name} ({shape}): crow_indices decreases at {unit}row {row} "
                         f"({int(crow[row])} then {int(crow[row + 1])})")
    if col.shape[0] == 0:
        return
    col64 = col.astype(np.int64)
    bad = (col64 < 0) | (col64 >= ncols)
    if bad.any():
        k = int(np.argmax(bad))
        row = int(np.searchsorted(crow, k, side="right")) - 1
        raise ValueError(f"{name} ({shape}): column index {int(col64[k])} at position {k} ({unit}row "
                         f"{row}) is out of range [0, {ncols})")
    step_ok = np.diff(col64) > 0
    starts = crow[1:-1].astype(np.int64)
    starts = starts[(starts > 0) & (starts < col.shape[0])]
    step_ok[starts - 1] = True  # a new row may start anywhere
    if not step_ok.all():
        k = int(np.argmin(step_ok)) + 1
        row = int(np.searchsorted(crow, k, side="right")) - 1
        raise ValueError(
            f"{name} ({shape}): {unit}row {row} is not canonical at position {k}: column "
            f"{int(col64[k - 1])} then {int(col64[k])} (column indices must be sorted and unique)"
        )


def check_format(x: torch.Tensor, name: str = "matrix") -> None:
    """Raise ``ValueError`` unless ``x`` is a canonical torch CSR / BSR matrix (see module doc).

    >>> bad = torch.sparse_csr_tensor(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.ones(2), (1, 3),
    ...                             check_invariants=False)
    >>> check_format(bad, "fc.weight")
    Traceback (most recent call last):
    ...
    ValueError: fc.weight (1x3): row 0 is not canonical at position 1: column 1 then 0 (column indices must be sorted and unique)
    """
    if not isinstance(x, torch.Tensor) or x.layout not in _SPARSE_LAYOUTS:
        raise TypeError(f"{name}: check_format takes a torch sparse_csr / sparse_bsr tensor")
    values = x.values()
    crow, col = x.crow_indices().cpu().numpy(), x.col_indices().cpu().numpy()
    if x.layout == torch.sparse_csr:
        if values.dim() != 1:
            raise ValueError(f"{name}: CSR values must be 1-D, got shape {tuple(values.shape)}")
        _check_compressed(crow, col, x.shape[0], x.shape[1], values.shape[0], name)
    else:
        if values.dim() != 3:
            raise ValueError(f"{name}: BSR values must be (blocks, br, bc), got shape {tuple(values.shape)}")
        br, bc = values.shape[1:]
        if x.shape[0] % br or x.shape[1] % bc:
            raise ValueError(f"{name}: shape {tuple(x.shape)} is not a multiple of blocksize {br}x{bc}")
        _check_compressed(crow, col, x.shape[0] // br, x.shape[1] // bc, values.shape[0], name, "block ")
    if values.dtype not in VALUE_DTYPES:
        raise ValueError(f"{name}: values must be fp16, bf16, fp32 or fp64, got {values.dtype}")
    _check_finite(values, f"{name} values")


# -- scipy --------------------------------------------------------------------------------------
def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def to_scipy(x: torch.Tensor | SparseWeight, *, upcast: bool = False):
    """A torch CSR / BSR matrix as a ``scipy.sparse.csr_array`` / ``bsr_array``.

    On the CPU the arrays share their indptr / indices / data buffers with the tensor (no copy;
    a CUDA tensor is copied to the CPU first). scipy.sparse supports neither fp16 nor bf16 (numpy
    has no bf16), so half-precision values are upcast to fp32: exact, a copy of the values only
    (indices still shared), with a ``UserWarning``, or silently with ``upcast=True``.
    A :class:`SparseWeight` gives its (padded) matrix.

    >>> a = to_scipy(to_csr(torch.tensor([[0.0, 2.0], [3.0, 0.0]])))
    >>> type(a).__name__, a.toarray().tolist()
    ('csr_array', [[0.0, 2.0], [3.0, 0.0]])
    >>> to_scipy(to_csr(torch.eye(2, dtype=torch.bfloat16)), upcast=True).dtype
    dtype('float32')
    """
    import scipy.sparse as sp

    if isinstance(x, SparseWeight):
        x = x.matrix
    if not isinstance(x, torch.Tensor) or x.layout not in _SPARSE_LAYOUTS:
        raise TypeError("to_scipy takes a torch sparse_csr / sparse_bsr tensor or a SparseWeight")
    values = x.values()
    if values.dtype in (torch.float16, torch.bfloat16):
        if not upcast:
            warnings.warn(f"to_scipy: scipy.sparse does not support {values.dtype}; values upcast to "
                          "float32 (exact, copied). Pass upcast=True to silence.", UserWarning, stacklevel=2)
        values = values.float()
    data, indices, indptr = _as_numpy(values), _as_numpy(x.col_indices()), _as_numpy(x.crow_indices())
    shape = tuple(x.shape)
    if x.layout == torch.sparse_csr:
        return sp.csr_array((data, indices, indptr), shape=shape, copy=False)
    return sp.bsr_array((data, indices, indptr), shape=shape, blocksize=data.shape[1:], copy=False)


def from_scipy(a: Any, *, dtype: torch.dtype | None = None, name: str = "matrix") -> torch.Tensor:
    """A scipy sparse array / matrix as a torch CSR (or BSR, from bsr) tensor.

    CSR and BSR inputs in canonical form share their buffers with the result (no copy);
    non-canonical ones are canonicalized on a copy (duplicates summed, as scipy does), other
    formats (coo, csc, ...) go through ``tocsr()``. Values must be fp16, fp32 or fp64 and finite;
    ``dtype`` casts them (a copy of the values), e.g. back to the bf16 that :func:`to_scipy` upcast.

    >>> import scipy.sparse as sp
    >>> x = from_scipy(sp.csr_array(np.array([[0.0, 1.0], [2.0, 0.0]], dtype=np.float32)))
    >>> x.layout, x.col_indices().tolist()
    (torch.sparse_csr, [1, 0])
    """
    import scipy.sparse as sp

    if not sp.issparse(a):
        raise TypeError(f"{name}: from_scipy takes a scipy.sparse array or matrix, got {type(a).__name__}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D sparse array, got shape {a.shape}")
    if a.format not in ("csr", "bsr"):
        a = a.tocsr()
    if not a.has_canonical_format:
        a = a.copy()
        a.sum_duplicates()
    rows, cols = a.shape
    data, indices, indptr = a.data, a.indices, a.indptr
    if data.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"{name}: values must be float16, float32 or float64, got {data.dtype}")
    if a.format == "csr":
        _check_compressed(indptr, indices, rows, cols, data.shape[0], name)
        layout = torch.sparse_csr
    else:
        br, bc = a.blocksize
        _check_compressed(indptr, indices, rows // br, cols // bc, data.shape[0], name, "block ")
        layout = torch.sparse_bsr
    values = torch.from_numpy(data)
    _check_finite(values, f"{name} values")
    if dtype is not None:
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"{name}: dtype must be fp16, bf16, fp32 or fp64, got {dtype}")
        values = values.to(dtype)
    dtype = torch.int64 if np.int64 in (indptr.dtype, indices.dtype) else torch.int32  # torch wants one dtype
    crow, col = torch.from_numpy(indptr).to(dtype), torch.from_numpy(indices).to(dtype)
    return _make(layout, crow, col, values, (rows, cols))


# -- bytes --------------------------------------------------------------------------------------
def nbytes(x: Any) -> int:
    """Bytes of the arrays that hold ``x`` (no Python overhead, no file header).

    Takes a dense or sparse (CSR, CSC, BSR, BSC, COO) torch tensor, a :class:`SparseWeight`, a
    numpy array, a scipy sparse array, or a mapping / list / tuple of these (a state dict).

    >>> w = torch.zeros(100, 100); w[0, :5] = 1.0
    >>> nbytes(w), nbytes(to_csr(w))
    (40000, 444)
    """
    import scipy.sparse as sp

    if isinstance(x, SparseWeight):
        return nbytes(x.matrix)
    if isinstance(x, torch.Tensor):
        size = lambda t: t.numel() * t.element_size()  # noqa: E731
        if x.layout == torch.strided:
            return size(x)
        if x.layout in _SPARSE_LAYOUTS:
            return size(x.crow_indices()) + size(x.col_indices()) + size(x.values())
        if x.layout in (torch.sparse_csc, torch.sparse_bsc):
            return size(x.ccol_indices()) + size(x.row_indices()) + size(x.values())
        if x.layout == torch.sparse_coo:
            return size(x._indices()) + size(x._values())
        raise TypeError(f"nbytes: unsupported tensor layout {x.layout}")
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if sp.issparse(x):
        if x.format in ("csr", "csc", "bsr"):
            return int(x.data.nbytes + x.indices.nbytes + x.indptr.nbytes)
        if x.format == "coo":
            return int(x.data.nbytes + sum(c.nbytes for c in x.coords))
        raise TypeError(f"nbytes: unsupported scipy format {x.format!r} (convert with tocsr())")
    if isinstance(x, Mapping):
        return sum(nbytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(nbytes(v) for v in x)
    raise TypeError(f"nbytes: unsupported type {type(x).__name__}")
