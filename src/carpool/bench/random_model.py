"""Random-weight Llama checkpoints for benchmarks, written through the real save/load path.

A benchmark of the engine needs a model of a realistic *shape*, not a trained one: the time of a
step depends on the shapes only. The checkpoint is a plain Hugging Face directory
(``config.json`` + ``model.safetensors`` + ``tokenizer.json``) written without ``transformers``,
so ``LLMEngine`` loads it exactly like a downloaded model.
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file

# name -> Llama shape. ``small`` is the ~58M-parameter model of PERF-NOTES.md.
PRESETS: dict[str, dict[str, int]] = {
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1408,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    # ~246M parameters, grouped-query attention (4 KV heads for 16 query heads).
    "medium": dict(
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    # For tests of the benchmark itself: seconds, not minutes.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _llama_tensors(shape: dict[str, int], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face ``LlamaForCausalLM`` checkpoint, randomly initialised."""
    gen = torch.Generator().manual_seed(seed)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim

    def randn(*size: int) -> torch.Tensor:
        # std 0.02 like Hugging Face's initializer_range default.
        return (torch.randn(*size, generator=gen) * 0.02).to(dtype)

    tensors = {
        "model.embed_tokens.weight": randn(v, h),
        "lm_head.weight": randn(v, h),
        "model.norm.weight": torch.ones(h, dtype=dtype),
    }
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors |= {
            p + "self_attn.q_proj.weight": randn(h, h),
            p + "self_attn.k_proj.weight": randn(kv, h),
            p + "self_attn.v_proj.weight": randn(kv, h),
            p + "self_attn.o_proj.weight": randn(h, h),
            p + "mlp.gate_proj.weight": randn(i, h),
            p + "mlp.up_proj.weight": randn(i, h),
            p + "mlp.down_proj.weight": randn(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        }
    return tensors


# The characters of the decode-only entries: letters, digits and the byte-level space.
_FILLER_CHARS = string.ascii_letters + string.digits + "\u0120"


def _filler_tokens(count: int) -> list[str]:
    """``count`` distinct strings of two or more of ``_FILLER_CHARS`` (all pairs first, then
    triples...), in a fixed order: the byte-level tokens of ids past the 259 bytes and specials."""
    out: list[str] = []
    for length in itertools.count(2):
        for chars in itertools.product(_FILLER_CHARS, repeat=length):
            if len(out) == count:
                return out
            out.append("".join(chars))
    raise AssertionError("unreachable")


def save_byte_tokenizer(out_dir: Path, vocab_size: int = 259) -> None:
    """A byte-level tokenizer of ``vocab_size`` ids with no merges: ids 0-2 are ``<pad>``,
    ``<s>``, ``</s>``, then the 256 bytes, then decode-only entries (``_filler_tokens``).

    Text encodes to bytes alone (no merge ever forms a longer entry), while every id the
    model can sample decodes to text: a random model's stream carries text from its first
    token, so a serving benchmark times its first token and the gaps between them (with ids
    past the bytes decoding to nothing, a random model's stream had no text until its end).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for token in _filler_tokens(max(vocab_size - len(vocab), 0)):
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_random_llama(
    out_dir: str | Path, preset: str = "small", dtype: str = "bfloat16", seed: int = 0
) -> Path:
    """Write a random-weight Llama of shape ``PRESETS[preset]`` into ``out_dir``.

    Args:
        out_dir: directory to create or fill.
        preset: a key of ``PRESETS``.
        dtype: ``bfloat16`` or ``float32`` (weights and ``torch_dtype``).
        seed: seed of the weights.

    Returns:
        ``out_dir`` as a Path, loadable with ``LLM(str(out_dir))``.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown random config {preset!r}; choose from {sorted(PRESETS)}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = PRESETS[preset]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_llama_tensors(shape, _DTYPES[dtype], seed), str(out / "model.safetensors"))
    save_byte_tokenizer(out, shape["vocab_size"])
    return out
