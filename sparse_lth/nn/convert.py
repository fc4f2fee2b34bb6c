"""Swapping a model's linear, conv and attention layers for sparse ones (``sparsify``) and back
(``densify``).

``sparsify(model, mask)`` replaces each ``nn.Linear`` whose density is at or below
``max_density`` by a :class:`~sparse_lth.nn.linear.SparseLinear` (or, with ``trainable=True``,
a :class:`~sparse_lth.nn.trainable.TrainableSparseLinear`). Common architectures' other linear
maps are swapped too: Hugging Face's GPT-2 ``Conv1D`` (a transposed linear) becomes a
:class:`~sparse_lth.nn.hf_conv1d.SparseConv1D`, ``nn.MultiheadAttention`` (inside
``nn.TransformerEncoderLayer`` and the rest) a
:class:`~sparse_lth.nn.attention.SparseMultiheadAttention`, ``nn.Conv2d`` a
:class:`~sparse_lth.nn.conv.SparseConv2d` (grouped and depthwise ones are left dense, masked);
subclasses of ``nn.Linear`` are left dense (they may read their weight outside forward).
``densify(model)`` swaps them back with identical weights.

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
from typing import Any

import torch
from torch import nn

from sparse_lth.backends import BACKENDS
from sparse_lth.formats import to_sparse_weight
from sparse_lth.masks import Mask
from sparse_lth.nn.attention import SparseMultiheadAttention, keep_out_of_fused_paths
from sparse_lth.nn.calibrate import calibrate
from sparse_lth.nn.conv import SparseConv2d
from sparse_lth.nn.hf_conv1d import SparseConv1D, is_hf_conv1d
from sparse_lth.nn.linear import SparseLinear
from sparse_lth.nn.trainable import TrainableSparseLinear

__all__ = ["sparsify", "densify", "DEFAULT_MAX_DENSITY"]

#: Layers at or below this density become sparse by default. Measured on a 2-core CPU (fp32,
#: bench/cpu_crossover.md): a 4096 x 4096 sparse layer beats the dense one at every batch up to
#: 10% and breaks even near 20%; small cache-resident layers (1024 x 1024) at batch 1 only
#: break even near 10%, where the ~15-30 us per-call overhead matters. 0.1 is a win or a tie
#: everywhere measured.
DEFAULT_MAX_DENSITY = 0.1


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _mha_supported(mha: nn.MultiheadAttention) -> bool:
    """Packed projections and nothing appended to keys and values (see sparse_lth.nn.attention)."""
    return mha._qkv_same_embed_dim and mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn


class _Builder:
    """Builds the sparse layers of one ``sparsify`` call: the density rule, and one set of sparse
    buffers per weight, shared by every layer that holds that weight (tied weights)."""

    def __init__(self, by_weight: dict[int, torch.Tensor], format: str, blocksize: int | tuple[int, int],
                 backend: str, max_density: float, trainable: bool = False) -> None:
        self.by_weight, self.format, self.blocksize = by_weight, format, blocksize
        self.backend, self.max_density, self.trainable = backend, max_density, trainable
        self.built: dict[tuple[int, bool], SparseLinear] = {}  # (id(weight), transposed) -> first layer

    def layer(self, weight: torch.Tensor, bias: torch.Tensor | None, *, transposed: bool = False,
              cls: type[SparseLinear] = SparseLinear, name: str = "weight", **extra: Any) -> SparseLinear | None:
        """A ``cls`` holding ``weight`` ([out, in], or [in, out] when ``transposed``) if it is sparse
        enough as stored, else None."""
        bias = None if bias is None else bias.detach()
        key = (id(weight), transposed)
        shared = self.built.get(key)
        if shared is not None and self.trainable:  # a tied weight: one values Parameter, own bias
            tied = TrainableSparseLinear(shared.sparse_weight(), bias)
            tied.values = shared.values
            return tied
        if shared is not None:  # a tied weight: reuse its buffers, keep this layer's bias
            return cls(shared.sparse_weight(), bias, backend=shared.backend, threads=shared.threads, **extra)
        layer_mask = self.by_weight.get(id(weight))
        matrix = weight.detach()
        if layer_mask is not None:
            layer_mask = layer_mask.to(matrix.device)
        if transposed:
            matrix = matrix.t().contiguous()
            layer_mask = None if layer_mask is None else layer_mask.t().contiguous()
        alive = layer_mask if layer_mask is not None else matrix != 0
        if float(alive.sum()) / max(alive.numel(), 1) > self.max_density:
            return None  # cheap check first: a bsr layer's stored density is never lower
        sw = to_sparse_weight(matrix, self.format, self.blocksize if self.format == "bsr" else None,
                              mask=layer_mask, name=name)
        sparse = TrainableSparseLinear(sw, bias) if self.trainable else cls(sw, bias, backend=self.backend, **extra)
        if sparse.density() > self.max_density:
            return None
        self.built[key] = sparse
        return sparse

    def conv(self, conv: nn.Conv2d, name: str) -> SparseConv2d | None:
        """A :class:`~sparse_lth.nn.conv.SparseConv2d` for ``conv`` if its weight is sparse enough
        (element density: the conv is stored CSR whatever ``format`` says), else None."""
        layer_mask = self.by_weight.get(id(conv.weight))
        alive = conv.weight.detach() != 0 if layer_mask is None else layer_mask
        if float(alive.sum()) / max(alive.numel(), 1) > self.max_density:
            return None
        backend = "dense" if self.backend == "dense" else "auto"
        return SparseConv2d.from_conv(conv, mask=None if layer_mask is None else layer_mask.to(conv.weight.device),
                                      backend=backend)

    def attention(self, mha: nn.MultiheadAttention, name: str) -> SparseMultiheadAttention | None:
        """A SparseMultiheadAttention for ``mha`` when at least one projection is sparse enough (the
        other stays a dense ``nn.Linear`` over the same parameters), else None."""
        in_proj = self.layer(mha.in_proj_weight, mha.in_proj_bias, name=f"{name}.in_proj_weight")
        out_proj = self.layer(mha.out_proj.weight, mha.out_proj.bias, name=f"{name}.out_proj.weight")
        if in_proj is None and out_proj is None:
            return None
        E = mha.embed_dim
        if in_proj is None:  # dense: an nn.Linear over the very same parameters
            in_proj = nn.Linear(E, 3 * E, bias=mha.in_proj_bias is not None, device="meta")
            in_proj.weight = mha.in_proj_weight
            if mha.in_proj_bias is not None:
                in_proj.bias = mha.in_proj_bias
        if out_proj is None:
            out_proj = mha.out_proj
        sparse = SparseMultiheadAttention(in_proj, out_proj, mha.num_heads, dropout=mha.dropout,
                                          batch_first=mha.batch_first)
        return sparse.train(mha.training)  # dropout follows the mode, as in the dense module


def _is_sparse(module: nn.Module) -> bool:
    return isinstance(module, (SparseLinear, SparseMultiheadAttention, TrainableSparseLinear, SparseConv2d))


_NESTED_WAS = "_sparse_lth_use_nested_tensor"  # an encoder's use_nested_tensor before sparsify


def _keep_encoders_padded(model: nn.Module) -> None:
    """Turn off nn.TransformerEncoder's nested-tensor path where it holds sparse layers: it hands
    each layer a NestedTensor, which the sparse products do not take (remembered for densify).
    And keep each nn.TransformerEncoderLayer that holds one off its fused kernel, which reads
    the weights as dense tensors: a forward pre-hook on its sparse layers does that. Only there:
    a hook costs every call a few microseconds, a share of a small layer's call at batch 1."""
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder) and any(_is_sparse(m) for m in encoder.modules()):
            encoder.__dict__.setdefault(_NESTED_WAS, encoder.use_nested_tensor)
            encoder.use_nested_tensor = False
        if isinstance(encoder, nn.TransformerEncoderLayer):
            for m in encoder.modules():
                if isinstance(m, SparseLinear) and keep_out_of_fused_paths not in m._forward_pre_hooks.values():
                    m.register_forward_pre_hook(keep_out_of_fused_paths)


def sparsify(
    model: nn.Module,
    mask: Mapping[str, torch.Tensor] | None = None,
    format: str = "csr",
    blocksize: int | tuple[int, int] = 32,
    backend: str = "auto",
    max_density: float = DEFAULT_MAX_DENSITY,
    trainable: bool = False,
    example_inputs: Any = None,
) -> nn.Module:
    """Swap each sparse enough linear and conv layer of ``model`` for a sparse one; return the model.

    Swapped: ``nn.Linear`` (exactly that type) -> :class:`SparseLinear`; Hugging Face's
    ``Conv1D`` (GPT-2) -> :class:`SparseConv1D`; ``nn.MultiheadAttention`` ->
    :class:`~sparse_lth.nn.attention.SparseMultiheadAttention` when its in-projection
    (``<mha>.in_proj_weight``, [3E, E]) or output projection (``<mha>.out_proj.weight``) is
    sparse enough (a projection that is not stays a dense ``nn.Linear`` inside it).

    With a ``mask`` (a :class:`~sparse_lth.masks.Mask` or any name -> bool tensor mapping, names
    as ``model.named_parameters()`` reports them, each the parameter's own shape: [in, out]
    for a Conv1D) the model first gets the mask applied in place, every masked parameter
    whichever layers are swapped, so the result computes exactly what ``mask.apply(model)``
    computes. A layer's density is its mask's when the mask names its weight (under any name
    the weight has: tied layers share one entry), else its weight's nonzeros. With
    ``format="bsr"`` the density that counts is the stored one (whole blocks), which for an
    unstructured mask is far above the element density. Layers with density <= ``max_density``
    (default :data:`DEFAULT_MAX_DENSITY`, from the measured CPU crossover) are swapped; the
    rest stay dense. Layers that share one weight share one set of sparse buffers.

    ``nn.Conv2d`` (exactly that type, ``groups=1``, zeros padding) -> :class:`~sparse_lth.nn.conv.SparseConv2d`
    (CSR over [out, in * kh * kw] whatever ``format`` says; the direct sparse CPU kernel, a dense
    copy on other devices). Left dense (masked all the same): grouped and depthwise convs, other
    padding modes and conv subclasses; subclasses of ``nn.Linear`` (they may read their weight outside forward, as ``nn.MultiheadAttention``
    does with its output projection: that one is handled with its attention); attention with
    separate q / k / v weights (``kdim`` or ``vdim`` != ``embed_dim``), ``add_bias_kv`` or
    ``add_zero_attn`` (see :mod:`sparse_lth.nn.attention`). An ``nn.TransformerEncoder`` that
    holds sparse layers gets ``use_nested_tensor = False`` (:func:`densify` restores it).

    ``trainable=True`` swaps ``nn.Linear`` layers alone, each for a
    :class:`~sparse_lth.nn.TrainableSparseLinear` whose stored values are a Parameter over the
    fixed pattern (train with any optimizer on ``model.parameters()``; ``densify`` gives the
    trained dense layers back); Conv1D and attention stay dense then. Tied weights share one
    values Parameter.

    ``example_inputs`` (a tensor or a tuple of the model's positional inputs, as
    ``torch.export`` takes them) calibrates the swapped layers: each one's paths (dense, and the
    sparse kernels that can run here) are timed inside the model at that input shape and the
    fastest is kept (:func:`sparse_lth.nn.calibrate.calibrate`; the choice shows in the layer's
    repr, and :func:`~sparse_lth.nn.calibrate.calibration_table` prints them). A layer
    calibrated to ``"dense"`` multiplies by a dense copy of its weight, made on first use.
    Without example inputs each call picks its kernel by the measured density and batch rule
    (``backend="auto"``). Not with ``trainable=True``.

    The model is changed in place (a bare layer passed as ``model`` is returned as a new sparse
    one). A model on the meta device holds no values to store: that is a ValueError saying so.
    Without ``trainable`` the layers are inference only: see :class:`SparseLinear`.

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
    if example_inputs is not None and trainable:
        raise ValueError("sparsify: example_inputs calibrates inference layers; trainable=True has one path each")
    targets: list[tuple[str, nn.Module, str]] = []  # (name, module, kind)
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            targets.append((name, m, "linear"))
        elif trainable:
            continue  # trainable sparse layers exist for nn.Linear alone
        elif is_hf_conv1d(m):
            targets.append((name, m, "conv1d"))
        elif type(m) is nn.MultiheadAttention and _mha_supported(m):
            targets.append((name, m, "mha"))
        elif SparseConv2d.replaces(m):
            targets.append((name, m, "conv2d"))
    for name, m, kind in targets:
        weights = (m.in_proj_weight, m.out_proj.weight) if kind == "mha" else (m.weight,)
        if any(w.is_meta for w in weights):
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
    builder = _Builder(by_weight, format, blocksize, backend, max_density, trainable)
    for name, m, kind in targets:
        where = f"{name}.weight" if name else "weight"
        sparse: nn.Module | None
        if kind == "linear":
            sparse = builder.layer(m.weight, m.bias, name=where)
        elif kind == "conv1d":
            sparse = builder.layer(m.weight, m.bias, transposed=True, cls=SparseConv1D, name=where,
                                   dense_cls=type(m))
        elif kind == "conv2d":
            sparse = builder.conv(m, where)
        else:
            sparse = builder.attention(m, name or "model")
        if sparse is None:
            continue
        if not name:
            model = sparse
            break
        _replace(model, name, sparse)
    _keep_encoders_padded(model)
    if example_inputs is not None:
        calibrate(model, example_inputs)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Swap every sparse layer of ``model`` back to its dense module with identical weights
    (pruned entries zero): :class:`SparseLinear` -> ``nn.Linear``, :class:`SparseConv1D` -> the
    ``Conv1D`` it replaced, :class:`~sparse_lth.nn.attention.SparseMultiheadAttention` ->
    ``nn.MultiheadAttention``; return the model (a bare sparse layer comes back as a new dense one).
    Linear layers that shared one sparse weight share one dense ``Parameter`` again; a tie
    between a sparse layer and a module that stayed dense (GPT-2's ``lm_head`` and its word
    embedding) comes back as two equal parameters (Hugging Face: ``model.tie_weights()``).
    An ``nn.TransformerEncoder`` gets back the ``use_nested_tensor`` it had before ``sparsify``.

    >>> from torch import nn
    >>> model = densify(sparsify(nn.Sequential(nn.Linear(4, 2)), max_density=1.0))
    >>> type(model[0]).__name__
    'Linear'
    """
    if _is_sparse(model):
        return _dense_of(model)
    done: list[str] = []
    tied: dict[tuple, nn.Parameter] = {}  # shared sparse values -> the dense weight made for them
    for name, m in list(model.named_modules()):
        if any(name.startswith(f"{outer}.") for outer in done):
            continue  # inside an attention layer that was densified whole
        if _is_sparse(m):
            dense = _dense_of(m)
            if type(m) in (SparseLinear, TrainableSparseLinear) and m.values.numel():  # layers that shared one sparse weight
                key = (m.values.data_ptr(), m.values.shape, m.out_features, m.in_features)  # share one again
                dense.weight = tied.setdefault(key, dense.weight)
            _replace(model, name, dense)
            done.append(name)
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder) and _NESTED_WAS in encoder.__dict__ \
                and not any(_is_sparse(m) for m in encoder.modules()):
            encoder.use_nested_tensor = encoder.__dict__.pop(_NESTED_WAS)
    return model


def _dense_of(module: nn.Module) -> nn.Module:
    if isinstance(module, SparseMultiheadAttention):
        return module.to_dense_mha()
    if isinstance(module, SparseConv1D):
        return module.to_dense_conv1d()
    if isinstance(module, SparseConv2d):
        return module.to_dense_conv()
    return module.to_dense_linear()  # type: ignore[union-attr]
