"""The in-place paged decode kernel against the gather + SDPA path it replaces in decode steps."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carpool.model import attention, fused_ops, kernel_build, kv_layout, paged_attention
from carpool.model.loader import load_model
from carpool.worker import batch as batch_module
from carpool.worker.batch import build_ragged_batch
from carpool.worker.padded import build_padded_batch
from helpers.attention_ref import (
    dequantized_sdpa,
    gather_sdpa,
    int8_case,
    quantized_query_sdpa,
    random_case,
)
from helpers.carpool_ref import _Chunk, greedy
from helpers.hf_models import hf_greedy, save_tiny_hf_model, save_tiny_model_dir


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    # The kernel must build on the test machines (gcc + ninja are dependencies of the project):
    # a failed build would silently route every test below to the fallback.
    assert paged_attention.kernel() is not None, paged_attention._state.failed
    paged_attention.use_kernel(True)


@pytest.mark.parametrize("block_size", [8, 16, 24, 32])  # 8, 24: a block of a partial vector
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (4, 1)], ids=["mha", "gqa4", "mqa"])
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2)], ids=["fp32", "bf16"]
)
def test_kernel_matches_gather_sdpa(block_size, heads, kv_heads, dtype, tol):
    lens = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5, 1000]
    head_dim = 64
    q, kv, tables, ctx = random_case(dtype, heads, kv_heads, head_dim, block_size, lens)
    scale = head_dim**-0.5
    calls = paged_attention.kernel_calls()
    got = paged_attention.paged_decode_attention(q, kv, tables, ctx, scale)
    assert paged_attention.kernel_calls() == calls + 1
    assert got.shape == (len(lens), heads, head_dim) and got.dtype == dtype
    ref = gather_sdpa(q, kv, tables, ctx, scale)
    # fp32: both accumulate in fp32, only the summation order differs. bf16: the same fp32
    # math, then one rounding of the output to bf16 (relative 2^-8 of values up to ~2).
    diff = (got.float() - ref).abs().max().item()
    assert diff <= tol, f"max abs difference {diff}"


# Query heads per kv head: 3 (SmolLM2), 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 3, 8 = 4 + 4: on AVX2 a
# bfloat16 or int8 block's K/V vectors are read once per group of up to 4 heads.
GROUPS = [(9, 3), (5, 1), (12, 2), (14, 2), (8, 1)]


# head_dim 32 and 64: one and two chunks of the 16-lane grouped loops (AVX-512); 80: five chunks
# of 16 (the 8-lane ones there), an odd one out. No int8 cache at 64: the VNNI loops take it
# where the CPU has them (test_kv_int8.py), with their own rounding of the queries.
GROUP_CACHES = [
    (d, cache)
    for d in (32, 64, 80)
    for cache in ("bf16", "bf16-fp32q", "int8-fp32q", "int8-bf16q")
    if not (d == 64 and cache.startswith("int8"))
]


@pytest.mark.parametrize("heads,kv_heads", GROUPS, ids=[f"{h}/{k}" for h, k in GROUPS])
@pytest.mark.parametrize("head_dim,cache", GROUP_CACHES, ids=[f"{d}-{c}" for d, c in GROUP_CACHES])
def test_query_head_groups_of_every_size(heads, kv_heads, cache, head_dim):
    # One sequence (its kv heads split into runs over the threads) beside longer ones, tails
    # of 1-15 tokens in a block of 16.
    lens = [37, 1, 16, 7, 300]
    scale = head_dim**-0.5
    if cache.startswith("int8"):
        qdtype = torch.float32 if cache.endswith("fp32q") else torch.bfloat16
        q, kv, tables, ctx = int8_case(heads, kv_heads, head_dim, 16, lens, qdtype)
        ref = dequantized_sdpa(q, kv, tables, ctx, scale)
        ones = paged_attention.paged_decode_attention(q[:1], kv, tables[:1], ctx[:1], scale)
    else:
        q, kv, tables, ctx = random_case(torch.bfloat16, heads, kv_heads, head_dim, 16, lens)
        if cache == "bf16-fp32q":
            q = q.float()
        ref = gather_sdpa(q, kv, tables, ctx, scale)
        ones = paged_attention.paged_decode_attention(q[:1], kv, tables[:1], ctx[:1], scale)
    got = paged_attention.paged_decode_attention(q, kv, tables, ctx, scale)
    # float32 outputs: the same float32 math, summation order apart; bf16: one rounding more.
    tol = 2e-5 if got.dtype == torch.float32 else 1.6e-2
    assert (got.float() - ref).abs().max().item() <= tol
    assert (ones.float() - ref[:1]).abs().max().item() <= tol


@pytest.mark.parametrize("heads,kv_heads", [(16, 4), (9, 3), (8, 8)], ids=["gqa4", "9/3", "mha"])
@pytest.mark.parametrize("cache", ["fp32", "bf16", "bf16-fp32q", "int8-fp32q", "int8-bf16q"])
def test_long_contexts_the_same_bits_whatever_the_batch(heads, kv_heads, cache):
    # Long contexts (1-5k tokens beside short ones): right against the reference, and the same
    # bits for a sequence alone, in a batch, and on one thread or two, so a request's greedy
    # tokens do not depend on what it is batched with. A float cache's contexts over 512
    # tokens are cut into an even count of equal chunks merged after (528: 2 of 17 and 16
    # blocks; 1025: 4 of 16-17; 2100: 6 of 22; 5000: the most, 8 of 39-40): by the context
    # alone, and merged in the same order whichever thread merges (one thread: the one that
    # computed the chunks; two: after the parallel loop, for a sequence alone). Three threads:
    # the threads' ranges of work items, cut by their cost, meet where one item is most of the
    # work.
    lens = [1500, 1025, 1024, 2100, 40, 1, 5000, 528]
    head_dim = 64
    scale = head_dim**-0.5
    if cache.startswith("int8"):
        qdtype = torch.float32 if cache.endswith("fp32q") else torch.bfloat16
        q, kv, tables, ctx = int8_case(heads, kv_heads, head_dim, 16, lens, qdtype)
        ref = dequantized_sdpa(q, kv, tables, ctx, scale)
        if paged_attention.quantizes_int8_queries(head_dim):  # AVX-512 VNNI: int8 queries
            ref = quantized_query_sdpa(q, kv, tables, ctx, scale)
    else:
        dtype = torch.float32 if cache == "fp32" else torch.bfloat16
        q, kv, tables, ctx = random_case(dtype, heads, kv_heads, head_dim, 16, lens)
        if cache == "bf16-fp32q":
            q = q.float()
        ref = gather_sdpa(q, kv, tables, ctx, scale)
    got = paged_attention.paged_decode_attention(q, kv, tables, ctx, scale)
    tol = 2e-5 if got.dtype == torch.float32 else 1.6e-2
    if cache.startswith("int8") and paged_attention.quantizes_int8_queries(head_dim):
        tol = max(tol, 3e-4)  # the int16 softmax weights (test_kv_int8.py)
    assert (got.float() - ref).abs().max().item() <= tol
    for i in range(len(lens)):
        alone = paged_attention.paged_decode_attention(
            q[i : i + 1], kv, tables[i : i + 1], ctx[i : i + 1], scale
        )
        assert torch.equal(alone, got[i : i + 1]), lens[i]
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            other = paged_attention.paged_decode_attention(q, kv, tables, ctx, scale)
            assert torch.equal(other, got), threads
            # One long sequence beside one token: all but one item is the long one's.
            pair = paged_attention.paged_decode_attention(q[5:7], kv, tables[5:7], ctx[5:7], scale)
            assert torch.equal(pair, got[5:7]), threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("head_dim", [16, 32, 40, 80, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2)])
def test_head_dims(head_dim, dtype, tol):
    # 16/32/64/128 take the register-blocked value sums; others (40: a 16-lane loop plus a
    # scalar tail) the generic loops.
    q, kv, tables, ctx = random_case(dtype, 4, 2, head_dim, 16, [3, 40, 129])
    got = paged_attention.paged_decode_attention(q, kv, tables, ctx, head_dim**-0.5)
    ref = gather_sdpa(q, kv, tables, ctx, head_dim**-0.5)
    assert (got.float() - ref).abs().max().item() <= tol


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kv_heads", [8, 4, 3])
def test_single_sequence_split_over_kv_heads(kv_heads, threads):
    # Batch 1: the kernel splits the kv heads into runs (2 per thread, at most one head each),
    # including an uneven last run (1 thread: 3 kv heads in runs of 2).
    q, kv, tables, ctx = random_case(torch.float32, 2 * kv_heads, kv_heads, 32, 16, [77])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = paged_attention.paged_decode_attention(q, kv, tables, ctx, 0.2)
    finally:
        torch.set_num_threads(before)
    assert (got - gather_sdpa(q, kv, tables, ctx, 0.2)).abs().max().item() <= 2e-5


def test_only_each_sequences_own_tokens_count():
    # Slots past a sequence's length hold garbage (here: huge values): they must not leak in.
    q, kv, tables, ctx = random_case(torch.float32, 4, 2, 32, 16, [5, 20])
    ref = gather_sdpa(q, kv, tables, ctx, 32**-0.5)
    flat = kv.view(-1, 16, 2, 2, 32)
    flat[tables[0, 0], 5:] = 1e4
    flat[tables[1, 1], 4:] = -1e4
    flat[tables[0, 1:]] = 1e4  # blocks of the table past the context
    got = paged_attention.paged_decode_attention(q, kv, tables, ctx, 32**-0.5)
    assert (got - ref).abs().max().item() <= 2e-5


def test_out_of_range_lengths_and_blocks_are_refused():
    q, kv, tables, ctx = random_case(torch.float32, 2, 1, 16, 16, [20, 5])
    with pytest.raises(RuntimeError, match="context length"):
        paged_attention.paged_decode_attention(q, kv, tables, torch.tensor([33, 5]), 1.0)
    with pytest.raises(RuntimeError, match="context length"):
        paged_attention.paged_decode_attention(q, kv, tables, torch.tensor([20, 0]), 1.0)
    bad = tables.clone()
    bad[0, 1] = kv.shape[0]
    with pytest.raises(RuntimeError, match="block id"):
        paged_attention.paged_decode_attention(q, kv, bad, ctx, 1.0)


def test_decode_batch_carries_context_lens():
    tables = [[3, 1], [2]]
    decode = build_ragged_batch(
        [_Chunk("a", [5], 20, tables[0]), _Chunk("b", [6], 3, tables[1])], tables, 16
    )
    assert decode.meta.context_lens.tolist() == [21, 4]
    prefill = build_ragged_batch(
        [_Chunk("a", [5, 6], 0, tables[0]), _Chunk("b", [6], 3, tables[1])], tables, 16
    )
    assert prefill.meta.context_lens is None  # mixed steps keep the gather path


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_model_decode_takes_kernel_and_matches_gather(tmp_path, arch):
    # Greedy decode through the model, once with the kernel and once forced onto the gather
    # path: same tokens as transformers both ways, and the kernel really ran in the first.
    hf = save_tiny_hf_model(arch, tmp_path)
    model, _ = load_model(tmp_path, dtype="float32")
    prompt = list(range(3, 300, 7))
    expected = hf_greedy(hf, prompt, 24)
    calls = paged_attention.kernel_calls()
    assert greedy(model, prompt, 24) == expected
    layers = model.config.num_hidden_layers
    # 23 decode steps (the first token comes from the prefill), every layer.
    assert paged_attention.kernel_calls() - calls == 23 * layers
    paged_attention.use_kernel(False)
    try:
        calls = paged_attention.kernel_calls()
        assert greedy(model, prompt, 24) == expected
        assert paged_attention.kernel_calls() == calls
    finally:
        paged_attention.use_kernel(True)


def test_gather_forced_by_environment_and_off_cpu(monkeypatch):
    monkeypatch.setenv(paged_attention.ENV_MODE, "gather")
    assert not paged_attention._State().enabled
    monkeypatch.setenv(paged_attention.ENV_MODE, "kernel")
    assert paged_attention._State().enabled
    # Other devices keep the gather path (the kernel is a CPU operator).
    assert not paged_attention.applies(torch.empty(2, 16, 2, 1, 8, device="meta"))
    assert not paged_attention.applies(torch.empty(2, 16, 2, 1, 8, dtype=torch.float16))
    assert paged_attention.applies(torch.empty(2, 16, 2, 1, 8))


def test_unbuildable_kernel_falls_back_with_one_warning(monkeypatch, caplog):
    state = paged_attention._State()
    monkeypatch.setattr(paged_attention, "_state", state)

    def no_compiler():
        raise RuntimeError("command 'c++' failed: No such file or directory")

    monkeypatch.setattr(paged_attention, "_load", no_compiler)
    kv = torch.zeros(2, 16, 2, 1, 8)
    with caplog.at_level("WARNING", logger="carpool.model.paged_attention"):
        assert not paged_attention.applies(kv)
        assert not paged_attention.applies(kv)  # tried once, not per call
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No such file" in warnings[0].getMessage()


def test_engine_batch_decodes_through_kernel(tmp_path):
    # The engine's continuous batching (ragged decode steps of sequences of different lengths,
    # prefill chunks mixed in) gives transformers' greedy tokens with the kernel in the loop.
    from carpool import LLM, SamplingParams

    hf = save_tiny_model_dir("llama", tmp_path)
    prompts = [list(range(3, 3 + 7 * n, 7)) for n in (1, 15, 16, 17, 40)]
    llm = LLM(tmp_path, dtype="float32", max_num_batched_tokens=64, max_num_seqs=8)
    calls = paged_attention.kernel_calls()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert paged_attention.kernel_calls() > calls
    for p, o in zip(prompts, outs, strict=True):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 20), f"prompt of {len(p)} tokens"


def test_stale_build_lock_is_removed(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    kernel_build.drop_stale_lock(lock)
    assert lock.exists()  # fresh: another process may be building
    old = time.time() - 3600
    os.utime(lock, (old, old))
    kernel_build.drop_stale_lock(lock)
    assert not lock.exists()


def test_a_cached_build_loads_without_cpp_extension():
    # A finished build is loaded as it is: torch.utils.cpp_extension (and setuptools with it)
    # stays unimported, 4-5 MiB and ~0.3 s per process. Both built here first if need be.
    assert paged_attention.kernel() is not None and fused_ops.load()
    code = (
        "import sys, torch; from carpool.model import fused_ops, paged_attention; "
        "assert paged_attention.kernel() is not None and fused_ops.load(); "
        "print('torch.utils.cpp_extension' in sys.modules, 'setuptools' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_a_cached_build_that_does_not_load_is_built_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CARPOOL_KERNEL_CACHE", str(tmp_path))
    source = Path(paged_attention.__file__).parent / "csrc" / "paged_attention.cpp"
    name = kernel_build._build_name("carpool_test_cut", source)
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").write_bytes(b"cut short")  # a killed build's leftover
    built = []
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append(kw["name"]))
    with caplog.at_level(logging.WARNING, logger=kernel_build.log.name):
        kernel_build.load_library("carpool_test_cut", source)
    assert built == [name]
    assert "did not load" in caplog.text


def test_a_build_leaves_the_flags_and_later_build_names_as_they_were(tmp_path, monkeypatch):
    # torch's cpp_extension.load appends its -L/-l flags to the list it is given: built with the
    # module's own lists, every later build name in that process changed, and a fresh process
    # compiled those kernels again instead of loading them (found by the test above).
    monkeypatch.setenv("CARPOOL_KERNEL_CACHE", str(tmp_path))
    source = Path(paged_attention.__file__).parent / "csrc" / "paged_attention.cpp"
    before = kernel_build._build_name("carpool_test_flags", source)
    from torch.utils import cpp_extension

    def fake_load(**kw):  # what torch does to the lists it is handed
        kw["extra_ldflags"].append("-ltorch")
        kw["extra_cflags"].append("-DEXTRA")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    kernel_build.load_library("carpool_test_flags", source)
    assert kernel_build._build_name("carpool_test_flags", source) == before


def test_mixed_step_marks_generated_rows_for_the_kernel():
    tables = [[3, 1], [2]]
    chunks = [_Chunk("a", [5], 20, tables[0]), _Chunk("b", [6, 7, 8], 0, tables[1])]
    mixed = build_ragged_batch(chunks, tables, 16, generated_from=[20, 3])
    assert mixed.meta.kernel_rows.tolist() == [0]  # a's generated token; b's prompt is gathered
    assert mixed.meta.context_lens.tolist() == [21]
    assert mixed.meta.kernel_tables.tolist() == [[3, 1]]
    # A recompute after a preemption: its generated positions are kernel rows too.
    recompute = build_ragged_batch([_Chunk("a", [1, 2, 3, 4], 0, [4])], [[4]], 16, "cpu", [2])
    assert recompute.meta.kernel_rows.tolist() == [2, 3]
    assert recompute.meta.context_lens.tolist() == [3, 4]


def test_the_padded_layout_routes_real_rows_as_the_ragged_batch_does():
    # The padded rectangle (pads through the model) gives its real rows the ragged batch's
    # attention: generated tokens through the kernel, prompt rows in the same tile calls (a
    # call's shape follows from its positions alone), a pure decode step wholly through the
    # kernel, idle seats over the scratch block.
    tables = [[3, 1], [2, 5, 6]]
    chunks = [_Chunk("a", [5], 20, tables[0]), _Chunk("b", [6] * 40, 0, tables[1])]
    padded = build_padded_batch(chunks, tables, 16, 9, 1, "cpu", [20, 40])
    ragged = build_ragged_batch(chunks, tables, 16, "cpu", [20, 40])
    assert padded.num_tokens == 3 * 40
    assert padded.meta.kernel_rows.tolist() == [0]  # a's generated token, row 0 position 0
    assert padded.meta.context_lens.tolist() == ragged.meta.context_lens.tolist() == [21]
    assert padded.meta.kernel_tables.tolist() == [[3, 1, 9]]
    (part,) = ragged.meta.parts  # b's prompt chunk: one rectangle, a left out
    # a's row reaches position 59 (pads continue it): tiles to position 64; b's calls among them.
    assert part.query_chunks == ((0, 32, 32), (32, 64, 64))
    assert set(part.query_chunks) <= set(padded.meta.query_chunks)
    assert padded.meta.query_chunks == ((0, 32, 32), (32, 64, 64))
    # Every real token's rectangle row is its position; pads write only the scratch block.
    assert padded.meta.slot_mapping.view(3, 40)[2].eq(9 * 16).all()
    assert padded.meta.slot_mapping.view(3, 40)[0, 1:].eq(9 * 16).all()
    decode = build_padded_batch(
        [_Chunk("a", [5], 20, tables[0]), _Chunk("b", [7], 40, tables[1])],
        tables,
        16,
        9,
        1,
        "cpu",
        [20, 40],
    )
    assert decode.meta.attn_mask is None and decode.meta.kernel_rows is None
    assert decode.meta.context_lens.tolist() == [21, 41, 1]  # the idle seat: key 0 of block 9
    assert decode.meta.block_tables[2].eq(9).all()
    # A row deep in its decode beside a new prompt: a rectangle of its own for each row (one
    # over both would span positions 0-2,080 in every row), each in its own tiles' calls.
    far = [list(range(130)), [2, 5, 6]]
    mixed = build_padded_batch(
        [_Chunk("a", [5], 2000, far[0]), _Chunk("b", [6] * 40, 0, far[1])],
        far,
        16,
        9,
        0,
        "cpu",
        [1990, 40],
    )
    assert mixed.meta.attn_mask is None and len(mixed.meta.parts) == 2
    a, b = mixed.meta.parts
    assert a.gathered_rows.tolist() == list(range(40)) and a.query_chunks[0][2] == 2016
    assert b.gathered_rows.tolist() == list(range(40, 80))
    assert b.query_chunks == ((0, 32, 32), (32, 64, 64))
    assert mixed.meta.kernel_rows.tolist() == [0] and mixed.meta.context_lens.tolist() == [2001]


def test_a_decode_row_computes_the_same_alone_or_beside_a_prefill(tmp_path):
    # bf16, where the kernel and gather + SDPA round differently: the decode row of sequence a
    # must give bit-identical logits in a pure decode step and in a step mixed with b's prefill
    # (the scheduler decides which; the greedy tokens must not depend on it).
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="bfloat16")
    caches = model.allocate_kv_cache(8, 16, torch.bfloat16, "cpu")
    prompt_a, table_a, table_b = list(range(3, 23)), [1, 2], [3]
    with torch.no_grad():
        pre = build_ragged_batch([_Chunk("a", prompt_a, 0, table_a)], [table_a], 16)
        model(pre.input_ids, pre.positions, pre.meta, caches, pre.logits_indices)

        def step(chunks, tables, prompts):
            state = [c.clone() for c in caches]
            inp = build_ragged_batch(chunks, tables, 16, "cpu", prompts)
            return model(inp.input_ids, inp.positions, inp.meta, state, inp.logits_indices)

        calls = paged_attention.kernel_calls()
        alone = step([_Chunk("a", [7], 20, table_a)], [table_a], [20])
        mixed = step(
            [_Chunk("a", [7], 20, table_a), _Chunk("b", [9, 4, 11, 5, 6], 0, table_b)],
            [table_a, table_b],
            [20, 5],
        )
    assert paged_attention.kernel_calls() - calls == 2 * model.config.num_hidden_layers
    assert torch.equal(alone[0], mixed[0])


def test_decode_sequences_stay_out_of_a_mixed_steps_rectangle():
    # a and c decode (one generated token each), b prefills 3 prompt tokens: the [B, Q, L]
    # rectangle covers b alone (its first tile: 1 x 32 x 32), not the decode rows too.
    tables = [[3, 1], [2], [5, 6]]
    chunks = [_Chunk("a", [5], 20, tables[0]), _Chunk("b", [6, 7, 8], 0, tables[1])]
    chunks.append(_Chunk("c", [9], 17, tables[2]))
    mixed = build_ragged_batch(chunks, tables, 16, "cpu", [20, 3, 17])
    meta = mixed.meta
    assert meta.attn_mask is None and len(meta.parts) == 1
    (part,) = meta.parts
    assert part.gathered_rows.tolist() == [1, 2, 3]
    assert part.block_tables.tolist() == [[2, 0]]  # the tile's keys: past the table, masked
    assert tuple(part.attn_mask.shape) == (1, 1, 32, 32)
    assert part.output_index.tolist() == [0, 1, 2]
    assert part.query_index[0, :4].tolist() == [0, 1, 2, 2]  # padding rows: a row of b's
    assert meta.kernel_rows.tolist() == [0, 4]
    assert meta.context_lens.tolist() == [21, 18]
    assert meta.kernel_tables.tolist() == [[3, 1], [5, 6]]
    # Every sequence a prompt chunk: the rectangle covers every row, as before.
    prompts = build_ragged_batch(chunks[1:2] + [_Chunk("d", [1, 2], 0, [7])], [[2], [7]], 16)
    assert prompts.meta.parts is None and prompts.meta.block_tables.shape == (2, 2)


def test_a_short_chunk_at_a_long_context_gets_a_rectangle_of_its_own():
    # 16 prompt tokens at position 1,900 beside a new 496-token prompt: one rectangle would
    # span tiles 0-59 for both (mostly padding), so each prompt chunk gets its own (its tile
    # 1,888-1,919; tiles 0-15); the decode row stays out of both. Prompts of one length keep
    # one rectangle.
    long_table, new_table = list(range(1, 122)), list(range(200, 232))
    chunks = [
        _Chunk("long", list(range(16)), 1900, long_table),
        _Chunk("dec", [5], 20, [300, 301]),
        _Chunk("new", list(range(3, 499)), 0, new_table),
    ]
    tables = [long_table, [300, 301], new_table]
    inp = build_ragged_batch(chunks, tables, 16, "cpu", [1916, 20, 496])
    meta = inp.meta
    assert meta.attn_mask is None and len(meta.parts) == 2
    assert meta.parts[0].gathered_rows.tolist() == list(range(16))
    assert meta.parts[1].gathered_rows.tolist() == list(range(17, 513))
    assert tuple(meta.parts[0].attn_mask.shape) == (1, 1, 32, 1920)
    assert tuple(meta.parts[1].attn_mask.shape) == (1, 1, 512, 512)
    assert meta.parts[0].query_chunks == ((0, 32, 1920),)
    assert meta.parts[0].block_tables.tolist() == [long_table[:120]]
    assert meta.parts[1].block_tables.tolist() == [new_table[:32]]
    covered = [r for part in meta.parts for r in part.gathered_rows.tolist()]
    assert meta.kernel_rows.tolist() == [16] and covered == [*range(16), *range(17, 513)]
    same = [_Chunk("x", list(range(32)), 0, [1, 2]), _Chunk("y", list(range(32)), 0, [3, 4])]
    one = build_ragged_batch(same, [[1, 2], [3, 4]], 16, "cpu", [32, 32])
    assert one.meta.parts is None and tuple(one.meta.attn_mask.shape) == (1, 1, 32, 32)
    assert one.meta.block_tables.shape == (2, 2)


@pytest.mark.parametrize("kernel", [True, False])
def test_a_mixed_step_computes_each_sequence_as_alone(tmp_path, kernel):
    # Two decoding sequences beside a prefill: each row's logits are the bits of its sequence
    # computed alone, with the paged kernel and without it (where the decode rows left out of
    # the rectangle take a pure decode step's gather). bf16: carpool's linears give a row the
    # same bits at any row count (float32's sgemm does not).
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype="bfloat16")
    caches = model.allocate_kv_cache(64, 16, torch.bfloat16, "cpu")
    prompts = {"a": list(range(3, 23)), "c": list(range(40, 57))}
    tables = {"a": [1, 2], "b": [3], "c": [4, 5]}
    paged_attention.use_kernel(kernel)
    try:
        with torch.no_grad():
            for rid, prompt in prompts.items():
                pre = build_ragged_batch([_Chunk(rid, prompt, 0, tables[rid])], [tables[rid]], 16)
                model(pre.input_ids, pre.positions, pre.meta, caches, pre.logits_indices)

            def step(chunks, prompt_lens):
                state = [c.clone() for c in caches]
                tabs = [tables[c.request_id] for c in chunks]
                inp = build_ragged_batch(chunks, tabs, 16, "cpu", prompt_lens)
                return model(inp.input_ids, inp.positions, inp.meta, state, inp.logits_indices)

            a, c = _Chunk("a", [7], 20, tables["a"]), _Chunk("c", [8], 17, tables["c"])
            b = _Chunk("b", [9, 4, 11, 5, 6], 0, tables["b"])
            calls = paged_attention.kernel_calls()
            mixed = step([a, b, c], [20, 5, 17])
            layers = model.config.num_hidden_layers
            assert paged_attention.kernel_calls() - calls == (layers if kernel else 0)
            alone = [step([a], [20])[0], step([b], [5])[0], step([c], [17])[0]]
            # A long prompt's last chunk beside a new prompt and a decode row: a rectangle of
            # its own for each chunk (batch.rectangle_groups), the same bits as alone.
            long_prompt = [(7 * i) % 250 + 3 for i in range(616)]
            tables["l"] = list(range(12, 51))
            pre = build_ragged_batch(
                [_Chunk("l", long_prompt[:600], 0, tables["l"])], [tables["l"]], 16
            )
            model(pre.input_ids, pre.positions, pre.meta, caches, pre.logits_indices)
            tail = _Chunk("l", long_prompt[600:], 600, tables["l"])
            tables["n"] = list(range(51, 64))
            new = _Chunk("n", list(range(3, 203)), 0, tables["n"])
            inp = build_ragged_batch(
                [tail, a, new], [tables["l"], tables["a"], tables["n"]], 16, "cpu", [616, 20, 200]
            )
            assert inp.meta.parts is not None and len(inp.meta.parts) == 2
            split = step([tail, a, new], [616, 20, 200])
            split_alone = [step([tail], [616])[0], alone[0], step([new], [200])[0]]
    finally:
        paged_attention.use_kernel(True)
    for k in range(3):
        assert torch.equal(mixed[k], alone[k]), k
        assert torch.equal(split[k], split_alone[k]), k


def test_a_long_prompts_attention_runs_in_tiles(tmp_path, monkeypatch):
    # A 300-token prompt's causal square in tiles of 32 rows (batch.PREFILL_TILE_ROWS), each
    # call over the keys to its tile's end: float32 logits within rounding of one SDPA call over
    # the square; in bf16 two prompts in one step compute the bits of each alone.
    save_tiny_hf_model("llama", tmp_path)
    prompts = {
        "a": [(7 * i) % 250 + 3 for i in range(300)],
        "b": [(5 * i) % 240 + 4 for i in range(300)],
    }
    tables = {"a": list(range(1, 20)), "b": list(range(20, 39))}

    def step(model, caches, rids):
        chunks = [_Chunk(r, prompts[r], 0, tables[r]) for r in rids]
        inp = build_ragged_batch(chunks, [tables[r] for r in rids], 16)
        out = model(
            inp.input_ids, inp.positions, inp.meta, [c.clone() for c in caches], inp.logits_indices
        )
        return inp.meta.query_chunks, out

    model, _ = load_model(tmp_path, dtype="float32")
    caches = model.allocate_kv_cache(40, 16, torch.float32, "cpu")
    with torch.no_grad():
        chunked, rows = step(model, caches, ["a"])
        monkeypatch.setattr(batch_module, "PREFILL_TILE_ROWS", 512)
        one, square = step(model, caches, ["a"])
        monkeypatch.undo()
    assert chunked == tuple((p, p + 32, p + 32) for p in range(0, 320, 32))
    assert one == ((0, 512, 512),)
    torch.testing.assert_close(rows, square, rtol=0, atol=2e-5)

    model, _ = load_model(tmp_path, dtype="bfloat16")
    caches = model.allocate_kv_cache(40, 16, torch.bfloat16, "cpu")
    with torch.no_grad():
        calls, both = step(model, caches, ["a", "b"])
        alone = [step(model, caches, [r])[1][0] for r in ("a", "b")]
    assert len(calls) == 10
    assert torch.equal(both[0], alone[0]) and torch.equal(both[1], alone[1])


@pytest.mark.parametrize(
    "src,cache", [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")]
)
def test_kv_store_writes_what_index_copy_writes(src, cache):
    # carpool::kv_store (a memcpy per token and kv head) against the index_copy_ it replaced,
    # from a strided [T, 2, K, D] view into a fused qkv row as the layers pass it: a float32
    # cache's slots as rows; a bfloat16 cache's blocks in kv_layout's block layout, the rows
    # index_copy_ wrote put in that layout, and what kv_layout.store (torch ops) writes. Nine
    # tokens: on two or more threads split between them (4 a thread at least), words of one
    # block's lines written by both.
    g = torch.Generator().manual_seed(5)
    sdt, cdt = getattr(torch, src), getattr(torch, cache)
    qkv = torch.randn(9, 8 + 2 * 2, 32, generator=g).to(sdt)
    new_kv = qkv[:, 8:].view(9, 2, 2, 32)
    slots = torch.tensor([0, 17, 3, 30, 9, 12, 31, 1, 20])
    rows = torch.randn(2, 16, 2, 2, 32, generator=g).to(cdt)
    a = rows if cdt == torch.float32 else kv_layout.to_blocks(rows)
    b = rows.clone()
    torch_ops = a.clone()
    paged_attention.store(a, slots, new_kv)
    b.view(-1, 2, 2, 32).index_copy_(0, slots, new_kv.to(cdt))
    if cdt == torch.bfloat16:
        assert not torch.equal(a, b)  # (the layouts differ: the comparison below means it)
        b = kv_layout.to_blocks(b)
        kv_layout.store(torch_ops, slots, new_kv)
        assert torch.equal(a, torch_ops)
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="slot"):
        torch.ops.carpool.kv_store(new_kv, a, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 32]))
    with pytest.raises(RuntimeError, match="dtype|float32 or bfloat16"):
        torch.ops.carpool.kv_store(new_kv.to(torch.float16), a, slots)


@pytest.mark.usefixtures("kernels_at_every_row_count")
@pytest.mark.parametrize("bf16_rectangle", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_prompts_rows_are_the_same_bits_however_it_is_chunked(
    tmp_path, monkeypatch, seed, bf16_rectangle
):
    # The default model's setup at SmolLM2's attention shape (9 heads over 3 KV heads of 64): a
    # Q4_1 GGUF file, float32 activations, a bf16 cache (the rectangles' SDPA in float32 over
    # widened K/V, or in bf16 as on AMX: attention.BF16_PROMPT_ATTENTION), the int4 kernel at
    # every row count. A 400-token prompt in one step, cut into chunks at random places, and
    # beside another prompt: torch's CPU SDPA rounds a row differently in calls of other row or
    # key counts, and the int4 kernel's bf16-rounded inputs carry that on; in tiles at fixed
    # positions (batch.PREFILL_TILE_ROWS) every row's call is the same, so are its logits (every
    # row's, to see any row's attention).
    from helpers.gguf_export import export_hf_to_gguf

    monkeypatch.setattr(attention, "BF16_PROMPT_ATTENTION", bf16_rectangle)

    rng = random.Random(seed)
    hf = tmp_path / "hf"
    save_tiny_model_dir(
        "llama",
        hf,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=4,
    )
    gguf = export_hf_to_gguf(hf, tmp_path / "m.gguf", "Q4_1", tokenizer=hf)
    model, _ = load_model(gguf)
    fused_ops.load()
    n = 400
    prompt = [rng.randrange(3, 320) for _ in range(n)]
    table, other_table = list(range(1, 27)), list(range(30, 40))

    def logits(cuts: list[int], beside: int = 0) -> torch.Tensor:
        caches = model.allocate_kv_cache(48, 16, torch.bfloat16, "cpu")
        bounds, outs = [0, *cuts, n], []
        with torch.no_grad():
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                chunks = [_Chunk("p", prompt[lo:hi], lo, table)]
                if beside:
                    chunks.append(_Chunk("o", list(range(5, 5 + beside)), 0, other_table))
                inp = build_ragged_batch(chunks, [c.block_table for c in chunks], 16)
                rows = torch.arange(hi - lo)  # every row of the prompt's chunk (first in the step)
                outs.append(model(inp.input_ids, inp.positions, inp.meta, caches, rows))
        return torch.cat(outs)

    whole = logits([])
    assert torch.equal(logits(sorted(rng.sample(range(1, n), 3))), whole)
    assert torch.equal(logits([rng.randrange(100, 300)], beside=rng.randrange(20, 150)), whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prompt_rows_below_kernel_below_compute_the_same_bits_however_chunked(tmp_path, dtype):
    # kernel_below=64 (paged_attention.prompt_kernel_positions): a 100-token prompt's rows 0-63
    # take the paged kernel, 64-99 the rectangle. Its last row's logits are the same bits in
    # one chunk, in three (the kernel's rows and the rectangle's split differently), and beside
    # another prompt; and they agree with every row in the rectangle (the other path's
    # rounding). The bits are compared in bf16, where carpool's linears give a row the same bits
    # at any row count (float32's sgemm does not); float32 checks the agreement.
    save_tiny_hf_model("llama", tmp_path)
    model, _ = load_model(tmp_path, dtype=dtype)
    prompt = [(5 * i) % 200 + 3 for i in range(100)]
    other = list(range(3, 43))
    tables = {"p": list(range(1, 8)), "o": [20, 21, 22]}
    layers = model.config.num_hidden_layers

    def last_logits(splits, kernel_below, with_other=False):
        caches = model.allocate_kv_cache(32, 16, dtype, "cpu")
        length, pos = sum(splits), 0
        with torch.no_grad():
            for n in splits:
                chunks = [_Chunk("p", prompt[pos : pos + n], pos, tables["p"])]
                if with_other and pos == 0:
                    chunks.append(_Chunk("o", other, 0, tables["o"]))
                inp = build_ragged_batch(
                    chunks,
                    [tables[c.request_id] for c in chunks],
                    16,
                    "cpu",
                    [length, len(other)][: len(chunks)],
                    kernel_below=kernel_below,
                )
                out = model(inp.input_ids, inp.positions, inp.meta, caches, inp.logits_indices)
                pos += n
        return out[0]

    calls = paged_attention.kernel_calls()
    one = last_logits([100], 64)
    assert paged_attention.kernel_calls() - calls == layers  # the prompt rows took the kernel
    if dtype == torch.bfloat16:
        assert torch.equal(one, last_logits([30, 40, 30], 64))
        assert torch.equal(one, last_logits([100], 64, with_other=True))
        assert torch.equal(one, last_logits([64, 36], 64))
        # A 40-token prompt: every row a kernel row (a pure decode step's form).
        short = last_logits([40], 64)
        assert torch.equal(short, last_logits([25, 15], 64))
        assert torch.equal(short, last_logits([40], 64, with_other=True))
    rectangle = last_logits([100], 0)
    scale = rectangle.float().abs().max().item()
    tol = 2e-2 * scale if dtype == torch.bfloat16 else 1e-5 * scale  # bf16 rounding, 2 layers
    torch.testing.assert_close(one.float(), rectangle.float(), atol=tol, rtol=0)


def test_prompt_kernel_positions_follow_the_kernel_and_the_cache(monkeypatch):
    # 512 tokens a query head of a kv head, 128 on an AMX CPU (its SDPA on tiles).
    tokens = paged_attention.PROMPT_KERNEL_TOKENS
    assert tokens == (128 if kernel_build.amx_tiles() else 512)
    bf16 = torch.empty(4, 16, 2, 2, 64, dtype=torch.bfloat16)
    # Grouped heads over a bfloat16 cache without AMX: every prompt row at any position.
    assert paged_attention.GROUPED_PROMPT_ROWS_IN_KERNEL is not kernel_build.amx_tiles()
    for in_kernel in (True, False):
        monkeypatch.setattr(paged_attention, "GROUPED_PROMPT_ROWS_IN_KERNEL", in_kernel)
        every = paged_attention.EVERY_PROMPT_ROW
        got = paged_attention.prompt_kernel_positions(bf16, torch.bfloat16, 8, 2)
        assert got == (every if in_kernel else 4 * tokens)
        got = paged_attention.prompt_kernel_positions(bf16, torch.float32, 9, 3)
        assert got == (every if in_kernel else 3 * tokens)
        # One query head a kv head keeps the cut-off.
        assert paged_attention.prompt_kernel_positions(bf16, torch.bfloat16, 8, 8) == tokens
    fp32 = torch.empty(4, 16, 2, 2, 64, dtype=torch.float32)
    assert paged_attention.prompt_kernel_positions(fp32, torch.float32, 8, 2) == 4 * tokens // 2
    # An int8 cache's kernel rounds queries to int8: its prompt rows keep the rectangle.
    int8 = torch.empty(4, 16, 2, 2, 68, dtype=torch.int8)
    assert paged_attention.prompt_kernel_positions(int8, torch.bfloat16, 8, 2) == 0
    paged_attention.use_kernel(False)
    try:
        assert paged_attention.prompt_kernel_positions(bf16, torch.bfloat16, 8, 2) == 0
    finally:
        paged_attention.use_kernel(True)


def test_the_padded_layout_routes_rows_below_kernel_below_as_the_ragged_batch_does():
    # kernel_below=32: b's prompt rows at positions 0-31 are kernel rows in both layouts; the
    # padded rectangles start at position 32 in every row (a's pads 32-59, b's rows 32-39, the
    # idle seat's pads), in the same tile call as the ragged batch's rectangle over b's rows.
    tables = [[3, 1], [2, 5, 6]]
    chunks = [_Chunk("a", [5], 20, tables[0]), _Chunk("b", [6] * 40, 0, tables[1])]
    padded = build_padded_batch(chunks, tables, 16, 9, 1, "cpu", [20, 40], kernel_below=32)
    ragged = build_ragged_batch(chunks, tables, 16, "cpu", [20, 40], kernel_below=32)
    assert padded.meta.kernel_rows.tolist() == [0, *range(40, 72)]
    assert ragged.meta.kernel_rows.tolist() == list(range(33))
    assert padded.meta.context_lens.tolist() == ragged.meta.context_lens.tolist()
    assert ragged.meta.context_lens.tolist() == [21, *range(1, 33)]
    (part,) = padded.meta.parts
    assert part.gathered_rows.tolist() == [*range(12, 40), *range(72, 80), *range(112, 120)]
    (ragged_part,) = ragged.meta.parts
    assert ragged_part.gathered_rows.tolist() == list(range(33, 41))
    assert part.query_chunks == ragged_part.query_chunks == ((0, 32, 64),)
    # Every row below the cutoff: no rectangle at all (the pads' attention is zeros).
    short = [_Chunk("a", [5], 20, tables[0]), _Chunk("b", [6] * 10, 0, tables[1])]
    low = build_padded_batch(short, tables, 16, 9, 0, "cpu", [20, 10], kernel_below=32)
    assert low.meta.parts == [] and low.meta.attn_mask is None
    assert low.meta.kernel_rows.tolist() == [0, *range(10, 20)]
