"""Run files: readers that name the broken file, the one-writer lock, and no writes through links."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sparse_lth import run_files
from sparse_lth.plots import plot_rounds

MASK = {"w": torch.tensor([[True, False], [True, True]])}
TRAINED = {"w": torch.tensor([[1.0, 0.0], [2.0, 3.0]]), "b": torch.zeros(2)}
RECORD = {"round": 1, "weights_remaining": 0.75, "early_stop_test_accuracy": 0.5, "early_stop_iteration": 10}


@pytest.fixture
def run(tmp_path) -> Path:
    """A small run directory with every kind of file a resume reads."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_files.atomic_write_json({"model": "lenet300"}, run_dir / run_files.CONFIG_FILE)
    run_files.atomic_save_safetensors(TRAINED, run_dir / run_files.INIT_FILE)
    run_files.atomic_save_safetensors(TRAINED, run_dir / run_files.REWIND_FILE)
    for r in (0, 1):
        run_files.write_round(run_dir, r, MASK, TRAINED, {**RECORD, "round": r})
        run_files.write_round(run_files.control_dir(run_dir, "random_reinit"), r + 1, MASK, TRAINED, RECORD)
    return run_dir


def _truncate(path: Path, keep: int = 20) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# -- readers name the file and say what to delete -----------------------------------------------
@pytest.mark.parametrize("rel,read,remedy", [
    ("round_01/mask.safetensors", lambda d: run_files.read_mask(d, 1), "delete the folder .*round_01 to recompute"),
    ("round_01/trained.safetensors", lambda d: run_files.read_round(d, 1), "delete the folder .*round_01"),
    ("round_00/record.json", lambda d: run_files.read_record(d, 0), "delete the folder .*round_00"),
    ("init.safetensors", run_files.read_init, "delete the run directory .*run to start that search over"),
    ("rewind.safetensors", run_files.read_rewind, "delete the run directory"),
    ("config.json", run_files.read_config, "fix it, or delete the run directory"),
    ("round_01/trained.safetensors", run_files.last_ticket, "delete the folder .*round_01"),
])
def test_truncated_files_raise_value_error_naming_the_file(run, rel, read, remedy):
    path = run / rel
    if path.suffix == ".safetensors":  # the reference: safetensors itself refuses the cut file
        _truncate(path)
        with pytest.raises(SafetensorError):
            load_file(str(path))
    else:
        path.write_text('{"round": 1, "weights')
        with pytest.raises(json.JSONDecodeError):
            json.loads(path.read_text())
    message = rf"{path.name} is truncated or (unreadable|not valid JSON).*; {remedy}"
    with pytest.raises(ValueError, match=message) as info:
        read(run)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=str(path)):
        run_files.check_run_files(run)


def test_missing_or_wrong_kind_of_file_is_a_value_error(run):
    (run / "round_01" / run_files.MASK_FILE).unlink()
    with pytest.raises(ValueError, match=r"round_01/mask\.safetensors is missing; delete the folder"):
        run_files.read_mask(run, 1)
    (run / "round_00" / run_files.RECORD_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"record\.json holds a JSON list, not an object"):
        run_files.read_record(run, 0)
    with pytest.raises(FileNotFoundError, match="no completed round 7"):  # not a broken file: no round
        run_files.read_mask(run, 7)


def test_check_run_files_reads_headers_of_every_round_including_controls(run):
    run_files.check_run_files(run)  # a whole run passes
    path = run_files.round_dir(run_files.control_dir(run, "random_reinit"), 2) / run_files.TRAINED_FILE
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # a tail cut: only the header's offsets show it
    with pytest.raises(ValueError, match=rf"{path} is truncated or unreadable .*delete the folder {path.parent}"):
        run_files.check_run_files(run)


def test_readers_give_back_what_was_written(run):
    mask, trained, record = run_files.read_round(run, 1)
    assert torch.equal(mask["w"], MASK["w"]) and torch.equal(trained["w"], TRAINED["w"])
    assert record == {**RECORD, "round": 1}
    assert torch.equal(run_files.read_init(run)["w"], TRAINED["w"])


# -- the one-writer lock ------------------------------------------------------------------------
def test_second_lock_names_the_holder_and_release_frees_it(tmp_path):
    with run_files.lock_run_dir(tmp_path) as lock:
        assert lock.held
        info = json.loads((tmp_path / run_files.LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        # flock conflicts between two open files even within one process: this is a second writer
        with pytest.raises(run_files.RunDirBusy,
                           match=rf"{tmp_path} is being written by pid {os.getpid()} on host "
                                 rf"{socket.gethostname()} since .*; wait for it to finish"):
            run_files.lock_run_dir(tmp_path)
    assert not lock.held
    assert (tmp_path / run_files.LOCK_FILE).exists()  # never unlinked (unlink + flock races)
    run_files.lock_run_dir(tmp_path).release()


_HOLD = """
import sys, time
from sparse_lth import run_files
lock = run_files.lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_process_is_free(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(run_files.RunDirBusy, match=f"pid {proc.pid} "):
            run_files.lock_run_dir(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((tmp_path / run_files.LOCK_FILE).read_text())["pid"] == proc.pid  # left behind
    with run_files.lock_run_dir(tmp_path):  # the kernel dropped the dead holder's lock
        assert json.loads((tmp_path / run_files.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside.txt"
    run_dir.mkdir()
    outside.write_text("precious")
    (run_dir / run_files.LOCK_FILE).symlink_to(outside)
    with pytest.raises(ValueError, match=r"run\.lock is a symbolic link"):
        run_files.lock_run_dir(run_dir)
    assert outside.read_text() == "precious"


# -- no writes through links --------------------------------------------------------------------
def test_refuse_symlinks_names_the_link_and_does_not_follow(tmp_path):
    run_dir, outside = tmp_path / "run", tmp_path / "outside"
    (run_dir / "round_00").mkdir(parents=True)
    outside.mkdir()
    (outside / "inner").symlink_to(tmp_path)  # a link in the target must not be reached
    run_files.refuse_symlinks(run_dir)
    (run_dir / "controls").symlink_to(outside)
    with pytest.raises(ValueError, match=rf"{run_dir / 'controls'} is a symbolic link \(to {outside}\)"):
        run_files.refuse_symlinks(run_dir)


def test_write_round_replaces_a_planted_link_and_spares_its_target(tmp_path):
    base, outside = tmp_path / "run", tmp_path / "outside"
    base.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    run_files.round_dir(base, 3).symlink_to(outside, target_is_directory=True)
    final = run_files.write_round(base, 3, MASK, TRAINED, RECORD)
    assert not final.is_symlink() and final.is_dir()
    assert run_files.read_record(base, 3) == RECORD
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert (outside / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("write", [
    lambda p: run_files.atomic_write_json({"a": 1}, p),
    lambda p: run_files.atomic_save_safetensors({"w": torch.ones(2)}, p),
    lambda p: plot_rounds({"ticket": [{"weights_remaining": 1.0, "early_stop_test_accuracy": 0.9,
                                       "early_stop_iteration": 100}]}, p),
], ids=["json", "safetensors", "plot"])
def test_atomic_writers_replace_a_link_instead_of_following_it(tmp_path, write):
    outside, path = tmp_path / "outside.bin", tmp_path / "run" / "accuracy.png"
    path.parent.mkdir()
    outside.write_bytes(b"precious")
    path.symlink_to(outside)
    write(path)
    assert not path.is_symlink() and path.stat().st_size > 0
    assert outside.read_bytes() == b"precious"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == stat.S_IMODE(0o666 & ~_umask()), oct(mode)  # what open() would have given


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_stale_plot_temporaries_are_removed(tmp_path):
    (tmp_path / ".accuracy.png.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".round_02.xyz").mkdir()
    (tmp_path / ".keep-me").write_text("not ours")
    run_files.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep-me"]


def test_make_run_dir_refuses_a_file_as_output_folder(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(ValueError, match=r"out exists and is not a directory; choose another output folder"):
        run_files.make_run_dir(tmp_path / "out", "run")
    assert run_files.make_run_dir(tmp_path / "runs", "run").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_make_run_dir_refuses_a_read_only_output_folder(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(ValueError, match="cannot create the run directory .*choose a writable output folder"):
        run_files.make_run_dir(tmp_path / "ro", "run")


def test_lock_holder_is_written_before_another_reads_it(tmp_path):
    # A holder that has not written its name yet still blocks, with a generic message.
    with run_files.lock_run_dir(tmp_path):
        os.truncate(tmp_path / run_files.LOCK_FILE, 0)
        start = time.monotonic()
        with pytest.raises(run_files.RunDirBusy, match="is being written by another process"):
            run_files.lock_run_dir(tmp_path)
        assert time.monotonic() - start < 1.0  # LOCK_NB: refused at once, never waits
