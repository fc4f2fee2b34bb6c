"""A GPT-2-shaped model on the CPU: dense against ``sparsify(...)``, forward latency and the bytes
of every tensor the model keeps.

The model is Hugging Face's ``GPT2Model`` (the transformer body: embeddings, 12 blocks of
attention and MLP, final LayerNorm; no LM head, whose 50257-wide logits product is dense and
untouched by the masks) built from ``GPT2Config`` with random weights (nothing is downloaded):
12 layers, width 768, 12 heads at ``--bench-size default`` (GPT-2 small's shape), 2 layers of
width 64 at ``small`` (the CI smoke run). Eval mode, ``torch.no_grad()``, fp32, sequences of
128 tokens (16 at ``small``), batch 1 and 16: 128 and 2048 rows per projection.

Masks cover every attention and MLP projection (``attn.c_attn``, ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``: 48 ``Conv1D`` weights, 85M of the model's 124M weights) at 10%
and 5% density (90% and 95% sparse), per layer by magnitude: unstructured (stored as CSR) and
whole 32 x 32 tiles by RMS (stored as BSR 32). The dense model is the masked model itself; the
sparse one is ``sparsify(copy, mask, max_density=0.25)`` (every projection swaps). Each sparse
case times dense and sparse forwards alternated in bursts (harness.run_speedup, the median of
bursts) after checking its output against dense.

Weight bytes: every parameter and buffer the model keeps, each storage once (a sparse layer's
index and value buffers included); ``projection_bytes`` counts the 48 projection weights alone
(dense: the [in, out] matrices; sparse: their CSR / BSR arrays).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from harness import assert_close, bench_size, machine_info, run_benchmark, run_speedup, size_config
from sparse_lth.masks import Mask
from sparse_lth.nn import SparseConv1D, sparsify

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]' installs it)")

BLOCK = 32
DENSITIES = (0.1, 0.05)
VARIANTS = ("sparse-csr", f"sparse-bsr{BLOCK}")
PROJECTIONS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    heads: int
    vocab: int
    positions: int
    tokens: int
    batches: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"gpt2-{self.layers}x{self.width}"


SHAPES = {
    "small": Shape(layers=2, width=64, heads=4, vocab=100, positions=32, tokens=16, batches=(1, 2)),
    "default": Shape(layers=12, width=768, heads=12, vocab=50257, positions=1024, tokens=128, batches=(1, 16)),
}
SHAPES["large"] = SHAPES["default"]


@dataclass(frozen=True)
class Case:
    density: float  # 1.0: dense
    variant: str  # "dense" | "sparse-csr" | "sparse-bsr32"
    batch: int

    @property
    def id(self) -> str:
        d = "" if self.variant == "dense" else f"-d{self.density:g}"
        return f"{d.lstrip('-')}-{self.variant}-B{self.batch}".lstrip("-")


_CASES: dict[str, Case] = {}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "gpt2_case_id" in metafunc.fixturenames:
        shape = SHAPES[bench_size(metafunc.config)]
        cases = []
        for batch in shape.batches:
            cases.append(Case(1.0, "dense", batch))
            cases += [Case(d, v, batch) for d in DENSITIES for v in VARIANTS]
        ids = [f"{shape.name}-s{shape.tokens}-{c.id}-cpu" for c in cases]
        _CASES.update(zip(ids, cases))
        metafunc.parametrize("gpt2_case_id", ids, ids=ids)


# -- models and masks -----------------------------------------------------------------------------
def _model(shape: Shape) -> nn.Module:
    transformers.logging.set_verbosity_error()  # the tiny CI vocabulary makes it warn about token ids
    config = transformers.GPT2Config(n_layer=shape.layers, n_embd=shape.width, n_head=shape.heads,
                                     vocab_size=shape.vocab, n_positions=shape.positions,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2Model(config).eval()


def projection_mask(model: nn.Module, density: float, block: int | None) -> Mask:
    """Per projection weight, the ``density`` share with the largest magnitude alive: single
    weights, or whole ``block`` x ``block`` tiles by RMS (topk: exact counts, and fast)."""
    tensors = {}
    for name, w in model.named_parameters():
        if not name.endswith(PROJECTIONS):
            continue
        w = w.detach()
        if block is None:
            keep = torch.zeros(w.numel(), dtype=torch.bool)
            keep[w.abs().flatten().topk(round(density * w.numel())).indices] = True
            tensors[name] = keep.reshape(w.shape)
            continue
        rows, cols = w.shape[0] // block, w.shape[1] // block  # GPT-2's widths are multiples of 32
        rms = w.reshape(rows, block, cols, block).square().mean(dim=(1, 3))
        tiles = torch.zeros(rows * cols, dtype=torch.bool)
        tiles[rms.flatten().topk(round(density * rows * cols)).indices] = True
        tensors[name] = tiles.reshape(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return Mask(tensors)


def kept_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer ``model`` keeps, each storage once (tied weights)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def projection_bytes(model: nn.Module) -> int:
    """Bytes of the projection weights alone (their sparse arrays where swapped); biases not counted."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, SparseConv1D):
            total += sum(t.numel() * t.element_size() for t in (m.crow_indices, m.col_indices, m.values))
        elif f"{name}.weight".endswith(PROJECTIONS) and isinstance(getattr(m, "weight", None), torch.Tensor):
            total += m.weight.numel() * m.weight.element_size()
    return total


_models: dict[tuple, tuple[nn.Module, nn.Module, Mask]] = {}


def models_for(case: Case, shape: Shape) -> tuple[nn.Module, nn.Module, Mask]:
    """(masked dense, sparse, mask), built once per density and structure (one at a time: the
    default model is 500 MB dense)."""
    key = (case.density, case.variant)
    if key not in _models:
        _models.clear()
        dense = _model(shape)
        block = BLOCK if case.variant.startswith("sparse-bsr") else None
        mask = projection_mask(dense, case.density, block) if case.variant != "dense" else Mask({})
        mask.apply(dense)
        sparse = dense
        if case.variant != "dense":
            sparse = sparsify(copy.deepcopy(dense), mask, format="bsr" if block else "csr", blocksize=BLOCK,
                              max_density=0.25).eval()
            assert sum(isinstance(m, SparseConv1D) for m in sparse.modules()) == len(mask)
        _models[key] = (dense, sparse, mask)
    return _models[key]


def _forward(model: nn.Module, tokens: torch.Tensor):
    def forward() -> None:
        with torch.no_grad():
            model(tokens)
    return forward


def test_gpt2_forward(benchmark, gpt2_case_id: str, request: pytest.FixtureRequest) -> None:
    case = _CASES[gpt2_case_id]
    shape = SHAPES[bench_size(request.config)]
    cfg = size_config(request.config)
    if bench_size(request.config) != "small":  # calls of 0.1-10 s: more of the budget, still >= 3 bursts
        cfg = replace(cfg, interleaved_s=4.0, bursts=5)
    dense, sparse, mask = models_for(case, shape)
    model = dense if case.variant == "dense" else sparse
    tokens = torch.randint(0, shape.vocab, (case.batch, shape.tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(tokens).last_hidden_state
        if model is not dense:
            assert_close(out, dense(tokens).last_hidden_state, torch.float32, gpt2_case_id)

    benchmark.group = f"{shape.name} s={shape.tokens} B={case.batch} cpu"
    benchmark.extra_info.update({
        "kind": "model", "model": shape.name, "variant": case.variant, "batch": case.batch, "tokens": shape.tokens,
        "rows": case.batch * shape.tokens, "device": "cpu", **machine_info("cpu"), "dtype": "fp32",
        "density": mask.density() if len(mask) else 1.0, "density_target": case.density,
        "weight_bytes": kept_bytes(model), "dense_weight_bytes": kept_bytes(dense),
        "projection_bytes": projection_bytes(model), "dense_projection_bytes": projection_bytes(dense),
        "layers": shape.layers, "width": shape.width, "heads": shape.heads,
    })
    if model is dense:
        run_benchmark(benchmark, _forward(dense, tokens), "cpu", cfg)
    else:
        run_speedup(benchmark, _forward(dense, tokens), _forward(sparse, tokens), "cpu", cfg)
    if not benchmark.disabled:
        benchmark.extra_info["latency_ms"] = 1e3 * float(benchmark.stats.stats.median)
