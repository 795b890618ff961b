"""Drive carpool's model directly (no engine) for model-level parity tests.

Runs on whatever device the model's parameters are on; logits come back on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from carpool.worker.batch import build_ragged_batch


@dataclass
class _Chunk:
    request_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_sample: bool = True
    extra: dict = field(default_factory=dict)


def prompt_logits(model, prompt: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits ``[len(prompt), vocab]`` of every prompt position, through the paged cache."""
    blocks = -(-len(prompt) // block_size)
    w = next(model.parameters())
    caches = model.allocate_kv_cache(blocks + 1, block_size, w.dtype, w.device)
    # Use blocks out of order to prove the block table is honoured.
    table = list(range(blocks, 0, -1))
    inp = build_ragged_batch([_Chunk("r", prompt, 0, table)], [table], block_size, w.device)
    rows = torch.arange(len(prompt), device=w.device)
    with torch.no_grad():
        return model(inp.input_ids, inp.positions, inp.meta, caches, rows).cpu()


def greedy(
    model,
    prompt: list[int],
    max_new_tokens: int,
    block_size: int = 16,
    kv_dtype: torch.dtype | None = None,
    wide_from: int | None = None,
    kernel_below: int = 0,
) -> list[int]:
    """Greedy decode of one sequence: one prefill step, then one token per step, on a cache
    of ``kv_dtype`` (None: the model's). ``wide_from``: the prompt rows from this position on
    take a quantized model's widened weight, as an engine's runner chooses them
    (``ModelRunner.wide_from``; None: none); ``kernel_below``: the prompt rows below this
    position take the attention kernel as the runner's (``ModelRunner.kernel_below``)."""
    total = len(prompt) + max_new_tokens
    blocks = -(-total // block_size)
    w = next(model.parameters())
    caches = model.allocate_kv_cache(blocks + 1, block_size, kv_dtype or w.dtype, w.device)
    table = list(range(blocks, 0, -1))
    out: list[int] = []
    chunk = _Chunk("r", list(prompt), 0, table)
    with torch.no_grad():
        while len(out) < max_new_tokens:
            inp = build_ragged_batch(
                [chunk],
                [table],
                block_size,
                w.device,
                [len(prompt)],
                kernel_below=kernel_below,
                wide_from=wide_from,
            )
            logits = model(inp.input_ids, inp.positions, inp.meta, caches, inp.logits_indices)
            tok = int(logits[0].argmax())
            out.append(tok)
            chunk = _Chunk("r", [tok], chunk.start_pos + len(chunk.token_ids), table)
    return out


def teacher_forced_logits(model, tokens: list[int], prompt_len: int, kv_dtype: torch.dtype):
    """Logits at every position from ``prompt_len - 1`` on: one prefill step of the prompt,
    then one decode step per given token (the reference's tokens, so both runs see the same
    inputs and only the cache differs)."""
    block_size = 16
    blocks = -(-len(tokens) // block_size)
    caches = model.allocate_kv_cache(blocks + 1, block_size, kv_dtype, "cpu")
    table = list(range(blocks, 0, -1))
    rows = []
    chunk = _Chunk("r", tokens[:prompt_len], 0, table)
    with torch.no_grad():
        for pos in range(prompt_len, len(tokens) + 1):
            inp = build_ragged_batch([chunk], [table], block_size)
            rows.append(model(inp.input_ids, inp.positions, inp.meta, caches, inp.logits_indices))
            if pos < len(tokens):
                chunk = _Chunk("r", [tokens[pos]], pos, table)
    return torch.cat(rows)


def assert_same_top1_where_clear(got: torch.Tensor, expected: torch.Tensor, bound: float):
    """The argmax of every position agrees wherever the reference's top-2 gap exceeds twice the
    allowed logit error (elsewhere a difference within ``bound`` may flip a near-tie)."""
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * bound
    assert clear.any(), "no position with a clear winner: the check would be empty"
    agree = got.argmax(-1) == expected.argmax(-1)
    assert bool(agree[clear].all()), (
        f"top-1 differs at clear positions {(~agree & clear).nonzero()}"
    )


def teacher_forced_vs_hf(hf, model, kv_dtype: torch.dtype, new_tokens: int = 24):
    """``(logits, reference, kernel runs)``: the model's logits over ``new_tokens`` positions of
    transformers' own greedy continuation of a fixed prompt, on a cache of ``kv_dtype``
    (``teacher_forced_logits``), transformers' logits at the same positions, and how many
    times the paged decode kernel ran meanwhile."""
    from carpool.model import paged_attention
    from helpers.hf_models import hf_greedy

    prompt = list(range(3, 300, 7))
    tokens = prompt + hf_greedy(hf, prompt, new_tokens)[:-1]
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0, len(prompt) - 1 :]  # [new_tokens, vocab]
    calls = paged_attention.kernel_calls()
    got = teacher_forced_logits(model, tokens, len(prompt), kv_dtype)
    return got, ref, paged_attention.kernel_calls() - calls


def kernel_and_gathered_logits(model, kv_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits of a fixed sequence decoded through the paged decode kernel, and
    through gather + SDPA (the path of prefill, mixed steps and other devices)."""
    from carpool.model import paged_attention

    tokens = list(range(5, 200, 3))
    kernel = teacher_forced_logits(model, tokens, 20, kv_dtype)
    paged_attention.use_kernel(False)
    try:
        gathered = teacher_forced_logits(model, tokens, 20, kv_dtype)
    finally:
        paged_attention.use_kernel(True)
    return kernel, gathered
