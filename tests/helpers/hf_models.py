"""Tiny random Hugging Face checkpoints for parity tests, saved through the real save path.

Weights use ``initializer_range=0.2`` (not the default 0.02): with tiny spreads a random model
repeats one token forever and a parity test would prove little.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("llama", "llama3", "mistral", "qwen2", "qwen3")


def tiny_hf_config(arch: str, **overrides: Any):  # -> transformers.PretrainedConfig
    """A small config of ``arch`` (``llama3`` = Llama with llama3 rope scaling)."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**{**common, **overrides})
    elif arch == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        }
        cfg = transformers.LlamaConfig(
            **{**common, "rope_scaling": rope, "rope_theta": 500000.0, **overrides}
        )
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": None, **overrides})
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 32, **overrides})
    else:
        raise ValueError(arch)
    return cfg


def save_tiny_hf_model(arch: str, out_dir: Path, seed: int = 0, **overrides: Any):
    """Build a random model of ``arch``, save it as safetensors in ``out_dir``, return it."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` by a transformers model, EOS not treated specially.

    A plain argmax loop with the KV cache of transformers: ``generate`` with
    ``min_new_tokens`` would mask EOS logits, which is not what carpool's ``ignore_eos`` does.
    """
    out: list[int] = []
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        while True:
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            if len(out) == max_new_tokens:
                return out
            res = model(torch.tensor([[tok]]), cache=res.past_key_values, use_cache=True)


def first_difference(a: list[int], b: list[int]) -> str:
    """Readable description of where two token lists part."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"first difference at index {i}: {x} != {y}\n  got:      {a}\n  expected: {b}"
    return f"lengths differ: {len(a)} vs {len(b)}\n  got:      {a}\n  expected: {b}"


def save_tiny_tokenizer(out_dir: Path, vocab_size: int = 320) -> None:
    """Train a small byte-level BPE tokenizer and save it the transformers way in ``out_dir``.

    Ids 0-2 are ``<pad>``, ``<s>`` (bos) and ``</s>`` (eos), matching ``tiny_hf_config``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n",
        "The quick brown fox jumps over the lazy dog. Héllo wörld, ünïcode ✓ 日本語 🚀",
        "import os\nimport sys\nfor i in range(10):\n    print(i, os.path.join('a', 'b'))\n",
    ] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    fast.save_pretrained(out_dir)


def save_tiny_model_dir(arch: str, out_dir: Path, seed: int = 0, **overrides: Any):
    """A complete model directory (weights + tokenizer) that ``LLM``/``LLMEngine`` can load."""
    model = save_tiny_hf_model(arch, out_dir, seed=seed, **overrides)
    save_tiny_tokenizer(out_dir, vocab_size=model.config.vocab_size)
    return model


def tiny_llama_dir(tmp_path_factory: Any, folder: str, name: str = "tiny-llama") -> Path:
    """``save_tiny_model_dir("llama", ...)`` into ``<fresh tmp folder>/name`` (the directory
    name is what the server reports as the model); for session- and module-scoped fixtures."""
    d = tmp_path_factory.mktemp(folder) / name
    d.mkdir()
    save_tiny_model_dir("llama", d)
    return d
