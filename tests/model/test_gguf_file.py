"""``carpool.model.gguf_file.GGUFFile`` against ``gguf.GGUFReader``, and on corrupt files.

Agreement: every metadata key (value and type) and every tensor (name, type, dims, offset,
bytes, and the data view itself: dtype, shape, contents) of the files the suite builds with
``helpers.gguf_export``, of the llama.cpp vocabulary fixtures, and of the default model
SmolLM2-135M-Instruct Q4_1 (installed by ``make install`` / ``make test``).

Corrupt files are written byte by byte here (``_gguf_bytes``), so each defect sits exactly where
the test says; each must give ``ModelLoadError`` naming the file, through ``GGUFFile`` and through
the config, model and tokenizer entry points.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from carpool.errors import ModelLoadError
from carpool.model.gguf_file import GGUFFile
from carpool.model.gguf_loader import GGUFCheckpoint, read_gguf_config
from carpool.model.loader import load_model
from carpool.model.source import DEFAULT_MODEL_INSTALL, default_chat_model_path
from carpool.tokenizer import Tokenizer
from helpers.gguf_export import export_hf_to_gguf
from helpers.hf_models import save_tiny_hf_model

VOCAB_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "vocab"
FTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """One tiny llama GGUF per file type, plus a qwen2 one with a tokenizer-free header."""
    d = tmp_path_factory.mktemp("hf")
    save_tiny_hf_model("llama", d)
    out = tmp_path_factory.mktemp("gguf")
    files = {ft: export_hf_to_gguf(d, out / f"llama-{ft}.gguf", ft) for ft in FTYPES}
    q = tmp_path_factory.mktemp("qwen2")
    save_tiny_hf_model("qwen2", q)
    files["qwen2"] = export_hf_to_gguf(q, out / "qwen2.gguf", "Q8_0")
    return files


def assert_agrees_with_gguf_reader(path: Path, compare_data: bool = True) -> None:
    """Every key/value and tensor of ``GGUFFile`` equals ``GGUFReader``'s."""
    ref = gguf.GGUFReader(path)
    with GGUFFile(path) as ours:
        ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert list(ours.metadata) == list(ref_fields)
        for key, field in ref_fields.items():
            assert ours.metadata[key] == field.contents(), key
            assert type(ours.metadata[key]) is type(field.contents()), key
            kind, sub = ours.value_types[key]
            assert kind == field.types[0], key
            assert sub == (field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None), key
        assert ours.version == ref.fields["GGUF.version"].contents()
        assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
        assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
        for mine, theirs in zip(ours.tensors, ref.tensors, strict=True):
            assert mine.tensor_type == theirs.tensor_type, mine.name
            assert mine.dims == tuple(theirs.shape.tolist()), mine.name
            assert mine.n_elements == theirs.n_elements, mine.name
            assert (mine.offset, mine.n_bytes) == (theirs.data_offset, theirs.n_bytes), mine.name
            if compare_data:
                data = ours.tensor_data(mine)
                assert (data.dtype, data.shape) == (theirs.data.dtype, theirs.data.shape)
                assert np.array_equal(data.view(np.uint8), theirs.data.view(np.uint8)), mine.name


@pytest.mark.parametrize("name", [*FTYPES, "qwen2"])
def test_agrees_on_exported_files(name, exported):
    assert_agrees_with_gguf_reader(exported[name])


@pytest.mark.parametrize("vocab", ["llama-spm", "phi-3", "gpt-2", "llama-bpe"])
def test_agrees_on_llama_cpp_vocab_files(vocab):
    assert_agrees_with_gguf_reader(VOCAB_DIR / f"ggml-vocab-{vocab}.gguf")


@pytest.mark.slow
def test_agrees_on_the_default_model():
    path = default_chat_model_path()
    assert path is not None, f"the default model is not installed: `{DEFAULT_MODEL_INSTALL}`"
    assert_agrees_with_gguf_reader(path)
    with GGUFFile(path) as f:
        assert len(f.get("tokenizer.ggml.tokens")) == 49152
        assert len(f.get("tokenizer.ggml.merges")) == 48900
        types = {t.tensor_type.name for t in f.tensors}
        assert types == {"Q4_1", "Q8_0", "F32"}, types


def test_tensor_data_is_a_read_only_view_of_the_file(exported):
    with GGUFFile(exported["Q4_1"]) as f:
        for t in f.tensors:
            data = f.tensor_data(t)
            assert not data.flags.writeable
            assert np.shares_memory(data, f._map), t.name  # zero-copy
            assert data.nbytes == t.n_bytes


def test_file_is_unmapped_after_loading(exported):
    """No map of the file outlives ``load_model``: the model's tensors own their memory."""
    for name in ("Q4_1", "F32"):
        path = exported[name]
        model, _ = load_model(path, dtype="float32")
        maps = Path("/proc/self/maps").read_text()
        assert str(path) not in maps, f"{path} still mapped after load_model"
        assert model is not None


def test_checkpoint_closes_after_its_weights(exported):
    ckpt = GGUFCheckpoint(exported["Q8_0"])
    names = [name for name, _ in ckpt.weights()]
    assert "model.embed_tokens.weight" in names
    with pytest.raises(ValueError, match="closed"):
        ckpt._reader.tensor_data(ckpt._reader.tensors[0])


# --- corrupt files -----------------------------------------------------------------------------


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _kv_str(key: str, value: str) -> bytes:
    return _str(key) + struct.pack("<I", gguf.GGUFValueType.STRING) + _str(value)


def _gguf_bytes(
    kvs: list[bytes] | None = None,
    tensors: list[tuple[str, tuple[int, ...], int, int]] | None = None,
    *,
    data: bytes = b"",
    magic: bytes = b"GGUF",
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """A GGUF file: header, the given encoded key/values, tensor infos, aligned data."""
    kvs = [_kv_str("general.architecture", "llama")] if kvs is None else kvs
    tensors = tensors or []
    out = magic + struct.pack("<I", version)
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)  # fmt: skip
    out += b"".join(kvs)
    for name, dims, kind, offset in tensors:
        out += _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)
    return out + b"\0" * (-len(out) % 32) + data


def _f32_tensor(name: str = "t", n: int = 8, offset: int = 0) -> tuple[str, tuple[int], int, int]:
    return (name, (n,), int(gguf.GGMLQuantizationType.F32), offset)


def test_hand_written_file_reads(tmp_path):
    """The test's own writer makes valid files (so the defects below are the only ones)."""
    arr = _str("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _str("a") + _str("bc")
    path = tmp_path / "ok.gguf"
    values = np.arange(8, dtype=np.float32)
    path.write_bytes(_gguf_bytes([_kv_str("general.architecture", "llama"), arr],
                                 [_f32_tensor()], data=values.tobytes()))  # fmt: skip
    assert_agrees_with_gguf_reader(path)
    with GGUFFile(path) as f:
        assert f.get("tokenizer.ggml.tokens") == ["a", "bc"]
        assert np.array_equal(f.tensor_data(f.tensors[0]), values)


def _corrupt_cases() -> dict[str, tuple[bytes, str]]:
    arch = _kv_str("general.architecture", "llama")
    valid = _gguf_bytes([arch], [_f32_tensor()], data=bytes(32))
    huge_array = _str("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**60)
    string_past_eof = _str("general.name") + struct.pack("<IQ", 8, 10**6) + b"short"
    array_string_past_eof = (
        _str("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + _str("a")
        + struct.pack("<Q", 10**9) + b"xyz"
    )  # fmt: skip
    return {
        "empty": (b"", "not a GGUF"),
        "bad magic": (b"GGML" + valid[4:], "not a GGUF"),
        "version 1": (_gguf_bytes(version=1), "unsupported GGUF version 1"),
        "version 99": (_gguf_bytes(version=99), "unsupported GGUF version 99"),
        "big-endian": (_gguf_bytes(version=3 << 24), "big-endian"),
        "truncated header": (valid[:12], "truncated"),
        "truncated metadata": (valid[: 24 + 20], "truncated"),
        "absurd key/value count": (_gguf_bytes([arch], n_kv=2**62), "cannot fit"),
        "absurd tensor count": (_gguf_bytes([arch], n_tensors=2**50), "cannot fit"),
        "string length past EOF": (_gguf_bytes([arch, string_past_eof]), "needs 1000000 bytes"),
        "array string past EOF": (_gguf_bytes([arch, array_string_past_eof]), "past EOF"),
        "absurd array count": (_gguf_bytes([arch, huge_array]), "cannot fit"),
        "unknown value type": (
            _gguf_bytes([arch, _str("x") + struct.pack("<I", 77) + b"\0" * 8]),
            "unknown metadata value type 77",
        ),
        "duplicate key": (_gguf_bytes([arch, arch]), "duplicate metadata key"),
        "tensor offset past EOF": (
            _gguf_bytes([arch], [_f32_tensor(offset=2**40)], data=bytes(32)),
            "runs past the end of the file",
        ),
        "tensor bytes past EOF": (
            _gguf_bytes([arch], [_f32_tensor(n=2**40)], data=bytes(32)),
            "runs past the end of the file",
        ),
        "unknown tensor type": (
            _gguf_bytes([arch], [("t", (8,), 99, 0)], data=bytes(32)),
            "unknown type 99",
        ),
        "too many dimensions": (
            _gguf_bytes([arch], [("t", (1,) * 9, 0, 0)], data=bytes(32)),
            "9 dimensions",
        ),
        "partial quantization block": (
            _gguf_bytes([arch], [("t", (40,), int(gguf.GGMLQuantizationType.Q8_0), 0)]),
            "not a whole number of blocks",
        ),
        "quantized scalar": (
            _gguf_bytes([arch], [("t", (), int(gguf.GGMLQuantizationType.Q4_0), 0)]),
            "not a whole number of blocks",
        ),
        "duplicate tensor": (
            _gguf_bytes([arch], [_f32_tensor(), _f32_tensor()], data=bytes(32)),
            "duplicate tensor",
        ),
        "bad alignment": (
            _gguf_bytes([arch, _str("general.alignment") + struct.pack("<II", 4, 3)]),
            "power of two",
        ),
    }


CORRUPT = _corrupt_cases()


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_is_a_clear_error(case, tmp_path):
    content, words = CORRUPT[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    for opener in (GGUFFile, read_gguf_config, Tokenizer.from_gguf, load_model):
        with pytest.raises(ModelLoadError) as info:
            opener(path)
        message = str(info.value)
        assert str(path) in message, (opener, message)
        assert words in message, (opener, message)


def test_truncated_model_file_names_the_tensor(exported, tmp_path):
    data = exported["Q8_0"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"truncated .*tensor '.*' data .* runs past the end"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        GGUFFile(tmp_path / "absent.gguf")


def test_dequantized_load_owns_its_tensors(exported):
    """F32 tensors are copied out of the map (the map closes; the values stay)."""
    ckpt = GGUFCheckpoint(exported["F32"])
    state = dict(ckpt.weights())
    assert ckpt._reader._map is None
    norm = state["model.norm.weight"]
    assert isinstance(norm, torch.Tensor) and norm.numpy().flags.writeable


def test_released_pages_read_back_the_same(exported):
    """``release`` only drops this process's pages: a later read faults the same bytes in."""
    with GGUFFile(exported["Q4_0"]) as f:
        t = f.tensors[-1]
        before = np.array(f.tensor_data(t))
        f.release(t)
        assert np.array_equal(f.tensor_data(t), before)


def test_tokenizer_from_an_open_gguf_file():
    path = VOCAB_DIR / "ggml-vocab-llama-bpe.gguf"
    text = "Hello, world! 12345 <|eot_id|>"
    with GGUFFile(path) as f:
        assert Tokenizer.from_gguf(f).encode(text) == Tokenizer.from_gguf(path).encode(text)
