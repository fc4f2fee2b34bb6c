"""The IMP search: rewinding, records, controls, bad configs, and resume after SIGKILL."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparse_lth.lottery as lottery
from run_contents import run_contents
from sparse_lth import LotteryConfig, Mask, build_model, find_ticket, run_files
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
    (dict(model="my resnet/../x"), "model must be a name of letters, digits"),
    (dict(dataset=""), "dataset must be a name of letters, digits"),
    (dict(prune_types=("linear", "attention")), "unknown prune_types"),
    (dict(include="fc1.weight"), "include must be a sequence of strings"),
    (dict(rounds=0), "rounds must be at least 1"),
    (dict(rewind_iteration=60_000), r"rewind_iteration must be in \[0, iterations"),
    (dict(controls=("random_everything",)), "unknown controls"),
    (dict(lr=float("inf")), "lr must be positive and finite"),
    (dict(weight_decay=-1e-4), "weight_decay must be non-negative and finite"),
    (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
])
def test_bad_configs_say_what_to_change(bad, match):
    with pytest.raises(ValueError, match=match):
        LotteryConfig(**bad)


@pytest.mark.parametrize("bad,match", [
    (dict(model="resnet1000"), "unknown model 'resnet1000'; choose one of .* or pass model_fn="),
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'; choose one of .* or pass train_fn="),
])
def test_unknown_builtins_point_to_your_own(tmp_path, bad, match):
    # Any name labels a search of your own network or data; without model_fn / train_fn the
    # built-in one must exist, and the search says how to bring your own.
    with pytest.raises(ValueError, match=match):
        find_ticket(LotteryConfig(**{**SMALL, **bad}), tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # refused before a run directory was made


def test_later_fields_keep_earlier_run_names():
    # Fields added after the first release are hashed only when set: earlier run directories resume.
    config = LotteryConfig(**SMALL)
    legacy = {k: v for k, v in config.to_dict().items()
              if k not in ("prune_types", "include", "exclude", "output_layer", "metric", "sparse_training")}
    import hashlib
    assert config.digest() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:10]
    assert LotteryConfig.from_dict(legacy) == config
    assert LotteryConfig(**SMALL, exclude=("out.weight",)).digest() != config.digest()


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
    assert (run_dir / "run.lock").exists()  # the dead writer's lock file stays; it must not block the rerun

    assert _run(killed).wait(timeout=300) == 0
    (whole_dir,) = whole.iterdir()
    assert run_contents(run_dir) == run_contents(whole_dir)
    assert not [p for p in run_dir.rglob(".*")]  # no half-written leftovers


# -- the controls' defining properties ----------------------------------------------------------
@pytest.fixture(scope="module")
def controls_run(tmp_path_factory):
    """A late-rewinding run (theta_k != theta_0) with both controls, and the weights every training
    started from, in call order: ticket rounds 0 and 1, then random_reinit 1, then random_mask 1."""
    config = LotteryConfig(dataset="digits", rounds=1, iterations=100, eval_every=50, rewind_iteration=20,
                           controls=("random_reinit", "random_mask"))
    with pytest.MonkeyPatch.context() as mp:
        starts = _capture_round_starts(mp)
        ticket = find_ticket(config, tmp_path_factory.mktemp("controls"), progress=False)
    assert len(starts) == 4
    theta0 = build_model("lenet300", (1, 8, 8), seed=0).state_dict()
    ticket_mask = run_files.read_mask(ticket.run_dir, 1)
    return ticket, theta0, ticket_mask, dict(zip(("ticket0", "ticket1", "random_reinit", "random_mask"), starts))


def test_random_reinit_trains_the_ticket_mask_from_fresh_weights(controls_run):
    ticket, theta0, ticket_mask, starts = controls_run
    state, mask = starts["random_reinit"]
    assert set(mask) == set(ticket_mask)
    for name, alive in ticket_mask.items():
        assert torch.equal(mask[name], alive), f"{name}: random_reinit must train the ticket's own mask"
        w = state[name][alive]
        # Neither theta_0 nor the rewind weights theta_k ...
        assert (w == theta0[name][alive]).float().mean() < 0.01, f"{name}: random_reinit starts from theta_0"
        assert (w == ticket.rewind_state[name][alive]).float().mean() < 0.01, f"{name}: starts from theta_k"
        # ... but a new draw of the same init: Glorot normal, mean 0, std sqrt(2 / (fan_in + fan_out)).
        fan_out, fan_in = theta0[name].shape
        std = math.sqrt(2.0 / (fan_in + fan_out))
        n = w.numel()
        assert abs(w.std().item() / std - 1) < 6 / math.sqrt(2 * n), name  # 6 sigma of a sample std
        assert abs(w.mean().item()) < 6 * std / math.sqrt(n), name


def test_random_mask_keeps_per_layer_counts_not_the_pattern_and_starts_from_rewind(controls_run):
    ticket, _, ticket_mask, starts = controls_run
    state, mask = starts["random_mask"]
    assert set(mask) == set(ticket_mask)
    for name, alive in ticket_mask.items():
        n, k = alive.numel(), int(alive.sum())
        assert int(mask[name].sum()) == k, f"{name}: random_mask must keep the ticket's alive count"
        # k positions drawn at random overlap the ticket's k by chance only: hypergeometric,
        # mean k^2 / n (density^2 * n), far from the ticket's own count k.
        overlap = int((mask[name] & alive).sum())
        mean = k * k / n
        sigma = math.sqrt(k * (k / n) * (1 - k / n) * (n - k) / (n - 1))
        assert abs(overlap - mean) <= 6 * sigma + 1, f"{name}: overlap {overlap}, chance gives {mean:.0f}"
        assert k - overlap > 6 * sigma + 1, f"{name}: random_mask reuses the ticket's pattern"
        assert torch.equal(state[name][mask[name]], ticket.rewind_state[name][mask[name]]), name
    for name, value in ticket.rewind_state.items():
        if name not in mask:  # biases start from the rewind weights too
            assert torch.equal(state[name], value), name


# -- one writer per run directory, no links -----------------------------------------------------
SPARSE_LTH = Path(sys.executable).parent / "sparse-lth"


def _tree(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.lstat().st_mtime_ns for p in run_dir.rglob("*")}


def test_second_search_into_the_same_run_stops_at_once(tmp_path):
    argv = [str(SPARSE_LTH), "search", "--dataset", "digits", "--rounds", "2", "--iterations", "200",
            "--eval-every", "100", "--controls", "random_reinit", "--threads", "1", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list(tmp_path.glob("*/round_00")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the lock: a waiting second writer would hang
        (run_dir,) = tmp_path.iterdir()
        assert not (run_dir / "round_02").exists(), "the first search finished too soon to test the race"
        before = _tree(run_dir)
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        (line,) = second.stderr.splitlines()
        holder = f"{run_dir} is being written by pid {first.pid} on host {socket.gethostname()} since "
        assert holder in line and line.endswith("wait for it to finish (or stop that process) and run again")
        assert _tree(run_dir) == before  # the second wrote, cleaned and computed nothing
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    records = json.loads((run_dir / "records.json").read_text())
    assert [r["round"] for r in records["ticket"]] == [0, 1, 2]
    assert [r["round"] for r in records["random_reinit"]] == [1, 2]
    assert sorted(p.name for p in run_dir.iterdir()) == ["accuracy.png", "config.json", "controls", "init.safetensors",
                                                       "records.json", "round_00", "round_01", "round_02", "run.lock"]
    assert not list(run_dir.rglob(".*"))
    config = LotteryConfig(dataset="digits", rounds=2, iterations=200, eval_every=100)
    assert find_ticket(config, tmp_path, progress=False).records == \
        [run_files.read_record(run_dir, r) for r in (0, 1, 2)]  # the lock is free again


@pytest.mark.parametrize("link,kind", [("controls", "dir"), ("controls/random_reinit", "dir"), ("round_00", "dir"),
                                       ("accuracy.png", "file"), ("run.lock", "file"), ("init.safetensors", "file")])
def test_search_refuses_a_run_directory_holding_a_symlink(tmp_path, monkeypatch, link, kind):
    config = LotteryConfig(**SMALL)
    run_dir = tmp_path / "runs" / config.run_name()
    (run_dir / link).parent.mkdir(parents=True)
    outside = tmp_path / "outside"
    if kind == "dir":
        outside.mkdir()
        (outside / "keep.txt").write_text("precious")
    else:
        outside.write_text("precious")
    (run_dir / link).symlink_to(outside)
    starts = _capture_round_starts(monkeypatch)
    with pytest.raises(ValueError, match=rf"{run_dir / link} is a symbolic link"):
        find_ticket(config, tmp_path / "runs", progress=False)
    assert starts == []  # refused before any training
    if kind == "dir":
        assert [p.name for p in outside.iterdir()] == ["keep.txt"] and (outside / "keep.txt").read_text() == "precious"
    else:
        assert outside.read_text() == "precious"
    assert not (run_dir / "config.json").exists()


def test_run_config_with_unknown_keys_names_the_file(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown LotteryConfig keys \['colour'\]"):
        LotteryConfig.from_dict({**LotteryConfig().to_dict(), "colour": "red"})
    config = LotteryConfig(**SMALL, controls=())
    run_dir = tmp_path / config.run_name()
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({**config.to_dict(), "colour": "red"}))
    starts = _capture_round_starts(monkeypatch)
    with pytest.raises(ValueError, match=rf"{run_dir / 'config.json'} is not a valid run config \(unknown "
                                         r"LotteryConfig keys \['colour'\].*delete the run directory"):
        find_ticket(config, tmp_path, progress=False)
    assert starts == []


def test_sparse_training_search_matches_masked_dense(tmp_path):
    """A search that trains every layer sparse finds the same masks and accuracies (up to float
    rounding) as the masked-dense search; each round records its path, and the run
    lands in a folder of its own (the config says how it trained)."""
    never = find_ticket(LotteryConfig(**SMALL, controls=("random_reinit",)), tmp_path, progress=False)
    always = find_ticket(LotteryConfig(**SMALL, controls=("random_reinit",), sparse_training="always"),
                         tmp_path, progress=False)
    assert always.run_dir != never.run_dir
    for name in never.mask:  # float rounding may flip a weight at the pruning threshold, no more
        agree = (always.mask[name] == never.mask[name]).float().mean()
        assert agree >= 0.999, name
    for a, b in zip(always.records, never.records):
        assert set(a["training_path"].values()) == {"sparse"}
        assert set(b["training_path"].values()) == {"masked-dense"}
        assert abs(a["early_stop_test_accuracy"] - b["early_stop_test_accuracy"]) <= 0.01
    assert always.controls["random_reinit"][0]["training_path"]
