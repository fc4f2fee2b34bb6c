"""SparseConv2d and its CPU kernel (sparse_lth/nn/conv.py, kernels/cpu_conv.py) against F.conv2d
on the masked dense weight: the independent reference."""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth.formats import to_sparse_weight
from sparse_lth.kernels.cpu_conv import conv2d_geometry, cpu_sparse_conv2d
from sparse_lth.nn.conv import SparseConv2d

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta"),
    pytest.mark.filterwarnings("ignore:Using padding='same'"),
]

# (batch, in, out, H, W, kernel, stride, padding, dilation); several cut the run into many tiles
# (many channels x phases, or a long batch) so tile edges and the zero tail are exercised.
GEOMETRIES = [
    (1, 8, 16, 7, 7, 1, 1, 0, 1),            # 1x1: CSR x pixels
    (4, 16, 8, 5, 9, 1, 1, 0, 1),
    (2, 6, 5, 9, 9, 1, 2, 0, 1),             # 1x1 strided
    (1, 3, 4, 8, 8, 3, 1, 1, 1),
    (4, 5, 7, 11, 13, 3, 1, 0, 1),           # odd sizes, no padding
    (2, 8, 8, 10, 10, 3, 2, 1, 1),           # stride 2
    (1, 4, 6, 12, 9, 3, 1, "same", 1),
    (1, 4, 6, 13, 13, 3, 1, 1, 2),           # dilation 2
    (2, 3, 5, 14, 14, 5, 1, 2, 1),           # 5x5
    (1, 3, 4, 15, 15, 5, 2, 0, 1),
    (1, 4, 3, 10, 12, (1, 3), 1, (0, 1), 1),   # rectangular kernels
    (2, 4, 3, 11, 8, (3, 1), (2, 1), (1, 0), 1),
    (1, 2, 3, 9, 9, (2, 4), 1, "same", (1, 2)),  # even kernel, 'same': torch's lopsided padding
    (1, 5, 5, 9, 9, 3, 3, "valid", 2),
    (2, 64, 32, 33, 33, 3, 2, 1, 1),         # 256 phase planes: short tiles, many of them
    (4, 64, 16, 24, 24, 3, 1, 1, 1),         # a long batch run: several tiles
    (1, 1, 1, 6, 6, 3, 1, 1, 1),             # one channel
    (1, 16, 8, 9, 10, 1, 1, 0, 1),           # 1x1 read in place (one image): a short last block
    (1, 96, 24, 30, 31, 1, 1, 0, 1),         # ... two tiles, the short block inside the last
    (1, 1100, 4, 10, 10, 1, 1, 0, 1),        # ... one-block tiles: the short block reaches back a tile
    (16, 8, 8, 7, 7, 3, 1, 1, 1),            # wide blocks over a batch-innermost run (976 positions)
    (3, 8, 8, 7, 7, 3, 1, 1, 1),             # the batch innermost, 3 images: blocks end inside a pixel
    (5, 8, 8, 14, 14, 3, 1, 1, 1),           # ... 5 images under wide blocks (1,110 positions)
    (4, 16, 8, 30, 30, 3, 2, 1, 1),          # wide blocks over stride-2 phases
]
DENSITIES = [0.0, 0.05, 0.5, 1.0]


def _case(geometry, density: float, dtype: torch.dtype, bias: bool, seed: int = 0):
    n, c, o, h, w, k, stride, padding, dilation = geometry
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(c, o, (kh, kw), stride, padding, dilation, bias=bias).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(o, generator=gen))
    mask = torch.rand(conv.weight.shape, generator=gen) < density
    x = torch.randn(n, c, h, w, generator=gen).to(dtype)
    return conv, mask, x


def _reference(conv: nn.Conv2d, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """F.conv2d on the masked weight, in fp64 (the dtype's own rounding is the tolerance's job)."""
    bias = None if conv.bias is None else conv.bias.double()
    with torch.no_grad():
        return F.conv2d(x.double(), conv.weight.double() * mask, bias, conv.stride, conv.padding, conv.dilation)


def _assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    eps = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=eps, atol=eps * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(map(str, g)).replace(" ", ""))
def test_matches_masked_dense_conv(geometry, density, dtype):
    bias = GEOMETRIES.index(geometry) % 2 == 0 or density == 0.0  # all-pruned: the output is the bias
    conv, mask, x = _case(geometry, density, dtype, bias)
    layer = SparseConv2d.from_conv(conv, mask=mask)
    assert layer.nnz == int(mask.sum())
    with torch.no_grad():
        got = layer(x)
        assert torch.equal(F.conv2d(x, layer.dense_weight(), layer.bias, conv.stride, conv.padding, conv.dilation),
                           conv._conv_forward(x, conv.weight * mask, conv.bias))
    _assert_close(got, _reference(conv, mask, x), dtype)


@pytest.mark.parametrize("n,out_channels", [(0, 4), (2, 0)], ids=["no-images", "no-output-channels"])
def test_empty_batch_or_output_gives_the_output_shape(n, out_channels):
    w = torch.randn(out_channels, 3, 3, 3)
    W = w.reshape(out_channels, 27).to_sparse_csr()
    x = torch.randn(n, 3, 5, 5)
    from sparse_lth.kernels.cpu_conv import cpu_sparse_conv2d

    y = cpu_sparse_conv2d(x, W.crow_indices(), W.col_indices(), W.values(), kernel_size=3, stride=2, padding=1)
    assert y.shape == (n, out_channels, 3, 3) and y.dtype == x.dtype  # 5x5, stride 2, padding 1 -> 3x3


@pytest.mark.parametrize("channels", [1, 2, 7, 16, 33, 64])
def test_channel_counts(channels):
    conv, mask, x = _case((2, channels, 65 - channels, 9, 8, 3, 1, 1, 1), 0.3, torch.float32, True, seed=channels)
    with torch.no_grad():
        _assert_close(SparseConv2d.from_conv(conv, mask=mask)(x), _reference(conv, mask, x), torch.float32)


def test_random_geometries_match_f_conv2d():
    rng = random.Random(0)
    for i in range(40):
        k = (rng.choice([1, 2, 3, 5]), rng.choice([1, 3, 4]))
        stride = (rng.choice([1, 2, 3]), rng.choice([1, 2]))
        dilation = (rng.choice([1, 2]), rng.choice([1, 3]))
        padding = rng.choice([0, 1, (2, 1), "valid", "same"])
        if padding == "same":
            stride = (1, 1)
        h, w = rng.randint(k[0] * dilation[0] + 2, 20), rng.randint(k[1] * dilation[1] + 2, 20)
        geometry = (rng.choice([1, 3]), rng.randint(1, 12), rng.randint(1, 12), h, w, k, stride, padding, dilation)
        conv, mask, x = _case(geometry, rng.choice([0.05, 0.3, 1.0]), torch.float32, i % 2 == 0, seed=i)
        with torch.no_grad():
            _assert_close(SparseConv2d.from_conv(conv, mask=mask)(x), _reference(conv, mask, x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_computed_in_fp32(dtype):
    conv, mask, x = _case((2, 8, 6, 9, 9, 3, 1, 1, 1), 0.3, dtype, True)
    with torch.no_grad():
        got = SparseConv2d.from_conv(conv, mask=mask)(x)
    _assert_close(got, _reference(conv, mask, x), dtype)


def test_two_threads_split_the_work():
    conv, mask, x = _case((3, 16, 24, 12, 12, 3, 2, 1, 1), 0.2, torch.float32, True)
    layer = SparseConv2d.from_conv(conv, mask=mask)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # tests run on one thread (conftest); the kernel follows torch
    try:
        with torch.no_grad():
            got = layer(x)
    finally:
        torch.set_num_threads(before)
    _assert_close(got, _reference(conv, mask, x), torch.float32)


def test_unbatched_input_and_nonzeros_without_mask():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.5)
    layer = SparseConv2d.from_conv(conv)
    assert layer.nnz == int((conv.weight != 0).sum())
    x = torch.randn(3, 6, 6)
    with torch.no_grad():
        _assert_close(layer(x), _reference(conv, torch.ones_like(conv.weight, dtype=torch.bool), x), torch.float32)


def test_bad_inputs_are_clear_errors():
    layer = SparseConv2d.from_conv(nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"expects input \[N, 3, H, W\]"):
            layer(torch.randn(1, 5, 8, 8))
        with pytest.raises(ValueError, match=r"expects input"):
            layer(torch.randn(8, 8))
        with pytest.raises(ValueError, match="dtype"):
            layer(torch.randn(1, 3, 8, 8, dtype=torch.float64))
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            layer(torch.randn(1, 3, 2, 8))
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(torch.randn(1, 3, 8, 8, requires_grad=True))
    with pytest.raises(ValueError, match="grouped and depthwise convs stay dense"):
        SparseConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        SparseConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="needs an nn.Conv2d"):
        SparseConv2d.from_conv(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="backend"):
        SparseConv2d.from_conv(nn.Conv2d(3, 4, 3), backend="triton")
    with pytest.raises(ValueError, match="stores CSR"):
        SparseConv2d(to_sparse_weight(torch.randn(4, 3, 3, 3), "bsr", 2))
    with pytest.raises(ValueError, match="logical shape"):
        SparseConv2d(to_sparse_weight(torch.randn(4, 27), "csr"))
    with pytest.raises(ValueError, match="'same' needs stride 1"):
        conv2d_geometry((8, 8), 3, stride=2, padding="same")


def test_kernel_refuses_malformed_indices_and_mismatched_inputs():
    W = torch.randn(4, 18).to_sparse_csr()
    x = torch.randn(1, 2, 6, 6)
    col = W.col_indices().clone()
    col[3] = 18  # past the 2 x 3 x 3 columns
    with pytest.raises(ValueError, match="col"):
        cpu_sparse_conv2d(x, W.crow_indices(), col, W.values(), kernel_size=3)
    with pytest.raises(ValueError, match="share one floating dtype"):
        cpu_sparse_conv2d(x.double(), W.crow_indices(), W.col_indices(), W.values(), kernel_size=3)
    with pytest.raises(ValueError, match="bias must have shape"):
        cpu_sparse_conv2d(x, W.crow_indices(), W.col_indices(), W.values(), torch.zeros(3), kernel_size=3)
    with pytest.raises(ValueError, match="4-D"):
        cpu_sparse_conv2d(x[0], W.crow_indices(), W.col_indices(), W.values(), kernel_size=3)


def test_dense_backend_and_dense_conv_agree():
    conv, mask, x = _case((2, 6, 5, 10, 10, 3, 2, 1, 1), 0.2, torch.float32, True)
    layer = SparseConv2d.from_conv(conv, mask=mask)
    with torch.no_grad():
        sparse = layer(x)
        layer.backend = "dense"
        assert "backend=dense" in repr(layer)
        _assert_close(layer(x), _reference(conv, mask, x), torch.float32)
        back = layer.to_dense_conv()
        assert type(back) is nn.Conv2d and back.stride == conv.stride and back.padding == conv.padding
        assert torch.equal(back.weight, conv.weight * mask) and torch.equal(back.bias, conv.bias)
        torch.testing.assert_close(back(x), sparse, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_recheck():
    conv, mask, x = _case((1, 4, 6, 8, 8, 3, 1, 1, 1), 0.3, torch.float32, True)
    layer = SparseConv2d.from_conv(conv, mask=mask)
    state = layer.state_dict()
    assert sorted(state) == ["bias", "col_indices", "crow_indices", "values"]
    assert state["crow_indices"].dtype == torch.int32
    other = SparseConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), mask=mask)
    with torch.no_grad():
        other(x)  # builds the cached taps: a load must drop them
        other.load_state_dict(state)
        assert torch.equal(other(x), layer(x))
    bad = {k: v.clone() for k, v in state.items()}
    bad["col_indices"][0] = 4 * 9
    with pytest.raises(ValueError, match="loaded state dict"):
        other.load_state_dict(bad)
    sparse_state = layer.sparse_state_dict()
    assert sparse_state["weight"].shape == (6, 4, 3, 3)
    assert torch.equal(sparse_state["weight"].to_dense(), conv.weight.detach() * mask)
    assert torch.equal(sparse_state["bias"], conv.bias.detach())


def test_deepcopy_to_and_in_place_edits():
    conv, mask, x = _case((2, 5, 4, 9, 9, 3, 1, 1, 1), 0.4, torch.float32, True)
    layer = SparseConv2d.from_conv(conv, mask=mask)
    with torch.no_grad():
        y = layer(x)
        twin = copy.deepcopy(layer)
        assert torch.equal(twin(x), y) and twin.values.data_ptr() != layer.values.data_ptr()
        twin.values.mul_(2)  # an in-place edit: the cached dense copy must not go stale
        twin.backend = "dense"
        _assert_close(twin(x), 2 * _reference(conv, mask, x) - conv.bias.double().view(1, -1, 1, 1), torch.float32)
        assert torch.equal(layer(x), y)
        wide = layer.to(torch.float64)
        assert wide.values.dtype == torch.float64 and wide.crow_indices.dtype == torch.int32
        _assert_close(wide(x.double()), _reference(conv, mask, x), torch.float64)


def test_prepared_launch_follows_the_layer():
    """The CPU launch is prepared once per input signature: a second call, a new bias tensor, an
    in-place edit of the values, another input size and another thread count all still give what
    F.conv2d gives on the weight as it is then."""
    conv, mask, x = _case((1, 6, 5, 9, 9, 3, 1, 1, 1), 0.3, torch.float32, True)
    layer = SparseConv2d.from_conv(conv, mask=mask, backend="sparse")
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            for _ in range(2):
                _assert_close(layer(x), _reference(conv, mask, x), torch.float32)
            layer.bias = torch.randn(5)
            conv.bias.copy_(layer.bias)
            _assert_close(layer(x), _reference(conv, mask, x), torch.float32)
            layer.values.mul_(-3)
            conv.weight.mul_(-3)
            _assert_close(layer(x), _reference(conv, mask, x), torch.float32)
            bigger = torch.randn(3, 6, 12, 7)
            _assert_close(layer(bigger), _reference(conv, mask, bigger), torch.float32)
            torch.set_num_threads(1)
            _assert_close(layer(x), _reference(conv, mask, x), torch.float32)
            layer.bias = None
            conv.bias = None
            _assert_close(layer(x), _reference(conv, mask, x), torch.float32)
    finally:
        torch.set_num_threads(threads)
    kept = [k for k in layer._cache() if isinstance(k, tuple) and k[0] == "launch"]
    # one launch per input signature since the edit: two shapes, and the first at two thread counts
    assert len(kept) == (3 if threads != 1 else 2)


@pytest.mark.parametrize("geometry,in_place", [
    ((1, 16, 8, 9, 10, 1, 1, 0, 1), True),   # 90 pixels: one block and a short one
    ((1, 16, 8, 33, 33, 1, 1, 0, 1), True),  # 1,089 pixels: wide blocks, a short one at the end
    ((1, 16, 8, 7, 7, 1, 1, 0, 1), False),   # 49 pixels: less than one block, packed with a zero tail
    ((2, 16, 8, 9, 10, 1, 1, 0, 1), False),  # two images: planes are [in, images, pixels], packed
    ((1, 16, 8, 9, 10, 1, 2, 0, 1), False),  # strided: x[..., ::2, ::2] is 5x5, less than a block: packed
    ((1, 16, 8, 20, 21, 1, 2, 0, 1), True),  # strided: x[..., ::2, ::2] is 10x11, read in place
    ((1, 16, 8, 20, 21, 1, (3, 2), 0, 1), True),  # ... 7x11
    ((1, 16, 8, 9, 10, 1, 1, 1, 1), False),  # padded: packed
])
def test_1x1_reads_its_input_in_place_only_where_the_layout_matches(geometry, in_place):
    conv, mask, x = _case(geometry, 0.5, torch.float32, True)
    layer = SparseConv2d.from_conv(conv, mask=mask, backend="sparse")
    with torch.no_grad():
        _assert_close(layer(x), _reference(conv, mask, x), torch.float32)
    launches = [v for k, v in layer._cache().items() if isinstance(k, tuple) and k[0] == "launch"]
    assert [launch.in_place for launch in launches] == [in_place]
    stride = conv.stride
    assert launches[0].subsample == (stride if stride != (1, 1) and conv.padding == (0, 0) else None)
    positions = x.shape[0] * -(-x.shape[2] // stride[0]) * -(-x.shape[3] // stride[1])
    assert launches[0].wide == (positions >= 900)  # 128-position blocks on long runs


_GUARDED_READ = """
import ctypes, mmap, sys
import numpy as np, torch, torch.nn.functional as F
from sparse_lth.kernels.cpu_conv import cpu_sparse_conv2d
c, h, w = (int(v) for v in sys.argv[1:4])  # the kernel reads x in place; its last block is short
page = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * page + c * h * w * 4)
end = (len(buf) // page) * page - page  # the last whole page: no access
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
assert libc.mprotect(base + end, page, 0) == 0  # PROT_NONE: a read there is a segfault
x = torch.from_numpy(np.frombuffer(buf, np.float32, c * h * w, end - c * h * w * 4).reshape(1, c, h, w))
x.copy_(torch.randn(1, c, h, w))
w4 = torch.randn(8, c, 1, 1) * (torch.rand(8, c, 1, 1) < 0.5)
W = w4.reshape(8, -1).to_sparse_csr()
y = cpu_sparse_conv2d(x, W.crow_indices(), W.col_indices(), W.values(), kernel_size=1)
torch.testing.assert_close(y, F.conv2d(x, w4), rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the guard page is made with Linux's mprotect")
@pytest.mark.parametrize("c,h,w", [(24, 9, 10), (12, 33, 33)], ids=["64-blocks", "wide-blocks"])
def test_in_place_1x1_never_reads_past_the_input(c, h, w):
    """x placed right before a page that may not be read: a kernel reading past its input's end
    (the short last block: 90 pixels in 64-blocks, 1,089 in 128-blocks) dies with a segfault
    instead of reading a neighbour's memory."""
    run = subprocess.run([sys.executable, "-c", _GUARDED_READ, str(c), str(h), str(w)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


_MORE_THREADS = """
import sys
import numba, torch, torch.nn.functional as F
from sparse_lth.kernels.cpu_conv import cpu_sparse_conv2d, prepare_cpu_sparse_conv2d
torch.manual_seed(0)
for threads in (3, 4):
    torch.set_num_threads(threads)
    for n, k, stride, hw in [(1, 3, 1, 7), (2, 3, 1, 7), (3, 3, 2, 9), (5, 3, 1, 14), (7, 1, 1, 6), (2, 3, 1, 30)]:
        w = torch.randn(6, 5, k, k) * (torch.rand(6, 5, k, k) < 0.4)
        W = w.reshape(6, -1).to_sparse_csr()
        x, b = torch.randn(n, 5, hw, hw), torch.randn(6)
        args = (W.crow_indices(), W.col_indices(), W.values())
        y = cpu_sparse_conv2d(x, *args, b, kernel_size=k, stride=stride, padding=k // 2)
        torch.testing.assert_close(y, F.conv2d(x, w, b, stride=stride, padding=k // 2), rtol=1e-5, atol=1e-5)
        launch = prepare_cpu_sparse_conv2d(x, *args, kernel_size=k, stride=stride, padding=k // 2)
        assert (launch.threads, launch.slices) == (threads, min(threads, n)), (launch.threads, launch.slices)
print("ok")
"""


def test_more_threads_than_cores_and_slices_that_do_not_divide_the_batch():
    """3 and 4 threads (numba's pool enlarged past this machine's cores): threads that share a
    slice (batch 1, 2, 3 under 4 threads), slices of unequal use (5 and 7 images in 3 or 4
    slices, the last padded with zero images), strided and 1x1 convs, against F.conv2d."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}
    run = subprocess.run([sys.executable, "-c", _MORE_THREADS], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


_KEEPS_TORCH_THREADS = """
import torch
torch.set_num_threads(1)
torch.randn(64, 64) @ torch.randn(64, 64)  # torch has run: numba's pool starting now used to reset its count
from sparse_lth.kernels.cpu_conv import cpu_sparse_conv2d
from sparse_lth.kernels.cpu_spmm import cpu_csr_linear
W = (torch.randn(8, 4 * 9) * (torch.rand(8, 4 * 9) < 0.5)).to_sparse_csr()
cpu_sparse_conv2d(torch.randn(1, 4, 6, 6), W.crow_indices(), W.col_indices(), W.values(), kernel_size=3)
after_conv = torch.get_num_threads()
cpu_csr_linear(torch.randn(3, 36), W.crow_indices(), W.col_indices(), W.values(), 8)
print(after_conv, torch.get_num_threads())
"""


def test_the_first_sparse_call_keeps_torchs_thread_count():
    """numba's OpenMP pool shares libgomp with torch: started after a torch op, it set torch's
    thread count to its own pool size (a user's torch.set_num_threads(1) read 2 after the first
    sparse call). Two threads in numba's pool, so the test can fail on a 1-core machine too."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-c", _KEEPS_TORCH_THREADS], capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["1", "1"]


def test_a_launch_reuses_its_output_only_once_nothing_holds_it():
    """The launch keeps its last output's memory for the next call (no fresh pages to fault in)
    but never hands out memory a caller still holds, directly or through a view."""
    from sparse_lth.kernels.cpu_conv import prepare_cpu_sparse_conv2d

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=gen) * (torch.rand(6, 5, 3, 3, generator=gen) < 0.4)
    W = w.reshape(6, -1).to_sparse_csr()
    xs = [torch.randn(2, 5, 8, 8, generator=gen) for _ in range(4)]
    launch = prepare_cpu_sparse_conv2d(xs[0], W.crow_indices(), W.col_indices(), W.values(), kernel_size=3, padding=1)
    expected = [F.conv2d(x, w, padding=1) for x in xs]
    first = launch(xs[0], W.values(), None)
    second = launch(xs[1], W.values(), None)  # `first` is held: new memory
    assert first.data_ptr() != second.data_ptr()
    address = second.data_ptr()
    del second
    third = launch(xs[2], W.values(), None)  # nothing holds the second output: its memory again
    assert third.data_ptr() == address
    row = third[1]  # a view holds the memory too
    del third
    fourth = launch(xs[3], W.values(), None)
    assert fourth.data_ptr() != address
    for got, want in [(first, expected[0]), (row, expected[2][1]), (fourth, expected[3])]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_repr_shows_geometry_density_and_backend():
    layer = SparseConv2d.from_conv(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2),
                                   mask=torch.zeros(3, 2, 3, 3, dtype=torch.bool), backend="sparse")
    assert repr(layer) == ("SparseConv2d(2, 3, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(2, 2), "
                           "density=0.0000, bias=True, backend=sparse)")


# -- in a model: sparsify, calibration, densify, torch.compile / torch.export ------------------------
def _conv_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2),
                         nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.Conv2d(16, 8, 1), nn.Flatten(),
                         nn.Linear(8 * 7 * 7, 10)).eval()


def _conv_mask(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.rand(p.shape) < 0.1 for n, p in model.named_parameters() if n.endswith("weight")}


def test_sparsify_swaps_plain_convs_and_densify_gives_them_back():
    from sparse_lth import densify, sparsify

    model = _conv_model()
    mask = _conv_mask(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, alive in mask.items():
            ref.get_parameter(name).mul_(alive)
    x = torch.randn(2, 3, 16, 16)
    sparse = sparsify(copy.deepcopy(model), mask=mask, max_density=1.0, example_inputs=x)
    kinds = [type(m).__name__ for m in sparse]
    assert kinds[0] == kinds[2] == kinds[4] == "SparseConv2d" and kinds[3] == "Conv2d"  # grouped stays dense
    for i in (0, 2, 4):
        assert sparse[i].calibration is not None and sparse[i].backend in ("dense", "sparse")
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), ref(x), rtol=1e-5, atol=1e-5)
    back = densify(sparse)
    assert [type(m).__name__ for m in back] == [type(m).__name__ for m in model]
    for (n, a), (_, b) in zip(back.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_a_sparse_conv_model_compiles_whole_and_exports_with_the_custom_op(backend):
    from sparse_lth import sparsify

    model = _conv_model()
    mask = _conv_mask(model)
    sparse = sparsify(copy.deepcopy(model), mask=mask, max_density=1.0)
    for m in sparse.modules():
        if isinstance(m, SparseConv2d):
            m.backend = backend
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = sparse(x)
        compiled = torch.compile(sparse, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(sparse, (x,))
    targets = [str(n.target) for n in program.graph.nodes]
    assert targets.count("sparse_lth.conv2d.default") == 3
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-5)


def test_the_conv_op_keeps_its_launch_with_the_weight_and_follows_edits():
    """``sparse_lth::conv2d`` (what a compiled graph calls) keeps one prepared launch per weight,
    geometry and input signature, and plans again when the values change in place or other
    buffers come in."""
    from sparse_lth.nn import ops

    conv, mask, x = _case((1, 6, 5, 9, 9, 3, 1, 1, 1), 0.3, torch.float32, True)
    layer = SparseConv2d.from_conv(conv, mask=mask, backend="sparse")
    crow, col, values = layer.crow_indices, layer.col_indices, layer.values

    def op(padding, input_=x):
        return torch.ops.sparse_lth.conv2d(input_, crow, col, values, layer.bias, [3, 3], [1, 1], padding, False,
                                           [1, 1])

    with torch.no_grad():
        _assert_close(op([1, 1]), _reference(conv, mask, x), torch.float32)
        cache = ops._CONV_CACHES[col][3]
        _assert_close(op([1, 1]), _reference(conv, mask, x), torch.float32)
        assert ops._CONV_CACHES[col][3] is cache and len(cache) == 1  # the same launch, no new plan
        unpadded = F.conv2d(x, conv.weight * mask, conv.bias)
        _assert_close(op([0, 0]), unpadded.double(), torch.float32)
        assert len(cache) == 2  # one per geometry
        values.mul_(-2)
        conv.weight.mul_(-2)
        _assert_close(op([1, 1]), _reference(conv, mask, x), torch.float32)
        assert ops._CONV_CACHES[col][3] is not cache  # planned again after the edit


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton block-sparse conv)")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("padding", [1, "same", 0])
def test_the_sparse_path_on_cuda_is_the_triton_conv(padding, channels_last):
    torch.manual_seed(5)
    conv = nn.Conv2d(48, 40, (3, 3) if padding != "same" else (4, 4), padding=padding).cuda().half()
    mask = torch.rand(conv.weight.shape, device="cuda") < 0.2
    layer = SparseConv2d.from_conv(conv, mask=mask, backend="sparse")
    assert layer.backend_candidates(torch.zeros(1, 48, 9, 9, device="cuda", dtype=torch.half)) == ["dense", "sparse"]
    x = torch.randn(2, 48, 9, 9, device="cuda", dtype=torch.half)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = F.conv2d(x.float(), (conv.weight * mask).float(), conv.bias.float(), padding=padding)
        y = layer(x)
        torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    # the memory format F.conv2d would give (padding="same" pads with F.pad first, which keeps it)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("n,c,h,w,pad_top,pad_left,hph,wph,first,per", [
    (1, 3, 5, 7, 1, 1, 7, 9, 0, 1),    # padded all round
    (2, 4, 6, 6, 0, 0, 4, 5, 0, 2),    # planes cut short of the image (rows and columns never read)
    (1, 2, 3, 3, 2, 3, 9, 9, 0, 1),    # padding wider than the image
    (3, 1, 4, 4, 1, 0, 6, 3, 0, 3),
    (1, 1, 2, 2, 5, 4, 3, 3, 0, 1),    # all padding: nothing of the image lands in the plane
    (5, 2, 4, 5, 1, 1, 6, 7, 3, 3),    # the last thread's slice: images 3 and 4, then a zero image
])
def test_plain_pack_writes_what_the_general_pack_writes(n, c, h, w, pad_top, pad_left, hph, wph, first, per):
    from sparse_lth.kernels import cpu_conv

    x = np.random.default_rng(0).random((n, c, h, w), dtype=np.float32)
    general = np.full(c * per * hph * wph + 10, np.nan, np.float32)  # a tail past the planes, zeroed by both
    plain = general.copy()
    cpu_conv._pack(x, general, first, per, 1, pad_top, pad_left, 1, 1, hph, wph)
    cpu_conv._pack_plain(x, plain, first, per, pad_top, pad_left, hph, wph)
    assert np.array_equal(general, plain)


@pytest.mark.parametrize("n,c,h,w,pad_top,pad_left,sh,sw,hph,wph,first,per,inner", [
    (3, 4, 6, 6, 1, 1, 1, 1, 8, 8, 0, 3, 3),   # the batch innermost, padded all round
    (2, 3, 7, 5, 1, 2, 2, 2, 4, 4, 0, 2, 2),   # strided: four phases
    (4, 2, 5, 6, 0, 1, 2, 1, 3, 6, 0, 4, 4),   # a stride per axis, planes cut short
    (2, 2, 4, 4, 1, 1, 2, 2, 3, 3, 0, 2, 1),   # images stacked by rows
    (6, 3, 5, 5, 1, 1, 1, 1, 7, 7, 0, 6, 2),   # groups of two images, each group's batch innermost
    (16, 2, 7, 7, 1, 1, 1, 1, 9, 9, 8, 8, 8),  # the second thread's slice of a batch of 16
    (5, 2, 5, 5, 1, 1, 2, 2, 3, 3, 3, 3, 3),   # the last slice of 5 images in 3s: one zero image
    (5, 2, 5, 5, 1, 1, 1, 1, 7, 7, 3, 3, 1),   # ... stacked by rows
])
def test_pack_lays_out_the_padded_phases_as_documented(n, c, h, w, pad_top, pad_left, sh, sw, hph, wph, first, per,
                                                       inner):
    """_pack against its docstring, computed in numpy: packed[(c * sh * sw + py * sw + px) * S +
    ((g * hph + r) * wph + q) * M + m] = x_padded[first + g * M + m, c, r * sh + py, q * sw + px]
    (zero outside x and for images past N), S = per * hph * wph, M = ``inner``; the tail past the
    planes zeroed."""
    from sparse_lth.kernels import cpu_conv

    x = np.random.default_rng(1).random((n, c, h, w), dtype=np.float32)
    big = np.zeros((first + per, c, pad_top + hph * sh + h, pad_left + wph * sw + w), np.float32)
    big[:n, :, pad_top:pad_top + h, pad_left:pad_left + w] = x
    big = big[first:]
    expected = np.zeros((c, sh, sw, per // inner, hph, wph, inner), np.float32)
    for py in range(sh):
        for px in range(sw):
            phase = big[:, :, py::sh, px::sw][:, :, :hph, :wph]  # [per, c, hph, wph]
            expected[:, py, px] = phase.reshape(per // inner, inner, c, hph, wph).transpose(2, 0, 3, 4, 1)
    packed = np.full(expected.size + 10, np.nan, np.float32)
    cpu_conv._pack(x, packed, first, per, inner, pad_top, pad_left, sh, sw, hph, wph)
    assert np.array_equal(packed[:expected.size], expected.reshape(-1))
    assert not packed[expected.size:].any()


def test_the_in_model_benchmark_script_runs():
    """bench/conv_in_model.py --smoke end to end: it checks each sparsified model against the dense
    one before timing, and prints one row per stage, batch and density."""
    script = Path(__file__).resolve().parents[1] / "bench" / "conv_in_model.py"
    run = subprocess.run([sys.executable, str(script), "--smoke", "--threads", "1"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")]
    assert len(rows) == 6, run.stdout  # two stages and a ResNet x two batches x one density
    for row in rows:
        dense, sparse, calibrated = (float(cell) for cell in row[3:6])
        assert min(dense, sparse, calibrated) > 0 and set(row[8].strip().split(", ")) <= {"sparse", "dense"}


def test_a_stray_import_of_the_kernels_leaves_the_packages_compile_cache_usable(tmp_path):
    """``pytest --doctest-modules kernels/cpu_conv.py`` imports the file as ``kernels.cpu_conv``;
    numba's disk cache is shared by path, so an entry compiled there would name a module the
    package cannot import when it next loads the entry (ModuleNotFoundError: 'kernels'). Such
    imports compile without the disk cache; the package's own import still works after one."""
    root = Path(__file__).resolve().parents[1]
    stray = (f"import sys; sys.path.insert(0, {str(root)!r}); import kernels.cpu_conv as c; c.warm_up(); "
             "print(c._conv.__module__)")
    run = subprocess.run([sys.executable, "-c", stray], capture_output=True, text=True, timeout=600, cwd=root)
    assert run.returncode == 0 and run.stdout.split()[-1] == "kernels.cpu_conv", run.stderr[-2000:]
    package = "from sparse_lth.kernels import cpu_conv; cpu_conv.warm_up(); print('ok')"
    # elsewhere, where no top-level ``kernels`` can be imported
    run = subprocess.run([sys.executable, "-c", package], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
