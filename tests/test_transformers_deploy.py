"""Hugging Face models deploy sparse: GPT-2 (its ``Conv1D`` projections, the LM head tied to the
word embedding) and BERT (plain ``nn.Linear`` layers). Built from small configs with random
weights: nothing is downloaded. Skipped where transformers is not installed (the dev extra
installs it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[dev]' installs it)")

from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from sparse_lth import Mask, SparseConv1D, load_sparse, save_sparse  # noqa: E402
from sparse_lth.nn import SparseLinear, densify, sparsify  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta")
transformers.logging.set_verbosity_error()  # the tiny vocabulary makes it warn about token ids
TOL = dict(rtol=1e-5, atol=2e-6)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    return BertModel(config).eval()


def random_mask(model: nn.Module, names: list[str], seed: int = 1, block: int = 1) -> Mask:
    """90% sparse at random (whole block x block tiles with ``block``), each weight its own shape."""
    params = dict(model.named_parameters())
    g = gen(seed)
    tensors = {}
    for name in names:
        rows, cols = params[name].shape
        tiles = torch.rand(-(-rows // block), -(-cols // block), generator=g) < 0.1
        tensors[name] = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return Mask(tensors)


def assert_same_state(model: nn.Module, want: nn.Module) -> None:
    got = model.state_dict()
    assert list(got) == list(want.state_dict())
    for name, value in want.state_dict().items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", 16)])
def test_gpt2_conv1d_and_tied_head(fmt, block, tmp_path):
    model = gpt2()
    conv_names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv_names) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one parameter, one name
    names = [f"{n}.weight" for n in conv_names] + ["transformer.wte.weight"]
    mask = random_mask(model, names, block=block or 1)
    dense = mask.apply(copy.deepcopy(model))
    sparse = sparsify(model, mask, format=fmt, blocksize=block or 32, max_density=1.0)

    for name in conv_names:
        layer = sparse.get_submodule(name)
        assert type(layer) is SparseConv1D and layer.format == fmt
        assert (layer.nx, layer.nf) == tuple(dense.get_submodule(name).weight.shape)  # weight [in, out]
    assert type(sparse.lm_head) is SparseLinear  # found through the embedding's mask entry
    assert type(sparse.transformer.wte) is nn.Embedding  # stays dense, masked in place
    assert torch.equal(sparse.transformer.wte.weight, dense.transformer.wte.weight)

    tokens = torch.randint(0, 100, (3, 12), generator=gen(2))
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[1, 8:] = 0
    with torch.no_grad():
        got = sparse(tokens, attention_mask=attention).logits
        want = dense(tokens, attention_mask=attention).logits
        torch.testing.assert_close(got, want, **TOL)
        assert torch.equal(copy.deepcopy(sparse)(tokens, attention_mask=attention).logits, got)

    path = tmp_path / "gpt2.safetensors"
    report = save_sparse(sparse, path)
    assert list(report) == list(dense.state_dict())  # the HF model's names, lm_head.weight included
    c_attn = report["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.format == fmt and c_attn.shape == (64, 192)  # the Conv1D's own [in, out]
    assert report["lm_head.weight"].format == fmt
    fresh = gpt2(seed=5)
    fresh.load_state_dict(load_sparse(path))
    assert_same_state(fresh, dense)

    back = densify(sparse)
    assert all(type(back.get_submodule(n)) is Conv1D for n in conv_names)
    assert type(back.lm_head) is nn.Linear
    assert_same_state(back, dense)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, attention_mask=attention).logits, want, **TOL)


def test_gpt2_dense_enough_layers_stay_conv1d():
    model = gpt2()
    name = "transformer.h.0.mlp.c_fc.weight"
    mask = Mask({name: torch.rand(64, 256, generator=gen(3)) < 0.5})
    out = sparsify(model, mask, max_density=0.1)
    assert type(out.transformer.h[0].mlp.c_fc) is Conv1D
    assert torch.equal(out.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight * mask[name])


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", 16)])
def test_bert_linear_layers(fmt, block, tmp_path):
    model = bert()
    names = [f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear]
    assert len(names) == 13  # 2 layers x (query, key, value, attention output, intermediate, output) + pooler
    mask = random_mask(model, names, block=block or 1)
    dense = mask.apply(copy.deepcopy(model))
    sparse = sparsify(model, mask, format=fmt, blocksize=block or 32, max_density=1.0)
    assert all(type(sparse.get_submodule(n.removesuffix(".weight"))) is SparseLinear for n in names)
    tokens = torch.randint(0, 100, (2, 10), generator=gen(4))
    attention = torch.ones(2, 10, dtype=torch.long)
    attention[0, 6:] = 0
    with torch.no_grad():
        got, want = sparse(tokens, attention_mask=attention), dense(tokens, attention_mask=attention)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **TOL)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, **TOL)
    path = tmp_path / "bert.safetensors"
    save_sparse(sparse, path)
    fresh = bert(seed=5)
    fresh.load_state_dict(load_sparse(path))
    assert_same_state(fresh, dense)
    assert_same_state(densify(sparse), dense)
