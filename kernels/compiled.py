"""Build this package's Triton kernels for a GPU that is not here, and read their code.

``triton.compile`` builds a kernel for any NVIDIA target without a GPU (``GPUTarget("cuda", 90,
32)`` is an H100). What the compiled code shows answers most speed questions before a GPU run
does: which matrix unit the dot uses (``wgmma`` / ``HGMMA`` on Hopper), whether tiles arrive by
bulk tensor copies (TMA) or ``cp.async``, how wide the global loads are, how much shared memory
the pipeline takes, and whether registers spill to local memory.

A job names a kernel (:data:`KERNELS`), the target, the element and index types, the
constexprs and the launch options (``num_warps``, ``num_stages``, ``maxnreg``), and may ask for
the SASS facts (``"sass": True``) or the PTX itself and the runtime argument names
(``"keep_ptx": True``); :func:`compile_jobs` builds a list of them in a subprocess
with ``TRITON_INTERPRET`` off (under the interpreter Triton's code generator fails) and an empty
cache, and returns one dict per job: the job, ``shared`` bytes and :func:`code_facts`.

Example (about a second; needs triton, no GPU)::

    >>> from sparse_lth.kernels.compiled import compile_jobs
    >>> job = {"kernel": "bsr", "arch": 90, "dtype": "fp16", "index": "i32", "num_warps": 4,
    ...        "num_stages": 3, "constexprs": {"BR": 64, "BC": 64, "X_T": False, "Y_T": False,
    ...        "DOT_PRECISION": "ieee", "UPCAST": False, "BLOCK_N": 64}}
    >>> r = compile_jobs([job])[0]
    >>> r["wgmma"], r["shared"] <= 232448
    (True, True)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

__all__ = ["KERNELS", "compile_jobs", "code_facts", "job"]

# name -> (module in sparse_lth.kernels, the @triton.jit function's name)
KERNELS: dict[str, tuple[str, str]] = {
    "csr": ("csr", "_csr_kernel"),
    "bsr": ("bsr", "_bsr_kernel"),
    "bsr_tma": ("bsr_tma", "_bsr_tma_kernel"),
    "bsr_decode": ("bsr_decode", "_bsr_decode_kernel"),
    "csr_sddmm": ("sddmm", "_csr_sddmm_kernel"),
    "bsr_sddmm": ("sddmm", "_bsr_sddmm_kernel"),
    "bsr_conv2d": ("conv", "_bsr_conv2d_kernel"),
}


def code_facts(ptx: str, sass: str | None = None) -> dict:
    """What a kernel's PTX (and SASS, when given) shows: matrix units, copy engines, global
    load widths, atomics, local-memory spills, and a hash of the code without comments (two
    configs with one hash are one kernel)."""
    load = r"ld\.global(?:\.[\w:]+)*?\."
    facts = {
        "wgmma": "wgmma" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "cp_async": len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "atomics": len(re.findall(r"\b(?:atom|red)\.global", ptx)),
        # 16-byte loads: four 32-bit words or two 64-bit ones per thread
        "ld16": len(re.findall(load + r"(?:v4\.[bfsu]32|v2\.[bfsu]64)\b", ptx)),
        "ld8": len(re.findall(load + r"(?:v2\.[bfsu]32|v4\.[bfsu]16)\b", ptx)),
        "ld_scalar": len(re.findall(load + r"[bfsu](?:8|16|32|64)\s", ptx)),
        "ld_2byte": len(re.findall(load + r"[bfsu]16\s", ptx)),  # one 16-bit element a thread: a gather's worst case
        "cp_async16": len(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^\]]*\], \[[^\]]*\], 0x10\b", ptx)),
        "ptx_hash": hashlib.sha1(re.sub(r"//.*", "", ptx).encode()).hexdigest()[:12],
    }
    if sass is not None:
        facts["spills"] = len(re.findall(r"\b(?:LDL|STL)\b", sass))
        facts["hgmma"] = "HGMMA" in sass
        facts["ldg128"] = len(re.findall(r"\bLDG\.E\.128\b", sass))
    return facts


def _signature(fn, job: dict) -> tuple[dict, dict]:
    """The argument types and alignment a launch gives ``fn`` for ``job``."""
    consts = job["constexprs"]
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in ("crow_ptr", "col_ptr", "row_ptr"):
            signature[name] = "*" + job["index"]
        elif name == "count_ptr":  # bsr_decode: arrival counters
            signature[name] = "*i32"
        elif name == "part_ptr":  # bsr_decode: fp32 partial rows
            signature[name] = "*fp32"
        elif name == "a_desc":  # bsr_tma: the stored blocks, one [BR, BC] box at a time
            signature[name] = f"tensordesc<{job['dtype']}[{consts['BR']}, {consts['BC']}]>"
        elif name == "x_desc":  # bsr_tma: X's [BC, BLOCK_N] boxes ([BLOCK_N, BC] for x rows)
            box = ((consts["BLOCK_N"], consts["BC"]) if consts["X_T"]
                   else (consts["BC"], consts["BLOCK_N"]))
            signature[name] = f"tensordesc<{job['dtype']}[{box[0]}, {box[1]}]>"
        elif name.endswith("_ptr"):
            signature[name] = "*" + job["dtype"]
        else:
            signature[name] = "i32"
        # What a launch sees with torch allocations and layer-sized M, K, N: aligned pointers,
        # sizes and strides divisible by 16 (the case that vectorizes and pipelines most); a
        # job lists what it cannot assume (decode's N is 1 .. 16) in "unaligned", and other
        # arguments to take as multiples of 16 (a conv's channel counts) in "aligned".
        if name in job.get("unaligned", ()):
            continue
        if name.endswith("_ptr") or name in ("M", "N", "K", "stride_x", "stride_y") + tuple(job.get("aligned", ())):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


#: A launch's options, as opposed to its constexprs (both come in a triton.Config or a dict).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def job(kernel: str, config, constexprs: dict | None = None, *, arch: int = 90,
        dtype: str = "fp16", index: str = "i32", **options) -> dict:
    """One job for :func:`compile_jobs`: ``config`` is a ``triton.Config`` or a dict (such as a
    launcher's fixed launch) giving ``num_warps``, ``num_stages``, ``maxnreg`` and constexprs;
    ``constexprs`` adds the rest; ``options`` are the job's other keys (``sass``, ...).

    >>> import triton
    >>> j = job("csr", triton.Config({"BLOCK_N": 1}, num_warps=2, num_stages=2),
    ...         {"X_T": False}, sass=True)
    >>> j["num_warps"], j["constexprs"], j["sass"]
    (2, {'X_T': False, 'BLOCK_N': 1}, True)
    """
    if isinstance(config, dict):
        launch = {k: v for k, v in config.items() if k in LAUNCH_OPTIONS}
        kwargs = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    else:
        launch = {"num_warps": config.num_warps, "num_stages": config.num_stages,
                  "maxnreg": getattr(config, "maxnreg", None)}
        kwargs = config.kwargs
    return {"kernel": kernel, "arch": arch, "dtype": dtype, "index": index, **launch,
            "constexprs": {**(constexprs or {}), **kwargs}, **options}


def _compile(job: dict) -> dict:
    """Compile one job (in the subprocess); SASS only when the job asks (``"sass": True``):
    disassembling costs about 0.2 s a kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    module, attr = KERNELS[job["kernel"]]
    raw = getattr(importlib.import_module(f"sparse_lth.kernels.{module}"), attr)
    fn = JITFunction(getattr(raw, "fn", raw))  # a plain JITFunction even if made under interpret
    signature, attrs = _signature(fn, job)
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=job["constexprs"], attrs=attrs),
        target=GPUTarget("cuda", job["arch"], 32),
        options={"num_warps": job["num_warps"], "num_stages": job["num_stages"],
                 **({"maxnreg": job["maxnreg"]} if job.get("maxnreg") else {})},
    )
    ptx = compiled.asm["ptx"]
    sass = compiled.asm["sass"] if job.get("sass") else None
    kept = {"ptx": ptx, "args": [n for n, t in signature.items() if t != "constexpr"]
            } if job.get("keep_ptx") else {}
    return {**job, "shared": int(compiled.metadata.shared), **code_facts(ptx, sass), **kept,
            "seconds": time.perf_counter() - start}


def compile_jobs(jobs: list[dict], workers: int = 2, timeout_s: float = 1800) -> list[dict]:
    """Compile ``jobs`` in a subprocess with the interpreter off and an empty Triton cache
    (so its timings are honest), ``workers`` at a time; results in the jobs' order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-m", __name__, str(workers)],
                              input=json.dumps(jobs), capture_output=True, text=True, env=env,
                              timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout)


def _main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    jobs = json.load(sys.stdin)
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with ProcessPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_compile, jobs, chunksize=4))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    _main()
