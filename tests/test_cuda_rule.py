"""The CUDA auto rule against the H200 measurements it was read from (bench/results), and the
layer that follows it. The recorded figures are the independent reference: the rule must never
send a measured point to Triton where Triton lost to cuBLAS."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from sparse_lth import SparseLinear
from sparse_lth.kernels.cuda_rule import auto_cuda_backend, max_sparse_density

RUN2 = Path(__file__).resolve().parents[1] / "bench" / "results" / "gpu-h200-2026-11-27-run2.json.gz"


def measured_points():
    records = json.loads(gzip.decompress(RUN2.read_bytes()))["records"]
    return [r for r in records if r["backend"] == "ours" and r["status"] == "ok" and r["verified"]]


def test_the_rule_never_picks_triton_where_it_lost_on_the_h200():
    points = measured_points()
    assert len(points) > 300
    picked = 0
    for r in points:
        block = (r["block"], r["block"]) if r["layout"] == "bsr" else None
        if auto_cuda_backend(r["layout"], r["N"], r["density_actual"], block) == "triton":
            picked += 1
            assert r["speedup_vs_dense"] > 1.0, r
    assert picked > len(points) // 3  # and it is not "always dense"


def test_where_every_shape_won_clearly_the_rule_takes_triton():
    for r in measured_points():
        if r["density"] <= 0.02 and r["N"] != 128 and not (r["layout"] == "csr" and r["N"] > 16):
            block = (r["block"], r["block"]) if r["layout"] == "bsr" else None
            assert auto_cuda_backend(r["layout"], r["N"], r["density_actual"], block) == "triton", r


def test_thresholds_by_hand():
    assert max_sparse_density("csr", 1) == 0.3 and max_sparse_density("csr", 0) == 0.3
    assert max_sparse_density("csr", 17) == 0.0 and max_sparse_density("csr", 10 ** 6) == 0.0
    assert max_sparse_density("bsr", 4096, (64, 64)) == 0.3
    assert max_sparse_density("bsr", 4096, (8, 8)) == max_sparse_density("bsr", 4096, (16, 16))
    assert max_sparse_density("bsr", 1, (256, 256)) == max_sparse_density("bsr", 1, (128, 128))
    with pytest.raises(ValueError, match="layout"):
        max_sparse_density("coo", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_layer_follows_the_rule_and_computes_the_same():
    torch.manual_seed(0)
    linear = nn.Linear(512, 256).cuda().half()
    for density, batch in ((0.05, 1), (0.05, 256), (0.5, 1)):
        mask = torch.rand(256, 512, device="cuda") < density
        layer = SparseLinear.from_linear(linear, mask=mask)
        x = torch.randn(batch, 512, device="cuda", dtype=torch.half)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), x @ (linear.weight * mask).T + linear.bias, rtol=2e-2, atol=2e-2)
        dense_copy = "dense" in layer._views()
        assert dense_copy == (auto_cuda_backend("csr", batch, layer.density()) == "dense")
