"""SparseLinear, and swapping a model's linear layers to sparse ones and back.

``sparsify(model, mask)`` replaces each ``nn.Linear`` whose density is at or below
``max_density`` by a :class:`SparseLinear` that holds its weight once, as a CSR or BSR matrix
in the layout the kernels read (out x in, no transpose per call), and multiplies with the
backend :mod:`sparse_lth.backends` picks: scipy or torch's MKL product on the CPU, Triton on
CUDA. ``densify(model)`` swaps them back to ``nn.Linear`` with identical weights.

Inference only: a SparseLinear's weight (three index / value buffers) and bias are buffers, not
parameters; nothing requires grad, and an input that requires grad is refused rather than left
without a gradient. A sparsified model is an ordinary module: ``copy.deepcopy``, ``.to()``,
``state_dict`` / ``load_state_dict`` (indices re-checked) and ``save_sparse`` (the file loads
into the dense model) work. Convolution layers are left dense (no sparse conv path yet); so
are subclasses of ``nn.Linear`` (e.g. the output projection inside ``nn.MultiheadAttention``,
which reads its weight directly).

>>> import torch
>>> from torch import nn
>>> from sparse_lth.masks import Mask
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
>>> mask = Mask({"0.weight": torch.rand(32, 64) < 0.05, "2.weight": torch.rand(10, 32) < 0.05})
>>> dense = mask.apply(model)
>>> x = torch.randn(5, 64)
>>> expected = dense(x)
>>> sparse = sparsify(model, mask)
>>> type(sparse[0]).__name__, torch.allclose(sparse(x), expected, atol=1e-5)
('SparseLinear', True)
>>> type(densify(sparse)[0]).__name__
'Linear'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth.backends import BACKENDS, sparse_linear
from sparse_lth.formats import SparseWeight, _make, to_sparse_weight
from sparse_lth.kernels.invariants import check_index_invariants
from sparse_lth.masks import Mask

__all__ = ["SparseLinear", "sparsify", "densify", "DEFAULT_MAX_DENSITY"]

#: Layers at or below this density become sparse by default. Measured on a 2-core CPU (fp32,
#: bench/cpu_crossover.md): a 4096 x 4096 sparse layer beats the dense one at every batch up to
#: 10% and breaks even near 20%; small cache-resident layers (1024 x 1024) at batch 1 only
#: break even near 10%, where the ~15-30 us per-call overhead matters. 0.1 is a win or a tie
#: everywhere measured.
DEFAULT_MAX_DENSITY = 0.1

_INT32_MAX = 2**31 - 1


class SparseLinear(nn.Module):
    """A linear layer ``y = x @ W.T + b`` whose weight is stored as a CSR or BSR matrix.

    Build one from an ``nn.Linear`` with :meth:`from_linear`, or directly from a torch sparse
    CSR / BSR tensor [out, in] (or a :class:`~sparse_lth.formats.SparseWeight`, whose BSR
    matrix may be padded up to whole blocks; the logical shape is kept). The weight's indices
    are checked once, here (a malformed tensor is refused with a ValueError instead of being
    read out of bounds later), and stored as int32 where they fit.

    The weight lives in three plain buffers, ``crow_indices``, ``col_indices`` and ``values``
    (what the kernels read; they move with ``.to()``, are in ``state_dict`` and survive
    ``copy.deepcopy``); :attr:`weight` is the torch sparse tensor over them, built without a
    copy. forward takes ``x`` [..., in_features] of the weight's dtype and device and returns
    [..., out_features]. ``backend`` ("auto" | "triton" | "scipy" | "torch" | "dense") is
    resolved per call from the device, dtype and batch (:func:`sparse_lth.backends.choose_backend`);
    ``threads`` goes to the scipy path.

    Inference only: nothing here requires grad. An input that requires grad while autograd is
    on raises a RuntimeError rather than returning an output whose gradient is silently
    missing: run under ``torch.no_grad()`` / ``torch.inference_mode()``, or :func:`densify` to train.

    >>> import torch
    >>> from torch import nn
    >>> linear = nn.Linear(8, 4)
    >>> mask = torch.rand(4, 8) < 0.5
    >>> layer = SparseLinear.from_linear(linear, mask=mask)
    >>> x = torch.randn(2, 3, 8)
    >>> ref = x @ (linear.weight * mask).T + linear.bias
    >>> layer(x).shape, torch.allclose(layer(x), ref, atol=1e-6)
    (torch.Size([2, 3, 4]), True)
    >>> sorted(layer.state_dict())
    ['bias', 'col_indices', 'crow_indices', 'values']
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: Optional[torch.Tensor]

    def __init__(
        self,
        weight: torch.Tensor | SparseWeight,
        bias: torch.Tensor | None = None,
        *,
        backend: str = "auto",
        threads: int | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(weight, SparseWeight):
            if len(weight.shape) != 2:
                raise ValueError(f"SparseLinear needs a 2-D weight, got a SparseWeight of shape {weight.shape}")
            matrix, (out_features, in_features) = weight.matrix, weight.shape
        elif isinstance(weight, torch.Tensor) and weight.layout in (torch.sparse_csr, torch.sparse_bsr):
            if weight.dim() != 2:
                raise ValueError(f"SparseLinear needs a 2-D sparse weight, got shape {tuple(weight.shape)}")
            matrix, (out_features, in_features) = weight, tuple(weight.shape)
        else:
            got = weight.layout if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"weight must be a torch sparse CSR / BSR tensor or a SparseWeight, got {got}")
        check_index_invariants(matrix, "SparseLinear weight")  # once: forward then skips it
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (out_features,)):
            raise ValueError(f"bias must be a tensor of shape ({out_features},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.format = "csr" if matrix.layout == torch.sparse_csr else "bsr"
        self.blocksize: tuple[int, int] | None = (
            tuple(int(b) for b in matrix.values().shape[1:]) if self.format == "bsr" else None  # type: ignore[assignment]
        )
        self.matrix_shape = (int(matrix.shape[0]), int(matrix.shape[1]))  # padded to whole blocks for BSR
        self.backend = backend
        self.threads = threads
        crow, col = matrix.crow_indices(), matrix.col_indices()
        if crow.dtype == torch.int64 and max(*self.matrix_shape, col.numel()) <= _INT32_MAX:
            # a third less index traffic than torch's default int64, for scipy and MKL alike
            crow, col = crow.to(torch.int32), col.to(torch.int32)
        # contiguous: what every kernel reads (torch's CPU product misreads strided int32 indices)
        self.register_buffer("crow_indices", crow.contiguous())
        self.register_buffer("col_indices", col.contiguous())
        self.register_buffer("values", matrix.values().detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # A state dict loaded later may carry other indices: they are checked like these.
        self.register_load_state_dict_post_hook(_recheck_after_load)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mask: torch.Tensor | None = None,
        format: str = "csr",
        blocksize: int | tuple[int, int] = 32,
        backend: str = "auto",
        threads: int | None = None,
    ) -> SparseLinear:
        """A SparseLinear holding ``linear``'s weight (and a copy of its bias).

        ``mask`` (bool, the weight's shape) picks the stored entries exactly, zeros included;
        without one the nonzeros are stored. ``format="bsr"`` stores ``blocksize`` blocks
        (an int or (rows, cols)), padding a shape that is not a multiple of the block.

        >>> from torch import nn
        >>> layer = SparseLinear.from_linear(nn.Linear(40, 20), format="bsr", blocksize=16)
        >>> layer
        SparseLinear(in_features=40, out_features=20, format=bsr, blocksize=(16, 16), density=1.0000, bias=True, backend=auto)
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if linear.weight.is_meta:
            raise ValueError("from_linear: the layer's weight is on the meta device (shapes only, no values "
                             "to store); materialize it first, e.g. model.to_empty(device='cpu') and "
                             "load_state_dict(...)")
        sw = to_sparse_weight(
            linear.weight.detach(), format, blocksize if format == "bsr" else None, mask=mask, name="linear.weight"
        )
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(sw, bias, backend=backend, threads=threads)

    def to_dense_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weight (pruned entries zero) and bias.

        >>> from torch import nn
        >>> linear = nn.Linear(6, 3)
        >>> back = SparseLinear.from_linear(linear).to_dense_linear()
        >>> torch.equal(back.weight, linear.weight), torch.equal(back.bias, linear.bias)
        (True, True)
        """
        w = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # -- the weight -----------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The stored weight as a torch sparse CSR / BSR tensor [out, in] (padded to whole blocks
        for BSR): a view over the buffers, never a copy, built on first use and kept while the
        buffers are the same tensors (building one costs ~5 us, a sizeable share of a small
        layer's call)."""
        parts = (self.crow_indices, self.col_indices, self.values)
        cached = self.__dict__.get("_weight_view")
        if cached is None or any(a is not b for a, b in zip(cached[0], parts)):
            layout = torch.sparse_csr if self.format == "csr" else torch.sparse_bsr
            cached = self.__dict__["_weight_view"] = (parts, _make(layout, *parts, self.matrix_shape))
        return cached[1]

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half() replace the buffers
        self.__dict__.pop("_weight_view", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # deepcopy / pickle: torch's sparse tensors refuse; rebuilt on use
        state = super().__getstate__()
        state.pop("_weight_view", None)
        return state

    @property
    def nnz(self) -> int:
        """Stored values (whole blocks for BSR, zeros inside them included)."""
        return self.values.numel()

    def sparse_weight(self) -> SparseWeight:
        """The weight with its logical shape ``(out_features, in_features)``: what
        :func:`~sparse_lth.checkpoint.save_sparse` writes for this layer."""
        return SparseWeight(self.weight, (self.out_features, self.in_features))

    def sparse_state_dict(self) -> dict[str, SparseWeight | torch.Tensor]:
        """The state of the ``nn.Linear`` this layer stands for, its weight kept sparse:
        ``{"weight": SparseWeight, "bias": tensor}``. :func:`~sparse_lth.checkpoint.save_sparse`
        saves a sparsified model through it, so the file loads into the dense model."""
        state: dict[str, SparseWeight | torch.Tensor] = {"weight": self.sparse_weight()}
        if self.bias is not None:
            state["bias"] = self.bias
        return state

    def dense_weight(self) -> torch.Tensor:
        """The logical [out_features, in_features] weight as a dense tensor."""
        return self.sparse_weight().to_dense()

    def density(self) -> float:
        """Stored values / logical entries (for BSR whole blocks count, padding does not)."""
        total = self.in_features * self.out_features
        return min(1.0, self.nnz / total) if total else 1.0

    # -- use ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"SparseLinear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "SparseLinear is inference-only: its input requires grad, and no gradient would flow "
                "back through this layer. Run the model under torch.no_grad() / torch.inference_mode(), "
                "or densify(model) to train it."
            )
        W = self.weight
        rows, cols = self.matrix_shape
        if cols != self.in_features:  # BSR padded to whole blocks: pad the input to match
            x = F.pad(x, (0, cols - self.in_features))
        if rows == self.out_features:
            return sparse_linear(x, W, self.bias, backend=self.backend, threads=self.threads, check_invariants=False)
        y = sparse_linear(x, W, backend=self.backend, threads=self.threads, check_invariants=False)
        y = y[..., : self.out_features]
        return y + self.bias if self.bias is not None else y.contiguous()

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.blocksize else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{block}, "
                f"density={self.density():.4f}, bias={self.bias is not None}, backend={self.backend}")


def _recheck_after_load(module: SparseLinear, incompatible_keys) -> None:
    check_index_invariants(module.weight, "SparseLinear weight (loaded state dict)")


# -- whole models -----------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def sparsify(
    model: nn.Module,
    mask: Mapping[str, torch.Tensor] | None = None,
    format: str = "csr",
    blocksize: int | tuple[int, int] = 32,
    backend: str = "auto",
    max_density: float = DEFAULT_MAX_DENSITY,
) -> nn.Module:
    """Swap each sparse enough ``nn.Linear`` of ``model`` for a :class:`SparseLinear`; return the model.

    With a ``mask`` (a :class:`~sparse_lth.masks.Mask` or any name -> bool tensor mapping, names
    as ``model.named_parameters()`` reports them) the model first gets the mask applied in place,
    every masked parameter whichever layers are swapped, so the result computes exactly what
    ``mask.apply(model)`` computes. A layer's density is its mask's when the mask names its weight
    (under any name the weight has: tied layers share one entry), else its weight's nonzeros.
    With ``format="bsr"`` the density that counts is the stored one (whole blocks), which for an
    unstructured mask is far above the element density. Layers with density <= ``max_density``
    (default :data:`DEFAULT_MAX_DENSITY`, from the measured CPU crossover) are swapped; the
    rest stay dense. Layers that share one weight share one set of sparse buffers.

    Left dense, always: convolution layers (no sparse conv path yet), and subclasses of
    ``nn.Linear`` (they may read their weight outside forward, as ``nn.MultiheadAttention``
    does with its output projection). The model is changed in place (a bare ``nn.Linear``
    passed as ``model`` is returned as a new SparseLinear). A model on the meta device holds no
    values to store: that is a ValueError saying so. Inference only: see :class:`SparseLinear`.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    >>> with torch.no_grad():
    ...     _ = model[0].weight.mul_(torch.rand(8, 16) < 0.05)
    >>> [type(m).__name__ for m in sparsify(model)]
    ['SparseLinear', 'Linear']
    """
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must be in [0, 1], got {max_density}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if format not in ("csr", "bsr"):
        raise ValueError(f"format must be 'csr' or 'bsr', got {format!r}")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        if linear.weight.is_meta:
            raise ValueError(f"sparsify: layer {name or 'model'!r} has its weight on the meta device (shapes "
                             "only, no values to store); materialize the model first, e.g. "
                             "model.to_empty(device='cpu') and load_state_dict(...)")
    by_weight: dict[int, torch.Tensor] = {}  # id(parameter) -> its mask: tied layers find it too
    if mask is not None:
        mask = mask if isinstance(mask, Mask) else Mask(mask)
        mask.check_model(model)  # names and shapes, before anything changes
        mask.apply(model)
        params = dict(model.named_parameters())
        by_weight = {id(params[name]): alive for name, alive in mask.items()}
    built: dict[int, SparseLinear] = {}  # id(weight) -> the layer holding it sparse
    for name, linear in targets:
        shared = built.get(id(linear.weight))
        if shared is not None:  # a tied weight: reuse its buffers, keep this layer's bias
            bias = None if linear.bias is None else linear.bias.detach()
            sparse = SparseLinear(shared.sparse_weight(), bias, backend=shared.backend, threads=shared.threads)
        else:
            sparse = _sparse_or_none(linear, by_weight.get(id(linear.weight)), format, blocksize, backend,
                                     max_density)
            if sparse is None:
                continue
            built[id(linear.weight)] = sparse
        if not name:
            return sparse
        _replace(model, name, sparse)
    return model


def _sparse_or_none(linear: nn.Linear, layer_mask: torch.Tensor | None, format: str,
                    blocksize: int | tuple[int, int], backend: str, max_density: float) -> SparseLinear | None:
    """``linear`` as a SparseLinear when it is sparse enough (as stored), else None."""
    if layer_mask is not None:
        layer_mask = layer_mask.to(linear.weight.device)
        density = float(layer_mask.sum()) / max(layer_mask.numel(), 1)
    else:
        density = float((linear.weight != 0).sum()) / max(linear.weight.numel(), 1)
    if density > max_density:  # cheap check first: a bsr layer's stored density is never lower
        return None
    sparse = SparseLinear.from_linear(linear, mask=layer_mask, format=format, blocksize=blocksize, backend=backend)
    return sparse if sparse.density() <= max_density else None


def densify(model: nn.Module) -> nn.Module:
    """Swap every :class:`SparseLinear` of ``model`` back to an ``nn.Linear`` with identical
    weights (pruned entries zero); return the model (a bare SparseLinear comes back as a new
    ``nn.Linear``).

    >>> from torch import nn
    >>> model = densify(sparsify(nn.Sequential(nn.Linear(4, 2)), max_density=1.0))
    >>> type(model[0]).__name__
    'Linear'
    """
    if isinstance(model, SparseLinear):
        return model.to_dense_linear()
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseLinear):
            _replace(model, name, m.to_dense_linear())
    return model
