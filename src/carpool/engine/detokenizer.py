"""Incremental detokenization with stop strings.

Tokens arrive one at a time; text must come out as soon as it is stable. Two traps:
- a multi-byte UTF-8 character split across tokens decodes to U+FFFD until its last byte
  arrives, so text ending in U+FFFD is held back (for at most 4 tokens: beyond that the bytes
  are invalid, not incomplete);
- tokenizers that strip a leading space (SentencePiece) decode a suffix differently from the
  whole, so each step decodes a short window starting a few tokens back (``prefix_offset``)
  and emits only what that window adds beyond the previous read point.
Stop strings can span tokens, so the search covers the text's tail, and up to
``len(longest stop) - 1`` characters are held back until they cannot start a stop string.
"""

from __future__ import annotations

from carpool.tokenizer import Tokenizer

# Prompt tokens that seed the first window (context for the first output token's decode).
_WINDOW = 6
# A UTF-8 character is at most 4 bytes, and every token adds at least one byte: text that still
# ends in U+FFFD after this many held tokens is invalid, not incomplete, and is emitted as it is.
# Without the cap a stream of stray bytes (a random or broken model) is held forever and every
# step decodes a window that grows with the stream.
_MAX_HELD = 4


class IncrementalDetokenizer:
    """Turn one request's output tokens into text, a delta at a time."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: tuple[str, ...] = (),
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        # Seed the window with the prompt's tail so the first output token decodes in context.
        context = list(prompt_token_ids or [])[-_WINDOW:]
        self._tokens: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self.text = ""  # all stable text so far (stop string cut off when found)
        self._emitted = 0  # characters of ``text`` already returned as deltas
        self.stopped_by: str | None = None

    def add_token(self, token_id: int) -> None:
        """Append a token; updates ``text`` and ``stopped_by``."""
        if self.stopped_by is not None:
            return
        self._tokens.append(token_id)
        prefix = self.tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset])
        full = self.tokenizer.decode(self._tokens[self._prefix_offset :])
        held = len(self._tokens) - self._read_offset
        if (full.endswith("\ufffd") or len(full) <= len(prefix)) and held < _MAX_HELD:
            return  # an incomplete UTF-8 sequence (or nothing new yet): wait for more bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._append_text(full[len(prefix) :])

    def _append_text(self, new: str) -> None:
        search_from = max(0, len(self.text) - self._hold)
        self.text += new
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                index, s = min(hits)
                self.text = self.text[:index]
                self.stopped_by = s

    def delta(self, final: bool = False) -> str:
        """Text not yet returned; holds back a possible stop-string prefix unless ``final``."""
        end = (
            len(self.text)
            if final or self.stopped_by
            else max(self._emitted, len(self.text) - self._hold)
        )
        out = self.text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> None:
        """At the end of a request: decode whatever is held back (even an incomplete char)."""
        if self.stopped_by is None and self._read_offset < len(self._tokens):
            prefix = self.tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset])
            full = self.tokenizer.decode(self._tokens[self._prefix_offset :])
            self._read_offset = len(self._tokens)
            self._append_text(full[len(prefix) :])
