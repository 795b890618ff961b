"""What ``LLMEngine`` does while it starts: per-stage progress lines, the context length check.

Loading a real model takes seconds to a minute; one log line per stage (resolve, weights,
tokenizer, KV cache) with its time shows where it is and where the time went.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from carpool.errors import ModelLoadError


class LoadStages:
    """Logs ``loading: <stage> done in X.Xs (detail)`` for each stage as it ends."""

    def __init__(self, logger: logging.Logger, clock=time.perf_counter) -> None:
        self.logger, self.clock = logger, clock
        self.start = self.last = clock()

    def done(self, stage: str, detail: str = "") -> float:
        """Log the stage that just ended; return its seconds."""
        now = self.clock()
        seconds, self.last = now - self.last, now
        self.logger.info(
            "loading: %s done in %.1fs%s", stage, seconds, f" ({detail})" * bool(detail)
        )
        return seconds

    @property
    def total(self) -> float:
        """Seconds since the first stage began."""
        return self.clock() - self.start


def resolve_max_model_len(asked: int | None, context: int, allow_long: bool) -> int:
    """The engine's ``max_model_len``: the model's ``context`` unless ``asked`` otherwise.

    Raises:
        ModelLoadError: ``asked`` is above the model's context and ``allow_long`` is False
            (serving it silently clamped hid the mistake; serving it silently unclamped would
            run positions the model never saw).
    """
    if asked is None:
        return context
    if asked > context and not allow_long:
        raise ModelLoadError(
            f"--max-model-len {asked} is above the model's context of {context} tokens; use "
            f"--max-model-len {context} or less, or --allow-long-max-model-len to run past it "
            "(output quality is not guaranteed)"
        )
    return asked


def extend_rotary_tables(model: torch.nn.Module, length: int) -> None:
    """Grow every rotary table to ``length`` positions (``--allow-long-max-model-len``)."""
    for module in model.modules():
        if hasattr(module, "reset_tables") and hasattr(module, "config"):
            module.config = replace(module.config, max_position_embeddings=length)
            module.reset_tables()
