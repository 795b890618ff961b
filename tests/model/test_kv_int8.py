"""The int8 KV cache (``kv_cache_dtype="int8"``): quantization, the decode kernel on int8 rows,
the gather path's dequantization, a tiny model against transformers, and the engine."""

from __future__ import annotations

import pytest
import torch

from carpool.model import kv_quant, paged_attention
from carpool.model.loader import load_model
from helpers.attention_ref import dequantized_sdpa, int8_case, quantized_query_sdpa
from helpers.carpool_ref import (
    assert_same_top1_where_clear,
    kernel_and_gathered_logits,
    teacher_forced_vs_hf,
)
from helpers.hf_models import first_difference, save_tiny_hf_model, save_tiny_model_dir


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    # A failed build would silently route every test below to the torch fallbacks.
    assert paged_attention.kernel() is not None, paged_attention._state.failed
    paged_attention.use_kernel(True)


def test_round_trip_error_is_at_most_half_a_step_and_zero_rows_are_exact():
    g = torch.Generator().manual_seed(0)
    # Rows of very different magnitudes (each row gets its own scale), one all-zero row, one
    # row with a single non-zero value.
    x = torch.randn(64, 2, 4, 64, generator=g) * torch.logspace(-3, 3, 64)[:, None, None, None]
    x[3, 1, 2] = 0.0
    x[5, 0, 1] = 0.0
    x[5, 0, 1, 7] = -2.5
    q = kv_quant.quantize(x)
    assert q.dtype == torch.int8 and q.shape == (64, 2, 4, 68)
    back = kv_quant.dequantize(q, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    # |x - q * scale| <= scale / 2 = amax / 254 (plus float32 rounding of the product).
    assert ((back - x).abs() <= amax / 254 * (1 + 1e-5)).all()
    assert torch.equal(back[3, 1, 2], torch.zeros(64))
    assert q[3, 1, 2, 64:].view(torch.float32).item() == 0.0  # scale 0
    assert back[5, 0, 1, 7].item() == pytest.approx(-2.5, rel=1e-6)  # amax itself is exact
    assert q[..., :64].abs().max().item() == 127 and q[..., :64].min().item() >= -127


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_store_writes_the_same_bytes_as_the_torch_ops(dtype):
    g = torch.Generator().manual_seed(1)
    # The layer's new K/V: a strided [T, 2, K, D] view into the fused qkv output.
    qkv = torch.randn(9, 8 + 2 * 2, 32, generator=g).to(dtype)
    new_kv = qkv[:, 8:].view(9, 2, 2, 32)
    new_kv[4, 1, 0] = 0
    slots = torch.tensor([0, 17, 3, 30, 9, 12, 31, 1, 20])
    a = torch.zeros(2, 16, 2, 2, 36, dtype=torch.int8)
    b = a.clone()
    paged_attention.store_int8(a, slots, new_kv)  # carpool::kv_store_int8
    kv_quant.store(b, slots, new_kv)  # torch ops (other devices)
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="slot"):
        paged_attention.store_int8(a, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 32]), new_kv)


def test_block_layout_puts_each_byte_where_the_docstring_says():
    # kv_quant's block layout, spelled out with explicit offsets: per kv head a region of
    # K words [D / 4][S][4], K scales [S], V rows [S][D], V scales [S].
    n, bs, kvh, d = 3, 8, 2, 16
    rows = kv_quant.quantize(torch.randn(n, bs, 2, kvh, d, generator=torch.Generator()))
    blocks = kv_quant.to_blocks(rows)
    assert blocks.shape == rows.shape and blocks.dtype == torch.int8
    flat = blocks.view(n, -1)
    region = 2 * bs * (d + 4)
    for b in range(n):
        for h in range(kvh):
            r = flat[b, h * region : (h + 1) * region]
            for t in range(bs):
                k_row, v_row = rows[b, t, 0, h], rows[b, t, 1, h]
                for w in range(d // 4):
                    assert torch.equal(
                        r[(w * bs + t) * 4 : (w * bs + t) * 4 + 4], k_row[4 * w : 4 * w + 4]
                    )
                assert torch.equal(r[d * bs + 4 * t : d * bs + 4 * t + 4], k_row[d:])
                v0 = bs * (d + 4)
                assert torch.equal(r[v0 + t * d : v0 + (t + 1) * d], v_row[:d])
                assert torch.equal(r[v0 + d * bs + 4 * t : v0 + d * bs + 4 * t + 4], v_row[d:])
    assert torch.equal(kv_quant.from_blocks(blocks), rows)
    deq = kv_quant.dequantize_blocks(blocks, torch.float32)
    assert torch.equal(deq, kv_quant.dequantize(rows, torch.float32))
    with pytest.raises(ValueError, match="multiple of 4"):
        kv_quant.to_blocks(torch.zeros(1, 4, 2, 1, 6 + 4, dtype=torch.int8))


def test_cpu_store_and_torch_ops_agree_at_rounding_ties():
    # 2M values: with `127.0 / amax` (a multiply by the reciprocal) the torch ops wrote 2
    # bytes one step off the C++ store's (a true division) where x * inv fell on a tie.
    x = torch.randn(4096, 2, 4, 64, generator=torch.Generator().manual_seed(0))
    a = torch.zeros(256, 16, 2, 4, 68, dtype=torch.int8)
    b = a.clone()
    paged_attention.store_int8(a, torch.arange(4096), x)
    kv_quant.store(b, torch.arange(4096), x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "qdtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2)], ids=["fp32", "bf16"]
)
def test_kernel_on_int8_matches_dequantized_sdpa(
    block_size, heads, kv_heads, head_dim, qdtype, tol
):
    lens = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 700]
    q, cache, tables, ctx = int8_case(heads, kv_heads, head_dim, block_size, lens, qdtype)
    assert paged_attention.applies(cache, qdtype)
    calls = paged_attention.kernel_calls()
    got = paged_attention.paged_decode_attention(q, cache, tables, ctx, head_dim**-0.5)
    assert paged_attention.kernel_calls() == calls + 1
    assert got.shape == (len(lens), heads, head_dim) and got.dtype == qdtype
    ref = dequantized_sdpa(q, cache, tables, ctx, head_dim**-0.5)
    diff = (got.float() - ref).abs().max().item()
    if paged_attention.quantizes_int8_queries(head_dim):
        # Integer dot products (AVX-512 VNNI): the queries rounded to int8 per 64 values, as
        # the reference rounds them; then only the int16 softmax weights (< 2^-15 of the
        # running sum each) and, for bf16, the output's rounding.
        exact = quantized_query_sdpa(q, cache, tables, ctx, head_dim**-0.5)
        near = (got.float() - exact).abs().max().item()
        assert near <= max(tol, 3e-4), f"max abs difference {near} from the rounded queries"
        # Against the unrounded queries: the query rounding's own error, below the cache's
        # (values here ~N(0, 1); the int8 cache itself is off by up to amax / 254 a value).
        assert diff <= 3e-2, f"max abs difference {diff}"
    else:
        # fp32: the same dequantized values (the kernel applies each row's scale to the dot
        # product / the softmax weight instead of to each value), float32 summation order
        # apart. bf16: plus one rounding of the output to bf16.
        assert diff <= tol, f"max abs difference {diff}"


def test_kernel_applies_to_int8_caches_with_float_queries_on_the_cpu():
    cache = torch.zeros(2, 16, 2, 1, 36, dtype=torch.int8)
    assert paged_attention.applies(cache, torch.float32)
    assert paged_attention.applies(cache, torch.bfloat16)
    assert not paged_attention.applies(cache, torch.float16)  # the gather path instead
    assert not paged_attention.applies(cache.to("meta"), torch.float32)  # other devices
    assert not paged_attention.applies(torch.zeros(2, 16, 2, 1, 32), torch.bfloat16)


@pytest.mark.parametrize("head_dim", [32, 64])  # 64: the integer loops where the CPU has them
def test_int8_kernel_reads_only_each_sequences_own_rows(head_dim):
    q, cache, tables, ctx = int8_case(4, 2, head_dim, 16, [5, 20], torch.float32)
    scale = head_dim**-0.5
    ref, tol = dequantized_sdpa(q, cache, tables, ctx, scale), 2e-5
    if paged_attention.quantizes_int8_queries(head_dim):
        ref, tol = quantized_query_sdpa(q, cache, tables, ctx, scale), 3e-4
    rows = kv_quant.from_blocks(cache)  # slots as rows, written back in the block layout
    rows[tables[0, 0], 5:] = 127  # values, and scales of 127-byte garbage
    rows[tables[1, 1], 4:] = -100
    rows[tables[0, 1:]] = 127
    cache = kv_quant.to_blocks(rows)
    got = paged_attention.paged_decode_attention(q, cache, tables, ctx, scale)
    assert (got - ref).abs().max().item() <= tol


# Logit error of the tiny fp32 models (hidden 64, 2 layers, 4/2 heads, random weights of std
# 0.2: logits of std ~1.6, max ~6) with an int8 cache against transformers, teacher-forced over
# 24 positions, measured for seeds 0-2: max 0.15-0.20 (llama, head_dim 16) and 0.09-0.11
# (qwen3, head_dim 32), a median per position of 0.04-0.08; the top-1 token agreed at all 144
# positions. The bound leaves 1.5x over the worst seed.
INT8_LOGIT_BOUND = 0.3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: head_dim 32, q/k norms
def test_tiny_model_with_int8_cache_against_transformers(tmp_path, arch):
    hf = save_tiny_hf_model(arch, tmp_path)
    model, _ = load_model(tmp_path, dtype="float32")
    fp32, ref, _ = teacher_forced_vs_hf(hf, model, torch.float32)
    int8, _, runs = teacher_forced_vs_hf(hf, model, torch.int8)
    # 23 decode steps through the kernel on the int8 cache, every layer.
    assert runs == 23 * model.config.num_hidden_layers
    assert (fp32 - ref).abs().max().item() <= 1e-4  # the float cache: transformers' numbers
    err = (int8 - ref).abs().max().item()
    assert 0 < err <= INT8_LOGIT_BOUND, f"int8 cache logit error {err}"
    assert_same_top1_where_clear(int8, ref, INT8_LOGIT_BOUND)


def test_int8_gather_and_kernel_paths_agree(tmp_path):
    # Decode on the int8 cache through the kernel and through gather + dequantize + SDPA (the
    # path of prefill, mixed steps and other devices): the same dequantized values, so float32
    # rounding apart the same logits.
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="float32")
    kernel, gathered = kernel_and_gathered_logits(model, torch.int8)
    assert (kernel - gathered).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_engine_batch_with_int8_cache_equals_each_prompt_alone(tmp_path, layout):
    # Continuous batching (ragged decode steps, prefill chunks mixed in; or the padded
    # rectangle) on an int8 cache gives each prompt's tokens served alone on an int8 cache:
    # both quantize the same values.
    from carpool import LLM, SamplingParams

    save_tiny_model_dir("llama", tmp_path)
    prompts = [list(range(3, 3 + 7 * n, 7)) for n in (1, 15, 16, 17, 40)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache_dtype="int8", enable_prefix_caching=False, layout=layout)
    llm = LLM(tmp_path, max_num_batched_tokens=64, max_num_seqs=8, **kw)
    assert all(c.dtype == torch.int8 for c in llm.engine.runner.kv_caches)
    calls = paged_attention.kernel_calls()
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # Decode rows take the kernel in both layouts (the padded layout's real rows compute the
    # ragged batch's bits; its prompt rectangles gather).
    assert paged_attention.kernel_calls() > calls
    alone_llm = LLM(tmp_path, max_num_seqs=1, **kw)
    for p, got in zip(prompts, together, strict=True):
        alone = alone_llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == alone, f"prompt of {len(p)} tokens: {first_difference(got, alone)}"


@pytest.mark.parametrize("head_dim", [64, 128])
def test_int8_kernel_ignores_slots_past_each_context(head_dim):
    # Slots past a sequence's length (in its last block and in blocks past it) hold garbage:
    # extreme values and scales that are inf or NaN. Not one of them may reach the output
    # (the integer loops load only a tile's own tokens and zeros for the rest).
    lens = [5, 20, 33]
    q, cache, tables, ctx = int8_case(8, 2, head_dim, 16, lens, torch.bfloat16)
    clean = paged_attention.paged_decode_attention(q, cache, tables, ctx, head_dim**-0.5)
    flat = kv_quant.from_blocks(cache)  # slots as rows, written back in the block layout
    for b, n in enumerate(lens):
        last = tables[b, (n - 1) // 16]
        flat[last, n % 16 or 16 :, :, :, :head_dim] = 127
        scales = flat[last, n % 16 or 16 :, :, :, head_dim:].contiguous().view(torch.float32)
        scales[..., 0] = float("nan") if b % 2 else float("inf")
        flat[last, n % 16 or 16 :, :, :, head_dim:] = scales.view(torch.int8)
        flat[tables[b, (n - 1) // 16 + 1 :]] = -127
    cache = kv_quant.to_blocks(flat)
    got = paged_attention.paged_decode_attention(q, cache, tables, ctx, head_dim**-0.5)
    assert torch.equal(got, clean)
