"""TrainableSparseLinear: a linear layer that trains only its stored weights.

The pattern (which weights exist) is fixed when the layer is built, from a mask or the
weight's nonzeros; the stored values are one ``nn.Parameter`` (1-D for CSR, [blocks, br, bc]
for BSR) and the bias another, so any torch optimizer works on ``model.parameters()`` and its
state (Adam's two moments) is sized by the stored values, not the dense shape. Forward and
backward cost in proportion to the stored values (:mod:`sparse_lth.nn.ops`); pruned weights
cannot come back, since they are not stored.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> dense = nn.Linear(64, 32)
>>> mask = torch.rand(32, 64) < 0.1
>>> layer = TrainableSparseLinear.from_linear(dense, mask=mask)
>>> opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
>>> loss = layer(torch.randn(8, 64)).square().mean()
>>> loss.backward(); opt.step()
>>> layer.values.shape == (int(mask.sum()),), bool((layer.to_dense_linear().weight[~mask] == 0).all())
(True, True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth.formats import SparseWeight, _make, sparse_state, to_sparse_weight
from sparse_lth.kernels.invariants import check_index_invariants
from sparse_lth.nn import ops

__all__ = ["TrainableSparseLinear", "linear_with"]

#: Without autograd (evaluation), an input of at least this many rows through a layer at least
#: EVAL_DENSE_MIN_DENSITY dense multiplies a dense copy of the weight, made once per change of
#: the values (the search's evaluation passes run that copy through oneDNN: ``eval_paths``).
#: Measured on 2 CPU cores, fp32, 5000 rows, the numba product (tile-major panels) against a
#: oneDNN linear on the copy: 4096 x 4096 at 10 / 20 / 30 / 40 % 271 / 513 / 754 / 951 ms
#: against 833-848 ms (MKL 880-890 ms); 4096 x 784 61 / 94 / 127 / 162 ms against 194-196 ms.
#: Training batches (60 rows) stay sparse.
EVAL_DENSE_MIN_ROWS = 256
EVAL_DENSE_MIN_DENSITY = 0.25

def linear_with(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A new ``nn.Linear`` holding copies of a dense [out, in] ``weight`` and ``bias``, on their
    device and dtype: what a sparse layer turns back into."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class TrainableSparseLinear(nn.Module):
    """``x @ W.T + bias`` with ``W`` [out, in] stored sparse and its stored values trainable.

    Buffers: ``crow_indices`` / ``col_indices`` (the pattern, the kernels' layout) and
    ``crow_t`` / ``col_t`` / ``perm`` (the transposed pattern and the permutation of values
    into it, for the input gradient). Parameters: ``values`` and ``bias``. BSR pads the matrix
    to whole blocks (the input is padded to match per call; the padding stores nothing).

    Build with :meth:`from_linear` (or ``sparsify(model, mask, trainable=True)``); back to an
    ``nn.Linear`` with :meth:`to_dense_linear` (or ``densify``).
    """

    def __init__(self, weight: SparseWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        matrix = weight.matrix
        if len(weight.shape) != 2:
            raise ValueError(f"TrainableSparseLinear needs a 2-D weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.matrix_shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        self.blocksize = weight.blocksize
        crow, col = matrix.crow_indices(), matrix.col_indices()
        check_index_invariants(matrix, "weight")
        if max(*self.matrix_shape, col.numel()) <= torch.iinfo(torch.int32).max:
            crow, col = crow.to(torch.int32), col.to(torch.int32)  # half the index bytes
        self.register_buffer("crow_indices", crow.contiguous())
        self.register_buffer("col_indices", col.contiguous())
        counted = self.matrix_shape if self.blocksize is None else (
            self.matrix_shape[0] // self.blocksize[0], self.matrix_shape[1] // self.blocksize[1])
        crow_t, col_t, perm = ops.transpose_pattern(crow, col, counted)
        self.register_buffer("crow_t", crow_t)
        self.register_buffer("col_t", col_t)
        self.register_buffer("perm", perm.to(crow.dtype))
        self.values = nn.Parameter(matrix.values().detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None, format: str = "csr",
                    blocksize: int | tuple[int, int] = 32) -> TrainableSparseLinear:
        """A layer storing ``linear``'s weight where ``mask`` is True (else its nonzeros), as
        CSR or ``blocksize`` BSR blocks; the bias copied.

        >>> from torch import nn
        >>> TrainableSparseLinear.from_linear(nn.Linear(40, 20), format="bsr", blocksize=16)
        TrainableSparseLinear(in_features=40, out_features=20, format=bsr, blocksize=(16, 16), density=1.0000, bias=True)
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if linear.weight.is_meta:
            raise ValueError("from_linear: the layer's weight is on the meta device; materialize it first")
        sw = to_sparse_weight(linear.weight.detach(), format, blocksize if format == "bsr" else None,
                              mask=mask, name="linear.weight")
        return cls(sw, linear.bias)

    @property
    def format(self) -> str:
        return "csr" if self.blocksize is None else "bsr"

    def density(self) -> float:
        """Stored values / logical entries (for BSR whole blocks count, padding does not), as
        :meth:`sparse_lth.nn.linear.SparseLinear.density` counts them."""
        total = self.in_features * self.out_features
        return min(1.0, self.values.numel() / total) if total else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"TrainableSparseLinear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        rows, cols = self.matrix_shape
        lead = x.shape[:-1]
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if torch.compiler.is_compiling():
            pass  # the dense copy is an eager-mode cache; a compiled graph keeps the sparse product
        elif torch.is_grad_enabled():
            self.__dict__.pop("_eval_copy", None)  # training again: drop the dense copy
        elif x2.shape[0] >= EVAL_DENSE_MIN_ROWS and (weight := self.eval_weight()) is not None:
            return F.linear(x, weight, self.bias)
        if cols != self.in_features:
            x2 = F.pad(x2, (0, cols - self.in_features))
        padded = rows != self.out_features  # BSR padded to whole blocks: the padding's rows dropped first
        y = ops.linear_bias(x2.contiguous(), self.crow_indices, self.col_indices, self.values,
                            None if padded else self.bias, rows, self.crow_t, self.col_t, self.perm)
        if padded:
            y = y[:, : self.out_features]
            y = y if self.bias is None else y + self.bias
        return y if x.dim() == 2 else y.reshape(*lead, self.out_features)

    def sparse_weight(self) -> SparseWeight:
        """The current weight (detached) with its logical shape, as ``save_sparse`` writes it."""
        layout = torch.sparse_csr if self.blocksize is None else torch.sparse_bsr
        matrix = _make(layout, self.crow_indices, self.col_indices, self.values.detach(), self.matrix_shape)
        return SparseWeight(matrix, (self.out_features, self.in_features))

    def sparse_state_dict(self) -> dict[str, SparseWeight | torch.Tensor]:
        """The state of the ``nn.Linear`` this layer stands for, its weight kept sparse: what
        :func:`~sparse_lth.checkpoint.save_sparse` saves, so the file loads into the dense model."""
        return sparse_state(self.sparse_weight(), None if self.bias is None else self.bias.detach())

    def eval_weight(self) -> torch.Tensor | None:
        """The dense weight an evaluation pass multiplies instead of the sparse product, for a
        layer at least EVAL_DENSE_MIN_DENSITY dense (else None): cached until the values change
        (an optimizer step bumps their version; ``.to()`` gives new storage)."""
        if self.density() < EVAL_DENSE_MIN_DENSITY:
            return None
        key = (self.values._version, self.values.data_ptr(), self.values.dtype)
        cached = self.__dict__.get("_eval_copy")
        if cached is None or cached[0] != key:
            cached = (key, self.dense_weight())
            self.__dict__["_eval_copy"] = cached
        return cached[1]

    def dense_weight(self) -> torch.Tensor:
        """The [out, in] weight, zeros where nothing is stored (detached)."""
        return self.sparse_weight().to_dense()

    def to_dense_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the trained weights (pruned entries zero)."""
        return linear_with(self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.blocksize else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{block}, "
                f"density={self.density():.4f}, bias={self.bias is not None}")
