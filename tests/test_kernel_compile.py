"""Compile every Triton kernel for sm_90 (H100) and sm_80 (A100) without a GPU.

Checks what only the compiled code shows: the fp16 / bf16 BSR dots (the product and the SDDMM
weight gradient) run on tensor cores (``wgmma`` on sm_90 when the block has >= 64 rows,
``mma.sync`` otherwise), and every autotune config's shared memory (compiled metadata
``shared``) fits the device's per-program limit after pruning, and never exceeds the
launcher's estimate that pruning relies on.

Compiling needs TRITON_INTERPRET off: under the interpreter Triton patches ``tl`` ops and the
code generator fails. The conftest turns the interpreter on for the kernel tests, so the
compiles run in one subprocess with it off (and a fresh Triton cache, so timings are honest).
This file is also that subprocess's script: ``python tests/test_kernel_compile.py`` reads a
JSON list of jobs on stdin and prints results as JSON.

The default set (``_default_jobs``, ~180 compiles, half of them the SDDMM kernels) takes about
40 s on 2 cores; the exhaustive sweep (every config x block shape x dtype x arch, ~860
compiles) about 3 to 4 minutes. CI runs both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

triton = pytest.importorskip("triton")

# Per-program opt-in shared memory (cudaDevAttrMaxSharedMemoryPerBlockOptin): 227 KB on H100
# (228 KB per SM less 1 KB the driver keeps), 163 KB on A100.
SMEM_LIMIT = {90: 232448, 80: 166912}
ARCHS = (90, 80)
DTYPES = ("fp32", "fp16", "bf16")
ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
BLOCK_SHAPES = ((16, 16), (32, 32), (64, 64), (128, 128), (16, 128), (128, 32))


# --- the subprocess side ------------------------------------------------------------------------

def _signature(fn, job: dict) -> tuple[dict, dict]:
    """The argument types and alignment a launch gives ``fn`` for ``job``."""
    consts = job["constexprs"]
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in ("crow_ptr", "col_ptr", "row_ptr"):
            signature[name] = "*" + job["index"]
        elif name == "order_ptr":
            signature[name] = "*i32"
        elif name == "a_desc":  # bsr_tma: the stored blocks, one [BR, BC] box at a time
            signature[name] = f"tensordesc<{job['dtype']}[{consts['BR']}, {consts['BC']}]>"
        elif name == "x_desc":  # bsr_tma: X's [BC, BLOCK_N] boxes ([BLOCK_N, BC] for x rows)
            box = (consts["BLOCK_N"], consts["BC"]) if consts["X_T"] else (consts["BC"],
                                                                          consts["BLOCK_N"])
            signature[name] = f"tensordesc<{job['dtype']}[{box[0]}, {box[1]}]>"
        elif name.endswith("_ptr"):
            signature[name] = "*" + job["dtype"]
        else:
            signature[name] = "i32"
        # What a launch sees with torch allocations and layer-sized M, K, N (the case that
        # pipelines both tiles and so needs the most shared memory): aligned pointers, sizes
        # and strides divisible by 16. Bucket arguments are unused by the body.
        if name.endswith("_ptr") or name in ("M", "N", "K", "stride_x", "stride_y"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def code_facts(ptx: str, sass: str | None) -> dict:
    """What the compiled code shows: matrix units, copy engines, load widths, spills."""
    facts = {"wgmma": "wgmma" in ptx, "mma_sync": "mma.sync" in ptx,
             "cp_async": len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
             "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
             "atomics": len(re.findall(r"\b(?:atom|red)\.global", ptx)),
             # 16-byte global loads: v4 of 32-bit words, v2 of 64-bit ones
             "ld16": len(re.findall(r"ld\.global(?:\.[\w:]+)*?\.(?:v4\.(?:b32|u32|f32|s32)|"
                                    r"v2\.(?:b64|u64|f64|s64))", ptx)),
             "ld_scalar": len(re.findall(r"ld\.global(?:\.[\w:]+)*?\.(?:b|u|s|f)(?:8|16|32|64)\s",
                                         ptx)),
             "ptx_hash": hashlib.sha1(re.sub(r"//.*", "", ptx).encode()).hexdigest()[:12]}
    if sass is not None:
        facts["spills"] = len(re.findall(r"\b(?:LDL|STL)\b", sass))
        facts["hgmma"] = "HGMMA" in sass
    return facts


def _compile(job: dict) -> dict:
    """Compile one kernel for one target; report shared memory and what its code shows."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from sparse_lth.kernels import bsr, bsr_tma, conv, csr, sddmm

    raw = {"bsr": bsr._bsr_kernel, "csr": csr._csr_kernel, "bsr_tma": bsr_tma._bsr_tma_kernel,
           "bsr_sddmm": sddmm._bsr_sddmm_kernel, "csr_sddmm": sddmm._csr_sddmm_kernel,
           "bsr_conv2d": conv._bsr_conv2d_kernel}[job["kernel"]]
    fn = JITFunction(getattr(raw, "fn", raw))  # a plain JITFunction even if made under interpret
    signature, attrs = _signature(fn, job)
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=job["constexprs"], attrs=attrs),
        target=GPUTarget("cuda", job["arch"], 32),
        options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
    )
    sass = compiled.asm["sass"] if job.get("sass") else None  # cuobjdump: ~0.2 s a kernel
    return {**job, "shared": int(compiled.metadata.shared),
            **code_facts(compiled.asm["ptx"], sass), "seconds": time.perf_counter() - start}


def _main() -> None:
    jobs = json.load(sys.stdin)
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_compile, jobs, chunksize=4))
    json.dump(results, sys.stdout)


# --- the pytest side ----------------------------------------------------------------------------

def _run(jobs: list[dict]) -> list[dict]:
    """Compile ``jobs`` in a subprocess with the interpreter off and an empty Triton cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(jobs),
                              capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"compile subprocess failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout)


def _bsr_job(arch, dtype, br, bc, config, index="i32", x_t=False, precision="ieee") -> dict:
    return {"kernel": "bsr", "arch": arch, "dtype": dtype, "index": index,
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "constexprs": {"BR": br, "BC": bc, "X_T": x_t, "Y_T": x_t,
                           "DOT_PRECISION": precision, "UPCAST": False,
                           "BLOCK_N": config.kwargs["BLOCK_N"]}}


def _bsr_tma_job(arch, dtype, br, bc, config, x_t=False, precision="ieee", sass=False) -> dict:
    return {"kernel": "bsr_tma", "arch": arch, "dtype": dtype, "index": "i32", "sass": sass,
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "constexprs": {"BR": br, "BC": bc, "X_T": x_t, "Y_T": x_t,
                           "DOT_PRECISION": precision, "UPCAST": False, **config.kwargs}}


def _csr_job(arch, dtype, config, index="i32", x_t=False) -> dict:
    return {"kernel": "csr", "arch": arch, "dtype": dtype, "index": index,
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "constexprs": {"X_T": x_t, "Y_T": x_t, **config.kwargs}}


def _bsr_sddmm_job(arch, dtype, br, bc, config, index="i32", precision="ieee") -> dict:
    return {"kernel": "bsr_sddmm", "arch": arch, "dtype": dtype, "index": index,
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "constexprs": {"BR": br, "BC": bc, "DOT_PRECISION": precision, "UPCAST": False,
                           "BLOCK_N": config.kwargs["BLOCK_N"]}}


def _csr_sddmm_job(arch, dtype, config, index="i32") -> dict:
    return {"kernel": "csr_sddmm", "arch": arch, "dtype": dtype, "index": index,
            "num_warps": config.num_warps, "num_stages": config.num_stages,
            "constexprs": dict(config.kwargs)}


def _surviving_sddmm(arch, dtype, br, bc):
    """The BSR SDDMM configs the launcher's pruning keeps on this arch for a long N."""
    from sparse_lth.kernels.sddmm import BSR_SDDMM_CONFIGS, prune_bsr_sddmm_configs

    return prune_bsr_sddmm_configs(BSR_SDDMM_CONFIGS, 1 << 20, br, bc, ELEM_BYTES[dtype],
                                   SMEM_LIMIT[arch])


def _sddmm_jobs() -> list[dict]:
    """The SDDMM kernels (about 75 compiles, ~20 s): every BSR config that survives for fp16
    64 x 64 blocks, the one nearest the shared-memory limit for every dtype x block shape,
    every CSR config, and the other index type and precisions once each, per arch."""
    from sparse_lth.kernels.sddmm import CSR_SDDMM_CONFIGS, bsr_sddmm_shared_bytes

    jobs = []
    for arch in ARCHS:
        jobs += [_bsr_sddmm_job(arch, "fp16", 64, 64, c)
                 for c in _surviving_sddmm(arch, "fp16", 64, 64)]
        for dtype in DTYPES:
            for br, bc in BLOCK_SHAPES:
                jobs.append(_bsr_sddmm_job(arch, dtype, br, bc, max(
                    _surviving_sddmm(arch, dtype, br, bc),
                    key=lambda c: bsr_sddmm_shared_bytes(c, br, bc, ELEM_BYTES[dtype]))))
        mid = _surviving_sddmm(arch, "fp16", 64, 64)[0]
        jobs.append(_bsr_sddmm_job(arch, "bf16", 64, 64, mid, index="i64"))
        jobs.append(_bsr_sddmm_job(arch, "fp32", 64, 64, mid, precision="tf32"))
        csr_dtype = "fp16" if arch == 90 else "bf16"
        jobs += [_csr_sddmm_job(arch, csr_dtype, c) for c in CSR_SDDMM_CONFIGS]
        jobs.append(_csr_sddmm_job(arch, "fp32", CSR_SDDMM_CONFIGS[0], index="i64"))
    return jobs


def _surviving(arch, dtype, br, bc):
    """The BSR configs the launcher's pruning keeps on this arch for some N."""
    from sparse_lth.kernels.bsr import BSR_CONFIGS, bsr_shared_bytes

    return [c for c in BSR_CONFIGS
            if bsr_shared_bytes(c, br, bc, ELEM_BYTES[dtype]) <= SMEM_LIMIT[arch]]


def _default_jobs() -> list[dict]:
    """About 100 compiles (~20 s on 2 cores): every BSR config for fp16 64 x 64 blocks,
    the config nearest the shared-memory limit for every dtype x block shape, every CSR config
    once per arch, and the other layouts, index types and precisions on one config each; then
    the same for the SDDMM kernels (``_sddmm_jobs``)."""
    from sparse_lth.kernels.bsr import bsr_shared_bytes
    from sparse_lth.kernels.csr import CSR_CONFIGS

    jobs = []
    for arch in ARCHS:
        jobs += [_bsr_job(arch, "fp16", 64, 64, c) for c in _surviving(arch, "fp16", 64, 64)]
        for dtype in DTYPES:
            for br, bc in BLOCK_SHAPES:
                kept = _surviving(arch, dtype, br, bc)
                jobs.append(_bsr_job(arch, dtype, br, bc, max(
                    kept, key=lambda c: bsr_shared_bytes(c, br, bc, ELEM_BYTES[dtype]))))
        csr_dtype = "fp16" if arch == 90 else "bf16"
        jobs += [_csr_job(arch, csr_dtype, c) for c in CSR_CONFIGS]
        mid = next(c for c in _surviving(arch, "fp16", 64, 64)
                   if c.kwargs["BLOCK_N"] == 64 and c.num_stages == 3)
        jobs.append(_bsr_job(arch, "bf16", 64, 64, mid, index="i64", x_t=True))
        jobs.append(_bsr_job(arch, "fp32", 64, 64, mid, precision="tf32"))
        jobs.append(_csr_job(arch, "bf16", CSR_CONFIGS[0], index="i64", x_t=True))
        jobs.append(_csr_job(arch, "fp16", CSR_CONFIGS[-3], x_t=True))
        jobs.append(_csr_job(arch, "fp32", CSR_CONFIGS[8]))
    return jobs + _sddmm_jobs()


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    pytest.importorskip("triton")
    return _run(_default_jobs())


def _check(results: list[dict]) -> None:
    from sparse_lth.kernels.bsr import bsr_shared_bytes
    from sparse_lth.kernels.sddmm import bsr_sddmm_shared_bytes

    import triton

    estimators = {"bsr": bsr_shared_bytes, "bsr_sddmm": bsr_sddmm_shared_bytes}

    for r in results:
        what = (f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['constexprs']} "
                f"warps={r['num_warps']} stages={r['num_stages']}")
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], f"{what}: shared {r['shared']} over limit"
        if r["kernel"] not in estimators:
            continue
        k = r["constexprs"]
        config = triton.Config({"BLOCK_N": k["BLOCK_N"]}, num_warps=r["num_warps"],
                               num_stages=r["num_stages"])
        estimate = estimators[r["kernel"]](config, k["BR"], k["BC"], ELEM_BYTES[r["dtype"]])
        assert r["shared"] <= estimate, f"{what}: shared {r['shared']} > estimate {estimate}"
        tensor_cores = r["dtype"] != "fp32" or k["DOT_PRECISION"] == "tf32"
        if tensor_cores and r["arch"] == 90 and k["BR"] >= 64:
            assert r["wgmma"], f"{what}: no wgmma in the PTX"
        elif tensor_cores:
            assert r["mma_sync"] or r["wgmma"], f"{what}: no tensor-core mma in the PTX"
        else:  # IEEE fp32 is FMA: must not silently use tf32 tensor cores
            assert not (r["mma_sync"] or r["wgmma"]), f"{what}: fp32 ieee used tensor cores"


def test_bsr_and_csr_compile_for_sm90_and_sm80(compiled):
    assert {r["arch"] for r in compiled} == set(ARCHS)
    assert {r["kernel"] for r in compiled} == {"bsr", "csr", "bsr_sddmm", "csr_sddmm"}
    _check(compiled)


@pytest.mark.parametrize("kernel", ["bsr", "bsr_sddmm"])
def test_fp16_bsr_uses_wgmma_on_hopper(compiled, kernel):
    hits = [r for r in compiled if r["kernel"] == kernel and r["arch"] == 90
            and r["dtype"] in ("fp16", "bf16") and r["constexprs"]["BR"] >= 64]
    assert hits and all(r["wgmma"] for r in hits)


def test_every_bsr_block_shape_keeps_a_config():
    from sparse_lth.kernels.sddmm import bsr_sddmm_shared_bytes

    for arch in ARCHS:
        for dtype in DTYPES:
            for br, bc in BLOCK_SHAPES:
                assert _surviving(arch, dtype, br, bc), (arch, dtype, br, bc)
                assert all(bsr_sddmm_shared_bytes(c, br, bc, ELEM_BYTES[dtype])
                           <= SMEM_LIMIT[arch] for c in _surviving_sddmm(arch, dtype, br, bc))


def test_block_sparse_conv_compiles_for_sm90_and_sm80_on_tensor_cores():
    """kernels/conv.py: every dtype and block shape it takes builds for both targets, within
    shared memory, on tensor cores for 16-bit operands (wgmma on sm_90 with 64-row blocks) and
    FMA for IEEE fp32."""
    pytest.importorskip("triton")
    jobs = [{"kernel": "bsr_conv2d", "arch": arch, "dtype": dtype, "index": "i32", "num_warps": 4, "num_stages": 3,
             "constexprs": {"HAS_BIAS": True, "BR": br, "BC": bc, "BLOCK_P": 64, "DOT_PRECISION": "ieee"}}
            for arch in ARCHS for dtype in DTYPES for br, bc in ((16, 16), (32, 32), (64, 64), (128, 32))]
    results = _run(jobs)
    assert len(results) == len(jobs)
    for r in results:
        what = f"bsr_conv2d sm_{r['arch']} {r['dtype']} {r['constexprs']}"
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], what
        if r["dtype"] == "fp32":
            assert not (r["mma_sync"] or r["wgmma"]), f"{what}: IEEE fp32 used tensor cores"
        elif r["arch"] == 90 and r["constexprs"]["BR"] >= 64:
            assert r["wgmma"], f"{what}: no wgmma"
        else:
            assert r["mma_sync"] or r["wgmma"], f"{what}: no tensor-core mma"


def test_exhaustive_compile():
    """Every surviving BSR config x block shape x dtype x arch, and every CSR config with
    int64 indices and the linear layout; the same for the SDDMM kernels."""
    from sparse_lth.kernels.csr import CSR_CONFIGS
    from sparse_lth.kernels.sddmm import CSR_SDDMM_CONFIGS

    jobs = [_bsr_job(arch, dtype, br, bc, c)
            for arch in ARCHS for dtype in DTYPES for br, bc in BLOCK_SHAPES
            for c in _surviving(arch, dtype, br, bc)]
    jobs += [_csr_job(arch, dtype, c, index="i64", x_t=True)
             for arch in ARCHS for dtype in DTYPES for c in CSR_CONFIGS]
    jobs += [_bsr_sddmm_job(arch, dtype, br, bc, c)
             for arch in ARCHS for dtype in DTYPES for br, bc in BLOCK_SHAPES
             for c in _surviving_sddmm(arch, dtype, br, bc)]
    jobs += [_csr_sddmm_job(arch, dtype, c, index="i64")
             for arch in ARCHS for dtype in DTYPES for c in CSR_SDDMM_CONFIGS]
    _check(_run(jobs))


# --- the Hopper evidence (issue 10): buffers, bulk copies, no duplicate configs, no spills -------

TMA_SHAPES = ((64, 64), (128, 128), (128, 32), (32, 32))


def _stage_bytes(r: dict) -> int:
    k = r["constexprs"]
    return (k["BR"] * k["BC"] + k["BC"] * k["BLOCK_N"]) * ELEM_BYTES[r["dtype"]]


def _distinct_code(results: list[dict]) -> None:
    """Configs that differ in anything but the grid (WAVES) must compile to different PTX:
    two alike would spend the autotuner's time on one kernel twice."""
    groups: dict[tuple, dict[str, tuple]] = {}
    for r in results:
        k = r["constexprs"]
        group = groups.setdefault((r["kernel"], r["dtype"], k["BR"], k["BC"], k["X_T"]), {})
        config = (k["BLOCK_N"], r["num_warps"], r["num_stages"])
        twin = groups[(r["kernel"], r["dtype"], k["BR"], k["BC"], k["X_T"])].get(r["ptx_hash"])
        assert twin in (None, config), f"{r['kernel']} {k}: configs {twin} and {config} compile alike"
        group[r["ptx_hash"]] = config


@pytest.fixture(scope="module")
def hopper() -> list[dict]:
    """sm_90 compiles of both BSR kernels: every config the launch keeps for a wide N, fp16,
    each block shape; the largest one per dtype; the linear layout; SASS for all of them."""
    pytest.importorskip("triton")
    from sparse_lth.kernels.bsr import BSR_CONFIGS, prune_bsr_configs
    from sparse_lth.kernels.bsr_tma import TMA_CONFIGS, prune_tma_configs, tma_shared_bytes

    jobs = []
    for br, bc in TMA_SHAPES:
        for c in prune_tma_configs(TMA_CONFIGS, 4096, br, bc, 2, SMEM_LIMIT[90]):
            jobs.append(_bsr_tma_job(90, "fp16", br, bc, c, sass=True))
        for c in prune_bsr_configs(BSR_CONFIGS, 4096, br, bc, 2, SMEM_LIMIT[90]):
            jobs.append({**_bsr_job(90, "fp16", br, bc, c), "sass": True})
        for dtype in ("bf16", "fp32"):
            kept = prune_tma_configs(TMA_CONFIGS, 4096, br, bc, ELEM_BYTES[dtype], SMEM_LIMIT[90])
            big = max(kept, key=lambda c: tma_shared_bytes(c, br, bc, ELEM_BYTES[dtype]))
            jobs.append(_bsr_tma_job(90, dtype, br, bc, big, sass=True,
                                     precision="tf32" if dtype == "fp32" else "ieee"))
        mid = prune_tma_configs(TMA_CONFIGS, 128, br, bc, 2, SMEM_LIMIT[90])[0]
        jobs.append(_bsr_tma_job(90, "bf16", br, bc, mid, x_t=True, sass=True))
    return _run(jobs)


def test_tma_bsr_copies_by_tensor_descriptor_into_wgmma(hopper):
    """Every TMA config: bulk tensor copies, wgmma for 16-bit / tf32 blocks of 64 rows or more,
    at least 2 shared buffers, shared memory equal to tma_shared_bytes (the launcher's pruning)
    within its barrier bytes, no local-memory spills."""
    from sparse_lth.kernels.bsr_tma import tma_buffers, tma_shared_bytes

    tma = [r for r in hopper if r["kernel"] == "bsr_tma"]
    assert len(tma) >= 20
    for r in tma:
        k = r["constexprs"]
        what = f"bsr_tma {r['dtype']} {k} warps={r['num_warps']} stages={r['num_stages']}"
        assert r["tma"] >= 2, f"{what}: no cp.async.bulk.tensor"
        assert r["spills"] == 0, f"{what}: {r['spills']} local-memory accesses in SASS"
        if k["BR"] >= 64 and (r["dtype"] != "fp32" or k["DOT_PRECISION"] == "tf32"):
            assert r["wgmma"] and r["hgmma"], f"{what}: no wgmma / HGMMA"
            config = triton.Config(dict(k), num_warps=r["num_warps"], num_stages=r["num_stages"])
            estimate = tma_shared_bytes(config, k["BR"], k["BC"], ELEM_BYTES[r["dtype"]])
            assert r["shared"] <= estimate <= r["shared"] + 128, f"{what}: {r['shared']} vs {estimate}"
            assert r["shared"] >= tma_buffers(r["num_stages"]) * _stage_bytes(r) >= 2 * _stage_bytes(r)
        assert r["shared"] <= SMEM_LIMIT[90]
    _distinct_code(tma)


def test_cp_async_bsr_pipelines_with_two_buffers_and_no_twins(hopper):
    """The cp.async BSR kernel (sm_80, and Hopper operands TMA cannot take): every config the
    launch keeps compiles to distinct code without spills, its shared memory within the
    launcher's estimate, and for each block shape some kept config double-buffers the K loop
    (asynchronous copies into at least 2 buffers)."""
    from sparse_lth.kernels.bsr import bsr_shared_bytes

    cp = [r for r in hopper if r["kernel"] == "bsr"]
    for r in cp:
        k = r["constexprs"]
        config = triton.Config({"BLOCK_N": k["BLOCK_N"]}, num_warps=r["num_warps"],
                               num_stages=r["num_stages"])
        assert r["shared"] <= bsr_shared_bytes(config, k["BR"], k["BC"], 2), k
        assert r["spills"] == 0 and r["cp_async"] > 0, k
    for br, bc in TMA_SHAPES:
        shape = [r for r in cp if (r["constexprs"]["BR"], r["constexprs"]["BC"]) == (br, bc)]
        assert any(r["shared"] >= 2 * _stage_bytes(r) for r in shape), (br, bc)
        assert max(r["num_stages"] for r in shape) >= 5, (br, bc)
    wide = [r for r in cp if r["constexprs"]["BR"] >= 64]
    assert any(r["constexprs"]["BLOCK_N"] == 256 for r in wide)
    _distinct_code(cp)



if __name__ == "__main__":
    _main()
