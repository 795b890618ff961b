"""GGUF checkpoints load into the exact Hugging Face state dict (F32) or close to it (quantized).

Each tiny random checkpoint is written the way llama.cpp's converter would
(``helpers.gguf_export``), loaded with ``carpool.model.gguf_loader.load_gguf`` and pushed back
into a fresh transformers model, whose logits are compared with the original's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import gguf
import pytest
import torch

from carpool.config import ModelConfig, RopeScaling
from carpool.errors import ModelLoadError
from carpool.model.gguf_loader import load_gguf, read_gguf_config
from helpers.gguf_export import export_hf_to_gguf
from helpers.hf_models import ARCHITECTURES, save_tiny_hf_model, tiny_hf_config

# (max |logit diff|, min cosine similarity of the flattened logits) against the original model.
# Measured worst case over the five architectures (seed 0, 2x16 random tokens, max |logit| ~6-7;
# initializer_range=0.2 makes these random models sensitive to weight noise):
#   F16  max diff 0.0156, cosine 0.999999;  Q8_0 max diff 0.361, cosine 0.9993;
#   Q4_0 max diff 5.53,   cosine 0.845.
# The bounds leave 2-3x margin; a wrong permutation or layout gives cosine near 0. Quantized
# tensors are also checked exactly against gguf's own quantize/dequantize round trip below.
TOLERANCE = {"F32": (0.0, 1.0), "F16": (0.05, 0.9999), "Q8_0": (1.0, 0.995), "Q4_0": (12.0, 0.7)}

SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "max_position_embeddings", "tie_word_embeddings", "attention_bias", "qk_norm", "mlp_bias",
    "bos_token_id", "eos_token_ids",
)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """One saved tiny model per architecture: ``arch -> (model, directory)``."""
    out = {}
    for arch in ARCHITECTURES:
        d = tmp_path_factory.mktemp(arch)
        out[arch] = (save_tiny_hf_model(arch, d), d)
    return out


@pytest.fixture(scope="module")
def llama_f32(checkpoints, tmp_path_factory) -> Path:
    """A valid F32 llama GGUF for the error cases to break."""
    return export_hf_to_gguf(checkpoints["llama"][1], tmp_path_factory.mktemp("g") / "l.gguf")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return model(ids).logits


def _model_from_state(arch: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(arch)).eval()
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(result.missing_keys) <= tied, result.missing_keys
    assert not result.unexpected_keys, result.unexpected_keys
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_f32_tensors_equal_hf_state_dict(arch, checkpoints, tmp_path):
    model, directory = checkpoints[arch]
    config, state = load_gguf(export_hf_to_gguf(directory, tmp_path / "m.gguf", "F32"))
    reference = model.state_dict()
    if config.tie_word_embeddings:
        reference.pop("lm_head.weight")
    assert sorted(state) == sorted(reference)
    for name, tensor in reference.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], tensor), (
            f"{name} differs (max {(state[name] - tensor).abs().max()})"
        )


@pytest.mark.parametrize("ftype", ["F32", "F16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_through_transformers(arch, ftype, checkpoints, tmp_path):
    model, directory = checkpoints[arch]
    _, state = load_gguf(export_hf_to_gguf(directory, tmp_path / "m.gguf", ftype))
    expected, got = _logits(model), _logits(_model_from_state(arch, state))
    max_diff, min_cos = TOLERANCE[ftype]
    diff = (got - expected).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    assert diff <= max_diff, f"{arch} {ftype}: max |logit diff| {diff:.4g} > {max_diff}"
    assert cos >= min_cos, f"{arch} {ftype}: logit cosine similarity {cos:.6f} < {min_cos}"


@pytest.mark.parametrize("ftype", ["F16", "BF16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_quantized_tensors_equal_gguf_round_trip(arch, ftype, checkpoints, tmp_path):
    """Each 2-D weight equals dequantize(quantize(hf)) exactly; norms and 1-D stay exact.

    Rows are quantized independently, so llama's q/k row permutation commutes with the round
    trip and the expectation needs no permuting.
    """
    model, directory = checkpoints[arch]
    _, state = load_gguf(export_hf_to_gguf(directory, tmp_path / "m.gguf", ftype))
    qtype = gguf.GGMLQuantizationType[ftype]
    for name, tensor in model.state_dict().items():
        w = tensor.numpy()
        if w.ndim == 2:
            w = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        assert torch.equal(state[name], torch.from_numpy(w.reshape(tensor.shape))), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_config_round_trip(arch, checkpoints, tmp_path):
    _, directory = checkpoints[arch]
    path = export_hf_to_gguf(directory, tmp_path / "m.gguf", "Q8_0")
    got = read_gguf_config(path)
    want = ModelConfig.from_json_file(directory / "config.json")
    assert got.architecture == ("llama" if arch == "mistral" else want.architecture)
    for field in SHAPE_FIELDS:
        assert getattr(got, field) == getattr(want, field), field
    assert got.torch_dtype == "float32"  # a quantized file computes in float32 (gguf_loader)
    assert load_gguf(path)[0] == dataclasses.replace(got, torch_dtype="float32")


def test_load_dtype_sets_tensors_and_config(checkpoints, tmp_path):
    path = export_hf_to_gguf(checkpoints["qwen3"][1], tmp_path / "m.gguf", "F16")
    config, state = load_gguf(path, dtype=torch.bfloat16)
    assert config.torch_dtype == "bfloat16"
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    ("factor", "low", "high", "orig"),
    [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (8.0, 1.0, 32.0, 8192), (16.0, 1.0, 4.0, 96)],
)
def test_llama3_rope_freqs_become_rope_scaling(factor, low, high, orig, tmp_path):
    """``rope_freqs.weight`` is fitted back to a RopeScaling equal to the HF one."""
    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": orig,
            "rope_theta": 500000.0}  # fmt: skip
    hf = tiny_hf_config("llama3", rope_scaling=rope, max_position_embeddings=131072)
    state = {"model.embed_tokens.weight": torch.zeros(hf.vocab_size, hf.hidden_size)}
    path = export_hf_to_gguf(state, tmp_path / "m.gguf", config=hf)
    reader = gguf.GGUFReader(path)
    assert "rope_freqs.weight" in [t.name for t in reader.tensors]
    config = read_gguf_config(path)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling("llama3", factor, low, high, orig)


def test_tokenizer_metadata(checkpoints, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["the cat sat on the mat", "the dog ate the cat"] * 50, trainer)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": true}'
    )
    path = export_hf_to_gguf(
        checkpoints["llama"][1], tmp_path / "m.gguf", tokenizer=tok_dir, tokenizer_pre="llama-bpe"
    )
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.get_field(key).contents()

    tokens = field("tokenizer.ggml.tokens")
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "llama-bpe"
    assert len(tokens) == 320  # padded to the model's vocab_size like the converter
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[-1] == "[PAD319]"
    types = field("tokenizer.ggml.token_type")
    assert types[1] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    assert types[5] == gguf.TokenType.NORMAL
    assert tokens[tok.token_to_id("Ġcat")] == "Ġcat"
    merges = field("tokenizer.ggml.merges")
    assert merges and all(len(m.split(" ")) == 2 for m in merges)
    assert field("tokenizer.ggml.add_bos_token") is True
    config = read_gguf_config(path)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_ids) == (320, 1, (2,))


# --- bad files: each raises ModelLoadError naming the file --------------------------------------


def _assert_load_error(path: Path, *words: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_gguf(path)
    message = str(info.value)
    assert str(path) in message, message
    for word in words:
        assert word in message, message


def test_missing_file(tmp_path):
    _assert_load_error(tmp_path / "absent.gguf", "not found")
    with pytest.raises(ModelLoadError, match="absent"):
        read_gguf_config(tmp_path / "absent.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    _assert_load_error(path, "not a GGUF")


@pytest.mark.parametrize("keep", [0.5, 0.9, 40])
def test_truncated_file(keep, llama_f32, tmp_path):
    data = llama_f32.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    _assert_load_error(path, "truncated")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_load_error(path, "unsupported architecture", "gpt2")


def test_missing_tensor(checkpoints, tmp_path):
    model, _ = checkpoints["llama"]
    state = model.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    path = export_hf_to_gguf(state, tmp_path / "m.gguf", config=model.config)
    _assert_load_error(path, "missing", "model.layers.1.mlp.up_proj.weight")


def test_wrong_shape(checkpoints, tmp_path):
    model, _ = checkpoints["qwen2"]
    state = model.state_dict()
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 96)
    path = export_hf_to_gguf(state, tmp_path / "m.gguf", config=model.config)
    _assert_load_error(path, "blk.0.ffn_down.weight", "shape [64, 96]", "expected [64, 128]")


def test_unsupported_tensor_type(llama_f32, tmp_path):
    path = tmp_path / "i32.gguf"
    shutil.copy(llama_f32, path)
    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    tensor.field.parts[4][0] = gguf.GGMLQuantizationType.I32  # same bytes per element as F32
    reader.data.flush()
    del reader
    _assert_load_error(path, "blk.0.ffn_up.weight", "unsupported type I32")


def test_unexpected_tensor(checkpoints, tmp_path):
    model, _ = checkpoints["llama"]
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)  # a qwen3 tensor in a llama
    path = export_hf_to_gguf(state, tmp_path / "m.gguf", config=model.config)
    _assert_load_error(path, "unexpected tensor", "blk.0.attn_q_norm.weight")
