"""bench/gpu_check.py, the one-command GPU proof, proven end to end on the CPU.

The dry run (``--dry-run``) runs the whole plan on tiny shapes with the Triton kernels under
TRITON_INTERPRET=1 in a subprocess (~20 s on 2 cores); these tests read what it leaves: the
JSON, the plots, the goal table printed last, and that every timed output was checked against
the dense product first. The numbers themselves mean nothing on the CPU and are not asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
GOALS = 9  # rows of the goal table (kernels issue goals, plus torch's untuned BSR for reference)


def _module():
    """gpu_check as a module (bench/ is no package); importing it imports no torch or triton."""
    name = "_gpu_check_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up by name
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--dry-run", "--budget", "150"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"dry run failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, out, json.loads((out / "results.json").read_text())


def test_dry_run_writes_few_simple_files(dry_run):
    _, out, _ = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
    names = {p.name for p in files}
    assert {"results.json", "tests.txt"} <= names
    if importlib.util.find_spec("matplotlib") is not None:
        assert {"speedup.png", "decode.png"} <= names
        for name in ("speedup.png", "decode.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_records_the_context(dry_run):
    _, _, data = dry_run
    info = data["info"]
    assert info["dry_run"] is True and info["TRITON_INTERPRET"] == "1"
    for key in ("device", "date", "torch", "triton", "python", "version_checks"):
        assert info.get(key), key
    assert data["tests"]["rc"] == 0 and "collected" in data["tests"]["summary"]
    assert data["ceilings"]["copy_GBps"] > 0
    for r in data["records"]:
        for key in ("layout", "dtype", "M", "K", "N", "density", "backend", "status"):
            assert r[key] is not None, (key, r)


def test_every_timed_output_was_verified(dry_run):
    _, _, data = dry_run
    recs = data["records"]
    timed = [r for r in recs if r["ms"] is not None]
    assert timed
    for r in timed:
        assert r["verified"] and r["status"] == "ok", r
        assert r["rel_err"] is not None and r["rel_err"] <= r["tol"], r
    ours = [r for r in recs if r["backend"] == "ours"]
    assert ours and all(r["verified"] and r["ms"] for r in ours)
    assert {r["layout"] for r in ours} == {"bsr", "csr"}
    assert {r["dtype"] for r in ours} >= {"fp16", "bf16", "fp32"}
    assert {r["phase"] for r in ours} >= {"headline_bsr", "headline_csr", "headline_decode"}
    assert all(r["bw_fraction"] is not None for r in ours if r["N"] <= 16)
    assert all(r["speedup_vs_dense"] for r in ours)
    # The CUDA-only peers are named and skipped, not silently dropped; torch's CSR product runs
    # on the CPU in fp32 (MKL) and its refusal of fp16 / bf16 is recorded, not raised.
    for peer in ("torch_bsr", "torch_bsr_tuned"):
        statuses = {r["status"] for r in recs if r["backend"] == peer}
        assert statuses and all(s.startswith("skipped") for s in statuses), (peer, statuses)
    csr_peer = [r for r in recs if r["backend"] == "cusparse"]
    assert any(r["ms"] and r["verified"] for r in csr_peer if r["dtype"] == "fp32")
    assert all(r["status"].startswith("refused") for r in csr_peer if r["dtype"] != "fp32")


def test_goal_table_is_printed_last(dry_run):
    stdout, _, data = dry_run
    assert len(data["goals"]) == GOALS
    assert all(g["result"] in ("PASS", "MISS", "n/a") for g in data["goals"])
    lines = stdout.rstrip().splitlines()
    assert lines[-1].startswith("=====")
    header = next(i for i, ln in enumerate(lines) if ln.startswith("goal "))
    rows = lines[header + 1:-1]
    assert len(rows) == GOALS
    assert all(re.search(r"\s(PASS|MISS|n/a)\s", row) for row in rows)
    assert "DRY RUN" in stdout


def test_gpu_plan_puts_the_headline_first_and_covers_the_sweep():
    gc = _module()
    plan = gc.build_plan(gc.GPU_SCALE, quick=False, dry=False)
    phases = [p.phase for p in plan]
    first_sweep = phases.index("sweep")
    assert all(ph.startswith("headline") for ph in phases[:first_sweep])
    assert not any(ph.startswith("headline") for ph in phases[first_sweep:])
    head = plan[:first_sweep]
    assert head[0].layout == "bsr" and head[0].block == 64 and head[0].density == 0.1
    assert (head[0].M, head[0].K, head[0].N) == (4096, 4096, 4096)
    assert {p.block for p in head if "torch_bsr_tuned" in p.backends} == {32, 64}
    assert {p.N for p in head if p.layout == "csr" and p.phase == "headline_csr"} == {1, 16, 128, 256}
    assert {(p.M, p.K) for p in head if p.phase == "headline_decode"} >= {(8192, 8192), (4096, 16384)}
    assert {p.block for p in plan if p.layout == "bsr"} == {16, 32, 64, 128}
    assert {p.dtype for p in plan} == {"fp16", "bf16", "fp32"}
    assert {p.N for p in plan if (p.M, p.K) == (4096, 4096)} >= {1, 16, 128, 1024, 4096}
    assert {p.density for p in plan} >= {0.5, 0.1, 0.05, 0.01}
    assert all(p.N <= 16 for p in plan if (p.M, p.K) != (4096, 4096))
    quick = gc.build_plan(gc.GPU_SCALE, quick=True, dry=False)
    assert quick == head


def test_docstring_holds_the_device_command():
    text = SCRIPT.read_text()
    assert re.search(r'run\(command=".*python3? bench/gpu_check\.py --out \$OUT.*", timeout_s=\d+\)', text)
