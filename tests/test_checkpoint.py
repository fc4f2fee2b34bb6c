"""Sparse checkpoints: round trips for every dtype, file-size figures, conversion, bad input."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparse_lth import checkpoint, run_files
from sparse_lth.checkpoint import METADATA_KEY, convert_checkpoint, load_sparse, save_sparse
from sparse_lth.formats import SparseWeight
from sparse_lth.masks import Mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}

pytestmark = pytest.mark.filterwarnings("ignore:Sparse (BSR|CSR) tensor support is in beta")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in _BITS:
        return torch.equal(a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype]))
    return torch.equal(a, b)


def exact_density_mask(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    numel = int(torch.tensor(shape).prod())
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=g)[: round(density * numel)]] = True
    return flat.reshape(shape)


def header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


# -- round trips --------------------------------------------------------------------------------
SHAPES = st.sampled_from([(1, 9), (9, 1), (7, 10), (5, 3, 3, 3), (16, 8), (3, 2, 5), (12,)])


@settings(max_examples=40, deadline=None)
@given(st.lists(SHAPES, min_size=1, max_size=4), st.sampled_from(DTYPES), st.sampled_from(["csr", "bsr"]),
       st.sampled_from([1, 2, 3, (2, 4), 8]), st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.integers(0, 10**6))
def test_save_load_round_trip(shapes, dtype, fmt, block, density, seed):
    g = torch.Generator().manual_seed(seed)
    state = {f"layer{i}.weight": torch.randn(s, generator=g).to(dtype) for i, s in enumerate(shapes)}
    state["layer0.bias"] = torch.randn(3, generator=g).to(dtype)
    mask = {n: torch.rand(t.shape, generator=g) < density for n, t in state.items() if t.dim() >= 2}
    blocksize = block if fmt == "bsr" else None
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt.safetensors"
        report = save_sparse(state, path, format=fmt, blocksize=blocksize, mask=mask)
        loaded = load_sparse(path)
        sparse = load_sparse(path, dense=False)
        # a plain state dict: sparse wherever that is smaller
        masked = {n: t.masked_fill(~mask[n], 0) if n in mask else t for n, t in state.items()}
        save_sparse(masked, Path(d) / "plain.safetensors", format=fmt, blocksize=blocksize)
        plain = load_sparse(Path(d) / "plain.safetensors")
    assert list(loaded) == list(state)
    for name, t in state.items():
        assert bits_equal(loaded[name], masked[name]), name
        assert bits_equal(plain[name], masked[name]), name
        if name in mask:
            assert report[name].density == pytest.approx(mask[name].float().mean().item())
            if isinstance(sparse[name], SparseWeight):
                assert sparse[name].format == fmt and bits_equal(sparse[name].to_dense(), masked[name])
                assert report[name].nbytes < t.numel() * t.element_size()
            else:  # the sparse form would not have been smaller: stored dense, pruned entries zero
                assert report[name].format == "dense" and bits_equal(sparse[name], masked[name])
        else:
            assert report[name].format == "dense" and bits_equal(sparse[name], t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt,block", [("csr", None), ("bsr", 4), ("bsr", (3, 5))])
def test_model_round_trips_bit_for_bit(tmp_path, dtype, fmt, block):
    torch.manual_seed(0)
    make = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    ).to(dtype)
    model = make()
    model.train()(torch.randn(4, 3, 8, 8, dtype=dtype))  # running stats that are not the defaults
    mask = Mask({n: exact_density_mask(p.shape, 0.2, i) for i, (n, p) in enumerate(model.named_parameters())
                 if n in ("0.weight", "4.weight")})
    save_sparse(model, tmp_path / "m.safetensors", format=fmt, blocksize=block, mask=mask)
    mask.apply(model)
    fresh = make()
    fresh.load_state_dict(load_sparse(tmp_path / "m.safetensors"))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name  # -0.0 of a pruned weight reads back as +0.0: equal, not same bits
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    assert torch.equal(model.eval()(x), fresh.eval()(x))
    # 20% unstructured fills ~97% of small blocks (1 - 0.8**16): BSR would be larger, so dense
    expected = "csr" if fmt == "csr" else "dense"
    assert header(tmp_path / "m.safetensors")["tensors"]["4.weight"]["format"] == expected


def test_plain_state_dict_stores_sparse_only_where_smaller(tmp_path):
    w = torch.zeros(64, 64)
    w[::8, ::8] = 1.0
    state = {"sparse": w, "dense": torch.randn(64, 64), "bias": torch.zeros(64), "step": torch.tensor(7)}
    report = save_sparse(state, tmp_path / "p.safetensors")
    assert {n: r.format for n, r in report.items()} == {"sparse": "csr", "dense": "dense", "bias": "dense",
                                                        "step": "dense"}
    loaded = load_sparse(tmp_path / "p.safetensors")
    assert all(bits_equal(loaded[n], state[n]) for n in state)


def test_masked_tensor_is_stored_dense_where_sparse_is_larger(tmp_path):
    # 10% unstructured: every 32x32 block holds ~102 alive weights, so BSR stores all blocks
    # plus indices (> dense bytes), while CSR stores ~10% of values plus int16 columns.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g)
    mask = {"w": torch.rand(256, 256, generator=g) < 0.1}
    bsr = save_sparse({"w": w}, tmp_path / "b.safetensors", format="bsr", blocksize=32, mask=mask)
    csr = save_sparse({"w": w}, tmp_path / "c.safetensors", format="csr", mask=mask)
    assert bsr["w"].format == "dense" and bsr["w"].nbytes == 256 * 256 * 4
    assert csr["w"].format == "csr" and csr["w"].nbytes < 0.2 * 256 * 256 * 4
    for path in ("b.safetensors", "c.safetensors"):
        assert torch.equal(load_sparse(tmp_path / path)["w"], w.masked_fill(~mask["w"], 0))


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(4, 4)
    save_sparse({"a": w, "b": w}, tmp_path / "t.safetensors")
    loaded = load_sparse(tmp_path / "t.safetensors")
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w)


# -- the figures --------------------------------------------------------------------------------
def _ratio(tmp_path: Path, w: torch.Tensor, mask: torch.Tensor, **kw) -> float:
    save_file({"w": w}, str(tmp_path / "dense.safetensors"))
    save_sparse({"w": w}, tmp_path / "sparse.safetensors", mask={"w": mask}, **kw)
    assert bits_equal(load_sparse(tmp_path / "sparse.safetensors")["w"], w.masked_fill(~mask, 0))
    return (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size


def test_csr_file_at_5_percent_is_under_8_percent_with_int16_columns(tmp_path):
    w, mask = torch.randn(1024, 1024), exact_density_mask((1024, 1024), 0.05)
    assert _ratio(tmp_path, w, mask) <= 0.08
    assert load_file(str(tmp_path / "sparse.safetensors"))["w::col_indices"].dtype == torch.int16


def test_csr_file_at_5_percent_is_under_11_percent_with_int32_columns(tmp_path, monkeypatch):
    w, mask = torch.randn(1024, 1024), exact_density_mask((1024, 1024), 0.05)
    monkeypatch.setattr(checkpoint, "_INT16_LIMIT", 0)  # as if the width did not allow int16
    assert _ratio(tmp_path, w, mask) <= 0.11
    assert load_file(str(tmp_path / "sparse.safetensors"))["w::col_indices"].dtype == torch.int32


def test_wide_matrix_uses_int32_columns(tmp_path):
    w, mask = torch.randn(8, 40000), exact_density_mask((8, 40000), 0.05)
    assert _ratio(tmp_path, w, mask) <= 0.11
    assert load_file(str(tmp_path / "sparse.safetensors"))["w::col_indices"].dtype == torch.int32


def test_bsr_file_at_5_percent_blocks_is_under_5_3_percent(tmp_path):
    w = torch.randn(1024, 1024)
    blocks = exact_density_mask((32, 32), 0.05)
    mask = blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert _ratio(tmp_path, w, mask, format="bsr", blocksize=32) <= 0.053


# -- convert ------------------------------------------------------------------------------------
def _pruned_state() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    state = {"fc1.weight": torch.randn(64, 48), "fc1.bias": torch.randn(64), "fc2.weight": torch.randn(10, 64)}
    mask = {"fc1.weight": exact_density_mask((64, 48), 0.1, 1), "fc2.weight": exact_density_mask((10, 64), 0.5, 2)}
    return state, mask


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_convert_torch_file(tmp_path, suffix):
    state, mask = _pruned_state()
    masked = {n: t * mask[n] if n in mask else t for n, t in state.items()}
    torch.save({"state_dict": masked, "epoch": 3} if suffix == ".pth" else masked, tmp_path / f"d{suffix}")
    report = convert_checkpoint(tmp_path / f"d{suffix}", tmp_path / "s.safetensors")
    assert report.bytes_before == (tmp_path / f"d{suffix}").stat().st_size
    assert report.bytes_after == (tmp_path / "s.safetensors").stat().st_size < report.bytes_before
    assert report.densities()["fc1.weight"] == pytest.approx(0.1, abs=1e-3)
    assert report.tensors["fc1.bias"].format == "dense"
    loaded = load_sparse(tmp_path / "s.safetensors")
    assert all(torch.equal(loaded[n], masked[n]) for n in masked)
    assert "bytes before" in str(report)


def test_convert_safetensors_dense_and_sparse(tmp_path):
    state, mask = _pruned_state()
    masked = {n: t * mask[n] if n in mask else t for n, t in state.items()}
    save_file(masked, str(tmp_path / "d.safetensors"))
    r1 = convert_checkpoint(tmp_path / "d.safetensors", tmp_path / "csr.safetensors")
    r2 = convert_checkpoint(tmp_path / "csr.safetensors", tmp_path / "bsr.safetensors", format="bsr", blocksize=(2, 4))
    assert r1.tensors["fc1.weight"].format == "csr"
    assert r2.blocksize == (2, 4) and r2.tensors["fc1.weight"].block_density is not None
    assert r2.tensors["fc2.weight"].format == "dense"  # at 50% nearly every 2x4 block is alive: dense is smaller
    for path in ("csr.safetensors", "bsr.safetensors"):
        loaded = load_sparse(tmp_path / path)
        assert all(torch.equal(loaded[n], masked[n]) for n in masked)


def test_convert_run_directory_applies_the_mask(tmp_path):
    state, mask = _pruned_state()
    run = tmp_path / "lenet-mnist-abc"
    run.mkdir()
    run_files.atomic_write_json({"model": "lenet300"}, run / run_files.CONFIG_FILE)
    run_files.write_round(run, 0, {n: torch.ones_like(m) for n, m in mask.items()}, state, {"round": 0})
    run_files.write_round(run, 1, mask, state, {"round": 1})  # weights not yet zeroed at pruned places
    report = convert_checkpoint(run, tmp_path / "ticket.safetensors", format="bsr", blocksize=8)
    loaded = load_sparse(tmp_path / "ticket.safetensors")
    for n, t in state.items():
        assert torch.equal(loaded[n], t * mask[n] if n in mask else t)
    assert report.densities()["fc1.weight"] == pytest.approx(0.1, abs=1e-3)


def test_cli_convert(tmp_path, capsys):
    cli = pytest.importorskip("sparse_lth.cli")
    state, mask = _pruned_state()
    torch.save({n: t * mask[n] if n in mask else t for n, t in state.items()}, tmp_path / "d.pt")
    assert cli.main(["convert", str(tmp_path / "d.pt"), str(tmp_path / "s.safetensors"), "--format", "bsr",
                     "--block", "8"]) == 0
    out = capsys.readouterr().out
    assert "bytes before" in out and "after" in out
    assert cli.main(["convert", str(tmp_path / "d.pt"), str(tmp_path / "s2.safetensors"), "--format", "bsr"]) == 2
    assert "needs a blocksize" in capsys.readouterr().err


def test_failed_convert_leaves_no_file(tmp_path):
    bad = {"fc.weight": torch.tensor([[1.0, float("nan")], [0.0, 0.0]])}
    torch.save(bad, tmp_path / "bad.pt")
    (tmp_path / "out.safetensors").write_bytes(b"previous")
    with pytest.raises(ValueError, match=r"fc\.weight: 1 non-finite"):
        convert_checkpoint(tmp_path / "bad.pt", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "out.safetensors"]


# -- bad input ----------------------------------------------------------------------------------
@pytest.fixture
def good_file(tmp_path) -> Path:
    w = torch.zeros(6, 8)
    w[1, 2], w[4, 7], w[4, 0] = 1.0, 2.0, 3.0
    save_sparse({"fc.weight": w, "fc.bias": torch.ones(6)}, tmp_path / "good.safetensors",
                mask={"fc.weight": w != 0})
    return tmp_path / "good.safetensors"


def _rewrite(src: Path, dst: Path, edit_tensors=None, edit_meta=None) -> Path:
    tensors = load_file(str(src))
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata={METADATA_KEY: json.dumps(meta)})
    return dst


def test_truncated_and_garbage_files(good_file, tmp_path):
    data = good_file.read_bytes()
    for i, cut in enumerate((len(data) - 5, 40, 4)):
        (tmp_path / f"t{i}.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"t%d\.safetensors: not a readable safetensors file" % i):
            load_sparse(tmp_path / f"t{i}.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sparse(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        load_sparse(tmp_path / "missing.safetensors")
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable torch state dict"):
        convert_checkpoint(tmp_path / "junk.pt", tmp_path / "o.safetensors")


def test_not_a_sparse_checkpoint(tmp_path):
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a sparse_lth checkpoint"):
        load_sparse(tmp_path / "plain.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "j.safetensors"), metadata={METADATA_KEY: "{oops"})
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sparse(tmp_path / "j.safetensors")


def _set(key, value):
    def edit(meta):
        meta["tensors"]["fc.weight"][key] = value
    return edit


@pytest.mark.parametrize("edit_tensors,edit_meta,message", [
    (None, lambda m: m.update(format_version=99), r"format_version 99 is not supported"),
    (None, _set("dtype", "float16"), r"'fc\.weight': metadata says float16, the values are torch\.float32"),
    (None, _set("dtype", "complex7"), r"'fc\.weight': unknown dtype 'complex7'"),
    (None, _set("format", "coo"), r"'fc\.weight': unknown format 'coo'"),
    (None, _set("shape", [7, 8]), r"'fc\.weight'.*crow_indices has 7 entries, expected 8"),
    (None, _set("shape", [6, 2]), r"'fc\.weight'.*column index 2 at position 0 \(row 1\) is out of range \[0, 2\)"),
    (None, _set("shape", [6, -8]), r"'fc\.weight': shape \[6, -8\] is not a list of non-negative ints"),
    (None, _set("format", "bsr"), r"'fc\.weight': bsr block None is not two positive ints"),
    (None, lambda m: m["tensors"]["fc.bias"].update(shape=[5]),
     r"'fc\.bias': metadata says shape \[5\], the tensor has \[6\]"),
    (None, lambda m: m["tensors"].update(ghost={"format": "dense", "shape": [1], "dtype": "float32"}),
     r"'ghost': listed in the metadata but missing"),
    (lambda t: t.pop("fc.weight::values"), None, r"'fc\.weight': sparse part 'fc\.weight::values' is missing"),
    (lambda t: t.update(extra=torch.ones(1)), None, r"\['extra'\] are in the file but not in its metadata"),
    (lambda t: t.update({"fc.weight::col_indices": torch.tensor([2, 7, 0], dtype=torch.int16)}), None,
     r"'fc\.weight'.*row 4 is not canonical.*disagrees with the tensors"),
    (lambda t: t.update({"fc.weight::values": torch.tensor([1.0, float("inf"), 2.0])}), None,
     r"'fc\.weight' values: 1 non-finite"),
    (lambda t: t.update({"fc.weight::crow_indices": t["fc.weight::crow_indices"].float()}), None,
     r"crow_indices must be int32 or int64"),
])
def test_metadata_that_disagrees_with_the_tensors(good_file, tmp_path, edit_tensors, edit_meta, message):
    bad = _rewrite(good_file, tmp_path / "bad.safetensors", edit_tensors, edit_meta)
    with pytest.raises(ValueError, match=message):
        load_sparse(bad)


def test_bad_masks_and_weights(tmp_path):
    state = {"fc.weight": torch.randn(4, 6), "fc.bias": torch.randn(4)}
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"mask\['fc\.weight'\] has shape \(6, 4\), tensor 'fc\.weight' has \(4, 6\)"):
        save_sparse(state, path, mask={"fc.weight": torch.ones(6, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask names 'fc2\.weight', which the state dict has no tensor of"):
        save_sparse(state, path, mask={"fc2.weight": torch.ones(4, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask\['fc\.weight'\] must be a bool tensor"):
        save_sparse(state, path, mask={"fc.weight": torch.ones(4, 6)})
    for bad in (float("nan"), float("inf")):
        w = state["fc.weight"].clone()
        w[2, 3] = bad
        with pytest.raises(ValueError, match=r"fc\.weight: 1 non-finite value.*\(2, 3\)"):
            save_sparse({"fc.weight": w}, path, mask={"fc.weight": torch.ones(4, 6, dtype=torch.bool)})
        with pytest.raises(ValueError, match=r"fc\.weight: 1 non-finite"):
            save_sparse({"fc.weight": w}, path)
    for block, message in ((0, "blocksize must be a positive int"), ((4,), "blocksize must be a positive int"),
                           (None, "format='bsr' needs a blocksize")):
        with pytest.raises(ValueError, match=message):
            save_sparse(state, path, format="bsr", blocksize=block)
    with pytest.raises(ValueError, match="blocksize is only for format='bsr'"):
        save_sparse(state, path, blocksize=4)
    with pytest.raises(ValueError, match="format must be 'csr' or 'bsr'"):
        save_sparse(state, path, format="coo")
    with pytest.raises(ValueError, match=r"state dict entry 'step' is a int"):
        save_sparse({"step": 3}, path)
    assert not path.exists()
    with pytest.raises(ValueError, match="not a run directory"):
        convert_checkpoint(tmp_path, tmp_path / "o.safetensors")


def test_docstring_examples_run():
    import doctest

    from sparse_lth import formats

    for module in (formats, checkpoint):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__


# -- limits and destinations --------------------------------------------------------------------
def test_declared_shape_far_beyond_the_data_is_refused(good_file, tmp_path):
    # good_file stores 3 values; declaring the weight 10^9 wide keeps every index valid, and
    # reading it dense would allocate 6 x 10^9 fp32 = 24 GB.
    bomb = _rewrite(good_file, tmp_path / "bomb.safetensors", edit_meta=_set("shape", [6, 10**9]))
    size = bomb.stat().st_size
    expected = 6 * 10**9 * 4 + 6 * 4  # the weight and the bias, dense
    message = (rf"bomb\.safetensors: its metadata declares {expected:,} bytes of dense tensors in a {size:,}-byte "
               rf"file, over the limit of {2**30:,} bytes; if you trust the file, raise the limit "
               r"\(load_sparse\(\.\.\., max_dense_bytes")
    with pytest.raises(ValueError, match=message):
        load_sparse(bomb)
    assert load_sparse(bomb, dense=False)["fc.weight"].shape == (6, 10**9)  # nothing dense is allocated
    with pytest.raises(ValueError, match="over the limit"):
        convert_checkpoint(bomb, tmp_path / "o.safetensors")


def test_max_dense_bytes_is_the_caller_limit(good_file, tmp_path):
    wide = _rewrite(good_file, tmp_path / "wide.safetensors", edit_meta=_set("shape", [6, 50_000]))
    need = 6 * 50_000 * 4 + 6 * 4
    with pytest.raises(ValueError, match=f"declares {need:,} bytes .* over the limit of {need - 1:,} bytes"):
        load_sparse(wide, max_dense_bytes=need - 1)
    loaded = load_sparse(wide, max_dense_bytes=need)
    reference = load_sparse(good_file)["fc.weight"]
    assert torch.equal(loaded["fc.weight"][:, :8], reference) and not loaded["fc.weight"][:, 8:].any()
    assert torch.equal(load_sparse(wide)["fc.weight"], loaded["fc.weight"])  # 1.2 MB: under the 1 GiB floor


def test_bsr_limit_counts_the_padded_blocks(tmp_path):
    # No stored block at all, blocks of 10^5 x 10^5: a file of a few hundred bytes, 40 GB dense.
    save_sparse({"w": torch.zeros(4, 4)}, tmp_path / "z.safetensors", format="bsr", blocksize=2,
                mask={"w": torch.zeros(4, 4, dtype=torch.bool)})
    edit = lambda m: m["tensors"]["w"].update(block=[10**5, 10**5])  # noqa: E731

    def no_blocks(t):
        t["w::values"] = torch.zeros(0, 10**5, 10**5)
        t["w::crow_indices"] = torch.zeros(2, dtype=torch.int32)
    bad = _rewrite(tmp_path / "z.safetensors", tmp_path / "bad.safetensors", no_blocks, edit)
    with pytest.raises(ValueError, match=f"declares {10**10 * 4:,} bytes"):
        load_sparse(bad)


def test_convert_destinations_that_must_not_be_written(tmp_path):
    torch.save({"w": torch.randn(4, 4)}, tmp_path / "d.pt")
    (tmp_path / "folder").mkdir()
    for dst, message in ((tmp_path / "d.pt", "is the source"), (tmp_path / "folder" / ".." / "d.pt", "is the source"),
                         (tmp_path / "folder", "is a directory; name the file to write"),
                         (tmp_path / "d.pt" / "x.safetensors", "is not a directory")):
        with pytest.raises(ValueError, match=message):
            convert_checkpoint(tmp_path / "d.pt", dst)
    assert torch.load(tmp_path / "d.pt", weights_only=True)["w"].shape == (4, 4)  # untouched
    run = tmp_path / "run"
    run.mkdir()
    run_files.atomic_write_json({"model": "lenet300"}, run / run_files.CONFIG_FILE)
    with pytest.raises(ValueError, match=r"is inside the run directory"):
        convert_checkpoint(run, run / "sub" / "t.safetensors")
    assert not (run / "sub").exists()


@pytest.mark.parametrize("obj,message", [
    (lambda: nn.Linear(3, 2), r"holds pickled Python objects \(e\.g\. torch\.nn\.modules\.linear\.Linear\), not a "
                              r"state dict of tensors; save model\.state_dict\(\) instead$"),
    (lambda: [torch.ones(2)], r"holds a list, not a state dict of tensors; save model\.state_dict\(\) instead$"),
    (lambda: {"w": torch.ones(2), "epoch": 3}, r"d\.pt: state dict entry 'epoch' is a int, not a tensor"),
])
def test_torch_files_that_are_not_state_dicts(tmp_path, obj, message):
    torch.save(obj(), tmp_path / "d.pt")
    with pytest.raises(ValueError, match=message) as info:
        convert_checkpoint(tmp_path / "d.pt", tmp_path / "o.safetensors")
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_damaged_torch_files_are_always_a_one_line_value_error(tmp_path):
    # On random bytes torch's unpickler raises IndexError, KeyError, UnicodeDecodeError, ... as
    # well as UnpicklingError; every one must come out as our ValueError naming the file.
    import random

    torch.save({"fc.weight": torch.randn(8, 8)}, tmp_path / "good.pt", _use_new_zipfile_serialization=False)
    good = (tmp_path / "good.pt").read_bytes()
    for seed in range(300):
        rng = random.Random(seed)
        data = rng.randbytes(256) if seed % 2 else good[: rng.randrange(len(good))]
        (tmp_path / "bad.pt").write_bytes(data)
        try:
            convert_checkpoint(tmp_path / "bad.pt", tmp_path / "o.safetensors")
        except ValueError as e:
            assert "bad.pt" in str(e) and "\n" not in str(e), (seed, str(e))
        else:
            raise AssertionError(f"seed {seed}: damaged bytes were read as a checkpoint")
