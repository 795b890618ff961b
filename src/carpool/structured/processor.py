"""The logits step between the model and the sampler: ``logit_bias`` and grammar masks.

One call per engine step covers the whole batch. A step in which no row has a constraint or a
bias returns at once without touching the logits, so unconstrained traffic pays nothing but a
scan of the rows' parameters. Constrained rows get one bitmask tensor filled row by row by their
matchers and applied in one batched kernel (xgrammar's CPU kernel).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from carpool.errors import InvalidRequestError

if TYPE_CHECKING:
    from carpool.sampling_params import SamplingParams
    from carpool.structured.compiler import GrammarCompiler

# xgrammar is imported on the first constrained request: importing it costs seconds, which an
# engine that never sees a constraint should not pay at start-up.

logger = logging.getLogger(__name__)


class LogitsProcessor:
    """Per-request grammar matchers plus the batched logits edits they imply.

    Args:
        compiler: returns the shared ``GrammarCompiler`` (called on the first constrained
            request, so engines that never see one never build the tokenizer tables).
        stop_token_ids: every id that ends generation; a finished grammar allows only these.
    """

    def __init__(
        self, compiler: Callable[[], GrammarCompiler], stop_token_ids: tuple[int, ...]
    ) -> None:
        self._get_compiler = compiler
        self._stop_token_ids = list(stop_token_ids)
        self._matchers: dict[str, Any] = {}  # request id -> xgr.GrammarMatcher

    @property
    def compiler(self) -> GrammarCompiler:
        """The grammar compiler (built on first use)."""
        return self._get_compiler()

    def check(self, params: SamplingParams, vocab_size: int) -> None:
        """Validate a new request's bias ids and compile its constraint (a cache hit when the
        server compiled it already), before anything is queued.

        Raises:
            InvalidRequestError: a ``logit_bias`` id outside the vocabulary, or a constraint that
                does not compile (naming the field it came from).
        """
        bad = [t for t, _ in params.logit_bias if t >= vocab_size]
        if bad:
            raise InvalidRequestError(
                f"logit_bias: token ids must be in [0, {vocab_size}), got {bad[:5]}",
                param="logit_bias",
            )
        if params.structured_outputs is not None:
            self.compiler.compile(params.structured_outputs)

    def _matcher(self, request_id: str, params: SamplingParams) -> Any:
        m = self._matchers.get(request_id)
        if m is None:
            import xgrammar as xgr

            assert params.structured_outputs is not None
            compiled = self.compiler.compile(params.structured_outputs)
            m = xgr.GrammarMatcher(compiled, override_stop_tokens=self._stop_token_ids)
            self._matchers[request_id] = m
        return m

    def apply(
        self, logits: torch.Tensor, request_ids: Sequence[str], params: Sequence[SamplingParams]
    ) -> torch.Tensor:
        """Bias and mask ``logits`` (``[R, V]``, one row per request) for this step.

        Returns ``logits`` itself when no row asks for anything, else an edited float32 copy.
        """
        constrained = [i for i, p in enumerate(params) if p.structured_outputs is not None]
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        if not constrained and not biased:
            return logits
        logits = logits.float().clone()
        if biased:  # every row's bias in one scatter, one copy to the logits' device
            rows = [i for i in biased for _ in params[i].logit_bias]
            ids = [t for i in biased for t, _ in params[i].logit_bias]
            values = [v for i in biased for _, v in params[i].logit_bias]
            index = torch.tensor([rows, ids], dtype=torch.long).to(logits.device)
            bias = torch.tensor(values, dtype=torch.float32).to(logits.device)
            logits.index_put_((index[0], index[1]), bias, accumulate=True)
        if constrained:
            import xgrammar as xgr

            # -1 = every bit set = every token allowed, for the unconstrained rows in between.
            bitmask = xgr.allocate_token_bitmask(len(params), logits.shape[-1])
            for i in constrained:
                self._matcher(request_ids[i], params[i]).fill_next_token_bitmask(bitmask, i)
            # xgrammar fills a host bitmask; it masks logits on their own device.
            xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=constrained)
        return logits

    def accept(
        self, request_ids: Sequence[str], params: Sequence[SamplingParams], tokens: Sequence[int]
    ) -> None:
        """Advance each constrained row's matcher by the token it sampled."""
        for rid, p, tok in zip(request_ids, params, tokens, strict=True):
            if p.structured_outputs is None:
                continue
            m = self._matchers.get(rid)
            if m is not None and not m.is_terminated() and not m.accept_token(tok):
                logger.warning("request %s: grammar rejected sampled token %d", rid, tok)

    def release(self, request_id: str) -> None:
        """Forget a finished request's matcher."""
        self._matchers.pop(request_id, None)
