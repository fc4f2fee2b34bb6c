"""The search on torch.distributed: 2 gloo ranks on the CPU against one process, faults, and
ranks that disagree. Every rank is a real process (torchrun, or two processes given the
environment torchrun would give them); each runs one torch thread."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from run_contents import run_contents
from test_data import _write_fake_mnist

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SEARCH = ["search", "--dataset", "digits", "--rounds", "2", "--iterations", "300", "--eval-every", "100",
          "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen([str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), "-m", "sparse_lth", *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def one_process(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparse_lth", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(args_by_rank: list[list[str]], env_by_rank: list[dict] | None = None) -> list[subprocess.CompletedProcess]:
    """Two ranks started by hand, each with its own command line and environment (what
    torchrun cannot do): ranks that disagree."""
    port = free_port()
    procs = []
    for rank, args in enumerate(args_by_rank):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2", **(env_by_rank[rank] if env_by_rank else {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "sparse_lth", *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=ROOT))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)  # a hang fails here, not in CI's 90 minutes
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def run_dir(out: Path) -> Path:
    (found,) = [p for p in out.iterdir() if p.is_dir()]
    return found


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_gloo_ranks_match_one_process(tmp_path):
    two = torchrun([*SEARCH, "--out", str(tmp_path / "two")])
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    one = one_process([*SEARCH, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    assert out.count("round  weights left %") == 1  # one table, from rank 0
    a, b = run_dir(tmp_path / "one"), run_dir(tmp_path / "two")
    assert a.name == b.name  # the same config: the world size is not part of the protocol
    # Round 1's mask comes from round 0's training: same batches, gradients averaged over the
    # shards; only summation order differs, which may flip ties near the threshold.
    ma, mb = load(a / "round_01" / "mask.safetensors"), load(b / "round_01" / "mask.safetensors")
    agree = sum(int((ma[k] == mb[k]).sum()) for k in ma) / sum(v.numel() for v in ma.values())
    assert agree >= 0.995, agree
    for r in range(3):
        ra, rb = (json.loads((d / f"round_{r:02d}" / "record.json").read_text()) for d in (a, b))
        assert abs(ra["early_stop_test_accuracy"] - rb["early_stop_test_accuracy"]) <= 0.02, r
        assert ra["weights_remaining"] == pytest.approx(rb["weights_remaining"], abs=1e-3)
    assert (b / "accuracy.png").is_file() and not list(b.rglob(".*"))  # rank 0 wrote it all, whole


def test_a_killed_rank_and_a_relaunch_give_the_complete_run(tmp_path):
    args = [*SEARCH[:4], "3", *SEARCH[5:]]  # three rounds
    whole = torchrun([*args, "--out", str(tmp_path / "whole")])
    # communicate, not wait: wait() with piped output deadlocks once the progress bars fill
    # the pipe (torchrun blocks writing, a rank times out), more likely on a slow machine.
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-3000:]
    killed = torchrun([*args, "--out", str(tmp_path / "killed")])
    deadline = time.time() + 300
    while not list((tmp_path / "killed").glob("*/round_01")) and time.time() < deadline:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(killed.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "torchrun's workers not found"
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies; torchrun stops the other
    killed.communicate(timeout=300)
    assert killed.returncode != 0
    done = run_dir(tmp_path / "killed")
    assert not (done / "controls" / "random_reinit" / "round_03").exists(), "killed too late to test resume"
    again = torchrun([*args, "--out", str(tmp_path / "killed")])
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    # Two ranks reduce in a fixed order: a relaunched run equals an uninterrupted one exactly.
    assert run_contents(done) == run_contents(run_dir(tmp_path / "whole"))


def rank0_error(results: list[subprocess.CompletedProcess]) -> str:
    assert [r.returncode for r in results] == [2, 2], [r.stderr[-2000:] for r in results]
    assert "Traceback" not in results[0].stderr + results[1].stderr
    lines = [line for line in results[0].stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "error:" not in results[1].stderr  # one line, from rank 0
    return lines[0]


def test_ranks_with_other_configs_stop_with_one_message(tmp_path):
    out = ["--out", str(tmp_path)]
    line = rank0_error(two_ranks([[*SEARCH, *out], [*SEARCH, *out, "--seed", "1"]]))
    assert "the ranks disagree on the search's config" in line


def test_data_missing_on_one_rank_stops_every_rank(tmp_path):
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    _write_fake_mnist(tmp_path / "data" / "mnist", n_train=200, n_test=40)
    args = ["search", "--dataset", "mnist", "--rounds", "1", "--iterations", "20", "--val-size", "40",
            "--threads", "1", "--out", str(tmp_path / "runs")]
    line = rank0_error(two_ranks([args, args], [{"SPARSE_LTH_DATA": str(tmp_path / "data")},
                                                {"SPARSE_LTH_DATA": str(tmp_path / "elsewhere")}]))
    assert "failed on rank 1 of 2" in line and "dataset 'mnist' not found" in line


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tmp_path):
    proc = torchrun([*SEARCH, "--batch-size", "61", "--out", str(tmp_path)])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if "sparse-lth search: error:" in line]
    assert len(lines) == 1 and "batch_size 61 does not split over 2 ranks" in lines[0]
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_block_tickets_on_two_ranks(tmp_path):
    proc = torchrun(["search", "--dataset", "digits", "--rounds", "1", "--iterations", "100", "--eval-every", "100",
                     "--threads", "1", "--block", "16x16", "--controls", "", "--out", str(tmp_path)])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    mask = load(run_dir(tmp_path) / "round_01" / "mask.safetensors")["fc2.weight"]  # 100 x 300: whole 16x16 tiles
    def tiles(t: torch.Tensor) -> torch.Tensor:  # pad to 112 x 304, then one row of 256 per tile
        return torch.nn.functional.pad(t, (0, 4, 0, 12)).reshape(7, 16, 19, 16).permute(0, 2, 1, 3).reshape(7, 19, 256)

    alive, valid = tiles(mask), tiles(torch.ones_like(mask))
    assert torch.equal(alive, alive.any(-1, keepdim=True) & valid)  # every tile wholly alive or wholly pruned
    assert 0 < mask.float().mean() < 1


def test_sparse_training_on_two_ranks_follows_masked_dense(tmp_path):
    """DDP over TrainableSparseLinear: the values Parameter is what the ranks average. Two ranks
    training sparse from round 1 on agree with two ranks training masked-dense."""
    args = ["search", "--dataset", "digits", "--rounds", "1", "--iterations", "100", "--eval-every", "100",
            "--threads", "1", "--controls", ""]
    runs = {}
    for mode in ("always", "never"):
        proc = torchrun([*args, "--sparse-training", mode, "--out", str(tmp_path / mode)])
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        runs[mode] = run_dir(tmp_path / mode)
    sparse = json.loads((runs["always"] / "round_01" / "record.json").read_text())
    dense = json.loads((runs["never"] / "round_01" / "record.json").read_text())
    assert set(sparse["training_path"].values()) == {"sparse"}
    assert set(dense["training_path"].values()) == {"masked-dense"}
    ws, wd = (load(d / "round_01" / "trained.safetensors") for d in (runs["always"], runs["never"]))
    assert ws.keys() == wd.keys()
    for name in ws:  # 100 Adam steps from the same start, reduced over two ranks either way
        torch.testing.assert_close(ws[name], wd[name], rtol=1e-3, atol=1e-4, msg=name)
