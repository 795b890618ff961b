"""The VNNI bf16 linear kernel (``carpool.model.vnni_linear``, ``csrc/vnni_linear.cpp``): the
layout round-trips, every path (our AMX loop, oneDNN's micro-kernel, the matrix-vector kernel)
equals a float32 reference within one bf16 rounding for every row count, width (partial column
blocks), bias and thread count, a row's result does not depend on the rows beside it (the
automatic path: the same bits as the micro-kernel alone), and bad inputs are refused."""

from __future__ import annotations

import pytest
import torch

from carpool.model import vnni_linear

pytestmark = pytest.mark.skipif(
    not vnni_linear.load(), reason=f"no C++ toolchain: {vnni_linear.failure()}"
)


PATHS = [vnni_linear.PATH_AUTO, vnni_linear.PATH_GEMV, vnni_linear.PATH_BRGEMM]


def _ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ w.float().T
    return out if bias is None else out + bias


def _assert_one_rounding(got: torch.Tensor, ref: torch.Tensor) -> None:
    """``got`` is a bf16 rounding of float32 sums that differ from ``ref``'s only in order."""
    assert got.dtype == torch.bfloat16
    err = (got.float() - ref).abs()
    bound = ref.abs() * 2**-8 + 1e-3 * ref.abs().max()
    assert bool((err <= bound).all()), f"max error {err.max().item()} (bound {bound.max()})"


@pytest.mark.parametrize("n, k", [(64, 32), (100, 64), (200, 96), (1536, 512), (64, 1408)])
def test_pack_round_trips(n, k):
    w = torch.randn(n, k, dtype=torch.bfloat16)
    packed = vnni_linear.pack(w)
    assert packed.shape == (-(-n // 64), k // 2, 64, 2)
    assert torch.equal(vnni_linear.unpack(packed, n), w)
    # Block b, pair p, column c is weight[64 b + c, 2 p : 2 p + 2].
    assert torch.equal(packed[(n - 1) // 64, 3, (n - 1) % 64], w[n - 1, 6:8])


@pytest.mark.parametrize("n, k", [(1, 2), (7, 30), (64, 16), (70, 34), (130, 1376), (200, 96)])
def test_the_operators_pack_is_the_reference(n, k):
    # The one-pass C++ pack (8 x 8 words at a time, the rest word by word: a last block's
    # rows past N zero, pairs past the last 8) is torch's permute of the padded weight.
    w = torch.randn(n, k).bfloat16()
    packed = torch.ops.carpool.vnni_pack(w)
    assert torch.equal(packed, vnni_linear.pack_reference(w))
    assert torch.equal(vnni_linear.pack(w), packed)
    strided = torch.randn(k, n).bfloat16().T  # not contiguous: packed as its contiguous copy
    assert torch.equal(torch.ops.carpool.vnni_pack(strided), vnni_linear.pack_reference(strided))
    with pytest.raises(RuntimeError, match="even K"):
        torch.ops.carpool.vnni_pack(torch.zeros(4, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("n, k", [(1, 2), (7, 30), (64, 16), (70, 34), (130, 1376), (576, 1536)])
def test_int8_codes_pack_as_their_bf16_values(n, k):
    # vnni_pack_int8 widens and packs in one pass (8 x 8 words at a time from 16 codes a row,
    # the rest word by word): the bits of packing the codes converted to bf16 (exact), the
    # extremes -128 and 127 and zero included.
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    codes[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)
    codes[-1, -1] = 0
    expected = vnni_linear.pack_reference(codes.to(torch.bfloat16))
    assert torch.equal(torch.ops.carpool.vnni_pack_int8(codes), expected)
    assert torch.equal(vnni_linear.pack_int8(codes), expected)
    strided = codes.T.contiguous().T  # not contiguous: packed as its contiguous copy
    assert torch.equal(torch.ops.carpool.vnni_pack_int8(strided), expected)
    with pytest.raises(RuntimeError, match="even K"):
        torch.ops.carpool.vnni_pack_int8(torch.zeros(4, 3, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="int8 CPU tensor"):
        torch.ops.carpool.vnni_pack_int8(torch.zeros(4, 4, dtype=torch.uint8))


@pytest.mark.parametrize("slice_bytes", [1, 64 * 96 * 2 * 3, 4 << 20])
@pytest.mark.parametrize("n, k", [(64, 2), (448, 96), (1024, 1376)])
def test_packing_in_place_is_pack_over_the_same_bytes(monkeypatch, slice_bytes, n, k):
    # Slices of one block (the budget below a row), of three blocks with a shorter last one,
    # and the whole matrix at once.
    monkeypatch.setattr(vnni_linear, "IN_PLACE_SLICE_BYTES", slice_bytes)
    w = torch.randn(n, k).bfloat16()
    want = vnni_linear.pack(w)
    address = w.data_ptr()
    got = vnni_linear.pack_in_place(w)
    assert (
        got is not None and got.data_ptr() == address and got.untyped_storage().nbytes() == w.nbytes
    )
    assert torch.equal(got, want)


def test_packing_in_place_declines_where_the_layout_does_not_fit_the_bytes():
    ragged = torch.randn(100, 64).bfloat16()  # a padded last block: more bytes than the weight
    kept = ragged.clone()
    assert vnni_linear.pack_in_place(ragged) is None and torch.equal(ragged, kept)
    strided = torch.randn(64, 128).bfloat16().T.contiguous().T  # [128, 64] but not contiguous
    kept = strided.clone()
    assert vnni_linear.pack_in_place(strided) is None and torch.equal(strided, kept)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 32, 33, 36, 37, 70])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, k, bias", [(100, 64, True), (192, 96, False), (64, 1408, True)])
def test_equals_reference(rows, path, n, k, bias):
    torch.manual_seed(rows * 1000 + n)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    b = torch.randn(n) if bias else None
    got = vnni_linear.linear(x, vnni_linear.pack(w), b, n, path)
    assert got.shape == (rows, n)
    _assert_one_rounding(got, _ref(x, w, b))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_do_not_change_the_result(threads):
    w = torch.randn(1000, 256, dtype=torch.bfloat16)
    packed = vnni_linear.pack(w)
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = [vnni_linear.linear(x[:r], packed, None, 1000) for r in (1, 4, 40)]
        torch.set_num_threads(threads)
        got = [vnni_linear.linear(x[:r], packed, None, 1000) for r in (1, 4, 40)]
    finally:
        torch.set_num_threads(before)
    for g, w_ in zip(got, want, strict=True):
        assert torch.equal(g, w_)


@pytest.mark.parametrize("path", PATHS)
def test_a_row_does_not_depend_on_its_neighbours(path):
    # Each row's sums run in the same order whatever rows share the call (on AMX CPUs the
    # automatic path's loop runs 32-row slices), so a request's greedy tokens are the same
    # alone and batched.
    torch.manual_seed(7)
    w = torch.randn(1000, 1408, dtype=torch.bfloat16)
    packed = vnni_linear.pack(w)
    x = torch.randn(70, 1408, dtype=torch.bfloat16)
    # Every row, alone: rows in later passes and chunks (7-36 rows) too.
    alone = torch.cat(
        [vnni_linear.linear(x[i : i + 1], packed, None, 1000, path) for i in range(70)]
    )
    for rows in (3, 4, 5, 7, 16, 17, 32, 33, 36, 37, 70):
        got = vnni_linear.linear(x[:rows], packed, None, 1000, path)
        assert torch.equal(got, alone[:rows]), rows


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [192, 576, 100])  # 3, 9 and 2 column blocks
def test_a_prefills_row_slices_do_not_change_its_rows(threads, n):
    # Past 36 rows, column blocks that do not split evenly over the threads are multiplied in
    # row slices too (a task per slice and block): every row the bits of itself alone.
    torch.manual_seed(n + threads)
    w = torch.randn(n, 96, dtype=torch.bfloat16)
    packed = vnni_linear.pack(w)
    x = torch.randn(77, 96, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = torch.cat([vnni_linear.linear(x[i : i + 1], packed, None, n) for i in range(77)])
        for rows in (37, 50, 77):
            assert torch.equal(vnni_linear.linear(x[:rows], packed, None, n), alone[:rows]), rows
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not vnni_linear.amx(), reason="no AMX on this CPU")
@pytest.mark.parametrize("k", [32, 96, 1408, 2816])
def test_amx_loop_is_the_micro_kernels_bits(k):
    # The same instruction in the same K order for every sum: oneDNN's micro-kernel (which
    # K not a multiple of 32 takes) and our loop agree bit for bit.
    torch.manual_seed(k)
    w = torch.randn(200, k, dtype=torch.bfloat16)
    packed = vnni_linear.pack(w)
    for rows in (1, 2, 7, 16, 17, 31, 32, 33, 70):
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        auto = vnni_linear.linear(x, packed, None, 200, vnni_linear.PATH_AUTO)
        assert torch.equal(auto, vnni_linear.linear(x, packed, None, 200, vnni_linear.PATH_BRGEMM))


def test_zero_rows_and_strided_input():
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    packed = vnni_linear.pack(w)
    assert vnni_linear.linear(torch.empty(0, 32, dtype=torch.bfloat16), packed, None, 64).shape == (
        0,
        64,
    )
    x = torch.randn(32, 6, dtype=torch.bfloat16).T  # [6, 32], not contiguous
    _assert_one_rounding(vnni_linear.linear(x, packed, None, 64), _ref(x, w, None))


def test_bad_inputs_are_refused_with_a_message():
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    packed = vnni_linear.pack(w)
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        vnni_linear.linear(x.float(), packed, None, 64)
    with pytest.raises(RuntimeError, match="weight must be"):
        vnni_linear.linear(torch.randn(2, 30, dtype=torch.bfloat16), packed, None, 64)
    with pytest.raises(RuntimeError, match="does not fit"):
        vnni_linear.linear(x, packed, None, 65)
    with pytest.raises(RuntimeError, match="path 0, 1 or 2"):
        vnni_linear.linear(x, packed, None, 64, 3)
    with pytest.raises(RuntimeError, match="bias must be"):
        vnni_linear.linear(x, packed, torch.randn(64, dtype=torch.bfloat16), 64)
    with pytest.raises(AssertionError, match="even K"):
        vnni_linear.pack(torch.randn(8, 7, dtype=torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 3, 6, 7, 13, 32])
def test_weights_on_huge_pages_give_the_same_bits(rows):
    # A weight registered as on huge pages takes the passes without software prefetch (1-6
    # rows): the same sums in the same order, so the same bits, and the range is forgotten
    # with the tensor that holds it.
    torch.manual_seed(rows)
    w = vnni_linear.pack(torch.randn(3000, 512, dtype=torch.bfloat16))
    x = torch.randn(rows, 512, dtype=torch.bfloat16)
    b = torch.randn(3000)
    want = vnni_linear.linear(x, w, b, 3000, vnni_linear.PATH_GEMV)
    region = torch.empty(w.nbytes + 4096, dtype=torch.uint8)
    inside = region[4096:].view(torch.bfloat16).view(w.shape).copy_(w)
    assert not vnni_linear.streams_from_huge_pages(inside)
    vnni_linear.stream_from_huge_pages(region)
    assert vnni_linear.streams_from_huge_pages(inside)
    assert not vnni_linear.streams_from_huge_pages(w)
    got = vnni_linear.linear(x, inside, b, 3000, vnni_linear.PATH_GEMV)
    assert torch.equal(got, want)
    start, nbytes = inside.data_ptr(), inside.nbytes
    del region, inside
    assert not torch.ops.carpool.vnni_linear_on_huge_pages(start, nbytes)


def _int4_layer(n: int, k: int, group: int, block: int):
    """An int4 weight's codes in torch's CPU layout of ``block``-row blocks, its bf16 (scale,
    zero) pairs (rows padded to 64) and its columns: ``(packed, group, scales_zeros, n)``."""
    from carpool.model.quant import Int4Linear, _pack_int4_by_hand, _unpack_int4_all

    torch.manual_seed(n + k + group + block)
    lin = Int4Linear.from_float(torch.randn(n, k) * 3, None, torch.bfloat16)
    # Its own (scale, zero) pairs, groups of `group` inputs, all of them normal bf16 numbers.
    pairs = torch.randn(k // group, lin.scales_zeros.shape[1], 2) * torch.tensor([0.05, 1.0])
    packed = _pack_int4_by_hand(_unpack_int4_all(lin.packed, k), block)
    return packed, group, pairs.bfloat16().contiguous(), n


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize(
    "n, k, group", [(576, 576, 32), (100, 1536, 32), (130, 96, 32), (64, 64, 8), (70, 256, 64)]
)
def test_int4_blocks_widened_in_the_loop_are_the_widened_matrix(threads, block, n, k, group):
    # A wide row's int4 product (quant.Int4Linear._vnni_product) widens each 64-column block into
    # its thread's buffer when the loop reaches it: the bits of the whole matrix widened first
    # (fused_ops.int4_widen_vnni) and multiplied by vnni_linear, on every path and row count,
    # whole and partial column blocks, both int4 block layouts.
    from carpool.model import fused_ops

    assert fused_ops.load()
    packed, group, scales_zeros, n = _int4_layer(n, k, group, block)
    whole = fused_ops.int4_widen_vnni(packed, group, scales_zeros, block, n)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 5, 17, 40, 300):
            x = torch.randn(rows, k).bfloat16()
            for path in PATHS:
                want = vnni_linear.linear(x, whole, None, n, path)
                got = vnni_linear.linear_int4(x, packed, group, scales_zeros, block, n, path=path)
                assert torch.equal(got, want), (rows, path)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n, k", [(1, 2), (100, 80), (576, 576), (130, 1376)])
def test_int8_blocks_widened_in_the_loop_are_the_widened_matrix(threads, n, k):
    # The same for int8 codes (quant.Int8Linear._vnni_product): each block widened (exact in
    # bf16) into the thread's buffer, the bits of vnni_linear over pack_int8's whole matrix; K =
    # 80 and 1376 (not multiples of 32) take oneDNN's micro-kernel on AMX, the others our loop.
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    whole = vnni_linear.pack_int8(codes)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 6, 33, 300):
            x = torch.randn(rows, k).bfloat16()
            for path in PATHS:
                want = vnni_linear.linear(x, whole, None, n, path)
                assert torch.equal(vnni_linear.linear_int8(x, codes, path=path), want), (rows, path)
    finally:
        torch.set_num_threads(before)


def test_a_widened_blocks_row_does_not_depend_on_its_neighbours():
    # A wide row's bits alone and among 299 others (the automatic path) for both fused products.
    packed, group, scales_zeros, n = _int4_layer(576, 576, 32, 64)
    codes = torch.randint(-128, 128, (192, 576), dtype=torch.int8)
    x = torch.randn(300, 576).bfloat16()
    int4 = vnni_linear.linear_int4(x, packed, group, scales_zeros, 64, n)
    int8 = vnni_linear.linear_int8(x, codes)
    for r in (0, 17, 299):
        alone = x[r : r + 1]
        assert torch.equal(
            vnni_linear.linear_int4(alone, packed, group, scales_zeros, 64, n), int4[r : r + 1]
        )
        assert torch.equal(vnni_linear.linear_int8(alone, codes), int8[r : r + 1])


def test_the_widened_blocks_products_refuse_bad_inputs_with_a_message():
    packed, group, scales_zeros, n = _int4_layer(128, 64, 32, 64)
    codes = torch.zeros(64, 64, dtype=torch.int8)
    x = torch.randn(3, 64).bfloat16()
    int4, int8 = torch.ops.carpool.vnni_linear_int4, torch.ops.carpool.vnni_linear_int8
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        int8(x.half(), codes)
    with pytest.raises(RuntimeError, match=r"codes must be a contiguous \[N, 64\] int8"):
        int8(x, torch.zeros(64, 32, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="n = 0 columns"):
        int4(x, packed, group, scales_zeros, 64, 0)
    with pytest.raises(RuntimeError, match="block must be 32 or 64"):
        int4(x, packed, group, scales_zeros, 16, n)
    with pytest.raises(RuntimeError, match="scales_zeros must be"):
        int4(torch.randn(3, 128).bfloat16(), packed, group, scales_zeros, 64, n)
    with pytest.raises(RuntimeError, match="packed must be torch's CPU int4 layout"):
        int4(x, packed[:-1], group, scales_zeros, 64, n)
    with pytest.raises(RuntimeError, match=r"scales must be a contiguous \[64\] bfloat16"):
        int8(x, codes, torch.ones(64))
    out4 = torch.ops.carpool.vnni_linear_int4_out
    with pytest.raises(RuntimeError, match=r"out must be a contiguous \[3, 128\] Float tensor"):
        out4(x.float(), packed, group, scales_zeros, 64, n, torch.empty(3, 128).bfloat16())
    with pytest.raises(RuntimeError, match=r"out must be a contiguous \[3, 64\] BFloat16"):
        torch.ops.carpool.vnni_linear_int8_out(x, codes, None, torch.empty(3, 65).bfloat16())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_a_float32_models_wide_rows_take_float32_in_and_out(path, rows):
    # A float32 model's wide rows go in as they are (rounded to bf16 inside, as torch's cast
    # rounds: a NaN stays a NaN, a subnormal is kept) and come out float32 (the bf16 values) in
    # their rows of the layer's output: the bits of casting around the bf16 product, on every
    # path. (An int8 weight's row scales: on AMX tiles times the float32 sums, rounded once;
    # the matrix-vector loops' bf16 rows times them with a bf16 multiply's rounding.)
    packed, group, scales_zeros, n = _int4_layer(130, 576, 32, 64)
    codes = torch.randint(-128, 128, (130, 576), dtype=torch.int8)
    scales = (torch.rand(130) * 0.02 + 1e-3).bfloat16()
    x = torch.randn(rows, 576) * 3
    x[0, :3] = torch.tensor([1e-40, -3e-39, 2**-130])  # subnormals
    x[-1, 5] = 1.0 + 2**-8  # a tie: to even
    xb = x.bfloat16()
    whole4 = vnni_linear.pack(fused_ops_widened(packed, group, scales_zeros, n))
    want4 = vnni_linear.linear(xb, whole4, None, n, path).float()
    want8 = vnni_linear.linear_int8(xb, codes, scales, path=path).float()
    unscaled = vnni_linear.linear(xb, vnni_linear.pack_int8(codes), None, n, path)
    assert torch.equal(vnni_linear.linear_int8(xb, codes, None, path=path), unscaled)
    if path == vnni_linear.PATH_GEMV or not vnni_linear.amx():
        assert torch.equal(want8, (unscaled * scales).float())
    got4 = vnni_linear.linear_int4(x, packed, group, scales_zeros, 64, n, path=path)
    assert got4.dtype == torch.float32 and torch.equal(got4, want4)
    got8 = vnni_linear.linear_int8(x, codes, scales, path=path)
    assert got8.dtype == torch.float32 and torch.equal(got8, want8)
    # A whole widened matrix taken the same way (a chunked MLP's, widened once for its chunks).
    whole8 = vnni_linear.pack_int8(codes)
    assert torch.equal(vnni_linear.linear_packed(x, whole8, n, scales, path=path), want8)
    assert torch.equal(vnni_linear.linear_packed(x, whole4, n, path=path), want4)
    # Into rows 2.. of a larger output, the rows around them untouched; bf16 in and out too.
    y = torch.full((rows + 3, n), 7.0)
    vnni_linear.linear_int8(x, codes, scales, out=y[2 : 2 + rows], path=path)
    assert torch.equal(y[2 : 2 + rows], want8)
    assert bool((y[:2] == 7).all()) and bool((y[2 + rows :] == 7).all())
    yb = torch.empty(rows, n, dtype=torch.bfloat16)
    vnni_linear.linear_int4(xb, packed, group, scales_zeros, 64, n, out=yb, path=path)
    assert torch.equal(yb.float(), want4)
    assert torch.equal(vnni_linear.linear_int8(xb, codes, scales, path=path).float(), want8)
    # A NaN input makes its row NaN, the others as they were.
    x[0, 7] = float("nan")
    got = vnni_linear.linear_int4(x, packed, group, scales_zeros, 64, n, path=path)
    assert bool(got[0].isnan().all()) and torch.equal(got[1:], want4[1:])


def fused_ops_widened(packed, group, scales_zeros, n):  # noqa: ANN001, ANN201
    """The int4 weight widened to bf16 ``[n, K]`` by ``fused_ops.int4_widen``."""
    from carpool.model import fused_ops

    assert fused_ops.load()
    return fused_ops.int4_widen(packed, group, scales_zeros, 64)[:n].contiguous()
