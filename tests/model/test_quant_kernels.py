"""Weight-only int8/int4 linears against their dequantized reference, and GGUF block decoding."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carpool.model.gguf_quant import decode_blocks
from carpool.model.quant import Int4Linear, Int8Linear, QuantizedEmbedding, quantize_linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (out, in): a multiple of the int4 packing's 64-row block, and one that needs padding.
SHAPES = [(128, 64), (96, 96)]


def _reference(q, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` in float64 with the module's own dequantized weight."""
    w = q.dequantize().double()
    y = x.double() @ w.T
    return y if q.bias is None else y + q.bias.double()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("batch", [1, 7, 200])  # 200: above the widening threshold
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_matmul_equals_its_dequantized_reference(
    device, method, batch, bias, dtype, shape
):
    torch.manual_seed(0)
    n, k = shape
    dense = torch.nn.Linear(k, n, bias=bias).to(dtype)
    q = quantize_linear(dense, method).to(device)
    x = torch.randn(batch, k, dtype=dtype, device=device)
    y = q(x)
    assert y.shape == (batch, n) and y.dtype == dtype
    ref = _reference(q, x)
    # Rounding only: the output's own rounding (bf16: 2^-8 relative) plus accumulation order.
    eps = 2**-7 if dtype == torch.bfloat16 else 1e-5
    err = (y.double() - ref).abs().max().item()
    assert err <= eps * ref.abs().max().item() + 1e-6, f"{method} {dtype} max err {err}"
    # A 3-D input (tokens of several sequences) takes the same path row by row.
    y3 = q(x.reshape(1, batch, k))
    assert torch.equal(y3.reshape(batch, n), y)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantization_error_is_at_most_half_a_step(method, shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    q = (Int8Linear if method == "int8" else Int4Linear).from_float(w, None, torch.float32)
    err = (q.dequantize() - w).abs()
    if method == "int8":
        step = w.abs().amax(dim=1, keepdim=True) / 127
    else:
        g = w.reshape(shape[0], -1, 32)
        step = ((g.amax(-1) - g.amin(-1)) / 15).repeat_interleave(32, dim=1)
    assert bool((err <= step / 2 + 1e-6).all()), float((err - step / 2).max())


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_embedding_rows_are_the_dequantized_weight_rows(method):
    torch.manual_seed(2)
    q = quantize_linear(torch.nn.Linear(64, 320, bias=False), method, torch.float32)
    emb = QuantizedEmbedding(q)
    ids = torch.tensor([[0, 319, 63, 64], [5, 5, 200, 127]])
    assert torch.equal(emb(ids), q.dequantize()[ids])


def _gguf_roundtrip(type_name: str, w: np.ndarray):
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(w, qtype)
    return decode_blocks(raw, type_name, w.shape), gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_map_exactly_onto_int4_groups(type_name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 128)).astype(np.float32)
    qw, expected = _gguf_roundtrip(type_name, w)
    q = Int4Linear.from_codes(qw.codes, qw.scale, qw.minimum, None, torch.float32)
    got = q.dequantize().numpy()
    # (q - 8) * d + (m + 8 d) vs d q + m: the same value up to float32 rounding.
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-7 * np.abs(expected).max())


def test_gguf_q8_0_requantized_per_row_within_half_the_largest_block_scale():
    rng = np.random.default_rng(0)
    # Rows whose blocks have very different scales: the worst case for one scale per row.
    w = rng.standard_normal((64, 256)).astype(np.float32)
    w *= np.repeat(rng.uniform(0.01, 1.0, (64, 8)), 32, axis=1).astype(np.float32)
    qw, expected = _gguf_roundtrip("Q8_0", w)
    q = Int8Linear(qw.codes, qw.scale, None)
    err = np.abs(q.dequantize().numpy() - expected)
    d_max = qw.scale.numpy()[:, None]
    assert (err <= d_max / 2 * (1 + 1e-6)).all()
    # Rows' largest blocks are kept exactly.
    assert err.min() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_kernel_matches_the_widened_fallback(device):
    torch.manual_seed(3)
    q = quantize_linear(torch.nn.Linear(64, 128), "int4", torch.bfloat16).to(device)
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    fallback = F.linear(x.float(), q.dequantize().float(), q.bias.float())
    torch.testing.assert_close(q(x).float(), fallback, rtol=2**-7, atol=2**-7)


def test_q8_0_decoding_in_row_slices_equals_one_slice(monkeypatch):
    from carpool.model import gguf_quant

    w = np.random.default_rng(1).standard_normal((64, 96)).astype(np.float32)
    whole, _ = _gguf_roundtrip("Q8_0", w)
    monkeypatch.setattr(gguf_quant, "_ROWS_PER_SLICE", 10)
    sliced, _ = _gguf_roundtrip("Q8_0", w)
    assert torch.equal(whole.codes, sliced.codes) and torch.equal(whole.scale, sliced.scale)
