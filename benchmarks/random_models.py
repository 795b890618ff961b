"""Random-weight Llama checkpoints of benchmark sizes, written through the real save path.

``small`` (58.5M parameters) and ``medium`` (246M, grouped-query) are the configs the issues
quote; weights are random (std 0.02), saved as safetensors with a config.json, plus a small
byte-level tokenizer so that ``LLMEngine`` can load the directory like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIGS: dict[str, dict] = {
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1408,
        vocab_size=32000,
    ),
    "medium": dict(
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=2816,
        vocab_size=32000,
    ),
}


def write_random_llama(name: str, out_dir: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write ``CONFIGS[name]`` with random weights to ``out_dir`` (skipped if already there)."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    c = dict(CONFIGS[name])
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        **c,
    }
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    g = torch.Generator().manual_seed(seed)
    tdt = getattr(torch, dtype)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(tdt)

    sd = {
        "model.embed_tokens.weight": w(v, h),
        "model.norm.weight": torch.ones(h, dtype=tdt),
        "lm_head.weight": w(v, h),
    }
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sd |= {
            p + "self_attn.q_proj.weight": w(h, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(i, h),
            p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
            p + "input_layernorm.weight": torch.ones(h, dtype=tdt),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=tdt),
        }
    save_file(sd, out_dir / "model.safetensors")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    _write_byte_tokenizer(out_dir, v)
    return out_dir


def _write_byte_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A byte-level BPE with no merges: enough to load; benchmarks feed token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
    )
