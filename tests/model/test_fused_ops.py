"""The fused CPU operators (``carpool.model.fused_ops``): the torch ops' values (to the last
bf16 rounding), the torch fallback where they do not apply, and the model's tokens with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from carpool.model import fused_ops, kernel_build
from carpool.model.loader import load_model
from carpool.model.quant import int4_row_block
from helpers.carpool_ref import greedy
from helpers.hf_models import hf_greedy, save_tiny_hf_model


@pytest.fixture(scope="module", autouse=True)
def built():
    assert fused_ops.load(), f"fused ops did not build: {fused_ops.failure()}"


def torch_norm(x, w, eps):
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def torch_silu_mul(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


SHAPES = [(1, 512), (3, 64), (64, 576), (2, 5, 100), (7, 17)]


def assert_bf16_close(got, want):
    """Equal but for rare one-ulp roundings: the float32 sums run in another order than
    torch's, so a value within ~1e-7 of a bf16 rounding boundary may round the other way, and
    a value that cancels to near zero carries the sums' absolute error (~2^-24 of the largest
    terms: a tiny atol)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got != want).float().mean() < 2e-3
    atol = 2**-16 * want.float().abs().max().item()
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_norms_are_torchs(shape):
    torch.manual_seed(0)
    x, r = (torch.randn(shape, dtype=torch.bfloat16) * 3 for _ in range(2))
    w = torch.randn(shape[-1], dtype=torch.bfloat16)
    calls = fused_ops.fused_calls()
    assert_bf16_close(fused_ops.rms_norm(x, w, 1e-6), torch_norm(x, w, 1e-6))
    out, total = fused_ops.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, x + r)  # one rounding of the same float32 sum: exact
    assert_bf16_close(out, torch_norm(x + r, w, 1e-6))
    assert fused_ops.fused_calls() == calls + 2


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_silu_and_mul_is_torchs(shape):
    torch.manual_seed(1)
    gu = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.bfloat16) * 4
    # exp is a polynomial here (rel. error ~2e-7), Sleef's in torch: the same bf16 roundings
    # but for a value within ~2e-7 of a rounding boundary.
    assert_bf16_close(fused_ops.silu_and_mul(gu), torch_silu_mul(gu))


def test_float32_within_rounding_of_torch():
    torch.manual_seed(2)
    x, r = torch.randn(9, 300), torch.randn(9, 300)
    w = torch.randn(300)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-5), torch_norm(x, w, 1e-5))
    out, total = fused_ops.add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(out, torch_norm(x + r, w, 1e-5))
    torch.testing.assert_close(total, x + r)
    gu = torch.randn(9, 600) * 5
    # float32 SwiGLU through the kernel where it gives torch's bits (its silu as torch's CPU
    # kernel computes it, with torch's own vector exp): here it does, bit for bit.
    assert fused_ops.silu_float32_fused()
    calls = fused_ops.fused_calls()
    assert torch.equal(fused_ops.silu_and_mul(gu), torch_silu_mul(gu))
    assert fused_ops.fused_calls() == calls + 1


@pytest.mark.parametrize("rows, half", [(1, 1536), (5, 300), (3, 69), (2, 2000), (33, 48), (4, 7)])
def test_float32_silu_and_mul_is_torchs_bits(rows, half):
    # Rows whose length leaves torch's vector loop a scalar rest (69, 2000: past a multiple of
    # two vectors; 7: no vector at all), magnitudes where exp under- and overflows, special
    # values: the kernel's float32 path gives torch's F.silu(gate) * up bit for bit.
    torch.manual_seed(rows * half)
    gu = (
        torch.randn(rows, 2 * half)
        * torch.tensor([1e-3, 1.0, 30.0, 120.0]).repeat(half // 2 + 1)[: 2 * half]
    )
    gu[0, :8] = torch.tensor(
        [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 88.7, -104.0, 1e-40]
    )[: min(8, 2 * half)]
    got = torch.ops.carpool.silu_and_mul(gu)
    assert torch.equal(got.view(torch.int32), torch_silu_mul(gu).view(torch.int32))


def test_float32_silu_and_mul_keeps_torchs_ops_where_its_bits_differ(monkeypatch):
    # Where the probe found other bits (torch dispatching to another instruction set than the
    # kernel's build), float32 keeps torch's two ops.
    monkeypatch.setattr(fused_ops, "_silu_float32", False)
    gu = torch.randn(3, 64)
    calls = fused_ops.fused_calls()
    assert torch.equal(fused_ops.silu_and_mul(gu), torch_silu_mul(gu))
    assert fused_ops.fused_calls() == calls


def test_silu_and_mul_large_magnitudes():
    # Large magnitudes of either sign: no overflow in sigmoid.
    big = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(torch.ops.carpool.silu_and_mul(big), torch_silu_mul(big))
    torch.testing.assert_close(
        torch.ops.carpool.silu_and_mul(big.bfloat16()).float(),
        torch_silu_mul(big.bfloat16()).float(),
    )


def test_strided_other_dtype_and_disabled_inputs_take_torch_ops():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.randn(32, dtype=torch.bfloat16)
    calls = fused_ops.fused_calls()
    strided = x[:, ::2]
    assert torch.equal(fused_ops.rms_norm(strided, w, 1e-6), torch_norm(strided, w, 1e-6))
    half = x.half()
    assert torch.equal(fused_ops.silu_and_mul(half), torch_silu_mul(half))
    fused_ops.use_fused(False)
    try:
        xc = x[:, :32].contiguous()
        assert torch.equal(fused_ops.rms_norm(xc, w, 1e-6), torch_norm(xc, w, 1e-6))
    finally:
        fused_ops.use_fused(True)
    assert fused_ops.fused_calls() == calls


def test_bad_arguments_are_refused_with_a_message():
    with pytest.raises(RuntimeError, match="weight of shape"):
        torch.ops.carpool.rms_norm(torch.randn(2, 8), torch.randn(4), 1e-6)
    with pytest.raises(RuntimeError, match="residual must match"):
        torch.ops.carpool.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.randn(8), 1e-6)
    with pytest.raises(RuntimeError, match=r"\[\.\.\., 2 \* I\]"):
        torch.ops.carpool.silu_and_mul(torch.randn(2, 7))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_with_fused_ops_matches_transformers(tmp_path, arch):
    # fp32 greedy vs transformers with the fused norms, residual adds and activation in the loop.
    hf = save_tiny_hf_model(arch, tmp_path)
    model, _ = load_model(tmp_path, dtype="float32")
    prompt = list(range(3, 300, 7))
    calls = fused_ops.fused_calls()
    assert greedy(model, prompt, 16) == hf_greedy(hf, prompt, 16)
    layers = model.config.num_hidden_layers
    # Per layer and step the two norms (fused with the residual adds) and the rotary; in
    # float32 the SwiGLU keeps torch's ops (see fused_ops.silu_and_mul).
    assert fused_ops.fused_calls() - calls >= 16 * 3 * layers


def test_bf16_model_tokens_unchanged_by_fusing(tmp_path):
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="bfloat16")
    prompt = list(range(3, 200, 5))
    fused = greedy(model, prompt, 16)
    fused_ops.use_fused(False)
    try:
        plain = greedy(model, prompt, 16)
    finally:
        fused_ops.use_fused(True)
    assert fused == plain


def test_argmax_is_torchs_first_maximum_nan_included():
    torch.manual_seed(3)
    logits = torch.randn(7, 32003)
    logits[1, 5] = logits[1, 900] = logits[1].max() + 1  # a tie: the first index wins
    logits[2, 17] = float("nan")  # a NaN wins, as in torch
    logits[2, 30] = float("nan")
    logits[3] = float("-inf")  # all -inf: index 0
    logits[4, -1] = 1e30  # in the scalar tail past the last 16-wide chunk
    logits[5] = -logits[5].abs() - 1  # a signed zero tie: the first of -0.0 and 0.0 wins
    logits[5, 10], logits[5, 20] = -0.0, 0.0
    logits[6, -1] = float("nan")  # a NaN in the tail only
    calls = fused_ops.fused_calls()
    got = fused_ops.argmax(logits)
    assert fused_ops.fused_calls() == calls + 1
    assert got.dtype == torch.long
    assert got.tolist() == logits.max(-1).indices.tolist()
    assert got[1] == 5 and got[2] == 17 and got[3] == 0 and got[4] == 32002
    assert got[5] == 10 and got[6] == 32002
    # Other dtypes and shapes take torch's reduction.
    half = logits.bfloat16()
    assert fused_ops.argmax(half).tolist() == half.max(-1).indices.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_in_place_is_apply_rotarys(dtype, tmp_path):
    from carpool.config import ModelConfig
    from carpool.model.layers import RotaryEmbedding, apply_rotary, rotate_in_place

    save_tiny_hf_model("llama", tmp_path)
    config = ModelConfig.from_json_file(tmp_path / "config.json")
    rotary = RotaryEmbedding(config)
    positions = torch.tensor([0, 5, 17, 300, 2])
    cs = rotary.table(positions, dtype)
    torch.manual_seed(4)
    d = config.head_dim
    qkv = torch.randn(5, 4 + 2 * 2, d, dtype=dtype) * 3
    qk = qkv[:, :6]  # strided rows: the q and k heads of the fused projection, as in Attention
    want = apply_rotary(qk.clone(), cs[:, :1], cs[:, 1:])
    v_before = qkv[:, 6:].clone()
    calls = fused_ops.fused_calls()
    rotate_in_place(qk, cs)
    assert fused_ops.fused_calls() == calls + 1
    # torch's roundings, bit for bit, in both dtypes (see fused_ops.rotary_: in float32 one
    # multiply-add contracted the other way flipped the default model's answer).
    assert torch.equal(qk, want)
    assert torch.equal(qkv[:, 6:], v_before)  # v untouched
    for seed in range(5):  # more values near rounding boundaries
        torch.manual_seed(seed)
        x = torch.randn(33, 9, d, dtype=dtype) * 3
        t = torch.randn(33, 2, d).to(dtype)
        ref = apply_rotary(x.clone(), t[:, :1], t[:, 1:])
        assert fused_ops.rotary_(x, t)
        assert torch.equal(x, ref)
    # A mismatched table or head_dim takes the torch path: not applied, x untouched.
    before = qk.clone()
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    assert not fused_ops.rotary_(qk, cs.to(other))
    assert torch.equal(qk, before)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 13, 32])
def test_int8_gemv_is_torchs_int8_kernel(rows):
    torch.manual_seed(5)
    x = torch.randn(rows, 576, dtype=torch.bfloat16)
    n = 3001  # odd: unequal shares per thread
    q = torch.randint(-127, 128, (n, 576), dtype=torch.int8)
    scales = (torch.rand(n) * 0.01).bfloat16()
    calls = fused_ops.fused_calls()
    if rows <= fused_ops.int8_gemv_max_rows(q.numel()):  # what Int8Linear takes it for here
        got = fused_ops.int8_gemv(x, q, scales)
        assert fused_ops.fused_calls() == calls + 1
    else:  # the operator itself takes any row count
        got = torch.ops.carpool.int8_gemv(x, q, scales)
    # The same float32 sums of exact products (in another order), rounded once: torch's int8
    # kernel's values but for a rare one-ulp rounding.
    assert_bf16_close(got, torch._weight_int8pack_mm(x, q, scales))
    exact = (x.float() @ q.float().T) * scales.float()
    torch.testing.assert_close(got.float(), exact, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [200, 203])  # past the last 16 (AVX-512) / 64 and 8 (AVX2) codes
def test_int8_gemv_row_does_not_depend_on_its_neighbours(dtype, k):
    torch.manual_seed(4)
    q = torch.randint(-127, 128, (300, k), dtype=torch.int8)
    s = (torch.rand(300) * 0.01).bfloat16()
    x = torch.randn(37, k, dtype=dtype)
    every = torch.ops.carpool.int8_gemv(x, q, s)
    # Groups of 1-6 rows alone (the AVX2 loops' shapes), and 34 rows in groups of 5 and 6.
    for lo, hi in ((0, 1), (5, 7), (10, 13), (20, 24), (24, 29), (29, 35), (3, 37)):
        assert torch.equal(torch.ops.carpool.int8_gemv(x[lo:hi], q, s), every[lo:hi]), (lo, hi)
    exact = (x.bfloat16().float() @ q.float().T) * s.float()
    torch.testing.assert_close(every.float(), exact, rtol=2**-7, atol=1e-3)


@pytest.mark.usefixtures("finite_row_limits")
def test_int8_gemv_declines_what_it_does_not_take():
    n = 1001
    q = torch.randint(-127, 128, (n, 40), dtype=torch.int8)  # K = 40: a scalar tail
    s = torch.rand(n).bfloat16()
    too_many = torch.randn(fused_ops.int8_gemv_max_rows(q.numel()) + 1, 40, dtype=torch.bfloat16)
    assert fused_ops.int8_gemv(too_many, q, s) is None  # rows
    assert fused_ops.int8_gemv(torch.randn(2, 40, dtype=torch.float16), q, s) is None
    small = q[:64].contiguous()  # a layer-sized matrix takes it too, on every CPU (AMX's included)
    assert fused_ops.int8_gemv(torch.randn(1, 40, dtype=torch.bfloat16), small, s[:64]) is not None
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    # (torch's own int8 kernel crashes on K = 40: compared with the exact products instead.)
    exact = (x.float() @ q.float().T) * s.float()
    assert_bf16_close(fused_ops.int8_gemv(x, q, s), exact.bfloat16())
    with pytest.raises(RuntimeError, match="at least one input row"):
        torch.ops.carpool.int8_gemv(torch.randn(0, 40, dtype=torch.bfloat16), small, s[:64])


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 13, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", [(3072, 576), (100, 64), (576, 1536)])
def test_int4_gemv_is_torchs_int4_kernel(rows, dtype, n, k):
    from carpool.model.quant import Int4Linear

    torch.manual_seed(rows + n)
    lin = Int4Linear.from_float(torch.randn(n, k), None, torch.bfloat16)
    x = torch.randn(rows, k, dtype=dtype)
    calls = fused_ops.fused_calls()
    args = (x, lin.packed, lin.group_size, lin.scales_zeros, int4_row_block())
    if rows <= fused_ops.INT4_GEMV_MAX_ROWS:  # what Int4Linear takes it for on this CPU
        got = fused_ops.int4_gemv(*args)
        assert fused_ops.fused_calls() == calls + 1
    else:  # the operator itself takes any row count
        got = torch.ops.carpool.int4_gemv(*args)
    assert got.dtype == dtype and got.shape == (rows, -(-n // 64) * 64)
    # What the float32 path did before: round x to bf16, torch's kernel, widen the bf16 out.
    want = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.bfloat16(), lin.packed, lin.group_size, lin.scales_zeros
    )
    # The same float32 sums (in another order), rounded once to bf16: torch's kernel's values
    # but for a rare one-ulp rounding; a float32 result holds exactly bf16 values.
    assert torch.equal(got, got.bfloat16().to(dtype))
    assert_bf16_close(got.bfloat16(), want)
    exact = x.bfloat16().float() @ lin._dense(torch.float32).T  # float32 dequantized weights
    err = (got.float()[:, :n] - exact).abs().max()
    assert err <= 2**-7 * exact.abs().max(), (err, exact.abs().max())


@pytest.mark.usefixtures("finite_row_limits")
def test_int4_linear_takes_the_fused_kernel_for_a_few_rows(monkeypatch):
    from carpool.model.quant import Int4Linear

    taken_calls = []
    real = fused_ops.int4_gemv

    def spy(*args):  # noqa: ANN002, ANN202
        y = real(*args)
        taken_calls.append(y is not None)
        return y

    monkeypatch.setattr(fused_ops, "int4_gemv", spy)
    lin = Int4Linear.from_float(torch.randn(96, 64), torch.randn(96), torch.float32)
    most = fused_ops.INT4_GEMV_MAX_ROWS  # 128 under finite_row_limits
    for rows, taken in ((1, True), (4, True), (most, True), (most + 1, False)):
        x = torch.randn(rows, 64)
        got = lin(x)
        assert taken_calls.pop() is taken, rows
        assert got.shape == (rows, 96) and got.dtype == torch.float32
        ref = x.bfloat16().float() @ lin._dense(torch.float32).T + lin.bias
        assert (got - ref).abs().max() <= 2**-7 * ref.abs().max()


def test_int4_gemv_refuses_bad_shapes_with_a_message():
    from carpool.model.quant import Int4Linear

    lin = Int4Linear.from_float(torch.randn(64, 64), None, torch.bfloat16)
    block = int4_row_block()
    gemv = torch.ops.carpool.int4_gemv
    with pytest.raises(RuntimeError, match="at least one input row"):
        gemv(torch.randn(0, 64), lin.packed, 32, lin.scales_zeros, block)
    with pytest.raises(RuntimeError, match="not a multiple of the group"):
        gemv(torch.randn(1, 64), lin.packed, 48, lin.scales_zeros, block)
    with pytest.raises(RuntimeError, match="scales_zeros must be"):
        gemv(torch.randn(1, 64), lin.packed, 32, lin.scales_zeros.float(), block)
    with pytest.raises(RuntimeError, match="block must be 32 or 64"):
        gemv(torch.randn(1, 64), lin.packed, 32, lin.scales_zeros, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k, rows", [(320, 37), (352, 70)])
def test_int4_gemv_row_does_not_depend_on_its_neighbours(dtype, k, rows):
    # Each row is summed in the same order whatever the row count (1-4 rows per pass over a
    # column block, 1-2 column passes; on AMX one tile of 1-16 rows, or past 16 tiles of 16
    # rows over spans of groups: 11 groups leave a span of one, 70 rows a tile of 6): a
    # request's values are the same alone or batched.
    from carpool.model.quant import Int4Linear

    torch.manual_seed(3 + k)
    lin = Int4Linear.from_float(torch.randn(192, k), None, torch.bfloat16)
    x = torch.randn(rows, k, dtype=dtype)
    block = int4_row_block()
    every = torch.ops.carpool.int4_gemv(x, lin.packed, 32, lin.scales_zeros, block)
    for lo, hi in ((0, 1), (5, 7), (10, 13), (20, 24), (3, 37), (0, 16), (17, rows)):
        part = torch.ops.carpool.int4_gemv(x[lo:hi], lin.packed, 32, lin.scales_zeros, block)
        assert torch.equal(part, every[lo:hi]), (lo, hi)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [256, 4160])
def test_int4_gemv_rows_of_a_prefill_do_not_depend_on_their_span(dtype, k):
    # A prefill's rows (past kInt4RowSpan, 96: spans of at most 96 rows, each span's groups of
    # up to 6 rows; on AVX-512 BF16 from 48 rows, on AVX2 from 24) are the bits of the rows in
    # any slice. 4,160 inputs: on AVX-512 BF16 the many-row loop decodes the codes in spans of
    # 2,048 inputs (kInt4CodeSpan), its running sums stored and read back between them.
    from carpool.model.quant import Int4Linear

    torch.manual_seed(8)
    lin = Int4Linear.from_float(torch.randn(160, k), None, torch.bfloat16)
    x = torch.randn(250, k, dtype=dtype)
    args = (lin.packed, 32, lin.scales_zeros, int4_row_block())
    every = torch.ops.carpool.int4_gemv(x, *args)
    for lo, hi in ((0, 1), (83, 84), (10, 57), (40, 88), (90, 190), (100, 250), (249, 250)):
        assert torch.equal(torch.ops.carpool.int4_gemv(x[lo:hi], *args), every[lo:hi]), (lo, hi)


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", [(64, 64), (192, 320), (576, 1536)])
def test_int4_gemv_is_int4_logits_of_the_rounded_rows_rounded(n, k, dtype, group):
    # Every path of int4_gemv (on AVX-512 BF16 two inputs per dot-product instruction, one or
    # two column blocks at a time by row count; elsewhere one FMA per input) adds each column's
    # products in int4_logits' order with the same roundings: its bf16 values are int4_logits'
    # float32 sums of the bf16-rounded rows, rounded once, at every row count.
    _check_int4_gemv_is_rounded_int4_logits(n, k, dtype, group)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_gemv_takes_rows_whose_length_is_no_multiple_of_16(dtype):
    # K = 40 in groups of 8: each row's last 8 inputs are rounded and paired one at a time
    # after the 16-wide loop (and groups of 8 take the dot-product loops, AMX or not).
    _check_int4_gemv_is_rounded_int4_logits(64, 40, dtype, 8)


def _check_int4_gemv_is_rounded_int4_logits(n, k, dtype, group):
    from carpool.model.quant import Int4Linear

    torch.manual_seed(n + k + group)
    w = torch.randn(n, k)
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = (hi - lo).clamp(min=1e-8) / 15
    codes = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
    # w = (q - 8) * scale + zero: zero = lo + 8 * scale
    lin = Int4Linear(codes.reshape(n, k), scales, lo + 8 * scales, None, group, torch.float32)
    block = int4_row_block()
    # 30: each group's codes widened once (AVX2); 50: decoded once (AVX-512 BF16, 48+ rows).
    for rows in (1, 2, 3, 4, 5, 6, 9, 30, 50):
        x = torch.randn(rows, k).to(dtype)
        got = torch.ops.carpool.int4_gemv(x, lin.packed, group, lin.scales_zeros, block)
        sums = torch.ops.carpool.int4_logits(
            x.bfloat16().float(), lin.packed, group, lin.scales_zeros, block
        )
        if fused_ops.int4_amx():
            # AMX adds a group's products in its own order (test below): the same values but
            # for a rare one-ulp rounding.
            assert_bf16_close(got.bfloat16(), sums.bfloat16())
        else:
            assert torch.equal(got, sums.bfloat16().to(dtype)), rows


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("k", [32, 64])
def test_int4_gemv_on_amx_is_the_tiles_product_of_its_codes(rows, k):
    # On AMX each group's sums are one TDPBF16PS chain from zero, as vnni_linear's AMX loop
    # makes a bf16 weight's: with one group (g = K), scale 1 and zero 8 (w = q), int4_gemv is
    # vnni_linear of the codes as bf16 weights, bit for bit (1-16 rows: the products among the
    # next group's decoding; 17+: tiles of 16 rows). Elsewhere int4_gemv adds in input order
    # (the test above and the next), which vnni_linear's AMX loop does not.
    from carpool.model import vnni_linear
    from carpool.model.quant import Int4Linear

    if not fused_ops.int4_amx():  # no AMX here, or a build without it: neither takes tiles
        assert not (vnni_linear.load() and vnni_linear.amx() and fused_ops.load())
        return
    assert vnni_linear.load() and vnni_linear.amx()
    torch.manual_seed(rows + k)
    n = 192
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    ones = torch.ones(n, 1)
    lin = Int4Linear(codes, ones, 8 * ones, None, k, torch.float32)
    x = torch.randn(rows, k).bfloat16()
    got = torch.ops.carpool.int4_gemv(x, lin.packed, k, lin.scales_zeros, int4_row_block())
    want = vnni_linear.linear(x, vnni_linear.pack(codes.bfloat16()), None, n)
    assert torch.equal(got[:, :n], want)
    # ... and not the sums in input order for every row (AMX's order is seen).
    ordered = torch.ops.carpool.int4_logits(
        x.float(), lin.packed, k, lin.scales_zeros, int4_row_block()
    )
    assert_bf16_close(got[:, :n], ordered[:, :n].bfloat16())


@pytest.mark.parametrize("rows", [1, 2, 4, 30])
def test_int4_gemv_adds_each_column_in_input_order(rows):
    # Rows whose float32 sums depend on the order of the adds: codes all 1, inputs 2^24, 1, 1,
    # -2^24 per group. In input order 2^24 + 1 rounds back to 2^24 twice and the sum is 0;
    # taken a pair at a time in the other order (1 + 2^24, then -2^24 + 1) it is 1. Rounded to
    # bf16 the two still differ, so int4_gemv's order is seen here, not only its values.
    from carpool.model.quant import Int4Linear

    n, k, group = 192, 128, 32
    codes = torch.ones(n, k, dtype=torch.uint8)
    scales = torch.ones(n, k // group)
    lin = Int4Linear(codes, scales, 8 * scales, None, group, torch.float32)
    x = torch.zeros(rows, k)
    x[:, 0::group], x[:, 1::group], x[:, 2::group], x[:, 3::group] = 2.0**24, 1, 1, -(2.0**24)
    block = int4_row_block()
    got = torch.ops.carpool.int4_gemv(x, lin.packed, group, lin.scales_zeros, block)
    sums = torch.ops.carpool.int4_logits(x, lin.packed, group, lin.scales_zeros, block)
    assert torch.equal(sums, torch.zeros_like(sums))  # input order: every 1 lost
    if fused_ops.int4_amx():
        # AMX's own order: a pair's two products added to the sum with one rounding here
        # (2^24 + 1 rounds to 2^24, then 2^24 + 1 - 2^24 is 1): 1 per group, every row alike.
        assert torch.equal(got, torch.full_like(got, k // group))
    else:
        assert torch.equal(got, sums)


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_int4_gemv_reads_both_of_torchs_block_layouts(block, rows):
    # torch packs 64-row blocks where its kernels are AVX-512 ones and 32-row blocks on AVX2:
    # whichever this machine has, the kernel reads either layout (its own loop for the one
    # this instruction set packs, plain loops for the other).
    from carpool.model.quant import Int4Linear, _pack_int4_by_hand, _unpack_int4_all

    torch.manual_seed(block + rows)
    n, k = 192, 128
    lin = Int4Linear.from_float(torch.randn(n, k), None, torch.bfloat16)
    codes = _unpack_int4_all(lin.packed, k)
    packed = _pack_int4_by_hand(codes, block)
    x = torch.randn(rows, k)
    got = torch.ops.carpool.int4_gemv(x, packed, lin.group_size, lin.scales_zeros, block)
    want = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.bfloat16(), lin.packed, lin.group_size, lin.scales_zeros
    )
    assert_bf16_close(got.bfloat16(), want)


def _int8_case(n: int, k: int, seed: int):
    torch.manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return q, (torch.rand(n) * 0.01).bfloat16()


@pytest.mark.parametrize("rows", [1, 5, 9, 13, 32, 64])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_int8_dot_is_torchs_int8_kernel(rows, x_dtype):
    # n = 1001: a last tile of one column; K = 576: 18 steps of 32.
    q, s = _int8_case(1001, 576, rows)
    x = torch.randn(rows, 576, dtype=x_dtype)
    if not torch.ops.carpool.int8_dot_fast():  # no AVX-512 BF16 in this build: refused
        with pytest.raises(RuntimeError, match="no AVX-512 BF16"):
            torch.ops.carpool.int8_dot(x, q, s)
        assert fused_ops.int8_dot_max_rows() == 0
        return
    got = torch.ops.carpool.int8_dot(x, q, s)
    assert got.dtype == x_dtype and torch.equal(got, got.bfloat16().to(x_dtype))
    # x rounded to bf16, exact products, float32 sums (in another order), rounded once.
    assert_bf16_close(got.bfloat16(), torch._weight_int8pack_mm(x.bfloat16(), q, s))


def test_int8_dot_row_does_not_depend_on_its_neighbours():
    if not torch.ops.carpool.int8_dot_fast():  # (the op is registered once the fixture loads it)
        pytest.skip(
            "no AVX-512 BF16 in this build (test_int8_dot_is_torchs_int8_kernel checks the refusal)"
        )
    q, s = _int8_case(300, 224, 4)  # 75 tiles of 4 columns; K = 224: 7 steps
    x = torch.randn(37, 224)
    every = torch.ops.carpool.int8_dot(x, q, s)
    # Slices of up to 24 rows (6 on an AMX CPU) widen the codes in registers, longer ones into a
    # buffer; a single row takes 16 columns a reduction.
    for lo, hi in ((0, 1), (36, 37), (5, 7), (10, 13), (20, 24), (0, 24), (3, 37), (0, 36)):
        assert torch.equal(torch.ops.carpool.int8_dot(x[lo:hi], q, s), every[lo:hi]), (lo, hi)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", [(1001, 576), (300, 576), (16, 576), (7, 576), (4096, 4096)])
def test_int8_gemv_computes_int8_dots_bits(n, k, x_dtype):
    # On AVX-512 BF16 (an AMX CPU's too) int8_gemv (a decode step's 1-8 rows) runs int8_dot's
    # sums, so a Q8_0 model's row has the same bits in a step of any size. The two orders part
    # rarely after the bf16 rounding: the FMA loop int8_gemv ran before fails the 4096 x 4096
    # case in both dtypes (checked; a few elements of its 32,768), none of the small ones.
    # n = 1001, 300: runs of 16 columns and a last tile of one or four; 16: one run; 7: none.
    if not (torch.ops.carpool.int8_dot_fast() and fused_ops.rows_invariant()):
        pytest.skip("int8_dot is not built here (no AVX-512 BF16): int8_gemv keeps its FMAs")
    q, s = _int8_case(n, k, n)
    x = torch.randn(8, k, dtype=x_dtype)
    dot = torch.ops.carpool.int8_dot(x, q, s)
    for rows in range(1, 9):
        got = torch.ops.carpool.int8_gemv(x[:rows], q, s)
        assert got.dtype == x_dtype and torch.equal(got, dot[:rows]), rows


@pytest.mark.usefixtures("finite_row_limits")
def test_int8_dot_takes_the_rows_past_int8_gemv():
    q, s = _int8_case(512, 512, 7)  # a layer-sized matrix
    first = fused_ops.int8_gemv_max_rows(q.numel()) + 1
    limit = fused_ops.int8_dot_max_rows()
    assert limit in (0, fused_ops.INT8_DOT_MAX_ROWS)
    for rows in (first, limit, limit + 1, first - 1):
        x = torch.randn(max(rows, 1), 512)
        calls = fused_ops.fused_calls()
        got = fused_ops.int8_dot(x, q, s)
        takes = limit > 0 and first <= rows <= limit
        assert (got is not None) == takes, (rows, limit)
        assert fused_ops.fused_calls() == calls + takes
    if limit:
        x = torch.randn(first, 512)
        assert fused_ops.int8_dot(x[:, :500].contiguous(), q[:, :500].contiguous(), s) is None
        assert fused_ops.int8_dot(x.half(), q, s) is None
        with pytest.raises(RuntimeError, match="multiple of 32"):
            torch.ops.carpool.int8_dot(x[:, :500].contiguous(), q[:, :500].contiguous(), s)


def test_int4_row_block_is_the_layout_torch_packs():
    from carpool.model.quant import _pack_int4_by_hand

    codes = torch.randint(0, 16, (320, 96), dtype=torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert int4_row_block() in (32, 64)
    assert torch.equal(_pack_int4_by_hand(codes, int4_row_block()), packed)


@pytest.mark.parametrize("rows", [1, 4])
def test_int8_gemv_takes_float32_input_at_any_size(rows):
    # A float32 x (a quantized GGUF model's activations): rounded to bf16 inside, the bf16
    # result widened back, what the casts around torch's bf16 kernel gave.
    torch.manual_seed(rows)
    q = torch.randint(-127, 128, (2000, 64), dtype=torch.int8)  # a layer-sized weight
    s = (torch.rand(2000) * 0.01).bfloat16()
    x = torch.randn(rows, 64)
    calls = fused_ops.fused_calls()
    got = fused_ops.int8_gemv(x, q, s)
    assert fused_ops.fused_calls() == calls + 1
    assert got.dtype == torch.float32 and torch.equal(got, got.bfloat16().float())
    assert_bf16_close(got.bfloat16(), torch._weight_int8pack_mm(x.bfloat16(), q, s))


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 32])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", [(96, 64), (130, 100)])
def test_bf16_linear_is_a_bf16_gemm(rows, x_dtype, n, k):
    # bf16 weights on a CPU without bf16 GEMM units: float32 sums of the exact products,
    # rounded once to x's dtype (K = 100: a tail after the vector loop).
    torch.manual_seed(rows + n)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    b = torch.randn(n, dtype=torch.bfloat16)
    x = torch.randn(rows, k).to(x_dtype)
    got = torch.ops.carpool.bf16_linear(x, w, b)
    assert got.dtype == x_dtype and got.shape == (rows, n)
    exact = x.float() @ w.float().T + b.float()
    if x_dtype == torch.bfloat16:
        assert_bf16_close(got, exact.bfloat16())
    else:
        assert torch.allclose(got, exact, rtol=1e-5, atol=1e-5)
    # Each row is summed the same way whatever the row count: alone, the same bits.
    for r in range(rows):
        assert torch.equal(torch.ops.carpool.bf16_linear(x[r : r + 1], w, b), got[r : r + 1])


def test_bf16_linear_refuses_bad_shapes_with_a_message():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="weight must be a contiguous"):
        torch.ops.carpool.bf16_linear(torch.randn(2, 16), w.float(), None)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        torch.ops.carpool.bf16_linear(torch.randn(2, 16).half(), w, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.carpool.bf16_linear(torch.randn(2, 16), w, torch.randn(7))


def test_linear_takes_bf16_linear_where_bf16_gemm_is_emulated(monkeypatch):
    # On an AVX2-only CPU (fused_ops.bf16_emulated()), every row count of a plain bf16 Linear
    # runs the kernel; forced here so that any machine checks the routing.
    from carpool.model.layers import Linear

    monkeypatch.setattr(fused_ops, "_BF16_EMULATED", True)
    torch.manual_seed(0)
    lin = Linear(64, 48, bias=True).bfloat16()
    for rows in (1, 5, 17):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        calls = fused_ops.fused_calls()
        got = lin(x)
        assert fused_ops.fused_calls() == calls + 1
        want = (x.float() @ lin.weight.float().T + lin.bias.float()).bfloat16()
        assert_bf16_close(got, want)


@pytest.mark.usefixtures("finite_row_limits")
def test_int8_gemv_row_limit_follows_the_weight_size():
    # A vocabulary-sized weight takes the kernel up to INT8_GEMV_LARGE_MAX_ROWS rows (128 where
    # bf16 is not emulated), a layer-sized one up to INT8_GEMV_MAX_ROWS: float32 rows, which any
    # size takes.
    big = -(-fused_ops.INT8_GEMV_LARGE_CODES // 64)
    q = torch.randint(-127, 128, (big, 64), dtype=torch.int8)
    s = (torch.rand(big) * 0.01).bfloat16()
    assert fused_ops.int8_gemv_max_rows(q.numel()) == fused_ops.INT8_GEMV_LARGE_MAX_ROWS
    assert fused_ops.int8_gemv_max_rows(64 * 64) == fused_ops.INT8_GEMV_MAX_ROWS
    assert fused_ops.INT8_GEMV_LARGE_MAX_ROWS >= fused_ops.INT8_GEMV_MAX_ROWS
    rows = fused_ops.INT8_GEMV_LARGE_MAX_ROWS
    x = torch.randn(rows, 64)
    got = fused_ops.int8_gemv(x, q, s)
    assert got is not None and got.shape == (rows, big)
    exact = (x.bfloat16().float() @ q.float().T) * s.float()
    torch.testing.assert_close(got, exact, rtol=2**-7, atol=1e-3)
    assert fused_ops.int8_gemv(torch.randn(rows + 1, 64), q, s) is None
    small = q[:64].contiguous()
    layer_rows = fused_ops.INT8_GEMV_MAX_ROWS
    assert fused_ops.int8_gemv(torch.randn(layer_rows, 64), small, s[:64]) is not None
    assert fused_ops.int8_gemv(torch.randn(layer_rows + 1, 64), small, s[:64]) is None


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 13, 32])
def test_int8_logits_are_the_dequantized_heads_in_float32(rows):
    # A float32 model's vocabulary head: no bf16 rounding of x or of the sums, so the logits
    # are the dequantized weight's (codes times their bf16 scale, exact in float32) to float32
    # rounding; K = 200 leaves a scalar tail, N = 1001 a partial tile.
    torch.manual_seed(rows)
    q = torch.randint(-127, 128, (1001, 200), dtype=torch.int8)
    s = (torch.rand(1001) * 0.01).bfloat16()
    x = torch.randn(rows, 200)
    calls = fused_ops.fused_calls()
    got = fused_ops.int8_logits(x, q, s)
    assert fused_ops.fused_calls() == calls + 1
    assert got.dtype == torch.float32 and got.shape == (rows, 1001)
    exact = x.double() @ (q.double() * s.double()[:, None]).T
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, got.bfloat16().float())  # not rounded to bf16
    # A row's logits do not depend on the rows beside it (past 4 rows each tile of the head is
    # widened once and its groups of 4 rows summed together: the same sums).
    assert torch.equal(fused_ops.int8_logits(x[-1:], q, s), got[-1:])
    assert torch.equal(fused_ops.int8_logits(x[:4], q, s), got[:4])
    # At chosen columns: the same bits, one weight row at a time.
    ids = torch.randint(0, 1001, (rows, 64))
    assert torch.equal(fused_ops.int8_logits_at(x, q, s, ids), got.gather(1, ids))


def _fixed_point_logits(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int8_logits on AMX, from its definition: each row times 2^e (e = 26 - the exponent of
    its largest magnitude), rounded half to even, summed exactly with the codes in int64, then
    float32(double(sum) * (scale * 2^-e))."""
    e = 26 - torch.frexp(x.abs().amax(1).double()).exponent.long()
    xi = torch.round(torch.ldexp(x.double(), e[:, None].double())).long()
    total = (xi[:, None, :] * q.long()[None, :, :]).sum(-1)
    step = torch.ldexp(torch.ones_like(e, dtype=torch.float64), -e.double())
    return (total.double() * (s.double()[None, :] * step[:, None])).float()


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 12, 13, 16, 17, 33, 70])
@pytest.mark.parametrize("k", [200, 256])
def test_int8_logits_on_amx_are_exact_sums_of_fixed_point_rows(rows, k):
    # On AMX int8_logits multiplies on tiles in integers: every logit is the exact integer sum
    # of x in fixed point with the codes, rounded once; here against that definition computed
    # by torch in int64, bit for bit: one quad of rows and several, passes of 16, a block of
    # 1001 % 16 rows, K a multiple of 64 and not; a row's bits do not depend on its step.
    # Past 12 rows two weight blocks at a time: an odd count of quads (13, 17, 33 rows) leaves
    # a pass of one, a task's odd count of blocks (63 over two threads) a block alone.
    if not fused_ops.int8_logits_fixed():
        pytest.skip("int8_logits takes the float32 FMA loops on this CPU (no AMX)")
    torch.manual_seed(rows * k)
    q = torch.randint(-127, 128, (1001, k), dtype=torch.int8)
    s = (torch.rand(1001) * 0.01).bfloat16()
    x = torch.randn(rows, k) * torch.logspace(-3, 2, rows)[:, None]
    x[0, :7] = torch.tensor([0.0, -0.0, 1e-30, -2.5, 3.0, 1e-8, -1e-8])  # tiny values, ties
    got = fused_ops.int8_logits(x, q, s)
    assert torch.equal(got, _fixed_point_logits(x, q, s))
    for i in range(rows):
        assert torch.equal(fused_ops.int8_logits(x[i : i + 1], q, s), got[i : i + 1])
    ids = torch.randint(0, 1001, (rows, 40))
    assert torch.equal(fused_ops.int8_logits_at(x, q, s, ids), got.gather(1, ids))


def test_int8_logits_on_amx_take_rows_of_any_scale_and_mark_nonfinite_ones():
    # A row whose scale 2^e is no float32 (its largest value under 2^-101) takes the scalar
    # digits, one near float32's top (2^e = 2^-100) the vector ones: the same definition. A
    # NaN or infinite row: NaN logits, its neighbours untouched; a zero row: zeros.
    if not fused_ops.int8_logits_fixed():
        pytest.skip("int8_logits takes the float32 FMA loops on this CPU (no AMX)")
    torch.manual_seed(3)
    q = torch.randint(-127, 128, (64, 128), dtype=torch.int8)
    s = (torch.rand(64) * 0.01).bfloat16()
    x = torch.randn(6, 128)
    x[1] *= 1e-33
    x[2] *= 1e37
    x[3] = 0.0
    x[4, 5] = float("nan")
    x[5, 9] = float("inf")
    got = fused_ops.int8_logits(x, q, s)
    finite = [0, 1, 2, 3]
    assert torch.equal(got[finite], _fixed_point_logits(x[finite], q, s))
    assert torch.equal(got[3], torch.zeros(64))
    assert got[4:].isnan().all()
    ids = torch.arange(64).repeat(6, 1)
    assert torch.equal(fused_ops.int8_logits_at(x, q, s, ids)[finite], got[finite])
    assert fused_ops.int8_logits_at(x, q, s, ids)[4:].isnan().all()


@pytest.mark.usefixtures("finite_row_limits")
def test_int8_logits_decline_and_reject_what_they_do_not_take():
    q = torch.randint(-127, 128, (300, 64), dtype=torch.int8)
    s = (torch.rand(300) * 0.01).bfloat16()
    limit = fused_ops.int8_logits_max_rows(q.numel())
    assert fused_ops.int8_logits(torch.randn(limit + 1, 64), q, s) is None  # rows: rescored
    assert fused_ops.int8_logits(torch.randn(1, 64, dtype=torch.bfloat16), q, s) is None
    with pytest.raises(RuntimeError, match="out of"):
        torch.ops.carpool.int8_logits_at(torch.randn(1, 64), q, s, torch.tensor([[300]]))
    with pytest.raises(RuntimeError, match="float32 tensor"):
        torch.ops.carpool.int8_logits(torch.randn(1, 64, dtype=torch.bfloat16), q, s)


@pytest.mark.usefixtures("finite_row_limits")
def test_int8_head_top_logits_do_not_depend_on_the_path():
    # Up to the kernel's row limit the head's float32 logits come whole from int8_logits;
    # above it from the bf16 kernel, its top RESCORE_TOP_K rescored by int8_logits_at: the
    # same bits there, so a row's greedy token does not depend on its batch's size.
    from carpool.model.quant import RESCORE_TOP_K, Int8Linear

    torch.manual_seed(9)
    q = torch.randint(-127, 128, (500, 64), dtype=torch.int8)
    head = Int8Linear(q, (torch.rand(500) * 0.01).bfloat16(), None, torch.float32)
    limit = fused_ops.int8_logits_max_rows(q.numel())
    x = torch.randn(limit + 1, 64)
    many = head.logits(x)  # more rows than int8_logits takes: rescored
    alone = torch.cat([head.logits(x[i : i + 1]) for i in range(limit + 1)])
    assert torch.equal(alone[:1], fused_ops.int8_logits(x[:1], q, head.scales))
    top = many.topk(RESCORE_TOP_K // 2, dim=-1).indices
    assert torch.equal(many.gather(1, top), alone.gather(1, top))
    assert torch.equal(many.argmax(-1), alone.argmax(-1))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 13, 30])
@pytest.mark.parametrize("block", [32, 64])
def test_int4_logits_are_the_dequantized_heads_in_float32(rows, block):
    # A float32 model's int4 vocabulary head (--quantization int4, a GGUF Q4 output matrix): no
    # bf16 rounding of x or of the sums, so the logits are the dequantized weight's to float32
    # rounding, in either of torch's block layouts (this CPU's own loop for one, plain loops for
    # the other); N = 1000 leaves a padded block.
    from carpool.model.quant import Int4Linear, _pack_int4_by_hand, _unpack_int4_all

    torch.manual_seed(rows + block)
    n, k = 1000, 192
    lin = Int4Linear.from_float(torch.randn(n, k), None, torch.float32)
    packed = _pack_int4_by_hand(_unpack_int4_all(lin.packed, k), block)
    args = (packed, lin.group_size, lin.scales_zeros, block)
    x = torch.randn(rows, k)
    calls = fused_ops.fused_calls()
    got = fused_ops.int4_logits(x, *args)
    assert fused_ops.fused_calls() == calls + 1
    assert got.dtype == torch.float32 and got.shape == (rows, 1024)
    exact = x.double() @ lin._dense(torch.float32).double().T
    torch.testing.assert_close(got.double()[:, :n], exact, rtol=1e-5, atol=1e-4)
    assert not torch.equal(got, got.bfloat16().float())  # not rounded to bf16
    # A row's logits do not depend on the rows beside it.
    assert torch.equal(fused_ops.int4_logits(x[-1:], *args), got[-1:])
    # At chosen columns: the same bits, one column at a time.
    ids = torch.randint(0, n, (rows, 64))
    assert torch.equal(fused_ops.int4_logits_at(x, *args, ids), got.gather(1, ids))


@pytest.mark.usefixtures("finite_row_limits")
def test_int4_logits_decline_and_reject_what_they_do_not_take():
    from carpool.model.quant import Int4Linear

    lin = Int4Linear.from_float(torch.randn(300, 64), None, torch.float32)
    args = (lin.packed, lin.group_size, lin.scales_zeros, int4_row_block())
    limit = fused_ops.INT4_GEMV_MAX_ROWS
    assert fused_ops.int4_logits(torch.randn(limit + 1, 64), *args) is None  # rows: rescored
    assert fused_ops.int4_logits(torch.randn(1, 64, dtype=torch.bfloat16), *args) is None
    with pytest.raises(RuntimeError, match="out of"):
        torch.ops.carpool.int4_logits_at(torch.randn(1, 64), *args, torch.tensor([[320]]))
    with pytest.raises(RuntimeError, match="float32 tensor"):
        torch.ops.carpool.int4_logits(torch.randn(1, 64, dtype=torch.bfloat16), *args)
    with pytest.raises(RuntimeError, match="ids must be"):
        torch.ops.carpool.int4_logits_at(torch.randn(2, 64), *args, torch.tensor([[1]]))


@pytest.mark.usefixtures("finite_row_limits")
def test_int4_head_top_logits_do_not_depend_on_the_path():
    # Up to the kernel's row limit the head's float32 logits come whole from int4_logits;
    # above it from the bf16 widening path, its top RESCORE_TOP_K rescored by int4_logits_at:
    # the same bits there, so a row's greedy token does not depend on its batch's size.
    from carpool.model.quant import RESCORE_TOP_K, Int4Linear

    torch.manual_seed(9)
    head = Int4Linear.from_float(torch.randn(500, 64), None, torch.float32)
    limit = fused_ops.INT4_GEMV_MAX_ROWS
    x = torch.randn(limit + 1, 64)
    many = head.logits(x)  # more rows than int4_logits takes: rescored
    alone = torch.cat([head.logits(x[i : i + 1]) for i in range(limit + 1)])
    args = (head.packed, head.group_size, head.scales_zeros, int4_row_block())
    assert torch.equal(alone[:1], fused_ops.int4_logits(x[:1], *args)[:, :500])
    top = many.topk(RESCORE_TOP_K // 2, dim=-1).indices
    assert torch.equal(many.gather(1, top), alone.gather(1, top))
    assert torch.equal(many.argmax(-1), alone.argmax(-1))


def _torch_widen(lin, packed, block, monkeypatch):
    """``Int4Linear._dense`` in bf16 through torch's ops (the fused kernel off)."""
    from carpool.model import quant

    monkeypatch.setattr(quant, "int4_row_block", lambda: block)
    fused_ops.use_fused(False)
    try:
        saved, lin.packed = lin.packed, packed
        return lin._dense(torch.bfloat16)
    finally:
        lin.packed = saved
        fused_ops.use_fused(True)


@pytest.mark.parametrize("block", [32, 64])
# Groups of 8: the plain loops (the AVX-512 one takes groups of a multiple of 16).
@pytest.mark.parametrize(
    "n, k, group", [(3072, 576, 32), (576, 1536, 32), (100, 64, 32), (128, 256, 64), (64, 96, 8)]
)
def test_int4_widen_is_the_torch_widening_bit_for_bit(block, n, k, group, monkeypatch):
    # A prefill's widened int4 weight: the same bits as the torch ops' chain it replaces (both
    # round the product to bf16, then the sum), for either of torch's block layouts.
    from carpool.model.quant import Int4Linear, _pack_int4_by_hand, _unpack_int4_all

    torch.manual_seed(n + k + block)
    lin = Int4Linear.from_float(torch.randn(n, k) * 3, None, torch.bfloat16)
    lin.group_size = group
    groups = torch.randn(k // group, lin.scales_zeros.shape[1], 2) * torch.tensor([0.05, 1.0])
    lin.scales_zeros = groups.bfloat16().contiguous()
    packed = _pack_int4_by_hand(_unpack_int4_all(lin.packed, k), block)
    want = _torch_widen(lin, packed, block, monkeypatch)
    calls = fused_ops.fused_calls()
    got = fused_ops.int4_widen(packed, group, lin.scales_zeros, block)
    assert fused_ops.fused_calls() == calls + 1
    assert got.dtype == torch.bfloat16 and got.shape == (lin.scales_zeros.shape[1], k)
    assert torch.equal(got[:n], want)


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize(
    "n, out, k, group",
    [
        (576, 576, 576, 32),
        (3072, 3072, 96, 32),
        (128, 100, 64, 32),
        (128, 70, 256, 64),
        (64, 64, 96, 8),
    ],
)
def test_int4_widen_vnni_is_the_widened_weight_packed(block, n, out, k, group):
    # A prefill's widened int4 weight made straight in vnni_linear's layout: the bits of
    # int4_widen's first `out` rows packed by vnni_linear.pack (columns past `out` zero; the
    # last block's columns word by word, the others 8 at a time; both int4 block layouts).
    from carpool.model import vnni_linear
    from carpool.model.quant import Int4Linear, _pack_int4_by_hand, _unpack_int4_all

    torch.manual_seed(n + k + block + out)
    lin = Int4Linear.from_float(torch.randn(n, k) * 3, None, torch.bfloat16)
    groups = torch.randn(k // group, lin.scales_zeros.shape[1], 2) * torch.tensor([0.05, 1.0])
    scales_zeros = groups.bfloat16().contiguous()
    packed = _pack_int4_by_hand(_unpack_int4_all(lin.packed, k), block)
    plain = fused_ops.int4_widen(packed, group, scales_zeros, block)[:out]
    got = fused_ops.int4_widen_vnni(packed, group, scales_zeros, block, out)
    assert torch.equal(got, vnni_linear.pack_reference(plain.contiguous()))
    widen = torch.ops.carpool.int4_widen_vnni
    with pytest.raises(RuntimeError, match="n = 0 columns"):
        widen(packed, group, scales_zeros, block, 0)
    with pytest.raises(RuntimeError, match="positive and even"):
        widen(packed, 3, scales_zeros, block, out)


def test_the_kernels_take_every_row_count_with_avx512_bf16_or_avx2():
    # Without a bf16 GEMM (AVX2: an AMD Zen 2/3) and on AVX-512 BF16 (a Zen 4/5, an Intel Xeon
    # with AMX) a prefill's rows take the fused kernels too, so that a row's numbers do not
    # depend on its step's size (int8 on AVX-512 BF16: int8_dot past int8_gemv's 8 rows); on
    # AVX-512 without BF16 the widened weight's GEMM takes them past a limit.
    assert fused_ops.load()
    emulated = fused_ops.bf16_emulated()
    flags = kernel_build.cpu_flags().split()
    every = emulated or "avx512_bf16" in flags
    assert (fused_ops.INT4_GEMV_MAX_ROWS == fused_ops.ANY_ROWS) == every
    assert (fused_ops.INT8_GEMV_MAX_ROWS == fused_ops.ANY_ROWS) == emulated
    assert fused_ops.rows_invariant() == every
    # A small head's float32 logits from int8_logits at any count there (a vocabulary head's
    # up to INT8_GEMV_LARGE_MAX_ROWS, then rescored).
    assert (fused_ops.INT8_LOGITS_MAX_ROWS == fused_ops.ANY_ROWS) == every
    assert fused_ops.int8_logits_max_rows(fused_ops.INT8_GEMV_LARGE_CODES) == (
        fused_ops.INT8_GEMV_LARGE_MAX_ROWS
    )
    if every and not emulated:
        assert fused_ops.INT8_GEMV_MAX_ROWS == 8
        assert fused_ops.int8_dot_max_rows() == fused_ops.ANY_ROWS
    assert every or fused_ops.INT4_GEMV_MAX_ROWS <= 128


@pytest.mark.usefixtures("kernels_at_every_row_count")
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_linears_rows_are_the_same_bits_in_a_step_of_any_size(method, dtype):
    # 300 rows (a prefill step, past the 128 from which the widened GEMM took them) in one call
    # and in slices: each row the same bits, through the module's own forward.
    from carpool.model.quant import quantize_linear

    torch.manual_seed(11)
    lin = quantize_linear(torch.nn.Linear(192, 320, bias=True), method, dtype)
    x = torch.randn(300, 192, dtype=dtype)
    calls = fused_ops.fused_calls()
    whole = lin(x)
    assert fused_ops.fused_calls() == calls + 1  # one kernel call, no widening
    for lo, hi in ((0, 1), (1, 5), (5, 37), (37, 165), (165, 300)):
        assert torch.equal(lin(x[lo:hi]), whole[lo:hi]), (lo, hi)
    dense = x.float() @ lin.dequantize().float().T + lin.bias.float()
    assert (whole.float() - dense).abs().max() <= 2**-6 * dense.abs().max()


@pytest.mark.usefixtures("finite_row_limits")
def test_int4_linear_prefill_takes_the_fused_widening(monkeypatch):
    # Past the row count of the int4 kernels, a CPU Int4Linear widens its weight through the
    # fused kernel: the same output as through torch's ops.
    from carpool.model.quant import INT4_WIDEN_ABOVE_ROWS, Int4Linear

    torch.manual_seed(5)
    lin = Int4Linear.from_float(torch.randn(200, 320), torch.randn(200), torch.float32)
    x = torch.randn(INT4_WIDEN_ABOVE_ROWS + 3, 320)
    calls = fused_ops.fused_calls()
    got = lin(x)
    assert fused_ops.fused_calls() > calls
    fused_ops.use_fused(False)
    try:
        want = lin(x)
    finally:
        fused_ops.use_fused(True)
    assert torch.equal(got, want)


def test_int4_widen_refuses_bad_shapes_with_a_message():
    from carpool.model.quant import Int4Linear

    lin = Int4Linear.from_float(torch.randn(64, 64), None, torch.bfloat16)
    widen = torch.ops.carpool.int4_widen
    block = int4_row_block()
    with pytest.raises(RuntimeError, match="block must be 32 or 64"):
        widen(lin.packed, 32, lin.scales_zeros, 16)
    with pytest.raises(RuntimeError, match="scales_zeros must be"):
        widen(lin.packed, 32, lin.scales_zeros.float(), block)
    with pytest.raises(RuntimeError, match="packed must be torch's CPU int4 layout"):
        widen(lin.packed[:32], 32, lin.scales_zeros, block)
    with pytest.raises(RuntimeError, match="group size must be positive"):
        widen(lin.packed, 0, lin.scales_zeros, block)
    assert fused_ops.int4_widen(lin.packed, 32, lin.scales_zeros.float(), block) is None
