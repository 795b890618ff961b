"""Tokenizer.from_pretrained_dir agrees with transformers' AutoTokenizer on a saved directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from carpool.errors import ModelLoadError
from carpool.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog 1234567890!",
    "Émile a mangé des pâtes à Zürich. 日本語のテキスト 🦙",
    "def f(x):\n    return x * 2  # code too\n",
] * 20
TEXTS = [
    "",
    "Hello world",
    " Hello  world ",
    "The lazy fox, 42 times!",
    "Zürich 日本 🦙\n\tdef f(x): return x",
    "<s>Hello</s> with specials",
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
]


def _train_backend(add_bos_post_processor: bool) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    return tok


def _save(tmp_path: Path, add_bos_post_processor: bool, **init: Any) -> Path:
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_train_backend(add_bos_post_processor),
        bos_token="<s>",
        eos_token="</s>",
        **init,
    )
    hf.chat_template = TEMPLATE
    hf.save_pretrained(tmp_path)
    return tmp_path


def _check_against_auto(path: Path) -> Tokenizer:
    ours = Tokenizer.from_pretrained_dir(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        for special in (True, False):
            want = theirs.encode(text, add_special_tokens=special)
            got = ours.encode(text, add_special_tokens=special)
            assert got == want, f"{text!r} special={special}: carpool {got} vs transformers {want}"
            for skip in (True, False):
                assert ours.decode(got, skip_special_tokens=skip) == theirs.decode(
                    want, skip_special_tokens=skip
                ), f"decode of {text!r} (skip_special_tokens={skip})"
    for gen in (True, False):
        want_text = theirs.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == want_text
        got_ids = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True)
        assert got_ids == theirs.encode(want_text, add_special_tokens=False)
    assert ours.bos_token == theirs.bos_token == "<s>"
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token == theirs.eos_token
    assert ours.vocab_size == len(theirs)
    ids = ours.encode("Hello world")
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    return ours


@pytest.mark.parametrize("add_bos_post_processor", [True, False])
def test_matches_auto_tokenizer(tmp_path: Path, add_bos_post_processor: bool) -> None:
    ours = _check_against_auto(_save(tmp_path, add_bos_post_processor))
    assert ours.chat_template == TEMPLATE
    assert (ours.encode("Hi")[0] == ours.bos_token_id) is add_bos_post_processor


def test_add_bos_token_flag_rebuilds_post_processor(tmp_path: Path) -> None:
    # A config flag overrides tokenizer.json's post-processor, as transformers does.
    _save(tmp_path, add_bos_post_processor=False, add_bos_token=True, add_eos_token=True)
    ours = _check_against_auto(tmp_path)
    ids = ours.encode("Hi")
    assert ids[0] == ours.bos_token_id and ids[-1] == ours.eos_token_ids[0]


def test_config_variants(tmp_path: Path) -> None:
    _save(tmp_path, add_bos_post_processor=False)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    # AddedToken dicts, a named template list, and no chat_template.jinja beside the config.
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config["bos_token"] = {"content": "<s>", "special": True}
    config["eos_token"] = {"content": "</s>", "special": True}
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": TEMPLATE},
    ]
    config_file.write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [1, 2]}), encoding="utf-8"
    )
    tok = Tokenizer.from_pretrained_dir(tmp_path)
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.chat_template == TEMPLATE
    assert tok.eos_token_ids == (1, 2)  # </s> is id 1: listed once

    # The newer layout: chat_template.jinja wins over the config's template.
    (tmp_path / "chat_template.jinja").write_text("JINJA", encoding="utf-8")
    assert Tokenizer.from_pretrained_dir(tmp_path).chat_template == "JINJA"


def test_missing_tokenizer_json_names_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        Tokenizer.from_pretrained_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(info.value)


@pytest.mark.parametrize(
    "name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
)
def test_corrupt_file_names_file(tmp_path: Path, name: str) -> None:
    _save(tmp_path, add_bos_post_processor=False)
    (tmp_path / name).write_text("{not json", encoding="utf-8")
    with pytest.raises(ModelLoadError) as info:
        Tokenizer.from_pretrained_dir(tmp_path)
    assert str(tmp_path / name) in str(info.value)
