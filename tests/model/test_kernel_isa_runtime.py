"""The C++ kernels' lower instruction-set paths, run on this machine.

The kernel is built with ``-march=native``, so a CI host with AVX-512 VNNI only ever runs its
VNNI and AVX-512 BF16 loops; ``test_kernel_isa_levels`` compiles the other branches but runs
none of them. Here the kernel is also built for plain x86-64-v2 (scalar loops), x86-64-v3
(AVX2 + FMA, the grouped 8-lane loops of a Zen 3) and x86-64-v4 (AVX-512 without BF16 or VNNI)
under their own operator namespaces, and each build's decode attention is checked against the
gather + SDPA reference on float32, bfloat16 and int8 caches (the bfloat16 cache's pair-major
keys go through the pair loops on v3 and v4, the row copy on v2; the int8 cache's
word-major keys through those paths' row copy). The fused ops are built the same way for the
int4 and int8 heads' float32 logits, whose one-column paths must give the bits of each level's
vector loops; and for this CPU without AMX (with and without AVX-512 VBMI), whose int4_gemv
takes the AVX-512 BF16 dot-product loops an AMD Zen 4 runs (an AMX host's own build multiplies
on tiles). A level the host cannot execute is skipped with its reason.
"""

from __future__ import annotations

import platform

import pytest
import torch

from carpool.model import kernel_build, kv_layout
from carpool.model.quant import int4_row_block
from helpers.attention_ref import (
    dequantized_sdpa,
    gather_sdpa,
    int8_case,
    quantized_query_sdpa,
    random_case,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        platform.machine() not in ("x86_64", "AMD64"), reason="the levels are x86 ones"
    ),
]

# The level's -march, and the /proc/cpuinfo flags a CPU needs to run what it builds.
LEVELS = {
    "v2": ("x86-64-v2", ("sse4_2", "popcnt")),
    "v3": ("x86-64-v3", ("avx2", "fma", "bmi2")),
    "v4": ("x86-64-v4", ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd")),
}


def _build_at_level(level: str, source: str, prefix: str):
    """``source`` built for ``level`` as ``torch.ops.<prefix>_<level>`` (skips where this CPU
    cannot run the level)."""
    march, needs = LEVELS[level]
    flags = set(kernel_build.cpu_flags().split())
    missing = [f for f in needs if f not in flags]
    if missing:
        pytest.skip(f"this CPU lacks {missing} for -march={march}")
    namespace = f"{prefix}_{level}"
    cflags = [f for f in kernel_build.CFLAGS if f != "-march=native"] + [f"-march={march}"]
    kernel_build.build_as(kernel_build.CSRC, source, namespace, cflags)
    return getattr(torch.ops, namespace)


@pytest.fixture(scope="module", params=sorted(LEVELS))
def level_op(request):
    ops = _build_at_level(request.param, "paged_attention.cpp", "isa")
    return ops.paged_decode_attention, (ops.kv_store_int8, ops.kv_store), request.param


@pytest.fixture(scope="module", params=sorted(LEVELS))
def level_fused(request):
    return _build_at_level(request.param, "fused_ops.cpp", "isa_fused")


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lower_level_kernel_matches_the_reference(level_op, head_dim, heads, kv_heads, qdtype):
    decode, _, level = level_op
    lens = [1, 15, 16, 17, 53, 300, 1100]
    scale = head_dim**-0.5
    # A float cache of the queries' dtype.
    q, cache, tables, ctx = random_case(qdtype, heads, kv_heads, head_dim, 16, lens)
    got = decode(q, cache, tables, ctx, scale)
    ref = gather_sdpa(q, cache, tables, ctx, scale)
    tol = 2e-5 if qdtype == torch.float32 else 1.6e-2
    assert (got.float() - ref).abs().max().item() <= tol
    if qdtype == torch.float32:  # float32 queries over a bfloat16 cache (kv_layout's layout)
        _, bf16, _, _ = random_case(torch.bfloat16, heads, kv_heads, head_dim, 16, lens)
        got = decode(q, bf16, tables, ctx, scale)
        ref = gather_sdpa(q, kv_layout.rows_of_blocks(bf16, torch.float32), tables, ctx, scale)
        assert (got - ref).abs().max().item() <= tol
    # The int8 cache (block layout). These levels have no VNNI; the AVX2 one (v3) computes
    # in integers where head_dim is a multiple of 64, its queries rounded to int8 per 64
    # values as the VNNI loops round them (int8_attention.h), the others in float from the
    # dequantized values.
    q, cache, tables, ctx = int8_case(heads, kv_heads, head_dim, 16, lens, qdtype)
    got = decode(q, cache, tables, ctx, scale)
    if level == "v3" and head_dim % 64 == 0:
        ref = quantized_query_sdpa(q, cache, tables, ctx, scale)
        tol = max(tol, 3e-4)  # the int16 softmax weights (test_kv_int8.py)
    else:
        ref = dequantized_sdpa(q, cache, tables, ctx, scale)
    assert (got.float() - ref).abs().max().item() <= tol


def test_lower_level_stores_write_the_hosts_bytes(level_op):
    from carpool.model import paged_attention

    _, (store_int8, store), _ = level_op
    x = torch.randn(40, 2, 2, 64, generator=torch.Generator().manual_seed(3))
    slots = torch.randperm(48)[:40]
    a = torch.zeros(3, 16, 2, 2, 68, dtype=torch.int8)
    b = a.clone()
    store_int8(x, a, slots)
    paged_attention.store_int8(b, slots, x)  # the host's build (or torch ops)
    assert torch.equal(a, b)
    for src in (x, x.bfloat16()):  # into a bfloat16 cache (kv_layout's block layout)
        a = torch.zeros(3, 16, 2, 2, 64, dtype=torch.bfloat16)
        b = a.clone()
        store(src, a, slots)
        kv_layout.store(b, slots, src)
        assert torch.equal(a, b)


@pytest.mark.parametrize("block", [32, 64])
def test_lower_level_int4_logits_are_one_columns_bits(level_fused, block):
    # int4_logits runs each level's loop for its own block layout (AVX2: 32, AVX-512: 64) and
    # plain loops otherwise; int4_logits_at computes one column alone: the same bits on every
    # level, so a rescored row's top logits equal the kernel's. int4_gemv is the same sums
    # rounded to bf16 (of a bf16-rounded x).
    from carpool.model.quant import Int4Linear, _pack_int4_by_hand, _unpack_int4_all

    torch.manual_seed(block)
    n, k = 200, 128
    lin = Int4Linear.from_float(torch.randn(n, k), None, torch.float32)
    args = (_pack_int4_by_hand(_unpack_int4_all(lin.packed, k), block), 32, lin.scales_zeros, block)
    x = torch.randn(5, k)
    got = level_fused.int4_logits(x, *args)
    exact = x.double() @ lin._dense(torch.float32).double().T
    torch.testing.assert_close(got.double()[:, :n], exact, rtol=1e-5, atol=1e-4)
    ids = torch.randint(0, n, (5, 40))
    assert torch.equal(level_fused.int4_logits_at(x, *args, ids), got.gather(1, ids))
    rounded = level_fused.int4_gemv(x.bfloat16().float(), *args)
    want = level_fused.int4_logits(x.bfloat16().float(), *args).bfloat16().float()
    assert torch.equal(rounded, want)
    # 30 rows: on AVX2 each group's codes widened once for groups of up to 6 rows, the same
    # bits as the rows one at a time.
    many = torch.randn(30, k)
    got = level_fused.int4_logits(many, *args)
    assert torch.equal(got[7:8], level_fused.int4_logits(many[7:8], *args))
    cols = ids[:1].expand(30, -1).contiguous()
    assert torch.equal(level_fused.int4_logits_at(many, *args, cols), got.gather(1, cols))
    last = level_fused.int4_gemv(many[29:], *args)
    assert torch.equal(level_fused.int4_gemv(many, *args)[29:], last)


@pytest.fixture(scope="module")
def bf16_loops_fused():
    """fused_ops.cpp built for this CPU without AMX (its AVX-512 BF16 dot-product loops: what an
    AMD Zen 4 runs, where an AMX host's int4_gemv takes tiles), with and without AVX-512 VBMI
    (the codes' two decodings), as ``{"vbmi": ops, "no_vbmi": ops}``; skipped where this CPU
    has no AVX-512 BF16 (there the native build runs the other loops)."""
    flags = set(kernel_build.cpu_flags().split())
    if not {"avx512_bf16", "avx512vbmi"} <= flags:
        pytest.skip("this CPU has no AVX-512 BF16 / VBMI: the dot-product loops are not its own")
    base = list(kernel_build.CFLAGS) + ["-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"]
    builds = {}
    for name, extra in (("vbmi", []), ("no_vbmi", ["-mno-avx512vbmi", "-mno-avx512vbmi2"])):
        kernel_build.build_as(kernel_build.CSRC, "fused_ops.cpp", f"isa_bf16_{name}", base + extra)
        builds[name] = getattr(torch.ops, f"isa_bf16_{name}")
    return builds


@pytest.mark.parametrize("group", [32, 64])
def test_int4_dot_product_loops_add_in_input_order_without_amx(bf16_loops_fused, group):
    # Without AMX (a Zen 4) int4_gemv's dot-product loops (1-4 rows in registers, a group
    # decoded once from 5 rows on AMX builds / 48 elsewhere) add each column's products in
    # int4_logits' order: its values are int4_logits' of the bf16-rounded rows, rounded once,
    # at every row count, a row's bits whatever rows share the call; the codes decoded by two
    # byte permutes (VBMI) or by widenings and unpacks, the same values.
    from carpool.model.quant import Int4Linear

    ops = bf16_loops_fused
    assert not ops["vbmi"].int4_gemv_amx() and not ops["no_vbmi"].int4_gemv_amx()
    torch.manual_seed(group)
    n, k = 192, 320 if group == 32 else 384
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales, zeros = torch.rand(n, k // group) * 0.1 + 0.01, torch.randn(n, k // group) * 0.1
    lin = Int4Linear(codes, scales, zeros, None, group, torch.float32)
    args = (lin.packed, group, lin.scales_zeros, int4_row_block())
    x = torch.randn(60, k)
    every = ops["vbmi"].int4_gemv(x, *args)
    assert torch.equal(ops["no_vbmi"].int4_gemv(x, *args), every)
    for rows in (1, 2, 3, 4, 5, 9, 50, 60):
        got = ops["vbmi"].int4_gemv(x[:rows], *args)
        sums = ops["vbmi"].int4_logits(x[:rows].bfloat16().float(), *args)
        assert torch.equal(got, sums.bfloat16().float()), rows
        assert torch.equal(got, every[:rows]), rows
        assert torch.equal(ops["no_vbmi"].int4_gemv(x[:rows], *args), got), rows


def test_lower_level_int8_logits_are_one_columns_bits(level_fused):
    # An int8 head's float32 logits at each level (v4: AVX-512 without BF16, its tiles of four
    # weight rows widened in registers up to 4 input rows and once into a buffer past them;
    # v3: the AVX2 groups; v2: plain loops): a row's bits the same alone and in any batch, and
    # int8_logits_at's one column at a time the same. int8_gemv (bf16-rounded x and sums) takes
    # the same loops on v4 (no int8_dot there).
    g = torch.Generator().manual_seed(8)
    n, k = 203, 200  # a partial tile, a tail of 8 codes
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) * 0.01).bfloat16()
    x = torch.randn(13, k, generator=g)
    got = level_fused.int8_logits(x, q, s)
    exact = x.double() @ (q.double() * s.double()[:, None]).T
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(0, 4), slice(4, 9), slice(12, 13)):
        assert torch.equal(level_fused.int8_logits(x[rows].contiguous(), q, s), got[rows])
    ids = torch.randint(0, n, (13, 40), generator=g)
    assert torch.equal(level_fused.int8_logits_at(x, q, s, ids), got.gather(1, ids))
    xb = x.bfloat16().float()
    rounded = level_fused.int8_gemv(xb, q, s)
    torch.testing.assert_close(
        rounded.double(), xb.double() @ (q.double() * s.double()[:, None]).T, rtol=2**-7, atol=1e-3
    )
    assert torch.equal(level_fused.int8_gemv(xb[12:], q, s), rounded[12:])


@pytest.fixture(scope="module", params=sorted(LEVELS))
def level_vnni(request):
    return _build_at_level(request.param, "vnni_linear.cpp", "isa_vnni")


def test_lower_level_vnni_linear_is_a_bf16_gemm_whatever_the_rows(level_vnni):
    # The VNNI layout's product at each level (AVX2: the 8-column loops an AMD Zen 2/3 runs,
    # up to six rows a pass, the chunked and one-pass block loops, their runs of 8 pairs and
    # the pairs left over; v2 and v4: plain loops): float32
    # sums of the bf16 products rounded once, and a row's bits the same at every row count.
    from carpool.model import vnni_linear

    g = torch.Generator().manual_seed(5)
    for n, k in [(200, 96), (64, 130), (130, 512)]:
        w = torch.randn(n, k, generator=g).bfloat16()
        bias = torch.randn(n, generator=g)
        packed = vnni_linear.pack(w)
        x = torch.randn(45, k, generator=g).bfloat16()
        full = level_vnni.vnni_linear(x, packed, bias, n, 0)
        exact = x.double() @ w.double().T + bias.double()
        torch.testing.assert_close(full.double(), exact, rtol=2**-7, atol=2e-2)
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 30, 36, 37, 43):
            part = level_vnni.vnni_linear(x[:rows].contiguous(), packed, bias, n, 0)
            assert torch.equal(part, full[:rows])


def test_lower_level_fused_products_are_the_widened_matrix(level_vnni):
    # A wide row's int4 / int8 products at each level (each block widened into the thread's
    # buffer by the level's own loops: AVX2's 8-column groups, AVX-512F's 16, plain words; a
    # float32 row rounded to bf16 by its plain or vector loop; float32 rows out and int8 row
    # scales from the level's store, or after its matrix-vector loops' bf16 rows): the bits of
    # the level's vnni_linear over the whole widened matrix, 130 columns (a partial block).
    from carpool.model import fused_ops, vnni_linear
    from carpool.model.quant import Int4Linear, Int8Linear, int4_row_block

    assert fused_ops.load()
    torch.manual_seed(11)
    n, k, block = 130, 256, int4_row_block()
    lin4 = Int4Linear.from_float(torch.randn(n, k), None, torch.bfloat16)
    lin8 = Int8Linear.from_float(torch.randn(n, k), None, torch.bfloat16)
    args4 = (lin4.packed, 32, lin4.scales_zeros, block, n)
    whole4 = fused_ops.int4_widen_vnni(*args4)
    whole8 = vnni_linear.pack_int8(lin8.qweight)
    ops = level_vnni
    for rows in (1, 7, 37):
        x = torch.randn(rows, k) * 2
        xb = x.bfloat16()
        want4 = ops.vnni_linear(xb, whole4, None, n, 0)
        want8 = ops.vnni_linear(xb, whole8, None, n, 0)
        assert torch.equal(ops.vnni_linear_int4(xb, *args4, 0), want4)
        assert torch.equal(ops.vnni_linear_int8(xb, lin8.qweight, None, 0), want8)
        assert torch.equal(ops.vnni_linear_int4(x, *args4, 0), want4.float())
        # The row scales as the level's store applies them over the whole widened matrix: AMX's
        # (oneDNN's micro-kernel at v2 / v4 on an AMX host) times the float32 sums, rounded
        # once; the matrix-vector loops (AVX2) times their bf16 rows, a bf16 multiply.
        scaled = ops.vnni_linear_packed(x, whole8, n, lin8.scales, 0)
        twice = (want8 * lin8.scales).float()
        exact = xb.double() @ (lin8.qweight.double() * lin8.scales.double()[:, None]).T
        assert torch.equal(scaled, twice) or bool(
            (scaled.double() - exact).abs().mean() < (twice.double() - exact).abs().mean()
        )
        assert torch.equal(ops.vnni_linear_int8(x, lin8.qweight, lin8.scales, 0), scaled)
        out = torch.full((rows + 2, n), 7.0)
        ops.vnni_linear_int8_out(x, lin8.qweight, lin8.scales, out[1 : rows + 1], 0)
        assert torch.equal(out[1 : rows + 1], scaled)
        assert bool((out[0] == 7).all()) and bool((out[-1] == 7).all())


def test_lower_level_silu_and_mul_is_torchs(level_fused, request):
    # The fused SwiGLU at each level (AVX2: 8 lanes, then the scalar tail). float32: torch's
    # bits where the build has vectors (its silu with Sleef's vector exp, torch's own, as this
    # machine's torch computes it; std::exp on the scalar rest), close to them in a plain
    # build (std::exp everywhere: glibc's, not Sleef's). bf16: torch's values but for the
    # exp's polynomial (relative error ~2e-7): rare one-ulp roundings.
    g = torch.Generator().manual_seed(7)
    gu = torch.randn(5, 2 * 203, generator=g) * 4
    half = gu.shape[1] // 2

    def ref(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(t[:, :half]) * t[:, half:]

    if request.node.callspec.params["level_fused"] == "v2":
        torch.testing.assert_close(level_fused.silu_and_mul(gu), ref(gu), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(level_fused.silu_and_mul(gu), ref(gu))
    b = gu.bfloat16()
    got, want = level_fused.silu_and_mul(b), ref(b)
    assert got.dtype == torch.bfloat16 and (got != want).float().mean() < 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-3)
