"""IDX reading, dataset lookup, the validation split, and the paper's models."""

import gzip

import numpy as np
import pytest
import torch

from sparse_lth import build_model
from sparse_lth.data import load_dataset, read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fake_mnist(folder, n_train=120, n_test=40, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            with gzip.open(folder / f"{stem}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_from_data_dir(tmp_path, gz):
    arrays = _write_fake_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", data_dir=tmp_path, val_size=20, seed=3)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (100, 20, 40)
    assert ds.input_shape == (1, 28, 28) and ds.train.x.dtype == torch.float32
    # the split is a permutation of the training set: every image lands once, labels follow it
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(ds.test.x, expected)
    all_train = torch.cat([ds.train.x, ds.val.x]).flatten(1)
    original = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255).flatten(1)
    assert sorted(map(tuple, all_train.tolist())) == sorted(map(tuple, original.tolist()))


def test_data_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "kmnist").mkdir()
    _write_fake_mnist(tmp_path / "kmnist")
    monkeypatch.setenv("SPARSE_LTH_DATA", str(tmp_path))
    assert len(load_dataset("kmnist", val_size=10).val) == 10


def test_split_is_deterministic_per_seed():
    a, b, c = (load_dataset("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.val.x, b.val.x) and not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.x, c.test.x)  # the test set never depends on the seed


def test_missing_dataset_names_the_paths_tried(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "dataset-fashion-mnist" in message and "digits" in message


def test_corrupt_idx_files_are_clear_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")  # says 5, has 2
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "bad")
    (tmp_path / "junk").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros((4, 2))))[:-10])
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(tmp_path / "cut.gz")


def test_unknown_dataset_and_bad_val_size():
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="val_size must be between"):
        load_dataset("digits", val_size=10_000)


@pytest.mark.parametrize("name,shape,weights", [
    ("lenet300", (1, 28, 28), 784 * 300 + 300 * 100 + 100 * 10),
    # Conv-2 on CIFAR: 3x3 convs 3-64-64, pool, fc 16*16*64 -> 256 -> 256 -> 10
    ("conv2", (3, 32, 32), 27 * 64 + 576 * 64 + 16384 * 256 + 256 * 256 + 2560),
    ("conv4", (3, 32, 32), 27 * 64 + 576 * 64 + 576 * 128 + 1152 * 128 + 8192 * 256 + 256 * 256 + 2560),
])
def test_models_have_the_papers_shapes(name, shape, weights):
    model = build_model(name, shape, seed=0)
    assert sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight")) == weights
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_glorot_normal_init_is_seeded():
    a, b = build_model("lenet300", seed=5), build_model("lenet300", seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    w = a.fc1.weight
    assert w.std().item() == pytest.approx((2 / (784 + 300)) ** 0.5, rel=0.02)
    assert torch.count_nonzero(a.fc1.bias) == 0


def test_fingerprint_tells_equal_data_from_other_data():
    from dataclasses import replace

    from sparse_lth.data import Split

    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.fingerprint() == b.fingerprint()
    assert load_dataset("digits", seed=1).fingerprint() != a.fingerprint()  # another validation split
    x = a.test.x.clone()
    x[0, 0, 0, 0] += 1 / 16  # one pixel of one test image
    assert replace(a, test=Split(x, a.test.y)).fingerprint() != a.fingerprint()
