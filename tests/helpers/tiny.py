"""Tiny saved models with their transformers greedy references, shared by engine tests."""

from __future__ import annotations

import random

from helpers.hf_models import hf_greedy

# 18 prompts from 1 to 330 tokens: single-token, sub-block, multi-block and long prompts.
LENGTHS = [1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 47, 64, 90, 128, 150, 200, 257, 330]
NEW_TOKENS = 32


def make_prompts(seed: int = 0, lengths: list[int] = LENGTHS) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in lengths]


class TinyModel:
    """A saved tiny model and the transformers greedy tokens of each prompt run alone."""

    def __init__(self, arch: str, path, hf) -> None:
        self.arch, self.path, self.hf = arch, str(path), hf
        self.prompts = make_prompts()
        self._refs: dict[tuple[int, ...], list[int]] = {}

    def reference(self, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
        key = (*prompt, -n)
        if key not in self._refs:
            self._refs[key] = hf_greedy(self.hf, prompt, n)
        return self._refs[key]
