"""bf16 linear weights packed once (``layers.Linear.prepack``), in oneDNN's layout or the VNNI
layout of ``carpool.model.vnni_linear``: same values out, every row count and input rank, tied
heads left plain, the best layout picked where it runs, and the engine's greedy tokens and
weight accounting unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carpool.capacity.weights import resident_weight_bytes
from carpool.model import layers, vnni_linear
from carpool.model.layers import Linear, prepack_available, prepack_linears
from carpool.model.loader import load_model
from helpers.carpool_ref import greedy
from helpers.hf_models import save_tiny_hf_model

needs_onednn = pytest.mark.skipif(
    not prepack_available("cpu"), reason="oneDNN bf16 not supported by this CPU/torch build"
)
vnni_linear.load()
# The VNNI layout is picked on CPUs with AVX-512 BF16 and on AVX2 ones without AVX-512 (its
# kernel itself is tested on any CPU in test_vnni_linear.py).
VNNI_HERE = vnni_linear.available("cpu")
needs_vnni = pytest.mark.skipif(not VNNI_HERE, reason="no AVX-512 BF16 or AVX2 loop here")
# Some packed layout runs here.
needs_packing = pytest.mark.skipif(
    not (VNNI_HERE or prepack_available("cpu")), reason="no packed bf16 layout on this CPU"
)
LAYOUTS = [
    pytest.param("onednn", marks=needs_onednn),
    pytest.param("vnni", marks=needs_vnni),
]


def _pair(n: int, k: int, bias: bool, layout: str, seed: int = 0) -> tuple[Linear, Linear]:
    torch.manual_seed(seed)
    plain = Linear(k, n, bias=bias).to(torch.bfloat16)
    packed = Linear(k, n, bias=bias).to(torch.bfloat16)
    packed.load_state_dict(plain.state_dict())
    assert packed.prepack(layout)
    assert packed.layout == layout
    return plain, packed


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 7, 32, 33, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_plain(rows, bias, layout):
    plain, packed = _pair(96, 64, bias, layout)
    assert packed.weight.is_mkldnn is (layout == "onednn")
    assert torch.equal(packed.dense_weight(), plain.weight.detach())
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_linear_takes_any_rank(layout):
    plain, packed = _pair(48, 32, bias=True, layout=layout)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.allclose(packed(x).float(), plain(x).float(), rtol=2**-7, atol=1e-2)


def test_only_cpu_bf16_weights_are_packed():
    fp32 = Linear(8, 8)
    assert not fp32.prepack() and not fp32.weight.is_mkldnn and fp32.layout == "plain"
    meta = Linear(8, 8, device="meta", dtype=torch.bfloat16)
    assert not meta.prepack()


@needs_packing
def test_best_layout_is_picked_and_packing_happens_once():
    lin = Linear(64, 96).to(torch.bfloat16)
    assert lin.prepack()
    assert lin.layout == ("vnni" if VNNI_HERE else "onednn")
    assert not lin.prepack() and not lin.prepack("onednn")  # already packed
    odd = Linear(63, 8).to(torch.bfloat16)  # K odd: no VNNI pairs, oneDNN's layout (if any)
    assert odd.prepack() is prepack_available("cpu")
    assert odd.layout == ("onednn" if prepack_available("cpu") else "plain")
    if not prepack_available("cpu"):  # asked for, oneDNN's layout is refused, not faked
        assert not Linear(64, 8).to(torch.bfloat16).prepack("onednn")
    with pytest.raises(ValueError, match="unknown linear layout"):
        Linear(8, 8).to(torch.bfloat16).prepack("blocked")


@needs_vnni
def test_packing_in_place_only_where_nothing_else_holds_the_weight():
    # Alone: packed over its own bytes (no second copy of the matrix while packing).
    lin = Linear(64, 128).to(torch.bfloat16)
    plain = lin.weight.detach().clone()
    address = lin.weight.data_ptr()
    assert lin.prepack(in_place=True)
    assert lin.weight.data_ptr() == address
    assert torch.equal(lin.weight, vnni_linear.pack(plain))
    # Another tensor over its bytes, or the parameter itself held outside: a new copy, the
    # plain bytes left as they were for whoever holds them.
    for hold in (lambda m: m.weight.detach(), lambda m: m.weight, lambda m: m.weight[:64]):
        lin = Linear(64, 128).to(torch.bfloat16)
        plain = lin.weight.detach().clone()
        held = hold(lin)
        before = held.detach().clone()
        assert lin.prepack(in_place=True)
        assert lin.weight.data_ptr() != held.data_ptr() and torch.equal(held, before)
        assert torch.equal(lin.dense_weight(), plain)
    # Not asked: a new copy.
    lin = Linear(64, 128).to(torch.bfloat16)
    address = lin.weight.data_ptr()
    assert lin.prepack() and lin.weight.data_ptr() != address
    # Rows not a multiple of the layout's 64-row blocks: a new (padded) copy.
    lin = Linear(64, 100).to(torch.bfloat16)
    address = lin.weight.data_ptr()
    assert lin.prepack(in_place=True) and lin.weight.data_ptr() != address


@needs_packing
def test_packing_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(layers.ENV_PREPACK, "0")
    lin = Linear(8, 8).to(torch.bfloat16)
    assert not lin.prepack() and not lin.weight.is_mkldnn and lin.layout == "plain"


@needs_packing
def test_vnni_layout_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(vnni_linear._lib, "enabled", False)
    lin = Linear(64, 64).to(torch.bfloat16)
    assert lin.prepack() is prepack_available("cpu")
    assert lin.layout == ("onednn" if prepack_available("cpu") else "plain")


@needs_packing
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
    assert (model.lm_head.layout == "plain") is tied
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    after = resident_weight_bytes(model)
    if VNNI_HERE:
        # Column blocks of 64: this model's 320-row head and 64/128-row projections fill
        # theirs exactly, so not one byte more.
        assert all(m.layout == "vnni" for m in linears if m is not model.lm_head or not tied)
    assert after == before
    prompt = list(range(3, 200, 5))
    # Both sides bf16: the packed path must pick the plain path's tokens (the same float32
    # sums up to their order, each rounded once to bf16: at most one bf16 rounding apart,
    # which on this tiny random model does not move the argmax).
    assert greedy(model, prompt, 16) == greedy(plain, prompt, 16)
    assert prepack_linears(model) == 0  # idempotent
