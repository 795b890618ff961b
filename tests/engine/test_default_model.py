"""The embedded default model: shipped in the package, loaded through the HF-directory path."""

from __future__ import annotations

import keyword
import re

from carpool import LLM, SamplingParams
from carpool.model.loader import load_model
from carpool.model.source import embedded_model_path as default_model_path


def test_default_model_is_small_and_standard():
    path = default_model_path()
    names = {p.name for p in path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size <= 15 * 2**20, f"embedded model is {size / 2**20:.1f} MiB, over 15 MiB"
    _, config = load_model(path)
    assert config.architecture == "llama"


def test_default_model_writes_python():
    llm = LLM("embedded")
    out = llm.generate(
        ["def fibonacci(n):"], SamplingParams(max_tokens=48, temperature=0), use_tqdm=False
    )[0].outputs[0]
    text = out.text
    assert len(out.token_ids) > 8 and text.strip(), repr(text)
    words = set(re.findall(r"[A-Za-z_]+", text))
    # Trained on the standard library: an indented body with Python keywords.
    assert "\n    " in text, repr(text)
    assert words & set(keyword.kwlist), repr(text)
