"""Incremental detokenization: UTF-8 split across tokens, stop strings across tokens."""

from __future__ import annotations

import pytest

from carpool.engine.detokenizer import IncrementalDetokenizer
from carpool.tokenizer import Tokenizer
from helpers.hf_models import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    return Tokenizer.from_pretrained_dir(d)


def stream(tok: Tokenizer, text: str, stop: tuple[str, ...] = (), prompt: str = "x"):
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, stop, tok.encode(prompt, add_special_tokens=False))
    deltas = []
    for t in ids:
        d.add_token(t)
        deltas.append(d.delta())
        if d.stopped_by:
            break
    d.flush()
    deltas.append(d.delta(final=True))
    return d, deltas, ids


@pytest.mark.parametrize(
    "text",
    ["plain ascii text", "Héllo wörld ✓ 日本語 🚀🚀 done", "  leading spaces\n\tand tabs", "🚀"],
)
def test_streamed_deltas_rebuild_the_text(tok, text):
    d, deltas, ids = stream(tok, text)
    assert "".join(deltas) == text == d.text
    assert all("\ufffd" not in x for x in deltas), deltas


def test_multibyte_character_split_over_tokens_is_held_back(tok):
    ids = tok.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1, "the test needs an emoji spread over several byte tokens"
    d = IncrementalDetokenizer(tok)
    for t in ids[:-1]:
        d.add_token(t)
        assert d.delta() == ""
    d.add_token(ids[-1])
    assert d.delta() == "🚀"


def test_stop_string_across_token_boundaries_is_cut(tok):
    d, deltas, _ = stream(tok, "for i in range(10):\n    print(i)", stop=("range(1",))
    assert d.stopped_by == "range(1"
    assert d.text == "for i in "
    assert "".join(deltas) == "for i in "


def test_earliest_of_several_stop_strings_wins(tok):
    d, _, _ = stream(tok, "alpha beta gamma delta", stop=("delta", "beta"))
    assert d.stopped_by == "beta" and d.text == "alpha "


def test_no_partial_stop_string_is_streamed(tok):
    # "print(" starts the stop string "print(x)" but the text continues differently.
    d, deltas, _ = stream(tok, "print(i) and more", stop=("print(x)",))
    assert d.stopped_by is None
    assert "".join(deltas) == "print(i) and more"


class _CountingTokenizer:
    """A tokenizer proxy that records the longest token list ``decode`` was given."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.longest = tok, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids, skip_special_tokens)


def test_invalid_utf8_is_emitted_and_the_window_stays_bounded(tok):
    # A lone UTF-8 continuation byte never completes a character: a stream of them (a random or
    # broken model) must not be held back forever, or every step decodes a window that grows
    # with the stream (O(n) per token).
    lone = next(i for i in range(tok.vocab_size) if tok.decode([i, i, i, i, i]) == "\ufffd" * 5)
    counting = _CountingTokenizer(tok)
    d = IncrementalDetokenizer(counting, prompt_token_ids=tok.encode("x", add_special_tokens=False))  # type: ignore[arg-type]
    for _ in range(200):
        d.add_token(lone)
    assert d.text.startswith("\ufffd") and len(d.text) >= 190, len(d.text)
    assert counting.longest <= 12, counting.longest
    d.add_token(tok.encode("ok", add_special_tokens=False)[0])
    assert d.text.endswith("o") or d.text.endswith("ok"), d.text[-5:]
