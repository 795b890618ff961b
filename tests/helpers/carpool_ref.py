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


def greedy(model, prompt: list[int], max_new_tokens: int, block_size: int = 16) -> list[int]:
    """Greedy decode of one sequence: one prefill step, then one token per step."""
    total = len(prompt) + max_new_tokens
    blocks = -(-total // block_size)
    w = next(model.parameters())
    caches = model.allocate_kv_cache(blocks + 1, block_size, w.dtype, w.device)
    table = list(range(blocks, 0, -1))
    out: list[int] = []
    chunk = _Chunk("r", list(prompt), 0, table)
    with torch.no_grad():
        while len(out) < max_new_tokens:
            inp = build_ragged_batch([chunk], [table], block_size, w.device)
            logits = model(inp.input_ids, inp.positions, inp.meta, caches, inp.logits_indices)
            tok = int(logits[0].argmax())
            out.append(tok)
            chunk = _Chunk("r", [tok], chunk.start_pos + len(chunk.token_ids), table)
    return out
