"""The Triton block-sparse conv (kernels/conv.py) against F.conv2d on the masked weight in float64
(the independent reference), under TRITON_INTERPRET=1 on the CPU or for real on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import DEVICE, IDS, QUIET_SPARSE_WARNINGS, assert_within_three_way, seeded
from sparse_lth.kernels._triton import has_triton

pytestmark = [pytest.mark.skipif(not has_triton(), reason="needs Triton"), QUIET_SPARSE_WARNINGS]

# bf16 tl.dot is wrong under the interpreter (operands upcast elsewhere): bf16 on CUDA only
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())

# (N, C, H, W, O, kernel, stride, padding, dilation, block)
CASES = [
    (2, 16, 6, 6, 16, (3, 3), (1, 1), (1, 1), (1, 1), (16, 16)),
    (1, 20, 7, 5, 24, (3, 3), (2, 2), (1, 1), (1, 1), (16, 16)),   # C, O not multiples of the block
    (2, 32, 5, 5, 32, (1, 1), (1, 1), (0, 0), (1, 1), (32, 16)),
    (1, 16, 9, 9, 16, (3, 2), (1, 2), (0, 1), (2, 1), (16, 32)),   # rectangular kernel, dilation
    (3, 8, 4, 4, 40, (5, 5), (1, 1), (2, 2), (1, 1), (16, 16)),
]


def _case(case, dtype, density: float, block_mask: bool):
    N, C, H, W, O, k, s, p, d, block = case
    gen = seeded(case, dtype, density, block_mask)
    w = torch.randn(O, C, *k, generator=gen)
    if block_mask:  # whole (out, channel) tiles at each tap, as a block ticket keeps them
        tiles = torch.rand(-(-O // block[0]), -(-C // block[1]), *k, generator=gen) < density
        mask = tiles.repeat_interleave(block[0], 0)[:O].repeat_interleave(block[1], 1)[:, :C]
    else:
        mask = torch.rand(O, C, *k, generator=gen) < density
    x = torch.randn(N, C, H, W, generator=gen)
    bias = torch.randn(O, generator=gen)
    return w, mask, x, bias


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-o{c[4]}-k{c[5]}-s{c[6]}-"
                                                       f"p{c[7]}-d{c[8]}-b{c[9]}")
@pytest.mark.parametrize("density,block_mask", [(0.3, False), (0.5, True), (0.0, False), (1.0, False)])
def test_block_sparse_conv_matches_the_masked_dense_conv(case, dtype, density, block_mask):
    from sparse_lth.kernels import conv_weight_to_bsr, triton_bsr_conv2d

    w, mask, x, bias = _case(case, dtype, density, block_mask)
    _, _, _, _, O, k, s, p, d, block = case
    crow, col, values = conv_weight_to_bsr(w.to(dtype), mask, block)
    y = triton_bsr_conv2d(x.to(dtype).to(DEVICE), crow.to(DEVICE), col.to(DEVICE), values.to(DEVICE),
                          bias.to(dtype).to(DEVICE), out_channels=O, kernel_size=k, stride=s, padding=p, dilation=d)
    wm = (w.to(dtype) * mask).double()
    exact = F.conv2d(x.to(dtype).double(), wm, bias.to(dtype).double(), s, p, d)
    if DEVICE == "cuda":  # cuDNN at the dtype, under the same TF32 switch the kernel follows
        at_dtype = F.conv2d(x.to(dtype).to(DEVICE), wm.to(dtype).to(DEVICE), bias.to(dtype).to(DEVICE),
                            s, p, d).cpu()
    else:
        at_dtype = F.conv2d(x.to(dtype).float(), wm.float(), bias.to(dtype).float(), s, p, d).to(dtype)
    assert_within_three_way(y.cpu(), exact, at_dtype, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_any_input_layout_gives_the_conv_and_keeps_channels_last(layout):
    """The kernel reads NHWC: a channels-last input is read in place and gives a channels-last
    output (as F.conv2d keeps it); any other input (here a strided slice) is copied and gives
    NCHW. C = 20 is not a multiple of the block width (the channel mask)."""
    from sparse_lth.kernels import conv_weight_to_bsr, triton_bsr_conv2d

    w, mask, x, bias = _case(CASES[1], torch.float32, 0.5, False)
    wide = torch.randn(1, 40, 7, 5, generator=seeded("wide"))
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else wide[:, ::2]
    assert not x.is_contiguous()
    crow, col, values = conv_weight_to_bsr(w, mask, (16, 16))
    y = triton_bsr_conv2d(x.to(DEVICE), crow.to(DEVICE), col.to(DEVICE), values.to(DEVICE), bias.to(DEVICE),
                          out_channels=24, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
    wm = (w * mask).double()
    exact = F.conv2d(x.double(), wm, bias.double(), 2, 1)
    at_dtype = F.conv2d(x.to(DEVICE), wm.float().to(DEVICE), bias.to(DEVICE), 2, 1).cpu()
    assert_within_three_way(y.cpu(), exact, at_dtype, torch.float32)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert y.is_contiguous() == (layout != "channels_last")


def test_the_layers_prepared_launches_match_the_conv_and_stay_few(monkeypatch):
    """SparseConv2d's Triton path (run here directly: under the interpreter on the CPU, or on
    CUDA) checks each input signature once and keeps the prepared launch: the same signature
    again prepares nothing, another memory format is another launch, at most _KEPT_LAUNCHES are
    kept; every output equals F.conv2d's on the masked weight."""
    from sparse_lth.kernels import conv as conv_mod
    from sparse_lth.nn import conv as layer_mod

    torch.manual_seed(3)
    dense = torch.nn.Conv2d(20, 24, 3, padding=1)
    mask = torch.rand(dense.weight.shape) < 0.4
    layer = layer_mod.SparseConv2d.from_conv(dense, mask=mask, backend="sparse").to(DEVICE)
    prepared = []
    real = conv_mod.prepare_bsr_conv2d
    monkeypatch.setattr(conv_mod, "prepare_bsr_conv2d",
                        lambda x, *a, **k: prepared.append(tuple(x.shape)) or real(x, *a, **k))
    cache = layer._cache()
    with torch.no_grad():
        for shape, channels_last in [((1, 20, 6, 6), False), ((1, 20, 6, 6), False), ((1, 20, 6, 6), True)] + [
                ((n, 20, 5, 5), False) for n in range(2, 2 + layer_mod._KEPT_LAUNCHES)]:
            x = torch.randn(shape, device=DEVICE)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            y = layer._triton(x, cache)
            expected = F.conv2d(x.double(), (dense.weight * mask).double().to(DEVICE), dense.bias.double().to(DEVICE),
                                padding=1)
            assert_within_three_way(y.cpu(), expected.cpu(), F.conv2d(x, (dense.weight * mask).to(DEVICE),
                                                                      dense.bias.to(DEVICE), padding=1).cpu(),
                                    torch.float32)
            assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert prepared[:2] == [(1, 20, 6, 6), (1, 20, 6, 6)]  # once for NCHW, once for channels-last
    assert len(prepared) == 2 + layer_mod._KEPT_LAUNCHES
    assert sum(isinstance(k, tuple) and k[0] == "triton" for k in cache) == layer_mod._KEPT_LAUNCHES
    # a bias replaced after the launch was prepared is the one added
    x = torch.randn(2, 20, 5, 5, device=DEVICE)
    with torch.no_grad():
        before = layer._triton(x, cache)
        layer.bias = layer.bias + 1.0
        assert torch.allclose(layer._triton(x, cache), before + 1.0, atol=1e-5)
        layer.bias = torch.zeros(23, device=DEVICE)  # the wrong size: checked again, not read past its end
        with pytest.raises(ValueError, match="bias must be"):
            layer._triton(x, cache)


def test_stored_blocks_follow_the_mask_and_the_layout():
    from sparse_lth.kernels import conv_weight_to_bsr

    w = torch.randn(32, 20, 3, 3)
    mask = torch.zeros(32, 20, 3, 3, dtype=torch.bool)
    mask[0, 17, 2, 1] = True  # block row 0; tap 7; channel 17 -> the second 16-channel block
    mask[31, 0, 0, 0] = True  # block row 1; tap 0; channel 0
    crow, col, values = conv_weight_to_bsr(w, mask, (16, 16))
    assert crow.tolist() == [0, 1, 2] and col.tolist() == [7 * 2 + 1, 0]  # Cp = 32: two blocks a tap
    expected = torch.zeros(2, 16, 16)
    expected[0, 0, 1] = w[0, 17, 2, 1]
    expected[1, 15, 0] = w[31, 0, 0, 0]
    assert torch.equal(values, expected)


def test_bad_arguments_are_refused():
    from sparse_lth.kernels import conv_weight_to_bsr, prepare_bsr_conv2d, triton_bsr_conv2d

    w = torch.randn(16, 16, 3, 3)
    with pytest.raises(ValueError, match="powers of two"):
        conv_weight_to_bsr(w, None, (12, 16))
    with pytest.raises(ValueError, match="does not match"):
        conv_weight_to_bsr(w, torch.ones(16, 16, 1, 1, dtype=torch.bool), (16, 16))
    crow, col, values = conv_weight_to_bsr(w, None, (16, 16))
    x = torch.randn(1, 16, 5, 5).to(DEVICE)
    args = (crow.to(DEVICE), col.to(DEVICE), values.to(DEVICE))
    with pytest.raises(ValueError, match="share"):
        triton_bsr_conv2d(x.double(), *args, out_channels=16, kernel_size=(3, 3))
    with pytest.raises(ValueError, match="one CUDA device"):
        triton_bsr_conv2d(x, *args, torch.zeros(16, device="meta"), out_channels=16, kernel_size=(3, 3))
    with pytest.raises(ValueError, match="crow"):
        triton_bsr_conv2d(x, *args, out_channels=40, kernel_size=(3, 3))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        triton_bsr_conv2d(x[..., :2, :2], *args, out_channels=16, kernel_size=(3, 3))
    launch = prepare_bsr_conv2d(x, *args, torch.zeros(16, device=DEVICE), out_channels=16, kernel_size=(3, 3))
    with pytest.raises(ValueError, match="exactly when"):
        launch(x)  # prepared with a bias, called without
    # 2**31 + 2**19 elements, none stored
    huge = torch.zeros(1, 16, 1, 1, device=DEVICE).expand(1, 16, 2**14, 2**13 + 2)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        triton_bsr_conv2d(huge, *args, out_channels=16, kernel_size=(3, 3))


def test_the_gpu_conv_script_runs_dry(tmp_path):
    """bench/gpu_conv.py, the prepared GPU check of this kernel, end to end under the interpreter."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_conv.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--dry-run", "--calls", "1",
                           "--reps", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "conv.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["max_abs_err"] <= 1e-3 * max(r["scale"], 1.0) for r in rows)
    assert [r["sparse_channels_last_out"] for r in rows] == [r["format"] == "channels_last" for r in rows]


def test_the_conv_host_cost_script_runs():
    """bench/conv_host_cost.py (the host's share of a conv call, the kernel stubbed) end to end."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "conv_host_cost.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["public", "layer", "empty"]
