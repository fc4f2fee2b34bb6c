"""SparseConv1D: Hugging Face's ``Conv1D`` (GPT-2's projections, a linear layer with its weight
transposed) as a :class:`~sparse_lth.nn.linear.SparseLinear`. Recognised by class name and
package, so this library never imports transformers."""

from __future__ import annotations

import torch
from torch import nn

from sparse_lth.formats import SparseWeight, _make, sparse_state, to_sparse_weight
from sparse_lth.nn.linear import SparseLinear

__all__ = ["SparseConv1D", "is_hf_conv1d"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``; GPT-1/2's
    projections): recognised by class name, package and weight layout, so that this library
    never imports transformers.

    >>> is_hf_conv1d(nn.Linear(4, 2))
    False
    """
    cls = type(module)
    if cls.__name__ != "Conv1D" or not cls.__module__.startswith("transformers."):
        return False
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    return (isinstance(weight, torch.Tensor) and tuple(weight.shape) == (nx, nf)
            and (bias is None or tuple(bias.shape) == (nf,)))


class SparseConv1D(SparseLinear):
    """Hugging Face's ``Conv1D`` (GPT-2's attention and MLP projections), sparse.

    A ``Conv1D`` is a linear layer with its weight transposed: ``weight`` [in, out] (``nx``,
    ``nf``) and ``y = x @ weight + bias``. This layer stores ``weight.T`` [out, in] like any
    :class:`SparseLinear` (the kernels' layout), so it computes the same way; what differs is
    the outside: :meth:`sparse_state_dict` (hence ``save_sparse``) writes the Conv1D's own
    ``weight`` [in, out], so the file loads into the Hugging Face model, and
    :meth:`to_dense_conv1d` (``densify``) gives back a module of the class it replaced
    (``dense_cls``, recorded by :meth:`from_conv1d` / ``sparsify``; without one,
    ``transformers.pytorch_utils.Conv1D``). :attr:`weight` is the stored [out, in] matrix.

    >>> import torch
    >>> from torch import nn
    >>> class Conv1D(nn.Module):  # stands in for transformers.pytorch_utils.Conv1D here
    ...     def __init__(self, nf, nx):
    ...         super().__init__()
    ...         self.nf, self.nx = nf, nx
    ...         self.weight = nn.Parameter(torch.randn(nx, nf))
    ...         self.bias = nn.Parameter(torch.randn(nf))
    ...     def forward(self, x):
    ...         return x @ self.weight + self.bias
    >>> conv = Conv1D(nf=6, nx=4)
    >>> mask = torch.rand(4, 6) < 0.5                    # the Conv1D's [in, out] weight shape
    >>> layer = SparseConv1D.from_conv1d(conv, mask=mask)
    >>> x = torch.randn(3, 4)
    >>> with torch.no_grad():
    ...     torch.allclose(layer(x), x @ (conv.weight * mask) + conv.bias, atol=1e-6)
    True
    >>> layer.sparse_state_dict()["weight"].shape       # written as the Conv1D's own weight
    (4, 6)
    >>> type(layer.to_dense_conv1d()) is Conv1D
    True
    """

    def __init__(
        self,
        weight: torch.Tensor | SparseWeight,
        bias: torch.Tensor | None = None,
        *,
        backend: str = "auto",
        threads: int | None = None,
        dense_cls: type | None = None,
    ) -> None:
        super().__init__(weight, bias, backend=backend, threads=threads)
        self.dense_cls = dense_cls

    @property
    def nf(self) -> int:
        """Output features (Conv1D's name)."""
        return self.out_features

    @property
    def nx(self) -> int:
        """Input features (Conv1D's name)."""
        return self.in_features

    @classmethod
    def from_conv1d(cls, conv: nn.Module, mask: torch.Tensor | None = None, format: str = "csr",
                    blocksize: int | tuple[int, int] = 32, backend: str = "auto",
                    threads: int | None = None) -> SparseConv1D:
        """A SparseConv1D holding ``conv``'s weight (transposed) and a copy of its bias.
        ``mask`` has the Conv1D weight's shape [in, out]; the rest as :meth:`SparseLinear.from_linear`."""
        weight = getattr(conv, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not hasattr(conv, "nf"):
            raise ValueError(f"from_conv1d needs a Hugging Face Conv1D (weight [in, out], nf, nx), "
                             f"got {type(conv).__name__}")
        if weight.is_meta:
            raise ValueError("from_conv1d: the layer's weight is on the meta device (shapes only, no values "
                             "to store); materialize it first")
        sw = to_sparse_weight(weight.detach().t().contiguous(), format, blocksize if format == "bsr" else None,
                              mask=None if mask is None else mask.t().contiguous(), name="conv1d.weight")
        bias = None if conv.bias is None else conv.bias.detach()
        return cls(sw, bias, backend=backend, threads=threads, dense_cls=type(conv))

    def conv1d_weight(self) -> SparseWeight:
        """The Conv1D's own weight [in, out], as stored (same entries, explicit zeros included,
        BSR blocks transposed: a (r, c) block becomes (c, r))."""
        stored = _make(self.weight.layout, self.crow_indices, self.col_indices,
                       torch.ones_like(self.values), self.matrix_shape)
        pattern = stored.to_dense()[: self.out_features, : self.in_features] != 0
        block = None if self.blocksize is None else (self.blocksize[1], self.blocksize[0])
        return to_sparse_weight(self.dense_weight().t().contiguous(), self.format, block,
                                mask=pattern.t().contiguous(), name="conv1d.weight")

    def sparse_state_dict(self) -> dict[str, SparseWeight | torch.Tensor]:
        """``{"weight": SparseWeight [in, out], "bias": tensor}``: the Conv1D's state."""
        return sparse_state(self.conv1d_weight(), self.bias)

    def to_dense_conv1d(self) -> nn.Module:
        """A ``Conv1D`` (``dense_cls``) with weight [in, out] = the stored matrix transposed
        (pruned entries zero) and the same bias."""
        cls = self.dense_cls
        if cls is None:
            try:
                from transformers.pytorch_utils import Conv1D as cls  # only here: densify of a hand-built layer
            except ImportError:
                raise ValueError("SparseConv1D.to_dense_conv1d: no dense_cls was recorded and transformers is "
                                 "not installed; pass dense_cls=<your Conv1D class> when building the layer") from None
        w = self.dense_weight()
        conv = cls(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w.t())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
            elif getattr(conv, "bias", None) is not None:
                conv.bias.zero_()
        return conv
