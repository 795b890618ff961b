"""GGUF vocabularies must tokenize exactly as llama.cpp's reference tokenizations say.

Data: ``tests/fixtures/vocab/`` (see tests/fixtures/README.md): ``NAME.gguf`` (vocab-only GGUF),
``NAME.gguf.inp`` (texts separated by ``\\n__ggml_vocab_test__\\n``) and ``NAME.gguf.out`` (one line
of expected ids per text, encoded without BOS and without parsing special-token text).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from carpool.errors import ModelLoadError
from carpool.tokenizer import Tokenizer

VOCAB_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "vocab"
VOCABS = ("llama-spm", "phi-3", "gpt-2", "llama-bpe")
SEPARATOR = "\n__ggml_vocab_test__\n"

_cache: dict[str, Tokenizer] = {}


def _tokenizer(name: str) -> Tokenizer:
    # Opening a GGUF with gguf.GGUFReader takes seconds (llama-bpe: 280k merges), so once per vocab.
    if name not in _cache:
        _cache[name] = Tokenizer.from_gguf(VOCAB_DIR / f"ggml-vocab-{name}.gguf")
    return _cache[name]


def _cases(name: str) -> list[tuple[str, list[int]]]:
    base = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)
    # The file ends with a separator, which leaves one empty string after the last text.
    assert texts[-1] == "", f"{base}.inp does not end with the separator"
    texts = texts[:-1]
    lines = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(texts) == len(lines), f"{base}: {len(texts)} texts but {len(lines)} answers"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines, strict=True)]


CASES = [(name, i, *case) for name in VOCABS for i, case in enumerate(_cases(name))]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


@pytest.mark.parametrize(
    ("name", "index", "text", "expected"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_gguf_vocab_matches_reference(
    name: str, index: int, text: str, expected: list[int]
) -> None:
    tok = _tokenizer(name)
    got = tok.encode(text, add_special_tokens=False)
    assert got == expected, (
        f"{name} text #{index} {text!r}\n"
        f"  expected {expected}\n  got      {got}\n"
        f"  first difference at index {_first_difference(got, expected)}"
    )
    # Every fixture text decodes back to itself, for SentencePiece too: the decoder strips exactly
    # the one "▁" the encoder prepended. (What cannot round-trip, for SPM, is text that follows a
    # special token when decoding with skip_special_tokens=False: the prefix space stays.)
    decoded = tok.decode(expected)
    assert decoded == text, f"{name} text #{index}: decode gave {decoded!r}, expected {text!r}"


@pytest.mark.parametrize(
    ("name", "adds_bos", "bos_id", "eos_ids"),
    [
        ("llama-spm", True, 1, (2,)),
        ("phi-3", True, 1, (32000,)),
        ("gpt-2", False, 50256, (50256,)),
        ("llama-bpe", True, 128000, (128001,)),
    ],
)
def test_gguf_special_tokens(
    name: str, adds_bos: bool, bos_id: int, eos_ids: tuple[int, ...]
) -> None:
    tok = _tokenizer(name)
    assert tok.bos_token_id == bos_id
    assert tok.eos_token_ids == eos_ids
    plain = tok.encode("Hello world", add_special_tokens=False)
    with_special = tok.encode("Hello world")
    assert with_special == ([bos_id] + plain if adds_bos else plain)
    assert tok.decode(with_special) == "Hello world"
    assert tok.convert_ids_to_tokens([bos_id]) == [tok.bos_token]


def test_gguf_control_tokens_are_parsed_and_skipped() -> None:
    tok = _tokenizer("phi-3")
    ids = tok.encode("Hi<|end|>", add_special_tokens=False)
    assert ids[-1] == 32007, tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == "Hi"
    assert tok.decode(ids, skip_special_tokens=False) == "Hi<|end|>"


def test_gguf_chat_template_from_metadata() -> None:
    tok = _tokenizer("phi-3")
    assert tok.chat_template is not None
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"


def test_gguf_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        Tokenizer.from_gguf(missing)


def test_gguf_corrupt_file_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError) as info:
        Tokenizer.from_gguf(bad)
    assert str(bad) in str(info.value)


def test_gguf_accepts_open_reader() -> None:
    from gguf import GGUFReader

    reader = GGUFReader(VOCAB_DIR / "ggml-vocab-llama-spm.gguf")
    tok = Tokenizer.from_gguf(reader)
    text = " Hello, world!"
    assert tok.encode(text) == _tokenizer("llama-spm").encode(text)
