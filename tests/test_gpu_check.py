"""bench/gpu_check.py, the one-command GPU proof, proven end to end on the CPU.

The dry run (``--dry-run``) runs the whole plan on tiny shapes with the Triton kernels under
TRITON_INTERPRET=1 in a subprocess (~30 s on 2 cores); these tests read what it leaves: the
JSON, the plots, the goal table printed last, and that every timed output was checked against
the dense product first. The numbers themselves mean nothing on the CPU and are not asserted.

The device image runs triton 3.6, CI triton 3.9: with ``GPU_CHECK_OTHER_TRITON`` naming a folder
that holds another triton package (``pip install --target DIR triton==3.6.0``; /work/tri36 is
used when it exists), the quick dry run is also run with that triton first on the path.
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
GOALS = 10  # rows of the goal table (kernels issue goals, plus torch's untuned BSR and the linear layout for reference)
DEVICE_CALL_LIMIT_S = 600  # the device tool's longest command


def _module():
    """gpu_check as a module (bench/ is no package); importing it imports no torch or triton."""
    name = "_gpu_check_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up by name
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _dry_run(out: Path, *extra: str, pythonpath: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it
    env["PYTHONUNBUFFERED"] = "1"
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--dry-run", "--budget", "150", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"dry run failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    return _dry_run(tmp_path_factory.mktemp("gpu_check"))


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
    ours = [r for r in recs if r["backend"] in ("ours", "module")]
    assert ours and all(r["verified"] and r["ms"] for r in ours)
    assert {r["layout"] for r in ours} == {"bsr", "csr"}
    assert {r["dtype"] for r in ours} >= {"fp16", "bf16", "fp32"}
    assert {r["phase"] for r in ours} >= {"headline_bsr", "headline_csr", "headline_decode", "linear"}
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


def test_rows_peer_times_the_row_kernel_where_auto_picks_another(dry_run):
    """"rows" (path="rows") runs beside ours at BSR decode and headline_bsr points where the
    automatic choice (ours' meta["path"]) is another kernel, verified and timed like ours; where
    auto picks the row kernel itself there is no rows record."""
    stdout, _, data = dry_run
    recs = data["records"]
    ours = {(r["op"], r["phase"], r["block"], r["dtype"], r["M"], r["K"], r["N"], r["density"]): r
            for r in recs if r["backend"] == "ours" and r["layout"] == "bsr"}
    assert ours and all(r["meta"]["path"] in ("decode", "tma", "rows") for r in ours.values())
    assert {r["meta"]["path"] for r in ours.values()} >= {"decode", "rows"}
    rows = [r for r in recs if r["backend"] == "rows"]
    assert {r["phase"] for r in rows} >= {"headline_bsr", "headline_decode", "sweep_decode"}
    assert {r["N"] for r in rows if r["phase"] == "headline_decode"} >= {1, 8}
    for r in rows:
        assert r["layout"] == "bsr" and r["verified"] and r["ms"] and r["copies"] and r["speedup_vs_dense"], r
        assert r["bw_fraction"] is not None or r["N"] > 16, r
        mate = ours[(r["op"], r["phase"], r["block"], r["dtype"], r["M"], r["K"], r["N"], r["density"])]
        assert mate["meta"]["path"] != "rows" and mate["bytes"] == r["bytes"], (r, mate)
    assert sum(1 for r in ours.values() if r["meta"]["path"] != "rows" and r["phase"] in (
        "headline_bsr", "headline_decode", "sweep_decode")) == len(rows)
    assert re.search(r"\| ours\(decode\) \S+us .*\| rows \S+us \S+x \S+bw R\d+", stdout)


def test_linear_layout_is_measured_against_f_linear(dry_run):
    """The SparseLinear layout: ours and the layer's forward, both layouts, decode and wide N,
    each against its own dense F.linear (not the W @ X dense figure), with a row in the table."""
    stdout, _, data = dry_run
    lin = [r for r in data["records"] if r["op"] == "linear"]
    for backend in ("ours", "module"):
        mine = [r for r in lin if r["backend"] == backend]
        assert {r["layout"] for r in mine} == {"bsr", "csr"}, backend
        assert {r["N"] for r in mine} >= {1, 16, 32}, backend
        assert all(r["verified"] and r["speedup_vs_dense"] for r in mine), backend
    dense = {(r["M"], r["K"], r["N"]) for r in lin if r["backend"] == "dense" and r["verified"]}
    assert {(r["M"], r["K"], r["N"]) for r in lin} <= dense
    table = stdout[stdout.index("SparseLinear layout, x @ W.T"):stdout.index("\ngoal ")]
    rows = [ln for ln in table.splitlines()[1:] if ln.strip() and not ln.startswith("-")]
    assert len(rows) == sum(1 for r in lin if r["backend"] == "ours")


def test_every_timed_call_rotated_operand_copies(dry_run):
    """R copies per point, from the L2 rule (a CPU stand-in here), recorded for dense and sparse."""
    gc = _module()
    _, _, data = dry_run
    rot = data["info"]["rotation"]
    timed = [r for r in data["records"] if r["ms"] is not None]
    assert {r["backend"] for r in timed} >= {"ours", "dense", "module"}
    for r in timed:
        assert r["copies"] == gc.copies_for(r["bytes"], rot["l2_stand_in"], 1 << 30, rot["max_copies"]), r
        assert r["meta"]["rotated_bytes"] == r["copies"] * r["bytes"], r
    assert max(r["copies"] for r in timed) > 1


def test_copies_cover_the_l2_for_small_and_large_problems():
    gc = _module()
    l2, free = 50 << 20, 80 << 30
    for call_bytes in (1 << 20, 3 << 20, 32 << 20, 49 << 20, 200 << 20):
        r = gc.copies_for(call_bytes, l2, free, 4096)
        assert r * call_bytes >= gc.L2_TIMES * l2  # a 1 MB CSR call as a 32 MB dense one
        assert r == 1 or (r - 1) * call_bytes < gc.L2_TIMES * l2  # no more than needed
    assert gc.copies_for(1 << 20, l2, free, 64) == 64  # the graph's cap
    assert gc.copies_for(1 << 30, l2, 2 << 30, 4096) == 1  # memory caps, never below one copy
    assert gc.copies_for(1 << 20, l2, 40 << 20, 4096) == 10  # a quarter of 40 MiB free


def test_tuner_flag_names_a_capped_or_untimed_tuner():
    gc = _module()
    assert gc.tuner_flag({"status": "ok", "trials": 31, "cap_reached": False}) == ""
    assert gc.tuner_flag({"status": "ok", "trials": 12, "cap_reached": True}) == "CAPPED"
    assert "NOT TIMED" in gc.tuner_flag({"status": "ok", "trials": 0, "cap_reached": False})


def test_a_capped_tuner_is_flagged_where_its_ratio_is_printed(tmp_path, capsys):
    """A figure against torch's tuned BSR whose tuner hit its time cap must not read as tuned."""
    import torch

    gc = _module()
    gc.torch = torch
    run = gc.Run(tmp_path, gc.parse_args(["--out", str(tmp_path)]), gc.Budget(380, 30), dry=False)
    run.scale, run.info = gc.GPU_SCALE, {"device": "test", "l2_bytes": 50 << 20}
    point = dict(phase="headline_bsr", layout="bsr", block=64, dtype="fp16", M=4096, K=4096, N=4096,
                 density=0.1, density_actual=0.1, status="ok", verified=True, copies=3)
    run.records = [gc.Record(backend="ours", ms=0.044, **point),
                   gc.Record(backend="torch_bsr_tuned", ms=0.061, **point)]
    for capped, trials in ((False, 30), (True, 14)):
        run.tuned = [{"block": 64, "dtype": "fp16", "M": 4096, "K": 4096, "N": 4096, "status": "ok",
                      "trials": trials, "seconds": 25.0, "cap_reached": capped}]
        run.tuned[0]["flag"] = gc.tuner_flag(run.tuned[0])
        gc.compute_goals(run)
        gc.print_table(run)
        row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("BSR 90% (32, 64): >= 1.2x"))
        assert " 1.39x  PASS " in row
        assert ("CAPPED: partly tuned" in row) == capped, row


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


def test_gpu_plan_puts_the_goal_points_first_then_the_linear_layout_then_the_sweep():
    gc = _module()
    plan = gc.build_plan(gc.GPU_SCALE, quick=False, dry=False)
    phases = [p.phase for p in plan]
    first_linear, first_sweep = phases.index("linear"), phases.index("sweep")
    assert all(ph.startswith("headline") for ph in phases[:first_linear])
    assert set(phases[first_linear:first_sweep]) == {"linear"}
    assert all(ph.startswith("sweep") for ph in phases[first_sweep:])
    head = plan[:first_linear]
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
    assert all(p.op == "matmul" for p in plan if p.phase != "linear")
    lin = plan[first_linear:first_sweep]
    assert all(p.op == "linear" and "module" in p.backends and "dense" in p.backends for p in lin)
    for layout in ("bsr", "csr"):
        assert {(p.M, p.K, p.N) for p in lin if p.layout == layout} >= {
            (8192, 8192, 1), (8192, 8192, 16), (4096, 16384, 1), (4096, 16384, 16)}
    assert max(p.N for p in lin if p.layout == "bsr") == 4096 and max(p.N for p in lin if p.layout == "csr") == 256
    quick = gc.build_plan(gc.GPU_SCALE, quick=True, dry=False)
    assert quick == head
    # The row kernel beside ours at BSR decode and headline_bsr points (run_point drops it where
    # auto picks that kernel); decode N 1 and 16 (the goal's) on every shape before 4 and 8.
    for p in plan:
        assert ("rows" in p.backends) == (p.layout == "bsr" and p.phase in (
            "headline_bsr", "headline_decode", "sweep_decode")), p
    dec_ns = [p.N for p in head if p.phase == "headline_decode"]
    assert set(dec_ns) == {1, 4, 8, 16} and max(i for i, n in enumerate(dec_ns) if n in (1, 16)) < dec_ns.index(4)
    assert {p.N for p in plan if p.phase == "sweep_decode"} == {1, 4, 8, 16}


def test_failed_test_ids_are_read_from_pytest_lines():
    gc = _module()
    bsr, lin = "tests/test_triton_kernels.py::test_bsr[fp16-64]", "tests/test_modules.py::test_linear[cuda]"
    lines = {
        f"[gw3] [ 41%] FAILED {bsr} ": bsr,
        f"{lin} FAILED                      [ 20%]": lin,
        f"{lin} ERROR": lin,
        "FAILED tests/test_modules.py::test_x - AssertionError: assert 1 == 2": "tests/test_modules.py::test_x",
        "ERROR tests/test_triton_kernels.py - ImportError: no triton": "tests/test_triton_kernels.py",
        "[gw0] [  1%] PASSED tests/test_modules.py::test_error_path": None,
        "tests/test_modules.py::test_failed_input PASSED [ 50%]": None,
        "E       RuntimeError: ERROR kernels/bsr.py:12 bad": None,
        "========= 1 failed, 138 passed in 47.66s =========": None,
    }
    for line, want in lines.items():
        assert gc.failed_test_id(line) == want, line


def test_failing_test_ids_survive_a_pytest_that_hangs_and_is_killed(tmp_path, monkeypatch, capsys):
    """The last GPU run's pytest hung in teardown and was killed with its summary: the ids of
    the tests that failed are read from the per-test lines as they stream, into the JSON and
    the table's tests line."""
    gc = _module()
    test_file = tmp_path / "test_hang.py"
    test_file.write_text(
        "import signal, time\nimport pytest\n\n"
        "@pytest.fixture(scope='session', autouse=True)\ndef hang():\n    yield\n"
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)  # deaf to the ^C at the cap\n    time.sleep(120)\n\n"
        "def test_passes():\n    pass\n\ndef test_fails():\n    assert False\n")
    monkeypatch.setattr(gc, "TEST_FILES", (str(test_file),))
    monkeypatch.setattr(gc, "TESTS_GRACE_S", 1.0)
    out = tmp_path / "out"
    out.mkdir()
    run = gc.Run(out, gc.parse_args(["--out", str(out), "--tests-s", "3"]), gc.Budget(380, 30), dry=False)
    run.scale = gc.GPU_SCALE
    gc.run_tests(run, aliased=False)
    assert run.tests["interrupted_at_cap"] and run.tests["seconds"] < 60
    assert [t.rsplit("/", 1)[-1] for t in run.tests["failed"]] == ["test_hang.py::test_fails"]
    assert json.loads((out / "results.json").read_text())["tests"]["failed"] == run.tests["failed"]
    assert "test_hang.py::test_fails" in (out / "tests.txt").read_text()
    gc.print_table(run)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tests: "))
    assert line.endswith(f"failed: {run.tests['failed'][0]}"), line


def test_docstring_holds_the_device_command_with_room_for_the_budget():
    """The one-call command's timeout holds the script's whole default budget plus the install
    and a margin, inside the device tool's limit; the budget itself is the issue's 380 s."""
    gc = _module()
    m = re.search(r'run\(command=".*python3? bench/gpu_check\.py --out \$OUT.*", timeout_s=(\d+)\)', gc.__doc__)
    assert m
    timeout = int(m.group(1))
    assert gc.DEFAULT_BUDGET_S <= 380
    assert gc.DEFAULT_BUDGET_S + 60 <= timeout <= DEVICE_CALL_LIMIT_S
    args = gc.parse_args(["--out", "x"])
    assert args.budget == gc.DEFAULT_BUDGET_S and not args.skip_tests
    assert gc.parse_args(["--out", "x", "--skip-tests"]).skip_tests


def _other_triton() -> str | None:
    path = os.environ.get("GPU_CHECK_OTHER_TRITON") or ("/work/tri36" if Path("/work/tri36/triton").is_dir() else "")
    return path if path and (Path(path) / "triton" / "__init__.py").is_file() else None


@pytest.mark.skipif(_other_triton() is None, reason="no other triton (set GPU_CHECK_OTHER_TRITON)")
def test_quick_dry_run_passes_with_the_other_triton(tmp_path):
    """Triton 3.6 (the device image's) under the interpreter: its autotuner asks for a GPU
    driver to time even one config, and its interpreter trips over NumPy 2.4; both handled."""
    pytest.importorskip("triton")
    path = _other_triton()
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": path}, timeout=120).stdout.strip()
    _, _, data = _dry_run(tmp_path, "--quick", "--skip-tests", pythonpath=path)
    assert data["info"]["triton"] == version
    ours = [r for r in data["records"] if r["backend"] == "ours"]
    assert {r["layout"] for r in ours} == {"bsr", "csr"}
    assert all(r["verified"] and r["ms"] for r in ours)
