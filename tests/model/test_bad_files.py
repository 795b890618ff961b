"""Every broken checkpoint raises ``ModelLoadError`` naming the file and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from carpool.errors import ModelLoadError
from carpool.model.loader import load_model
from helpers.hf_models import save_tiny_hf_model


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good")
    save_tiny_hf_model("llama", d)
    return d


@pytest.fixture
def model_dir(good_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    return d


def _raises(path: Path, *words: str) -> None:
    with pytest.raises(ModelLoadError) as e:
        load_model(path, dtype="float32")
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in error message {msg!r}"


def test_missing_directory(tmp_path: Path):
    _raises(tmp_path / "nope", "nope", "no such model")


def test_missing_config(model_dir: Path):
    (model_dir / "config.json").unlink()
    _raises(model_dir, "config.json", "not found")


def test_corrupt_config(model_dir: Path):
    (model_dir / "config.json").write_text("{not json")
    _raises(model_dir, "config.json", "not valid JSON")


def test_unsupported_architecture(model_dir: Path):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    _raises(model_dir, "config.json", "unsupported architecture", "GPTNeoXForCausalLM")


def test_missing_weights(model_dir: Path):
    (model_dir / "model.safetensors").unlink()
    _raises(model_dir, str(model_dir), "no *.safetensors")


def test_truncated_weights(model_dir: Path):
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _raises(model_dir, "model.safetensors", "cannot read")


def test_garbage_weights(model_dir: Path):
    (model_dir / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    _raises(model_dir, "model.safetensors", "cannot read")


def test_wrong_shape(model_dir: Path):
    f = model_dir / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(sd, f)
    _raises(model_dir, "model.layers.0.mlp.up_proj.weight", "(7, 64)", "expected (128, 64)")


def test_missing_tensor(model_dir: Path):
    f = model_dir / "model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, f)
    _raises(model_dir, "missing tensors", "model.layers.1.self_attn.qkv_proj.weight[shard 1]")


def test_unexpected_tensor(model_dir: Path):
    f = model_dir / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(sd, f)
    _raises(model_dir, "unexpected tensor", "mystery")


def test_missing_shard(model_dir: Path):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(model_dir, "model-00002.safetensors", "missing")


def test_safetensors_reopened_while_reading_gives_every_tensor(tmp_path: Path, monkeypatch):
    # iter_safetensors closes and reopens a file after every _MAPPED_BYTES read (the pages
    # read through safe_open's mapping stay resident until it is closed): every tensor comes
    # once, equal to the file's, in the file's order, also at a budget smaller than a tensor.
    from carpool.model import loader

    tensors = {f"t{i:02d}": torch.randn(i + 1, 33) for i in range(12)}
    f = tmp_path / "model.safetensors"
    save_file(tensors, f)
    whole = list(loader.iter_safetensors([f]))
    assert all(isinstance(t, torch.Tensor) for _, t in whole)
    monkeypatch.setattr(loader, "_MAPPED_BYTES", 700)
    sliced = list(loader.iter_safetensors([f]))
    assert [n for n, _ in sliced] == [n for n, _ in whole] and len(sliced) == len(tensors)
    # Tensors over the budget come as StoredTensors, read a slice of rows at a time.
    stored = {n for n, t in sliced if isinstance(t, loader.StoredTensor)}
    assert stored == {n for n, t in tensors.items() if t.nbytes > 700}
    for name, t in sliced:
        got = t[0 : t.shape[0]] if isinstance(t, loader.StoredTensor) else t
        assert torch.equal(got, tensors[name]), name


def test_stored_tensor_reads_rows_converts_and_copies_in_slices(tmp_path: Path, monkeypatch):
    from carpool.model import stored_tensor
    from carpool.model.stored_tensor import StoredTensor

    w = torch.randn(37, 24).bfloat16()
    f = tmp_path / "model.safetensors"
    save_file({"w": w}, f)
    t = StoredTensor(f, "w", (37, 24), torch.bfloat16)
    assert torch.equal(t[5:9], w[5:9]) and t.dtype == torch.bfloat16
    assert t.to(torch.float32)[0:37].dtype == torch.float32
    assert torch.equal(t.to(torch.float32)[0:37], w.float())
    monkeypatch.setattr(stored_tensor, "SLICE_BYTES", 24 * 2 * 5)  # 5 rows a slice, 2 left
    dest = torch.empty(37, 24)
    t.copy_into(dest)
    assert torch.equal(dest, w.float())
    with pytest.raises(ModelLoadError, match="cannot read tensor 'nope'"):
        StoredTensor(f, "nope", (1, 1), torch.float32)[0:1]
