"""Tokenization: the :class:`Tokenizer` over HF tokenizer directories and GGUF vocabularies."""

from carpool.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
