"""SparseConv2d: an ``nn.Conv2d`` whose weight is stored as CSR and run by a direct sparse kernel.

The weight [out, in, kh, kw] is held as a CSR matrix over its ``[out, in * kh * kw]`` view (the
layout :func:`sparse_lth.formats.to_sparse_weight` gives a conv weight) in three plain buffers,
and the CPU forward is :func:`sparse_lth.kernels.cpu_conv.cpu_sparse_conv2d` (direct sparse
convolution: work in proportion to the stored weights, no im2col). Grouped and depthwise convs,
and padding modes other than zeros, stay dense (:meth:`SparseConv2d.from_conv` refuses them).

Inference only, like :class:`sparse_lth.nn.linear.SparseLinear`: the buffers require no grad, and
an input that requires grad while autograd is on is refused rather than left without a gradient.

numba compiles the CPU kernel on its first call per dtype (seconds, once per process);
:func:`sparse_lth.kernels.cpu_conv.warm_up` does it ahead of time.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> conv = nn.Conv2d(8, 16, 3, padding=1)
>>> mask = torch.rand(16, 8, 3, 3) < 0.1
>>> layer = SparseConv2d.from_conv(conv, mask=mask)
>>> x = torch.randn(2, 8, 10, 10)
>>> with torch.no_grad():
...     expected = nn.functional.conv2d(x, conv.weight * mask, conv.bias, padding=1)
...     torch.allclose(layer(x), expected, atol=1e-5)
True
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth.formats import SparseWeight, _make, sparse_state, to_sparse_weight
from sparse_lth.kernels.invariants import check_index_invariants
from sparse_lth.nn import ops

__all__ = ["SparseConv2d", "CONV_BACKENDS"]


def _kernels():
    """The CPU conv kernels, imported on first use: they bring numba (~0.2 s to import), which a
    model without convolutions never needs."""
    from sparse_lth.kernels import cpu_conv

    return cpu_conv

#: "auto": the direct sparse kernel on the CPU, a dense copy elsewhere (the GPU's block-sparse
#: conv is not yet timed on a GPU: calibration decides there); "sparse": the direct sparse kernel
#: on the CPU, the Triton block-sparse conv on CUDA (kernels/conv.py); "dense": F.conv2d with a
#: dense copy of the weight, made once (what a per-layer calibration picks where dense measured faster).
CONV_BACKENDS = ("auto", "sparse", "dense")

_INT32_MAX = 2**31 - 1
_KEPT_LAUNCHES = 8  # CUDA: prepared Triton launches kept, one per input signature


class SparseConv2d(nn.Module):
    """``F.conv2d(x, W, bias, stride, padding, dilation)`` with ``W`` [out, in, kh, kw] stored
    as CSR over ``[out, in * kh * kw]``.

    Build one from an ``nn.Conv2d`` with :meth:`from_conv`, or from a CSR
    :class:`~sparse_lth.formats.SparseWeight` whose logical shape is (out, in, kh, kw).
    Buffers: ``crow_indices`` / ``col_indices`` (int32 where they fit), ``values``, ``bias``
    (or None); they move with ``.to()``, are the ``state_dict`` and survive ``copy.deepcopy``.
    The indices are checked once here and again after ``load_state_dict``.

    forward takes ``x`` [N, in, H, W] (or unbatched [in, H, W]) of the values' dtype and device.
    ``backend`` (see :data:`CONV_BACKENDS`) is read on every call, so a calibration may set it.

    >>> from torch import nn
    >>> layer = SparseConv2d.from_conv(nn.Conv2d(3, 4, (3, 5), stride=2, padding=(1, 2)))
    >>> layer
    SparseConv2d(3, 4, kernel_size=(3, 5), stride=(2, 2), padding=(1, 2), density=1.0000, bias=True, backend=auto)
    >>> layer(torch.randn(1, 3, 8, 8)).shape
    torch.Size([1, 4, 4, 4])
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: SparseWeight, bias: torch.Tensor | None = None, *, stride=1, padding=0,
                 dilation=1, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(weight, SparseWeight) or len(weight.shape) != 4:
            got = weight.shape if isinstance(weight, SparseWeight) else type(weight).__name__
            raise ValueError(f"SparseConv2d needs a SparseWeight of logical shape (out, in, kh, kw), got {got}")
        if weight.format != "csr":
            raise ValueError(f"SparseConv2d stores CSR weights (the direct kernel's layout), got {weight.format}")
        if backend not in CONV_BACKENDS:
            raise ValueError(f"backend must be one of {CONV_BACKENDS}, got {backend!r}")
        self.out_channels, self.in_channels, kh, kw = weight.shape
        self.kernel_size = (kh, kw)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        # validates the geometry (e.g. 'same' with a stride) now rather than on the first call
        _kernels().conv2d_geometry((10**6, 10**6), self.kernel_size, self.stride, self.padding, self.dilation, name="SparseConv2d")
        matrix = weight.matrix
        check_index_invariants(matrix, "SparseConv2d weight")
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (self.out_channels,)):
            raise ValueError(f"bias must be a tensor of shape ({self.out_channels},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        crow, col = matrix.crow_indices(), matrix.col_indices()
        if max(*matrix.shape, col.numel()) <= _INT32_MAX:
            crow, col = crow.to(torch.int32), col.to(torch.int32)  # a third less index traffic
        self.register_buffer("crow_indices", crow.contiguous())
        self.register_buffer("col_indices", col.contiguous())
        self.register_buffer("values", matrix.values().detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.backend = backend
        self.calibration: str | None = None  # what a calibration measured, shown by repr
        self.register_load_state_dict_post_hook(_recheck_after_load)

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        """Whether ``module`` is a conv this layer stands in for (what ``sparsify`` swaps and the
        search's evaluation runs sparse): exactly ``nn.Conv2d``, ``groups=1``, zeros padding.
        Subclasses may read their weight outside forward; grouped convs have no sparse kernel.

        >>> from torch import nn
        >>> SparseConv2d.replaces(nn.Conv2d(4, 4, 3)), SparseConv2d.replaces(nn.Conv2d(4, 4, 3, groups=4))
        (True, False)
        """
        return type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, backend: str = "auto") -> SparseConv2d:
        """A SparseConv2d holding ``conv``'s weight where ``mask`` (bool, the weight's shape) is
        True, zeros included, else its nonzeros; its bias copied. Grouped / depthwise convs and
        padding modes other than ``"zeros"`` are refused (they stay dense).

        >>> from torch import nn
        >>> SparseConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=4))
        Traceback (most recent call last):
        ...
        ValueError: SparseConv2d.from_conv: groups=4; grouped and depthwise convs stay dense (the sparse kernel handles groups=1 only)
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"SparseConv2d.from_conv: groups={conv.groups}; grouped and depthwise convs stay "
                             "dense (the sparse kernel handles groups=1 only)")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SparseConv2d.from_conv: padding_mode={conv.padding_mode!r}; only 'zeros' has a "
                             "sparse kernel, such convs stay dense")
        if conv.weight.is_meta:
            raise ValueError("from_conv: the layer's weight is on the meta device (shapes only, no values to "
                             "store); materialize it first")
        sw = to_sparse_weight(conv.weight.detach(), "csr", mask=mask, name="conv.weight")
        bias = None if conv.bias is None else conv.bias.detach()
        return cls(sw, bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, backend=backend)

    # -- the weight -----------------------------------------------------------------------------
    def _cache(self) -> dict:
        """Per-weight derived data (the kernel's taps, a dense copy), kept while the buffers are
        the same tensors, unchanged in place; ``.to()``, ``load_state_dict`` and ``deepcopy`` drop it."""
        buffers = self._buffers  # read directly: nn.Module.__getattr__ costs ~0.5 us a name, per call
        crow, col, values = buffers["crow_indices"], buffers["col_indices"], buffers["values"]
        versions = (crow._version, col._version, values._version)
        cached = self.__dict__.get("_derived")
        if cached is None or cached[1] != versions or cached[0][0] is not crow or cached[0][1] is not col \
                or cached[0][2] is not values:
            cached = self.__dict__["_derived"] = ((crow, col, values), versions, {})
        return cached[2]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_derived", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_derived", None)
        return state

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight: a torch sparse CSR tensor [out, in * kh * kw] over the buffers."""
        return _make(torch.sparse_csr, self.crow_indices, self.col_indices, self.values,
                     (self.out_channels, self.in_channels * self.kernel_size[0] * self.kernel_size[1]))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def density(self) -> float:
        """Stored values / weight entries."""
        total = self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return min(1.0, self.nnz / total) if total else 1.0

    def sparse_weight(self) -> SparseWeight:
        """The weight with its logical shape (out, in, kh, kw): what ``save_sparse`` writes."""
        return SparseWeight(self.weight, (self.out_channels, self.in_channels, *self.kernel_size))

    def sparse_state_dict(self) -> dict[str, SparseWeight | torch.Tensor]:
        """The state of the ``nn.Conv2d`` this layer stands for, its weight kept sparse:
        ``{"weight": SparseWeight, "bias": tensor}`` (a file saved from it loads into the dense model).

        >>> from torch import nn
        >>> state = SparseConv2d.from_conv(nn.Conv2d(2, 3, 3)).sparse_state_dict()
        >>> state["weight"].shape, tuple(state["bias"].shape)
        ((3, 2, 3, 3), (3,))
        """
        return sparse_state(self.sparse_weight(), self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The [out, in, kh, kw] weight as a dense tensor (pruned entries zero)."""
        return self.sparse_weight().to_dense()

    def to_dense_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same weight (pruned entries zero), bias and geometry.

        >>> from torch import nn
        >>> conv = nn.Conv2d(3, 5, 3, padding="same", dilation=2)
        >>> back = SparseConv2d.from_conv(conv).to_dense_conv()
        >>> torch.equal(back.weight, conv.weight), back.padding, back.dilation
        (True, 'same', (2, 2))
        """
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # -- use ------------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor, cache: dict) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SparseConv2d expects input [N, {self.in_channels}, H, W] (or "
                             f"[{self.in_channels}, H, W]), got {got}")
        if x.dtype != self.values.dtype:
            raise ValueError(f"SparseConv2d: input dtype {x.dtype} differs from the layer's {self.values.dtype}; "
                             f"convert one of them (layer.to({x.dtype}) or x.to({self.values.dtype}))")
        if x.device != self.values.device:
            raise ValueError(f"SparseConv2d: input on {x.device}, layer on {self.values.device}; move one of them")
        checked = cache.setdefault("checked_sizes", set())
        if x.shape[-2:] not in checked:  # an input smaller than the kernel: a clear ValueError
            _kernels().conv2d_geometry(tuple(x.shape[-2:]), self.kernel_size, self.stride, self.padding, self.dilation,
                            name="SparseConv2d")
            checked.add(x.shape[-2:])
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("SparseConv2d is inference-only: its input requires grad, and no gradient would "
                               "flow back through this layer. Run the model under torch.no_grad() / "
                               "torch.inference_mode(), or densify(model) to train it.")

    def backend_candidates(self, x: torch.Tensor) -> list[str]:
        """The paths that can run on ``x`` here (what calibration times): ``"dense"`` always, the
        direct sparse kernel on the CPU for floating inputs, the block-sparse Triton conv on CUDA."""
        if x.device.type == "cpu" and x.dtype.is_floating_point:
            return ["dense", "sparse"]
        if x.device.type == "cuda" and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            from sparse_lth.kernels._triton import has_triton

            return ["dense", "sparse"] if has_triton() else ["dense"]
        return ["dense"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(x, torch.Tensor) and x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if torch.compiler.is_compiling():  # a graph holds the custom op, over the raw buffers
            same = self.padding == "same"
            padding = [0, 0] if isinstance(self.padding, str) else list(self.padding)
            y = ops.conv2d(x, self.crow_indices, self.col_indices, self.values, self.bias, list(self.kernel_size),
                           list(self.stride), padding, same, list(self.dilation), self.backend)
            return y.squeeze(0) if unbatched else y
        cache = self._cache()
        self._check_input(x, cache)
        if self.backend == "dense" or (self.backend == "auto" and x.device.type != "cpu"):
            if "dense" not in cache:
                cache["dense"] = self.dense_weight()
            y = F.conv2d(x, cache["dense"], self.bias, self.stride, self.padding, self.dilation)
        elif x.device.type == "cuda":
            y = self._triton(x, cache)
        else:
            if x.device.type != "cpu":
                raise ValueError(f"SparseConv2d: backend 'sparse' runs on the CPU and CUDA, got input on {x.device}; "
                                 "use backend='dense' or 'auto' there")
            y = self._cpu(x, cache)
        return y.squeeze(0) if unbatched else y

    def _cpu(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """The direct sparse kernel, its launch prepared once per input signature (shape, dtype,
        threads) and kept with the weight: at batch 1 the entry's checks and plans cost as much
        as a 98%-sparse kernel."""
        buffers = self._buffers  # read directly, as in _cache: this runs on every call
        launch = _kernels().kept_launch(x, buffers["crow_indices"], buffers["col_indices"], buffers["values"],
                                        kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                                        dilation=self.dilation, cache=cache)
        return launch(x, buffers["values"], buffers["bias"])

    def _triton(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """The block-sparse Triton conv (:mod:`sparse_lth.kernels.conv`) over a BSR copy of the
        weight laid out by tap and input channel, made on first use: blocks of 32 output x up to
        32 input channels, a block stored where the weight keeps any entry of it."""
        from sparse_lth.kernels import conv_weight_to_bsr, has_triton, prepare_bsr_conv2d

        if not has_triton():
            raise ValueError("SparseConv2d: backend 'sparse' on CUDA needs Triton; use 'dense' or 'auto'")

        if isinstance(self.padding, str):  # 'same' / 'valid' as pads (the kernel pads symmetrically)
            (top, bottom, left, right), _ = _kernels().conv2d_geometry(tuple(x.shape[-2:]), self.kernel_size,
                                                                       self.stride, self.padding, self.dilation)
            if (top, left) != (bottom, right):
                x = F.pad(x, (left, right, top, bottom))
                top = left = 0
            padding = (top, left)
        else:
            padding = self.padding
        # the launch, checked once per input signature (at batch 1 the checks cost as much as the
        # kernel): the strides carry the memory format, and a bias replaced by one of another
        # shape or device is checked again
        bias = self.bias
        key = ("triton", x.shape, x.stride(), x.dtype, x.device, torch.backends.cudnn.allow_tf32,
               None if bias is None else (bias.shape, bias.device))
        launch = cache.get(key)
        if launch is None:
            for old in [k for k in cache if isinstance(k, tuple) and k[0] == "triton"][:-_KEPT_LAUNCHES + 1]:
                del cache[old]  # a few input signatures kept
            bsr = cache.get("bsr")
            if bsr is None:
                block = (32 if self.out_channels > 16 else 16, min(32, max(16, 1 << (self.in_channels - 1).bit_length())))
                bsr = cache["bsr"] = conv_weight_to_bsr(self.dense_weight(), None, block)
            launch = cache[key] = prepare_bsr_conv2d(x, *bsr, bias, out_channels=self.out_channels,
                                                     kernel_size=self.kernel_size, stride=self.stride,
                                                     padding=padding, dilation=self.dilation)
        return launch(x, bias)

    def extra_repr(self) -> str:
        geometry = f", stride={self.stride}" if self.stride != (1, 1) else ""
        if self.padding != (0, 0):
            geometry += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            geometry += f", dilation={self.dilation}"
        calibrated = f" ({self.calibration})" if self.calibration is not None else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}{geometry}, "
                f"density={self.density():.4f}, bias={self.bias is not None}, backend={self.backend}{calibrated}")


def _pair(value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"SparseConv2d: expected an int or a pair, got {value!r}")
    return int(pair[0]), int(pair[1])


def _recheck_after_load(module: SparseConv2d, incompatible_keys) -> None:
    module.__dict__.pop("_derived", None)  # loaded in place: taps and a dense copy made before are stale
    check_index_invariants(module.weight, "SparseConv2d weight (loaded state dict)")
