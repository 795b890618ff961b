"""Sampling that one request cannot poison: a batch that raises is re-sampled row by row.

The logits processor (``logit_bias``, grammar masks) and the sampler run once over the whole
batch, as always. If that raises, whatever the cause (a value validation missed, a grammar
matcher in a bad state, a bug), the step is not lost: every row is processed and sampled again
on its own, from the same logits, and only the rows that raise again fail, each with its own
error. The other rows get exactly the tokens the batch would have given them: greedy rows take
the same argmax, and the per-request generators of seeded rows are rewound to where they stood
before the failed attempt, so a seed gives the same draw whichever path sampled it.

The fallback costs one small sampling call per row, only in a step that failed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from carpool.outputs import TokenLogprobs
from carpool.worker.sampler import Sampler, SamplingRow

if TYPE_CHECKING:
    from carpool.structured.processor import LogitsProcessor

logger = logging.getLogger("carpool.engine")


@dataclass(frozen=True)
class GuardedSample:
    """The step's sampling result per request id.

    Attributes:
        sampled: request id -> its new token (rows that failed are absent).
        logprobs: request id -> its logprobs, for rows that asked for them.
        failed: request id -> why its row could not be sampled (the exception, as text).
    """

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class SamplingGuard:
    """Applies the logits processor and the sampler to a batch, isolating a failing row.

    Args:
        sampler: samples one token per row.
        logits_processor: biases and masks rows before sampling (None: nothing to apply).
    """

    def __init__(self, sampler: Sampler, logits_processor: LogitsProcessor | None) -> None:
        self.sampler = sampler
        self.logits_processor = logits_processor

    def __call__(
        self, logits: torch.Tensor, request_ids: Sequence[str], rows: Sequence[SamplingRow]
    ) -> GuardedSample:
        """Sample ``logits`` (``[R, V]``, row i for ``request_ids[i]``)."""
        # A seeded row's generator advances while sampling; keep where it stood so that a
        # retry draws what the batch would have drawn. CPU generators' states are ~5 KB.
        states = {i: r.generator.get_state() for i, r in enumerate(rows) if r.generator is not None}
        try:
            tokens, lps = self._sample(logits, request_ids, rows)
            failed: dict[str, str] = {}
        except Exception as e:  # noqa: BLE001  (isolated below, row by row)
            logger.warning(
                "sampling failed for a batch of %d requests (%s); sampling each alone",
                len(rows),
                _describe(e),
            )
            for i, state in states.items():
                gen = rows[i].generator
                assert gen is not None
                gen.set_state(state)
            tokens, lps, failed = self._sample_each(logits, request_ids, rows)
        out = GuardedSample(failed=failed)
        for i, rid in enumerate(request_ids):
            tok = tokens[i]
            if tok is None:
                continue
            if not self._accept(rid, rows[i], tok, out.failed):
                continue
            out.sampled[rid] = tok
            lp = lps[i]
            if lp is not None:
                out.logprobs[rid] = lp
        return out

    def _sample(
        self, logits: torch.Tensor, request_ids: Sequence[str], rows: Sequence[SamplingRow]
    ) -> tuple[list[int | None], list[TokenLogprobs | None]]:
        proc = self.logits_processor
        if proc is not None:
            logits = proc.apply(logits, request_ids, [r.params for r in rows])
        result = self.sampler(logits, rows)
        return list(result.token_ids), list(result.logprobs)

    def _sample_each(
        self, logits: torch.Tensor, request_ids: Sequence[str], rows: Sequence[SamplingRow]
    ) -> tuple[list[int | None], list[TokenLogprobs | None], dict[str, str]]:
        tokens: list[int | None] = []
        lps: list[TokenLogprobs | None] = []
        failed: dict[str, str] = {}
        for i, (rid, row) in enumerate(zip(request_ids, rows, strict=True)):
            try:
                tok, lp = self._sample(logits[i : i + 1], [rid], [row])
            except Exception as e:  # noqa: BLE001  (this row's request fails, alone)
                logger.error("request %s: sampling failed: %s", rid, _describe(e))
                failed[rid] = f"sampling failed for this request: {_describe(e)}"
                tokens.append(None)
                lps.append(None)
                continue
            tokens.append(tok[0])
            lps.append(lp[0])
        return tokens, lps, failed

    def _accept(self, rid: str, row: SamplingRow, token: int, failed: dict[str, str]) -> bool:
        """Advance the row's grammar by ``token``; False (and ``failed``) when that raises."""
        proc = self.logits_processor
        if proc is None or row.params.structured_outputs is None:
            return True
        try:
            proc.accept([rid], [row.params], [token])
        except Exception as e:  # noqa: BLE001  (this row's request fails, alone)
            logger.error("request %s: grammar update failed: %s", rid, _describe(e))
            failed[rid] = f"grammar update failed for this request: {_describe(e)}"
            return False
        return True
