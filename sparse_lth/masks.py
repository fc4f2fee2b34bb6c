"""Mask: which weights of a model are alive.

A mask maps a parameter name (as in ``model.named_parameters()``) to a bool tensor of the
parameter's shape. By default the weights of linear layers (``nn.Linear`` and Hugging Face's
transposed ``Conv1D``) and convolutions (``nn.Conv1d/2d/3d``) are prunable, chosen by module
type: biases and normalization scales are never in a mask, whatever their names say. Other
parameters join by name (``include``, glob patterns, e.g. ``"*.in_proj_weight"`` for
``nn.MultiheadAttention``), and any can be left out by name (``exclude``).
A mask is kept explicitly; it is never inferred from ``weight == 0`` (a trained weight can
be exactly zero without being pruned).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES = ("linear", "conv")


def layer_type(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"`` or None: what kind of prunable layer ``module`` is.

    Hugging Face's ``Conv1D`` (GPT-2's transposed linear) counts as linear; it is recognized by
    its class name and module, so this library never imports transformers.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "linear"
    return None


def prunable_names(model: nn.Module, types: Iterable[str] = LAYER_TYPES, include: Iterable[str] = (),
                   exclude: Iterable[str] = ()) -> list[str]:
    """Names of the prunable weights of ``model``, in ``named_parameters()`` order.

    ``types`` picks layers by kind (``"linear"``, ``"conv"``: their ``weight``); ``include`` adds
    parameters of two or more dimensions whose names match a glob pattern; ``exclude`` removes
    names matching a pattern. A weight shared by several layers is named once, as
    ``named_parameters`` names it.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    >>> prunable_names(model), prunable_names(model, exclude=["2.*"])
    (['0.weight', '2.weight'], ['0.weight'])
    >>> prunable_names(nn.TransformerEncoderLayer(8, 2), types=[], include=["*proj_weight"])
    ['self_attn.in_proj_weight']
    """
    types, include, exclude = set(types), list(include), list(exclude)
    unknown = types - set(LAYER_TYPES)
    if unknown:
        raise ValueError(f"unknown layer types {sorted(unknown)}; choose from {', '.join(LAYER_TYPES)}")
    by_type = {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if layer_type(module) in types
    }
    names = []
    for name, param in model.named_parameters():
        chosen = name in by_type or (param.dim() >= 2 and any(fnmatchcase(name, p) for p in include))
        if chosen and not any(fnmatchcase(name, p) for p in exclude):
            names.append(name)
    return names


class Mask(Mapping[str, torch.Tensor]):
    """Parameter name -> bool tensor (True = alive).

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> mask = Mask.ones_like(model)
    >>> list(mask), mask.density()
    (['0.weight', '2.weight'], 1.0)
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"mask[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype != torch.bool:
                raise TypeError(f"mask[{name!r}] must be a bool tensor, got {tensor.dtype}")
            self._tensors[name] = tensor

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def ones_like(cls, model: nn.Module, types: Iterable[str] = LAYER_TYPES, include: Iterable[str] = (),
                  exclude: Iterable[str] = ()) -> Mask:
        """Every prunable weight of ``model`` alive (which weights: see :func:`prunable_names`)."""
        params = dict(model.named_parameters())
        names = prunable_names(model, types, include, exclude)
        return cls({name: torch.ones_like(params[name], dtype=torch.bool) for name in names})

    # -- mapping ------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Mask({len(self)} tensors, density={self.density():.4f})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask) or list(self) != list(other):
            return NotImplemented if not isinstance(other, Mask) else False
        return all(torch.equal(self[n], other[n].to(self[n].device)) for n in self)

    # -- accounting ---------------------------------------------------------------------------
    def num_alive(self) -> int:
        return sum(int(t.sum()) for t in self._tensors.values())

    def num_total(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    def density(self) -> float:
        """Fraction of prunable weights alive, over all layers (1.0 for an empty mask)."""
        total = self.num_total()
        return self.num_alive() / total if total else 1.0

    def layer_densities(self) -> dict[str, float]:
        """Fraction alive per layer."""
        return {n: (float(t.sum()) / t.numel() if t.numel() else 1.0) for n, t in self._tensors.items()}

    # -- use ----------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if a mask entry is missing from ``model`` or has another shape."""
        params = dict(model.named_parameters())
        for name, tensor in self._tensors.items():
            if name not in params:
                raise ValueError(f"mask has {name!r}, which the model has no parameter of")
            if params[name].shape != tensor.shape:
                raise ValueError(
                    f"mask[{name!r}] has shape {tuple(tensor.shape)}, "
                    f"parameter has {tuple(params[name].shape)}"
                )

    @torch.no_grad()
    def apply(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place and return it."""
        self.check_model(model)
        params = dict(model.named_parameters())
        for name, tensor in self._tensors.items():
            params[name].mul_(tensor.to(params[name].device))
        return model

    def to(self, device: torch.device | str) -> Mask:
        return Mask({n: t.to(device) for n, t in self._tensors.items()})

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the mask as a safetensors file (bool tensors), atomically."""
        from sparse_lth.run_files import atomic_save_safetensors

        atomic_save_safetensors({n: t.contiguous().cpu() for n, t in self._tensors.items()}, path)

    @classmethod
    def load(cls, path: str | Path) -> Mask:
        from safetensors.torch import load_file

        return cls(load_file(str(path)))
