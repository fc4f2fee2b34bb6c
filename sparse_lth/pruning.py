"""Pruning criteria: read weights and a mask, return a new mask. Nothing here trains.

* ``prune_by_magnitude``: remove the given fraction of the weights still alive, smallest |w|
  first, per layer or globally; whole tiles by their RMS with ``block=(br, bc)``.
* ``prune_n_m``: keep the N largest of every M consecutive weights along the input axis (2:4).
* ``random_mask_like``: the random-mask control, same per-layer density, random positions.
* ``check_block``: whether tiles of a block size are valid for a mask and fit in memory (tile
  scoring pads each weight to whole tiles; a block far larger than a layer is refused with a
  ``ValueError`` saying how many bytes it would need and how many are available).

Ties are broken by position (the lower flat index is pruned first), so a criterion is
deterministic for given weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral

import torch
from torch import nn

from sparse_lth import formats
from sparse_lth.masks import Mask

SCOPES = ("layerwise", "global")
# Peak bytes per padded entry while scoring tiles: three fp32 padded tensors (squares, counts,
# alive flags) and the bool expansion of the kept tiles.
_TILE_BYTES_PER_ENTRY = 13


def _check_fraction(fraction: float, what: str) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (the share of surviving weights to remove), got {fraction}")


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Weights as [out, in]: a conv kernel's input channels and taps form one row."""
    return t.reshape(t.shape[0], -1) if t.dim() != 1 else t.reshape(1, -1)


def check_block(mask: Mask, block: tuple[int, int] | None) -> None:
    """Raise ``ValueError`` unless ``block`` is None or (rows, cols) of positive ints whose tiles
    of every layer in ``mask`` can be scored in the memory available.

    >>> check_block(Mask({"w": torch.ones(300, 784, dtype=torch.bool)}), (32, 32))
    """
    if block is None:
        return
    if len(block) != 2 or not all(isinstance(b, Integral) and not isinstance(b, bool) and b >= 1 for b in block):
        raise ValueError(f"block must be (rows, cols) of positive ints, got {block}")
    br, bc = int(block[0]), int(block[1])
    for name, alive in mask.items():
        rows = alive.shape[0] if alive.dim() > 1 else 1
        cols = alive.numel() // rows if rows else 0
        prows, pcols = -(-rows // br) * br, -(-cols // bc) * bc
        formats._check_allocation(
            prows * pcols * _TILE_BYTES_PER_ENTRY,
            f"pruning {name} ({rows}x{cols}) in whole {br}x{bc} tiles (padded to {prows}x{pcols})",
            "use a smaller block")


def _tile_scores(weight: torch.Tensor, alive: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS of each (br x bc) tile of the [out, in] weight, and whether the tile is alive.

    Edge tiles of a ragged shape are scored over the weights they hold.
    """
    br, bc = block
    w, a = _as_matrix(weight).float(), _as_matrix(alive)
    rows, cols = w.shape
    pad = (0, (-cols) % bc, 0, (-rows) % br)
    sq = torch.nn.functional.pad(w * w * a, pad)
    count = torch.nn.functional.pad(torch.ones_like(w), pad)
    tiles = lambda t: t.reshape(t.shape[0] // br, br, t.shape[1] // bc, bc).sum(dim=(1, 3))  # noqa: E731
    alive_tiles = tiles(torch.nn.functional.pad(a.float(), pad)) > 0
    return (tiles(sq) / tiles(count)).sqrt(), alive_tiles


def _expand_tiles(keep_tiles: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    br, bc = block
    matrix_shape = (shape[0], int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else (1, shape[0])
    full = keep_tiles.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return full[: matrix_shape[0], : matrix_shape[1]].reshape(shape)


def _scores(weight: torch.Tensor, alive: torch.Tensor, block: tuple[int, int] | None):
    """Flat scores and flat alive flags of one layer, in units of weights or of tiles."""
    if block is None:
        return weight.detach().abs().float().flatten(), alive.flatten()
    scores, alive_tiles = _tile_scores(weight.detach(), alive, block)
    return scores.flatten(), alive_tiles.flatten()


def _prune_lowest(scores: list[torch.Tensor], alive: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Drop round(fraction * alive) of the alive entries with the lowest score, jointly over the list."""
    flat_scores, flat_alive = torch.cat(scores), torch.cat(alive)
    n_prune = round(fraction * int(flat_alive.sum()))
    keep = flat_alive.clone()
    if n_prune:
        alive_idx = flat_alive.nonzero().squeeze(1)
        order = torch.argsort(flat_scores[alive_idx], stable=True)  # stable: ties by position
        keep[alive_idx[order[:n_prune]]] = False
    return list(keep.split([s.numel() for s in scores]))


def prune_by_magnitude(
    model: nn.Module,
    mask: Mask,
    fraction: float,
    scope: str = "layerwise",
    layer_fractions: Mapping[str, float] | None = None,
    block: tuple[int, int] | None = None,
) -> Mask:
    """Remove ``fraction`` of the surviving weights with the smallest magnitude; return a new Mask.

    ``scope="layerwise"`` removes that fraction from every layer; ``"global"`` pools the layers
    and removes the smallest weights wherever they are. ``layer_fractions`` (name -> fraction)
    gives some layers their own rate, pruned on their own in either scope (the paper prunes the
    output layer at half rate; a fraction of 0 leaves a layer untouched). ``block=(br, bc)``
    scores whole tiles of the [out, in] weight by their RMS and removes tiles, so the ticket
    maps onto BSR with no stored zeros; ``fraction`` then counts tiles (see :func:`check_block`
    for the memory a block needs).

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    >>> mask = prune_by_magnitude(model, Mask.ones_like(model), 0.2)
    >>> mask.layer_densities()
    {'0.weight': 0.8, '2.weight': 0.8}
    """
    _check_fraction(fraction, "fraction")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    layer_fractions = dict(layer_fractions or {})
    for name, f in layer_fractions.items():
        if name not in mask:
            raise ValueError(f"layer_fractions names {name!r}, which is not in the mask ({', '.join(mask)})")
        _check_fraction(f, f"layer_fractions[{name!r}]")
    check_block(mask, block)
    mask.check_model(model)
    params = dict(model.named_parameters())

    keep_flat: dict[str, torch.Tensor] = {}
    pooled = [n for n in mask if n not in layer_fractions] if scope == "global" else []
    if pooled:
        scored = [_scores(params[n], mask[n], block) for n in pooled]
        kept = _prune_lowest([s for s, _ in scored], [a for _, a in scored], fraction)
        keep_flat.update(zip(pooled, kept))
    for name in mask:
        if name in keep_flat:
            continue
        scores, alive = _scores(params[name], mask[name], block)
        keep_flat[name] = _prune_lowest([scores], [alive], layer_fractions.get(name, fraction))[0]

    new = {}
    for name in mask:
        if block is None:
            new[name] = keep_flat[name].reshape(mask[name].shape)
        else:
            tiles_shape = _tile_scores(params[name].detach(), mask[name], block)[0].shape
            new[name] = _expand_tiles(keep_flat[name].reshape(tiles_shape), mask[name].shape, block) & mask[name]
    return Mask(new)


def prune_n_m(model: nn.Module, mask: Mask, n: int = 2, m: int = 4) -> Mask:
    """Keep the ``n`` largest of every ``m`` consecutive weights along each row's input axis.

    Rows whose length is not a multiple of ``m`` keep their ragged tail group by the same rule.

    >>> from torch import nn
    >>> model = nn.Linear(8, 4)
    >>> prune_n_m(model, Mask.ones_like(model), 2, 4).density()
    0.5
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    mask.check_model(model)
    params = dict(model.named_parameters())
    new = {}
    for name in mask:
        w = _as_matrix(params[name].detach()).abs().float() * _as_matrix(mask[name])
        rows, cols = w.shape
        padded = torch.nn.functional.pad(w, (0, (-cols) % m), value=-1.0).reshape(rows, -1, m)
        # stable descending order: among equal magnitudes the earlier position survives
        order = torch.argsort(-padded, dim=-1, stable=True)
        keep = torch.zeros_like(padded, dtype=torch.bool).scatter_(-1, order[..., :n], True)
        new[name] = keep.reshape(rows, -1)[:, :cols].reshape(mask[name].shape) & mask[name]
    return Mask(new)


def random_mask_like(mask: Mask, generator: torch.Generator | None = None) -> Mask:
    """A mask with the same number of alive weights per layer at random positions.

    >>> m = Mask({"w": torch.tensor([True, False, False, True])})
    >>> random_mask_like(m, torch.Generator().manual_seed(0))["w"].sum().item()
    2
    """
    new = {}
    for name, t in mask.items():
        alive = int(t.sum())
        order = torch.randperm(t.numel(), generator=generator)
        flat = torch.zeros(t.numel(), dtype=torch.bool)
        flat[order[:alive]] = True
        new[name] = flat.reshape(t.shape).to(t.device)
    return Mask(new)
