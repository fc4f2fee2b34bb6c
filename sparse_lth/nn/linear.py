"""SparseLinear: a linear layer whose weight is stored once as a CSR or BSR matrix.

The layer holds its weight in the layout the kernels read (out x in, no transpose per call) and
multiplies with the backend :mod:`sparse_lth.backends` picks: scipy, numba or torch's MKL
product on the CPU, Triton (or cuBLAS where the measured rule says dense wins) on CUDA.
:func:`~sparse_lth.nn.convert.sparsify` builds these layers from a model's ``nn.Linear``
layers.

Inference only: a SparseLinear's weight (three index / value buffers) and bias are buffers, not
parameters; nothing requires grad, and an input that requires grad is refused rather than left
without a gradient (:class:`~sparse_lth.nn.trainable.TrainableSparseLinear` is the layer that
trains). A SparseLinear is an ordinary module: ``copy.deepcopy``, ``.to()``, ``state_dict`` /
``load_state_dict`` (indices re-checked) and ``save_sparse`` (the file loads into the dense
model) work.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth import kernels
from sparse_lth.backends import BACKENDS, choose_backend, sparse_linear
from sparse_lth.formats import SparseWeight, _make, sparse_state, to_sparse_weight
from sparse_lth.kernels.cpu import CpuSparseProduct
from sparse_lth.kernels.cuda_rule import auto_cuda_backend
from sparse_lth.kernels.invariants import check_index_invariants
from sparse_lth.nn import ops
from sparse_lth.nn.trainable import linear_with

__all__ = ["SparseLinear", "NUMBA_MIN_CANDIDATE_ROWS"]

_INT32_MAX = 2**31 - 1


_SCIPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Calibration times the numba kernel from this many input rows on: it computes 64 at a time,
#: so below this at least three quarters of its work is padding.
NUMBA_MIN_CANDIDATE_ROWS = 16


def _batch(x: torch.Tensor) -> int:
    """Rows of a linear layer's input: every dimension but the last (the width may be 0)."""
    return x.shape[:-1].numel()


class _CallPlan:
    """How a sparse layer multiplied its last CPU input, fixed for replay: at batch 1 the scipy
    loops accumulating ``W @ x`` into a copy of the bias (numpy end to end), or ``F.linear`` by
    the dense copy where calibration chose dense. ``forward`` replays it while the input keeps
    the shape, dtype and layout it was made for and the layer keeps its backend, bias and thread
    setting, skipping the checks and choices that made it: at batch 1 those cost a small layer
    more than its product (a 784 -> 300 layer at 7%: 17.9 us against 21.2 us without, 23.7 us
    dense)."""

    __slots__ = ("run", "bias", "values", "threads", "shape", "dtype", "backend")

    def __init__(self, run, x: torch.Tensor, layer: SparseLinear) -> None:
        self.run = run
        self.bias, self.values = layer._buffers.get("bias"), layer._buffers["values"]
        self.threads, self.backend = layer.threads, layer.backend
        self.shape, self.dtype = x.shape, x.dtype

    def fits(self, x: torch.Tensor, layer: SparseLinear) -> bool:
        buffers = layer._buffers
        return (not x.is_nested and x.shape == self.shape and x.dtype == self.dtype and not x.is_cuda
                and not x.requires_grad and x.is_contiguous() and layer.backend == self.backend
                and layer.threads == self.threads and buffers.get("bias") is self.bias
                and buffers["values"] is self.values and not torch.compiler.is_compiling())

    @staticmethod
    def scipy_vector(product: CpuSparseProduct, bias: torch.Tensor | None, threads: int | None,
                     out_shape: tuple[int, ...]):
        """``x -> bias + W @ x`` for one vector through the prepared scipy product: its loop
        called directly when one thread runs it, else split over threads; either adds into
        ``y``, which starts as a copy of the bias."""
        start = None if bias is None else bias.detach().numpy()  # shares the bias's memory
        loop = product.vector_loop(threads) or functools.partial(product.add_matvec, threads=threads)
        rows, dtype = product.shape[0], product.data.dtype

        def run(x: torch.Tensor) -> torch.Tensor:
            y = np.zeros(rows, dtype) if start is None else start.astype(dtype)  # a copy
            loop(x.numpy().reshape(-1), y)
            return torch.from_numpy(y).reshape(out_shape)
        return run


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
    [..., out_features]. ``backend`` ("auto" | "triton" | "scipy" | "torch" | "numba" | "dense") is
    resolved per call from the device, dtype and batch (:func:`sparse_lth.backends.choose_backend`);
    ``threads`` goes to the scipy path.

    Inference only: nothing here requires grad. An input that requires grad while autograd is
    on raises a RuntimeError rather than returning an output whose gradient is silently
    missing: run under ``torch.no_grad()`` / ``torch.inference_mode()``, or :func:`densify` to train.

    ``backend="dense"`` (what calibration keeps where dense is faster) multiplies by a dense copy
    of the weight made on first use. Under ``torch.compile`` / ``torch.export`` the product is
    the custom op ``sparse_lth::linear``. Placed by hand in an ``nn.TransformerEncoderLayer``,
    register :func:`~sparse_lth.nn.attention.keep_out_of_fused_paths` as a forward pre-hook
    (``sparsify`` does): that layer's fused eval kernel would read the weight as dense.

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
    bias: torch.Tensor | None

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
        self.calibration = None  # a LayerChoice once sparse_lth.nn.calibrate has timed the paths
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
        return linear_with(self.dense_weight(), self.bias)

    # -- the weight -----------------------------------------------------------------------------
    def _views(self) -> dict:
        """Torch sparse tensors built over the buffers (the weight, row bands), kept while the
        buffers are the same tensors: building one costs ~5 us, a sizeable share of a small
        layer's call. ``.to()`` / ``.cuda()`` / ``.half()`` and ``deepcopy`` drop them."""
        buffers = self._buffers  # read directly: three attribute lookups cost a small layer's call
        crow, col, values = buffers["crow_indices"], buffers["col_indices"], buffers["values"]
        cached = self.__dict__.get("_sparse_views")
        if cached is None or cached[0] is not crow or cached[1] is not col or cached[2] is not values:
            cached = self.__dict__["_sparse_views"] = (crow, col, values, {})
        return cached[3]

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight as a torch sparse CSR / BSR tensor [out, in] (padded to whole blocks
        for BSR): a view over the buffers, never a copy."""
        views = self._views()
        if "weight" not in views:
            layout = torch.sparse_csr if self.format == "csr" else torch.sparse_bsr
            views["weight"] = _make(layout, self.crow_indices, self.col_indices, self.values, self.matrix_shape)
        return views["weight"]

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half() replace the buffers
        self.__dict__.pop("_sparse_views", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # deepcopy / pickle: torch's sparse tensors refuse; rebuilt on use
        state = super().__getstate__()
        state.pop("_sparse_views", None)
        return state

    def _row_band(self, start: int, stop: int) -> tuple[torch.Tensor, int]:
        """The stored rows that cover output rows ``start:stop`` as a torch sparse tensor (views of
        the buffers, plus new row pointers), and the offset of row ``start`` in it (BSR bands
        start at a block boundary). Built once per band (see :meth:`_views`)."""
        views = self._views()
        band = views.get(("band", start, stop))
        if band is None:
            height = self.blocksize[0] if self.blocksize else 1
            first, last = start // height, -(-stop // height)  # rows (CSR) or block rows (BSR)
            pointers = self.crow_indices[first:last + 1]
            lo, hi = int(pointers[0]), int(pointers[-1])
            matrix = _make(self.weight.layout, pointers - lo, self.col_indices[lo:hi], self.values[lo:hi],
                           ((last - first) * height, self.matrix_shape[1]))
            band = views[("band", start, stop)] = (matrix, start - first * height)
        return band

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
        return sparse_state(self.sparse_weight(), self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The logical [out_features, in_features] weight as a dense tensor."""
        return self.sparse_weight().to_dense()

    def density(self) -> float:
        """Stored values / logical entries (for BSR whole blocks count, padding does not)."""
        total = self.in_features * self.out_features
        return min(1.0, self.nnz / total) if total else 1.0

    # -- use ------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """x, padded to the stored width; or a clear error."""
        if x.is_nested:
            raise ValueError(f"{type(self).__name__} got a NestedTensor (nn.TransformerEncoder's padding fast "
                             "path); set encoder.use_nested_tensor = False, as sparsify does")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"{type(self).__name__} expects input [..., {self.in_features}], got {tuple(x.shape)}")
        # (a graph being traced is let through: torch.export traces with autograd on, and the
        # dense layers before this one hand it an input that requires grad)
        if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                f"{type(self).__name__} is inference-only: its input requires grad, and no gradient would flow "
                "back through this layer. Run the model under torch.no_grad() / torch.inference_mode(), "
                "or densify(model) to train it."
            )
        cols = self.matrix_shape[1]
        return F.pad(x, (0, cols - self.in_features)) if cols != self.in_features else x

    def _multiply(self, x: torch.Tensor, rows: tuple[int, int] | None, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W[rows].T + bias`` (all stored rows when ``rows`` is None) on the layer's path,
        a new contiguous tensor.

        Under ``torch.compile`` / ``torch.export`` the product is the custom op
        ``sparse_lth::linear`` over the raw buffers (a graph sees no sparse tensor). ``"dense"``
        (a calibrated choice: dense was faster for this layer) multiplies by a dense copy of
        the weight, made once and kept with the views."""
        if torch.compiler.is_compiling():
            y = ops.linear(x.reshape(_batch(x), x.shape[-1]).contiguous(), self.crow_indices, self.col_indices,
                           self.values, self.matrix_shape[0], backend=self.backend)
            y = y.reshape(*x.shape[:-1], self.matrix_shape[0])
            y = y if rows is None else y[..., rows[0]:rows[1]]
            return y if bias is None else y + bias
        if self.backend == "dense" or (self.backend == "auto" and x.is_cuda and self._dense_wins_on_cuda(x)):
            views = self._views()
            if "dense" not in views:
                views["dense"] = self.weight.to_dense()
            W = views["dense"] if rows is None else views["dense"][rows[0]:rows[1]]
            if rows is None and x.device.type == "cpu" and self.backend == "dense":
                views["plan"] = _CallPlan(functools.partial(F.linear, weight=W, bias=bias), x, self)
            return F.linear(x, W, bias)
        if rows is None and x.device.type == "cpu" and self._scipy_here(x):
            return self._scipy_linear(x, bias)
        if rows is None and self.format == "csr" and (x.is_cuda or self.backend == "triton") and self._triton_here(x):
            return self._padded_triton_linear(x, bias)
        if rows is None:
            W, offset = self.weight, 0
        else:
            W, offset = self._row_band(*rows)
        if offset == 0 and (rows is None or W.shape[0] == rows[1] - rows[0]):
            return sparse_linear(x, W, bias, backend=self.backend, threads=self.threads, check_invariants=False)
        y = sparse_linear(x, W, backend=self.backend, threads=self.threads, check_invariants=False)
        y = y[..., offset:offset + rows[1] - rows[0]]  # type: ignore[index]  # BSR: whole block rows
        return y + bias if bias is not None else y.contiguous()

    def _dense_wins_on_cuda(self, x: torch.Tensor) -> bool:
        """The measured CUDA rule (:mod:`sparse_lth.kernels.cuda_rule`): cuBLAS on a dense copy
        where it beat the Triton kernels at this density and batch."""
        stored = self.nnz / max(self.matrix_shape[0] * self.matrix_shape[1], 1)
        return auto_cuda_backend(self.format, _batch(x), stored, self.blocksize) == "dense"

    def _scipy_here(self, x: torch.Tensor) -> bool:
        """Whether this call takes the scipy path (other dtypes go the checked way, to its error)."""
        if x.dtype != self.values.dtype or x.dtype not in _SCIPY_DTYPES or self.backend not in ("scipy", "auto"):
            return False
        if self.backend == "scipy":
            return True
        return choose_backend(self.format, x.device, x.dtype, _batch(x), "auto", self.nnz, self.blocksize) == "scipy"

    def _triton_here(self, x: torch.Tensor) -> bool:
        """Whether this call takes the Triton path (with the weight's dtype; others go the
        checked way, to its error)."""
        return x.dtype == self.values.dtype and choose_backend(
            self.format, x.device, x.dtype, _batch(x), self.backend, self.nnz, self.blocksize) == "triton"

    def _padded_triton_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The Triton CSR product over rows padded to 8 entries (``kernels.pad_csr``, built once
        and kept with the views): its index and value streams are 16-byte loads."""
        views = self._views()
        padded = views.get("padded")
        if padded is None:
            padded = views["padded"] = kernels.pad_csr(self.weight, check_invariants=False)
        y = kernels.triton_csr_linear(padded, x.contiguous(), check_invariants=False)
        return y if bias is None else y.add_(bias)

    def _scipy_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The scipy path without per-call preparation: the product over the weight's arrays is
        built once (:class:`~sparse_lth.kernels.cpu.CpuSparseProduct`), as a small layer at
        batch 1 spends more on preparing a call than on multiplying."""
        views = self._views()
        product = views.get("scipy")
        if product is None:
            product = views["scipy"] = CpuSparseProduct(self.weight)
        if x.dtype == product.compute and x.dim() <= 2 and _batch(x) == 1 and x.is_contiguous():
            # batch 1: numpy end to end, one tensor conversion each way (a layer's whole call
            # at batch 1 can be shorter than a few torch calls); forward() replays this plan
            # for the next input of this shape without the checks and choices made above
            run = _CallPlan.scipy_vector(product, bias, self.threads, tuple(x.shape[:-1]) + (product.shape[0],))
            views["plan"] = _CallPlan(run, x, self)
            return run(x)
        lead = x.shape[:-1]
        x2 = x.reshape(_batch(x), x.shape[-1])  # not -1: the width may be 0
        yt = product(x2.t(), self.threads)  # [M, N]
        M, N = yt.shape
        if N == 1:  # [M, 1] and [1, M] share one memory order: no copy, and yt is ours to add to
            y = yt.reshape(1, M)
            if bias is not None:
                y.add_(bias)
        else:
            y = torch.empty((N, M), dtype=yt.dtype)
            torch.add(yt.t(), bias, out=y) if bias is not None else y.copy_(yt.t())
        return y.reshape(*lead, M)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The last CPU call's path, replayed (see _CallPlan); read, never made here: torch.export
        # traces forward and warns of any attribute it sees assigned.
        views = self.__dict__.get("_sparse_views")
        plan = views[3].get("plan") if views is not None else None
        if plan is not None and plan.fits(x, self):
            return plan.run(x)
        x = self._check_input(x)  # BSR padded to whole blocks: the input is padded to match
        rows = None if self.matrix_shape[0] == self.out_features else (0, self.out_features)
        return self._multiply(x, rows, self.bias)

    def backend_candidates(self, x: torch.Tensor) -> list[str]:
        """The paths that can multiply this layer's weight by ``x`` here (what
        :func:`~sparse_lth.nn.calibrate.calibrate` times): ``"dense"`` always, ``"torch"``,
        ``"scipy"`` and (from ``NUMBA_MIN_CANDIDATE_ROWS`` rows) ``"numba"`` on the CPU,
        ``"triton"`` and ``"torch"`` on CUDA, each where its dtype, format and block shape are
        supported."""
        names = ("dense", "triton", "torch") if x.device.type == "cuda" else ("dense", "torch", "scipy", "numba")
        if _batch(x) < NUMBA_MIN_CANDIDATE_ROWS:  # numba computes 64 rows at a time: mostly padding
            names = tuple(n for n in names if n != "numba")
        ok = []
        for name in names:
            try:
                choose_backend(self.format, x.device, x.dtype, _batch(x), name, self.nnz, self.blocksize)
            except ValueError:
                continue
            ok.append(name)
        return ok

    def forward_rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``self(x)[..., start:stop]``, multiplying only the stored rows ``start:stop`` (BSR: the
        block rows that cover them). Attention's q / k / v projections are bands of one
        [3E, E] weight; cross-attention needs them separately.

        >>> from torch import nn
        >>> layer = SparseLinear.from_linear(nn.Linear(8, 12), format="bsr", blocksize=4)
        >>> x = torch.randn(3, 8)
        >>> with torch.no_grad():
        ...     torch.allclose(layer.forward_rows(x, 5, 11), layer(x)[:, 5:11], atol=1e-6)
        True
        """
        if not 0 <= start <= stop <= self.out_features:
            raise ValueError(f"forward_rows: need 0 <= start <= stop <= {self.out_features}, got {start}:{stop}")
        if (start, stop) == (0, self.out_features):
            return self(x)
        bias = None if self.bias is None else self.bias[start:stop]
        return self._multiply(self._check_input(x), (start, stop), bias)

    def extra_repr(self) -> str:
        block = f", blocksize={self.blocksize}" if self.blocksize else ""
        calibrated = f" ({self.calibration})" if self.calibration is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{block}, "
                f"density={self.density():.4f}, bias={self.bias is not None}, backend={self.backend}{calibrated}")


def _recheck_after_load(module: SparseLinear, incompatible_keys) -> None:
    module.__dict__.pop("_sparse_views", None)  # loaded in place: a dense copy made before is stale
    check_index_invariants(module.weight, "SparseLinear weight (loaded state dict)")
