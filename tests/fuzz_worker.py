"""The child process of the sparse fuzz suite (tests/test_fuzz_sparse.py): it runs one case at a time.

Why a separate process: a malformed index that slips past a check makes scipy's compiled loops
or Triton read out of bounds, and that can end in a segmentation fault or an abort. In the pytest
process that would kill the whole run; here it kills only this worker, and the parent turns the
death (exit status, signal, and the faulthandler traceback this process writes to stderr) into a
failed test naming the case.

Protocol, on the pipes the parent opened: every message is an 8-byte little-endian length and a
pickle. The parent sends a case (plain Python data: lists of ints and floats, shapes, dtype and
device names, the entry point's name); the worker answers one of

* ``("ok", {name: (dtype, shape, device, contiguous, float64/int64 bytes)})``: what the entry
  point returned (one tensor under ``""``, or load_sparse's state dict);
* ``("raised", (type name, its bases' names...), message, traceback)``: what the entry point raised;
* ``("setup_error", traceback)``: the case could not be built (a bug of the suite, not the library).

Before the first case it sends ``("ready", info)``. The file's stdout is kept for the protocol:
anything the library prints goes to stderr.

``FUZZ_BREAK`` (a test of the suite itself, never set in CI): ``invariants`` turns every binding of
``check_index_invariants`` into a no-op, ``compressed`` does the same to the checkpoint loader's
``_check_compressed``; the suite must then fail (or report a crash).
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

_HEADER = struct.Struct("<Q")


# -- protocol ---------------------------------------------------------------------------------
def _read_exact(stream, n: int) -> bytes | None:
    """n bytes from the pipe, or None at end of file (the parent closed it: time to go)."""
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


# -- building tensors from plain data ---------------------------------------------------------
def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _dense(spec: dict):
    """A strided tensor from a ``dense`` spec: logical values, then the asked memory order, made
    on the spec's device (moving a strided view to another device would make it contiguous)."""
    import torch

    shape = tuple(spec["shape"])
    dtype = _dtype(spec["dtype"])
    device = spec.get("device", "cpu")
    t = torch.tensor(spec["data"], dtype=torch.float64).reshape(shape).to(device, dtype)
    order = spec.get("order", "contiguous")
    if order == "transposed":  # same values, column-major memory (what x.t() of a row-major x is)
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif order == "strided":  # every other element of a wider buffer: neither layout is contiguous
        base = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
        base[..., ::2] = t
        t = base[..., ::2]
    return t


def _every_other(t):
    """The same values, as every other row of a buffer twice as long: not contiguous."""
    import torch

    base = torch.zeros((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    base[::2] = t
    return base[::2]


def _sparse(spec: dict):
    """A CSR / BSR tensor exactly as described, invariants unchecked (that is the point).
    ``extra_dim`` adds a batch ("batch") or dense ("dense") dimension; ``strided_parts`` makes
    the index and value tensors non-contiguous views."""
    import torch

    device = spec.get("device", "cpu")
    crow = torch.tensor(spec["crow"], dtype=_dtype(spec["crow_dtype"]))
    col = torch.tensor(spec["col"], dtype=_dtype(spec["col_dtype"]))
    values = torch.tensor(spec["values"], dtype=torch.float64).reshape(tuple(spec["values_shape"]))
    values = values.to(_dtype(spec["dtype"]))
    crow, col, values = crow.to(device), col.to(device), values.to(device)
    size = tuple(spec["shape"])
    if spec.get("extra_dim") == "batch":
        crow, col, values, size = crow[None], col[None], values[None], (1, *size)
    elif spec.get("extra_dim") == "dense":
        values, size = values[..., None], (*size, 1)
    if spec.get("strided_parts"):
        crow, col, values = _every_other(crow), _every_other(col), _every_other(values)
    make = torch.sparse_csr_tensor if spec["layout"] == "csr" else torch.sparse_bsr_tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(crow, col, values, size=size, check_invariants=False)


def build(spec):
    """Any operand of a case: sparse, dense, a plain Python object, or None."""
    if spec is None:
        return None
    kind = spec["kind"]
    if kind == "sparse":
        return _sparse(spec)
    if kind == "dense":
        return _dense(spec)
    if kind == "pyobj":
        return spec["value"]
    raise ValueError(f"unknown operand kind {kind!r}")


# -- the entry points -------------------------------------------------------------------------
def _call_kernel(case: dict, W, X):
    from sparse_lth import backends, kernels

    entry = case["entry"]
    if entry in ("cpu_csr_matmul", "cpu_bsr_matmul"):
        return getattr(kernels, entry)(W, X, threads=case.get("threads"))
    if entry == "sparse_matmul":
        return backends.sparse_matmul(W, X, backend=case["backend"], threads=case.get("threads"))
    if entry.startswith("triton_"):
        return getattr(kernels, entry)(W, X)
    raise ValueError(f"unknown entry point {entry!r}")


def _call_linear(case: dict, W, x, bias):
    import torch

    from sparse_lth import backends
    from sparse_lth.nn import SparseLinear

    if case["entry"] == "sparse_linear":
        return backends.sparse_linear(x, W, bias, backend=case["backend"], threads=case.get("threads"))
    layer = SparseLinear(W, bias)
    with torch.no_grad():
        return layer(x)


def _write_checkpoint(case: dict, folder: Path) -> Path:
    """save_sparse's file for the case's weight, then its parts / metadata replaced as told."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from sparse_lth.checkpoint import save_sparse

    dtype = _dtype(case["dtype"])
    weight = torch.tensor(case["weight"], dtype=torch.float64).reshape(case["shape"]).to(dtype)
    mask = torch.tensor(case["mask"], dtype=torch.bool).reshape(case["shape"])
    bias = torch.tensor(case["bias"], dtype=torch.float64).to(dtype)
    original = folder / "original.safetensors"
    block = tuple(case["block"]) if case["format"] == "bsr" else None
    save_sparse({"w": weight, "b": bias}, original, format=case["format"], blocksize=block, mask={"w": mask})
    with safe_open(str(original), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "w::values" not in tensors:
        raise RuntimeError(f"save_sparse stored 'w' dense, the suite expected it sparse: {sorted(tensors)}")
    for part, (data, dtype_name, shape) in (case.get("parts") or {}).items():
        t = torch.tensor(data, dtype=torch.float64 if "float" in dtype_name else torch.int64)
        tensors[f"w::{part}"] = t.reshape(shape).to(_dtype(dtype_name)).contiguous()
    metadata = _patch_metadata(metadata, case.get("meta") or {})
    tampered = folder / "tampered.safetensors"
    save_file(tensors, str(tampered), metadata=metadata)
    return tampered


_DELETE = "<delete>"


def _patch_metadata(metadata: dict, patch: dict) -> dict | None:
    """Apply the case's metadata edits: the whole key dropped or replaced by raw text, top-level
    fields, or fields of the weight's entry (``_DELETE`` removes one)."""
    if patch.get("drop"):
        return None
    if "raw" in patch:
        return {"sparse_lth": patch["raw"]}
    info = json.loads(metadata["sparse_lth"])
    for key, value in patch.get("top", {}).items():
        info[key] = value
    if "entry_replace" in patch:
        info["tensors"]["w"] = patch["entry_replace"]
    for key, value in patch.get("entry", {}).items():
        if value == _DELETE:
            info["tensors"]["w"].pop(key, None)
        else:
            info["tensors"]["w"][key] = value
    return {"sparse_lth": json.dumps(info)}


def _encode(t) -> tuple:
    """A returned tensor as plain data the parent can compare without torch's help."""
    import torch

    if not isinstance(t, torch.Tensor):
        return (type(t).__name__, None, None, None, repr(t)[:200].encode())
    as_np = torch.float64 if t.is_floating_point() else torch.int64
    data = b"" if t.device.type == "meta" else t.detach().to("cpu", as_np).contiguous().numpy().tobytes()
    return (str(t.dtype).removeprefix("torch."), tuple(t.shape), t.device.type,
            t.layout == torch.strided and t.is_contiguous(), data)


def _prepare(case: dict, folder: Path):
    """Build everything the call needs (errors here are the suite's): a zero-argument call."""
    entry = case["entry"]
    if entry in _HOOKS:
        return _HOOKS[entry]
    if entry == "load_sparse":
        from sparse_lth.checkpoint import load_sparse

        path = _write_checkpoint(case, folder)
        return lambda: load_sparse(path)
    W = build(case["W"])
    if entry in ("sparse_linear", "SparseLinear") or entry.endswith("_linear"):
        x, bias = build(case["x"]), build(case.get("bias"))
        if entry.startswith("triton_"):
            from sparse_lth import kernels

            return lambda: getattr(kernels, entry)(W, x)
        return lambda: _call_linear(case, W, x, bias)
    X = build(case["X"])
    return lambda: _call_kernel(case, W, X)


# The suite's test of itself: a crash as a kernel reading out of bounds would have it, and a hang.
_HOOKS = {"__crash__": lambda: os.kill(os.getpid(), signal.SIGSEGV), "__hang__": lambda: time.sleep(3600)}


def run_case(case: dict, folder: Path) -> tuple:
    try:
        call = _prepare(case, folder)
    except Exception:
        return ("setup_error", traceback.format_exc())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = call()
    except Exception as e:
        kinds = tuple(c.__name__ for c in type(e).__mro__)  # the parent checks "ValueError" in here
        return ("raised", kinds, str(e)[:2000], traceback.format_exc()[-3000:])
    if isinstance(result, dict):
        return ("ok", {name: _encode(t) for name, t in result.items()})
    return ("ok", {"": _encode(result)})


# -- self-sabotage, to prove the suite can fail ---------------------------------------------------
def _break_checks(mode: str) -> None:
    """Replace a check by a no-op everywhere it is bound (each module imported it by name)."""
    import sparse_lth.backends
    import sparse_lth.checkpoint
    import sparse_lth.kernels
    import sparse_lth.kernels._triton
    import sparse_lth.kernels.cpu
    import sparse_lth.kernels.invariants
    import sparse_lth.nn

    name = {"invariants": "check_index_invariants", "compressed": "_check_compressed"}[mode]
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "") or "").startswith("sparse_lth") and hasattr(module, name):
            setattr(module, name, lambda *args, **kwargs: None)


def main() -> None:
    faulthandler.enable(file=sys.stderr, all_threads=True)
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints (the library's, Triton's) must not corrupt the protocol
    sys.stdout = sys.stderr

    import torch

    torch.set_num_threads(1)  # as tests/conftest.py: 2 shared cores
    import sparse_lth.backends  # noqa: F401  (import cost before "ready", not in a case's time)
    import sparse_lth.checkpoint  # noqa: F401
    import sparse_lth.nn  # noqa: F401
    from sparse_lth.kernels import _triton

    mode = os.environ.get("FUZZ_BREAK", "")
    if mode:
        _break_checks(mode)
    info = {"triton": _triton.has_triton(), "interpreting": _triton.is_interpreting(),
            "cuda": torch.cuda.is_available(), "torch": torch.__version__, "break": mode}
    _send(replies, ("ready", info))
    with tempfile.TemporaryDirectory(prefix="sparse_fuzz_") as folder:
        while True:
            header = _read_exact(requests, _HEADER.size)
            if header is None:
                return
            data = _read_exact(requests, _HEADER.unpack(header)[0])
            if data is None:
                return
            _send(replies, run_case(pickle.loads(data), Path(folder)))


if __name__ == "__main__":
    main()
