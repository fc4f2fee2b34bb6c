"""SparseMultiheadAttention: ``nn.MultiheadAttention`` with sparse q / k / v and output projections.

``nn.MultiheadAttention`` cannot simply have its linear layers swapped: its input projection is
a raw parameter (``in_proj_weight`` [3E, E]) that ``F.multi_head_attention_forward`` multiplies
itself, and its output projection's ``weight`` is read there directly (``out_proj.forward`` is
never called). :class:`SparseMultiheadAttention` holds the two projections as layers
(``in_proj`` E -> 3E, ``out_proj`` E -> E; each a :class:`~sparse_lth.nn.linear.SparseLinear` or,
when too dense to pay, an ``nn.Linear``) and computes what ``nn.MultiheadAttention`` computes:
the products through the layers, attention through ``F.scaled_dot_product_attention`` (or,
for ``need_weights=True``, the explicit softmax torch uses, returning the same weights).
Masks, ``is_causal``, batch-first and sequence-first, unbatched inputs and dropout (in training
mode) follow torch's rules; see :meth:`SparseMultiheadAttention.forward`.

:func:`sparse_lth.nn.convert.sparsify` builds it for an ``nn.MultiheadAttention`` whose projections
are sparse enough, from a mask naming ``<mha>.in_proj_weight`` and ``<mha>.out_proj.weight``;
:func:`sparse_lth.nn.convert.densify` gives back the ``nn.MultiheadAttention`` (same weights).
``save_sparse`` writes it under the dense module's names (``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``, ``out_proj.bias``), so the file loads into the dense model.

Which attention layers are swapped (the rest stay dense, masked): the packed form only, where
key and value have the embedding's width (``kdim == vdim == embed_dim``, torch's
``_qkv_same_embed_dim``; otherwise the weights are three separate parameters,
``q/k/v_proj_weight``, a layout this module does not store), without ``add_bias_kv`` and
``add_zero_attn`` (each appends a learned or zero key / value column after the projection and
widens every mask by one; not implemented here, and rare). Those are choices of scope, not
limits of the sparse products.

torch's fused inference paths read the weights themselves as dense tensors:
``nn.TransformerEncoderLayer`` (eval mode, batch-first) passes ``self_attn.in_proj_weight``,
``out_proj.weight``, ``linear1.weight``... to one fused kernel, and ``nn.TransformerEncoder``
turns padded batches into nested tensors. Every sparse layer therefore carries a no-op forward
pre-hook (:func:`keep_out_of_fused_paths`): torch skips the layer's fused path when a submodule
has a hook, and runs its ordinary forward, which calls our modules. ``sparsify`` also turns off
``use_nested_tensor`` on an ``nn.TransformerEncoder`` holding sparse layers (torch's own switch
for that path); ``densify`` turns it back on.

>>> import copy, torch
>>> from torch import nn
>>> from sparse_lth.nn import sparsify
>>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
>>> sparse = sparsify(copy.deepcopy(mha), max_density=1.0)  # a bare MHA comes back swapped
>>> type(sparse).__name__, type(sparse.in_proj).__name__, type(sparse.out_proj).__name__
('SparseMultiheadAttention', 'SparseLinear', 'SparseLinear')
>>> x = torch.randn(2, 5, 16)
>>> with torch.no_grad():
...     torch.allclose(sparse(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
True
>>> list(sparse.sparse_state_dict()) == list(mha.state_dict())
True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SparseMultiheadAttention", "keep_out_of_fused_paths"]


def keep_out_of_fused_paths(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing; its presence is the point.

    ``nn.TransformerEncoderLayer.forward`` (eval mode) hands its submodules' weights straight to
    ``torch._transformer_encoder_layer_fwd``, a dense fused kernel that fails on a sparse
    weight ("Could not run ... with arguments from the 'SparseCsrCPU' backend") or would need
    it densified. It skips that path when any submodule has a forward hook ("forward pre-/hooks
    are attached to the module") and calls the submodules instead. Sparse layers register this
    hook when built, so any layer that holds one is kept on the ordinary path.
    """
    return None


def _layer_state(layer: nn.Module) -> dict[str, Any]:
    """The state of the dense layer ``layer`` stands for: its ``sparse_state_dict()`` (weight a
    SparseWeight) if it has one, else its own state dict."""
    export = getattr(layer, "sparse_state_dict", None)
    if callable(export):
        return export()
    return {name: t.detach() for name, t in layer.state_dict().items()}


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    dense = getattr(layer, "dense_weight", None)
    return dense() if callable(dense) else layer.weight.detach()


def _project_rows(layer: nn.Module, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``layer(x)[..., start:stop]``, computing only those output rows: a sparse layer's
    ``forward_rows`` (a band of its stored rows), or a dense product with a slice of the weight."""
    rows = getattr(layer, "forward_rows", None)
    if callable(rows):
        return rows(x, start, stop)
    bias = None if layer.bias is None else layer.bias[start:stop]
    return F.linear(x, layer.weight[start:stop], bias)


class SparseMultiheadAttention(nn.Module):
    """Multi-head attention whose projections are separate layers, sparse or dense.

    ``in_proj`` maps [..., E] to [..., 3E] (rows: q, then k, then v, as ``in_proj_weight``);
    ``out_proj`` maps [..., E] to [..., E]; each is a ``SparseLinear`` or an ``nn.Linear``
    (anything with ``in_features``, ``out_features``, ``bias`` and a forward). Both have a bias
    or neither (as ``nn.MultiheadAttention(bias=...)``). ``num_heads``, ``dropout`` and
    ``batch_first`` mean what they mean for ``nn.MultiheadAttention``. Usually built by
    :func:`sparse_lth.nn.convert.sparsify`; see the module docstring for what it computes.

    Inference, as SparseLinear: a query, key or value that requires grad while autograd is on
    is a RuntimeError. The attributes torch's transformer layers read (``embed_dim``,
    ``num_heads``, ``head_dim``, ``batch_first``, ``dropout``, ``_qkv_same_embed_dim``,
    ``in_proj_weight``, ``in_proj_bias``, ``bias_k``, ``bias_v``, ``add_zero_attn``) are there;
    ``in_proj_weight`` is the in-projection's ``weight`` (a torch sparse tensor when sparse).

    >>> from torch import nn
    >>> attn = SparseMultiheadAttention(nn.Linear(8, 24), nn.Linear(8, 8), num_heads=2)
    >>> out, weights = attn(torch.randn(3, 1, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8))
    >>> tuple(out.shape), tuple(weights.shape)
    ((3, 1, 8), (1, 3, 4))
    >>> type(attn.to_dense_mha()).__name__
    'MultiheadAttention'
    """

    bias_k = None  # add_bias_kv is not supported (see the module docstring)
    bias_v = None
    add_zero_attn = False
    _qkv_same_embed_dim = True

    def __init__(self, in_proj: nn.Module, out_proj: nn.Module, num_heads: int, *, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        E = int(getattr(out_proj, "out_features", -1))
        for name, layer, shape in (("in_proj", in_proj, (E, 3 * E)), ("out_proj", out_proj, (E, E))):
            got = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
            if not isinstance(layer, nn.Module) or got != shape or not hasattr(layer, "bias"):
                raise ValueError(f"SparseMultiheadAttention: {name} must be a linear layer (SparseLinear or "
                                 f"nn.Linear) {shape[0]} -> {shape[1]} for embed_dim {E} (out_proj's width), "
                                 f"got {type(layer).__name__} {got[0]} -> {got[1]}")
        if not isinstance(num_heads, int) or num_heads <= 0 or E % num_heads:
            raise ValueError(f"SparseMultiheadAttention: embed_dim {E} must be divisible by num_heads, "
                             f"got num_heads={num_heads!r}")
        if (in_proj.bias is None) != (out_proj.bias is None):
            raise ValueError("SparseMultiheadAttention: in_proj and out_proj must both have a bias or neither "
                             "(nn.MultiheadAttention's bias=True / False); give both layers a bias or none")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"SparseMultiheadAttention: dropout must be in [0, 1], got {dropout}")
        self.embed_dim = self.kdim = self.vdim = E
        self.num_heads = num_heads
        self.head_dim = E // num_heads
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.in_proj = in_proj
        self.out_proj = out_proj
        self.register_forward_pre_hook(keep_out_of_fused_paths)

    # -- what torch's transformer layers read -----------------------------------------------------
    @property
    def in_proj_weight(self) -> torch.Tensor:
        """The in-projection's weight [3E, E]: a torch sparse tensor when it is held sparse."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    # -- the dense module it stands for ---------------------------------------------------------
    def sparse_state_dict(self) -> dict[str, Any]:
        """The state of the ``nn.MultiheadAttention`` this module stands for, names and order
        included (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``),
        sparse weights as SparseWeight: what :func:`~sparse_lth.checkpoint.save_sparse` writes."""
        inner, outer = _layer_state(self.in_proj), _layer_state(self.out_proj)
        state: dict[str, Any] = {"in_proj_weight": inner["weight"]}
        if "bias" in inner:
            state["in_proj_bias"] = inner["bias"]
        state.update({f"out_proj.{name}": value for name, value in outer.items()})
        return state

    def to_dense_mha(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` with the same weights (pruned entries zero), heads,
        dropout, batch_first and training mode."""
        w_in, w_out = _dense_weight(self.in_proj), _dense_weight(self.out_proj)
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                    bias=self.in_proj.bias is not None, batch_first=self.batch_first,
                                    device=w_in.device, dtype=w_in.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(w_in)
            mha.out_proj.weight.copy_(w_out)
            if self.in_proj.bias is not None:
                mha.in_proj_bias.copy_(self.in_proj.bias)
                mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha.train(self.training)

    # -- use --------------------------------------------------------------------------------------
    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v in the inputs' own layout; one product for self-attention, bands of the
        in-projection's rows otherwise (torch's ``_in_projection_packed`` does the same split)."""
        E = self.embed_dim
        if query is key and key is value:
            return self.in_proj(query).split(E, dim=-1)  # type: ignore[return-value]
        q = _project_rows(self.in_proj, query, 0, E)
        if key is value:
            k, v = _project_rows(self.in_proj, key, E, 3 * E).split(E, dim=-1)
            return q, k, v
        return q, _project_rows(self.in_proj, key, E, 2 * E), _project_rows(self.in_proj, value, 2 * E, 3 * E)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``'s arguments and results, with torch's rules:

        bool masks (True = masked) or float masks (added); ``attn_mask`` [L, S] or
        [N * num_heads, L, S], ``key_padding_mask`` [N, S]; ``is_causal`` is a hint that needs
        ``attn_mask`` (it lets SDPA build the causal mask itself when there is no padding mask
        and no weights are asked for); ``need_weights=True`` returns the attention weights,
        averaged over heads unless ``average_attn_weights=False``; unbatched inputs [L, E].
        Dropout on the attention weights in training mode only.
        """
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.is_nested:
                raise ValueError(f"SparseMultiheadAttention: {name} is a NestedTensor (nn.TransformerEncoder's "
                                 "padding fast path); set encoder.use_nested_tensor = False, as sparsify does")
            if t.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(
                    f"SparseMultiheadAttention is inference-only: its {name} requires grad, and no gradient "
                    "would flow back through the sparse projections. Run the model under torch.no_grad() / "
                    "torch.inference_mode(), or densify(model) to train it."
                )
        # torch's own checks and mask conversions, so errors and mask semantics are identical
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"SparseMultiheadAttention: query has {query.shape[-1]} features, embed_dim is "
                             f"{self.embed_dim}")
        if key.shape != value.shape:
            raise ValueError(f"SparseMultiheadAttention: key shape {tuple(key.shape)} does not match value shape "
                             f"{tuple(value.shape)}")
        batch_first = self.batch_first or not is_batched
        if not is_batched:  # one sequence: work on a batch of one, batch first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if batch_first:
            N, L = query.shape[:2]
            S = key.shape[1]
        else:
            L, N = query.shape[:2]
            S = key.shape[0]
        H, D = self.num_heads, self.head_dim

        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA builds the causal mask itself (torch does the same)
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer the causal one
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (L, S):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
                attn_mask = attn_mask.view(1, 1, L, S)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (N * H, L, S):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(N * H, L, S)}.")
                attn_mask = attn_mask.view(N, H, L, S)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise RuntimeError(f"expecting key_padding_mask shape of {(N, S)}, but got "
                                   f"{tuple(key_padding_mask.shape)}")
            padding = key_padding_mask.view(N, 1, 1, S)
            attn_mask = padding if attn_mask is None else attn_mask + padding

        q, k, v = self._project(query, key, value)
        if batch_first:  # [N, L, E] -> [N, H, L, D]
            q, k, v = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in (q, k, v))
        else:  # [L, N, E] -> [N, H, L, D]
            q, k, v = (t.unflatten(-1, (H, D)).permute(1, 2, 0, 3) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:  # torch's explicit path, so the weights are the ones it returns
            scores = (q * math.sqrt(1.0 / float(D))) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        if batch_first:  # [N, H, L, D] -> [N, L, E]
            out = out.transpose(1, 2).reshape(N, L, self.embed_dim)
        else:  # -> [L, N, E]
            out = out.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim)
        out = self.out_proj(out)
        if not is_batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")
