"""The search over a user's own network, data and training loop: find_ticket(model_fn=, train_fn=)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from run_contents import run_contents
from sparse_lth import LotteryConfig, Mask, find_ticket
from sparse_lth.user_loop import TrainContext, run_train_fn

BASE = dict(model="tiny-cnn", dataset="blobs", rounds=2, iterations=40, controls=())


def tiny_cnn(seed: int) -> nn.Module:
    """conv + BatchNorm + a residual-free head: enough structure to prune by type and name."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 3))


def blobs(n: int = 240) -> TensorDataset:
    """Three classes of 6x6 images, separable: a real (if easy) learning problem."""
    g = torch.Generator().manual_seed(123)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float()
    return TensorDataset(x, y)


def make_train_fn(optimizer: str = "sgd", log: bool = False, violations: list | None = None, spy: list | None = None):
    data = blobs()

    def train_fn(model: nn.Module, ctx: TrainContext) -> dict:
        if spy is not None:
            spy.append((ctx.kind, ctx.round, ctx.start_step, {k: v.clone() for k, v in model.state_dict().items()}))
        if optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        loader = DataLoader(data, batch_size=24, shuffle=True)
        model.train()
        while ctx.steps < ctx.iterations:
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if violations is not None:  # after the optimizer's step, before ctx.step(): the hook's work
                    params = dict(model.named_parameters())
                    violations.extend(n for n, alive in ctx.mask.items() if params[n][~alive].abs().sum() != 0)
                ctx.step()
                if log and ctx.steps % 10 == 0:
                    ctx.log(val_loss=float(F.cross_entropy(model(data.tensors[0]), data.tensors[1])))
                if ctx.steps >= ctx.iterations:
                    break
        model.eval()
        with torch.no_grad():
            accuracy = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean()
        return {"accuracy": accuracy, "steps_seen": ctx.steps}

    return train_fn


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_mask_holds_after_every_optimizer_step_without_touching_the_loop(tmp_path, optimizer):
    violations: list = []
    ticket = find_ticket(LotteryConfig(**BASE), tmp_path, progress=False, model_fn=tiny_cnn,
                         train_fn=make_train_fn(optimizer, violations=violations))
    assert violations == []  # momentum and weight decay never revived a pruned weight
    assert [r["round"] for r in ticket.records] == [0, 1, 2]
    for record in ticket.records:
        assert record["steps"] == 40 and record["seconds"] > 0
        assert 0.0 <= record["metrics"]["accuracy"] <= 1.0
    # the paper's rates by layer kind: conv and hidden fc at 20%, the output layer at 10% per round
    layers = ticket.records[2]["layer_remaining"]
    assert layers["0.weight"] == pytest.approx(0.64, abs=0.01) and layers["4.weight"] == pytest.approx(0.64, abs=1e-3)
    assert layers["6.weight"] == pytest.approx(0.81, abs=0.01)
    assert "1.weight" not in layers  # BatchNorm's scale is never pruned
    assert ticket.records[0]["metrics"]["accuracy"] > 0.8  # it learned: the loop really ran
    assert "accuracy" in ticket.table()


def test_rewinding_to_step_k_of_the_users_loop(tmp_path):
    spy: list = []
    snapshots: dict = {}
    train_fn = make_train_fn(spy=spy)

    def recording_train_fn(model, ctx):
        original_step = ctx.step

        def step():
            n = original_step()
            if ctx.round == 0 and n == 15:  # what the weights are right after step k, seen by the loop
                snapshots["k"] = {k: v.clone() for k, v in model.state_dict().items()}
            return n

        ctx.step = step
        return train_fn(model, ctx)

    config = LotteryConfig(**{**BASE, "rewind_iteration": 15})
    ticket = find_ticket(config, tmp_path, progress=False, model_fn=tiny_cnn, train_fn=recording_train_fn)
    for name, value in snapshots["k"].items():
        assert torch.equal(ticket.rewind_state[name], value), name
    (_, _, start0, theta0), *later = spy
    assert start0 == 0
    for kind, r, start_step, state in later:  # later rounds start at theta_k (survivors) and are told k
        assert start_step == 15
        mask = Mask(json_free_mask(ticket.run_dir, r))
        for name, alive in mask.items():
            assert torch.equal(state[name][alive], snapshots["k"][name][alive]), (r, name)
            assert (state[name][~alive] == 0).all()
    assert ticket.records[1]["steps"] == 25  # 40 - 15 steps after the rewind point


def json_free_mask(run_dir: Path, round_index: int) -> dict:
    from sparse_lth.run_files import read_mask

    return read_mask(run_dir, round_index)


def test_controls_with_a_users_network(tmp_path):
    spy: list = []
    config = LotteryConfig(**{**BASE, "rounds": 1, "controls": ("random_reinit", "random_mask")})
    ticket = find_ticket(config, tmp_path, progress=False, model_fn=tiny_cnn, train_fn=make_train_fn(spy=spy))
    starts = {kind: state for kind, _, _, state in spy}
    theta0 = spy[0][3]
    ticket_mask = ticket.mask
    # random_reinit: the ticket's mask on fresh weights from model_fn (another seed)
    for name, alive in ticket_mask.items():
        fresh = starts["random_reinit"][name][alive]
        assert not torch.equal(fresh, theta0[name][alive]), name
        assert float(fresh.std()) == pytest.approx(float(theta0[name][alive].std()), rel=0.3)
    # random_mask: the ticket's per-layer counts, another pattern, from the rewind weights
    control_mask = Mask(json_free_mask(ticket.run_dir / "controls" / "random_mask", 1))
    for name, alive in ticket_mask.items():
        assert int(control_mask[name].sum()) == int(alive.sum())
        assert not torch.equal(control_mask[name], alive)
        assert torch.equal(starts["random_mask"][name][control_mask[name]], theta0[name][control_mask[name]])
    assert set(ticket.controls) == {"random_reinit", "random_mask"}
    assert "random_reinit accuracy" in ticket.table()


def test_which_weights_are_pruned_by_type_and_name(tmp_path):
    runs = {
        "conv only": (dict(prune_types=("conv",)), {"0.weight"}),
        "exclude": (dict(exclude=("6.*",)), {"0.weight", "4.weight"}),
        "include": (dict(prune_types=(), include=("4.weight",)), {"4.weight"}),
    }
    for label, (extra, expected) in runs.items():
        ticket = find_ticket(LotteryConfig(**{**BASE, "rounds": 1, **extra}), tmp_path / label.replace(" ", "_"),
                             progress=False, model_fn=tiny_cnn, train_fn=make_train_fn())
        assert set(ticket.mask) == expected, label
    # the output layer's half rate follows output_layer: a name, or none at all
    for output, expected in (("4.weight", {"4.weight": 0.9, "6.weight": 0.8}), ("none", {"4.weight": 0.8, "6.weight": 0.8})):
        ticket = find_ticket(LotteryConfig(**{**BASE, "rounds": 1, "prune_types": ("linear",), "output_layer": output}),
                             tmp_path / output.replace(".", "_"), progress=False, model_fn=tiny_cnn,
                             train_fn=make_train_fn())
        got = ticket.records[1]["layer_remaining"]
        assert {k: round(v, 2) for k, v in got.items()} == expected, output


def test_global_scope_and_block_tickets(tmp_path):
    ticket = find_ticket(LotteryConfig(**{**BASE, "rounds": 1, "scope": "global", "prune_types": ("linear",),
                                          "output_layer": "none", "prune_fraction": 0.5}),
                         tmp_path / "global", progress=False, model_fn=tiny_cnn, train_fn=make_train_fn())
    remaining = ticket.records[1]["layer_remaining"]
    assert ticket.records[1]["weights_remaining"] == pytest.approx(0.5, abs=1e-3)
    assert remaining["4.weight"] != pytest.approx(remaining["6.weight"], abs=1e-3)  # pooled, not per layer
    block = find_ticket(LotteryConfig(**{**BASE, "rounds": 1, "prune_types": ("linear",), "block": (8, 8)}),
                        tmp_path / "block", progress=False, model_fn=tiny_cnn, train_fn=make_train_fn())
    alive = block.mask["4.weight"]  # 32 x 288: whole 8 x 8 tiles, alive or not
    tiles = alive.reshape(4, 8, 36, 8).permute(0, 2, 1, 3).reshape(4, 36, 64)
    assert ((tiles.all(-1)) | (~tiles.any(-1))).all()


def test_any_data_no_images_no_classes(tmp_path):
    # A regression MLP on tabular data: nothing in the search assumes images or 10 classes.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 7, generator=g)
    y = (x @ torch.randn(7, 1, generator=g)).squeeze(1)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)

    def train_fn(model, ctx):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            for xb, yb in loader:
                opt.zero_grad()
                F.mse_loss(model(xb).squeeze(1), yb).backward()
                opt.step()
                ctx.step()
            with torch.no_grad():
                ctx.log(val_loss=float(F.mse_loss(model(x).squeeze(1), y)))
        return {"mse": F.mse_loss(model(x).squeeze(1), y)}

    config = LotteryConfig(model="mlp", dataset="tabular", rounds=1, iterations=24, controls=(), metric="mse")
    ticket = find_ticket(config, tmp_path, progress=False,
                         model_fn=lambda seed: nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 1)),
                         train_fn=train_fn)
    first = ticket.records[0]
    assert first["metrics"]["mse"] < float(y.var())  # it fit something
    assert first["early_stop_iteration"] in (8, 16, 24)
    assert first["early_stop_metrics"]["val_loss"] == min(row["val_loss"] for row in first["history"])
    assert "ticket mse" in ticket.table()
    assert (ticket.run_dir / "accuracy.png").stat().st_size > 10_000


def test_model_fn_alone_uses_the_built_in_loop(tmp_path):
    # A user's network on a built-in dataset and loop (digits: 8x8 images, 10 classes).
    def model_fn(seed):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 10))

    ticket = find_ticket(LotteryConfig(model="mymlp", dataset="digits", rounds=1, iterations=60, eval_every=30,
                                       controls=()), tmp_path, progress=False, model_fn=model_fn)
    assert ticket.records[1]["early_stop_test_accuracy"] > 0.5  # the built-in record shape
    assert set(ticket.mask) == {"1.weight", "3.weight"}


@pytest.mark.parametrize("model_fn,train_fn,config,match", [
    (lambda seed: "not a module", lambda model, ctx: {"a": 1.0}, {}, "model_fn must return an nn.Module"),
    (tiny_cnn, lambda model, ctx: 0.9, {}, "train_fn must return a non-empty dict"),
    (tiny_cnn, lambda model, ctx: {"accuracy": "high"}, {}, "metric 'accuracy' must be a number"),
    (tiny_cnn, lambda model, ctx: {"accuracy": 1.0}, {"rewind_iteration": 5}, r"rewind_iteration=5, but train_fn made only 0"),
    (tiny_cnn, lambda model, ctx: {"loss": 1.0}, {"metric": "accuracy"}, "not the metric 'accuracy'"),
    (lambda seed: nn.Sequential(nn.ReLU()), lambda model, ctx: {"a": 1.0}, {}, "no weights to prune"),
    (tiny_cnn, "train", {}, "train_fn must be callable"),
])
def test_mistakes_in_the_users_functions_say_what_to_change(tmp_path, model_fn, train_fn, config, match):
    with pytest.raises(ValueError, match=match):
        find_ticket(LotteryConfig(**{**BASE, **config}), tmp_path, progress=False, model_fn=model_fn, train_fn=train_fn)


def test_model_fn_that_ignores_the_seed_cannot_fake_the_reinit_control(tmp_path):
    fixed = tiny_cnn(0).state_dict()

    def pretrained(seed):  # loads the same weights whatever the seed: no fresh initialization
        model = tiny_cnn(seed)
        model.load_state_dict(fixed)
        return model

    config = LotteryConfig(**{**BASE, "rounds": 1, "controls": ("random_reinit",)})
    with pytest.raises(ValueError, match="random_reinit control would not reinitialize"):
        find_ticket(config, tmp_path, progress=False, model_fn=pretrained, train_fn=make_train_fn())


def test_another_network_under_the_same_config_is_refused_on_resume(tmp_path):
    find_ticket(LotteryConfig(**{**BASE, "rounds": 1}), tmp_path, progress=False, model_fn=tiny_cnn,
                train_fn=make_train_fn())

    def wider(seed):
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 36, 3))

    with pytest.raises(ValueError, match="holds a run of another network"):
        find_ticket(LotteryConfig(**{**BASE, "rounds": 1}), tmp_path, progress=False, model_fn=wider,
                    train_fn=make_train_fn())


def test_context_outside_the_search_and_foreign_optimizers():
    mask = Mask({"weight": torch.tensor([[True, False], [False, True]])})
    ctx = TrainContext(mask, round=0, kind="ticket", seed=0)
    with pytest.raises(RuntimeError, match="inside train_fn"):
        ctx.step()
    # An optimizer outside torch.optim (a hand-written update): ctx.step() still holds the mask.
    model = nn.Linear(2, 2)

    def train_fn(model, ctx):
        for _ in range(3):
            with torch.no_grad():
                model.weight += 1.0
            ctx.step()
            assert (model.weight[~mask["weight"]] == 0).all()
        return {"done": 1}

    assert run_train_fn(train_fn, model, TrainContext(mask, round=0, kind="ticket", seed=0)) == {"done": 1.0}


_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from test_user_loop import BASE, make_train_fn, tiny_cnn
from sparse_lth import LotteryConfig, find_ticket
config = LotteryConfig(**{**BASE, "rounds": 3, "iterations": 120, "controls": ("random_reinit",)})
find_ticket(config, sys.argv[1], progress=False, model_fn=tiny_cnn, train_fn=make_train_fn())
"""


def test_a_killed_search_of_a_users_loop_resumes_to_the_same_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = str(Path(__file__).parent)
    run = lambda out: subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out), here], env=env)  # noqa: E731
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run(whole).wait(timeout=300) == 0
    proc = run(killed)
    deadline = time.time() + 300
    while not list(killed.glob("*/round_01")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = [p for p in killed.iterdir() if p.is_dir()]
    assert not (run_dir / "controls" / "random_reinit" / "round_03").exists(), "killed too late to test resume"
    assert run(killed).wait(timeout=300) == 0
    (whole_dir,) = [p for p in whole.iterdir() if p.is_dir()]
    assert run_contents(run_dir) == run_contents(whole_dir)


class TiedLM(nn.Module):
    """An embedding tied to the output layer (as GPT-2 ties lm_head to wte)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(tokens))))


def test_tied_weights_are_written_and_rewound(tmp_path):
    tokens = torch.randint(0, 12, (64,), generator=torch.Generator().manual_seed(0))

    def train_fn(model, ctx):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(10):
            opt.zero_grad()
            F.cross_entropy(model(tokens[:-1]), tokens[1:]).backward()
            opt.step()
            ctx.step()
        return {"loss": F.cross_entropy(model(tokens[:-1]), tokens[1:])}

    config = LotteryConfig(model="tied-lm", dataset="tokens", rounds=1, iterations=10, controls=(),
                           include=("embed.weight",))
    ticket = find_ticket(config, tmp_path, progress=False, model_fn=lambda seed: TiedLM(), train_fn=train_fn)
    assert set(ticket.mask) == {"embed.weight", "hidden.weight"}  # the tie is named once, as named_parameters says
    from sparse_lth.run_files import last_ticket

    _, trained, _ = last_ticket(ticket.run_dir)
    assert torch.equal(trained["embed.weight"], trained["head.weight"])  # two equal copies in the file
    model = TiedLM()
    model.load_state_dict(trained)
    assert model.head.weight is model.embed.weight and (model.embed.weight[~ticket.mask["embed.weight"]] == 0).all()
