"""The fake model of the scheduler tests: the next token is a deterministic function of the
whole context, so any batching mistake (a wrong position, a lost or reordered token) changes
what a request generates."""

from __future__ import annotations

from carpool.request import Request

VOCAB = 1000  # token ids the fake model emits: 0 .. VOCAB - 1


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context."""
    h = len(context)
    for t in context:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


def reference_output(req: Request) -> list[int]:
    """What the fake model generates for ``req`` with no batching at all."""
    ctx, out = list(req.prompt_token_ids), []
    for _ in range(req.sampling_params.max_tokens):
        out.append(next_token(ctx))
        ctx.append(out[-1])
    return out
