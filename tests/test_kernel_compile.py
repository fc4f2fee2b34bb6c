"""Compile every Triton kernel for sm_90 (H100) and sm_80 (A100) without a GPU.

Checks what only the compiled code shows: the fp16 / bf16 BSR dots (the product and the SDDMM
weight gradient) run on tensor cores (``wgmma`` on sm_90 when the block has >= 64 rows, or
in the BSR row kernel when its tile has >= 64 columns of X,
``mma.sync`` otherwise), and every autotune config's shared memory (compiled metadata
``shared``) fits the device's per-program limit after pruning, and never exceeds the
launcher's estimate that pruning relies on.

The compiles run through kernels/compiled.py (a subprocess with TRITON_INTERPRET off, which the
conftest turns on for the kernel tests, and a fresh Triton cache); it also reads the facts
asserted here off the PTX and SASS.

The default set (``_default_jobs``, ~180 compiles, half of them the SDDMM kernels) takes about
40 s on 2 cores; the exhaustive sweep (every config x block shape x dtype x arch, ~860
compiles) about 3 to 4 minutes. CI runs both.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

# Per-program opt-in shared memory (cudaDevAttrMaxSharedMemoryPerBlockOptin): 227 KB on H100
# (228 KB per SM less 1 KB the driver keeps), 163 KB on A100.
SMEM_LIMIT = {90: 232448, 80: 166912}
ARCHS = (90, 80)
DTYPES = ("fp32", "fp16", "bf16")
ELEM_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
BLOCK_SHAPES = ((16, 16), (32, 32), (64, 64), (128, 128), (16, 128), (128, 32))


from sparse_lth.kernels.compiled import job  # noqa: E402


def _run(jobs: list[dict]) -> list[dict]:
    """Compile ``jobs`` (kernels/compiled.py: a subprocess, interpreter off, fresh cache)."""
    from sparse_lth.kernels.compiled import compile_jobs

    return compile_jobs(jobs)


def _bsr_job(arch, dtype, br, bc, config, index="i32", x_t=False, precision="ieee") -> dict:
    return job("bsr", config, {"BR": br, "BC": bc, "X_T": x_t, "Y_T": x_t,
                               "DOT_PRECISION": precision, "UPCAST": False},
               arch=arch, dtype=dtype, index=index)


def _bsr_tma_job(arch, dtype, br, bc, config, x_t=False, precision="ieee", sass=False) -> dict:
    return job("bsr_tma", config, {"BR": br, "BC": bc, "X_T": x_t, "Y_T": x_t,
                                   "DOT_PRECISION": precision, "UPCAST": False},
               arch=arch, dtype=dtype, sass=sass)


def _csr_job(arch, dtype, config, index="i32", x_t=False, aligned=False, **extra) -> dict:
    return job("csr", config, {"X_T": x_t, "Y_T": x_t, "ALIGNED": aligned},
               arch=arch, dtype=dtype, index=index, **extra)


def _bsr_sddmm_job(arch, dtype, br, bc, config, index="i32", precision="ieee") -> dict:
    return job("bsr_sddmm", config, {"BR": br, "BC": bc, "DOT_PRECISION": precision,
                                     "UPCAST": False}, arch=arch, dtype=dtype, index=index)


def _csr_sddmm_job(arch, dtype, config, index="i32") -> dict:
    return job("csr_sddmm", config, arch=arch, dtype=dtype, index=index)


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
        if tensor_cores and r["arch"] == 90 and _wgmma_tile(r):
            assert r["wgmma"], f"{what}: no wgmma in the PTX"
        elif tensor_cores:
            assert r["mma_sync"] or r["wgmma"], f"{what}: no tensor-core mma in the PTX"
        else:  # IEEE fp32 is FMA: must not silently use tf32 tensor cores
            assert not (r["mma_sync"] or r["wgmma"]), f"{what}: fp32 ieee used tensor cores"


def test_bsr_and_csr_compile_for_sm90_and_sm80(compiled):
    assert {r["arch"] for r in compiled} == set(ARCHS)
    assert {r["kernel"] for r in compiled} == {"bsr", "csr", "bsr_sddmm", "csr_sddmm"}
    _check(compiled)


def _wgmma_tile(r: dict) -> bool:
    """Whether the dot's rows reach wgmma's 64: the block's rows, or, in the BSR row kernel
    from BLOCK_N 64 on, X's columns (its dot swapped for blocks under 64 rows)."""
    k = r["constexprs"]
    return k["BR"] >= 64 or (r["kernel"] == "bsr" and k["BLOCK_N"] >= 64)


@pytest.mark.parametrize("kernel", ["bsr", "bsr_sddmm"])
def test_fp16_bsr_uses_wgmma_on_hopper(compiled, kernel):
    hits = [r for r in compiled if r["kernel"] == kernel and r["arch"] == 90
            and r["dtype"] in ("fp16", "bf16") and _wgmma_tile(r)]
    assert hits and all(r["wgmma"] for r in hits)
    if kernel == "bsr":  # blocks of 16 and 32 rows among them
        assert any(r["constexprs"]["BR"] < 64 for r in hits)


def test_every_bsr_block_shape_keeps_a_config():
    from sparse_lth.kernels.sddmm import bsr_sddmm_shared_bytes

    for arch in ARCHS:
        for dtype in DTYPES:
            for br, bc in BLOCK_SHAPES:
                assert _surviving(arch, dtype, br, bc), (arch, dtype, br, bc)
                assert all(bsr_sddmm_shared_bytes(c, br, bc, ELEM_BYTES[dtype])
                           <= SMEM_LIMIT[arch] for c in _surviving_sddmm(arch, dtype, br, bc))


def test_block_sparse_conv_compiles_for_sm90_and_sm80_on_tensor_cores():
    """kernels/conv.py with the launch ``conv_launch`` gives each block shape, dtype and output
    format (3x3, stride 1, channel counts multiples of 16): within shared memory on both
    targets; 16-bit operands on tensor cores (wgmma on sm_90 for every block shape, pixels being
    the dot's 64 or 128 rows; HGMMA in its SASS) with the input's channels arriving in 16-byte
    asynchronous copies and never as 2-byte loads; fp32 on FMA (IEEE) or tensor cores (TF32);
    no spills on sm_90."""
    pytest.importorskip("triton")
    from sparse_lth.kernels.conv import conv_launch

    geometry = {"KW": 3, "SH": 1, "SW": 1, "PH": 1, "PW": 1, "DH": 1, "DW": 1, "HAS_BIAS": True, "EVEN_C": True}
    jobs = [job("bsr_conv2d", conv_launch(br, bc, ELEM_BYTES[dtype], 32 * 56 * 56, SMEM_LIMIT[arch],
                                          tensor_cores=dtype != "fp32" or precision == "tf32"),
                {**geometry, "BR": br, "BC": bc, "OUT_CHANNELS_LAST": out_nhwc, "DOT_PRECISION": precision},
                arch=arch, dtype=dtype, sass=arch == 90, aligned=("C", "O"))
            for arch in ARCHS for dtype in DTYPES for br, bc in ((16, 16), (32, 32), (64, 64), (128, 32))
            for out_nhwc in (True, False) for precision in (("ieee", "tf32") if dtype == "fp32" else ("ieee",))]
    results = _run(jobs)
    assert len(results) == len(jobs)
    for r in results:
        what = f"bsr_conv2d sm_{r['arch']} {r['dtype']} {r['constexprs']}"
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], what
        if r["arch"] == 90:
            assert r["spills"] == 0, f"{what}: {r['spills']} local-memory accesses"
            assert r["hgmma"] == r["wgmma"], f"{what}: wgmma in the PTX but not in the SASS"
        tensor_cores = r["dtype"] != "fp32" or r["constexprs"]["DOT_PRECISION"] == "tf32"
        if not tensor_cores:
            assert not (r["mma_sync"] or r["wgmma"]), f"{what}: IEEE fp32 used tensor cores"
        elif r["arch"] == 90:
            assert r["wgmma"], f"{what}: no wgmma"
        else:
            assert r["mma_sync"], f"{what}: no tensor-core mma"
        if r["dtype"] != "fp32":
            assert r["ld_2byte"] == 0 and r["cp_async16"] > 0, f"{what}: channels not loaded 16 bytes at a time"


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


def _decode_jobs() -> list[dict]:
    """bsr_decode for both targets and dtypes: 64 x 64 and 16 x 128 blocks, N = 1 and 16, both
    layouts, the first config its pruning keeps; every kept config for 64 x 64 blocks where some
    spilled (fp16 at N = 16, fp32 at N = 4)."""
    from sparse_lth.kernels.bsr_decode import DECODE_CONFIGS, SEARCH, decode_configs

    def decode_job(arch, dtype, br, bc, np_, x_t, c):
        return job("bsr_decode", c, {"BR": br, "BC": bc, "NP": np_, "VEC": 16 // ELEM_BYTES[dtype],
                                     "X_T": x_t, "Y_T": x_t, "SEARCH": SEARCH},
                   arch=arch, dtype=dtype, sass=True, unaligned=["N"])  # decode's N is 1 .. 16

    jobs = [decode_job(arch, dtype, br, bc, np_, x_t,
                decode_configs(DECODE_CONFIGS, np_, br, bc, ELEM_BYTES[dtype])[0])
            for arch in ARCHS for dtype in ("fp16", "bf16")
            for br, bc in ((64, 64), (16, 128)) for np_, x_t in ((1, False), (16, True))]
    jobs += [decode_job(90, "fp32", 64, 64, 1, False,
                 decode_configs(DECODE_CONFIGS, 1, 64, 64, 4)[0])]
    jobs += [decode_job(90, dtype, 64, 64, np_, x_t, c)
             for dtype, np_ in (("fp16", 16), ("fp32", 4)) for x_t in (False, True)
             for c in decode_configs(DECODE_CONFIGS, np_, 64, 64, ELEM_BYTES[dtype])]
    return jobs


def test_bsr_decode_streams_values_in_16_byte_loads():
    """The decode kernel (N <= 16): 16-byte loads of the stored values, split rows joined
    through one integer counter atomic (no float atomics), no matrix unit, no spills on sm_90."""
    results = _run(_decode_jobs())
    for r in results:
        k = r["constexprs"]
        what = f"bsr_decode sm_{r['arch']} {r['dtype']} {k} warps={r['num_warps']}"
        assert r["ld16"] > 0, f"{what}: no 16-byte loads"
        assert r["atomics"] > 0, f"{what}: no arrival counter"
        assert not (r["wgmma"] or r["mma_sync"]), f"{what}: a matrix unit for a GEMV"
        if r["arch"] == 90:  # the target this is tuned for (sm_80 spills a few words at N = 16)
            assert r["spills"] == 0, f"{what}: {r['spills']} local-memory accesses"
        assert r["shared"] <= SMEM_LIMIT[r["arch"]], what



def test_padded_csr_streams_indices_and_values_in_16_byte_loads_pipelined():
    """kernels/csr.py on a PaddedCSR (rows padded to 8, ALIGNED): in the decode configs
    (BLOCK_N 1 and 4) the column-index and value streams are 16-byte vector loads (8-byte for
    fp16 values at BLOCK_N 4: 2 values x 4 rows a thread), loaded one iteration ahead of their
    use (software-pipelined), with no spills; the same kernel on an unpadded CSR keeps scalar
    loads (what the padding buys)."""
    from collections import Counter

    from ptx_streams import loop_carried, stream_loads
    from sparse_lth.kernels.csr import CSR_CONFIGS

    decode = [c for c in CSR_CONFIGS if c.kwargs["BLOCK_N"] in (1, 4)]
    jobs = [_csr_job(90, dtype, c, index=index, x_t=x_t, aligned=True, keep_ptx=True, sass=True)
            for c in decode for dtype in DTYPES for index in ("i32", "i64")
            for x_t in (False, True) if x_t or dtype != "bf16"]
    jobs += [_csr_job(90, "fp16", c, keep_ptx=True) for c in decode if c.kwargs["BLOCK_N"] == 1]
    for r in _run(jobs):
        k = r["constexprs"]
        what = f"csr sm_90 {r['dtype']} {r['index']} {k} warps={r['num_warps']}"
        streams = Counter(stream_loads(r["ptx"], r["args"]))
        widths = {s: {w for (s2, w) in streams if s2 == s} for s in ("col", "val")}
        if not k["ALIGNED"]:
            assert all(w.startswith("v1.") for s in ("col", "val") for w in widths[s]), what
            continue
        wide = "v2.b64" if r["index"] == "i64" else "v4.b32"
        assert widths["col"] == {wide}, f"{what}: col loads {widths['col']}"
        values = ({"v2.b32"} if k["BLOCK_N"] == 4 and r["dtype"] != "fp32" else {"v4.b32"})
        assert widths["val"] == values, f"{what}: value loads {widths['val']}"
        carried = loop_carried(r["ptx"], r["args"])
        assert carried.get("col") and carried.get("val"), f"{what}: not pipelined {carried}"
        assert r["spills"] == 0, f"{what}: {r['spills']} local-memory accesses"


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


