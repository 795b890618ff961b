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


def size_rotary_tables(model: torch.nn.Module, length: int) -> None:
    """Rebuild every rotary table for exactly ``length`` positions, the engine's
    ``max_model_len``: grown past the model's context under ``--allow-long-max-model-len``,
    shrunk below it otherwise. A table is built for the model's whole context at load, in
    float32: 4 MiB for SmolLM2's 8,192 positions, 128 MiB for a Llama 3.1 config's 131,072,
    resident whatever the engine serves; no position reaches ``max_model_len`` (the limits
    refuse such a request), and the positions below it get the same values."""
    for module in model.modules():
        if hasattr(module, "reset_tables") and hasattr(module, "config"):
            if module.config.max_position_embeddings == length:
                continue
            module.config = replace(module.config, max_position_embeddings=length)
            module.reset_tables()
