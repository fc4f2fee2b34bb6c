#!/usr/bin/env python
"""What each Triton kernel compiles to on Hopper (sm_90), as a markdown table for RESULTS.md.

No GPU needed: kernels/compiled.py builds one representative config per kernel and layout
(fp16 unless said) with triton's own compiler and reads the PTX and SASS. Columns: shared
memory and how many tile buffers it holds, the matrix unit (HGMMA = wgmma, HMMA = mma.sync,
FMA), how tiles arrive (TMA bulk tensor copies, cp.async, plain loads), global loads by width,
atomics, and local-memory accesses (spills).

    python bench/compiled_table.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import sys

import triton

from sparse_lth.kernels.bsr_decode import DECODE_CONFIGS, SEARCH, decode_configs
from sparse_lth.kernels.compiled import compile_jobs, job
from sparse_lth.kernels.conv import conv_launch
from sparse_lth.kernels.csr import CSR_CONFIGS

ELEM = {"fp16": 2, "bf16": 2, "fp32": 4}


def _job(kernel: str, label: str, config, constexprs: dict, dtype: str = "fp16",
         **extra) -> dict:
    """A row: ``config`` a triton.Config or a dict of launch options and constexprs."""
    return job(kernel, config, constexprs, dtype=dtype, label=label, sass=True, **extra)


def _bsr(br: int, block_n: int, warps: int, stages: int, *, x_t=False, dtype="fp16",
         tma=False) -> dict:
    k = {"BR": br, "BC": br, "X_T": x_t, "Y_T": x_t, "DOT_PRECISION": "ieee", "UPCAST": False,
         "BLOCK_N": block_n}
    if tma:
        k["WAVES"] = 1
    what = f"{br}x{br} blocks, BLOCK_N {block_n}{', x rows' if x_t else ''}"
    return _job("bsr_tma" if tma else "bsr", what, {"num_warps": warps, "num_stages": stages},
                k, dtype, stage_bytes=(br * br + br * block_n) * ELEM[dtype])


def _conv(block: int, pixels: int) -> dict:
    """The conv's launch for square blocks at ``pixels`` outputs (3x3, stride 1, 64 channels)."""
    launch = conv_launch(block, block, 2, pixels)
    return _job("bsr_conv2d", f"3x3, {block}x{block} blocks, {launch['BLOCK_P']} pixels", launch,
                {"KW": 3, "SH": 1, "SW": 1, "PH": 1, "PW": 1, "DH": 1, "DW": 1, "HAS_BIAS": True, "BR": block,
                 "BC": block, "OUT_CHANNELS_LAST": True, "EVEN_C": True, "DOT_PRECISION": "ieee"},
                aligned=("C", "O"), stage_bytes=(launch["BLOCK_P"] + block) * block * 2)


def _csr_configs() -> list[tuple[str, triton.Config]]:
    """The CSR kernel's decode config (one input, 8 entries a thread) and a wide one."""
    first = {c.kwargs["BLOCK_N"]: c for c in reversed(CSR_CONFIGS)}
    return [("decode, N 1", first[1]), ("wide, BLOCK_N 64", first[64])]


def jobs() -> list[dict]:
    """The table's rows: the configs the launchers favour for each kernel on Hopper."""
    rows = [
        _bsr(64, 128, 8, 5, tma=True), _bsr(128, 128, 8, 5, tma=True),
        _bsr(64, 256, 8, 3, tma=True), _bsr(64, 128, 8, 5, tma=True, x_t=True, dtype="bf16"),
        _bsr(32, 128, 8, 5, tma=True),
        _bsr(64, 128, 8, 5), _bsr(64, 128, 8, 3), _bsr(32, 64, 4, 5), _bsr(128, 64, 8, 5),
        *[_job("csr", f"{what}{', padded rows' if aligned else ''}", c,
               {"X_T": False, "Y_T": False, "ALIGNED": aligned})
          for what, c in _csr_configs() for aligned in (False, True)],
        *[_job("bsr_decode", f"{br}x{bc} blocks, N {np_}{', x rows' if x_t else ''}", c,
               {"BR": br, "BC": bc, "NP": np_, "VEC": 8, "X_T": x_t, "Y_T": x_t,
                "SEARCH": SEARCH}, unaligned=["N"])
          for br, bc, np_, x_t in ((64, 64, 1, False), (64, 64, 16, True), (16, 128, 1, False))
          for c in decode_configs(DECODE_CONFIGS, np_, br, bc, 2)[:1]],
        _job("bsr_sddmm", "64x64 blocks", {"num_warps": 4, "num_stages": 3},
             {"BR": 64, "BC": 64, "DOT_PRECISION": "ieee", "UPCAST": False, "BLOCK_N": 64}),
        *[_conv(br, pixels) for br, pixels in ((32, 32 * 56 * 56), (32, 7 * 7), (64, 32 * 56 * 56))],
    ]
    return rows


def table(results: list[dict]) -> str:
    head = ("| kernel | config | dtype | warps / stages | shared KB | tile buffers | matrix unit "
            "| tiles by | 16-B / 8-B / scalar loads | atomics | spills |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        unit = "HGMMA" if r["hgmma"] else ("HMMA" if r["mma_sync"] else "FMA")
        copies = ("TMA" if r["tma"] else "cp.async" if r["cp_async"] else "loads")
        stage = r.get("stage_bytes")
        buffers = f"{r['shared'] // stage}" if stage else "-"
        lines.append(
            f"| {r['kernel']} | {r['label']} | {r['dtype']} | {r['num_warps']} / "
            f"{r['num_stages']} | {r['shared'] / 1024:.1f} | {buffers} | {unit} | {copies} | "
            f"{r['ld16']} / {r['ld8']} / {r['ld_scalar']} | {r['atomics']} | {r['spills']} |")
    return "\n".join(lines)


def main() -> int:
    results = compile_jobs(jobs())
    print(f"triton {triton.__version__}, sm_90, compiled without a GPU\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
