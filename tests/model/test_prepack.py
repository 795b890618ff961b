"""bf16 linear weights packed once for oneDNN (``layers.Linear.prepack``): same values out,
every row count and input rank, tied heads left plain, and the engine's greedy tokens and
weight accounting unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carpool.capacity.weights import resident_weight_bytes
from carpool.model import layers
from carpool.model.layers import Linear, prepack_available, prepack_linears
from carpool.model.loader import load_model
from helpers.carpool_ref import greedy
from helpers.hf_models import save_tiny_hf_model

needs_prepack = pytest.mark.skipif(
    not prepack_available("cpu"), reason="oneDNN bf16 not supported by this CPU/torch build"
)


def _pair(n: int, k: int, bias: bool, seed: int = 0) -> tuple[Linear, Linear]:
    torch.manual_seed(seed)
    plain = Linear(k, n, bias=bias).to(torch.bfloat16)
    packed = Linear(k, n, bias=bias).to(torch.bfloat16)
    packed.load_state_dict(plain.state_dict())
    assert packed.prepack()
    return plain, packed


@needs_prepack
@pytest.mark.parametrize("rows", [1, 2, 7, 32, 33, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_plain(rows, bias):
    plain, packed = _pair(96, 64, bias)
    assert packed.weight.is_mkldnn and packed.weight.shape == (96, 64)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    bias = None if plain.bias is None else plain.bias.float()
    ref = F.linear(x.float(), plain.weight.float(), bias)
    with torch.inference_mode():
        got = packed(x)
        want = plain(x)
    assert got.shape == (rows, 96) and got.dtype == torch.bfloat16
    # Both are bf16 roundings of the same float32 sums (order may differ): within 1 bf16 ulp.
    assert torch.allclose(got.float(), ref, rtol=2**-7, atol=1e-2)
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-2)


@needs_prepack
def test_packed_linear_takes_any_rank():
    plain, packed = _pair(48, 32, bias=True)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.allclose(packed(x).float(), plain(x).float(), rtol=2**-7, atol=1e-2)


def test_only_cpu_bf16_weights_are_packed():
    fp32 = Linear(8, 8)
    assert not fp32.prepack() and not fp32.weight.is_mkldnn
    meta = Linear(8, 8, device="meta", dtype=torch.bfloat16)
    assert not meta.prepack()


@needs_prepack
def test_packing_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(layers.ENV_PREPACK, "0")
    lin = Linear(8, 8).to(torch.bfloat16)
    assert not lin.prepack() and not lin.weight.is_mkldnn


@needs_prepack
@pytest.mark.parametrize("tied", [False, True])
def test_model_greedy_and_weight_bytes_unchanged_by_packing(tmp_path, tied):
    save_tiny_hf_model("llama", tmp_path, tie_word_embeddings=tied)
    plain, _ = load_model(tmp_path, dtype="bfloat16")
    model, _ = load_model(tmp_path, dtype="bfloat16")
    before = resident_weight_bytes(model)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    packed = prepack_linears(model)
    # Every projection of every layer, and the head unless it is the embedding's matrix.
    assert packed == len(linears) - tied
    assert model.lm_head.weight.is_mkldnn is (not tied)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert resident_weight_bytes(model) == before
    prompt = list(range(3, 200, 5))
    # Both sides bf16: the packed path must pick the plain path's tokens (same oneDNN sums at
    # every row count above 1; at one row the plain path's torch.mv may round differently,
    # which on this tiny random model does not move the argmax).
    assert greedy(model, prompt, 16) == greedy(plain, prompt, 16)
    assert prepack_linears(model) == 0  # idempotent
