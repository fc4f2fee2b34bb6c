"""The IMP search: rewinding, records, controls, bad configs, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparse_lth.lottery as lottery
from sparse_lth import LotteryConfig, Mask, build_model, find_ticket
from sparse_lth.data import load_dataset
from sparse_lth.training import TrainSettings, train

SMALL = dict(dataset="digits", rounds=2, iterations=200, eval_every=100)


def _capture_round_starts(monkeypatch):
    """Wrap train() to record the weights each round starts from."""
    starts = []
    real_train = lottery.train

    def spy(model, mask, *args, **kwargs):
        starts.append(({k: v.clone() for k, v in model.state_dict().items()}, mask))
        return real_train(model, mask, *args, **kwargs)

    monkeypatch.setattr(lottery, "train", spy)
    return starts


def test_rewinding_to_theta0_restores_survivors_exactly(tmp_path, monkeypatch):
    starts = _capture_round_starts(monkeypatch)
    ticket = find_ticket(LotteryConfig(**SMALL, controls=()), tmp_path, progress=False)
    theta0 = build_model("lenet300", (1, 8, 8), seed=0).state_dict()
    assert len(starts) == 3
    for state, mask in starts:
        for name, value in theta0.items():
            alive = mask[name] if name in mask else torch.ones_like(value, dtype=torch.bool)
            assert torch.equal(state[name][alive], value[alive]), name
    for name, value in ticket.ticket_state().items():
        expected = theta0[name] * ticket.mask[name] if name in ticket.mask else theta0[name]
        assert torch.equal(value, expected)


def test_late_rewinding_restores_theta_k(tmp_path, monkeypatch):
    starts = _capture_round_starts(monkeypatch)
    config = LotteryConfig(**SMALL, rewind_iteration=30, controls=())
    ticket = find_ticket(config, tmp_path, progress=False)
    # theta_k computed independently: k steps of dense training from theta_0 with the run's seed
    data = load_dataset("digits")
    reference = build_model("lenet300", data.input_shape, seed=0)
    train(reference, Mask.ones_like(reference), data, TrainSettings(iterations=30, eval_every=100), seed=0)
    theta_k = reference.state_dict()
    for name, value in theta_k.items():
        assert torch.equal(ticket.rewind_state[name], value), name
    for state, mask in starts[1:]:
        for name in mask:
            assert torch.equal(state[name][mask[name]], theta_k[name][mask[name]])


def test_records_and_controls(tmp_path):
    ticket = find_ticket(LotteryConfig(**SMALL, controls=("random_reinit", "random_mask")), tmp_path,
                         progress=False)
    assert [r["round"] for r in ticket.records] == [0, 1, 2]
    # LeNet: hidden layers keep 80%, output 90% per round
    fc1 = ticket.records[2]["layer_remaining"]
    assert fc1["fc1.weight"] == pytest.approx(0.64, abs=1e-3) and fc1["out.weight"] == pytest.approx(0.81, abs=0.01)
    for rec in ticket.records:
        assert rec["early_stop_iteration"] in (100, 200)
        assert 0.5 < rec["early_stop_test_accuracy"] <= 1.0
    for name in ("random_reinit", "random_mask"):
        rows = ticket.controls[name]
        assert [r["round"] for r in rows] == [1, 2]
        for row, rec in zip(rows, ticket.records[1:]):
            assert row["weights_remaining"] == pytest.approx(rec["weights_remaining"])
    assert (ticket.run_dir / "accuracy.png").stat().st_size > 10_000
    assert "random_reinit acc %" in ticket.table()


def test_finished_run_loads_without_training(tmp_path, monkeypatch):
    first = find_ticket(LotteryConfig(**SMALL, controls=()), tmp_path, progress=False)
    starts = _capture_round_starts(monkeypatch)
    again = find_ticket(LotteryConfig(**SMALL, controls=()), tmp_path, progress=False)
    assert starts == [] and again.records == first.records and again.run_dir == first.run_dir


@pytest.mark.parametrize("bad,match", [
    (dict(prune_fraction=1.0), r"prune_fraction must be in \[0, 1\)"),
    (dict(prune_fraction=-0.2), r"prune_fraction must be in \[0, 1\)"),
    (dict(output_fraction=1.5), r"output_fraction must be in \[0, 1\)"),
    (dict(model="resnet1000"), "unknown model 'resnet1000'; choose one of"),
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'; choose one of"),
    (dict(rounds=0), "rounds must be at least 1"),
    (dict(rewind_iteration=60_000), r"rewind_iteration must be in \[0, iterations"),
    (dict(controls=("random_everything",)), "unknown controls"),
])
def test_bad_configs_say_what_to_change(bad, match):
    with pytest.raises(ValueError, match=match):
        LotteryConfig(**bad)


def test_config_hash_names_the_run():
    a, b = LotteryConfig(**SMALL), LotteryConfig(**SMALL, seed=1)
    assert a.run_name() == LotteryConfig(**SMALL).run_name() != b.run_name()
    assert LotteryConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a


_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from sparse_lth import LotteryConfig, find_ticket
config = LotteryConfig(dataset="digits", rounds=3, iterations=400, eval_every=100, controls=("random_reinit",))
find_ticket(config, sys.argv[1], progress=False)
"""


def _run(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out)], env=env)


def _everything(out: Path) -> dict:
    (run_dir,) = out.iterdir()
    from safetensors.torch import load_file
    files = {}
    for path in sorted(run_dir.rglob("*")):
        if path.suffix == ".json":
            files[str(path.relative_to(run_dir))] = json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            files[str(path.relative_to(run_dir))] = {k: v.tolist() for k, v in load_file(str(path)).items()}
    return files


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run(whole).wait(timeout=300) == 0

    proc = _run(killed)
    deadline = time.time() + 300
    while not list(killed.glob("*/round_01")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-round 2 at the latest
    proc.wait()
    (run_dir,) = killed.iterdir()
    assert not (run_dir / "controls" / "random_reinit" / "round_03").exists(), "killed too late to test resume"

    assert _run(killed).wait(timeout=300) == 0
    assert _everything(killed) == _everything(whole)
    assert not [p for p in run_dir.rglob(".*")]  # no half-written leftovers
