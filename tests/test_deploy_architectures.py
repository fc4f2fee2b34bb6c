"""Common architectures deploy sparse (torch only; GPT-2 and BERT are in test_transformers_deploy.py):
nn.MultiheadAttention on its own, inside nn.TransformerEncoder / DecoderLayer (the eval-mode
fused path included), and a torchvision-style ResNet. Each is built with random weights, given a
random mask (90% sparse, fixed generator), sparsified, and compared with the masked dense model:
outputs within fp32 rounding, deepcopy, save_sparse -> load_sparse -> the dense model bit for
bit, densify."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_lth import Mask, SparseMultiheadAttention, load_sparse, save_sparse
from sparse_lth.nn import SparseLinear, densify, sparsify
from sparse_lth.nn.conv import SparseConv2d

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
    pytest.mark.filterwarnings("ignore:Support for mismatched src_key_padding_mask and mask"),  # torch's, on purpose
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype"),
]
TOL = dict(rtol=1e-5, atol=2e-6)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_mask(model: nn.Module, names: list[str], density: float = 0.1, seed: int = 1, block: int = 1) -> Mask:
    """Each named weight ``density`` alive at random; with ``block``, whole block x block tiles
    of its (out, in * kh * kw) matrix (a block ticket)."""
    params = dict(model.named_parameters())
    g = gen(seed)
    tensors = {}
    for name in names:
        shape = params[name].shape
        rows, cols = shape[0], params[name][0].numel()
        tiles = torch.rand(-(-rows // block), -(-cols // block), generator=g) < density
        alive = tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
        tensors[name] = alive.reshape(shape)
    return Mask(tensors)


def projection_names(model: nn.Module) -> list[str]:
    """Every linear map's weight: nn.Linear layers and attention's in_proj_weight."""
    return [name for name, _ in model.named_parameters()
            if name.endswith("in_proj_weight") or name.endswith("out_proj.weight")
            or (name.endswith(".weight") and name.split(".")[-2].startswith("linear"))]


def assert_same_state(model: nn.Module, want: nn.Module) -> None:
    got = model.state_dict()
    assert list(got) == list(want.state_dict())
    for name, value in want.state_dict().items():
        assert torch.equal(got[name], value), name


def round_trip(sparse: nn.Module, want: nn.Module, fresh: nn.Module, tmp_path, **save_kwargs) -> dict:
    """save_sparse(sparse) loads into ``fresh`` (a dense model of other weights) and gives ``want``'s
    state bit for bit; returns the save report."""
    path = tmp_path / "model.safetensors"
    report = save_sparse(sparse, path, **save_kwargs)
    assert list(report) == list(want.state_dict())  # the dense model's names, in its order
    fresh.load_state_dict(load_sparse(path))
    assert_same_state(fresh, want)
    return report


# -- nn.MultiheadAttention ----------------------------------------------------------------------
E, HEADS = 20, 4  # head_dim 5; 3E = 60 rows: q / k / v bands start off 8-row block boundaries


def mha_and_mask(batch_first: bool, bias: bool = True, seed: int = 0) -> tuple[nn.MultiheadAttention, Mask]:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first).eval()
    if bias:  # torch starts them at zero: make them count
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha, random_mask(mha, ["in_proj_weight", "out_proj.weight"], seed=seed + 1)


def inputs(batch_first: bool, batch: int | None = 3, L: int = 6, S: int = 9):
    """query [.., L, E] and two different sources [.., S, E] (None batch: unbatched)."""
    def make(n: int, seed: int) -> torch.Tensor:
        shape = (n, E) if batch is None else ((batch, n, E) if batch_first else (n, batch, E))
        return torch.randn(shape, generator=gen(seed))
    return make(L, 10), make(S, 11), make(S, 12)


def masks(batch: int | None, L: int, S: int) -> dict[str, dict]:
    """attn_mask / key_padding_mask / is_causal combinations nn.MultiheadAttention takes."""
    kpm = torch.zeros(S, dtype=torch.bool) if batch is None else torch.zeros(batch, S, dtype=torch.bool)
    kpm[..., S - 3:] = True
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    per_head = torch.randn((HEADS if batch is None else batch * HEADS, L, S), generator=gen(13))
    return {
        "none": {},
        "padding": {"key_padding_mask": kpm},
        "float padding": {"key_padding_mask": torch.zeros(kpm.shape).masked_fill(kpm, float("-inf"))},
        "bool 2d": {"attn_mask": causal},
        "float 3d": {"attn_mask": per_head},
        "causal hint": {"attn_mask": causal, "is_causal": True},
        "causal and padding": {"attn_mask": causal, "key_padding_mask": kpm, "is_causal": True},
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("kind", ["self", "key is value", "separate"])
def test_mha_computes_what_the_masked_dense_mha_computes(batch_first, fmt, kind):
    mha, mask = mha_and_mask(batch_first)
    dense = mask.apply(copy.deepcopy(mha))
    sparse = sparsify(mha, mask, format=fmt, blocksize=8, max_density=1.0)
    assert type(sparse) is SparseMultiheadAttention and type(sparse.in_proj) is SparseLinear
    assert type(sparse.out_proj) is SparseLinear and not sparse.training
    for batch in (3, None):
        q, k, v = inputs(batch_first, batch, L=9 if kind == "self" else 6)
        k, v = {"self": (q, q), "key is value": (k, k), "separate": (k, v)}[kind]
        seq = 1 if batch is not None and batch_first else 0
        L, S = q.shape[seq], k.shape[seq]
        for case, kw in masks(batch, L, S).items():
            for need_weights in (False, True):
                for average in (True, False):
                    args = dict(kw, need_weights=need_weights, average_attn_weights=average)
                    with torch.no_grad():
                        out, weights = sparse(q, k, v, **args)
                        want, want_weights = dense(q, k, v, **args)
                    where = (batch, case, need_weights, average)
                    torch.testing.assert_close(out, want, **TOL, msg=lambda m: f"{where}: {m}")
                    if need_weights:
                        torch.testing.assert_close(weights, want_weights, **TOL, msg=lambda m: f"{where}: {m}")
                    else:
                        assert weights is None and want_weights is None


def test_mha_without_bias_and_in_training_mode():
    mha, mask = mha_and_mask(batch_first=True, bias=False)
    dense = mask.apply(copy.deepcopy(mha)).train()  # dropout 0: training mode computes the same
    sparse = sparsify(mha.train(), mask, max_density=1.0)
    assert sparse.training and sparse.in_proj.bias is None and sparse.out_proj.bias is None
    q, k, _ = inputs(True)
    with torch.no_grad():
        torch.testing.assert_close(sparse(q, k, k)[0], dense(q, k, k)[0], **TOL)
    assert list(sparse.sparse_state_dict()) == list(dense.state_dict()) == ["in_proj_weight", "out_proj.weight"]
    back = densify(sparse)
    assert type(back) is nn.MultiheadAttention and back.in_proj_bias is None and back.training
    assert_same_state(back, dense)


def test_mha_dropout_applies_in_training_mode_only():
    mha, mask = mha_and_mask(batch_first=True)
    mha.dropout = 0.5
    sparse = sparsify(mha, mask, max_density=1.0)
    q, _, _ = inputs(True)
    with torch.no_grad():
        torch.manual_seed(0)
        first = sparse.train()(q, q, q, need_weights=False)[0]
        second = sparse(q, q, q, need_weights=False)[0]
        assert not torch.allclose(first, second)  # random: dropout is on
        assert torch.equal(sparse.eval()(q, q, q)[0], sparse(q, q, q)[0])


def test_one_projection_sparse_the_other_a_dense_linear_over_the_same_weights(tmp_path):
    mha, _ = mha_and_mask(batch_first=False)
    mask = Mask({"in_proj_weight": torch.rand(3 * E, E, generator=gen(2)) < 0.6,  # 60%: stays dense
                 "out_proj.weight": torch.rand(E, E, generator=gen(3)) < 0.05})
    dense = mask.apply(copy.deepcopy(mha))
    sparse = sparsify(copy.deepcopy(mha), mask, max_density=0.2)
    assert type(sparse.in_proj) is nn.Linear and type(sparse.out_proj) is SparseLinear
    q, k, v = inputs(False)
    with torch.no_grad():
        torch.testing.assert_close(sparse(q, k, v)[0], dense(q, k, v)[0], **TOL)
    round_trip(sparse, dense, mha_and_mask(False, seed=7)[0], tmp_path)
    assert_same_state(densify(sparse), dense)
    # neither sparse enough: the attention is left as it is
    assert type(sparsify(copy.deepcopy(mha), mask, max_density=0.01)) is nn.MultiheadAttention


@pytest.mark.parametrize("options", [{"kdim": 12, "vdim": 12}, {"add_bias_kv": True}, {"add_zero_attn": True}])
def test_unsupported_attention_stays_dense_but_masked(options):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, **options).eval()
    names = [n for n, _ in mha.named_parameters() if "proj_weight" in n or n == "out_proj.weight"]
    mask = random_mask(mha, names)
    dense = mask.apply(copy.deepcopy(mha))
    out = sparsify(mha, mask, max_density=1.0)
    assert type(out) is nn.MultiheadAttention and type(out.out_proj) is not SparseLinear
    q = torch.randn(5, 2, E, generator=gen(4))
    kv = torch.randn(7, 2, options.get("kdim", E), generator=gen(5))
    with torch.no_grad():
        assert torch.equal(out(q, kv, kv)[0], dense(q, kv, kv)[0])


def test_mha_round_trips_deepcopy_and_refuses_gradients(tmp_path):
    mha, mask = mha_and_mask(batch_first=True)
    dense = mask.apply(copy.deepcopy(mha))
    sparse = sparsify(mha, mask, format="bsr", blocksize=8, max_density=1.0)
    q, k, v = inputs(True)
    with torch.no_grad():
        before = sparse(q, k, v)[0]  # row bands and sparse views are cached now: still copyable
        twin = copy.deepcopy(sparse)
        assert torch.equal(twin(q, k, v)[0], before)
        twin.in_proj.values.mul_(2.0)
        assert torch.equal(sparse(q, k, v)[0], before)  # the copy is independent
    report = round_trip(sparse, dense, mha_and_mask(True, seed=7)[0], tmp_path)
    assert report["in_proj_weight"].format == "bsr" and report["in_proj_bias"].format == "dense"
    with pytest.raises(RuntimeError, match="inference-only"):
        sparse(q.requires_grad_(), k, v)
    back = densify(sparse)
    assert type(back) is nn.MultiheadAttention and not back.training  # eval stays eval (dropout off)
    assert_same_state(back, dense)


def test_nested_input_is_a_clear_error():
    mha, mask = mha_and_mask(batch_first=True)
    sparse = sparsify(mha, mask, max_density=1.0)
    nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(5, E)])
    with pytest.raises(ValueError, match="use_nested_tensor"):
        sparse(nested, nested, nested)


# -- nn.TransformerEncoder / DecoderLayer ---------------------------------------------------------
def encoder(batch_first: bool, seed: int = 0, dropout: float = 0.1) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=batch_first)
    return nn.TransformerEncoder(layer, num_layers=2).eval()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_transformer_encoder_in_eval_mode(batch_first, fmt):
    model = encoder(batch_first)
    mask = random_mask(model, projection_names(model))
    assert len(mask) == 8  # 2 layers x (in_proj, out_proj, linear1, linear2)
    dense = mask.apply(copy.deepcopy(model))
    sparse = sparsify(model, mask, format=fmt, blocksize=16, max_density=1.0)
    for layer in sparse.layers:
        assert type(layer.self_attn) is SparseMultiheadAttention
        assert type(layer.linear1) is SparseLinear and type(layer.linear2) is SparseLinear
    assert sparse.use_nested_tensor is False and dense.use_nested_tensor is batch_first
    x = torch.randn((3, 7, 32) if batch_first else (7, 3, 32), generator=gen(6))
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = padding[2, 3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    for kw in ({}, {"src_key_padding_mask": padding}, {"mask": causal}, {"mask": causal, "is_causal": True},
               {"mask": causal, "src_key_padding_mask": padding}):
        with torch.no_grad():
            got, want = sparse(x, **kw), dense(x, **kw)
        if "src_key_padding_mask" in kw:  # the dense model's nested path writes zeros at padded positions
            keep = ~padding if batch_first else ~padding.T
            got, want = got[keep], want[keep]
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{list(kw)}: {m}")


def test_encoder_layer_fast_path_is_skipped_for_any_sparse_part():
    """MHA too dense to swap, feed-forward sparse: the eval-mode fused kernel would get a sparse
    linear1.weight and fail; the sparse layers' hook keeps the layer on its ordinary path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    mask = Mask({"linear1.weight": torch.rand(64, 32, generator=gen(1)) < 0.05,
                 "self_attn.in_proj_weight": torch.rand(96, 32, generator=gen(2)) < 0.5})
    dense = mask.apply(copy.deepcopy(layer))
    sparse = sparsify(layer, mask, max_density=0.1)
    assert type(sparse.self_attn) is nn.MultiheadAttention and type(sparse.linear1) is SparseLinear
    x = torch.randn(2, 5, 32, generator=gen(3))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), **TOL)


def test_encoder_in_training_mode_and_round_trips(tmp_path):
    model = encoder(batch_first=True, dropout=0.0).train()  # no dropout: training mode is deterministic
    mask = random_mask(model, projection_names(model))
    dense = mask.apply(copy.deepcopy(model))
    sparse = sparsify(model, mask, max_density=1.0)
    x = torch.randn(2, 6, 32, generator=gen(7))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), **TOL)
        twin = copy.deepcopy(sparse)
        assert torch.equal(twin(x), sparse(x))
    report = round_trip(sparse, dense, encoder(True, seed=9), tmp_path)
    assert report["layers.0.self_attn.in_proj_weight"].format == "csr"
    assert report["layers.1.self_attn.out_proj.weight"].format == "csr"
    back = densify(sparse)
    assert back.use_nested_tensor is True and type(back.layers[0].self_attn) is nn.MultiheadAttention
    assert_same_state(back, dense)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_transformer_decoder_layer_cross_attention(fmt, tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    mask = random_mask(layer, projection_names(layer))
    assert "multihead_attn.in_proj_weight" in mask
    dense = mask.apply(copy.deepcopy(layer))
    sparse = sparsify(layer, mask, format=fmt, blocksize=8, max_density=1.0)
    assert type(sparse.multihead_attn) is SparseMultiheadAttention
    tgt, memory = torch.randn(2, 5, 32, generator=gen(8)), torch.randn(2, 9, 32, generator=gen(9))
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    memory_padding = torch.zeros(2, 9, dtype=torch.bool)
    memory_padding[1, 6:] = True
    kw = dict(tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=memory_padding)
    with torch.no_grad():
        torch.testing.assert_close(sparse(tgt, memory, **kw), dense(tgt, memory, **kw), **TOL)
    torch.manual_seed(1)
    round_trip(sparse, dense, nn.TransformerDecoderLayer(32, 4, 64, batch_first=True), tmp_path)


# -- a torchvision-style ResNet -----------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus the input (1x1 conv + BN when
    the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32), classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    model = ResNet()
    with torch.no_grad():  # running statistics that are not 0 / 1, as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", 8)])
def test_resnet_fc_and_convs_sparse_and_a_bit_exact_checkpoint(fmt, block, tmp_path):
    model = resnet()
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() in (2, 4)]
    mask = random_mask(model, names, block=block or 1)  # BSR: whole tiles, else every block is stored
    assert "layers.2.downsample.0.weight" in mask and "fc.weight" in mask
    dense = mask.apply(copy.deepcopy(model))
    sparse = sparsify(model, mask, format=fmt, blocksize=block or 32, max_density=1.0)
    assert type(sparse.fc) is SparseLinear
    convs = [name for name, m in dense.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(type(sparse.get_submodule(name)) is SparseConv2d for name in convs)  # all groups=1, zeros padding
    assert torch.equal(sparse.layers[0].conv1.dense_weight(), dense.layers[0].conv1.weight)
    x = torch.randn(4, 3, 16, 16, generator=gen(10))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), **TOL)
        assert torch.equal(copy.deepcopy(sparse)(x), sparse(x))
    kwargs = {"format": fmt, "blocksize": block} if block else {}
    report = round_trip(sparse, dense, resnet(seed=3), tmp_path, mask=mask, **kwargs)
    conv = report["layers.2.conv1.weight"]  # a 3x3 conv, stored as its (out, in*3*3) matrix
    assert conv.format == "csr" and conv.shape == (32, 16, 3, 3) and conv.density < 0.15  # a conv layer is CSR
    assert report["fc.weight"].format == fmt
    assert report["bn1.running_var"].format == report["layers.0.bn1.num_batches_tracked"].format == "dense"
    back = densify(sparse)
    assert type(back.fc) is nn.Linear
    assert_same_state(back, dense)


def test_attention_docstring_examples_run():
    """sparse_lth.nn.attention's examples (tests/test_docs.py runs the other modules')."""
    import doctest

    import sparse_lth.nn.attention

    result = doctest.testmod(sparse_lth.nn.attention, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
