"""End to end, as a user runs it: search -> `sparse-lth convert` -> load -> sparsify."""

import pytest
import torch

from sparse_lth import LotteryConfig, build_model, densify, find_ticket, load_sparse, sparsify
from sparse_lth.cli import main
from sparse_lth.data import load_dataset
from sparse_lth.nn import SparseLinear
from sparse_lth.run_files import last_ticket


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    config = LotteryConfig(dataset="digits", rounds=6, iterations=150, eval_every=50, controls=())
    return find_ticket(config, tmp_path_factory.mktemp("runs"), progress=False)


@pytest.fixture(scope="module")
def masked_dense(ticket):
    """The deployed ticket as plain torch: the last round's trained weights, mask applied."""
    mask, trained, _ = last_ticket(ticket.run_dir)
    model = build_model("lenet300", (1, 8, 8), seed=0)
    model.load_state_dict({n: t * mask[n] if n in mask else t for n, t in trained.items()})
    return model.eval(), mask


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_cli_convert_of_a_real_ticket_loads_to_the_same_outputs(ticket, masked_dense, tmp_path, capsys, fmt):
    reference, mask = masked_dense
    dst = tmp_path / "ticket.safetensors"
    args = ["convert", str(ticket.run_dir), str(dst), "--format", fmt] + (["--block", "16"] if fmt == "bsr" else [])
    assert main(args) == 0
    assert "bytes before" in capsys.readouterr().out
    model = build_model("lenet300", (1, 8, 8), seed=123)
    model.load_state_dict(load_sparse(dst))
    x = load_dataset("digits").test.x
    assert torch.equal(model.eval()(x), reference(x))
    if fmt == "csr":  # ~26% of the weights are left: CSR (fp32 values + int16 columns) is smaller
        assert dst.stat().st_size < 0.5 * sum(t.numel() * 4 for t in model.state_dict().values())


@pytest.mark.parametrize("fmt,backend", [("csr", "scipy"), ("csr", "torch"), ("bsr", "scipy"), ("csr", "auto")])
def test_sparsified_ticket_matches_masked_dense_model(masked_dense, fmt, backend):
    reference, mask = masked_dense
    model = build_model("lenet300", (1, 8, 8), seed=0)
    model.load_state_dict(reference.state_dict())
    fast = sparsify(model, mask=mask, format=fmt, blocksize=16, backend=backend, max_density=1.0)
    assert all(isinstance(getattr(fast, n), SparseLinear) for n in ("fc1", "fc2", "out"))
    x = load_dataset("digits").test.x
    torch.testing.assert_close(fast(x), reference(x), rtol=1e-5, atol=1e-5)
    back = densify(fast)
    assert torch.equal(back(x), reference(x))
