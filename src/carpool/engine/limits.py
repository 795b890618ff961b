"""``ModelLimits``: the facts a request is validated against, and the one place that does it.

The HTTP server (before queueing, so a stream only starts once a request is servable), the
engine (``LLMEngine.add_request``) and the replica front end all call these checks, so a request
is accepted or refused the same way, with the same message and the same ``param``, wherever it
enters. The scheduling policies keep their own assertion-level guard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from carpool.errors import ContextLengthError, InvalidRequestError


@dataclass(frozen=True)
class ModelLimits:
    """What a client of the engine may know about the model it serves (frozen, picklable).

    Attributes:
        model: the model path or name the engine loaded.
        max_model_len: longest prompt + output served.
        vocab_size: token ids must be in ``[0, vocab_size)``.
        num_blocks: KV cache blocks in all.
        block_size: tokens per KV block.
    """

    model: str
    max_model_len: int
    vocab_size: int
    num_blocks: int
    block_size: int

    @classmethod
    def smallest(cls, limits: Sequence[ModelLimits]) -> ModelLimits:
        """The tightest of several engines' limits: a request valid here is valid on each."""
        assert limits, "no limits to combine"
        return cls(
            model=limits[0].model,
            max_model_len=min(x.max_model_len for x in limits),
            vocab_size=min(x.vocab_size for x in limits),
            num_blocks=min(x.num_blocks for x in limits),
            block_size=limits[0].block_size,
        )

    @property
    def max_cache_tokens(self) -> int:
        """Token slots in the whole KV cache."""
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """KV blocks that hold ``num_tokens`` tokens (ceiling division)."""
        return -(-num_tokens // self.block_size)

    def default_max_tokens(self, prompt_len: int) -> int:
        """As many tokens as fit after the prompt in the context and the cache (>= 1)."""
        return max(1, min(self.max_model_len, self.max_cache_tokens) - prompt_len)

    def check_prompt_ids(self, ids: Sequence[object], param: str = "prompt") -> None:
        """Raise unless ``ids`` is a non-empty list of ints inside the vocabulary.

        Raises:
            InvalidRequestError: naming ``param``.
        """
        if not ids:
            raise InvalidRequestError(f"{param}: the prompt is empty", param=param)
        vocab = self.vocab_size
        bad = [
            t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab
        ]
        if bad:
            raise InvalidRequestError(
                f"{param}: token ids must be ints in [0, {vocab}), got {bad[:5]}", param=param
            )

    def check_length(
        self,
        prompt_len: int,
        max_tokens: int,
        prompt_param: str = "prompt",
        max_tokens_param: str = "max_tokens",
    ) -> None:
        """Raise unless prompt + max_tokens fit the context and the whole KV cache.

        Raises:
            ContextLengthError: naming the prompt when the prompt alone is too long, else
                ``max_tokens_param``.
        """
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"this model's maximum context length (max_model_len) is {self.max_model_len} "
                f"tokens, but {total} were requested ({prompt_len} in the prompt, {max_tokens} "
                f"for the completion); reduce the prompt or {max_tokens_param}",
                param=prompt_param if prompt_len >= self.max_model_len else max_tokens_param,
            )
        # The last sampled token is never fed back, so the KV holds at most total - 1 tokens.
        blocks = self.blocks_needed(total - 1)
        if blocks > self.num_blocks:
            raise ContextLengthError(
                f"{prompt_len} prompt tokens + {max_tokens_param}={max_tokens} need {blocks} KV "
                f"blocks but the whole cache has {self.num_blocks}; reduce {max_tokens_param}",
                param=max_tokens_param,
            )
