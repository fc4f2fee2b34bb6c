"""The command line: every error a user can cause is one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparse_lth import LotteryConfig, find_ticket, load_sparse, save_sparse
from sparse_lth import cli, heap
from sparse_lth.checkpoint import METADATA_KEY
from sparse_lth.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta")

SPARSE_LTH = Path(sys.executable).parent / "sparse-lth"
# A tiny search, and the same one spelled on the command line (same config, same run directory).
CONFIG = LotteryConfig(dataset="digits", rounds=1, iterations=40, eval_every=20, controls=())
SEARCH = ["search", "--dataset", "digits", "--rounds", "1", "--iterations", "40", "--eval-every", "20",
          "--controls", "", "--threads", "1"]


def one_error_line(capsys, argv) -> str:
    """Run the CLI expecting a user error: rc 2 and exactly one line on stderr, no traceback."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sparse-lth {argv[0]}: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return find_ticket(CONFIG, out, progress=False).run_dir


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A private copy of the finished run, under tmp_path/out/<run name>, to break at will."""
    copy = tmp_path / "out" / finished_run.name
    shutil.copytree(finished_run, copy)
    return copy


def test_run_copy_matches_the_cli_search(run, capsys):
    # The resume tests below rely on SEARCH naming the fixture's run: a rerun must just load it.
    assert main(SEARCH + ["--out", str(run.parent)]) == 0
    assert f"run directory: {run}" in capsys.readouterr().out


# -- broken run files ---------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 2)])


@pytest.mark.parametrize("rel,remedy", [
    ("round_01/mask.safetensors", "delete the folder {run}/round_01 to recompute that round"),
    ("round_01/trained.safetensors", "delete the folder {run}/round_01 to recompute that round"),
    ("round_01/record.json", "delete the folder {run}/round_01 to recompute that round"),
])
def test_convert_of_a_run_with_a_truncated_file(run, tmp_path, capsys, rel, remedy):
    _truncate(run / rel)
    line = one_error_line(capsys, ["convert", run, tmp_path / "t.safetensors"])
    assert f"{run / rel} is truncated" in line and line.endswith(remedy.format(run=run))
    assert not (tmp_path / "t.safetensors").exists()


@pytest.mark.parametrize("rel,remedy", [
    ("round_00/mask.safetensors", "delete the folder {run}/round_00 to recompute that round"),
    ("round_01/trained.safetensors", "delete the folder {run}/round_01 to recompute that round"),
    ("round_00/record.json", "delete the folder {run}/round_00 to recompute that round"),
    ("init.safetensors", "delete the run directory {run} to start that search over"),
])
def test_resumed_search_with_a_truncated_file(run, capsys, rel, remedy):
    _truncate(run / rel)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "run.lock"}
    line = one_error_line(capsys, SEARCH + ["--out", run.parent])
    assert f"{run / rel} is truncated" in line and line.endswith(remedy.format(run=run))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "run.lock"} == before  # nothing touched


def test_resumed_search_with_a_truncated_rewind_file(run, capsys):
    save_file({"w": torch.ones(100)}, str(run / "rewind.safetensors"))
    _truncate(run / "rewind.safetensors")
    line = one_error_line(capsys, SEARCH + ["--out", run.parent])
    assert f"{run / 'rewind.safetensors'} is truncated" in line


@pytest.mark.parametrize("edit,problem", [
    (lambda text: text[: len(text) // 2], "is truncated or not valid JSON"),
    (lambda text: json.dumps({**json.loads(text), "colour": "red"}),
     r"is not a valid run config (unknown LotteryConfig keys ['colour']"),
])
def test_resumed_search_with_a_broken_config(run, capsys, edit, problem):
    path = run / "config.json"
    path.write_text(edit(path.read_text()))
    line = one_error_line(capsys, SEARCH + ["--out", run.parent])
    assert f"{path} {problem}" in line


# -- destinations -------------------------------------------------------------------------------
@pytest.fixture
def dense_pt(tmp_path) -> Path:
    torch.save({"fc.weight": torch.randn(30, 20), "fc.bias": torch.randn(30)}, tmp_path / "dense.pt")
    return tmp_path / "dense.pt"


def test_convert_to_a_directory(dense_pt, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    line = one_error_line(capsys, ["convert", dense_pt, tmp_path / "dir"])
    assert f"{tmp_path / 'dir'} is a directory; name the file to write" in line


def test_convert_under_a_file(dense_pt, tmp_path, capsys):
    line = one_error_line(capsys, ["convert", dense_pt, dense_pt / "x.safetensors"])
    assert f"cannot write {dense_pt / 'x.safetensors'}: {dense_pt} is not a directory" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_convert_into_a_read_only_folder(dense_pt, tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    line = one_error_line(capsys, ["convert", dense_pt, tmp_path / "ro" / "x.safetensors"])
    assert "is not writable" in line


def _deny_writes_to(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only as os.access sees it (the tests run as root, who writes anywhere)."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == folder and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_convert_into_a_folder_denied_to_us(dense_pt, tmp_path, capsys, monkeypatch):
    (tmp_path / "ro").mkdir()
    _deny_writes_to(monkeypatch, tmp_path / "ro")
    line = one_error_line(capsys, ["convert", dense_pt, tmp_path / "ro" / "new" / "x.safetensors"])
    assert line.endswith(f"cannot write {tmp_path / 'ro' / 'new' / 'x.safetensors'}: {tmp_path / 'ro'} is not "
                         "writable; choose another destination")
    assert list((tmp_path / "ro").iterdir()) == []


def test_search_out_denied_to_us(tmp_path, capsys, monkeypatch):
    config_dir = tmp_path / "out" / CONFIG.run_name()
    config_dir.mkdir(parents=True)
    _deny_writes_to(monkeypatch, config_dir)
    line = one_error_line(capsys, SEARCH + ["--out", tmp_path / "out"])
    assert line.endswith(f"{config_dir} is not writable; choose a writable output folder (--out)")
    assert list(config_dir.iterdir()) == []


def test_search_out_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("")
    line = one_error_line(capsys, SEARCH + ["--out", tmp_path / "out"])
    assert f"{tmp_path / 'out'} exists and is not a directory" in line


def test_convert_refuses_to_overwrite_its_source(dense_pt, tmp_path, capsys):
    original = dense_pt.read_bytes()
    (tmp_path / "link.pt").symlink_to(dense_pt)
    os.link(dense_pt, tmp_path / "hard.pt")
    (tmp_path / "sub").mkdir()
    for dst in (dense_pt, tmp_path / "sub" / ".." / "dense.pt", tmp_path / "link.pt", tmp_path / "hard.pt",
                Path(os.path.relpath(dense_pt))):
        line = one_error_line(capsys, ["convert", dense_pt, dst])
        assert f"{dst} is the source {dense_pt} itself" in line
    assert dense_pt.read_bytes() == original


def test_convert_refuses_a_destination_inside_the_run_directory(run, capsys):
    for dst in (run / "ticket.safetensors", run / "round_01" / "x.safetensors", run / "new" / "x.safetensors"):
        line = one_error_line(capsys, ["convert", run, dst])
        assert f"{dst} is inside the run directory {run}" in line
        assert not dst.exists()


# -- sizes that would not fit -------------------------------------------------------------------
def test_convert_with_a_block_far_larger_than_the_weight(dense_pt, tmp_path, capsys):
    line = one_error_line(capsys, ["convert", dense_pt, tmp_path / "b.safetensors", "--format", "bsr",
                                   "--block", "1000000"])
    # fp32 padded weight + bool pattern + stored blocks: 9 bytes per padded entry
    assert f"padding 30x20 to whole 1000000x1000000 blocks" in line
    assert f"would need {9 * 10**12:,} bytes of memory, but only " in line and "use a smaller block" in line


def test_search_with_a_block_far_larger_than_a_layer(tmp_path, capsys):
    line = one_error_line(capsys, SEARCH + ["--block", "1000000x1000000", "--out", tmp_path])
    assert "in whole 1000000x1000000 tiles" in line and f"would need {13 * 10**12:,} bytes" in line
    (run_dir,) = tmp_path.iterdir()
    assert [p.name for p in run_dir.iterdir()] == ["run.lock"]  # refused before round 0 trained


def _declare_wider(src: Path, dst: Path, cols: int) -> Path:
    """Copy a sparse file, declaring its CSR weight ``cols`` wide (valid indices, tiny data)."""
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["tensors"]["fc.weight"]["shape"][1] = cols
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(meta)})
    return dst


def test_convert_of_a_file_declaring_far_more_than_it_stores(tmp_path, capsys):
    w = torch.zeros(6, 8)
    w[1, 2], w[4, 7] = 1.0, 2.0
    save_sparse({"fc.weight": w}, tmp_path / "good.safetensors")
    bomb = _declare_wider(tmp_path / "good.safetensors", tmp_path / "bomb.safetensors", 10**9)
    line = one_error_line(capsys, ["convert", bomb, tmp_path / "o.safetensors"])
    assert f"declares {6 * 10**9 * 4:,} bytes of dense tensors in a {bomb.stat().st_size:,}-byte file" in line
    assert f"over the limit of {2**30:,} bytes" in line and "--max-dense-bytes" in line
    wide = _declare_wider(tmp_path / "good.safetensors", tmp_path / "wide.safetensors", 100_000)
    line = one_error_line(capsys, ["convert", wide, tmp_path / "o.safetensors", "--max-dense-bytes", "100000"])
    assert "over the limit of 100,000 bytes" in line
    assert main(["convert", str(wide), str(tmp_path / "o.safetensors"), "--max-dense-bytes", "3000000"]) == 0
    assert load_sparse(tmp_path / "o.safetensors")["fc.weight"].shape == (6, 100_000)


# -- torch pickles ------------------------------------------------------------------------------
def test_convert_of_a_pickled_model(tmp_path, capsys):
    torch.save(nn.Sequential(nn.Linear(4, 3)), tmp_path / "model.pt")
    line = one_error_line(capsys, ["convert", tmp_path / "model.pt", tmp_path / "o.safetensors"])
    assert line.endswith(f"{tmp_path / 'model.pt'} holds pickled Python objects "
                         "(e.g. torch.nn.modules.container.Sequential), not a state dict of tensors; "
                         "save model.state_dict() instead")
    assert "weights_only" not in line and "add_safe_globals" not in line


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_convert_of_a_truncated_torch_file(tmp_path, capsys, legacy):
    torch.save(nn.Linear(40, 30).state_dict(), tmp_path / "full.pt", _use_new_zipfile_serialization=not legacy)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    line = one_error_line(capsys, ["convert", tmp_path / "cut.pt", tmp_path / "o.safetensors"])
    assert line.endswith(f"{tmp_path / 'cut.pt'}: not a readable torch state dict (truncated or corrupt?)")


def test_convert_of_a_pickle_never_runs_it(tmp_path, capsys):
    marker = tmp_path / "ran"
    (tmp_path / "evil.pt").write_bytes(  # pickle protocol 0: os.system("touch <marker>")
        f"cos\nsystem\n(V touch {marker}\ntR.".encode())
    line = one_error_line(capsys, ["convert", tmp_path / "evil.pt", tmp_path / "o.safetensors"])
    assert "evil.pt" in line and not marker.exists()


# -- the safety net in main ---------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied", "/somewhere/x.safetensors"),
    IsADirectoryError(21, "Is a directory", "/somewhere"),
    ValueError("a message\nspread over\n\n   lines"),
])
def test_main_prints_any_library_error_on_one_line(monkeypatch, capsys, error, tmp_path):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("sparse_lth.checkpoint.convert_checkpoint", fail)
    line = one_error_line(capsys, ["convert", tmp_path / "a.pt", tmp_path / "b.safetensors"])
    assert line.endswith(" ".join(str(error).split()))


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sparse_lth.checkpoint.convert_checkpoint", interrupted)
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors")]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv,message", [
    (["search", "--threads", "-1"], "sparse-lth search: error: argument --threads: expected a positive integer, "
                                    "got '-1' (see sparse-lth search --help)"),
    (["search", "--block", "0x3"], "argument --block: block must look like 32x32 or 16, got '0x3'"),
    (["convert"], "sparse-lth convert: error: the following arguments are required: src, dst"),
    (["bogus"], "sparse-lth: error: argument command: invalid choice: 'bogus'"),
])
def test_usage_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err and "usage:" not in err, err


@pytest.mark.parametrize("flag,message", [
    (["--weight-decay", "-1"], "weight_decay must be non-negative and finite, got -1.0"),
    (["--lr", "inf"], "lr must be positive and finite, got inf"),
])
def test_bad_training_settings_are_refused_before_training(tmp_path, capsys, flag, message):
    line = one_error_line(capsys, SEARCH + flag + ["--out", tmp_path])
    assert line.endswith(message) and not list(tmp_path.iterdir())


def test_one_line_helper():
    assert cli._one_line(ValueError("a\n  b\tc ")) == "a b c"
    assert cli._one_line(KeyError()) == "KeyError"


# -- a real terminal: the console script in a subprocess ---------------------------------------
def _console(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(SPARSE_LTH), *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)


def test_console_script_errors_are_one_line_without_traceback(run, tmp_path):
    torch.save(nn.Linear(4, 3), tmp_path / "model.pt")
    _truncate(run / "round_00" / "trained.safetensors")
    for argv, expected in (
        (["convert", tmp_path / "model.pt", tmp_path / "o.safetensors"], "holds pickled Python objects"),
        ([*SEARCH, "--out", run.parent], "round_00/trained.safetensors is truncated"),
    ):
        proc = _console(*argv)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert expected in proc.stderr


# -- process-wide settings: only in a process of the command's own -------------------------------
def test_search_keeps_freed_memory_only_in_its_own_process(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: calls.append("kept"))
    assert main([*SEARCH, "--out", str(tmp_path / "a")]) == 0
    assert calls == []  # called as a library (a test runner, a notebook): the user's heap is left alone
    assert main([*SEARCH, "--out", str(tmp_path / "b")], own_process=True) == 0
    assert calls == ["kept"]


def test_console_main_runs_main_as_its_own_process(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "main", lambda own_process=False: seen.setdefault("own_process", own_process) and 3)
    monkeypatch.setattr(cli.gc, "freeze", lambda: seen.setdefault("frozen", True))
    with pytest.raises(SystemExit) as exit_:
        cli.console_main()
    assert exit_.value.code == 3 and seen == {"own_process": True, "frozen": True}
