"""Sparse checkpoints: one safetensors file, pruned weights as CSR / BSR parts.

File layout (format version 1)
------------------------------
safetensors stores only strided tensors, so a sparse weight ``name`` is three tensors:

* ``name::crow_indices``  int32 (int64 past 2**31 - 1 stored entries);
* ``name::col_indices``   int16 when the width allows (at most 32768 columns, or block
  columns for BSR), else int32 / int64;
* ``name::values``        the weight's dtype: ``(nnz,)`` for CSR, ``(blocks, br, bc)`` for BSR.

Every other tensor is stored dense under its own name. The string metadata key
``"sparse_lth"`` holds JSON::

    {"format_version": 1,
     "tensors": {"fc.weight": {"format": "csr", "shape": [300, 784], "dtype": "float32",
                               "block": null},
                 "fc.bias":   {"format": "dense", "shape": [300], "dtype": "float32"}}}

A conv weight is stored as its ``(out, in * kh * kw)`` matrix; a BSR matrix is padded with
zeros to whole blocks and ``shape`` keeps the logical shape. Tensors are listed in the state
dict's order.

Which tensors are stored sparse: with a mask, the ones it names (their alive entries, zeros
included; pruned entries read back as +0.0); without one, every floating tensor of two or more
dimensions (its nonzeros). Either way only where the sparse parts are smaller than the dense
bytes: otherwise the tensor is stored dense, pruned entries zeroed (an unstructured mask in BSR
fills nearly every block). A layer that holds its weight sparse already (a sparsified model's)
is stored as it is held. A sparse tensor must be finite: NaN / Inf is a ``ValueError`` naming it.

Reading validates everything (metadata against tensors, canonical indices) and raises a
``ValueError`` naming the file, the tensor and the problem.

Reading to dense tensors is bounded: metadata could declare a shape far beyond the stored data
(a 240 KB file declaring a weight that takes 14 GB dense). ``load_sparse`` refuses a file whose
dense tensors (BSR ones padded to whole blocks) would take more than ``max_dense_bytes``; by
default ``max(1 GiB, 1024 x the file's size)``, which any honest checkpoint down to about 0.1%
density meets. Pass a larger ``max_dense_bytes`` for a file you trust.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_lth import run_files
from sparse_lth.formats import (
    VALUE_DTYPES,
    SparseWeight,
    _blocksize,
    _check_compressed,
    _check_finite,
    _dense_from_parts,
    _make,
    _matrix_shape,
    padded_shape,
    to_sparse_weight,
)

__all__ = ["ConvertReport", "TensorReport", "convert_checkpoint", "load_sparse", "save_sparse"]

FORMAT_VERSION = 1
METADATA_KEY = "sparse_lth"
FORMATS = ("csr", "bsr")
_PARTS = ("crow_indices", "col_indices", "values")
_SEP = "::"
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
)}
_INT16_LIMIT = 2**15  # column indices 0 .. 32767
_INT32_MAX = 2**31 - 1
_MIN_DENSE_LIMIT = 2**30  # load_sparse's default limit: max(1 GiB, 1024 x the file's size)
_DENSE_PER_FILE_BYTE = 1024


@dataclass(frozen=True)
class TensorReport:
    """How one tensor was stored: format ("csr", "bsr" or "dense"), logical shape, density (share
    of entries alive: the mask's, else the nonzeros'), bytes in the file, and for BSR the share of
    blocks stored."""

    format: str
    shape: tuple[int, ...]
    density: float
    nbytes: int
    block_density: float | None = None


@dataclass(frozen=True)
class ConvertReport:
    """What :func:`convert_checkpoint` did: file sizes and how each tensor was stored; for a run
    directory also which round it deployed, that round's share of weights left and its test
    accuracy at early stop (a fraction; None where the record holds none)."""

    src: str
    dst: str
    format: str
    blocksize: tuple[int, int] | None
    bytes_before: int
    bytes_after: int
    tensors: dict[str, TensorReport] = field(default_factory=dict)
    round: int | None = None
    weights_remaining: float | None = None
    test_accuracy: float | None = None

    @property
    def ratio(self) -> float:
        """bytes_after / bytes_before."""
        return self.bytes_after / self.bytes_before if self.bytes_before else float("nan")

    def densities(self) -> dict[str, float]:
        return {name: t.density for name, t in self.tensors.items()}

    def __str__(self) -> str:
        lines = [f"{self.src} -> {self.dst} ({self.format}"
                 + (f", block {self.blocksize[0]}x{self.blocksize[1]})" if self.blocksize else ")")]
        if self.round is not None:
            left = "" if self.weights_remaining is None else f": {100 * self.weights_remaining:.2f}% of weights left"
            acc = "" if self.test_accuracy is None else f", test accuracy {100 * self.test_accuracy:.2f}% at early stop"
            lines.append(f"round {self.round}{left}{acc}")
        lines.append(f"bytes before {self.bytes_before:,}  after {self.bytes_after:,}  ({100 * self.ratio:.2f}%)")
        for name, t in self.tensors.items():
            if t.format != "dense":
                extra = f", block density {t.block_density:.4f}" if t.block_density is not None else ""
                lines.append(f"  {name}: {t.format} {list(t.shape)} density {t.density:.4f}{extra}")
        return "\n".join(lines)


# -- writing ------------------------------------------------------------------------------------
def _col_dtype(width: int) -> torch.dtype:
    if width <= _INT16_LIMIT:
        return torch.int16
    return torch.int32 if width - 1 <= _INT32_MAX else torch.int64


def _sparse_parts(sw: SparseWeight) -> dict[str, torch.Tensor]:
    m = sw.matrix
    nnz = m.values().shape[0]
    width = m.shape[1] if sw.format == "csr" else m.shape[1] // sw.blocksize[1]  # type: ignore[index]
    return {
        "crow_indices": m.crow_indices().to(torch.int32 if nnz <= _INT32_MAX else torch.int64),
        "col_indices": m.col_indices().to(_col_dtype(width)),
        "values": m.values(),
    }


def _parts_nbytes(parts: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _module_state(model: nn.Module) -> dict[str, torch.Tensor | SparseWeight]:
    """``model.state_dict()``, except that a layer holding its weights sparse (it has a
    ``sparse_state_dict()`` method, as :class:`~sparse_lth.nn.linear.SparseLinear` and
    :class:`~sparse_lth.nn.attention.SparseMultiheadAttention` do) gives the state of the dense
    module it stands for, local names and all (``in_proj_weight``, ``out_proj.weight``...), its
    weights SparseWeights: the file then loads into the dense model, and nothing is densified
    to write it. Such a layer's ``sparse_state_dict()`` covers everything under it: the state
    dict entries of its submodules are replaced too (the outermost such layer speaks)."""
    held: dict[str, dict[str, torch.Tensor | SparseWeight]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):  # state_dict repeats shared ones too
        prefix = f"{prefix}." if prefix else ""
        if any(prefix.startswith(outer) for outer in held):
            continue  # inside a held layer (pre-order: the outer one came first)
        export = getattr(module, "sparse_state_dict", None)
        if callable(export):
            held[prefix] = export()
    state: dict[str, torch.Tensor | SparseWeight] = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in held if key.startswith(p)), None)
        if prefix is None:
            state[key] = value
        else:  # the held layer's own buffers: its dense-layer state replaces them, in place
            for name, part in held[prefix].items():
                state.setdefault(prefix + name, part)
    return state


def _state_dict_of(obj: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | SparseWeight]:
    if isinstance(obj, nn.Module):
        return _module_state(obj)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an nn.Module or a state dict, got {type(obj).__name__}")
    for name, t in obj.items():
        if not isinstance(name, str):
            raise ValueError(f"state dict key {name!r} is not a string")
        if isinstance(t, SparseWeight):
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise ValueError(f"state dict entry {name!r} has layout {t.layout}; save dense tensors "
                             "(or a SparseWeight)")
    return dict(obj)


def _check_mask(mask: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    for name, m in mask.items():
        if name not in state:
            raise ValueError(f"mask names {name!r}, which the state dict has no tensor of")
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise ValueError(f"mask[{name!r}] must be a bool tensor, got "
                             f"{m.dtype if isinstance(m, torch.Tensor) else type(m).__name__}")
        if m.shape != state[name].shape:
            raise ValueError(f"mask[{name!r}] has shape {tuple(m.shape)}, tensor {name!r} has "
                             f"{tuple(state[name].shape)}")
        if state[name].dtype not in VALUE_DTYPES:
            raise ValueError(f"mask names {name!r}, a {state[name].dtype} tensor; only fp16, bf16, "
                             "fp32 and fp64 tensors can be stored sparse")


def _sparse_entry(sw: SparseWeight, parts: Mapping[str, torch.Tensor], alive: int
                  ) -> tuple[dict[str, Any], TensorReport]:
    """The metadata entry and report of a weight stored sparse as ``sw`` with ``alive`` entries."""
    numel = math.prod(sw.shape)
    block_density = None
    if sw.format == "bsr":
        br, bc = sw.blocksize  # type: ignore[misc]
        nblocks = (sw.matrix.shape[0] // br) * (sw.matrix.shape[1] // bc)
        block_density = sw.matrix.values().shape[0] / nblocks if nblocks else 1.0
    entry = {"format": sw.format, "shape": list(sw.shape), "dtype": str(sw.dtype).removeprefix("torch."),
             "block": list(sw.blocksize) if sw.format == "bsr" else None}
    report = TensorReport(sw.format, sw.shape, alive / numel if numel else 1.0, _parts_nbytes(parts), block_density)
    return entry, report


def _held_sparse(name: str, sw: SparseWeight) -> tuple[dict[str, torch.Tensor], dict[str, Any], TensorReport]:
    """The parts, metadata entry and report of a weight that is sparse already (a sparsified
    layer's): its own format, block and pattern, whatever ``format`` the call asked for."""
    sw = SparseWeight(sw.matrix.detach().cpu(), sw.shape)
    values = sw.matrix.values()
    _check_finite(values, name)
    parts = _sparse_parts(sw)
    alive = int((values != 0).sum()) if sw.format == "bsr" else values.numel()
    return (parts, *_sparse_entry(sw, parts, alive))


def _build(obj: nn.Module | Mapping[str, torch.Tensor], format: str, blocksize: Any,
           mask: Mapping[str, torch.Tensor] | None
           ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, TensorReport]]:
    """The tensors, metadata and per-tensor report of a sparse checkpoint."""
    if format not in FORMATS:
        raise ValueError(f"format must be 'csr' or 'bsr', got {format!r}")
    if format == "bsr":
        if blocksize is None:
            raise ValueError("format='bsr' needs a blocksize (an int or (rows, cols))")
        blocksize = _blocksize(blocksize, "blocksize")
    elif blocksize is not None:
        raise ValueError(f"blocksize is only for format='bsr', got blocksize={blocksize!r} with 'csr'")
    state = _state_dict_of(obj)
    if mask is not None:
        _check_mask(mask, state)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    report: dict[str, TensorReport] = {}
    for name, t in state.items():
        if _SEP in name:
            raise ValueError(f"tensor name {name!r} contains {_SEP!r}, which this format reserves")
        if isinstance(t, SparseWeight):  # held sparse already: written as held
            parts, entries[name], report[name] = _held_sparse(name, t)
            tensors.update({f"{name}{_SEP}{part}": value for part, value in parts.items()})
            continue
        t = t.detach().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored")
        shape = list(t.shape)
        sparse = None
        candidate = parts = None
        if mask is not None and name in mask:
            candidate = to_sparse_weight(t, format, blocksize, mask=mask[name].cpu(), name=name)
        elif mask is None and t.dtype in VALUE_DTYPES and t.dim() >= 2:
            candidate = to_sparse_weight(t, format, blocksize, name=name)
        if candidate is not None:
            parts = _sparse_parts(candidate)
            # Sparse only where it is smaller: an unstructured mask in BSR fills nearly every block.
            if _parts_nbytes(parts) < t.numel() * t.element_size():
                sparse = candidate
            elif mask is not None and name in mask:
                t = t.masked_fill(~mask[name].cpu(), 0)  # stored dense, still pruned
        if sparse is None:  # tied weights' shared storage is split where the file is written
            t = t.contiguous()
            tensors[name] = t
            entries[name] = {"format": "dense", "shape": shape, "dtype": dtype}
            nonzero = float((t != 0).float().mean()) if t.numel() and t.dtype != torch.bool else 1.0
            report[name] = TensorReport("dense", tuple(shape), nonzero, t.numel() * t.element_size())
            continue
        for part, value in parts.items():
            tensors[f"{name}{_SEP}{part}"] = value
        alive = int(mask[name].sum()) if mask is not None else int((t != 0).sum())
        entries[name], report[name] = _sparse_entry(sparse, parts, alive)
    metadata = {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, "tensors": entries})}
    return tensors, metadata, report


def save_sparse(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                format: str = "csr", blocksize: int | tuple[int, int] | None = None,
                mask: Mapping[str, torch.Tensor] | None = None) -> dict[str, TensorReport]:
    """Write a model or state dict as ONE sparse safetensors file (atomically); see module doc.

    ``mask`` (a :class:`~sparse_lth.masks.Mask` or name -> bool tensor) names the pruned tensors
    and their alive entries; BSR needs ``blocksize``. Returns how each tensor was stored.

    A sparsified model (``sparsify(...)``) is written as the dense model it stands for: each
    ``SparseLinear`` as ``<name>.weight`` (kept in its own format, block and pattern, whatever
    ``format`` says; a mask does not re-prune it) and ``<name>.bias``, a ``SparseConv1D`` as the
    Conv1D's [in, out] weight, a ``SparseMultiheadAttention`` as ``in_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``; so ``load_sparse`` gives a state
    dict the dense model loads. A state dict may likewise hold SparseWeight values.

    >>> import tempfile, os
    >>> model = nn.Linear(64, 32)
    >>> from sparse_lth.masks import Mask
    >>> mask = Mask({"weight": torch.rand(32, 64) < 0.1})
    >>> path = os.path.join(tempfile.mkdtemp(), "ticket.safetensors")
    >>> report = save_sparse(model, path, mask=mask)
    >>> report["weight"].format, report["bias"].format
    ('csr', 'dense')
    >>> state = load_sparse(path)
    >>> torch.equal(state["weight"], model.weight.detach() * mask["weight"])
    True
    """
    tensors, metadata, report = _build(model_or_state_dict, format, blocksize, mask)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_files.atomic_save_safetensors(tensors, path, metadata=metadata)
    return report


# -- reading ------------------------------------------------------------------------------------
def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for broken headers
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return tensors, metadata


def _entries(path: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path}: not a sparse_lth checkpoint (no {METADATA_KEY!r} metadata)")
    try:
        info = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {METADATA_KEY!r} metadata is not valid JSON: {e}") from e
    if not isinstance(info, dict) or not isinstance(info.get("tensors"), dict):
        raise ValueError(f"{path}: {METADATA_KEY!r} metadata has no 'tensors' table")
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {info.get('format_version')!r} is not supported "
                         f"(this version reads {FORMAT_VERSION})")
    return info["tensors"]


def _expect(cond: bool, path: Path, name: str, problem: str) -> None:
    if not cond:
        raise ValueError(f"{path}: tensor {name!r}: {problem}")


def _read_entry(path: Path, name: str, entry: Any, tensors: Mapping[str, torch.Tensor],
                dense: bool) -> tuple[torch.Tensor | SparseWeight, list[str]]:
    """One tensor of the file, checked against its metadata; and the file keys it used."""
    _expect(isinstance(entry, dict), path, name, "metadata entry is not a JSON object")
    fmt, shape, dtype_name = entry.get("format"), entry.get("shape"), entry.get("dtype")
    _expect(fmt in ("dense", *FORMATS), path, name, f"unknown format {fmt!r}")
    _expect(isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape), path, name,
            f"shape {shape!r} is not a list of non-negative ints")
    _expect(dtype_name in _DTYPES, path, name, f"unknown dtype {dtype_name!r}")
    dtype, shape = _DTYPES[dtype_name], tuple(shape)
    if fmt == "dense":
        _expect(name in tensors, path, name, "listed in the metadata but missing from the file")
        t = tensors[name]
        _expect(t.dtype == dtype, path, name, f"metadata says {dtype_name}, the tensor is {t.dtype}")
        _expect(tuple(t.shape) == shape, path, name,
                f"metadata says shape {list(shape)}, the tensor has {list(t.shape)}")
        return t, [name]

    keys = [f"{name}{_SEP}{part}" for part in _PARTS]
    for key in keys:
        _expect(key in tensors, path, name, f"sparse part {key!r} is missing from the file")
    crow, col, values = (tensors[k] for k in keys)
    _expect(dtype in VALUE_DTYPES, path, name, f"a sparse tensor cannot have dtype {dtype_name}")
    _expect(values.dtype == dtype, path, name, f"metadata says {dtype_name}, the values are {values.dtype}")
    _expect(crow.dtype in (torch.int32, torch.int64), path, name,
            f"crow_indices must be int32 or int64, got {crow.dtype}")
    _expect(col.dtype in (torch.int16, torch.int32, torch.int64), path, name,
            f"col_indices must be int16, int32 or int64, got {col.dtype}")
    rows, cols = _matrix_shape(shape)
    if fmt == "csr":
        _expect(entry.get("block") is None, path, name, f"a csr tensor has block {entry.get('block')!r}")
        _expect(values.dim() == 1, path, name, f"csr values must be 1-D, got shape {list(values.shape)}")
        size = (rows, cols)
        grid = size
        layout = torch.sparse_csr
    else:
        block = entry.get("block")
        _expect(isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block),
                path, name, f"bsr block {block!r} is not two positive ints")
        _expect(values.dim() == 3 and list(values.shape[1:]) == block, path, name,
                f"bsr values must be (blocks, {block[0]}, {block[1]}), got shape {list(values.shape)}")
        size = padded_shape((rows, cols), tuple(block))  # type: ignore[arg-type]
        grid = (size[0] // block[0], size[1] // block[1])
        layout = torch.sparse_bsr
    try:
        _check_compressed(crow.numpy(), col.numpy(), grid[0], grid[1], values.shape[0],
                          f"{path}: tensor {name!r}", "" if fmt == "csr" else "block ")
        _check_finite(values, f"{path}: tensor {name!r} values")
    except ValueError as e:
        raise ValueError(f"{e} (the metadata disagrees with the tensors, or the file is corrupt)") from None
    index_dtype = crow.dtype
    crow, col = crow.to(index_dtype), col.to(index_dtype)
    if dense:
        return _dense_from_parts(layout, crow, col, values, size)[:rows, :cols].reshape(shape), keys
    return SparseWeight(_make(layout, crow, col, values, size), shape), keys


def _declared_dense_bytes(entries: Mapping[str, Any]) -> int:
    """Bytes the metadata's tensors take dense (BSR padded to whole blocks); malformed entries
    count 0 here and fail in ``_read_entry`` with their own message."""
    total = 0
    for entry in entries.values():
        if not isinstance(entry, dict):
            continue
        shape, dtype, block = entry.get("shape"), _DTYPES.get(entry.get("dtype")), entry.get("block")
        if dtype is None or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            continue
        rows, cols = _matrix_shape(tuple(shape))
        if entry.get("format") == "bsr" and isinstance(block, list) and len(block) == 2 \
                and all(isinstance(b, int) and b > 0 for b in block):
            rows, cols = padded_shape((rows, cols), tuple(block))  # type: ignore[arg-type]
        total += rows * cols * dtype.itemsize
    return total


def _check_dense_limit(path: Path, entries: Mapping[str, Any], max_dense_bytes: int | None) -> None:
    size = path.stat().st_size
    limit = max_dense_bytes if max_dense_bytes is not None else max(_MIN_DENSE_LIMIT, _DENSE_PER_FILE_BYTE * size)
    declared = _declared_dense_bytes(entries)
    if declared > limit:
        raise ValueError(f"{path}: its metadata declares {declared:,} bytes of dense tensors in a {size:,}-byte "
                         f"file, over the limit of {limit:,} bytes; if you trust the file, raise the limit "
                         "(load_sparse(..., max_dense_bytes=N), sparse-lth convert --max-dense-bytes N)")


def load_sparse(path: str | Path, dense: bool = True, max_dense_bytes: int | None = None) -> dict[str, Any]:
    """Read a file written by :func:`save_sparse`.

    ``dense=True``: a state dict of dense tensors that ``model.load_state_dict`` takes, equal
    bit for bit to what was saved (pruned entries as +0.0). ``dense=False``: the sparse tensors
    as :class:`~sparse_lth.formats.SparseWeight` (a torch CSR / BSR matrix plus the logical
    shape, ready for deployment) and the others as dense tensors.
    Raises ``ValueError`` naming the file and tensor for a truncated or corrupt file or metadata
    that disagrees with the tensors.

    ``max_dense_bytes`` (``dense=True`` only) bounds the memory the dense tensors may take, so
    that a small file whose metadata declares huge shapes is refused instead of allocated;
    None means ``max(1 GiB, 1024 x the file's size)`` (BSR counted padded to whole blocks).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> w = torch.zeros(8, 8); w[2, 3] = 1.5
    >>> _ = save_sparse({"w": w}, path)
    >>> torch.equal(load_sparse(path)["w"], w), load_sparse(path, dense=False)["w"].format
    (True, 'csr')
    """
    path = Path(path)
    tensors, metadata = _read_file(path)
    entries = _entries(path, metadata)
    if dense:
        _check_dense_limit(path, entries, max_dense_bytes)
    out: dict[str, Any] = {}
    used: set[str] = set()
    for name, entry in entries.items():
        out[name], keys = _read_entry(path, name, entry, tensors, dense)
        used.update(keys)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{path}: tensor(s) {extra[:5]} are in the file but not in its metadata")
    return out


# -- converting ---------------------------------------------------------------------------------
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _is_sparse_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return METADATA_KEY in (f.metadata() or {})
    except Exception:
        return False


def _read_torch_file(src: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (a pickle is never executed), its errors made ours.

    torch explains a refused pickle in many lines about trusting the source; what the user needs
    to know is that the file holds Python objects where a state dict of tensors was expected.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's loader warnings would add lines to a one-line error
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text:
            found = text.split("Unsupported global:", 1)[1].split()
            what = f" (e.g. {found[1]})" if len(found) > 1 and found[0] == "GLOBAL" else ""
            raise ValueError(f"{src} holds pickled Python objects{what}, not a state dict of tensors; "
                             "save model.state_dict() instead") from None
        raise ValueError(f"{src}: not a readable torch state dict (truncated or corrupt?)") from None
    except Exception:
        # On damaged bytes torch raises whatever its unpickler trips on (RuntimeError from the
        # zip reader, EOFError, IndexError, KeyError, UnicodeDecodeError, ...): the cause is the file.
        raise ValueError(f"{src}: not a readable torch state dict (truncated or corrupt?)") from None


def _read_run(src: Path, round: int | None, max_drop: float | None
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, dict[str, Any]]:
    """(trained state dict, mask, bytes of its weight file, record) of the round to deploy."""
    if round is None and max_drop is None:  # the newest round: only its own files are read
        mask, trained, record = run_files.last_ticket(src)
        index = run_files.completed_rounds(src)[-1]
    else:
        try:
            index = run_files.pick_round(run_files.read_records(src), round=round, max_drop=max_drop)
        except ValueError as e:
            raise ValueError(f"{src}: {e}") from None
        mask, trained, record = run_files.read_round(src, index)
    weights_file = run_files.round_dir(src, index) / run_files.TRAINED_FILE
    return trained, mask, weights_file.stat().st_size, {**record, "round": index}


def _read_source(src: Path, max_dense_bytes: int | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, int]:
    """(state dict, mask or None, bytes of the file) of a checkpoint file (a run directory is
    :func:`_read_run`'s)."""
    if src.is_dir():
        raise ValueError(f"{src} is a directory but not a run directory of a lottery search")
    if not src.is_file():
        raise FileNotFoundError(f"no checkpoint at {src}")
    size = src.stat().st_size
    if src.suffix == ".safetensors":
        if _is_sparse_file(src):
            return load_sparse(src, dense=True, max_dense_bytes=max_dense_bytes), None, size
        tensors, _ = _read_file(src)
        return tensors, None, size
    if src.suffix not in _TORCH_SUFFIXES:
        raise ValueError(f"{src}: unknown checkpoint type {src.suffix!r} (expected .safetensors, "
                         f"{', '.join(_TORCH_SUFFIXES)} or a run directory)")
    obj = _read_torch_file(src)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # the common {"state_dict": ..., "epoch": ...} wrapper
    if not isinstance(obj, Mapping):
        raise ValueError(f"{src} holds a {type(obj).__name__}, not a state dict of tensors; "
                         "save model.state_dict() instead")
    try:
        return _state_dict_of(obj), None, size
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None


def _check_destination(src: Path, dst: Path) -> None:
    """Refuse a ``dst`` that cannot or must not be written, before any work is done."""
    if dst.is_dir():
        raise ValueError(f"{dst} is a directory; name the file to write, e.g. {dst / 'model.safetensors'}")
    real_src, real_dst = Path(os.path.realpath(src)), Path(os.path.realpath(dst))  # never raises on a link loop
    if real_dst == real_src or (dst.exists() and src.exists() and os.path.samefile(src, dst)):
        raise ValueError(f"{dst} is the source {src} itself; write the sparse checkpoint to another file")
    if run_files.is_run_dir(src) and real_src in real_dst.parents:
        raise ValueError(f"{dst} is inside the run directory {src}; write the sparse checkpoint outside it")
    parent = real_dst.parent
    while not parent.exists():  # save_sparse creates the missing folders
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {dst}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {dst}: {parent} is not writable; choose another destination")


def convert_checkpoint(src: str | Path, dst: str | Path, format: str = "csr",
                       blocksize: int | tuple[int, int] | None = None,
                       max_dense_bytes: int | None = None, round: int | None = None,
                       max_drop: float | None = None) -> ConvertReport:
    """Convert a dense checkpoint to one sparse safetensors file at ``dst`` (written atomically).

    ``src`` is a torch ``.pt`` / ``.pth`` state dict (read with ``weights_only=True``), a
    safetensors file (dense, or sparse to re-encode), or a search's run directory (a round's
    trained weights, its mask applied). Returns sizes before and after and per-tensor densities.
    ``dst`` may not be ``src`` itself (under any spelling or link) nor lie inside a run
    directory ``src``; ``max_dense_bytes`` is passed to :func:`load_sparse` for a sparse ``src``.

    Which round of a run directory: ``round`` by number, or with ``max_drop`` the sparsest
    round whose test accuracy at early stop is within ``max_drop`` percentage points of round
    0's (see :func:`~sparse_lth.run_files.pick_round`); neither, the newest round. The report
    says which round it took, its weights left and its accuracy. Either for a file ``src`` is
    a ``ValueError``.

    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> w = torch.zeros(256, 256); w[::16, ::16] = 1.0
    >>> torch.save({"fc.weight": w}, os.path.join(d, "dense.pt"))
    >>> r = convert_checkpoint(os.path.join(d, "dense.pt"), os.path.join(d, "sparse.safetensors"))
    >>> r.tensors["fc.weight"].format, r.bytes_after < r.bytes_before / 50
    ('csr', True)
    """
    src, dst = Path(src), Path(dst)
    if (round is not None or max_drop is not None) and not run_files.is_run_dir(src):
        flag = "--round (round=)" if round is not None else "--max-drop (max_drop=)"
        raise ValueError(f"{flag} picks a round of a search's run directory, and {src} is not one")
    _check_destination(src, dst)
    record: dict[str, Any] = {}
    if run_files.is_run_dir(src):
        state, mask, bytes_before, record = _read_run(src, round, max_drop)
    else:
        state, mask, bytes_before = _read_source(src, max_dense_bytes)
    report = save_sparse(state, dst, format=format, blocksize=blocksize, mask=mask)

    def number(key: str) -> float | None:  # a record written by hand may lack it
        value = record.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return ConvertReport(str(src), str(dst), format,
                         _blocksize(blocksize, "blocksize") if blocksize is not None else None,
                         bytes_before, dst.stat().st_size, report, round=record.get("round"),
                         weights_remaining=number("weights_remaining"), test_accuracy=number(run_files.ACCURACY_KEY))
