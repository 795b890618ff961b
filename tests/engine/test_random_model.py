"""``carpool.bench.random_model``: the random checkpoints' tokenizer decodes every id to text."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from carpool import LLM, SamplingParams
from carpool.bench.random_model import PRESETS, save_byte_tokenizer, save_random_llama

SPECIALS = 3
BYTES = 256


def test_byte_tokenizer_fills_the_vocab_with_decode_only_entries(tmp_path):
    save_byte_tokenizer(tmp_path, 600)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 600
    fillers = [tok.decode([i]) for i in range(SPECIALS + BYTES, 600)]
    assert all(len(t) >= 2 and t.isascii() and t.strip() for t in fillers), fillers[:8]
    assert len(set(fillers)) == len(fillers), "filler entries decode to distinct texts"
    # Text still encodes to its bytes: no merge ever forms a filler entry.
    text = "hello there, ünï"
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode()) and all(i < SPECIALS + BYTES for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_without_fillers_keeps_the_bytes(tmp_path):
    save_byte_tokenizer(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == SPECIALS + BYTES
    assert tok.decode([74, 71]) == "he"


def test_random_model_generates_text_from_its_first_token(tmp_path):
    out = save_random_llama(tmp_path / "m", "tiny", "float32")
    config = json.loads((out / "config.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == config["vocab_size"] == PRESETS["tiny"]["vocab_size"]
    llm = LLM(str(out), max_model_len=64)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    [result] = llm.generate(["hello"], params, use_tqdm=False)
    ids = result.outputs[0].token_ids
    assert len(ids) == 8
    # Every sampled id past the specials has text of its own.
    assert all(tok.decode([i]) for i in ids if i >= SPECIALS)
    assert result.outputs[0].text
