"""carpool's model against transformers: logits and greedy tokens, for every architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carpool.model.loader import load_model
from helpers.carpool_ref import greedy, prompt_logits
from helpers.devices import DEVICES
from helpers.hf_models import ARCHITECTURES, first_difference, hf_greedy, save_tiny_hf_model

PROMPTS = [
    [1, 5, 77, 23, 99, 4, 250, 17, 3, 8, 100, 200, 31, 45, 61, 12, 9, 10, 11],
    [7],
    list(range(3, 300, 7)) * 2,  # 86 tokens: crosses several 16-token blocks
    list(range(3, 300, 7)) * 7,  # 301 tokens: attention in row chunks (batch.query_chunks)
]


@pytest.fixture(
    scope="module",
    params=[(a, d) for d in DEVICES for a in ARCHITECTURES],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def pair(request, tmp_path_factory):
    arch, device = request.param
    d = tmp_path_factory.mktemp(arch)
    hf = save_tiny_hf_model(arch, d)
    model, config = load_model(d, dtype="float32", device=device)
    # TF32 matmuls on CUDA would break the 1e-4 fp32 logit tolerance.
    torch.backends.cuda.matmul.allow_tf32 = False
    return arch, hf, model, config


def test_config_read_from_checkpoint(pair):
    arch, hf, _, config = pair
    assert config.num_hidden_layers == hf.config.num_hidden_layers
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert config.qk_norm == (arch == "qwen3")
    assert config.attention_bias == (arch == "qwen2")
    if arch == "llama3":
        assert config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3"


@pytest.mark.parametrize("prompt", PROMPTS, ids=["p19", "p1", "p86", "p301"])
def test_logits_match_transformers(pair, prompt):
    _, hf, model, _ = pair
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    ours = prompt_logits(model, prompt)
    diff = (ref - ours).abs().max().item()
    assert diff <= 1e-4, f"max abs logit difference {diff}"


@pytest.mark.parametrize("prompt", PROMPTS, ids=["p19", "p1", "p86", "p301"])
def test_greedy_tokens_match_transformers(pair, prompt):
    _, hf, model, _ = pair
    expected = hf_greedy(hf, prompt, 32)
    assert len(set(expected)) >= 4, f"reference output is not diverse enough: {expected}"
    got = greedy(model, prompt, 32)
    assert got == expected, first_difference(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_runs_close_to_float32(tmp_path: Path, device: str):
    save_tiny_hf_model("llama", tmp_path)
    m32, _ = load_model(tmp_path, dtype="float32", device=device)
    m16, _ = load_model(tmp_path, dtype="bfloat16", device=device)
    assert next(m16.parameters()).dtype == torch.bfloat16
    a, b = prompt_logits(m32, PROMPTS[0]), prompt_logits(m16, PROMPTS[0])
    # bf16 keeps 8 bits of mantissa: expect agreement to a few percent of the logit scale.
    assert (a - b).abs().max().item() <= 0.05 * a.abs().max().item()


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_sharded_checkpoint_loads_same_weights(tmp_path: Path, quantization):
    # Under --quantization a fused matrix's shards (q / k / v, gate / up) may lie in different
    # files: each is quantized as it is read and the matrix packed once all have arrived.
    hf = save_tiny_hf_model("qwen2", tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a, _ = load_model(tmp_path / "single", dtype="float32", quantization=quantization)
    b, _ = load_model(tmp_path / "sharded", dtype="float32", quantization=quantization)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
