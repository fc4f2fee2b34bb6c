#!/usr/bin/env python
"""The one-command GPU proof: versions, the kernel tests run for real, the two ceilings, the
benchmark plan (the goal points first, then the SparseLinear layout, then the wider sweep while
time remains), JSON + plots, and a PASS / MISS table of the kernels issue's goals printed last.

Run it on a lent GPU machine with ONE call of the device tool (the script ends by itself within
380 s, so a 450 s call leaves room for the install and a margin; ``--skip-tests`` saves ~100 s)::

    run(command="python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || echo 'pip install failed: gpu_check aliases the package'; set -o pipefail; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT 2>&1 | tee $OUT/log.txt", timeout_s=450)

Send the second prepared call, ``bash bench/gpu_followup.sh`` (its header has the call: the decode
join's stress, the Triton conv against cuDNN, the CUDA kernel tests this script leaves out), as
soon as this one returns: the machine goes back after ~30 s idle.

The device image (KINDS.md) has torch 2.11, triton 3.6, numpy, scipy, safetensors, tqdm,
matplotlib, scikit-learn, pytest and pytest-xdist, but no network: ``--no-build-isolation`` makes
the editable install use the image's setuptools instead of fetching one, and ``--no-deps`` keeps
pip from resolving anything. If the install fails anyway, this script maps ``sparse_lth.kernels``
to ``kernels/`` itself (a meta-path alias, passed to the pytest subprocess via sitecustomize).

What it times (kernel time: each call replayed from a CUDA graph, index checks off):

* ``W @ X`` (``triton_bsr_matmul`` / ``triton_csr_matmul``, X [K, N]) against cuBLAS
  (``torch.matmul``), cuSPARSE (torch's CSR product) and torch's Triton BSR, untuned and tuned;
* the SparseLinear layout, ``x @ W.T`` (``triton_bsr_linear`` / ``triton_csr_linear``, x [N, K]
  row-major, y [N, M]) against ``F.linear`` on the dense weight (cuBLAS), plus the forward of a
  ``SparseLinear(W, backend="triton")`` layer (what a deployed model runs; the JSON notes what
  ``backend="auto"`` would pick there), at decode N (1, 16, 4, 8) and wide N.
* ``rows``: BSR ``W @ X`` forced onto bsr.py's row kernel (``path="rows"``) at the decode and
  headline_bsr points where the automatic choice (``kernel_for``, recorded in each of our BSR
  records' ``meta["path"]``) is another kernel, so one run calibrates decode vs rows.

Each timed call reads its own copy of the operands, rotating over R copies with R x (bytes of
one call) >= 3x the device's L2 (capped by free memory; R per point in the JSON), dense and
sparse alike, so a small sparse problem is not timed out of L2 while dense streams from memory.
Decode points report the fraction of the measured copy rate reached on the bytes a call must
move: stored values + indices + X read, Y written (dense: W + X + Y).

The script keeps its own clock (``--budget``, 380 s by default, counted from its start) so it
ends, files written and table printed, inside the call: the tests get at most ~28 % of it
(``--tests-s`` caps them; pytest is interrupted with ^C at the cap, killed 20 s later; its output
is read as it streams, one line per test, so the failing test ids reach the JSON and the table
even when its summary is lost), torch's
BSR tuner ``--tune-s`` per headline block (a tuner cut by that cap is flagged "CAPPED" wherever
its figure is printed: partly tuned), and the rest whatever is left; what does not fit is
skipped and counted in the JSON (``skipped``) and on stdout. ``--quick`` keeps the goal points
only.

On a CPU-only machine, ``python bench/gpu_check.py --out /tmp/gc --dry-run`` runs the same plan on
tiny shapes with the Triton kernels under TRITON_INTERPRET=1 (set here before triton is
imported): the tests are only collected, torch's Triton BSR and its tuner are skipped (CUDA-only)
and say so, the CSR peer is torch's CPU product (MKL), the ceilings and the L2 are CPU stand-ins
so the decode arithmetic and the copy rotation run. Its numbers mean nothing; it proves the
script end to end in ~20-40 s, on triton 3.9 and 3.6 alike (tests/test_gpu_check.py runs it).

Files under --out (at most 8, flat): results.json (every point: device, date, versions, shapes,
dtype, density, check error, time, copies rotated, derived rates; the tuner's parameters and
whether its cap cut it; the compiler's resource report), tests.txt (pytest output), speedup.png,
decode.png, and log.txt when the command tees into it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 380.0  # the whole script, tests included: a 450 s device call keeps a margin
EXPECTED = {"torch": ("2.11", "2.13"), "triton": ("3.6", "3.9")}  # device image, this machine
TEST_FILES = ("tests/test_triton_kernels.py", "tests/test_modules.py")

# Filled by main() after TRITON_INTERPRET is settled: torch must be imported after it (torch
# itself does not import triton, but everything below may).
torch = None  # type: ignore[assignment]


# --- budget --------------------------------------------------------------------------------------
class Budget:
    """The script's own clock: every phase asks it before starting work."""

    def __init__(self, total_s: float, reserve_s: float):
        self.t0 = time.monotonic()
        self.total = total_s
        self.reserve = reserve_s  # kept for writing files, plots and the table

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.total - self.reserve - self.elapsed()

    def fits(self, need_s: float) -> bool:
        return self.left() >= need_s


def log(msg: str) -> None:
    print(msg, flush=True)


# --- scale of the plan ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    square: int                              # M = K of the main shape
    big_n: int                               # N of the compute-bound headline
    ns: tuple[int, ...]                      # sweep batch sizes, in priority order
    csr_headline_ns: tuple[int, ...]         # N <= 256 for the CSR goals
    csr_densities: tuple[float, ...]         # 90-99 % for the CSR goals
    decode_shapes: tuple[tuple[int, int], ...]
    decode_ns: tuple[int, ...]               # decode batch sizes, in priority order (goal's 1 and 16,
                                             # then 4 and 8 where decode and rows kernels meet)
    blocks: tuple[int, ...]                  # sweep block sizes, in priority order
    densities: tuple[float, ...]             # sweep densities (1 - sparsity)
    dtypes: tuple[str, ...]                  # sweep dtypes, in priority order
    copy_bytes: int                          # ceiling: bytes of the copied tensor
    matmul_n: int                            # ceiling: n of the n^3 product
    l2_stand_in: int                         # L2 bytes to rotate past (0: the device's own)
    max_copies: int                          # most operand copies one point rotates over


GPU_SCALE = Scale(
    square=4096, big_n=4096, ns=(4096, 16, 1024, 128, 1), csr_headline_ns=(1, 16, 128, 256),
    csr_densities=(0.1, 0.05, 0.02, 0.01),
    decode_shapes=((8192, 8192), (4096, 16384)), decode_ns=(1, 16, 4, 8),
    blocks=(64, 32, 128, 16), densities=(0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01),
    dtypes=("fp16", "bf16", "fp32"), copy_bytes=1 << 30, matmul_n=4096,
    l2_stand_in=0, max_copies=4096,
)
DRY_SCALE = Scale(
    square=64, big_n=32, ns=(16,), csr_headline_ns=(1, 16), csr_densities=(0.1, 0.02),
    decode_shapes=((64, 128),), decode_ns=(1, 16, 8),  # 8: decode for bsr32, rows for bsr64
    blocks=(16,), densities=(0.5,),
    dtypes=("fp32",), copy_bytes=1 << 22, matmul_n=128,
    # A pretend 64 KiB L2 and at most 3 copies: the copies are made and the last one timed.
    l2_stand_in=1 << 16, max_copies=3,
)

OURS = ("ours", "rows", "module")  # our kernels: a wrong or failing one is a note (and rc 1 for ours, rows)
HEADLINE_BLOCKS = (64, 32)     # the blocks torch's tuner is run for
BIG_BLOCKS = (64, 128)         # ">= 5x with blocks >= 64"
HEADLINE_DENSITY = 0.1         # 90 % sparsity
L2_TIMES = 3.0                 # operand copies rotated per point cover 3x the L2
FREE_FRACTION = 0.25           # ... in at most this share of the free device memory


def dtype_of(name: str):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def tolerance(name: str) -> float:
    """Relative L2 error ||out - ref|| / ||ref|| allowed against the fp32 reference (METHOD.md:
    fp32 far under 1e-3, tf32 near 3e-4, bf16 operands 1e-3 .. 1e-2; output rounding included)."""
    if name == "fp32":
        return 5e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    return {"fp16": 5e-3, "bf16": 2e-2}[name]


# --- points and records --------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    phase: str               # headline_bsr | headline_csr | headline_decode | sweep | sweep_decode
    layout: str              # bsr | csr
    block: int | None
    dtype: str
    M: int
    K: int
    N: int
    density: float           # requested: block density for BSR, element density for CSR
    backends: tuple[str, ...]
    op: str = "matmul"       # matmul: W @ X, X [K, N] | linear: x @ W.T, x [N, K] (SparseLinear)

    @property
    def key(self) -> tuple:
        return (self.op, self.layout, self.block, self.dtype, self.M, self.K, self.N, self.density)

    def label(self) -> str:
        lay = f"bsr{self.block}" if self.layout == "bsr" else "csr"
        return f"{lay} {self.dtype} {self.M}x{self.K} N={self.N} d={self.density:g}" + (
            " x@W.T" if self.op == "linear" else "")


@dataclass
class Record:
    phase: str
    layout: str              # bsr | csr | dense
    block: int | None
    dtype: str
    M: int
    K: int
    N: int
    density: float           # requested
    density_actual: float    # stored fraction of W (blocks for BSR, elements for CSR)
    backend: str             # ours | rows (ours forced onto the BSR row kernel) | dense (cuBLAS: torch.matmul,
                             # or F.linear for op linear) | torch_bsr | torch_bsr_tuned | cusparse |
                             # module (SparseLinear forward, op linear)
    status: str              # ok | refused: ... | wrong: ... | skipped: ...
    op: str = "matmul"       # matmul | linear (see Point)
    verified: bool = False
    rel_err: float | None = None
    tol: float | None = None
    ms: float | None = None
    timing: str | None = None
    copies: int | None = None         # operand copies the timed calls rotated over
    bytes: int | None = None          # one call's: values + indices + X read, Y written (dense: W + X + Y)
    gbps: float | None = None
    bw_fraction: float | None = None  # of the measured copy rate
    tflops: float | None = None       # useful FLOPs (2 * stored entries * N) per second
    speedup_vs_dense: float | None = None
    meta: dict = field(default_factory=dict)


class Run:
    """Everything the run learns, saved as it goes."""

    def __init__(self, out: Path, args: argparse.Namespace, budget: Budget, dry: bool):
        self.out, self.args, self.budget, self.dry = out, args, budget, dry
        self.device = "cpu" if dry else "cuda"
        self.info: dict = {}
        self.tests: dict = {}
        self.ceilings: dict = {}
        self.records: list[Record] = []
        self.dense_cache: dict[tuple, Record] = {}
        self.done: set[tuple] = set()
        self.skipped: dict[str, int] = {}
        self.notes: list[str] = []
        self.tuned: list[dict] = []
        self.resources: dict = {}
        self.goals: list[dict] = []

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        log(f"note: {msg}")

    def save(self) -> None:
        data = {
            "info": self.info, "tests": self.tests, "ceilings": self.ceilings,
            "records": [asdict(r) for r in self.records], "tuned": self.tuned,
            "resources": self.resources, "goals": self.goals, "skipped": self.skipped,
            "notes": self.notes, "elapsed_s": round(self.budget.elapsed(), 1),
        }
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self.out / "results.json")


# --- 1. versions and device ----------------------------------------------------------------------
def check_versions(run: Run) -> None:
    import numpy
    import triton

    tv = torch.__version__.split("+")[0]
    trv = triton.__version__
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": run.dry, "quick": bool(run.args.quick), "budget_s": run.args.budget,
        "tests_cap_s": run.args.tests_s, "tune_cap_s": run.args.tune_s,
        "python": platform.python_version(), "torch": torch.__version__, "triton": trv,
        "numpy": numpy.__version__, "cuda_runtime": torch.version.cuda,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "rotation": {"l2_times": L2_TIMES, "free_fraction": FREE_FRACTION, "max_copies": run.scale.max_copies,
                     "l2_stand_in": run.scale.l2_stand_in},
    }
    checks = {}
    for name, version in (("torch", tv), ("triton", trv)):
        mm = ".".join(version.split(".")[:2])
        checks[name] = "ok" if mm in EXPECTED[name] else f"unexpected {mm} (expected one of {EXPECTED[name]})"
    info["version_checks"] = checks
    if run.dry:
        info["device"] = f"cpu: {platform.processor() or platform.machine()} (dry run, Triton interpreter)"
    else:
        p = torch.cuda.get_device_properties(0)
        info.update({
            "device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "sm_count": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_bytes": int(getattr(p, "L2_cache_size", 0) or 0),
        })
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                                  "temperature.gpu,power.draw", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except Exception as e:  # noqa: BLE001 -- informative only
            info["nvidia_smi"] = f"unavailable: {e}"
    run.info.update(info)
    log(f"device  : {info['device']}" + (f"  (sm {info.get('capability')}, {info.get('sm_count')} SMs, "
                                        f"{info.get('memory_gib')} GiB, L2 {info.get('l2_bytes', 0) >> 20} MiB)"
                                        if not run.dry else ""))
    if "nvidia_smi" in info:
        log(f"smi     : {info['nvidia_smi']}")
    log(f"versions: python {info['python']}, torch {info['torch']} ({checks['torch']}), triton {trv} "
        f"({checks['triton']}), cuda {info['cuda_runtime']}, numpy {info['numpy']}")
    run.save()


# --- 2. the kernel and model tests ---------------------------------------------------------------
ALIAS_CODE = """
import importlib.abc, importlib.util, sys
class _KernelsAlias(importlib.abc.MetaPathFinder):
    # sparse_lth.kernels lives in kernels/ (pyproject's package-dir): map it when not installed
    def find_spec(self, name, path=None, target=None):
        if name != "sparse_lth.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, {init!r}, submodule_search_locations=[{pkg!r}])
sys.meta_path.insert(0, _KernelsAlias())
if {repo!r} not in sys.path:
    sys.path.insert(0, {repo!r})
"""


def _alias_code() -> str:
    return ALIAS_CODE.format(init=str(REPO / "kernels" / "__init__.py"), pkg=str(REPO / "kernels"), repo=str(REPO))


def _alias_dir() -> str:
    """A folder whose sitecustomize installs the alias, for the pytest subprocess."""
    d = tempfile.mkdtemp(prefix="gpu_check_alias_")
    Path(d, "sitecustomize.py").write_text(_alias_code())
    return d


SUMMARY_RE = re.compile(r"\b(\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?|"
                        r"tests? collected)|no tests ran|interrupted)\b")
# A failing or erroring test as pytest -v / -rfE print it: "FAILED id" (xdist's per-test line, the
# short summary; "ERROR path" for a collection error) or "id FAILED" (-v without xdist).
FAILED_RE = re.compile(r"(?:^|\s)(?:FAILED|ERROR)\s+(\S+\.py(?:::\S+)?)|(\S+\.py::\S+)\s+(?:FAILED|ERROR)(?:\s|$)")
TESTS_GRACE_S = 20.0  # after the ^C at the cap, pytest's time to print its summary before SIGKILL


def failed_test_id(line: str) -> str | None:
    """The test id a pytest output line reports failing or erroring, else None."""
    if line.startswith("E "):  # an assertion or traceback line, not a result
        return None
    m = FAILED_RE.search(line)
    return (m.group(1) or m.group(2)) if m else None


def _pump(pipe, fh, failed: list[str]) -> None:
    """Copy pytest's output to tests.txt line by line as it streams, noting failing test ids,
    so they survive a pytest that hangs and is killed before its summary."""
    try:
        for line in pipe:
            fh.write(line)
            fh.flush()
            tid = failed_test_id(line.strip())
            if tid and tid not in failed:
                failed.append(tid)
    except (OSError, ValueError):  # the file closed under a reader left behind
        pass


def run_tests(run: Run, aliased: bool) -> None:
    import threading

    cap = min(run.args.tests_s, 0.28 * run.budget.left())
    # -v: one line per test as it finishes (with xdist too), -rfE: the failures again at the end.
    cmd = [sys.executable, "-m", "pytest", *TEST_FILES, "-x", "-v", "-rfE", "-p", "no:cacheprovider"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    if run.dry:
        # No GPU: the tests would only run interpreted (minutes). Collecting them proves the
        # files import and the summary is read; the real run happens on the device.
        cmd.append("--collect-only")
        env["TRITON_INTERPRET"] = "1"
        run.note("dry run: kernel/model tests only collected (they run for real on the GPU)")
    else:
        import importlib.util

        if importlib.util.find_spec("xdist") is not None:
            cmd += ["-n", str(min(8, max(1, (os.cpu_count() or 2) // 2)))]
    if aliased:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_alias_dir(), env.get("PYTHONPATH")]))
    log(f"\n== tests: {' '.join(cmd[2:])}  (TRITON_INTERPRET {'=1' if run.dry else 'unset'}; cap {cap:.0f} s)")
    t0 = time.monotonic()
    out_path = run.out / "tests.txt"
    interrupted, failed = False, []
    with open(out_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        reader = threading.Thread(target=_pump, args=(proc.stdout, fh, failed), daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(cap, 5))
        except subprocess.TimeoutExpired:
            interrupted = True
            os.killpg(proc.pid, signal.SIGINT)  # pytest prints its summary on ^C
            try:
                rc = proc.wait(timeout=TESTS_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        reader.join(timeout=10)  # EOF once the process group is gone
    text = out_path.read_text(errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if SUMMARY_RE.search(ln)),
                   f"no pytest summary; last line: {lines[-1]}" if lines else "no output")
    run.tests = {"cmd": " ".join(cmd[2:]), "rc": rc, "seconds": round(time.monotonic() - t0, 1),
                 "summary": summary, "failed": list(failed), "interrupted_at_cap": interrupted,
                 "cap_s": round(cap), "collect_only": run.dry}
    log(f"tests   : rc={rc} in {run.tests['seconds']} s: {summary}"
        + ("  [INTERRUPTED at the time cap]" if interrupted else "") + (f"  failed: {', '.join(failed)}" if failed else ""))
    run.save()


# --- timing --------------------------------------------------------------------------------------
def _do_bench(fn, warmup: int = 10, rep: int = 40) -> float:
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # older triton: no return_mode
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])


def time_calls(run: Run, fns: list) -> tuple[float, str]:
    """Median ms of one call, rotating over ``fns`` (closures over distinct copies, so repeated
    calls do not read from L2). On CUDA: one CUDA graph over all copies, replayed and timed with
    events (no launch gaps); do_bench (events, L2 flushed between calls) if capture fails."""
    if run.device == "cpu":
        # Interpreted calls are slow (up to ~1 s each): by default one, on the last copy, so
        # the rotation's copies are built and one runs; --cpu-reps k rotates k calls over all.
        times = []
        for i in range(max(1, run.args.cpu_reps)):
            t0 = time.perf_counter()
            fns[(len(fns) - 1 - i) % len(fns)]()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times), f"perf_counter, {len(times)} of {len(fns)} copies"
    for f in fns:
        f()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.cuda.graph(g):
                for f in fns:
                    f()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        once = max(start.elapsed_time(end), 1e-3)
        reps = max(1, min(2000, int(math.ceil(10.0 / once))))  # ~10 ms a group
        groups = []
        for _ in range(3):
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            end.synchronize()
            groups.append(start.elapsed_time(end) / (reps * len(fns)))
        del g
        return statistics.median(groups), f"cuda-graph x{len(fns)}"
    except Exception as e:  # noqa: BLE001 -- a peer that cannot be captured is timed the plain way
        torch.cuda.synchronize()
        state = {"i": 0}

        def cycle():
            fns[state["i"] % len(fns)]()
            state["i"] += 1

        return _do_bench(cycle), f"do_bench (graph failed: {type(e).__name__})"


# --- 3. ceilings ---------------------------------------------------------------------------------
def measure_ceilings(run: Run) -> None:
    s = run.scale
    log(f"\n== ceilings ({'CPU stand-ins, dry run' if run.dry else 'GPU'})")
    if run.dry:
        run.note("dry run: ceilings measured on the CPU only to exercise the arithmetic (not GPU ceilings)")
    dev = run.device
    n = s.copy_bytes // 2
    a = torch.randn(n, dtype=torch.float16, device=dev)
    b = torch.empty_like(a)
    ms = _do_bench(lambda: b.copy_(a)) if dev == "cuda" else time_calls(run, [lambda: b.copy_(a)])[0]
    run.ceilings["copy_GBps"] = 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e9
    run.ceilings["copy_bytes"] = 2 * a.numel() * a.element_size()
    a = b = None  # free the copy buffers before the matmul ceilings
    log(f"copy    : {run.ceilings['copy_GBps']:.0f} GB/s (read + write of {s.copy_bytes >> 20} MiB)")
    m = s.matmul_n
    for name in ("fp16", "bf16"):
        dt = dtype_of(name)
        x, y = torch.randn(m, m, dtype=dt, device=dev), torch.randn(m, m, dtype=dt, device=dev)
        ms = _do_bench(lambda: torch.matmul(x, y)) if dev == "cuda" else time_calls(run, [lambda: torch.matmul(x, y)])[0]
        run.ceilings[f"matmul_{name}_TFLOPs"] = 2 * m**3 / (ms * 1e-3) / 1e12
        log(f"matmul  : {name} {m}^3 {run.ceilings[f'matmul_{name}_TFLOPs']:.1f} TFLOP/s")
    run.ceilings["matmul_n"] = m
    run.save()


# --- weights, backends, one point ----------------------------------------------------------------
def make_weight(p: Point, device: str):
    """Masked dense W (pruned entries 0), its sparse form (int32 indices), and the stored density.
    BSR: a block-structured random mask with exactly round(d * blocks) blocks; CSR: unstructured."""
    from sparse_lth.formats import to_bsr, to_csr

    dt = dtype_of(p.dtype)
    gen_seed = zlib.crc32(repr(p.key).encode())
    torch.manual_seed(gen_seed)
    if p.layout == "bsr":
        b = p.block
        nb = (p.M // b) * (p.K // b)
        keep = max(1, round(p.density * nb))
        flat = torch.zeros(nb, dtype=torch.bool, device=device)
        flat[torch.randperm(nb, device=device)[:keep]] = True
        bm = flat.view(p.M // b, p.K // b)
        mask = bm.repeat_interleave(b, 0).repeat_interleave(b, 1)
        dense = torch.randn(p.M, p.K, dtype=dt, device=device).masked_fill_(~mask, 0)
        W = to_bsr(dense, b, mask=mask, index_dtype=torch.int32)
        stored = keep / nb
    else:
        mask = torch.rand(p.M, p.K, device=device) < p.density
        dense = torch.randn(p.M, p.K, dtype=dt, device=device).masked_fill_(~mask, 0)
        W = to_csr(dense, mask=mask, index_dtype=torch.int32)
        stored = W.values().numel() / (p.M * p.K)
    return dense, W, stored


@dataclass
class Backend:
    """How one backend runs a point: ``prepare(dense, W)`` -> its weight operand, ``call(A, X,
    out)`` -> Y (``out`` may go unused), ``clone(A)`` -> another copy for the rotation."""
    prepare: object
    call: object
    clone: object


def _same(A):
    return A.clone()


def _backend(backend: str, p: Point, run: Run) -> Backend | str:
    """The backend's way through a point, or a reason it is skipped."""
    if p.op == "linear":
        return _linear_backend(backend, p, run)
    from sparse_lth import kernels

    if backend in ("ours", "rows"):
        # The index check is a once-per-weight cost (SparseLinear pays it when built); per call it
        # cost ~100-135 us on an H200 (several small kernels and a host sync), more than the kernel.
        # "rows": the same product forced onto bsr.py's row kernel (BSR only).
        mm = kernels.triton_bsr_matmul if p.layout == "bsr" else kernels.triton_csr_matmul
        kw = {"path": "rows"} if backend == "rows" else {}
        return Backend(lambda dense, W: W, lambda A, X, out: mm(A, X, out=out, check_invariants=False, **kw), _same)
    if backend == "dense":
        return Backend(lambda dense, W: dense, lambda A, X, out: torch.matmul(A, X, out=out), _same)
    if backend == "cusparse":  # torch's CSR @ dense: cuSPARSE on CUDA (MKL on the CPU of a dry run)
        return Backend(lambda dense, W: W, lambda A, X, out: A @ X, _same)
    if run.dry:
        return f"skipped: {backend} is CUDA-only (dry run)"
    if backend in ("torch_bsr", "torch_bsr_tuned"):
        from torch.sparse._triton_ops import bsr_dense_addmm

        if backend == "torch_bsr":
            # bsr_dense_mm is bsr_dense_addmm(out, W, X, beta=0, out=out) with torch's own meta
            # (its A100 table, else defaults): the "untuned" peer.
            from torch.sparse._triton_ops import bsr_dense_mm

            return Backend(lambda dense, W: W, lambda A, X, out: bsr_dense_mm(A, X, out=out), _same)
        meta = run.tuned_meta.get((p.block, p.M, p.K, p.N))
        if not meta:
            return "skipped: no tuned parameters (tuner did not run or failed)"
        return Backend(lambda dense, W: W,
                       lambda A, X, out: bsr_dense_addmm(out, A, X, beta=0, alpha=1, out=out, meta=meta), _same)
    return f"skipped: unknown backend {backend}"


def _linear_backend(backend: str, p: Point, run: Run) -> Backend | str:
    """The SparseLinear layout: x [N, K] row-major in, y [N, M] out, as a model's layer sees it."""
    import copy

    import torch.nn.functional as F

    from sparse_lth import kernels
    from sparse_lth.nn import SparseLinear

    if backend in ("ours", "rows"):
        lin = kernels.triton_bsr_linear if p.layout == "bsr" else kernels.triton_csr_linear
        kw = {"path": "rows"} if backend == "rows" else {}
        return Backend(lambda dense, W: W, lambda A, x, out: lin(A, x, out=out, check_invariants=False, **kw), _same)
    if backend == "dense":  # what nn.Linear runs: cuBLAS on the dense weight
        return Backend(lambda dense, W: dense, lambda A, x, out: F.linear(x, A), _same)
    if backend == "module":
        # The layer's forward on its sparse path (its checks, dispatch and output allocation
        # included; no bias); "auto" may send small or dense-ish layers to cuBLAS instead, and
        # run_point records which it would pick. deepcopy gives each copy its own buffers.
        return Backend(lambda dense, W: SparseLinear(W, backend="triton"),
                       lambda A, x, out: A(x), copy.deepcopy)
    return f"skipped: {backend} has no linear-layout form here"


def tune_torch_bsr(run: Run, p: Point, W, X) -> None:
    """torch's own tuner (_triton_ops_meta.tune_bsr_dense_addmm) for this shape, capped in time:
    its do_bench (warm-up 500 ms, 100 ms timed) is shortened, and once the cap passes every
    further trial raises, so minimize() keeps the best found so far."""
    import triton.testing
    from torch.sparse._triton_ops_meta import tune_bsr_dense_addmm

    cap = min(run.args.tune_s, max(0.0, run.budget.left() - 30))
    # Tuned once per shape and block, on the first dtype that asks (fp16 in the plan), and reused
    # for the other half type: the knobs (GROUP_SIZE_ROW, SPLIT_N, num_stages, num_warps) shape
    # the same tensor-core kernel for fp16 and bf16.
    key = (p.block, p.M, p.K, p.N)
    entry = {"block": p.block, "dtype": p.dtype, "M": p.M, "K": p.K, "N": p.N, "density": p.density, "cap_s": round(cap)}
    if cap < 5:
        entry["status"] = "skipped: out of time"
        run.tuned.append(entry)
        return
    real = triton.testing.do_bench
    deadline = time.monotonic() + cap
    count = {"trials": 0, "over": 0}

    def capped(fn, warmup=25, rep=100, **kw):
        if time.monotonic() > deadline:
            count["over"] += 1
            raise RuntimeError("gpu_check: tuning time cap reached")
        count["trials"] += 1
        return real(fn, warmup=min(warmup, 20), rep=min(rep, 40), **kw)

    out = torch.empty(p.M, p.N, dtype=X.dtype, device=X.device)
    t0 = time.monotonic()
    triton.testing.do_bench = capped
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            meta = tune_bsr_dense_addmm(out, W, X, beta=0, alpha=1, out=out, store=False, verbose=False)
        entry.update(status="ok" if meta else "failed: tuner returned nothing", meta=meta)
        if meta:
            run.tuned_meta[key] = dict(meta)
    except Exception as e:  # noqa: BLE001
        entry["status"] = f"failed: {type(e).__name__}: {e}"[:300]
    finally:
        triton.testing.do_bench = real
    entry.update(seconds=round(time.monotonic() - t0, 1), trials=count["trials"],
                 cap_reached=count["over"] > 0)
    entry["flag"] = tuner_flag(entry)
    run.tuned.append(entry)
    log(f"  tuner : bsr{p.block} {p.dtype} {p.M}x{p.K}x{p.N}: {entry['status']} {entry.get('meta', '')} "
        f"({entry['trials']} trials, {entry['seconds']} s{', ' + entry['flag'] if entry['flag'] else ''})")


def tuner_flag(entry: dict) -> str:
    """What a reader must know before taking a 'tuned' torch figure as tuned: "" when the tuner
    ran to its end. Trials past the cap raise and minimize() keeps the best found so far, so a
    capped run still returns parameters, only partly tuned ones."""
    if entry.get("cap_reached"):
        return "CAPPED"
    if entry.get("status") == "ok" and not entry.get("trials"):
        return "NOT TIMED (torch's stored parameters)"  # tune_bsr_dense_addmm returns its table's entry
    return ""


def copies_for(call_bytes: int, l2_bytes: int, free_bytes: int, max_copies: int) -> int:
    """Operand copies the timed calls rotate over: enough that one round of them moves
    ``L2_TIMES`` x the L2, so no call finds its operands left in L2 by the previous round, for a
    1 MB sparse problem as for a 32 MB dense one; never more than ``FREE_FRACTION`` of the free
    memory holds, nor ``max_copies`` (the CUDA graph's length); at least one."""
    size = max(call_bytes, 1)
    want = math.ceil(L2_TIMES * l2_bytes / size)
    fit = int(FREE_FRACTION * free_bytes // size)
    return max(1, min(want, fit, max_copies))


def _l2_and_free(run: Run) -> tuple[int, int]:
    """(L2 bytes to rotate past, free memory bytes) on the run's device."""
    if run.scale.l2_stand_in:
        return run.scale.l2_stand_in, 1 << 30
    free, _ = torch.cuda.mem_get_info()
    return run.info.get("l2_bytes") or 50 * 2**20, free


def _operands(p: Point, dense, dt, dev):
    """(X, fp32 reference, output shape) of a point: X [K, N] for W @ X, x [N, K] for x @ W.T."""
    if p.op == "linear":
        X = torch.randn(p.N, p.K, dtype=dt, device=dev)
        return X, X.float() @ dense.float().T, (p.N, p.M)
    X = torch.randn(p.K, p.N, dtype=dt, device=dev)
    return X, dense.float() @ X.float(), (p.M, p.N)


def _check_call(run: Run, p: Point, rec: Record, call, A, X, out_shape, ref, ref_norm: float) -> None:
    """One call on a poisoned output, its error against the fp32 reference recorded."""
    out = torch.full(out_shape, float("nan"), dtype=X.dtype, device=X.device)  # poison: unwritten shows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Y = call(A, X, out)
    err = float((Y.float() - ref).norm()) / ref_norm
    rec.rel_err = err
    rec.verified = bool(math.isfinite(err) and err <= rec.tol)
    if not rec.verified:
        rec.status = f"wrong: rel err {err:.3g} > tol {rec.tol:g}"
        if rec.backend in OURS:
            run.note(f"OUR KERNEL IS WRONG at {p.label()} ({rec.backend}): {rec.status}")


def _time_rotated(run: Run, p: Point, rec: Record, be: Backend, A, X, out_shape, weight_bytes: int) -> None:
    """Time the backend over R copies of its operands (see copies_for) and fill the rates."""
    dt, dev = X.dtype, X.device
    call_bytes = weight_bytes + X.numel() * X.element_size() + p.M * p.N * X.element_size()
    l2, free = _l2_and_free(run)
    copies = copies_for(call_bytes, l2, free, run.scale.max_copies)
    ops = [(A, X, torch.empty(out_shape, dtype=dt, device=dev))]
    for _ in range(copies - 1):
        ops.append((be.clone(A), X.clone(), torch.empty(out_shape, dtype=dt, device=dev)))
    fns = [(lambda a=a, x=x, o=o: be.call(a, x, o)) for a, x, o in ops]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ms, method = time_calls(run, fns)
    rec.ms, rec.timing, rec.copies, rec.bytes = ms, method, copies, call_bytes
    rec.meta["rotated_bytes"] = copies * call_bytes
    rec.meta["rotated_x_l2"] = round(copies * call_bytes / l2, 2)
    rec.gbps = call_bytes / (ms * 1e-3) / 1e9
    copy = run.ceilings.get("copy_GBps")
    rec.bw_fraction = rec.gbps / copy if copy else None


def run_point(run: Run, p: Point) -> None:
    if p.key in run.done:
        return
    run.done.add(p.key)
    dev = run.device
    dt = dtype_of(p.dtype)
    dense, W, stored = make_weight(p, dev)
    X, ref, out_shape = _operands(p, dense, dt, dev)
    ref_norm = float(ref.norm()) or 1.0
    tol = tolerance(p.dtype)
    tune_key = (p.block, p.M, p.K, p.N)
    if "torch_bsr_tuned" in p.backends and not run.dry and tune_key not in run.tune_tried:
        run.tune_tried.add(tune_key)
        tune_torch_bsr(run, p, W, X)
    dense_key = (p.op, p.dtype, p.M, p.K, p.N)
    auto = None  # the BSR kernel that "auto" runs here: "rows" makes the rows peer a repeat of ours
    if p.layout == "bsr":
        from sparse_lth.kernels.bsr import kernel_for

        auto = kernel_for(W, X, p.N, p.op == "linear")
    mine: list[Record] = []
    for backend in p.backends:
        if (backend == "dense" and dense_key in run.dense_cache) or (backend == "rows" and auto == "rows"):
            continue
        is_dense = backend == "dense"
        rec = Record(phase=p.phase, layout="dense" if is_dense else p.layout, block=None if is_dense else p.block,
                     dtype=p.dtype, M=p.M, K=p.K, N=p.N, density=1.0 if is_dense else p.density,
                     density_actual=1.0 if is_dense else stored, backend=backend, status="ok", tol=tol, op=p.op)
        if backend == "ours" and auto:
            rec.meta["path"] = auto
        be = _backend(backend, p, run)
        if isinstance(be, str):
            rec.status = be
        else:
            _run_backend(run, p, rec, be, dense, W, X, out_shape, ref, ref_norm, tune_key)
        if is_dense:
            run.dense_cache[dense_key] = rec
        run.records.append(rec)
        mine.append(rec)
    _log_point(run, p, mine, run.dense_cache.get(dense_key))
    del dense, W, X, ref


def _run_backend(run, p, rec, be, dense, W, X, out_shape, ref, ref_norm, tune_key) -> None:
    """Check one backend's output, then time it; a refusal or failure is recorded, not raised."""
    from sparse_lth.formats import nbytes

    ours = rec.backend in OURS
    try:
        A = be.prepare(dense, W)
        _check_call(run, p, rec, be.call, A, X, out_shape, ref, ref_norm)
        if rec.backend == "torch_bsr_tuned":
            entry = next((t for t in run.tuned if (t["block"], t["M"], t["K"], t["N"]) == tune_key), {})
            rec.meta = {"params": run.tuned_meta.get(tune_key), "tuned_on": entry.get("dtype"),
                        "tuner_flag": entry.get("flag", "")}
        if rec.backend == "module" and not run.dry:
            from sparse_lth.kernels.cuda_rule import auto_cuda_backend

            # what backend="auto" would run for this layer at this N (kernels/cuda_rule.py)
            rec.meta["auto_would_pick"] = auto_cuda_backend(
                p.layout, p.N, rec.density_actual, (p.block, p.block) if p.block else None)
    except Exception as e:  # noqa: BLE001 -- peers refuse shapes (e.g. N % 16); ours must not
        rec.status = f"refused: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if ours:
            rec.status = "error: " + rec.status
            run.note(f"OUR KERNEL FAILED at {p.label()} ({rec.backend}): {rec.status}\n"
                     f"{traceback.format_exc()[-1500:]}")
        return
    if rec.status != "ok":
        return
    try:
        _time_rotated(run, p, rec, be, A, X, out_shape, nbytes(dense if rec.backend == "dense" else W))
        useful = 2 * p.N * (p.M * p.K if rec.backend == "dense" else W.values().numel())
        if rec.ms:
            rec.tflops = useful / (rec.ms * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001
        rec.status = f"timing failed: {type(e).__name__}: {e}"[:300]


def _log_point(run: Run, p: Point, mine: list[Record], base: Record | None) -> None:
    line = [f"dense {base.ms * 1e3:.1f}us R{base.copies}"] if base and base.ms else []
    for rec in mine:
        if rec.backend == "dense":
            continue
        if rec.ms and base and base.ms and base.verified:
            rec.speedup_vs_dense = base.ms / rec.ms
        if rec.ms:
            sp = f" {rec.speedup_vs_dense:.2f}x" if rec.speedup_vs_dense else ""
            bw = f" {rec.bw_fraction:.0%}bw" if rec.bw_fraction and p.N <= 16 else ""
            flag = rec.meta.get("tuner_flag") if rec.backend == "torch_bsr_tuned" else ""
            name = f"{rec.backend}({rec.meta['path']})" if rec.meta.get("path") else rec.backend
            line.append(f"{name} {rec.ms * 1e3:.1f}us{sp}{bw} R{rec.copies}" + (f" [{flag}]" if flag else ""))
        elif not rec.status.startswith("skipped"):
            line.append(f"{rec.backend} {rec.status[:70]}")
    log(f"  {p.label():48s} " + " | ".join(line))


# --- 4. the plan ---------------------------------------------------------------------------------
def build_plan(s: Scale, quick: bool, dry: bool) -> list[Point]:
    """The goal points (headline_*: every row of the goal table), then the SparseLinear layout
    (linear), then the sweep (sweep, sweep_decode), each in priority order. BSR points of the
    headline_bsr, headline_decode and sweep_decode phases also time the row kernel ("rows"; run_point
    drops it where the automatic choice is that kernel already)."""
    sq, plan = s.square, []
    bsr_peers = ("ours", "rows", "dense", "torch_bsr")
    # Headline 1: BSR 90 % at sq^3 vs cuBLAS and torch's BSR (untuned, tuned for 64 and 32).
    for block in (64, 32):
        for dt in ("fp16", "bf16"):
            plan.append(Point("headline_bsr", "bsr", block, dt, sq, sq, s.big_n, HEADLINE_DENSITY,
                              (*bsr_peers, "torch_bsr_tuned")))
    for dt in ("fp16", "bf16"):
        plan.append(Point("headline_bsr", "bsr", 128, dt, sq, sq, s.big_n, HEADLINE_DENSITY, bsr_peers))
        plan.append(Point("headline_bsr", "bsr", 64, dt, sq, sq, s.big_n, 0.5, bsr_peers))
    # Headline 2: CSR 90-99 % at N <= 256 vs cuSPARSE and cuBLAS.
    for dt in ("fp16", "bf16"):
        for n in s.csr_headline_ns:
            for d in s.csr_densities:
                plan.append(Point("headline_csr", "csr", None, dt, sq, sq, n, d, ("ours", "dense", "cusparse")))
    # Headline 3: decode bandwidth (N <= 16), BSR 64 / 32 and CSR at 90 %; every shape at one N
    # before the next N (decode_ns is in priority order).
    for n in s.decode_ns:
        for shape in (*s.decode_shapes, (sq, sq)):
            for lay, block in (("bsr", 64), ("bsr", 32), ("csr", None)):
                peers = ("ours", "dense", "cusparse") if lay == "csr" else bsr_peers
                plan.append(Point("headline_decode", lay, block, "fp16", *shape, n, HEADLINE_DENSITY, peers))
    if quick:
        return _fits(plan)
    plan += linear_points(s)
    # Sweep: every dtype x N x layout x density, by priority: the compute-bound and decode
    # batches at sq x sq, then the decode shapes, then the other batches.
    layouts = [("bsr", b) for b in s.blocks] + [("csr", None)]
    for dt in s.dtypes:
        groups = [("sweep", sq, sq, n) for n in s.ns[:2]]
        groups += [("sweep_decode", m, k, n) for n in s.decode_ns for (m, k) in s.decode_shapes]
        groups += [("sweep", sq, sq, n) for n in s.ns[2:]]
        for phase, m, k, n in groups:
            for lay, block in layouts:
                for d in s.densities:
                    peers = (("ours", "dense", "cusparse") if lay == "csr" else
                             bsr_peers if phase == "sweep_decode" else ("ours", "dense", "torch_bsr"))
                    plan.append(Point(phase, lay, block, dt, m, k, n, d, peers))
    return _fits(plan)


def linear_points(s: Scale) -> list[Point]:
    """x @ W.T with x [N, K] row-major, as SparseLinear calls it, at 90 %: decode N on the decode
    shapes, then wide N on the square one (the compute-bound BSR batch, CSR's widest goal N)."""
    sq, pts = s.square, []
    peers = ("ours", "dense", "module")
    for n in s.decode_ns:
        for shape in s.decode_shapes:
            for lay, block in (("bsr", 64), ("csr", None)):
                pts.append(Point("linear", lay, block, "fp16", *shape, n, HEADLINE_DENSITY, peers, op="linear"))
    for block in (64, 32):
        pts.append(Point("linear", "bsr", block, "fp16", sq, sq, s.big_n, HEADLINE_DENSITY, peers, op="linear"))
    pts.append(Point("linear", "csr", None, "fp16", sq, sq, s.csr_headline_ns[-1], 0.05, peers, op="linear"))
    return pts


def _fits(plan: list[Point]) -> list[Point]:
    return [p for p in plan if p.block is None or (p.M % p.block == 0 and p.K % p.block == 0)]


def run_plan(run: Run, plan: list[Point]) -> None:
    log(f"\n== benchmarks: {len(plan)} points planned (headline first); budget left {run.budget.left():.0f} s")
    phase = None
    last_save = time.monotonic()
    for i, p in enumerate(plan):
        if p.phase != phase:
            phase = p.phase
            log(f"-- {phase}")
        need = 1.0 if run.dry else (6.0 if p.phase.startswith("sweep") else 10.0)
        if not run.budget.fits(need):
            for q in plan[i:]:
                if q.key not in run.done:
                    run.skipped[q.phase] = run.skipped.get(q.phase, 0) + 1
            run.note(f"out of time: skipped {sum(run.skipped.values())} points ({run.skipped})")
            break
        try:
            run_point(run, p)
        except Exception as e:  # noqa: BLE001 -- one broken point must not end the proof
            run.note(f"point {p.label()} failed: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
            if run.device == "cuda":
                torch.cuda.empty_cache()
        if time.monotonic() - last_save > 15:
            run.save()
            last_save = time.monotonic()
    run.save()


# --- 6. compiler resource report -----------------------------------------------------------------
def kernel_modules() -> list:
    """The kernel modules W @ X and x @ W.T reach; the TMA and split-K decode ones are newer, and
    a tree without them reports the others."""
    import importlib

    mods = []
    for name in ("bsr", "csr", "bsr_tma", "bsr_decode"):
        with contextlib.suppress(ImportError):
            mods.append(importlib.import_module(f"sparse_lth.kernels.{name}"))
    return mods


def untimed_autotuners() -> list[str]:
    """Dry run: every autotuner in the kernel modules set not to time under the interpreter
    (kernels/_triton.py: untimed_under_interpreter). TunedLaunch does it for the kernels it
    launches; this covers one that calls its autotuner directly, which on triton 3.6 would ask
    for a GPU driver. Returns the names set here."""
    from triton.runtime.autotuner import Autotuner

    from sparse_lth.kernels._triton import untimed_under_interpreter

    done = []
    for mod in kernel_modules():
        for name, tuner in vars(mod).items():
            if isinstance(tuner, Autotuner) and "do_bench" not in vars(tuner):
                untimed_under_interpreter(tuner)
                done.append(f"{mod.__name__.rsplit('.', 1)[-1]}.{name}")
    return done

def resource_report(run: Run) -> None:
    """Registers, spills and shared memory of the compiled variants the autotuners chose
    (CompiledKernel metadata; n_regs / n_spills come from loading the binary)."""
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
    except Exception as e:  # noqa: BLE001
        run.resources = {"status": f"unavailable: {e}"}
        return
    report: dict = {}
    for mod in kernel_modules():
        for name, tuner in vars(mod).items():
            if not isinstance(tuner, Autotuner):
                continue
            chosen = []
            for key, cfg in getattr(tuner, "cache", {}).items():
                chosen.append({"key": [str(k) for k in key], "kwargs": dict(cfg.kwargs),
                               "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            entry = {"chosen": chosen, "compiled": []}
            fn = tuner.fn
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn
            caches = getattr(fn, "device_caches", None)
            if not isinstance(fn, JITFunction) or not caches:
                entry["compiled_status"] = "no compiled kernels (interpreter)" if run.dry else "no device cache found"
            else:
                wanted = {(json.dumps(c["kwargs"], sort_keys=True), c["num_warps"], c["num_stages"]) for c in chosen}
                knobs = {n for c in chosen for n in c["kwargs"]}  # each kernel tunes its own constexprs
                compiled = []
                for cache in caches.values():
                    try:  # (kernel_cache, ...) in triton 3.x; anything else is reported, not fatal
                        compiled += list(cache[0].values())
                    except Exception as e:  # noqa: BLE001
                        entry["compiled_status"] = f"unreadable device cache: {type(e).__name__}: {e}"[:200]
                for k in compiled:
                    try:
                        consts = {}
                        for ck, v in getattr(k.src, "constants", {}).items():
                            nm = fn.arg_names[ck[0]] if isinstance(ck, tuple) else ck
                            if isinstance(v, (int, float, str, bool)):
                                consts[nm] = v
                        md = k.metadata
                        tunable = {n: consts[n] for n in knobs if n in consts}
                        if wanted and (json.dumps(tunable, sort_keys=True), md.num_warps, md.num_stages) not in wanted:
                            continue
                        with contextlib.suppress(Exception):
                            k._init_handles()
                        entry["compiled"].append({
                            "constexprs": consts, "num_warps": md.num_warps, "num_stages": md.num_stages,
                            "shared": md.shared, "n_regs": getattr(k, "n_regs", None),
                            "n_spills": getattr(k, "n_spills", None), "name": md.name})
                    except Exception as e:  # noqa: BLE001
                        entry["compiled"].append({"error": f"{type(e).__name__}: {e}"[:200]})
            report[f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"] = entry
    run.resources = report
    for name, entry in report.items():
        comp = entry.get("compiled", [])
        worst = max((c.get("n_regs") or 0 for c in comp), default=0)
        spills = sum(c.get("n_spills") or 0 for c in comp)
        log(f"resources: {name}: {len(entry['chosen'])} tuned keys, {len(comp)} chosen variants compiled, "
            f"max regs {worst}, total spills {spills}" + (f" ({entry['compiled_status']})" if "compiled_status" in entry else ""))
    run.save()


# --- 5. goals, plots, table ----------------------------------------------------------------------
def _ok(run: Run, **kw) -> list[Record]:
    return [r for r in run.records if r.ms and r.verified and all(getattr(r, k) == v for k, v in kw.items())]


def _ratio_points(run: Run, peer: str, pred) -> list[tuple[float, str]]:
    """(ours / peer speed ratio, where) for every point where both ran, peer 'dense' = dense."""
    out = []
    for r in run.records:
        if r.backend != "ours" or not r.ms or not r.verified or not pred(r):
            continue
        if peer == "dense":
            base = run.dense_cache.get((r.op, r.dtype, r.M, r.K, r.N))
            pm = base.ms if base and base.ms and base.verified else None
        else:
            same = [q for q in run.records if q.backend == peer and q.ms and q.verified and q.layout == r.layout
                    and q.op == r.op and q.block == r.block and q.dtype == r.dtype
                    and (q.M, q.K, q.N) == (r.M, r.K, r.N)
                    and q.density == r.density]
            pm = same[0].ms if same else None
        if pm:
            where = f"{r.layout}{r.block or ''} {r.dtype} {r.M}x{r.K} N={r.N} d={r.density:g}"
            out.append((pm / r.ms, where))
    return out


def compute_goals(run: Run) -> None:
    s = run.scale
    sq = s.square
    big = lambda r: r.M == sq and r.K == sq and r.N == s.big_n  # noqa: E731
    goals = []

    def goal(name: str, target: float, pts: list[tuple[float, str]], fmt: str = "{:.2f}x", how: str = "min",
             flag: str = ""):
        if not pts:
            goals.append({"goal": name, "target": target, "value": None, "where": "no data", "result": "n/a",
                          "fmt": fmt, "flag": ""})
            return
        v, where = min(pts) if how == "min" else max(pts)
        goals.append({"goal": name, "target": target, "value": v, "where": where, "n_points": len(pts),
                      "result": "PASS" if v >= target else "MISS", "fmt": fmt, "flag": flag})

    goal("BSR 90%, blocks >= 64: >= 5x cuBLAS", 5.0,
         _ratio_points(run, "dense", lambda r: big(r) and r.layout == "bsr" and r.block in BIG_BLOCKS
                       and r.density == HEADLINE_DENSITY and r.dtype in ("fp16", "bf16")))
    goal("BSR 90%, blocks 32: >= 3.5x cuBLAS", 3.5,
         _ratio_points(run, "dense", lambda r: big(r) and r.layout == "bsr" and r.block == 32
                       and r.density == HEADLINE_DENSITY and r.dtype in ("fp16", "bf16")))
    goal("BSR 50%, blocks 64: faster than cuBLAS", 1.0,
         _ratio_points(run, "dense", lambda r: big(r) and r.layout == "bsr" and r.block == 64
                       and r.density == 0.5 and r.dtype in ("fp16", "bf16")))
    # A capped tuner returned partly tuned parameters: the row says so, so the ratio is not
    # read as one against a fully tuned torch.
    flags = sorted({t["flag"] + (": partly tuned" if t.get("cap_reached") else "")
                    for t in run.tuned if t.get("flag")})
    goal("BSR 90% (32, 64): >= 1.2x torch BSR tuned", 1.2,
         _ratio_points(run, "torch_bsr_tuned",
                       lambda r: big(r) and r.layout == "bsr" and r.density == HEADLINE_DENSITY),
         flag=("torch tuner " + " / ".join(flags)) if flags else "")
    goal("BSR 90% (32, 64): vs torch BSR untuned (info)", 1.2,
         _ratio_points(run, "torch_bsr", lambda r: big(r) and r.layout == "bsr" and r.block in HEADLINE_BLOCKS
                       and r.density == HEADLINE_DENSITY))
    csr_pred = lambda r, ds: (r.layout == "csr" and r.M == sq and r.K == sq and r.N <= 256  # noqa: E731
                              and r.density in ds and r.phase == "headline_csr")
    goal("CSR 90-99%, N <= 256: >= 1.5x cuSPARSE", 1.5,
         _ratio_points(run, "cusparse", lambda r: csr_pred(r, s.csr_densities)))
    goal("CSR >= 95%, N <= 256: faster than cuBLAS", 1.0,
         _ratio_points(run, "dense", lambda r: csr_pred(r, [d for d in s.csr_densities if d <= 0.05])))
    decode = lambda r, lay: (r.phase == "headline_decode" and r.layout == lay and r.bw_fraction  # noqa: E731
                             and (r.M, r.K) in s.decode_shapes)
    goal("decode BSR 90% (N <= 16): >= 70% of copy bandwidth", 0.70,
         [(r.bw_fraction, f"bsr{r.block} {r.dtype} {r.M}x{r.K} N={r.N}") for r in run.records
          if r.backend == "ours" and r.verified and decode(r, "bsr")], fmt="{:.0%}")
    goal("decode CSR 90% (N <= 16): >= 70% of copy bandwidth", 0.70,
         [(r.bw_fraction, f"csr {r.dtype} {r.M}x{r.K} N={r.N}") for r in run.records
          if r.backend == "ours" and r.verified and decode(r, "csr")], fmt="{:.0%}")
    goal("decode 90%, SparseLinear layout x @ W.T (info)", 0.70,
         [(r.bw_fraction, f"{r.layout}{r.block or ''} {r.dtype} {r.M}x{r.K} N={r.N}") for r in run.records
          if r.backend == "ours" and r.verified and r.op == "linear" and r.N <= 16 and r.bw_fraction
          and (r.M, r.K) in s.decode_shapes], fmt="{:.0%}")
    run.goals = goals
    run.save()


def make_plots(run: Run) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        run.note(f"no plots: matplotlib unavailable ({e})")
        return
    s = run.scale
    sq = s.square
    dev = run.info.get("device", "?")
    ours = [r for r in run.records if r.backend == "ours" and r.op == "matmul" and r.speedup_vs_dense
            and r.M == sq and r.K == sq]
    dtypes = [d for d in ("fp16", "bf16", "fp32") if any(r.dtype == d for r in ours)]
    layouts = [("bsr", b) for b in sorted({r.block for r in run.records if r.layout == "bsr"})] + [("csr", None)]
    color = {lb: f"C{i}" for i, lb in enumerate(layouts)}
    ns = [n for n in sorted({r.N for r in ours}, reverse=True)]
    if ours:
        fig, axes = plt.subplots(len(dtypes), len(ns), figsize=(3.6 * len(ns), 3.0 * len(dtypes)), squeeze=False)
        for i, dt in enumerate(dtypes):
            for j, n in enumerate(ns):
                ax = axes[i][j]
                for lay, block in layouts:
                    pts = sorted((1 - r.density, r.speedup_vs_dense) for r in ours
                                 if r.dtype == dt and r.N == n and r.layout == lay and r.block == block)
                    if pts:
                        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], "o-", ms=3,
                                color=color[(lay, block)], label=f"BSR {block}" if lay == "bsr" else "CSR")
                ax.axhline(1.0, color="k", lw=0.7)
                ax.set_yscale("log")
                ax.set_title(f"{dt} {sq}x{sq} N={n}", fontsize=9)
                ax.set_xlabel("sparsity %", fontsize=8)
                ax.set_ylabel("speed-up vs cuBLAS" if not run.dry else "speed-up vs dense", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3, which="both")
        from matplotlib.lines import Line2D

        axes[0][0].legend(handles=[Line2D([], [], color=color[lb], marker="o", ms=3,
                                          label=f"BSR {lb[1]}" if lb[0] == "bsr" else "CSR") for lb in layouts],
                          fontsize=7)
        fig.suptitle(f"sparse_lth Triton kernels vs dense matmul ({dev}{', DRY RUN' if run.dry else ''})", fontsize=10)
        fig.tight_layout()
        fig.savefig(run.out / "speedup.png", dpi=110)
        plt.close(fig)
    dec = [r for r in run.records if r.backend in ("ours", "dense", "cusparse", "torch_bsr") and r.bw_fraction
           and r.N <= 16 and r.verified and r.dtype == "fp16" and r.op == "matmul"]
    shapes = sorted({(r.M, r.K) for r in dec if r.backend == "ours"}, reverse=True)
    if dec and shapes:
        fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.3), squeeze=False)
        for j, (m, k) in enumerate(shapes):
            ax = axes[0][j]
            for backend in ("ours", "cusparse", "torch_bsr"):
                for lay, block in layouts:
                    for n, style in ((1, "o-"), (16, "s--")):
                        pts = sorted((1 - r.density, r.bw_fraction) for r in dec if r.backend == backend
                                     and (r.M, r.K) == (m, k) and r.N == n and r.layout == lay and r.block == block)
                        if pts:
                            name = f"BSR {block}" if lay == "bsr" else "CSR"
                            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], style, ms=3,
                                    color=color[(lay, block)], alpha=1.0 if backend == "ours" else 0.45,
                                    label=f"{'ours' if backend == 'ours' else backend} {name} N={n}")
            base = [r for r in dec if r.backend == "dense" and (r.M, r.K) == (m, k)]
            for r in base:
                ax.axhline(r.bw_fraction, color="gray", lw=0.7, ls=":" if r.N == 16 else "-")
            ax.axhline(0.7, color="r", lw=0.8)
            ax.set_ylim(0, 1.1)
            ax.set_title(f"decode fp16 {m}x{k} (gray: cuBLAS, red: 70% goal)", fontsize=8)
            ax.set_xlabel("sparsity %", fontsize=8)
            ax.set_ylabel("bytes read+written / copy rate", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=5, ncol=2)
        fig.suptitle(f"decode bandwidth, fraction of the measured copy rate ({dev}{', DRY RUN' if run.dry else ''})",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(run.out / "decode.png", dpi=110)
        plt.close(fig)


def print_table(run: Run) -> None:
    recs = run.records
    ours = [r for r in recs if r.backend == "ours"]
    n_ok = sum(1 for r in recs if r.ms and r.verified)
    n_bad = sum(1 for r in recs if r.status.startswith(("wrong", "error")))
    log("")
    log("=" * 100)
    if run.dry:
        log("DRY RUN on the CPU (Triton interpreter, tiny shapes): the numbers below mean nothing.")
    log(f"device {run.info.get('device')} | torch {run.info.get('torch')} | triton {run.info.get('triton')} | "
        f"{run.info.get('date')} | {run.budget.elapsed():.0f} s")
    c = run.ceilings
    if c:
        log(f"ceilings: copy {c.get('copy_GBps', 0):.0f} GB/s, matmul fp16 {c.get('matmul_fp16_TFLOPs', 0):.1f} / "
            f"bf16 {c.get('matmul_bf16_TFLOPs', 0):.1f} TFLOP/s at {c.get('matmul_n')}^3")
    log(f"tests: {run.tests.get('summary', 'not run')} (rc {run.tests.get('rc')})"
        + (" [cut at time cap]" if run.tests.get("interrupted_at_cap") else "")
        + (f" failed: {', '.join(run.tests['failed'])}" if run.tests.get("failed") else ""))
    log(f"records: {len(recs)} ({n_ok} timed and verified; ours {sum(1 for r in ours if r.verified)}/{len(ours)} "
        f"verified; {n_bad} wrong/error); skipped points: {run.skipped or 'none'}")
    tuned = [t for t in run.tuned if t.get("status") == "ok"]
    if run.tuned:
        log(f"torch BSR tuner (tuned on {run.tuned[0]['dtype']}, reused for the other half type): "
            f"{len(tuned)}/{len(run.tuned)} ok, " + ", ".join(
                f"bsr{t['block']} {t.get('trials', 0)} trials {t.get('seconds', 0)} s"
                + (f" {t['flag']}" + (" (partly tuned)" if t.get("cap_reached") else "") if t.get("flag") else "")
                for t in run.tuned))
    copies = [r.copies for r in recs if r.copies]
    if copies:
        log(f"operand copies rotated per point: {min(copies)}-{max(copies)} "
            f"(>= {L2_TIMES:g}x L2 of {_l2_label(run)} unless memory-capped)")
    print_linear_rows(run)
    log("-" * 100)
    log(f"{'goal':55s} {'target':>8s} {'measured':>9s}  {'result':6s} worst point")
    for g in run.goals:
        fmt = g.get("fmt", "{:.2f}x")
        val = fmt.format(g["value"]) if g["value"] is not None else "-"
        tgt = fmt.format(g["target"])
        flag = f"  [{g['flag']}]" if g.get("flag") else ""
        log(f"{g['goal']:55s} {tgt:>8s} {val:>9s}  {g['result']:6s} {g['where']}{flag}")
    log("=" * 100)


def _l2_label(run: Run) -> str:
    if run.scale.l2_stand_in:
        return f"{run.scale.l2_stand_in >> 10} KiB (CPU stand-in)"
    return f"{(run.info.get('l2_bytes') or 0) >> 20} MiB"


def print_linear_rows(run: Run) -> None:
    """The SparseLinear layout, one row per point: ours (triton_*_linear) and the layer's forward
    against F.linear on the dense weight."""
    rows = [r for r in run.records if r.op == "linear" and r.backend == "ours"]
    if not rows:
        return
    log("-" * 100)
    log(f"{'SparseLinear layout, x @ W.T (x [N, K] row-major)':50s} {'F.linear':>9s} {'ours':>9s} {'vs dense':>8s} "
        f"{'copy bw':>7s} {'layer':>9s} {'vs dense':>8s}  auto")
    for r in rows:
        base = run.dense_cache.get(("linear", r.dtype, r.M, r.K, r.N))
        mod = next((q for q in run.records if q.op == "linear" and q.backend == "module" and q.layout == r.layout
                    and q.block == r.block and q.dtype == r.dtype and (q.M, q.K, q.N) == (r.M, r.K, r.N)
                    and q.density == r.density), None)
        us = lambda q: f"{q.ms * 1e3:.1f}us" if q and q.ms and q.verified else "-"  # noqa: E731
        ratio = lambda q: (f"{base.ms / q.ms:.2f}x" if q and q.ms and q.verified and base and base.ms  # noqa: E731
                           and base.verified else "-")
        bw = f"{r.bw_fraction:.0%}" if r.bw_fraction and r.N <= 16 else "-"
        where = f"{r.layout}{r.block or ''} {r.dtype} {r.M}x{r.K} N={r.N} d={r.density:g}"
        log(f"{where:50s} {us(base):>9s} {us(r):>9s} {ratio(r):>8s} {bw:>7s} {us(mod):>9s} {ratio(mod):>8s}  "
            f"{(mod.meta.get('auto_would_pick', '-') if mod else '-')}")


# --- package import ------------------------------------------------------------------------------
def fix_interpreter_index() -> str:
    """Make triton 3.6's interpreter run under NumPy >= 2.4 (dry run only); a note, or "".

    The interpreter turns a scalar tensor into a Python int (``range(start, end)`` over loaded
    row bounds, as the CSR kernel does) with ``int(handle.data)`` on a one-element 1-D array,
    which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars").
    Triton 3.9 squeezes the array first; this wraps 3.6's patch of ``tl.tensor`` to do the same.
    """
    import inspect

    import numpy as np

    try:
        int(np.ones(1))
        return ""  # this NumPy still converts: nothing to fix
    except TypeError:
        pass
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 -- no triton: the kernels will say so themselves
        return ""
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "gpu_check_fix", False):
        return ""
    try:
        if "int(self.handle.data)" not in inspect.getsource(patch):
            return ""  # this triton converts its own way (3.9: squeezed)
    except OSError:
        return ""

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.gpu_check_fix = True
    interpreter._patch_lang_tensor = patched  # _patch_lang looks it up by name on every launch
    return (f"dry run: triton {getattr(sys.modules.get('triton'), '__version__', '?')}'s interpreter converts "
            f"scalar tensors with int(1-element array), which NumPy {np.__version__} refuses: patched to squeeze first "
            "(as triton 3.9 does)")


def ensure_package() -> bool:
    """Import sparse_lth.kernels; if the package is not installed, alias kernels/ (True)."""
    try:
        import sparse_lth.kernels  # noqa: F401

        return False
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "sparse_lth" or m.startswith("sparse_lth.")]:
        del sys.modules[name]  # a half-imported package from the failed attempt
    exec(compile(_alias_code(), "<gpu_check alias>", "exec"), {})
    import sparse_lth.kernels  # noqa: F401,F811

    return True


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for results.json, plots, tests.txt")
    ap.add_argument("--quick", action="store_true", help="headline points only (no sweep)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds this script may take in all, tests included (default 380 on GPU, 100 dry)")
    ap.add_argument("--tests-s", type=float, default=80.0, help="cap for the pytest step (s)")
    ap.add_argument("--tune-s", type=float, default=25.0,
                    help="cap per torch BSR tuner run (s); one run per headline block, shared by fp16 and bf16")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the pytest step")
    ap.add_argument("--cpu-reps", type=int, default=0,
                    help="dry run: timed calls per point (at least one per operand copy)")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 100.0 if args.dry_run else DEFAULT_BUDGET_S
    return args


def main(argv=None) -> int:
    global torch
    t_start = time.monotonic()
    args = parse_args(argv)
    # TRITON_INTERPRET is read when triton's JIT decorates a kernel: settle it before any import.
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # quiet triton 3.9's default-change warning
    import torch as _torch

    if args.dry_run:
        fixed = fix_interpreter_index()

    torch = _torch
    # The reserve covers the files, plots and table, and a point that overruns its estimate
    # (a new autotuner key compiles every config).
    budget = Budget(args.budget, reserve_s=8.0 if args.dry_run else 30.0)
    budget.t0 = t_start  # the import of torch counts too
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        log("no CUDA device: run with --dry-run on a CPU machine")
        return 2
    aliased = ensure_package()
    run = Run(args.out, args, budget, args.dry_run)
    run.scale = DRY_SCALE if args.dry_run else GPU_SCALE
    run.tuned_meta = {}
    run.tune_tried = set()
    if aliased:
        run.note("sparse_lth is not installed: kernels/ aliased as sparse_lth.kernels")
    if args.dry_run and fixed:
        run.note(fixed)
    if args.dry_run:
        with contextlib.suppress(ImportError):  # no triton: the kernels say so themselves
            direct = untimed_autotuners()
            if direct:
                run.note("dry run: autotuners called without TunedLaunch told not to time (triton 3.6 "
                         f"would ask for a GPU driver): {direct}")
    log(f"== gpu_check {'(DRY RUN) ' if args.dry_run else ''}-> {args.out}  budget {args.budget:.0f} s")
    try:
        check_versions(run)
        if args.skip_tests:
            run.tests = {"summary": "skipped (--skip-tests)"}
        else:
            run_tests(run, aliased)
        measure_ceilings(run)
        if run.dry:
            run.note("dry run: torch's Triton BSR and its tuner are CUDA-only: skipped; the 'cusparse' "
                     "peer is torch's CPU CSR product (MKL: fp32 only, refuses fp16/bf16)")
        run_plan(run, build_plan(run.scale, args.quick, args.dry_run))
        resource_report(run)
    except Exception as e:  # noqa: BLE001 -- write what we have, then say what broke
        run.note(f"run stopped early: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
    compute_goals(run)
    try:
        make_plots(run)
    except Exception as e:  # noqa: BLE001
        run.note(f"plots failed: {type(e).__name__}: {e}")
    run.save()
    print_table(run)
    bad = [r for r in run.records if r.backend in ("ours", "rows") and r.status.startswith(("wrong", "error"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
