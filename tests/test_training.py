"""Masked training keeps pruned weights exactly zero; rewinding restores the survivors exactly."""

import pytest
import torch

from sparse_lth import Mask, build_model, prune_by_magnitude
from sparse_lth.data import load_dataset
from sparse_lth import training
from sparse_lth.training import TrainSettings, make_optimizer, masked_weights, train, training_step


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("optimizer,extra", [
    ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("adam", dict(lr=1e-3, weight_decay=1e-3)),
])
def test_pruned_weights_stay_exactly_zero(digits, optimizer, extra):
    model = build_model("lenet300", digits.input_shape, seed=0)
    # warm the optimizer state on a dense run first, so momentum is non-zero when pruning lands
    mask = prune_by_magnitude(model, Mask.ones_like(model), 0.7)
    settings = TrainSettings(iterations=200, batch_size=32, optimizer=optimizer, eval_every=100, **extra)
    train(model, mask, digits, settings, seed=0)
    params = dict(model.named_parameters())
    for name, alive in mask.items():
        assert torch.count_nonzero(params[name][~alive]) == 0, name
        assert torch.count_nonzero(params[name][alive]) > 0.99 * alive.sum()  # survivors trained


def test_training_learns(digits):
    model = build_model("lenet300", digits.input_shape, seed=0)
    result = train(model, Mask.ones_like(model), digits, TrainSettings(iterations=300, eval_every=100), seed=0)
    assert [row[0] for row in result.history] == [100, 200, 300]
    assert result.summary()["final_test_accuracy"] > 0.9  # chance is 0.1


def test_early_stop_is_min_validation_loss(digits):
    model = build_model("lenet300", digits.input_shape, seed=0)
    result = train(model, Mask.ones_like(model), digits, TrainSettings(iterations=400, eval_every=50), seed=0)
    losses = [row[1] for row in result.history]
    assert result.summary()["early_stop_iteration"] == result.history[losses.index(min(losses))][0]


def test_snapshot_and_resume_from_step_match_one_run(digits):
    settings = TrainSettings(iterations=120, eval_every=40)
    model = build_model("lenet300", digits.input_shape, seed=0)
    mask = Mask.ones_like(model)
    whole = train(model, mask, digits, settings, seed=3, snapshot_at=40)
    end_whole = {k: v.clone() for k, v in model.state_dict().items()}
    # restart at step 40 from the snapshot: the same batches follow, hence the same weights
    # (the optimizer restarts, as a rewound round does, so compare with SGD without momentum)
    sgd = TrainSettings(iterations=120, eval_every=40, optimizer="sgd", lr=0.05, momentum=0.0)
    a = build_model("lenet300", digits.input_shape, seed=0)
    full = train(a, mask, digits, sgd, seed=3, snapshot_at=40)
    b = build_model("lenet300", digits.input_shape, seed=1)
    b.load_state_dict(full.snapshot)
    train(b, mask, digits, sgd, seed=3, start_step=40)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert whole.snapshot is not None and set(whole.snapshot) == set(end_whole)


def test_training_step_masked_is_plain_times_mask(digits):
    # Same start, same batch: the masked step's weights are the plain step's times the mask,
    # exactly (the mask multiplies by 1 or 0 after the same update).
    x, y = digits.train.x[:32], digits.train.y[:32]
    models = [build_model("lenet300", digits.input_shape, seed=0) for _ in range(2)]
    mask = prune_by_magnitude(models[0], Mask.ones_like(models[0]), 0.7)
    settings = TrainSettings(iterations=1, optimizer="adam", weight_decay=1e-3)
    for model, pairs in zip(models, ([], masked_weights(models[1], mask))):
        loss = training_step(model, make_optimizer(model.parameters(), settings), pairs, x, y)
        assert loss.ndim == 0 and not loss.requires_grad
    plain, masked = (dict(m.named_parameters()) for m in models)
    for name, p in masked.items():
        expected = plain[name] * mask[name] if name in mask else plain[name]
        assert torch.equal(p, expected), name


def test_train_runs_training_step_every_iteration(digits, monkeypatch):
    # bench/bench_masked_step.py times training_step: it must be the loop train() runs.
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return training_step(*args, **kwargs)

    monkeypatch.setattr(training, "training_step", counting)
    model = build_model("lenet300", digits.input_shape, seed=0)
    train(model, Mask.ones_like(model), digits, TrainSettings(iterations=30, eval_every=30), seed=0, start_step=10)
    assert len(calls) == 20


def test_sparse_training_follows_masked_dense(digits):
    """Every layer trained sparse over its mask's pattern ends where masked-dense training does
    (float rounding apart), records its plan, and leaves the model's own parameters in place."""
    settings = TrainSettings(iterations=60, batch_size=32, eval_every=30)
    results, models = {}, {}
    for mode in ("never", "always"):
        model = build_model("lenet300", digits.input_shape, seed=0)
        mask = prune_by_magnitude(model, Mask.ones_like(model), 0.8)
        before = {name: id(p) for name, p in model.named_parameters()}
        results[mode] = train(model, mask, digits, TrainSettings(**{**settings.__dict__, "sparse_training": mode}),
                              seed=0, snapshot_at=30)
        assert {name: id(p) for name, p in model.named_parameters()} == before
        assert all(type(m).__name__ != "TrainableSparseLinear" for m in model.modules())
        models[mode] = model
    assert set(results["always"].plan.values()) == {"sparse"}
    assert set(results["never"].plan.values()) == {"masked-dense"}
    for (name, p), q in zip(models["never"].named_parameters(), models["always"].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    snap_dense, snap_sparse = results["never"].snapshot, results["always"].snapshot
    assert snap_dense.keys() == snap_sparse.keys()
    for key in snap_dense:
        torch.testing.assert_close(snap_sparse[key], snap_dense[key], rtol=1e-4, atol=1e-5, msg=key)
    for a, b in zip(results["never"].history, results["always"].history):
        assert a[0] == b[0] and abs(a[1] - b[1]) < 1e-3


def test_sparse_training_plan_auto_keeps_small_layers_dense():
    model = build_model("lenet300", (1, 28, 28), seed=0)
    dense_mask = Mask.ones_like(model)
    assert set(training.sparse_training_plan(model, dense_mask, "auto").values()) == {"masked-dense"}
    sparse_mask = prune_by_magnitude(model, dense_mask, 0.9)
    plan = training.sparse_training_plan(model, sparse_mask, "auto")  # LeNet's layers are too small
    assert plan == {"fc1.weight": "masked-dense", "fc2.weight": "masked-dense", "out.weight": "masked-dense"}
    assert training.sparse_training_plan(model, sparse_mask, "always")["fc1.weight"] == "sparse"
    with pytest.raises(ValueError, match="sparse_training"):
        training.sparse_training_plan(model, sparse_mask, "sometimes")


@pytest.mark.parametrize("shape,density,expected", [
    ((4096, 4096), 0.55, "sparse"), ((4096, 4096), 0.65, "masked-dense"),
    ((1024, 1024), 0.45, "sparse"), ((1024, 1024), 0.55, "masked-dense"),
    ((4096, 784), 0.55, "sparse"), ((4096, 784), 0.65, "masked-dense"),
    ((300, 784), 0.05, "masked-dense"), ((100, 300), 0.05, "masked-dense"),
])
def test_sparse_training_plan_auto_follows_the_measured_crossover(shape, density, expected):
    """Larger layers train sparse up to higher densities (training.SPARSE_TRAINING_RULE)."""
    model = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], device="meta"))
    mask = Mask({"0.weight": torch.arange(shape[0] * shape[1]).reshape(shape) < density * shape[0] * shape[1]})
    assert training.sparse_training_plan(model, mask, "auto") == {"0.weight": expected}


def test_masks_that_keep_every_weight_are_not_multiplied(digits):
    """Round 0's all-ones mask costs no multiply a step (x * 1 == x exactly); the others stay."""
    model = build_model("lenet300", digits.input_shape, seed=0)
    mask = Mask.ones_like(model)
    pruned = prune_by_magnitude(model, mask, 0.5)
    some = Mask({name: pruned[name] if name.startswith("fc1") else mask[name] for name in mask})
    assert masked_weights(model, mask) == []
    pairs = masked_weights(model, some)
    assert [p is model.fc1.weight for p, _ in pairs] == [True]
    assert torch.equal(pairs[0][1], pruned["fc1.weight"].float())


def test_eval_chunk_bounds_the_widest_activation():
    # one example's widest activation is 4 MiB (2**20 fp32 features): 128 MiB hold 32 of them
    wide = torch.nn.Sequential(torch.nn.Linear(4, 1 << 20), torch.nn.ReLU(), torch.nn.Linear(1 << 20, 3))
    assert training.eval_chunk(wide, torch.zeros(1, 4)) == 32
    assert training.eval_chunk(torch.nn.Linear(4, 3), torch.zeros(1, 4)) == training.EVAL_CHUNK
    assert training.eval_chunk(torch.nn.Linear(4, 3), torch.zeros(1, 4), cap=7) == 7


def test_evaluate_in_chunks_matches_the_model_on_the_whole_split():
    torch.manual_seed(0)
    model = build_model("conv2", seed=0)  # 668 images a chunk (64 maps of 28 x 28)
    split = load_dataset("digits").test  # 8 x 8 images, padded into 28 x 28 below
    x = torch.nn.functional.pad(split.x, (10, 10, 10, 10))
    x, y = torch.cat([x] * 5)[:1500], torch.cat([split.y] * 5)[:1500]  # three chunks, the last one short
    assert training.eval_chunk(model.eval(), x[:1]) == 668
    loss, accuracy = training.evaluate(model, type(split)(x, y))
    with torch.no_grad():
        logits = model.eval()(x)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert accuracy == int((logits.argmax(1) == y).sum()) / len(y)
