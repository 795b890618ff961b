"""A float32 model's prompt rectangles over a bf16 (or int8) cache in bf16
(``attention.BF16_PROMPT_ATTENTION``, on by default where the CPU has AMX): which steps take it,
that it changes only those rows' rounding, and that tokens agree with the float32 rectangles
and with ``transformers``."""

from __future__ import annotations

import pytest
import torch

from carpool.model import attention, kernel_build, paged_attention
from carpool.model.loader import load_model
from carpool.worker.batch import build_ragged_batch
from helpers.carpool_ref import _Chunk
from helpers.hf_models import hf_greedy, save_tiny_model_dir


def test_which_queries_and_caches_take_it(monkeypatch):
    f32, bf16 = torch.empty(2, 8), torch.empty(2, 8, dtype=torch.bfloat16)
    caches = {dt: torch.empty(4, 16, 2, 2, 64, dtype=dt) for dt in (torch.bfloat16, torch.int8)}
    caches[torch.float32] = torch.empty(4, 16, 2, 2, 64)
    monkeypatch.setattr(attention, "BF16_PROMPT_ATTENTION", None)  # the default: where AMX
    amx = kernel_build.amx_tiles()
    assert attention.bf16_prompt_attention(f32, caches[torch.bfloat16]) == amx
    monkeypatch.setattr(attention, "BF16_PROMPT_ATTENTION", True)
    assert attention.bf16_prompt_attention(f32, caches[torch.bfloat16])
    # Only float32 queries over a bf16 or int8 cache (an int8 one dequantized to bf16): a bf16
    # model's rectangle is bf16 already, a float32 cache keeps float32 attention.
    assert attention.bf16_prompt_attention(f32, caches[torch.int8])
    assert not attention.bf16_prompt_attention(bf16, caches[torch.bfloat16])
    assert not attention.bf16_prompt_attention(f32, caches[torch.float32])
    monkeypatch.setattr(attention, "BF16_PROMPT_ATTENTION", False)
    assert not attention.bf16_prompt_attention(f32, caches[torch.bfloat16])


def _prompt_logits(model, prompt: list[int], cache_dtype: torch.dtype, kernel_below: int = 0):
    """Logits of every row of ``prompt`` in one step (rows below ``kernel_below``: the kernel's)."""
    table = list(range(1, -(-len(prompt) // 16) + 1))
    caches = model.allocate_kv_cache(len(table) + 1, 16, cache_dtype, "cpu")
    chunks = [_Chunk("p", prompt, 0, table)]
    inp = build_ragged_batch(chunks, [table], 16, "cpu", [len(prompt)], kernel_below=kernel_below)
    with torch.no_grad():
        return model(inp.input_ids, inp.positions, inp.meta, caches, torch.arange(len(prompt)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    hf = save_tiny_model_dir("llama", path)  # weights and a tokenizer: LLM loads it too
    model, _ = load_model(path, dtype="float32")
    return hf, model, path


def test_it_rounds_only_the_rectangles_rows(tiny, monkeypatch):
    _, model, _ = tiny
    prompt = [(7 * i) % 250 + 3 for i in range(200)]
    logits = {}
    for on in (False, True):
        monkeypatch.setattr(attention, "BF16_PROMPT_ATTENTION", on)
        logits[on] = _prompt_logits(model, prompt, torch.bfloat16)
        logits[on, "int8"] = _prompt_logits(model, prompt, torch.int8)
        # A float32 cache and the kernel's rows are not the rectangle's bf16: the same bits.
        logits[on, "f32"] = _prompt_logits(model, prompt, torch.float32)
        if paged_attention.kernel() is not None:
            logits[on, "kernel"] = _prompt_logits(model, prompt, torch.bfloat16, kernel_below=200)
    assert torch.equal(logits[False, "f32"], logits[True, "f32"])
    if paged_attention.kernel() is not None:
        assert torch.equal(logits[False, "kernel"], logits[True, "kernel"])
    for cache in ("bf16", "int8"):  # the int8 cache's rows dequantized to bf16, or float32
        off, on = (logits[x] if cache == "bf16" else logits[x, "int8"] for x in (False, True))
        assert not torch.equal(off, on), cache  # the bf16 path was taken
        # ... and it is bf16 rounding: within 2% of the largest logit (two layers), the same
        # argmax at every row but where the float32 rectangles' top two are that close.
        scale = off.abs().max().item()
        torch.testing.assert_close(on, off, atol=2e-2 * scale, rtol=0)
        top2 = off.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 4e-2 * scale
        assert clear.sum() > len(prompt) // 2, cache
        assert torch.equal(off.argmax(-1)[clear], on.argmax(-1)[clear]), cache


@pytest.mark.parametrize("rows", ["rectangles", "kernel"])
def test_greedy_tokens_of_a_long_prompt_match_transformers(tiny, monkeypatch, rows):
    # Every prompt row in the rectangles (no kernel rows; in bf16), or every row in the paged
    # kernel (paged_attention.GROUPED_PROMPT_ROWS_IN_KERNEL: the tiny model's grouped heads, as
    # a CPU without AMX takes them), in the engine's own steps (chunks of 128 tokens): the
    # tokens transformers gives in float32.
    from carpool import LLM, SamplingParams

    hf, _, path = tiny
    monkeypatch.setattr(attention, "BF16_PROMPT_ATTENTION", True)
    monkeypatch.setattr(paged_attention, "PROMPT_KERNEL_TOKENS", 0)
    monkeypatch.setattr(paged_attention, "GROUPED_PROMPT_ROWS_IN_KERNEL", rows == "kernel")
    taken = []
    real = attention.bf16_prompt_attention
    monkeypatch.setattr(
        attention, "bf16_prompt_attention", lambda q, c: taken.append(real(q, c)) or taken[-1]
    )
    prompt = [(11 * i) % 250 + 3 for i in range(300)]
    expected = hf_greedy(hf, prompt, 8)
    llm = LLM(
        str(path),
        dtype="float32",
        kv_cache_dtype="bfloat16",
        max_model_len=512,
        max_num_batched_tokens=128,
    )
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected
    if rows == "kernel":
        assert llm.engine.runner.kernel_below == paged_attention.EVERY_PROMPT_ROW
        assert not taken, "no rectangle: every prompt row took the kernel"
    else:
        assert taken and all(taken), "the prompt's rectangles ran in bf16"
