"""Fuzzing the sparse entry points with malformed indices, shapes, dtypes and devices.

Every case runs in a child process (tests/fuzz_worker.py), so a crash — a segmentation fault or an
abort from a kernel that followed a bad index — fails the one test with the case and the signal
instead of killing the pytest run. A hang fails after ``CALL_TIMEOUT_S``.

The property, per case: the parent decides whether the case is valid from the documented rules
alone (the index invariants of kernels/invariants.py, the entry point's shape / dtype / device
rules), written here in plain Python and numpy, not with the library. A valid case must return
what a dense numpy product returns (tolerance by dtype); an invalid one must raise ValueError
(TypeError too where a plain Python object stands in for a tensor): never another exception,
never a crash, never a result.

Each case breaks at most one thing (W's indices, shape, dtype or type; the dense operand; the
bias; threads), so that a check missing from the library shows as a case whose only fault got
through. Values are multiples of 1/4, exact in every dtype. The bugs this suite found are pinned
by regression tests at the end of the file, each with its minimal case.

Budget: CI runs the counts in ``_CI_EXAMPLES``, derandomized (about 12 s on 2 cores, worker
start included). A longer local run: ``FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_sparse.py``
(N examples per CPU / checkpoint test, N / 10 per Triton test). On a GPU the Triton cases run on
CUDA. The suite's own test: ``FUZZ_BREAK=invariants`` (or ``compressed``) makes the worker
disable that check, and the suite must then fail.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from fuzz_worker import _DELETE, _patch_metadata  # the same tampering the worker applies

WORKER = Path(__file__).with_name("fuzz_worker.py")
CALL_TIMEOUT_S = 60
START_TIMEOUT_S = 120
_HEADER = struct.Struct("<Q")

# -- budget ------------------------------------------------------------------------------------
_CI_EXAMPLES = {"cpu": 150, "triton": 40, "checkpoint": 120}


def _examples(kind: str) -> int:
    """CI's count, or more when FUZZ_EXAMPLES asks for a long run (never fewer)."""
    asked = os.environ.get("FUZZ_EXAMPLES")
    if not asked:
        return _CI_EXAMPLES[kind]
    n = int(asked) // 10 if kind == "triton" else int(asked)
    return max(_CI_EXAMPLES[kind], n)


def fuzz_settings(kind: str) -> settings:
    """Reproducible in CI (derandomized, no example database written into the tree)."""
    return settings(max_examples=_examples(kind), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# -- the worker --------------------------------------------------------------------------------
class Worker:
    """One long-lived child that runs cases; restarted after it dies or hangs."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.stderr = None
        self.info: dict = {}

    def _start(self) -> None:
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=self.env)
        reply = self._receive(START_TIMEOUT_S)
        if reply[0] != "ready":
            raise RuntimeError(f"the fuzz worker did not start: {reply}")
        self.info = reply[1]

    def ensure_started(self) -> dict:
        if self.proc is None:
            self._start()
        return self.info

    def call(self, case: dict, timeout: float = CALL_TIMEOUT_S) -> tuple:
        """The worker's reply, or ("died", how, stderr) / ("hung", seconds, stderr)."""
        self.ensure_started()
        data = pickle.dumps(case, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(_HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return self._died()
        reply = self._receive(timeout)
        if reply[0] == "raised" and _CUDA_FAULT.search(reply[2]):
            self.close()  # a device fault poisons the CUDA context: later cases get a fresh one
        return reply

    def _receive(self, timeout: float) -> tuple:
        deadline = time.monotonic() + timeout
        header = self._read(_HEADER.size, deadline)
        if header is None:
            return self._died()
        if header is False:
            return self._hung(timeout)
        body = self._read(_HEADER.unpack(header)[0], deadline)
        if body is None:
            return self._died()
        if body is False:
            return self._hung(timeout)
        return pickle.loads(body)

    def _read(self, n: int, deadline: float):
        """n bytes, None at end of file (the child died), False past the deadline."""
        fd = self.proc.stdout.fileno()
        chunks, left = [], n
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                return False
            chunk = os.read(fd, left)
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _stderr_tail(self, limit: int = 4000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-limit:]

    def _died(self) -> tuple:
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # closed its pipe but lives on: end it
            self.proc.kill()
            rc = self.proc.wait()
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        tail = self._stderr_tail()
        self._forget()
        return ("died", how, tail)

    def _hung(self, timeout: float) -> tuple:
        self.proc.kill()
        self.proc.wait()
        tail = self._stderr_tail()
        self._forget()
        return ("hung", timeout, tail)

    def _forget(self) -> None:
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.stderr.close()
        self.proc = None

    def close(self) -> None:
        if self.proc is None:
            return
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()
        self.proc = None


# Errors after which a CUDA context is unusable (sticky errors): the worker is replaced.
_CUDA_FAULT = re.compile(r"illegal memory access|misaligned address|device-side assert|unspecified launch failure"
                         r"|CUDA error")


def _worker_env() -> dict[str, str]:
    """The parent's environment, plus the interpreter flag Triton reads when first imported."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture(scope="module")
def worker():
    w = Worker(_worker_env())
    yield w
    w.close()


HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton cases run


# -- values ------------------------------------------------------------------------------------
FLOATS = ("float32", "float64", "float16", "bfloat16")
TORCH_CPU = ("float32", "float64")  # torch's own sparse CPU product
TRITON = ("float32", "float16", "bfloat16")
INDEX = ("int32", "int64")
INT_RANGE = {"int8": 2**7, "int16": 2**15, "int32": 2**31, "int64": 2**63}


def _values(seed: int, n: int, dtype: str = "float32") -> list[float]:
    """Multiples of 1/4 in [-4, 4]: exact in every float dtype, so products sum exactly in fp32
    (integers in [-16, 16] for an integer dtype)."""
    k = np.random.default_rng(seed).integers(-16, 17, size=n)
    return (k if dtype.startswith("int") else k / 4).astype(np.float64).tolist()


def _fits(value: int, dtype: str) -> bool:
    return -INT_RANGE[dtype] <= value < INT_RANGE[dtype]


# -- the reference: which cases are valid ------------------------------------------------------
def _grid(W: dict) -> tuple[int, int, list[str]]:
    """(rows, cols) of the index grid (block rows / cols for BSR), and problems of the shape."""
    M, K = W["shape"]
    vshape = W["values_shape"]
    if W["layout"] == "csr":
        return M, K, [] if len(vshape) == 1 else [f"CSR values of shape {vshape}"]
    if len(vshape) != 3:
        return M, K, [f"BSR values of shape {vshape}"]
    br, bc = vshape[1:]
    if br < 1 or bc < 1 or M % br or K % bc:
        return M, K, [f"{br}x{bc} blocks do not tile {M}x{K}"]
    return M // br, K // bc, []


def compressed_problems(crow: list[int], col: list[int], nvalues: int, rows: int, cols: int) -> list[str]:
    """The row-pointer / column rules every entry point relies on (kernels/invariants.py)."""
    if len(crow) != rows + 1:
        return [f"{len(crow)} row pointers for {rows} rows"]
    found = []
    if nvalues != len(col):
        found.append(f"{len(col)} columns but {nvalues} values")
    if crow[0] != 0:
        found.append(f"crow[0] = {crow[0]}")
    if any(b < a for a, b in zip(crow, crow[1:])):
        found.append("row pointers decrease")
    if crow[-1] != len(col):
        found.append(f"crow[-1] = {crow[-1]}, nnz = {len(col)}")
    if any(c < 0 or c >= cols for c in col):
        found.append(f"a column outside [0, {cols})")
    return found


def index_problems(W: dict) -> list[str]:
    """Why check_index_invariants must refuse the sparse operand (empty: it must not)."""
    if W["device"] == "meta":
        return ["W on the meta device"]
    if W.get("extra_dim"):
        return [f"W with a {W['extra_dim']} dimension is not 2-D"]
    if W["crow_dtype"] not in INDEX or W["col_dtype"] != W["crow_dtype"]:
        return [f"index dtypes {W['crow_dtype']} / {W['col_dtype']}"]
    rows, cols, found = _grid(W)
    if found:
        return found
    return compressed_problems(W["crow"], W["col"], W["values_shape"][0], rows, cols)


def is_tensor(spec) -> bool:
    return spec is not None and spec["kind"] in ("sparse", "dense")


def _strides(shape: list[int]) -> list[int]:
    out, step = [], 1
    for s in reversed(shape):
        out.append(step)
        step *= max(s, 1)
    return out[::-1]


def _is_contiguous(shape: list[int], strides: list[int]) -> bool:
    """torch's rule: empty tensors are contiguous, size-1 dimensions' strides do not count."""
    if math.prod(shape) == 0:
        return True
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1:
            if stride != expected:
                return False
            expected *= size
    return True


def memory_strides(spec: dict) -> list[int]:
    """The strides fuzz_worker gives a dense operand for its ``order``."""
    shape, order = list(spec["shape"]), spec.get("order", "contiguous")
    if order == "transposed":
        swapped = shape[:-2] + [shape[-1], shape[-2]]
        st_ = _strides(swapped)
        return st_[:-2] + [st_[-1], st_[-2]]
    if order == "strided":
        st_ = _strides(shape[:-1] + [2 * shape[-1]])
        return st_[:-1] + [2]
    return _strides(shape)


def contiguous(spec: dict) -> bool:
    return _is_contiguous(list(spec["shape"]), memory_strides(spec))


def transpose_contiguous(spec: dict) -> bool:
    shape, strides = list(spec["shape"]), memory_strides(spec)
    return _is_contiguous(shape[:-2] + [shape[-1], shape[-2]], strides[:-2] + [strides[-1], strides[-2]])


def dense_problems(spec, name: str, W: dict) -> list[str]:
    """A dense operand: a strided tensor on W's device with W's dtype."""
    if not is_tensor(spec) or spec["kind"] != "dense":
        return [f"{name} is not a dense tensor"]
    found = []
    if spec["device"] != W["device"]:
        found.append(f"{name} on {spec['device']}, W on {W['device']}")
    if spec["dtype"] != W["dtype"]:
        found.append(f"{name} is {spec['dtype']}, W is {W['dtype']}")
    return found


def sparse_problems(W, layouts: tuple[str, ...]) -> list[str]:
    if not is_tensor(W) or W["kind"] != "sparse":
        return ["W is not a sparse tensor"]
    if W["layout"] not in layouts:
        return [f"W is {W['layout']}, expected {layouts}"]
    return index_problems(W)


def backend_problems(backend: str, W: dict) -> list[str]:
    """Which value dtypes a backend takes on the CPU, and torch's square BSR blocks
    (backends.py's docstrings)."""
    dtype = W["dtype"]
    allowed = {"auto": FLOATS, "scipy": FLOATS, "torch": TORCH_CPU, "dense": FLOATS + ("int64",)}[backend]
    if dtype not in allowed:
        return [f"backend {backend} refuses {dtype}"]
    if backend == "torch" and W["layout"] == "bsr" and W["values_shape"][1] != W["values_shape"][2]:
        return ["backend torch refuses non-square BSR blocks"]
    return []


def threads_problems(threads) -> list[str]:
    ok = threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1)
    return [] if ok else [f"threads={threads!r}"]


@dataclass
class Expect:
    """What a case must do: raise (``problems`` says why), or return ``value`` within tolerance."""

    problems: list[str]
    python_object: bool = False  # a plain Python object stood in for a tensor: TypeError allowed too
    value: np.ndarray | None = None
    scale: np.ndarray | None = None  # sum of |products| per entry: the tolerance's yardstick
    dtype: str | None = None
    contiguous: bool = False  # the entry point promises a contiguous result
    extra: dict = field(default_factory=dict)  # load_sparse: more named results


def _python_object(*specs) -> bool:
    return any(s is not None and s["kind"] == "pyobj" for s in specs)


def dense_matrix(W: dict) -> np.ndarray:
    """The valid sparse operand as a dense float64 matrix: every stored value summed in place."""
    M, K = W["shape"]
    out = np.zeros((M, K))
    values = np.asarray(W["values"], dtype=np.float64).reshape(W["values_shape"])
    crow, col = W["crow"], W["col"]
    if W["layout"] == "csr":
        for r in range(M):
            for p in range(crow[r], crow[r + 1]):
                out[r, col[p]] += values[p]
        return out
    _, br, bc = W["values_shape"]
    for r in range(M // br):
        for p in range(crow[r], crow[r + 1]):
            out[r * br:(r + 1) * br, col[p] * bc:(col[p] + 1) * bc] += values[p]
    return out


def array(spec: dict) -> np.ndarray:
    return np.asarray(spec["data"], dtype=np.float64).reshape(spec["shape"])


def expect_matmul(case: dict, *, layouts, backend_rule, contiguity=None, threads=True) -> Expect:
    """``W @ X`` for X [K, N]: every rule of the matmul entry points, given the backend's."""
    W, X = case["W"], case["X"]
    found = sparse_problems(W, layouts)
    if not found:
        found += dense_problems(X, "X", W)
    if not found:
        if len(X["shape"]) != 2 or X["shape"][0] != W["shape"][1]:
            found.append(f"X of shape {X['shape']} for W {W['shape']}")
        found += backend_rule(W["dtype"])
        if threads:
            found += threads_problems(case.get("threads"))
        if contiguity and not found:
            found += contiguity(X)
    python_object = _python_object(W, X)
    if found:
        return Expect(found, python_object)
    Wd, Xd = dense_matrix(W), array(X)
    return Expect([], value=Wd @ Xd, scale=np.abs(Wd) @ np.abs(Xd), dtype=W["dtype"],
                  contiguous=case["entry"].startswith("cpu_"))


def expect_linear(case: dict, *, layouts=("csr", "bsr"), backend_rule=None, contiguity=None,
                  module=False) -> Expect:
    """``x @ W.T + bias`` for x [..., K]: sparse_linear's rules (SparseLinear and the Triton
    linear launchers share them, with their own dtype and layout rules)."""
    W, x, bias = case["W"], case["x"], case.get("bias")
    found = sparse_problems(W, layouts)
    if module and not found and bias is not None and (bias["kind"] != "dense" or bias["shape"] != [W["shape"][0]]):
        found.append("bias is not a tensor of shape (out_features,)")
    if not found:
        found += dense_problems(x, "x", W)
    if not found:
        if len(x["shape"]) < 1 or x["shape"][-1] != W["shape"][1]:
            found.append(f"x of shape {x['shape']} for W {W['shape']}")
        if bias is not None and (bias["kind"] != "dense" or bias["shape"] != [W["shape"][0]]
                                 or bias["dtype"] != x["dtype"] or bias["device"] != x["device"]):
            found.append("bias of the wrong type, shape, dtype or device")
        if backend_rule:
            found += backend_rule(W["dtype"])
        if contiguity and not found:
            found += contiguity(x)
    if found:
        return Expect(found, _python_object(W, x, bias))
    Wd, xd = dense_matrix(W), array(x)
    value, scale = xd @ Wd.T, np.abs(xd) @ np.abs(Wd).T
    if bias is not None:
        value, scale = value + array(bias), scale + np.abs(array(bias))
    return Expect([], value=value, scale=scale, dtype=W["dtype"], contiguous=not case["entry"].startswith("triton"))


# -- checking a reply against the reference ----------------------------------------------------
# Relative to the sum of |products| of each output entry: fp32 / fp64 inputs here are multiples
# of 1/4 and sum exactly; halves allow for accumulating in the half dtype (the dense backend).
REL_TOLERANCE = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-2, "bfloat16": 5e-2, "int64": 0.0}


def describe(case: dict) -> str:
    """The case without its value lists, for failure messages (hypothesis prints it whole)."""
    def short(v):
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items() if k not in ("data", "values", "weight", "mask")}
        return v
    return json.dumps(short(case), default=str)[:1500]


def _decode(encoded: tuple) -> tuple[str, tuple, str, bool, np.ndarray | None]:
    dtype, shape, device, is_contig, data = encoded
    if shape is None:
        return dtype, (), device, False, None
    kind = np.int64 if dtype.startswith(("int", "uint", "bool")) else np.float64
    values = None if device == "meta" else np.frombuffer(data, dtype=kind).reshape(shape)
    return dtype, tuple(shape), device, is_contig, values


def check_reply(case: dict, expect: Expect, reply: tuple) -> None:
    """Fail with the case unless the reply is what the reference says it must be."""
    where = describe(case)
    status = reply[0]
    if status == "died":
        pytest.fail(f"the entry point crashed the worker ({reply[1]}) on {where}\nworker stderr:\n{reply[2]}")
    if status == "hung":
        pytest.fail(f"the entry point hung (> {reply[1]} s) on {where}\nworker stderr:\n{reply[2]}")
    if status == "setup_error":
        pytest.fail(f"the suite could not build {where}:\n{reply[1]}")
    if expect.problems:
        if status == "ok":
            pytest.fail(f"invalid case ({'; '.join(expect.problems)}) returned a result instead of "
                        f"raising ValueError: {where}")
        kinds, message, tb = reply[1], reply[2], reply[3]
        allowed = ("ValueError", "TypeError") if expect.python_object else ("ValueError",)
        if not any(k in kinds for k in allowed):
            pytest.fail(f"invalid case ({'; '.join(expect.problems)}) raised {kinds[0]}, not "
                        f"{' / '.join(allowed)}: {message}\n{where}\n{tb}")
        return
    if status == "raised":
        pytest.fail(f"valid case raised {reply[1][0]}: {reply[2]}\n{where}\n{reply[3]}")
    results = reply[1]
    if expect.extra:
        check_exact(results, expect.extra, where)
        return
    check_close(results[""], expect, where)


def check_close(encoded: tuple, expect: Expect, where: str) -> None:
    dtype, shape, device, is_contig, got = _decode(encoded)
    assert dtype == expect.dtype, f"result dtype {dtype}, expected {expect.dtype}: {where}"
    assert shape == expect.value.shape, f"result shape {shape}, expected {expect.value.shape}: {where}"
    assert device == "cpu" or device == DEVICE, f"result on {device}: {where}"
    if expect.contiguous:
        assert is_contig, f"result is not contiguous: {where}"
    error = np.abs(got - expect.value)
    bound = REL_TOLERANCE[dtype] * expect.scale + 1e-30
    bad = np.argwhere(~(error <= bound))
    if bad.size:
        i = tuple(int(j) for j in bad[0])
        pytest.fail(f"wrong result at {i}: got {got[i]}, expected {expect.value[i]} "
                    f"(bound {bound[i]:.3g}; {len(bad)} entries off): {where}")


def check_exact(results: dict, expected: dict, where: str) -> None:
    """load_sparse: the same names, dtypes, shapes and bits (signed zeros included)."""
    assert sorted(results) == sorted(expected), f"names {sorted(results)}, expected {sorted(expected)}: {where}"
    for name, (dtype, value) in expected.items():
        got_dtype, shape, _, _, got = _decode(results[name])
        assert got_dtype == dtype, f"{name}: dtype {got_dtype}, expected {dtype}: {where}"
        assert shape == value.shape, f"{name}: shape {shape}, expected {value.shape}: {where}"
        assert got.tobytes() == value.tobytes(), f"{name}: values {got}, expected {value}: {where}"


def _only(expect: Expect, prefix: str) -> bool:
    return bool(expect.problems) and all(p.startswith(prefix) for p in expect.problems)


def _batch(case: dict) -> int:
    """Columns of X, or rows of a linear layer's input."""
    return case["X"]["shape"][1] if "X" in case else math.prod(case["x"]["shape"][:-1])


def run(worker: Worker, case: dict, expect: Expect) -> None:
    label = re.sub(r"-?\d+", "N", expect.problems[0])[:48] if expect.problems else "valid"
    event(label)  # the mix of cases: pytest --hypothesis-show-statistics
    note(f"expected: {'raise (' + '; '.join(expect.problems) + ')' if expect.problems else 'a result'}")
    check_reply(case, expect, worker.call(case))


# -- strategies: operands ----------------------------------------------------------------------
seeds = st.integers(0, 2**32 - 1)


def row_columns(cols: int, canonical: bool):
    """Column indices of one row: sorted and unique mostly; any order, or repeated, sometimes
    (the kernels sum any order; only the checkpoint loader insists on canonical rows)."""
    if cols == 0:
        return st.just([])
    unique = st.lists(st.integers(0, cols - 1), unique=True, max_size=min(cols, 4))
    if canonical:
        return unique.map(sorted)
    return st.one_of(unique.map(sorted), unique, st.lists(st.integers(0, cols - 1), max_size=4))


@st.composite
def compressed(draw, rows: int, cols: int, canonical: bool = False) -> tuple[list[int], list[int]]:
    crow, col = [0], []
    for _ in range(rows):
        col += draw(row_columns(cols, canonical))
        crow.append(len(col))
    return crow, col


@st.composite
def sparse_operand(draw, layout: str, dtypes=FLOATS, max_dim: int = 6, blocks=(1, 2, 3), max_grid: int = 3,
                   device: str = "cpu") -> dict:
    """A well-formed CSR / BSR operand (index dtype, values dtype, shape all drawn)."""
    if layout == "csr":
        br = bc = 1
        rows, cols = draw(st.integers(0, max_dim)), draw(st.integers(0, max_dim))
    else:
        br, bc = draw(st.sampled_from(blocks)), draw(st.sampled_from(blocks))
        rows, cols = draw(st.integers(0, max_grid)), draw(st.integers(0, max_grid))
    crow, col = draw(compressed(rows, cols))
    index = draw(st.sampled_from(INDEX))
    unit = [] if layout == "csr" else [br, bc]
    W = {"kind": "sparse", "layout": layout, "shape": [rows * br, cols * bc], "crow": crow, "col": col,
         "crow_dtype": index, "col_dtype": index, "dtype": draw(st.sampled_from(dtypes)), "device": device,
         "values_shape": [len(col), *unit]}
    W["values"] = _values(draw(seeds), len(col) * br * bc, W["dtype"])
    return W


def _unit(W: dict) -> int:
    return math.prod(W["values_shape"][1:])


def _grid_cols(W: dict) -> int:
    return W["shape"][1] // (W["values_shape"][2] if W["layout"] == "bsr" else 1)


def _set_col(draw, W: dict, make) -> None:
    if W["col"]:
        k = draw(st.integers(0, len(W["col"]) - 1))
        value = make(draw)
        if _fits(value, W["col_dtype"]):
            W["col"][k] = value


INDEX_MUTATIONS = {
    # a column index past the end, negative, or near the int32 / int64 limits
    "col_past_end": lambda d, W: _set_col(d, W, lambda d: _grid_cols(W) + d(st.integers(0, 3))),
    "col_negative": lambda d, W: _set_col(d, W, lambda d: -d(st.integers(1, 3))),
    "col_huge": lambda d, W: _set_col(d, W, lambda d: d(st.sampled_from(
        [2**31 - 1, 2**31 - 2] + ([2**31, 2**32 + 1, 2**62, 2**63 - 1] if W["col_dtype"] == "int64" else [])))),
    # row pointers: not from 0, decreasing, not ending at nnz, one too few / many, none
    "crow_start": lambda d, W: W["crow"].__setitem__(0, d(st.sampled_from([1, -1, 2]))),
    "crow_decrease": lambda d, W: _decrease(d, W),
    "crow_end": lambda d, W: W["crow"].__setitem__(-1, W["crow"][-1] + d(st.sampled_from(
        [1, -1, 2, 2**31 - 1 - W["crow"][-1]]))),
    "crow_short": lambda d, W: W["crow"].pop(),
    "crow_long": lambda d, W: W["crow"].append(W["crow"][-1] + d(st.integers(0, 1))),
    "crow_empty": lambda d, W: W["crow"].clear(),
    # values of another length than the column indices
    "values_long": lambda d, W: _resize_values(d, W, +1),
    "values_short": lambda d, W: _resize_values(d, W, -1),
    # index dtypes: mixed, too narrow, or both int32 (valid)
    "mixed_dtypes": lambda d, W: W.update(zip(("crow_dtype", "col_dtype"),
                                              d(st.sampled_from([("int64", "int32"), ("int32", "int64")])))),
    "int16_indices": lambda d, W: W.update(crow_dtype="int16", col_dtype="int16"),
    "int32_indices": lambda d, W: W.update(crow_dtype="int32", col_dtype="int32"),
    # a shape the rows / blocks do not fit: one more row or column (BSR: blocks do not tile)
    "shape_grows": lambda d, W: _grow(d, W),
    "meta_device": lambda d, W: W.update(device="meta"),
    # a batch or dense dimension: 3-D, refused; non-contiguous parts: refused by Triton only
    "extra_dim": lambda d, W: W.update(extra_dim=d(st.sampled_from(["batch", "dense"]))),
    "strided_parts": lambda d, W: W.update(strided_parts=True),
}


def _decrease(draw, W: dict) -> None:
    crow = W["crow"]
    if len(crow) >= 3:
        i = draw(st.integers(1, len(crow) - 2))
        crow[i] = crow[i + 1] + draw(st.integers(1, 2))


def _resize_values(draw, W: dict, step: int) -> None:
    n = W["values_shape"][0] + step
    if n >= 0:
        W["values_shape"][0] = n
        W["values"] = _values(draw(seeds), n * _unit(W), W["dtype"])


def _grow(draw, W: dict) -> None:
    W["shape"][draw(st.integers(0, 1))] += 1


@st.composite
def fault(draw, sites: tuple[str, ...]) -> str:
    """Which operand a case breaks: none about 40% of the time (the valid paths need exercise
    too), else exactly one of ``sites``. One fault per case, so that a check missing from the
    library shows as a case whose only fault slipped through, not hidden behind another."""
    # sampled_from, not an integer threshold: hypothesis draws small integers far more often
    site = draw(st.sampled_from(["none"] * 4 + ["some"] * 6))
    if site == "some":
        site = draw(st.sampled_from(sites))
    note(f"fault: {site}")
    return site


@st.composite
def broken_W(draw, W: dict) -> dict:
    """A copy of W with one invariant (maybe) broken, or W replaced by a dense tensor or a list."""
    if draw(st.sampled_from(["index"] * 7 + ["not sparse"])) == "not sparse":
        M, K = W["shape"]
        return draw(st.sampled_from([
            {"kind": "dense", "shape": [M, K], "data": _values(0, M * K, W["dtype"]), "dtype": W["dtype"], "device": W["device"]},
            {"kind": "pyobj", "value": [[1.0, 0.0], [0.0, 1.0]]},
        ]))
    W = copy.deepcopy(W)
    name = draw(st.sampled_from(sorted(INDEX_MUTATIONS)))
    note(f"W mutation: {name}")
    INDEX_MUTATIONS[name](draw, W)
    return W


def dense_operand(draw, shape: list[int], dtype: str, device: str = "cpu",
                  orders=("contiguous", "transposed", "strided")) -> dict:
    if len(shape) < 2:  # no transpose of a vector; a scalar has no stride to play with
        orders = tuple(o for o in orders if o != "transposed") if shape else ("contiguous",)
    return {"kind": "dense", "shape": list(shape), "data": _values(draw(seeds), math.prod(shape), dtype),
            "dtype": dtype, "device": device, "order": draw(st.sampled_from(orders))}


OTHER_DTYPES = FLOATS + ("int64",)


@st.composite
def matmul_X(draw, W: dict, broken: bool, device: str = "cpu", orders=("contiguous", "transposed", "strided")) -> dict:
    """X [K, N] for W [M, K]; if ``broken``, of the wrong shape, rank, dtype, device, memory
    order (refused by Triton only) or type."""
    K, dtype = W["shape"][1], W["dtype"]
    shape = [K, draw(st.integers(0, 4))]
    mutation = draw(st.sampled_from(["wrong_k", "one_d", "three_d", "dtype", "meta", "pyobj", "strided"])) \
        if broken else "none"
    note(f"X mutation: {mutation}")
    if mutation == "wrong_k":
        shape[0] = K + 1 if K == 0 or draw(st.booleans()) else K - 1
    elif mutation == "one_d":
        shape = [K]
    elif mutation == "three_d":
        shape = [2, *shape]
    elif mutation == "dtype":
        dtype = draw(st.sampled_from([d for d in OTHER_DTYPES if d != dtype]))
    elif mutation == "pyobj":
        return {"kind": "pyobj", "value": [[1.0]] * max(K, 1)}
    elif mutation == "strided":
        orders = ("strided",)
    X = dense_operand(draw, shape, dtype, device, orders)
    if mutation == "meta":
        X["device"] = "meta"
    return X


@st.composite
def linear_x(draw, W: dict, broken: bool, device: str = "cpu", allow_pyobj: bool = True,
             orders=("contiguous", "transposed", "strided")) -> dict:
    """x [..., K] for W [M, K] (0, 1 or 2 leading dims); if ``broken``, malformed like matmul_X."""
    K, dtype = W["shape"][1], W["dtype"]
    lead = draw(st.sampled_from([[], [1], [2], [0], [2, 3]]))
    shape = [*lead, K]
    mutations = ["wrong_k", "zero_d", "dtype", "meta", "strided"] + (["pyobj"] if allow_pyobj else [])
    mutation = draw(st.sampled_from(mutations)) if broken else "none"
    note(f"x mutation: {mutation}")
    if mutation == "wrong_k":
        shape[-1] = K + 1 if K == 0 or draw(st.booleans()) else K - 1
    elif mutation == "zero_d":
        shape = []
    elif mutation == "dtype":
        dtype = draw(st.sampled_from([d for d in OTHER_DTYPES if d != dtype]))
    elif mutation == "pyobj":
        return {"kind": "pyobj", "value": [[1.0] * max(K, 1)]}
    elif mutation == "strided":
        orders = ("strided",)
    x = dense_operand(draw, shape, dtype, device, orders)
    if mutation == "meta":
        x["device"] = "meta"
    return x


@st.composite
def bias_for(draw, W: dict, broken: bool, allow_pyobj: bool = True) -> dict | None:
    """None or a fitting [M] bias; if ``broken``, one of the wrong shape, dtype, device or type."""
    M, dtype = W["shape"][0], W["dtype"]
    if not broken:
        with_bias = draw(st.booleans())
        return dense_operand(draw, [M], dtype, orders=("contiguous",)) if with_bias else None
    choice = draw(st.sampled_from(["shape", "dtype", "meta"] + (["pyobj"] if allow_pyobj else [])))
    note(f"bias mutation: {choice}")
    if choice == "pyobj":
        return {"kind": "pyobj", "value": [0.0] * M}
    if choice == "dtype":
        dtype = draw(st.sampled_from([d for d in OTHER_DTYPES if d != dtype]))
    bias = dense_operand(draw, [M + 1] if choice == "shape" else [M], dtype, orders=("contiguous",))
    if choice == "meta":
        bias["device"] = "meta"
    return bias


@st.composite
def sparse_W(draw, site: str, layouts=("csr", "bsr"), **operand) -> dict:
    """A well-formed W for a case whose fault is ``site``: int64 values for a "dtype" fault
    (refused by every path but the dense one). The other operands are drawn to fit it; a "W"
    fault breaks it afterwards (``finish``)."""
    if site == "dtype":
        operand["dtypes"] = ("int64",)
    return draw(sparse_operand(draw(st.sampled_from(layouts)), **operand))


def finish(draw, case: dict, site: str) -> dict:
    """The case with W broken when W is its fault site."""
    if site == "W":
        case["W"] = draw(broken_W(case["W"]))
    return case


BAD_THREADS = [0, -1, True]


# -- tests: CPU entry points -------------------------------------------------------------------
@st.composite
def cpu_kernel_cases(draw) -> dict:
    entry = draw(st.sampled_from(["cpu_csr_matmul", "cpu_bsr_matmul"]))
    site = draw(fault(("W", "W", "W", "X", "X", "dtype", "threads", "layout")))
    own, other = ("csr", "bsr") if entry == "cpu_csr_matmul" else ("bsr", "csr")
    W = draw(sparse_W(site, layouts=(other if site == "layout" else own,)))
    threads = draw(st.sampled_from(BAD_THREADS if site == "threads" else [None, 1, 2, 3]))
    return finish(draw, {"entry": entry, "W": W, "X": draw(matmul_X(W, site == "X")), "threads": threads}, site)


@fuzz_settings("cpu")
@given(case=cpu_kernel_cases())
def test_cpu_kernels(worker, case):
    """cpu_csr_matmul / cpu_bsr_matmul: W @ X on scipy's loops, or a ValueError."""
    layout = "csr" if case["entry"] == "cpu_csr_matmul" else "bsr"
    expect = expect_matmul(case, layouts=(layout,), backend_rule=lambda dtype: backend_problems("scipy", case["W"]))
    run(worker, case, expect)


@st.composite
def sparse_matmul_cases(draw) -> dict:
    site = draw(fault(("W", "W", "W", "X", "X", "dtype")))
    W = draw(sparse_W(site))
    return finish(draw, {"entry": "sparse_matmul", "W": W, "X": draw(matmul_X(W, site == "X")),
                         "backend": draw(st.sampled_from(["auto", "scipy", "torch", "dense"])),
                         "threads": draw(st.sampled_from([None, 1, 2]))}, site)


@fuzz_settings("cpu")
@given(case=sparse_matmul_cases())
def test_sparse_matmul(worker, case):
    """backends.sparse_matmul with each CPU backend."""
    expect = expect_matmul(case, layouts=("csr", "bsr"),
                           backend_rule=lambda dtype: backend_problems(case["backend"], case["W"]))
    run(worker, case, expect)


@st.composite
def sparse_linear_cases(draw) -> dict:
    site = draw(fault(("W", "W", "W", "X", "X", "bias", "dtype")))
    W = draw(sparse_W(site))
    return finish(draw, {"entry": "sparse_linear", "W": W, "x": draw(linear_x(W, site == "X")),
                         "bias": draw(bias_for(W, site == "bias")),
                         "backend": draw(st.sampled_from(["auto", "scipy", "torch", "dense"])),
                         "threads": draw(st.sampled_from([None, 1, 2]))}, site)


@fuzz_settings("cpu")
@given(case=sparse_linear_cases())
def test_sparse_linear(worker, case):
    """backends.sparse_linear: x @ W.T + bias with each CPU backend."""
    expect = expect_linear(case, backend_rule=lambda dtype: backend_problems(case["backend"], case["W"]))
    run(worker, case, expect)


@st.composite
def module_cases(draw) -> dict:
    site = draw(fault(("W", "W", "W", "X", "X", "bias", "dtype")))
    W = draw(sparse_W(site))
    return finish(draw, {"entry": "SparseLinear", "W": W, "x": draw(linear_x(W, site == "X", allow_pyobj=False)),
                         "bias": draw(bias_for(W, site == "bias", allow_pyobj=False))}, site)


@fuzz_settings("cpu")
@given(case=module_cases())
def test_sparse_linear_module(worker, case):
    """SparseLinear(W, bias) then forward under no_grad (the "auto" backend)."""
    expect = expect_linear(case, backend_rule=lambda dtype: backend_problems("auto", case["W"]), module=True)
    run(worker, case, expect)


# -- tests: Triton launchers (the CPU interpreter without a GPU: few, tiny cases) --------------
def _triton_matmul_layout(X: dict) -> list[str]:
    ok = contiguous(X) or transpose_contiguous(X)
    return [] if ok else ["X neither row-major nor a transposed row-major tensor"]


def _triton_linear_layout(x: dict) -> list[str]:
    return [] if contiguous(x) else ["x is not contiguous"]


def _parts_contiguous(W: dict) -> bool:
    """Whether fuzz_worker's crow / col / values tensors are contiguous (every other row of a
    longer buffer is, only with at most one row)."""
    if not W.get("strided_parts"):
        return True
    vshape = list(W["values_shape"])
    inner = _strides(vshape[1:])
    return (_is_contiguous([len(W["crow"])], [2]) and _is_contiguous([len(W["col"])], [2])
            and _is_contiguous(vshape, [2 * math.prod(vshape[1:]), *inner]))


def _triton_sparse_rules(W: dict) -> list[str]:
    """The launcher's own W rules on top of the invariants: dtype, contiguous parts, BSR blocks."""
    found = [] if W["dtype"] in TRITON else [f"Triton refuses {W['dtype']}"]
    if not _parts_contiguous(W):
        found.append("non-contiguous index / value tensors")
    if W["layout"] == "bsr" and len(W["values_shape"]) == 3:
        for side in W["values_shape"][1:]:
            if side not in (16, 32, 64, 128):
                found.append(f"block side {side}")
    return found


@st.composite
def triton_cases(draw) -> dict:
    entry = draw(st.sampled_from(["triton_csr_matmul", "triton_csr_linear", "triton_bsr_matmul",
                                  "triton_bsr_linear"]))
    site = draw(fault(("W", "W", "W", "W", "X", "dtype", "layout", "block")))
    own, other = ("csr", "bsr") if "_csr_" in entry else ("bsr", "csr")
    layout = other if site == "layout" else own
    operand = dict(dtypes=("float64",) if site == "dtype" else TRITON, max_dim=32, device=DEVICE,
                   blocks=(8,) if site == "block" else (16,), max_grid=2)
    W = draw(sparse_operand(layout, **operand))
    case = {"entry": entry, "W": W}
    if entry.endswith("_matmul"):
        case["X"] = draw(matmul_X(W, site == "X", device=DEVICE, orders=("contiguous", "transposed")))
    else:
        case["x"] = draw(linear_x(W, site == "X", device=DEVICE, orders=("contiguous",)))
    return finish(draw, case, site)


def expect_triton(case: dict) -> Expect:
    layout = "csr" if "_csr_" in case["entry"] else "bsr"
    W = case["W"]

    def rules(dtype: str) -> list[str]:
        return _triton_sparse_rules(W)

    if case["entry"].endswith("_matmul"):
        return expect_matmul(case, layouts=(layout,), backend_rule=rules, contiguity=_triton_matmul_layout,
                             threads=False)
    return expect_linear(case, layouts=(layout,), backend_rule=rules, contiguity=_triton_linear_layout)


@pytest.fixture(scope="module")
def triton_worker(worker):
    """The worker, where its Triton loads (installed but broken counts as missing)."""
    if not worker.ensure_started()["triton"]:
        pytest.skip("triton is installed but does not import in the worker")
    return worker


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@fuzz_settings("triton")
@given(case=triton_cases())
def test_triton_launchers(triton_worker, case):
    """The four Triton launchers (interpreted on the CPU without a GPU)."""
    run(triton_worker, case, expect_triton(case))


# -- tests: load_sparse on tampered checkpoints ------------------------------------------------
def _matrix_shape(shape: list[int]) -> tuple[int, int]:
    """checkpoint.py's module doc: a weight is stored as its (out, in * kh * kw) matrix."""
    return shape[0], math.prod(shape[1:])


def canonical_parts(case: dict) -> dict:
    """The parts save_sparse must write (module doc): alive entries, rows sorted; for BSR every
    block with an alive entry, pruned and padding entries +0.0."""
    rows, cols = case["shape"]
    weight = np.asarray(case["weight"], dtype=np.float64).reshape(rows, cols)
    mask = np.asarray(case["mask"], dtype=bool).reshape(rows, cols)
    if case["format"] == "csr":
        crow, col, values = [0], [], []
        for r in range(rows):
            for c in np.flatnonzero(mask[r]):
                col.append(int(c))
                values.append(float(weight[r, c]))
            crow.append(len(col))
        return {"crow": crow, "col": col, "values": values, "values_shape": [len(col)]}
    br, bc = case["block"]
    R, C = -(-rows // br), -(-cols // bc)
    kept = np.zeros((R * br, C * bc))
    alive = np.zeros((R * br, C * bc), dtype=bool)
    kept[:rows, :cols] = np.where(mask, weight, 0.0)
    alive[:rows, :cols] = mask
    crow, col, values = [0], [], []
    for i in range(R):
        for j in range(C):
            if alive[i * br:(i + 1) * br, j * bc:(j + 1) * bc].any():
                col.append(j)
                values += kept[i * br:(i + 1) * br, j * bc:(j + 1) * bc].reshape(-1).tolist()
        crow.append(len(col))
    return {"crow": crow, "col": col, "values": values, "values_shape": [len(col), br, bc]}


ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def stored_sparse(case: dict) -> bool:
    """save_sparse keeps a weight sparse only when its parts are smaller than the dense bytes
    (crow int32 and col int16 at these sizes: checkpoint.py's module doc)."""
    parts = canonical_parts(case)
    size = ITEMSIZE[case["dtype"]]
    nbytes = 4 * len(parts["crow"]) + 2 * len(parts["col"]) + size * len(parts["values"])
    return nbytes < size * math.prod(case["shape"])


def original_metadata(case: dict) -> dict:
    """The metadata save_sparse writes (module doc), before any tampering."""
    block = list(case["block"]) if case["format"] == "bsr" else None
    return {"format_version": 1, "tensors": {
        "w": {"format": case["format"], "shape": list(case["shape"]), "dtype": case["dtype"], "block": block},
        "b": {"format": "dense", "shape": [case["shape"][0]], "dtype": case["dtype"]}}}


PART_MUTATIONS = [
    "col_past_end", "col_negative", "col_huge", "crow_start", "crow_decrease", "crow_end", "crow_short",
    "crow_long", "values_long", "values_short", "unsorted", "duplicate", "nan", "inf", "values_dtype",
    "crow_int16", "col_int8", "crow_float", "block_shape", "col_int32", "col_int64", "crow_int64",
]


def _part_entry(parts: dict) -> dict:
    return {"crow_indices": (parts["crow"], parts["crow_dtype"], [len(parts["crow"])]),
            "col_indices": (parts["col"], parts["col_dtype"], [len(parts["col"])]),
            "values": (parts["values"], parts["values_dtype"], parts["values_shape"])}


def _mutate_parts(draw, parts: dict, name: str) -> None:
    """One change to the parts save_sparse wrote (index lists, dtypes, value list)."""
    unit = math.prod(parts["values_shape"][1:])
    crow, col, values = parts["crow"], parts["col"], parts["values"]
    if name in ("col_past_end", "col_negative", "col_huge") and col:
        k = draw(st.integers(0, len(col) - 1))
        col[k] = {"col_past_end": parts["grid_cols"] + draw(st.integers(0, 2)), "col_negative": -1,
                  "col_huge": INT_RANGE[parts["col_dtype"]] - 1}[name]
    elif name == "crow_start":
        crow[0] = 1
    elif name == "crow_decrease" and len(crow) >= 3:
        i = draw(st.integers(1, len(crow) - 2))
        crow[i] = crow[i + 1] + 1
    elif name == "crow_end":
        crow[-1] += draw(st.sampled_from([1, -1]))
    elif name == "crow_short":
        crow.pop()
    elif name == "crow_long":
        crow.append(crow[-1])
    elif name in ("values_long", "values_short"):
        n = parts["values_shape"][0] + (1 if name == "values_long" else -1)
        if n >= 0:
            parts["values_shape"][0] = n
            parts["values"] = _values(draw(seeds), n * unit)
    elif name in ("unsorted", "duplicate"):
        rows = [r for r in range(len(crow) - 1) if crow[r + 1] - crow[r] >= 2]
        if rows:
            p = crow[draw(st.sampled_from(rows))]
            if name == "unsorted":
                col[p], col[p + 1] = col[p + 1], col[p]
            else:
                col[p + 1] = col[p]
    elif name in ("nan", "inf") and values:
        values[draw(st.integers(0, len(values) - 1))] = float(name) * draw(st.sampled_from([1, -1]))
    elif name == "values_dtype":
        parts["values_dtype"] = draw(st.sampled_from([d for d in FLOATS if d != parts["values_dtype"]]))
    elif name == "crow_int16":
        parts["crow_dtype"] = "int16"
    elif name == "col_int8":
        parts["col_dtype"] = "int8"
    elif name == "crow_float":
        parts["crow_dtype"] = "float32"
    elif name == "block_shape" and len(parts["values_shape"]) == 3:
        parts["values_shape"][2] += 1
        parts["values"] = _values(draw(seeds), math.prod(parts["values_shape"]))
    elif name in ("col_int32", "col_int64", "crow_int64"):
        parts[name.split("_")[0] + "_dtype"] = name.split("_")[1]


META_MUTATIONS = [
    "shape_wider", "shape_taller", "shape_narrower", "shape_4d", "shape_negative", "shape_string",
    "dtype_other", "dtype_int", "dtype_unknown", "format_dense", "format_other", "format_coo",
    "block_other", "block_zero", "block_missing", "delete_shape", "delete_dtype", "delete_format",
    "version", "tensors_list", "entry_list", "raw_garbage", "raw_no_tensors", "drop",
]


def _meta_patch(draw, case: dict, name: str) -> dict:
    """The metadata edit for one named mutation (applied with fuzz_worker's _patch_metadata)."""
    rows, cols = case["shape"]
    block = case["block"] or [1, 1]
    other_dtype = draw(st.sampled_from([d for d in FLOATS if d != case["dtype"]]))
    entry = {
        "shape_wider": {"shape": [rows, cols + draw(st.integers(1, 3))]},
        "shape_taller": {"shape": [rows + 1, cols]},
        "shape_narrower": {"shape": [rows, cols - 1]},
        "shape_4d": {"shape": [rows, cols, 1, 1]},
        "shape_negative": {"shape": [-rows, cols]},
        "shape_string": {"shape": [str(rows), cols]},
        "dtype_other": {"dtype": other_dtype},
        "dtype_int": {"dtype": "int32"},
        "dtype_unknown": {"dtype": "float128"},
        "format_dense": {"format": "dense"},
        "format_other": {"format": "bsr" if case["format"] == "csr" else "csr"},
        "format_coo": {"format": "coo"},
        "block_other": {"block": [block[0], block[1] + 1]},
        "block_zero": {"block": [0, block[1]]},
        "block_missing": {"block": _DELETE},
        "delete_shape": {"shape": _DELETE},
        "delete_dtype": {"dtype": _DELETE},
        "delete_format": {"format": _DELETE},
    }.get(name)
    if entry is not None:
        return {"entry": entry}
    return {
        "version": {"top": {"format_version": draw(st.sampled_from([2, 0, "1"]))}},
        "tensors_list": {"top": {"tensors": []}},
        "entry_list": {"entry_replace": [rows, cols]},
        "raw_garbage": {"raw": "{not json"},
        "raw_no_tensors": {"raw": json.dumps({"format_version": 1})},
        "drop": {"drop": True},
    }[name]


@st.composite
def checkpoint_cases(draw) -> dict:
    """A weight and mask save_sparse stores sparse, then its parts or metadata maybe tampered."""
    fmt = draw(st.sampled_from(["csr", "bsr"]))
    dtype = draw(st.sampled_from(FLOATS))
    shape = [draw(st.integers(2, 8)), draw(st.integers(2, 8))]
    rng = np.random.default_rng(draw(seeds))
    weight = (rng.integers(-16, 17, size=shape) / 4).astype(np.float64)
    weight[(weight == 0) & (rng.random(shape) < 0.5)] = -0.0  # signed zeros must survive
    mask = rng.random(shape) < draw(st.sampled_from([0.0, 0.1, 0.2]))
    case = {"entry": "load_sparse", "format": fmt, "dtype": dtype, "shape": shape,
            "block": [draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3]))] if fmt == "bsr" else None,
            "weight": weight.reshape(-1).tolist(), "mask": mask.reshape(-1).tolist(),
            "bias": _values(draw(seeds), shape[0]), "parts": {}, "meta": {}}
    if not stored_sparse(case):  # too dense to be stored sparse: keep the weight, prune it all
        case["mask"] = [False] * len(case["mask"])
    assume(stored_sparse(case))
    choice = draw(st.sampled_from(["none"] * 4 + ["parts"] * 3 + ["metadata"] * 3))
    if choice == "parts":
        parts = canonical_parts(case)
        rows, cols = shape
        parts.update(crow_dtype="int32", col_dtype="int16", values_dtype=dtype,
                     grid_cols=cols if fmt == "csr" else -(-cols // case["block"][1]))
        name = draw(st.sampled_from(PART_MUTATIONS))
        note(f"parts mutation: {name}")
        _mutate_parts(draw, parts, name)
        case["parts"] = _part_entry(parts)
    elif choice == "metadata":
        name = draw(st.sampled_from(META_MUTATIONS))
        note(f"metadata mutation: {name}")
        case["meta"] = _meta_patch(draw, case, name)
    return case


def _file_parts(case: dict) -> dict:
    """The sparse parts in the tampered file: the replaced ones, else save_sparse's canonical."""
    if case["parts"]:
        p = case["parts"]
        return {"crow": p["crow_indices"][0], "crow_dtype": p["crow_indices"][1],
                "col": p["col_indices"][0], "col_dtype": p["col_indices"][1],
                "values": p["values"][0], "values_dtype": p["values"][1], "values_shape": p["values"][2]}
    parts = canonical_parts(case)
    return {**parts, "crow_dtype": "int32", "col_dtype": "int16", "values_dtype": case["dtype"]}


def _table(case: dict) -> tuple[dict | None, list[str]]:
    """The metadata the loader will read, and why it is unusable (if it is)."""
    meta = _patch_metadata({"sparse_lth": json.dumps(original_metadata(case))}, case["meta"])
    if meta is None:
        return None, ["no sparse_lth metadata"]
    try:
        info = json.loads(meta["sparse_lth"])
    except json.JSONDecodeError:
        return None, ["metadata is not JSON"]
    if not isinstance(info, dict) or not isinstance(info.get("tensors"), dict):
        return None, ["no tensors table"]
    if type(info.get("format_version")) is not int or info["format_version"] != 1:
        return None, [f"format_version {info.get('format_version')!r}"]
    return info["tensors"], []


def _entry_problems(entry, parts: dict) -> tuple[list[str], tuple[int, int] | None, list[int] | None]:
    """Whether the weight's entry agrees with its parts; the index grid and block when it does."""
    if not isinstance(entry, dict):
        return ["entry is not an object"], None, None
    shape, fmt, dtype = entry.get("shape"), entry.get("format"), entry.get("dtype")
    if not (isinstance(shape, list) and len(shape) >= 2 and all(type(s) is int and s >= 0 for s in shape)):
        return [f"shape {shape!r}"], None, None
    if fmt not in ("csr", "bsr"):
        return [f"format {fmt!r} (the file holds sparse parts)"], None, None
    if dtype not in FLOATS or dtype != parts["values_dtype"]:
        return [f"dtype {dtype!r} for {parts['values_dtype']} values"], None, None
    if parts["crow_dtype"] not in INDEX or parts["col_dtype"] not in ("int16",) + INDEX:
        return [f"index dtypes {parts['crow_dtype']} / {parts['col_dtype']}"], None, None
    rows, cols = _matrix_shape(shape)
    block = entry.get("block")
    if fmt == "csr":
        if block is not None or len(parts["values_shape"]) != 1:
            return ["CSR with a block or block values"], None, None
        return [], (rows, cols), None
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        return [f"block {block!r}"], None, None
    if len(parts["values_shape"]) != 3 or parts["values_shape"][1:] != block:
        return [f"values of shape {parts['values_shape']} for {block} blocks"], None, None
    return [], (-(-rows // block[0]), -(-cols // block[1])), block


def expect_checkpoint(case: dict) -> Expect:
    """What load_sparse must return (bit for bit) or why it must refuse the file."""
    parts = _file_parts(case)
    tensors, found = _table(case)
    if found:
        return Expect(found)
    if set(tensors) != {"w", "b"}:
        return Expect(["the metadata does not list the file's tensors"])
    found, grid, block = _entry_problems(tensors["w"], parts)
    if found:
        return Expect(found)
    found = compressed_problems(parts["crow"], parts["col"], parts["values_shape"][0], *grid)
    if not found:
        found = _canonical_problems(parts)
    if not found and not np.isfinite(parts["values"]).all():
        found = ["non-finite values"]
    if found:
        return Expect(found)
    entry = tensors["w"]
    weight = _scatter(parts, grid, block)[:_matrix_shape(entry["shape"])[0], :_matrix_shape(entry["shape"])[1]]
    bias = np.asarray(case["bias"], dtype=np.float64)
    return Expect([], extra={"w": (entry["dtype"], weight.reshape(entry["shape"])), "b": (case["dtype"], bias)})


def _canonical_problems(parts: dict) -> list[str]:
    crow, col = parts["crow"], parts["col"]
    for r in range(len(crow) - 1):
        row = col[crow[r]:crow[r + 1]]
        if any(b <= a for a, b in zip(row, row[1:])):
            return [f"row {r} not sorted and unique"]
    return []


def _scatter(parts: dict, grid: tuple[int, int], block: list[int] | None) -> np.ndarray:
    br, bc = block or (1, 1)
    out = np.zeros((grid[0] * br, grid[1] * bc))
    values = np.asarray(parts["values"], dtype=np.float64).reshape(parts["values_shape"])
    crow, col = parts["crow"], parts["col"]
    for r in range(grid[0]):
        for p in range(crow[r], crow[r + 1]):
            out[r * br:(r + 1) * br, col[p] * bc:(col[p] + 1) * bc] = values[p].reshape(br, bc)
    return out


@fuzz_settings("checkpoint")
@given(case=checkpoint_cases())
def test_load_sparse(worker, case):
    """load_sparse on save_sparse's file with its index tensors or metadata tampered with."""
    run(worker, case, expect_checkpoint(case))


# -- the harness itself ------------------------------------------------------------------------
def test_a_crash_fails_its_case_and_the_next_case_gets_a_fresh_worker(worker):
    """The isolation works: a child killed by a signal (the worker's ``__crash__`` hook raises
    SIGSEGV, as a kernel reading out of bounds would) becomes a failure naming the signal, with
    faulthandler's traceback, and the next case runs in a new worker."""
    case = {"entry": "__crash__"}
    reply = worker.call(case)
    assert reply[:2] == ("died", "killed by SIGSEGV"), reply
    assert "Segmentation fault" in reply[2]
    with pytest.raises(pytest.fail.Exception, match="crashed the worker .killed by SIGSEGV"):
        check_reply(case, Expect([]), reply)
    W = {"kind": "sparse", "layout": "csr", "shape": [1, 2], "crow": [0, 1], "col": [1], "crow_dtype": "int64",
         "col_dtype": "int64", "values": [2.0], "values_shape": [1], "dtype": "float32", "device": "cpu"}
    X = {"kind": "dense", "shape": [2, 1], "data": [3.0, 5.0], "dtype": "float32", "device": "cpu"}
    valid = {"entry": "cpu_csr_matmul", "W": W, "X": X}
    check_reply(valid, expect_matmul(valid, layouts=("csr",), backend_rule=lambda d: []), worker.call(valid))


def test_a_hang_fails_its_case(worker):
    """A case past its time limit is a failure too, and the hung child is ended."""
    case = {"entry": "__hang__"}
    reply = worker.call(case, timeout=1)
    assert reply[0] == "hung", reply
    with pytest.raises(pytest.fail.Exception, match="hung"):
        check_reply(case, Expect([]), reply)


# -- regressions: the minimal cases of the bugs this suite found (all fixed) --------------------
def _csr_spec(shape, crow, col, values, dtype="float32") -> dict:
    return {"kind": "sparse", "layout": "csr", "shape": list(shape), "crow": crow, "col": col,
            "crow_dtype": "int64", "col_dtype": "int64", "values": values, "values_shape": [len(values)],
            "dtype": dtype, "device": "cpu"}


@pytest.mark.parametrize("entry", ["sparse_linear", "SparseLinear"])
def test_regression_linear_without_input_features(worker, entry):
    case = {"entry": entry, "W": _csr_spec([2, 0], [0, 0, 0], [], []), "backend": "auto", "bias": None,
            "x": {"kind": "dense", "shape": [3, 0], "data": [], "dtype": "float32", "device": "cpu"}}
    check_reply(case, expect_linear(case), worker.call(case))


def test_regression_linear_with_a_list_as_bias(worker):
    case = {"entry": "sparse_linear", "W": _csr_spec([2, 1], [0, 1, 1], [0], [1.0]), "backend": "auto",
            "bias": {"kind": "pyobj", "value": [0.0, 0.0]},
            "x": {"kind": "dense", "shape": [3, 1], "data": [1.0, 2.0, 3.0], "dtype": "float32", "device": "cpu"}}
    check_reply(case, expect_linear(case), worker.call(case))


@pytest.mark.parametrize("threads", [0, -1, True])
def test_regression_bad_threads_refused_when_there_is_no_work(worker, threads):
    case = {"entry": "cpu_csr_matmul", "W": _csr_spec([2, 3], [0, 0, 0], [], []), "threads": threads,
            "X": {"kind": "dense", "shape": [3, 2], "data": [1.0] * 6, "dtype": "float32", "device": "cpu"}}
    check_reply(case, expect_matmul(case, layouts=("csr",), backend_rule=lambda d: []), worker.call(case))


@pytest.mark.parametrize("entry,backend", [("sparse_matmul", "auto"), ("sparse_matmul", "torch"),
                                           ("sparse_linear", "auto"), ("SparseLinear", "auto")])
def test_regression_bsr_with_non_square_blocks_on_torch(worker, entry, backend):
    W = {"kind": "sparse", "layout": "bsr", "shape": [1, 2], "crow": [0, 1], "col": [0], "crow_dtype": "int64",
         "col_dtype": "int64", "values": [1.0, 2.0], "values_shape": [1, 1, 2], "dtype": "float32", "device": "cpu"}
    case = {"entry": entry, "W": W, "backend": backend, "bias": None}
    if entry == "sparse_matmul":
        case["X"] = {"kind": "dense", "shape": [2, 1], "data": [3.0, 5.0], "dtype": "float32", "device": "cpu"}
        expect = expect_matmul(case, layouts=("bsr",), backend_rule=lambda d: backend_problems(backend, W))
    else:
        case["x"] = {"kind": "dense", "shape": [1, 2], "data": [3.0, 5.0], "dtype": "float32", "device": "cpu"}
        expect = expect_linear(case)
    # auto picks scipy (13 = 1 * 3 + 2 * 5); a forced torch is a ValueError saying why
    assert expect.problems == ([] if backend == "auto" else ["backend torch refuses non-square BSR blocks"])
    check_reply(case, expect, worker.call(case))


@pytest.mark.parametrize("entry,backend", [("sparse_matmul", "auto"), ("sparse_matmul", "torch"),
                                           ("sparse_linear", "auto"), ("SparseLinear", "auto")])
def test_regression_non_contiguous_int32_indices_on_torch(worker, entry, backend):
    W = {**_csr_spec([1, 1], [0, 1], [0], [3.0]), "crow_dtype": "int32", "col_dtype": "int32",
         "strided_parts": True}  # crow_indices() is [0, 1] with stride 2
    case = {"entry": entry, "W": W, "backend": backend, "bias": None}
    data = {"kind": "dense", "shape": [1, 1], "data": [3.0], "dtype": "float32", "device": "cpu"}
    if entry == "sparse_matmul":
        case["X"] = data
        expect = expect_matmul(case, layouts=("csr",), backend_rule=lambda d: [])
    else:
        case["x"] = data
        expect = expect_linear(case)
    check_reply(case, expect, worker.call(case))
