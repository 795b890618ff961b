"""Weight-only int8/int4 linears against their dequantized reference, and GGUF block decoding."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carpool.model.gguf_quant import as_int8, decode_blocks
from carpool.model.quant import (
    RESCORE_TOP_K,
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    kernel_dtype,
    quantize_linear,
)
from carpool.model.quant_plan import REROUNDED
from helpers.devices import DEVICES
from helpers.gguf_export import quantize_q4_k

# (out, in): a multiple of the int4 packing's 64-row block, and one that needs padding.
SHAPES = [(128, 64), (96, 96)]


def _reference(q, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` in float64 with the module's own dequantized weight, ``x`` rounded to the
    kernel dtype first as the module does (a float32 model's quantized matmuls take bf16)."""
    w = q.dequantize().double()
    y = x.to(kernel_dtype(x.dtype)).double() @ w.T
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
    # Rounding only: the kernel's bf16 output (2^-8 relative) plus accumulation order, for both
    # model dtypes (a float32 model's quantized matmuls compute in bf16).
    eps = 2**-7
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
    # Scales are stored in bf16 (rounded: up to 2^-8 relative) and the codes chosen for the stored
    # scale: half a step of the unrounded scale, up to that rounding.
    assert bool((err <= step / 2 * (1 + 2**-7) + 1e-6).all()), float((err - step / 2).max())


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantizing_in_row_slices_equals_one_slice(monkeypatch, method):
    # from_float quantizes a slice of rows at a time (its float32 temporaries then stay a few
    # MiB for a vocabulary head): every row's codes and scales are those of the whole matrix.
    from carpool.model import quant

    w = torch.randn(150, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    cls = Int8Linear if method == "int8" else Int4Linear
    whole = cls.from_float(w, None, torch.bfloat16)
    monkeypatch.setattr(quant, "_QUANTIZE_SLICE_VALUES", 64 * 7)  # 7 rows, a short last slice
    sliced = cls.from_float(w, None, torch.bfloat16)
    expected, got = whole.state_dict(), sliced.state_dict()
    assert list(expected) == list(got) and len(got) >= 2
    for name, a in expected.items():
        assert torch.equal(a, got[name]), name


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_embedding_rows_are_the_dequantized_weight_rows(method):
    torch.manual_seed(2)
    q = quantize_linear(torch.nn.Linear(64, 320, bias=False), method, torch.float32)
    emb = QuantizedEmbedding(q)
    ids = torch.tensor([[0, 319, 63, 64], [5, 5, 200, 127]])
    assert torch.equal(emb(ids), q.dequantize()[ids])


def _gguf_roundtrip(type_name: str, w: np.ndarray):
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = quantize_q4_k(w) if type_name == "Q4_K" else gguf.quants.quantize(w, qtype)
    return decode_blocks(raw, type_name, w.shape), gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_q4_blocks_map_exactly_onto_int4_groups(type_name):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    qw, expected = _gguf_roundtrip(type_name, w)
    q = Int4Linear.from_codes(qw.codes, qw.scale, qw.minimum, None, torch.float32)
    got = q.dequantize().numpy()
    # The module holds (q - 8) * bf16(d) + bf16(m + 8 d) exactly (to float32 rounding): d q + m
    # with the scale and zero rounded once to the kernels' bf16.
    d = qw.scale.float().repeat_interleave(32, dim=1)
    zero = (qw.minimum.float() + 8 * qw.scale.float()).repeat_interleave(32, dim=1)
    d_b, zero_b = d.bfloat16().float(), zero.bfloat16().float()
    exact = ((qw.codes.float() - 8) * d_b + zero_b).numpy()
    np.testing.assert_allclose(got, exact, rtol=0, atol=4e-7 * np.abs(exact).max())
    # Against gguf's own dequantization: only that rounding, at most 2^-8 of each (relative).
    bound = (2**-8 * (8 * d.abs() + zero.abs())).numpy() * (1 + 1e-5) + 1e-7
    assert (np.abs(got - expected) <= bound).all(), float(np.abs(got - expected).max())


def test_gguf_q4_k_groups_are_ggufs_own_dequantization_of_any_block():
    # Every byte pattern of the 6-bit scales and minima and of the nibbles (random blocks, not
    # a quantizer's): the groups' d sc q - dmin m equal gguf-py's Q4_K dequantization exactly.
    rng = np.random.default_rng(1)
    n, k = 40, 768
    blocks = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    for field in (slice(0, 2), slice(2, 4)):  # d and dmin: finite positive fp16 values
        values = rng.uniform(1e-4, 0.05, (n, k // 256)).astype(np.float16)
        blocks[..., field] = values.view(np.uint8).reshape(n, k // 256, 2)
    raw = blocks.reshape(n, -1)
    qw = decode_blocks(raw, "Q4_K", (n, k))
    assert qw.method == "int4" and qw.codes.shape == (n, k) and qw.scale.shape == (n, k // 32)
    assert int(qw.codes.max()) <= 15
    got = qw.codes.float().view(n, -1, 32) * qw.scale[..., None] + qw.minimum[..., None]
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(n, k)
    assert np.array_equal(got.reshape(n, k).numpy(), expected)


# Offsets of a block's fp16 fields (d, dmin): random bytes there could be NaN (IQ1_M keeps its
# scale in the top bits of its sub-block scales: none).
_FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q5_K": (0, 2), "Q6_K": (208,), "IQ1_M": ()}
_FP16_FIELDS.update({t: (0,) for t in REROUNDED if t.startswith("IQ") and t != "IQ1_M"})


@pytest.mark.parametrize("type_name", REROUNDED)
def test_gguf_blocks_without_a_kernel_requantized_per_row_within_half_the_row_scale(type_name):
    # Q6_K, Q5_x, Q2_K, Q3_K and the IQ types fit no kernel's groups: any block's weights
    # (gguf-py's dequantization) are re-rounded to int8 with one scale per row, the row's
    # largest magnitude / 127 rounded up to bf16 (kept exactly by the kernel). K- and i-quant
    # blocks of random bytes (every pattern of their scales, codes and codebook indices); Q5_0 /
    # Q5_1 from gguf-py's quantizer.
    rng = np.random.default_rng(2)
    n, k = 48, 512
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in _FP16_FIELDS:
        block, size = gguf.quants.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
        for at in _FP16_FIELDS[type_name]:
            values = rng.uniform(1e-4, 0.01, (n, k // block)).astype(np.float16)
            blocks[..., at : at + 2] = values.view(np.uint8).reshape(n, k // block, 2)
        if type_name == "IQ1_M":  # its fp16 scale: the top nibbles of its four uint16 scales
            bits = rng.uniform(1e-4, 0.01, (n, k // block)).astype(np.float16).view(np.uint16)
            for j in range(4):
                nibble = ((bits >> (4 * j)) & 0xF).astype(np.uint8)
                blocks[..., 49 + 2 * j] = (blocks[..., 49 + 2 * j] & 0x0F) | (nibble << 4)
        raw = blocks.reshape(n, -1)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    qw = decode_blocks(raw, type_name, (n, k))
    assert qw.method == "int8" and qw.codes.dtype == torch.int8 and qw.scale.shape == (n,)
    expected = gguf.quants.dequantize(raw, qtype).reshape(n, k)
    q = Int8Linear(qw.codes, qw.scale, None)
    assert torch.equal(q.scales.float(), qw.scale)  # a bf16 value: stored exactly
    err = np.abs(q.dequantize().numpy() - expected)
    assert (err <= qw.scale.numpy()[:, None] / 2 * (1 + 1e-6)).all()
    largest = np.abs(expected).max(axis=1)
    assert (qw.scale.numpy() >= largest / 127).all()
    assert (qw.scale.numpy() <= largest / 127 * (1 + 2**-7)).all()


def test_int4_shards_as_int8_within_half_the_row_scale():
    # A fused matrix with shards of both kernels (a Q4_K_M file's q/k in Q4_K, v in Q6_K) is
    # held in int8: an int4 shard's weights re-rounded per row.
    rng = np.random.default_rng(3)
    qw, _ = _gguf_roundtrip("Q4_K", rng.standard_normal((64, 256)).astype(np.float32))
    dense = Int4Linear.from_codes(qw.codes, qw.scale, qw.minimum, None, torch.float32)
    exact = (qw.codes.float().view(64, -1, 32) * qw.scale[..., None] + qw.minimum[..., None]).view(
        64, 256
    )
    as8 = as_int8(qw)
    assert as8.method == "int8" and as_int8(as8) is as8
    err = (as8.codes.float() * as8.scale[:, None] - exact).abs()
    assert bool((err <= as8.scale[:, None] / 2 * (1 + 1e-6)).all())
    assert dense.dequantize().shape == (64, 256)


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
    # The row scale is the largest block scale rounded up to bf16 (what the kernel stores), so
    # it is kept exactly and no code leaves +-127.
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).reshape(64, 8, 34)
    d_blocks = np.ascontiguousarray(raw[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    largest = d_blocks.max(axis=1)
    assert (qw.scale.numpy() >= largest).all()
    assert (qw.scale.numpy() <= largest * (1 + 2**-7)).all()
    assert torch.equal(q.scales.float(), qw.scale)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_kernel_matches_the_widened_fallback(device):
    torch.manual_seed(3)
    q = quantize_linear(torch.nn.Linear(64, 128), "int4", torch.bfloat16).to(device)
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    fallback = F.linear(x.float(), q.dequantize().float(), q.bias.float())
    torch.testing.assert_close(q(x).float(), fallback, rtol=2**-7, atol=2**-7)


def test_q8_0_decoding_in_row_slices_equals_one_slice(monkeypatch):
    from carpool.model import quant

    w = np.random.default_rng(1).standard_normal((64, 96)).astype(np.float32)
    whole, _ = _gguf_roundtrip("Q8_0", w)
    monkeypatch.setattr(quant, "_QUANTIZE_SLICE_VALUES", 96 * 10)  # 10 rows, a short last slice
    sliced, _ = _gguf_roundtrip("Q8_0", w)
    assert torch.equal(whole.codes, sliced.codes) and torch.equal(whole.scale, sliced.scale)


def test_rerounding_in_row_slices_equals_one_slice(monkeypatch):
    # A re-rounded type (Q6_K) and an int4 shard held as int8 are re-rounded a slice of rows at
    # a time, each slice written into the one result: the codes and scales of one slice.
    from carpool.model import quant

    rng = np.random.default_rng(4)
    w = rng.standard_normal((70, 256)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q5_0)
    q4k, _ = _gguf_roundtrip("Q4_K", w[:64])
    whole = [decode_blocks(raw, "Q5_0", (70, 256)), as_int8(q4k)]
    monkeypatch.setattr(quant, "_QUANTIZE_SLICE_VALUES", 256 * 9)  # 9 rows, a short last slice
    sliced = [decode_blocks(raw, "Q5_0", (70, 256)), as_int8(q4k)]
    for a, b in zip(whole, sliced, strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
        assert b.codes.dtype == torch.int8 and b.scale.dtype == torch.float32


def test_int4_packing_in_row_slices_is_the_layout_torch_packs(monkeypatch):
    # Int4Linear packs its codes by hand, a slice of whole row blocks at a time (torch's own
    # packing takes int32 codes: 4 bytes a weight of temporaries): torch's bytes exactly.
    from carpool.model import quant

    block = quant.int4_row_block()
    codes = torch.randint(0, 16, (5 * block, 96), dtype=torch.uint8)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(quant._pack_int4(codes), expected)
    monkeypatch.setattr(
        quant, "_QUANTIZE_SLICE_VALUES", 2 * block * 96
    )  # slices of 2 blocks, 1 left
    assert torch.equal(quant._pack_int4(codes), expected)
    assert torch.equal(quant._pack_int4(codes.to(torch.int64)), expected)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_head_logits_rescore_the_top_entries_exactly_in_float32(method):
    torch.manual_seed(4)
    head = quantize_linear(torch.nn.Linear(64, 1000, bias=False), method, torch.float32)
    x = torch.randn(3, 64)
    exact = x.double() @ head.dequantize().double().T  # the module's own weight, float64
    got = head.logits(x)
    assert got.dtype == torch.float32 and got.shape == (3, 1000)
    # forward alone rounds to bf16: its top entries are off by up to 2^-8 relative...
    rounded = head(x).double()
    # (the top half: entries near the k-th may swap in or out of the rescored set by rounding)
    top = exact.topk(RESCORE_TOP_K // 2, dim=-1).indices
    assert (rounded.gather(1, top) - exact.gather(1, top)).abs().max() > 1e-4
    # ...logits recomputes them in float32 (and so keeps the true argmax).
    torch.testing.assert_close(got.double().gather(1, top), exact.gather(1, top), rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    # The rest stay the kernel's values: bf16-rounded input and output.
    assert (got.double() - exact).abs().max() <= 2**-7 * exact.abs().max()


def test_head_logits_break_a_bf16_tie_the_right_way():
    # Two rows whose outputs differ by less than a bf16 step at their magnitude (~25: a step of
    # 0.125): rounded, they tie and argmax takes the lower index; rescored, the higher wins.
    codes = torch.zeros(64, 32, dtype=torch.int8)
    codes[:, 0] = 1
    codes[0, 0] = codes[1, 0] = 127
    codes[1, 1] = 1
    scale = torch.full((64,), 0.1965).bfloat16().float()
    head = Int8Linear(codes, scale, None, torch.float32)
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1] = 1.0, 0.03
    y = head(x)
    assert y[0, 0] == y[0, 1] and y[0, 0] > y[0, 2:].max()  # 24.929 and 24.935: both 24.875
    assert int(head.logits(x).argmax()) == 1


@pytest.mark.usefixtures("finite_row_limits")
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_prefills_widened_weight_takes_this_cpus_dense_product(method):
    # Above the kernels' rows a quantized linear widens its weight once and runs a dense
    # product: on an AVX2 CPU without a bf16 GEMM in the VNNI layout through vnni_linear (the
    # same bits as packing the widened weight and calling it), elsewhere the plain GEMM.
    from carpool.model import fused_ops, vnni_linear
    from carpool.model.layers import linear_bucketed, widen_once

    torch.manual_seed(5)
    q = quantize_linear(torch.nn.Linear(96, 200, bias=False), method, torch.bfloat16)
    x = torch.randn(300, 96, dtype=torch.bfloat16)
    # The widened weight as the module makes it (int4: in bf16 arithmetic, fused_ops.int4_widen).
    dense = q._dense(torch.bfloat16) if method == "int4" else q.qweight.to(torch.bfloat16)
    if fused_ops.bf16_emulated() and vnni_linear.load():
        want = vnni_linear.linear(x, vnni_linear.pack(dense), None, 200)
    else:
        want = linear_bucketed(x, dense)
    scale = q.scales if method == "int8" else 1
    assert torch.equal(q(x), want * scale)
    with widen_once():  # the packed copy made once for every call in the block
        assert torch.equal(q(x[:200]), q(x)[:200])


def _same_module(a: Int4Linear, b: Int4Linear) -> None:
    assert (a.out_features, a.in_features) == (b.out_features, b.in_features)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scales_zeros, b.scales_zeros)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_quantizing_packed_as_it_goes_is_packing_the_codes(monkeypatch, dtype):
    # int4_quantize(packed=True) packs each slice of rows as it quantizes it (a matrix's
    # one-byte codes never whole): the bytes of packing its codes, the same scales, and the
    # same module from either. Slices of whole row blocks even where the budget is not.
    from carpool.model import quant

    block = quant.int4_row_block()
    w = torch.randn(5 * block, 96).to(dtype)
    codes, scale, minimum = quant.int4_quantize(w, dtype)
    assert scale.dtype == minimum.dtype == kernel_dtype(dtype)  # the stored values, exactly
    for budget in (1 << 20, 96 * (block + 3)):  # one slice; slices of one block, one left
        monkeypatch.setattr(quant, "_QUANTIZE_SLICE_VALUES", budget)
        packed, scale_p, minimum_p = quant.int4_quantize(w, dtype, packed=True)
        assert torch.equal(packed, quant._pack_int4(codes))
        assert torch.equal(scale_p, scale) and torch.equal(minimum_p, minimum)
    _same_module(
        Int4Linear.from_codes(packed, scale, minimum, None, dtype, packed=True),
        Int4Linear.from_codes(codes, scale, minimum, None, dtype),
    )
    with pytest.raises(AssertionError, match="multiple of"):
        quant.int4_quantize(w[: block - 1], dtype, packed=True)


def test_packed_int4_codes_are_padded_to_whole_blocks_of_64(monkeypatch):
    # Where the CPU packs 32-row blocks (AVX2), 96 rows are packable and padded to 128 with
    # code 8 (0x88 packed) and zero scales, as one-byte codes are before packing.
    from carpool.model import quant

    monkeypatch.setattr(quant, "int4_row_block", lambda: 32)
    codes = torch.randint(0, 16, (96, 64), dtype=torch.uint8)
    scale, minimum = torch.rand(96, 2), torch.randn(96, 2)
    packed = quant._pack_int4(codes)
    assert packed.shape == (96, 32)
    _same_module(
        Int4Linear.from_codes(packed, scale, minimum, None, torch.float32, packed=True),
        Int4Linear.from_codes(codes, scale, minimum, None, torch.float32),
    )


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_int4_blocks_decoded_packed_a_slice_at_a_time(monkeypatch, type_name):
    from carpool.model import quant

    qtype = gguf.GGMLQuantizationType[type_name]
    w = np.random.default_rng(5).standard_normal((192, 512)).astype(np.float32)
    raw = quantize_q4_k(w) if type_name == "Q4_K" else gguf.quants.quantize(w, qtype)
    plain = decode_blocks(raw, type_name, w.shape)
    monkeypatch.setattr(quant, "_QUANTIZE_SLICE_VALUES", 64 * 512)  # a block of rows per slice
    packed = decode_blocks(raw, type_name, w.shape, pack=True)
    assert packed.packed and not plain.packed and packed.shape == plain.shape == w.shape
    assert torch.equal(packed.codes, quant._pack_int4(plain.codes))
    assert torch.equal(packed.scale, plain.scale) and torch.equal(packed.minimum, plain.minimum)
    assert torch.equal(packed.code_rows(5, 130), plain.codes[5:130])
    # Rows no layout block fits: the one-byte codes, as without packing.
    odd = decode_blocks(raw[:40], type_name, (40, 512), pack=True)
    assert not odd.packed and torch.equal(odd.codes, plain.codes[:40])
    # A fused matrix of packed shards stays packed; with an unpacked one it is unpacked.
    from carpool.model.gguf_quant import QuantWeight

    both = QuantWeight.concat([packed, packed])
    assert both.packed and torch.equal(both.code_rows(0, 384), torch.cat([plain.codes] * 2))
    mixed = QuantWeight.concat([packed, odd])
    assert not mixed.packed and torch.equal(mixed.codes, torch.cat([plain.codes, odd.codes]))
    # Held as int8 (a Q4_K_M fused matrix beside Q6_K): the same from packed codes.
    a, b = as_int8(packed), as_int8(plain)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


def test_row_abs_max_is_the_largest_magnitude_of_each_row():
    from carpool.model.quant import row_abs_max

    torch.manual_seed(6)
    w = torch.randn(40, 300) * torch.rand(40, 1) * 10
    w[3], w[4], w[5] = 0.0, -w[4].abs(), w[5].abs()  # zeros, all negative, all positive
    assert torch.equal(row_abs_max(w), w.abs().amax(dim=1))
    assert torch.equal(row_abs_max(w.bfloat16()), w.bfloat16().abs().amax(dim=1))
