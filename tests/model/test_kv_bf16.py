"""A bfloat16 KV cache under a float32 model (``kv_cache_dtype="bfloat16"``): the decode kernel
reading bf16 keys (pair-major, ``kv_layout``) and value rows with float32 queries, the gather
path widening them, a tiny model against transformers, and the engine (the decode stack:
test_decode_stack)."""

from __future__ import annotations

import pytest
import torch

from carpool.model import kv_layout, paged_attention
from carpool.model.kv_quant import resolve_kv_dtype
from carpool.model.loader import load_model
from helpers.attention_ref import gather_sdpa, random_case
from helpers.carpool_ref import (
    assert_same_top1_where_clear,
    greedy,
    kernel_and_gathered_logits,
    teacher_forced_vs_hf,
)
from helpers.hf_models import first_difference, hf_greedy, save_tiny_hf_model, save_tiny_model_dir


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    # A failed build would silently route every test below to the gather path.
    assert paged_attention.kernel() is not None, paged_attention._state.failed
    paged_attention.use_kernel(True)


def test_resolves_to_bfloat16_whatever_the_model_dtype():
    assert resolve_kv_dtype("bfloat16", torch.float32) is torch.bfloat16
    assert resolve_kv_dtype("bfloat16", torch.bfloat16) is torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32) is torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        resolve_kv_dtype("float16", torch.float32)


def test_kernel_applies_to_float32_queries_over_a_bf16_cache_only():
    bf16 = torch.zeros(2, 16, 2, 1, 32, dtype=torch.bfloat16)
    fp32 = torch.zeros(2, 16, 2, 1, 32)
    assert paged_attention.applies(bf16, torch.float32)
    assert paged_attention.applies(bf16, torch.bfloat16)
    # A bf16 query over a float32 cache is no case the engine makes: the gather path keeps it.
    assert not paged_attention.applies(fp32, torch.bfloat16)
    q = torch.zeros(1, 2, 32, dtype=torch.bfloat16)
    tables, lens = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="query and cache dtypes differ"):
        paged_attention.paged_decode_attention(q, fp32, tables, lens, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads, head_dim", [(3, 64), (1, 40), (2, 128)])
def test_the_gather_operator_is_index_select_then_rows(dtype, kv_heads, head_dim):
    # carpool::kv_gather_rows: the gather path's two copies (whole blocks, then their pair-major
    # keys back into rows) in one pass; repeated and out-of-order block ids included.
    cache = torch.randn(9, 16, 2, kv_heads, head_dim).to(torch.bfloat16)
    blocks = torch.tensor([4, 0, 8, 4, 2, 7])
    expected = kv_layout.rows_of_blocks(cache.index_select(0, blocks), dtype)
    out = torch.empty(len(blocks), 16, 2, kv_heads, head_dim, dtype=dtype)
    assert paged_attention.gather_rows(cache, blocks, out)
    assert torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="block id 9 outside"):
        torch.ops.carpool.kv_gather_rows(cache, torch.tensor([1, 9]), out[:2])
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        torch.ops.carpool.kv_gather_rows(cache, blocks, out[:2])
    assert not paged_attention.gather_rows(cache.float(), blocks, out)  # a float32 cache


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (4, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize("head_dim", [32, 40, 64, 128])  # 40: the generic loops' tail
def test_kernel_matches_gather_sdpa_on_the_widened_cache(heads, kv_heads, head_dim):
    lens = [1, 15, 16, 17, 53, 700]
    _, kv, tables, ctx = random_case(torch.bfloat16, heads, kv_heads, head_dim, 16, lens)
    q = torch.randn(len(lens), heads + 2 * kv_heads, head_dim)[:, :heads]  # float32, strided
    got = paged_attention.paged_decode_attention(q, kv, tables, ctx, head_dim**-0.5)
    assert got.dtype == torch.float32 and got.shape == (len(lens), heads, head_dim)
    # The same bf16 values widened exactly (rows from the cache's block layout): float32 math
    # both ways, summation order apart.
    ref = gather_sdpa(q, kv_layout.rows_of_blocks(kv, torch.float32), tables, ctx, head_dim**-0.5)
    assert (got - ref).abs().max().item() <= 2e-5


# Logit error of the tiny fp32 models (random weights of std 0.2: logits of std ~1.6) with a
# bf16 cache against transformers, teacher-forced over 24 positions, measured for seeds 0-2:
# max 0.052-0.068 (llama, head_dim 16) and 0.030-0.042 (qwen3, head_dim 32), a median per
# position of 0.016-0.030; the top-1 token agreed at all 144 positions. The bound leaves 1.5x
# over the worst seed; it is a third of the int8 cache's (test_kv_int8.INT8_LOGIT_BOUND).
BF16_LOGIT_BOUND = 0.1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: head_dim 32, q/k norms
def test_tiny_model_with_bf16_cache_against_transformers(tmp_path, arch):
    hf = save_tiny_hf_model(arch, tmp_path)
    model, _ = load_model(tmp_path, dtype="float32")
    got, ref, runs = teacher_forced_vs_hf(hf, model, torch.bfloat16)
    # 23 decode steps through the kernel on the bf16 cache, every layer.
    assert runs == 23 * model.config.num_hidden_layers
    err = (got - ref).abs().max().item()
    assert 0 < err <= BF16_LOGIT_BOUND, f"bf16 cache logit error {err}"
    assert_same_top1_where_clear(got, ref, BF16_LOGIT_BOUND)


def test_gather_and_kernel_paths_agree(tmp_path):
    # Decode on the bf16 cache through the kernel and through gather + widen + SDPA (prefill,
    # mixed steps, other devices). Not to float32 rounding: the paths' ~1e-6 differences in one
    # layer's output flip a stored K/V value of the next layer by one bf16 step (2^-8 relative)
    # now and then (seen: layer 0's cache equal, layer 1's one step apart). Measured 1.5e-5 to
    # 2.9e-4 (llama, qwen3; fused operators on and off; 1 and 2 threads).
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="float32")
    kernel, gathered = kernel_and_gathered_logits(model, torch.bfloat16)
    assert (kernel - gathered).abs().max().item() <= 1e-3


def test_greedy_tokens_of_the_tiny_model_match_transformers(tmp_path):
    # The bf16 cache's error (~0.03 per position) leaves this prompt's greedy tokens unchanged.
    hf = save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="float32")
    prompt = list(range(3, 300, 7))
    got = greedy(model, prompt, 24, kv_dtype=torch.bfloat16)
    expected = hf_greedy(hf, prompt, 24)
    assert got == expected, first_difference(got, expected)


@pytest.mark.parametrize("layout", ["ragged", "padded"])
def test_engine_batch_with_bf16_cache_equals_each_prompt_alone(tmp_path, layout):
    # Continuous batching (or the padded rectangle) of a float32 model on a bf16 cache gives
    # each prompt's tokens served alone on a bf16 cache; the cache takes half the bytes.
    from carpool import LLM, SamplingParams

    save_tiny_model_dir("llama", tmp_path)
    prompts = [list(range(3, 3 + 7 * n, 7)) for n in (1, 15, 16, 17, 40)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", enable_prefix_caching=False, layout=layout, kv_cache_memory=1 << 20)
    llm = LLM(tmp_path, max_num_batched_tokens=64, max_num_seqs=8, kv_cache_dtype="bfloat16", **kw)
    runner = llm.engine.runner
    assert all(c.dtype == torch.bfloat16 for c in runner.kv_caches)
    fp32 = LLM(tmp_path, max_num_seqs=8, **kw).engine.runner
    # The same byte budget holds twice the blocks (the padded layout's scratch block apart).
    assert len(runner.kv_caches) == len(fp32.kv_caches)
    extra = layout == "padded"
    bf16_blocks = runner.kv_caches[0].shape[0] - extra
    assert bf16_blocks == 2 * (fp32.kv_caches[0].shape[0] - extra)
    calls = paged_attention.kernel_calls()
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # Decode rows take the kernel in both layouts (the padded layout's real rows compute the
    # ragged batch's bits; its prompt rectangles gather).
    assert paged_attention.kernel_calls() > calls
    alone_llm = LLM(tmp_path, max_num_seqs=1, kv_cache_dtype="bfloat16", **kw)
    for p, got in zip(prompts, together, strict=True):
        alone = alone_llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == alone, f"prompt of {len(p)} tokens: {first_difference(got, alone)}"
