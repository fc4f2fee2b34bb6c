"""Trainable sparse layers against masked dense training in plain torch (the reference)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparse_lth import densify, sparsify
from sparse_lth.masks import Mask
from sparse_lth.nn import TrainableSparseLinear, ops


def _layer_and_mask(seed: int, out: int, inp: int, density: float, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(inp, out).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(out, inp, generator=gen, dtype=dtype))
        dense.bias.copy_(torch.randn(out, generator=gen, dtype=dtype))
    mask = torch.rand(out, inp, generator=gen) < density
    return dense, mask


def _block_mask(out: int, inp: int, block: tuple[int, int], density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    br, bc = block
    blocks = torch.rand(-(-out // br), -(-inp // bc), generator=gen) < density
    return blocks.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:out, :inp].contiguous()


CASES = [  # format, blocksize, out, in (in or out not a multiple of the block: padding)
    ("csr", None, 30, 50),
    ("bsr", (16, 16), 48, 64),
    ("bsr", (16, 32), 40, 70),
]


@pytest.mark.parametrize("fmt,block,out,inp", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(3, 5), (6, 9)], ids=["15rows", "54rows"])  # MKL / numba on the CPU
def test_forward_and_gradients_match_masked_dense(fmt, block, out, inp, dtype, lead):
    dense, mask = _layer_and_mask(1, out, inp, 0.3, dtype)
    if fmt == "bsr":
        mask = _block_mask(out, inp, block, 0.4, 2)
    layer = TrainableSparseLinear.from_linear(dense, mask=mask, format=fmt, blocksize=block or 32)
    x = torch.randn(*lead, inp, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = (dense.weight.detach() * mask).requires_grad_()
    b_ref = dense.bias.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = torch.nn.functional.linear(x_ref, w_ref, b_ref)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad)
    grad_w = TrainableSparseLinear(layer.sparse_weight(), None)  # the gradient on the same pattern
    with torch.no_grad():
        grad_w.values.copy_(layer.values.grad)
    torch.testing.assert_close(grad_w.dense_weight(), w_ref.grad * mask)


def test_gradcheck_float64():
    dense, mask = _layer_and_mask(3, 6, 9, 0.4, torch.float64)
    W = (dense.weight.detach() * mask).to_sparse_csr()
    crow, col = W.crow_indices(), W.col_indices()
    crow_t, col_t, perm = ops.transpose_pattern(crow, col, (6, 9))
    values = W.values().clone().requires_grad_()
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: ops.linear(x, crow, col, v, 6, crow_t, col_t, perm),
                                    (x, values))


def test_opcheck_registrations():
    """torch's own check of a custom op: schema, fake tensor, autograd registration."""
    dense, mask = _layer_and_mask(4, 8, 12, 0.5)
    W = (dense.weight.detach() * mask).to_sparse_csr()
    crow, col = W.crow_indices(), W.col_indices()
    crow_t, col_t, perm = ops.transpose_pattern(crow, col, (8, 12))
    values = W.values().clone().requires_grad_()
    for rows in (5, ops.NUMBA_MIN_ROWS + 1):  # MKL / numba on the CPU
        x = torch.randn(rows, 12, requires_grad=True)
        dy = torch.randn(rows, 8)
        for backend in ("auto", "numba"):  # a weight this small: auto's forward is MKL's
            torch.library.opcheck(ops.linear, (x, crow, col, values, 8, crow_t, col_t, perm, backend))
        torch.library.opcheck(ops.linear_t, (dy, crow, col, values.detach(), crow_t, col_t, perm, 12))
        torch.library.opcheck(ops.sddmm, (crow, col, values.detach(), dy, x.detach()))
        torch.library.opcheck(ops.linear_backward, (dy, x.detach(), crow, col, values.detach(), crow_t, col_t, perm))


def test_transpose_pattern_against_torch():
    dense, mask = _layer_and_mask(5, 7, 11, 0.35)
    W = (dense.weight.detach() * mask).to_sparse_csr()
    crow_t, col_t, perm = ops.transpose_pattern(W.crow_indices(), W.col_indices(), (7, 11))
    Wt = (dense.weight.detach() * mask).t().contiguous().to_sparse_csr()
    assert torch.equal(crow_t, Wt.crow_indices()) and torch.equal(col_t, Wt.col_indices())
    assert torch.equal(W.values()[perm], Wt.values())


@pytest.mark.parametrize("fmt,block,batch", [("csr", None, 16), ("csr", None, 48), ("bsr", (16, 16), 16)])
def test_fifty_adam_steps_follow_masked_dense(fmt, block, batch):
    """At fixed seeds a sparse-trained layer's weights after 50 Adam steps equal masked-dense
    training's (dense forward and backward, gradient masked, Adam, weights re-masked) to fp32
    rounding."""
    torch.manual_seed(0)
    out, inp = 64, 96
    dense, mask = _layer_and_mask(6, out, inp, 0.1)
    if fmt == "bsr":
        mask = _block_mask(out, inp, block, 0.2, 7)
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        ref.weight.mul_(mask)
    layer = TrainableSparseLinear.from_linear(dense, mask=mask, format=fmt, blocksize=block or 32)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(8)
    for _ in range(50):
        x = torch.randn(batch, inp, generator=gen)
        target = torch.randn(batch, out, generator=gen)
        loss_ref = (ref(x) - target).square().mean()
        opt_ref.zero_grad()
        loss_ref.backward()
        ref.weight.grad.mul_(mask)
        opt_ref.step()
        with torch.no_grad():
            ref.weight.mul_(mask)
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(layer.dense_weight(), ref.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.detach(), ref.bias.detach(), rtol=1e-5, atol=1e-6)
    state = opt.state[layer.values]
    assert state["exp_avg"].shape == layer.values.shape  # Adam's moments sized by stored values
    assert layer.values.numel() == int(mask.sum()) if fmt == "csr" else True


def test_sparsify_trainable_and_densify():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))
    mask = Mask({"0.weight": torch.rand(16, 20) < 0.2, "2.weight": torch.rand(4, 16) < 0.5})
    expected = mask.apply(copy.deepcopy(model))
    sparse = sparsify(model, mask, trainable=True, max_density=0.3)
    assert [type(m).__name__ for m in sparse] == ["TrainableSparseLinear", "ReLU", "Linear"]
    x = torch.randn(7, 20)
    torch.testing.assert_close(sparse(x), expected(x))
    names = {n for n, _ in sparse.named_parameters()}
    assert names == {"0.values", "0.bias", "2.weight", "2.bias"}
    back = densify(sparse)
    assert type(back[0]) is nn.Linear
    torch.testing.assert_close(back[0].weight, expected[0].weight)


def test_tied_weights_share_one_values_parameter():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    mask = Mask({"0.weight": torch.rand(8, 8) < 0.3})
    sparse = sparsify(model, mask, trainable=True, max_density=1.0)
    assert sparse[0].values is sparse[1].values
    assert len(list(sparse.parameters())) == 3  # one values, two biases


def test_wrong_input_width_is_a_value_error():
    layer = TrainableSparseLinear.from_linear(nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"\[\.\.\., 6\]"):
        layer(torch.randn(2, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton SDDMM and cuBLAS sampling)")
@pytest.mark.parametrize("fmt,block,out,inp", CASES + [("bsr", (64, 64), 128, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gradients_match_masked_dense(fmt, block, out, inp, dtype):
    dense, mask = _layer_and_mask(9, out, inp, 0.3)
    if fmt == "bsr":
        mask = _block_mask(out, inp, block, 0.4, 10)
    dense, mask = dense.cuda().to(dtype), mask.cuda()
    layer = TrainableSparseLinear.from_linear(dense, mask=mask, format=fmt, blocksize=block or 32)
    x = torch.randn(33, inp, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    # fp32 reference from the same (rounded) operands
    w32 = (dense.weight.detach() * mask).float().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    y32 = torch.nn.functional.linear(x32, w32, dense.bias.detach().float())
    y32.backward(dy.float())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), y32, **tol)
    torch.testing.assert_close(x.grad.float(), x32.grad, **tol)
    grad_w = TrainableSparseLinear(layer.sparse_weight(), None)
    with torch.no_grad():
        grad_w.values.copy_(layer.values.grad)
    torch.testing.assert_close(grad_w.dense_weight().float(), w32.grad * mask, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")
@pytest.mark.parametrize("fmt,block", [("bsr", (32, 32)), ("bsr", (64, 64)), ("csr", None)])
def test_cuda_graph_replays_the_sparse_step(fmt, block):
    """A whole training step of the layer (forward, backward, the search's fused Adam) captured
    in a CUDA graph and replayed on new batches gives the weights the same steps give eagerly."""
    from sparse_lth.optim import Adam

    dense, mask = _layer_and_mask(25, 256, 192, 0.2)
    if fmt == "bsr":
        mask = _block_mask(256, 192, block, 0.3, 26)
    dense, mask = dense.cuda(), mask.cuda()
    layers = [TrainableSparseLinear.from_linear(dense, mask=mask, format=fmt, blocksize=block or 32) for _ in range(2)]
    opts = [Adam(layer.parameters(), lr=1e-2) for layer in layers]
    batches = [(torch.randn(64, 192, device="cuda"), torch.randn(64, 256, device="cuda")) for _ in range(6)]
    static_x, static_dy = batches[0][0].clone().requires_grad_(), batches[0][1].clone()

    def step(layer, opt, x, dy):
        opt.zero_grad()
        layer(x).backward(dy)
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton's autotuning) outside the capture
        for x, dy in batches[:3]:
            step(layers[0], opts[0], x.requires_grad_(), dy)
            step(layers[1], opts[1], x, dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(layers[0], opts[0], static_x, static_dy)
    for x, dy in batches[3:]:
        with torch.no_grad():
            static_x.copy_(x)
            static_dy.copy_(dy)
        graph.replay()
        step(layers[1], opts[1], x, dy)
    torch.cuda.synchronize()
    torch.testing.assert_close(layers[0].values, layers[1].values, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layers[0].bias, layers[1].bias, rtol=1e-6, atol=1e-6)


def test_evaluation_batches_use_a_dense_copy_that_follows_the_values():
    """Large no-grad batches multiply a cached dense weight; an optimizer step refreshes it."""
    from sparse_lth.nn import trainable

    dense, mask = _layer_and_mask(11, 16, 24, 0.5)
    layer = TrainableSparseLinear.from_linear(dense, mask=mask)
    x = torch.randn(trainable.EVAL_DENSE_MIN_ROWS, 24)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, layer.dense_weight(), layer.bias)
            torch.testing.assert_close(layer(x), expected)
            torch.testing.assert_close(layer(x), expected)  # the cached copy, reused
            assert "_eval_copy" in layer.__dict__
        layer(torch.randn(4, 24)).sum().backward()  # a training step changes the values
        assert "_eval_copy" not in layer.__dict__
        opt.step()
        opt.zero_grad()


def test_compile_fullgraph_and_export_see_the_custom_ops():
    """The layer's products are custom ops: torch.compile(fullgraph=True) traces forward and
    backward without a graph break, and torch.export keeps sparse_lth::linear as one node."""
    dense, mask = _layer_and_mask(12, 32, 64, 0.2)
    layer = TrainableSparseLinear.from_linear(dense, mask=mask)
    x = torch.randn(8, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w_ref = (dense.weight.detach() * mask).requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, w_ref, dense.bias.detach())
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    exported = torch.export.export(layer, (torch.randn(8, 64),))
    targets = [str(node.target) for node in exported.graph.nodes]
    assert any("sparse_lth.linear" in t for t in targets), targets


def _count_calls(monkeypatch, module, names: tuple[str, ...]) -> dict[str, int]:
    """Calls of each of ``module``'s functions ``names``, counted as they happen."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=real, **k: counts.__setitem__(_n, counts[_n] + 1)
                            or _f(*a, **k))
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias,input_grad,train_values", [(True, True, True), (False, True, True),
                                                          (True, False, True), (True, True, False)])
def test_eager_numba_path_gives_the_dense_gradients(monkeypatch, dtype, bias, input_grad, train_values):
    """A layer the numba kernels run (batch above NUMBA_MIN_ROWS, 8,192+ stored values) goes
    through ops.linear_bias's autograd.Function in eager mode; its output and the gradients of
    whatever requires one (input, values, bias) equal masked dense's."""
    calls = []
    real = ops._EagerLinear.apply
    monkeypatch.setattr(ops._EagerLinear, "apply", lambda *a: calls.append(1) or real(*a))
    from sparse_lth.kernels import cpu_spmm

    numba_calls = _count_calls(monkeypatch, cpu_spmm, ("cpu_csr_linear", "cpu_csr_linear_backward",
                                                       "cpu_csr_linear_t", "cpu_csr_sddmm"))
    dense, mask = _layer_and_mask(21, 130, 120, 0.6, dtype)
    if not bias:
        dense.bias = None
    layer = TrainableSparseLinear.from_linear(dense, mask=mask)
    layer.values.requires_grad_(train_values)
    x = torch.randn(ops.NUMBA_MIN_ROWS + 9, 120, dtype=dtype, requires_grad=input_grad)
    dy = torch.randn(x.shape[0], 130, dtype=dtype)
    y = layer(x)
    y.backward(dy)
    assert calls, "the eager path was not taken"
    assert numba_calls["cpu_csr_linear"] == 1
    expected = ("cpu_csr_linear_backward" if input_grad and train_values else
                "cpu_csr_linear_t" if input_grad else "cpu_csr_sddmm")
    assert {k for k, n in numba_calls.items() if n and k != "cpu_csr_linear"} == {expected}
    x_ref = x.detach().clone().requires_grad_(input_grad)
    w_ref = (dense.weight.detach() * mask).requires_grad_()
    b_ref = None if dense.bias is None else dense.bias.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, w_ref, b_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    assert (x.grad is None) == (not input_grad)
    if input_grad:
        torch.testing.assert_close(x.grad, x_ref.grad)
    assert (layer.values.grad is None) == (not train_values)
    if train_values:
        grad = torch.sparse_csr_tensor(layer.crow_indices, layer.col_indices, layer.values.grad, (130, 120)).to_dense()
        torch.testing.assert_close(grad, w_ref.grad * mask)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b_ref.grad)


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", (16, 16)), ("bsr", (32, 16))])
def test_eager_triton_path_gives_the_dense_gradients(monkeypatch, fmt, block):
    """``linear_bias(..., backend="triton")``, the eager path as it runs on CUDA, here under the
    Triton interpreter: the forward, the transposed product and the SDDMM all on the Triton
    kernels, and the output and every gradient equal to masked dense's."""
    from sparse_lth import kernels

    calls = _count_calls(monkeypatch, kernels, ("triton_csr_linear", "triton_bsr_linear", "triton_csr_sddmm",
                                                "triton_bsr_sddmm"))
    out, inp = 64, 96
    dense, _ = _layer_and_mask(23, out, inp, 0.3)
    mask = torch.rand(out, inp) < 0.3 if block is None else _block_mask(out, inp, block, 0.4, 24)
    layer = TrainableSparseLinear.from_linear(dense, mask=mask, format=fmt, blocksize=block or 32)
    x = torch.randn(5, inp, requires_grad=True)
    dy = torch.randn(5, out)
    y = ops.linear_bias(x, layer.crow_indices, layer.col_indices, layer.values, layer.bias, out,
                        layer.crow_t, layer.col_t, layer.perm, backend="triton")
    y.backward(dy)
    kind = "csr" if block is None else "bsr"
    assert {name: n for name, n in calls.items() if n} == {f"triton_{kind}_linear": 2, f"triton_{kind}_sddmm": 1}
    x_ref = x.detach().clone().requires_grad_()
    w_ref = (dense.weight.detach() * mask).requires_grad_()
    b_ref = dense.bias.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, w_ref, b_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    layout = torch.sparse_csr if block is None else torch.sparse_bsr
    grad = ops._make(layout, layer.crow_indices, layer.col_indices, layer.values.grad, (out, inp)).to_dense()
    torch.testing.assert_close(grad, w_ref.grad * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad)


def test_compile_leaves_the_eager_path_to_eager_mode(monkeypatch):
    """Under torch.compile(fullgraph=True) a layer the numba kernels run stays on the custom ops
    (the autograd.Function of the eager path calls numba on real tensors only), with the same
    results as eager mode."""
    calls = []
    real = ops._EagerLinear.apply
    monkeypatch.setattr(ops._EagerLinear, "apply", lambda *a: calls.append(1) or real(*a))
    dense, mask = _layer_and_mask(22, 128, 128, 0.6)
    layer = TrainableSparseLinear.from_linear(dense, mask=mask)
    x = torch.randn(ops.NUMBA_MIN_ROWS + 10, 128, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    y_eager = layer(x_eager)
    y_eager.sum().backward()
    assert calls == [1]
    grad_eager, layer.values.grad = layer.values.grad, None
    y = torch.compile(layer, fullgraph=True)(x)
    y.sum().backward()
    assert calls == [1], "the compiled graph went through the eager path"
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(x.grad, x_eager.grad)
    torch.testing.assert_close(layer.values.grad, grad_eager)


def test_jit_trace_records_the_custom_op():
    """torch.jit.trace of a layer records ``sparse_lth::linear`` (the eager path's kernels are
    invisible to a tracer) and the traced module gives the eager output on a new input."""
    dense, mask = _layer_and_mask(27, 128, 128, 0.6)
    layer = TrainableSparseLinear.from_linear(dense, mask=mask)
    x = torch.randn(ops.NUMBA_MIN_ROWS + 3, 128)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x)
        assert "sparse_lth::linear" in str(traced.graph)
        x2 = torch.randn_like(x)
        torch.testing.assert_close(traced(x2), layer(x2))


def test_auto_forward_follows_the_inference_rule(monkeypatch):
    """``backend="auto"``: the numba forward from NUMBA_MIN_STORED stored values on, MKL below
    (as eager inference picks); ``"numba"`` forces it. Results equal the dense product either way."""
    from sparse_lth.kernels import cpu as cpu_rule
    from sparse_lth.kernels import cpu_spmm

    calls = []
    real = cpu_spmm.cpu_csr_linear
    monkeypatch.setattr(cpu_spmm, "cpu_csr_linear", lambda *a: calls.append(a[3].numel()) or real(*a))
    rows = ops.NUMBA_MIN_ROWS + 1
    for out, cols, backend, numba in ((8, 12, "auto", False), (8, 12, "numba", True),
                                      (128, 128, "auto", True)):
        torch.manual_seed(0)
        dense = torch.randn(out, cols) * (torch.rand(out, cols) < 0.6)
        W = dense.to_sparse_csr()
        assert (W.values().numel() >= cpu_rule.NUMBA_MIN_STORED) == (out == 128)
        x = torch.randn(rows, cols)
        calls.clear()
        y = ops.linear(x, W.crow_indices(), W.col_indices(), W.values(), out, backend=backend)
        assert bool(calls) == numba, (out, backend)
        torch.testing.assert_close(y, x @ dense.T)


def test_the_gpu_training_script_runs_dry(tmp_path):
    """bench/gpu_training.py, the prepared GPU measurement of the sparse training step, end to
    end on the CPU: every case measured (none failed), each step checked against masked dense."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    proc = subprocess.run([sys.executable, str(bench / "gpu_training.py"), "--out", str(tmp_path), "--dry-run",
                           "--calls", "1", "--reps", "1"], capture_output=True, text=True, timeout=300, cwd=bench)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "training.json").read_text())["rows"]
    assert [(r["format"], r["block"], r["batch"]) for r in rows] == [
        ("bsr", 32, 64), ("bsr", 64, 64), ("csr", None, 64), ("bsr", 32, 2048), ("bsr", 64, 2048)]
    assert all("failed" not in r and set(r["ms"]) == {"dense", "sparse", "sparse_ops"} for r in rows), rows
    assert all(r["check_max_abs_err"] <= 1e-5 for r in rows)


def test_the_step_host_cost_script_runs(tmp_path):
    """bench/step_host_cost.py (the host's share of a step, Triton kernels stubbed) end to end:
    one line per step, each a positive time."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "step_host_cost.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    times = dict(re.findall(r"^(\w+)\s+([\d.]+) us a step", proc.stdout, re.M))
    assert set(times) == {"dense", "sparse_eager", "sparse_ops"} and all(float(t) > 0 for t in times.values())
