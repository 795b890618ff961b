"""Many requests through one engine give each request's transformers greedy tokens."""

from __future__ import annotations

import pytest

from carpool import LLM, LLMEngine, SamplingParams
from carpool.config import EngineConfig
from carpool.model import paged_attention
from helpers.hf_models import first_difference
from helpers.tiny import NEW_TOKENS

GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def _check(tiny, prompts, token_lists) -> None:
    for p, got in zip(prompts, token_lists, strict=True):
        expected = tiny.reference(p)
        assert got == expected, f"prompt of {len(p)} tokens: " + first_difference(got, expected)


@pytest.mark.parametrize("prompt_kernel_tokens", [None, 16, 0], ids=["default", "16", "none"])
def test_all_at_once_matches_transformers(tiny, device, prompt_kernel_tokens, monkeypatch):
    # Prompt rows below paged_attention.prompt_kernel_positions take the paged kernel, the rest
    # the rectangle's SDPA tiles: the tiny model's prompts (1-330 tokens) lie all below the
    # default cutoff, across it at 16 tokens a query head of a kv head (8 over this float32
    # cache: prompts past 16 tokens), and all in rectangles at 0.
    if prompt_kernel_tokens is not None:
        monkeypatch.setattr(paged_attention, "PROMPT_KERNEL_TOKENS", prompt_kernel_tokens)
    llm = LLM(
        tiny.path, dtype="float32", device=device, max_num_batched_tokens=128, max_num_seqs=16
    )
    outs = llm.generate(tiny.prompts, GREEDY, use_tqdm=False)
    _check(tiny, tiny.prompts, [o.outputs[0].token_ids for o in outs])
    assert llm.engine.stats.mean_batch_size > 4, llm.engine.stats.mean_batch_size
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


def test_staggered_arrivals_match_transformers(tiny, device):
    engine = LLMEngine(
        EngineConfig(
            model=tiny.path,
            dtype="float32",
            device=device,
            max_num_batched_tokens=96,
            max_num_seqs=8,
        )
    )
    pending = list(enumerate(tiny.prompts))
    results: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished():
        # A new request every other step, while the others decode.
        if pending and step % 2 == 0:
            i, p = pending.pop(0)
            engine.add_request(p, GREEDY, request_id=f"r{i}")
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    _check(tiny, tiny.prompts, [results[f"r{i}"] for i in range(len(tiny.prompts))])
    engine.block_manager.check_integrity()
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_preemption_loses_nothing(tiny_llama, device):
    tiny = tiny_llama
    prompts = tiny.prompts[:12]
    # 2 layers x 2 kv heads x 16 dims x 2 (K,V) x 4 bytes = 512 bytes per token.
    # 40 blocks of 16 tokens: the longest request (330 + 32) fits alone, 12 together do not.
    llm = LLM(
        tiny.path,
        dtype="float32",
        device=device,
        kv_cache_memory=40 * 16 * 512,
        max_num_batched_tokens=128,
        max_num_seqs=12,
    )
    assert llm.engine.num_blocks == 40
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check(tiny, prompts, [o.outputs[0].token_ids for o in outs])
    stats = llm.engine.policy.stats
    assert stats.num_preemptions > 0, "the budget was meant to force preemption"
    assert stats.num_recomputed_tokens > 0
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_free_blocks == 40


def test_long_prompt_does_not_stall_decodes(tiny_llama):
    engine = LLMEngine(
        EngineConfig(
            model=tiny_llama.path, dtype="float32", max_num_batched_tokens=64, max_num_seqs=16
        )
    )
    short = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    for i in range(8):
        engine.add_request(tiny_llama.prompts[i], short, request_id=f"d{i}")
    while any(len(engine.policy.get_request(f"d{i}").output_token_ids) == 0 for i in range(8)):
        engine.step()
    long_prompt = (tiny_llama.prompts[-1] * 4)[:1000]
    engine.add_request(long_prompt, SamplingParams(max_tokens=4, temperature=0), "long")
    prefill_steps = 0
    while engine.policy.get_request("long").num_output_tokens == 0:
        outs = {o.request_id: o for o in engine.step()}
        prefill_steps += 1
        for i in range(8):
            got = outs[f"d{i}"].outputs[0].delta_token_ids
            assert len(got) == 1, f"decoding request d{i} got {got} in prefill step {prefill_steps}"
    # 1000 tokens through a 64-token budget shared with 8 decodes: 56 per step.
    assert prefill_steps >= 1000 // 56


def test_seeded_sampling_independent_of_batch(tiny_llama):
    llm = LLM(tiny_llama.path, dtype="float32")
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm.generate([tiny_llama.prompts[5]], params, use_tqdm=False)[0]
    others = SamplingParams(max_tokens=20, temperature=1.0)
    mixed = llm.generate(
        tiny_llama.prompts[:5] + [tiny_llama.prompts[5]],
        [others] * 5 + [params],
        use_tqdm=False,
    )[-1]
    assert alone.outputs[0].token_ids == mixed.outputs[0].token_ids


def test_n_completions_and_logprobs(tiny_llama):
    llm = LLM(tiny_llama.path, dtype="float32")
    out = llm.generate(
        [tiny_llama.prompts[3]],
        SamplingParams(max_tokens=8, temperature=1.0, n=3, seed=7, logprobs=2),
        use_tqdm=False,
    )[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for o in out.outputs:
        assert len(o.token_ids) == 8 and o.finish_reason == "length"
        assert o.logprobs is not None and len(o.logprobs) == 8
        for lp, tok in zip(o.logprobs, o.token_ids, strict=True):
            assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 2
            assert lp.top[0][1] >= lp.top[1][1] >= lp.logprob or tok in (t for t, _ in lp.top)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1, "n seeded samples all equal"


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_a_prompt_beside_many_decoding_sequences_gives_the_same_bits_split(
    tiny_llama, quantization, monkeypatch
):
    # A prompt's chunk beside more than 32 decoding sequences of a model whose linears take one
    # kernel at any row count runs as two forwards (ModelRunner._ragged_parts): the decoding
    # rows as a pure decode step (the one-call stack), then the chunk's. Each row's numbers
    # follow from the row alone: the same tokens and logprobs, bit for bit, as one mixed step.
    from carpool.model import decode_stack

    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    prompts = [[3 + (7 * i + j) % 200 for j in range(2 + i % 5)] for i in range(40)]
    late = [[5 + j for j in range(24)], [9 + (2 * j) % 150 for j in range(40)]]

    def run() -> tuple[dict, int, int]:
        engine = LLMEngine(
            EngineConfig(
                model=tiny_llama.path,
                dtype="float32",
                quantization=quantization,
                max_num_seqs=48,
                max_num_batched_tokens=256,
            )
        )
        for i, p in enumerate(prompts):
            engine.add_request(p, params, request_id=f"r{i}")
        results, step = {}, 0
        while engine.has_unfinished():
            if step == 2:  # the 40 decode now; two prompts arrive beside them
                for i, p in enumerate(late):
                    engine.add_request(p, params, request_id=f"late{i}")
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].logprobs)
            step += 1
        plan = engine.runner.model.decode_plan
        return results, engine.runner.num_split_steps, plan.max_rows

    split, num_split, max_rows = run()
    assert len(split) == 42
    # Where the quantized kernels take every row count here (every AVX-512 BF16 or AVX2 CPU),
    # the stack takes 40 rows and the mixed step splits; elsewhere it stays whole.
    assert (num_split > 0) == (max_rows > 40), (num_split, max_rows)
    monkeypatch.setattr(decode_stack, "splits_mixed", lambda plan, rows: False)
    whole, none, _ = run()
    assert none == 0
    assert split == whole
