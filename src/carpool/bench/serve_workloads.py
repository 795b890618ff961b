"""Workloads of ``carpool bench serve`` for prefix caching and priority scheduling.

- **shared prefix**: ``K`` system prompts of ``L`` tokens, each request one of them followed by
  a short random user suffix, sent as token ids (so ``L`` is exact with any tokenizer and the
  prefix is the same tokens in every request). With L = 1,000 and suffixes of ~111 tokens,
  90% of each prompt is shared.
- **multi-turn**: conversations of ``T`` turns; each turn's prompt is the previous turn's prompt
  + the answer the server gave + a new user message (text), so every turn but the first starts
  with a prefix the server has seen. The turns of one conversation run one after the other;
  conversations start at the Poisson arrival times.
- **priority classes**: each request gets a priority drawn from ``"0:0.1,10:0.9"`` (value:
  share), from a fixed seed; the summary then reports TTFT per class.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace

import httpx

from carpool.bench.serve_load import (
    _WORDS,
    LoadSpec,
    PromptSpec,
    RequestResult,
    run_at_arrivals,
    send_prompt,
)


def shared_prefix_prompts(
    n: int,
    num_prefixes: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int,
    vocab_size: int = 256,
) -> list[PromptSpec]:
    """``n`` token-id prompts: one of ``num_prefixes`` prefixes of ``prefix_len`` tokens + a
    suffix of ``suffix_len`` +- 50% tokens; ids in ``[3, vocab_size)`` (valid in any real
    vocabulary: 0-2 are often special)."""
    if num_prefixes < 1 or prefix_len < 1 or suffix_len < 1 or vocab_size < 4:
        raise ValueError(
            f"shared prefix needs num_prefixes, prefix_len, suffix_len >= 1 and vocab_size >= 4, "
            f"got {num_prefixes}, {prefix_len}, {suffix_len}, {vocab_size}"
        )
    rng = random.Random(seed)
    prefixes = [
        [rng.randrange(3, vocab_size) for _ in range(prefix_len)] for _ in range(num_prefixes)
    ]
    out = []
    for i in range(n):
        length = rng.randint(max(1, suffix_len // 2), suffix_len + suffix_len // 2)
        suffix = [rng.randrange(3, vocab_size) for _ in range(length)]
        out.append(PromptSpec(prefixes[i % num_prefixes] + suffix, output_len))
    return out


def parse_priority_classes(text: str) -> list[tuple[int, float]]:
    """``"0:0.1,10:0.9"`` -> ``[(0, 0.1), (10, 0.9)]`` (shares normalised to sum 1).

    Raises:
        ValueError: not ``int:share`` pairs with positive shares.
    """
    classes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        value, _, share = part.partition(":")
        try:
            classes.append((int(value), float(share)))
        except ValueError:
            raise ValueError(f"priority class {part!r} is not PRIORITY:SHARE") from None
        if not classes[-1][1] > 0:
            raise ValueError(f"priority class {part!r}: the share must be > 0")
    if not classes:
        raise ValueError("no priority classes given")
    total = sum(s for _, s in classes)
    return [(v, s / total) for v, s in classes]


def with_priorities(
    prompts: Sequence[PromptSpec], classes: list[tuple[int, float]], seed: int
) -> list[PromptSpec]:
    """Each prompt with a priority drawn from ``classes`` (a fixed seed)."""
    rng = random.Random(seed + 1)
    values, weights = [v for v, _ in classes], [s for _, s in classes]
    return [replace(p, priority=rng.choices(values, weights)[0]) for p in prompts]


def multi_turn_conversations(
    num_conversations: int, num_turns: int, message_len: int, seed: int
) -> list[list[str]]:
    """``num_turns`` user messages of ~``message_len`` words for each conversation."""
    rng = random.Random(seed)
    return [
        [
            " ".join(
                rng.choice(_WORDS)
                for _ in range(rng.randint(max(1, message_len // 2), message_len))
            )
            for _ in range(num_turns)
        ]
        for _ in range(num_conversations)
    ]


async def run_multi_turn(
    spec: LoadSpec,
    conversations: Sequence[Sequence[str]],
    max_tokens: int,
    on_done: Callable[[RequestResult], None] = lambda _r: None,
) -> tuple[list[RequestResult], float]:
    """Run every conversation turn by turn (conversations start at Poisson times).

    Returns:
        (the results of every turn, conversation by conversation, wall seconds).
    """

    async def conversation(
        client: httpx.AsyncClient, url: str, messages: Sequence[str], _start: float
    ) -> list[RequestResult]:
        history, results = "", []
        for message in messages:
            history += ("\n" if history else "") + message + "\n"
            result = await send_prompt(client, url, spec, PromptSpec(history, max_tokens))
            on_done(result)
            results.append(result)
            if not result.ok:
                break  # the conversation cannot continue without its answer
            history += result.text
        return results

    per_conv, wall = await run_at_arrivals(spec, conversations, conversation)
    return [r for rs in per_conv for r in rs], wall
