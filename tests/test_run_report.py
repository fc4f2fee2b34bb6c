"""Choosing a run's round to deploy (convert --round / --max-drop) and measuring what each round
costs deployed (report RUN_DIR): checked against the run's files read here independently."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import one_error_line

from sparse_lth import LotteryConfig, build_model, convert_checkpoint, load_sparse
from sparse_lth.cli import main
from sparse_lth.run_files import pick_round
from sparse_lth.run_report import _input_shape, measure_run

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta")

# Two pruning rounds at 75% a round: round 2 keeps 6.25% of the hidden weights (about 8% in all).
SEARCH = ["search", "--dataset", "digits", "--rounds", "2", "--iterations", "30", "--eval-every", "10",
          "--prune", "0.75", "--controls", "", "--threads", "1"]
CONFIG = LotteryConfig(dataset="digits", rounds=2, iterations=30, eval_every=10, prune_fraction=0.75, controls=())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(SEARCH + ["--out", str(out)]) == 0
    run_dir = out / CONFIG.run_name()  # the same config spelled in Python names the same folder
    assert (run_dir / "round_02").is_dir()
    return run_dir


def records(run: Path) -> dict[int, dict]:
    """Each round's record, read straight from its JSON file."""
    return {int(p.parent.name.removeprefix("round_")): json.loads(p.read_text())
            for p in sorted(run.glob("round_*/record.json"))}


def trained(run: Path, r: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"round_{r:02d}" / "trained.safetensors"))


# -- picking a round ----------------------------------------------------------------------------
def test_the_run_records_test_accuracy_at_early_stop(run):
    recs = records(run)
    assert sorted(recs) == [0, 1, 2]
    assert all(0 <= rec["early_stop_test_accuracy"] <= 1 for rec in recs.values())
    assert recs[2]["weights_remaining"] < 0.5 < recs[0]["weights_remaining"] == 1.0


@pytest.mark.parametrize("r", [0, 1, 2])
def test_convert_round_n_deploys_that_round(run, tmp_path, capsys, r):
    dst = tmp_path / "ticket.safetensors"
    assert main(["convert", str(run), str(dst), "--round", str(r)]) == 0
    rec = records(run)[r]
    out = capsys.readouterr().out
    assert (f"round {r}: {100 * rec['weights_remaining']:.2f}% of weights left, test accuracy "
            f"{100 * rec['early_stop_test_accuracy']:.2f}% at early stop") in out
    loaded, weights = load_sparse(dst), trained(run, r)
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)  # pruned entries are zero in the run


def test_convert_without_a_choice_deploys_the_newest_round(run, tmp_path):
    report = convert_checkpoint(run, tmp_path / "t.safetensors")
    assert report.round == 2
    assert report.weights_remaining == records(run)[2]["weights_remaining"]
    loaded, weights = load_sparse(tmp_path / "t.safetensors"), trained(run, 2)
    assert all(torch.equal(loaded[n], weights[n]) for n in weights)


def _expected(run: Path, max_drop: float) -> int:
    """The sparsest round within ``max_drop`` points of round 0, from the records themselves."""
    recs = records(run)
    dense = 100 * recs[0]["early_stop_test_accuracy"]
    close = [r for r, rec in recs.items() if dense - 100 * rec["early_stop_test_accuracy"] <= max_drop + 1e-9]
    return min(close, key=lambda r: (recs[r]["weights_remaining"], -r))


def test_convert_max_drop_deploys_the_sparsest_round_close_enough(run, tmp_path):
    recs = records(run)
    dense = 100 * recs[0]["early_stop_test_accuracy"]
    drops = sorted({dense - 100 * rec["early_stop_test_accuracy"] for rec in recs.values()})
    # Every drop the run shows, exactly and just short of it, none and everything.
    for p in sorted({0.0, 100.0, *(d for d in drops if d >= 0), *(d - 0.01 for d in drops if d >= 0.01)}):
        report = convert_checkpoint(run, tmp_path / "t.safetensors", max_drop=p)
        assert report.round == _expected(run, p), p
        assert report.test_accuracy == recs[report.round]["early_stop_test_accuracy"]
    assert convert_checkpoint(run, tmp_path / "t.safetensors", max_drop=100).round == 2


def test_pick_round_rules():
    recs = [{"round": 0, "weights_remaining": 1.0, "early_stop_test_accuracy": 0.9},
            {"round": 1, "weights_remaining": 0.5, "early_stop_test_accuracy": float("nan")},
            {"round": 2, "weights_remaining": 0.25, "early_stop_test_accuracy": 0.89},
            {"round": 3, "weights_remaining": 0.25, "early_stop_test_accuracy": 0.895}]
    assert pick_round(recs) == 3
    assert pick_round(recs, max_drop=0.5) == 3  # a tie in weights left: the later round
    assert pick_round(recs, max_drop=0.49) == 0  # NaN is never close enough
    assert pick_round(recs, max_drop=1) == 3
    with pytest.raises(ValueError, match="not both"):
        pick_round(recs, round=1, max_drop=1)
    with pytest.raises(ValueError, match=r"no round 4 \(completed rounds: 0-3\)"):
        pick_round(recs, round=4)
    with pytest.raises(ValueError, match="non-negative"):
        pick_round(recs, max_drop=-0.5)
    with pytest.raises(ValueError, match="round 0 .* has no record"):
        pick_round(recs[1:], max_drop=1)
    with pytest.raises(ValueError, match="holds no early_stop_test_accuracy"):
        pick_round([{"round": 0, "metrics": {"accuracy": 0.9}}], max_drop=1)
    with pytest.raises(ValueError, match="no completed round"):
        pick_round([])


def test_convert_choice_errors_are_one_line(run, tmp_path, capsys):
    dst = tmp_path / "t.safetensors"
    assert "not allowed with argument --round" in one_error_line(
        capsys, ["convert", run, dst, "--round", 1, "--max-drop", 1])
    assert one_error_line(capsys, ["convert", run, dst, "--round", 7]).endswith(
        f"{run}: there is no round 7 (completed rounds: 0-2)")
    assert "must be a non-negative number of percentage points, got -1.0" in one_error_line(
        capsys, ["convert", run, dst, "--max-drop", "-1"])
    torch.save(trained(run, 0), tmp_path / "dense.pt")
    for flag, value in (("--round", 0), ("--max-drop", 1)):
        line = one_error_line(capsys, ["convert", tmp_path / "dense.pt", dst, flag, value])
        assert f"{flag} (" in line and f"run directory, and {tmp_path / 'dense.pt'} is not one" in line
    plain = tmp_path / "folder"
    plain.mkdir()
    assert "is not one" in one_error_line(capsys, ["convert", plain, dst, "--round", 0])
    assert not dst.exists()


def test_convert_max_drop_refuses_a_run_without_accuracy(run, tmp_path, capsys):
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    record = copy / "round_01" / "record.json"
    data = json.loads(record.read_text())
    del data["early_stop_test_accuracy"]
    record.write_text(json.dumps(data))
    line = one_error_line(capsys, ["convert", copy, tmp_path / "t.safetensors", "--max-drop", 1])
    assert "round 1's record holds no early_stop_test_accuracy" in line
    assert main(["convert", str(copy), str(tmp_path / "t.safetensors"), "--round", "1"]) == 0


# -- report RUN_DIR -----------------------------------------------------------------------------
def test_report_of_a_run_writes_its_table_plots_and_data(run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(run), "--out", str(out), "--reps", "1", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("round"))
    assert lines[header].split()[:7] == ["round", "weights", "left", "%", "test", "acc", "%"]
    assert "b1 dense us" in lines[header] and "b64 sparse us" in lines[header]
    rows = [line.split() for line in lines[header + 2:header + 5]]
    recs = records(run)
    for r, row in enumerate(rows):
        assert row[0] == str(r)
        assert row[1] == f"{100 * recs[r]['weights_remaining']:.2f}"
        assert row[2] == f"{100 * recs[r]['early_stop_test_accuracy']:.2f}"
    assert "1 thread" in lines[0] and "median of 1 interleaved repetitions" in lines[0]

    for name in ("accuracy_vs_latency.png", "accuracy_vs_bytes.png"):
        assert f"plot: {out / name}" in text
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    costs = json.loads((out / "costs.json").read_text())
    assert costs["threads"] == 1 and costs["reps"] == 1 and costs["batch_sizes"] == [1, 64]
    assert [c["round"] for c in costs["rounds"]] == [0, 1, 2]
    for c in costs["rounds"]:
        weights = trained(run, c["round"])
        assert c["dense_bytes"] == sum(t.numel() * t.element_size() for t in weights.values())
        assert c["dense_bytes"] == 4 * sum(t.numel() for t in weights.values())  # fp32
        written = convert_checkpoint(run, tmp_path / "t.safetensors", round=c["round"])
        assert c["sparse_bytes"] == written.bytes_after == (tmp_path / "t.safetensors").stat().st_size
        assert sorted(c["dense_seconds"]) == sorted(c["sparse_seconds"]) == ["1", "64"]
        assert c["max_abs_diff"] < 1e-4  # the timed sparse model computes what the dense one does
        if recs[c["round"]]["weights_remaining"] < 0.5:
            assert c["sparse_bytes"] < 0.5 * c["dense_bytes"]
    assert costs["rounds"][0]["sparse_bytes"] >= costs["rounds"][0]["dense_bytes"]  # dense round: no saving


def test_measure_run_picks_rounds_and_batch_sizes(run):
    costs = measure_run(run, batch_sizes=(2, 2, 3), reps=1, rounds=[1], progress=False)
    assert [r.round for r in costs.rounds] == [1] and costs.batch_sizes == (2, 3)
    assert costs.input_shape == (1, 64) and costs.model == "lenet300"
    assert set(costs.pruned_weights) == {"fc1.weight", "fc2.weight", "out.weight"}
    assert set(costs.rounds[0].sparse_layers) <= {"fc1", "fc2", "out"}
    with pytest.raises(ValueError, match=r"no round 5 \(completed rounds: 0-2\)"):
        measure_run(run, rounds=[5], progress=False)
    with pytest.raises(ValueError, match="reps must be at least 1"):
        measure_run(run, reps=0, progress=False)
    with pytest.raises(ValueError, match="batch sizes must be positive"):
        measure_run(run, batch_sizes=(0,), progress=False)


def test_report_of_a_run_of_ones_own_model_is_refused(run, tmp_path, capsys):
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model": "mynet"}))
    assert "a model of your own ('mynet')" in one_error_line(capsys, ["report", copy, "--reps", 1])
    (copy / "config.json").write_text(json.dumps({**config, "model": "conv2"}))
    assert "its weights do not fit the built-in 'conv2'" in one_error_line(capsys, ["report", copy, "--reps", 1])


def test_report_errors_are_one_line(run, tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"benchmarks": []}))
    assert "--reps is for measuring a run directory's rounds" in one_error_line(
        capsys, ["report", bench, "--reps", 2])
    plain = tmp_path / "folder"
    plain.mkdir()
    assert "not a run directory of a lottery search" in one_error_line(capsys, ["report", plain])
    assert "expected a positive integer" in one_error_line(capsys, ["report", run, "--reps", 0])
    assert "expected a positive integer" in one_error_line(capsys, ["report", run, "--batch-sizes", "1,x"])
    (tmp_path / "afile").write_text("")
    assert "is not a directory" in one_error_line(capsys, ["report", run, "--out", tmp_path / "afile"])


@pytest.mark.parametrize("name, shape", [("lenet300", (1, 28, 28)), ("conv2", (1, 8, 8)), ("conv4", (1, 28, 28)),
                                         ("conv6", (3, 32, 32)), ("conv6", (1, 28, 28))])
def test_input_shape_read_off_the_weights_fits_the_model(name, shape):
    state = build_model(name, shape, num_classes=7).state_dict()
    found = _input_shape(name, state)
    if name == "lenet300":
        assert math.prod(found) == math.prod(shape)
    else:  # the channels, and a size the pools bring down to what fc1 reads (28 -> 3 after 3 pools: 24 does)
        assert found[0] == shape[0] and all(f // 2 ** (int(name[-1]) // 2) == s // 2 ** (int(name[-1]) // 2)
                                            for f, s in zip(found[1:], shape[1:]))
    model = build_model(name, found, num_classes=7)
    model.load_state_dict(state)  # the same weights fit
    assert model(torch.zeros(2, *found)).shape == (2, 7)
