"""GGUF files through carpool's own model, tokenizer and engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carpool import LLM, SamplingParams
from carpool.model.loader import load_model
from carpool.tokenizer import Tokenizer
from helpers.carpool_ref import greedy, prompt_logits
from helpers.gguf_export import export_hf_to_gguf
from helpers.hf_models import first_difference, hf_greedy, save_tiny_model_dir

PROMPT = [1, 17, 200, 33, 5, 250, 12, 99, 7, 64, 128, 31]
# Measured max abs logit difference vs the safetensors model (logits of magnitude ~6), with
# margin: F16 ~0.02, Q8_0 ~0.4 on these deliberately high-variance random weights.
TOLERANCE = {"F16": 0.1, "Q8_0": 1.5}


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"gguf-{request.param}")
    hf = save_tiny_model_dir(request.param, d / "hf")
    files = {
        ft: export_hf_to_gguf(d / "hf", d / f"model-{ft}.gguf", ft, tokenizer=d / "hf")
        for ft in ("F32", "F16", "Q8_0")
    }
    return hf, d / "hf", files


def test_f32_gguf_gives_the_safetensors_tokens(checkpoint):
    hf, hf_dir, files = checkpoint
    st_model, _ = load_model(hf_dir, dtype="float32")
    gg_model, cfg = load_model(files["F32"], dtype="float32")
    expected = greedy(st_model, PROMPT, 32)
    assert expected == hf_greedy(hf, PROMPT, 32)
    got = greedy(gg_model, PROMPT, 32)
    assert got == expected, first_difference(got, expected)


@pytest.mark.parametrize("ftype", ["F16", "Q8_0"])
def test_quantized_gguf_logits_within_tolerance(checkpoint, ftype):
    _, hf_dir, files = checkpoint
    st_model, _ = load_model(hf_dir, dtype="float32")
    gg_model, _ = load_model(files[ftype], dtype="float32")
    diff = (prompt_logits(st_model, PROMPT) - prompt_logits(gg_model, PROMPT)).abs().max()
    assert float(diff) <= TOLERANCE[ftype], f"{ftype}: max abs logit diff {float(diff):.4f}"


def test_gguf_tokenizer_round_trips_and_matches_the_hf_one(checkpoint):
    _, hf_dir, files = checkpoint
    ours = Tokenizer.from_gguf(files["F32"])
    ref = Tokenizer.from_pretrained_dir(hf_dir)
    for text in ["def fibonacci(n):\n    return n", "Héllo wörld ✓ 日本語 🚀", "  x  y\t"]:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    assert ours.eos_token_ids[:1] == ref.eos_token_ids[:1]


def test_llm_serves_a_gguf_file(checkpoint):
    hf, _, files = checkpoint
    llm = LLM(str(files["F32"]), dtype="float32")
    out = llm.generate(
        [PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False
    )[0]
    assert out.outputs[0].token_ids == hf_greedy(hf, PROMPT, 16)


def test_bfloat16_gguf_loads(checkpoint):
    _, _, files = checkpoint
    model, _ = load_model(files["Q8_0"], dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(prompt_logits(model, PROMPT)).all()


def test_truncated_gguf_is_a_clear_error(checkpoint, tmp_path: Path):
    from carpool.errors import ModelLoadError

    _, _, files = checkpoint
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(files["F16"].read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        load_model(bad)
