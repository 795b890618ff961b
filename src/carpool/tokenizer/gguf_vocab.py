"""Rebuild a ``tokenizers.Tokenizer`` from the ``tokenizer.ggml.*`` metadata of a GGUF file.

Two vocabulary kinds are supported, matching llama.cpp's tokenizers:

* ``"llama"``: SentencePiece BPE (Llama 2, Mistral v0.1, Phi-3...). llama.cpp's
  ``llm_tokenizer_spm`` replaces spaces by ``"▁"``, prepends one ``"▁"``, then greedily merges
  adjacent symbols whose concatenation is a vocabulary token, highest score first (leftmost on
  ties), and falls back to ``<0xNN>`` byte tokens for what remains unknown. That is exactly a BPE
  model whose merges are every split ``(left, right)`` of a token with both halves in the
  vocabulary, ranked by the merged token's score, with ``byte_fallback`` on.
* ``"gpt2"``: byte-level BPE with explicit merges and a regex pre-tokenizer chosen by the
  ``tokenizer.ggml.pre`` name (Llama 3, GPT-2, Qwen2...).

Known divergence, on purpose: llama.cpp's SPM may merge plain text into a control, byte or unused
token (e.g. literal ``<0x0A>`` text when the partial pieces exist); here only normal tokens are
merge results, so such text stays plain text, as SentencePiece itself tokenizes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from carpool.errors import ModelLoadError
from carpool.tokenizer.post_processor import bos_eos_processor

# llama.cpp's token types (``llama_token_type``), stored in ``tokenizer.ggml.token_type``.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Regexes of llama.cpp's BPE pre-tokenizers; each splits the pieces the previous one produced.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "starcoder": (r"\p{N}", _GPT2),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
}
# Other names llama.cpp gives the same pre-tokenizer.
_PRE_TOKENIZER_ALIASES = {
    "gpt2": "gpt-2",
    "mpt": "gpt-2",
    "olmo": "gpt-2",
    "jais": "gpt-2",
    "llama3": "llama-bpe",
    "llama-v3": "llama-bpe",
    "falcon3": "llama-bpe",
    "dbrx": "llama-bpe",
    "smaug-bpe": "llama-bpe",
    "qwen2.5": "qwen2",
    "qwen-2.5": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "stablelm2": "qwen2",
    "refact": "starcoder",
    "command-r": "starcoder",
    "smollm": "starcoder",
    "codeshell": "starcoder",
    "exaone": "starcoder",
    "minerva-7b": "starcoder",
}
# llama.cpp emits a whole pre-token that is itself in the vocabulary without running merges.
_IGNORE_MERGES = {"llama-bpe"}


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of one GGUF file, as llama.cpp reads it."""

    source: str
    model: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str = "default"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool = False
    add_space_prefix: bool = True
    chat_template: str | None = None

    @property
    def add_bos(self) -> bool:
        """Whether encoding with special tokens prepends BOS (llama.cpp's default per kind)."""
        if self.add_bos_token is not None:
            return self.add_bos_token
        return self.model == "llama" or self.pre_name == "llama-bpe"

    @property
    def pre_name(self) -> str:
        """The canonical llama.cpp pre-tokenizer name (aliases resolved)."""
        return _PRE_TOKENIZER_ALIASES.get(self.pre, self.pre)


def _metadata_getter(path_or_reader: str | os.PathLike[str] | Any) -> tuple[str, Any]:
    """``(source name, key -> value or None)`` of a path, a ``GGUFFile`` or a ``GGUFReader``."""
    from carpool.model.gguf_file import GGUFFile

    if isinstance(path_or_reader, (str, os.PathLike)):
        # Metadata only: the file is closed again (its tensors are not this module's business).
        with GGUFFile(path_or_reader) as f:
            return os.fspath(path_or_reader), f.get
    if isinstance(path_or_reader, GGUFFile):
        return os.fspath(path_or_reader.path), path_or_reader.get
    reader = path_or_reader  # a gguf.GGUFReader someone already opened

    def get(key: str) -> Any:
        field_ = reader.fields.get(key)
        return None if field_ is None else field_.contents()

    return os.fspath(getattr(reader, "path", "<GGUFReader>")), get


def read_gguf_vocab(path_or_reader: str | os.PathLike[str] | Any) -> GGUFVocab:
    """Read the ``tokenizer.*`` keys of a GGUF file.

    Args:
        path_or_reader: a GGUF file path, an open ``carpool.model.gguf_file.GGUFFile`` or an
            open ``gguf.GGUFReader``.

    Returns:
        The vocabulary metadata.

    Raises:
        ModelLoadError: the file cannot be read or has no usable tokenizer metadata.
    """
    source, meta = _metadata_getter(path_or_reader)

    def get(key: str) -> Any:
        return meta(f"tokenizer.{key}")

    model = get("ggml.model")
    tokens = get("ggml.tokens")
    if model is None or tokens is None:
        raise ModelLoadError(f"{source}: no tokenizer.ggml.model / tokenizer.ggml.tokens metadata")
    if model not in ("llama", "gpt2"):
        raise ModelLoadError(f"{source}: unsupported tokenizer.ggml.model {model!r}")
    token_types = get("ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    add_space_prefix = get("ggml.add_space_prefix")
    vocab = GGUFVocab(
        source=source,
        model=model,
        tokens=list(tokens),
        token_types=[int(t) for t in token_types],
        scores=[float(s) for s in get("ggml.scores") or []],
        merges=list(get("ggml.merges") or []),
        pre=get("ggml.pre") or "default",
        bos_token_id=get("ggml.bos_token_id"),
        eos_token_id=get("ggml.eos_token_id"),
        unk_token_id=get("ggml.unknown_token_id"),
        add_bos_token=get("ggml.add_bos_token"),
        add_eos_token=bool(get("ggml.add_eos_token")),
        add_space_prefix=True if add_space_prefix is None else bool(add_space_prefix),
        chat_template=get("chat_template"),
    )
    if len(vocab.token_types) != len(vocab.tokens):
        raise ModelLoadError(f"{source}: tokenizer.ggml.token_type does not match the token list")
    if model == "llama" and len(vocab.scores) != len(vocab.tokens):
        raise ModelLoadError(f"{source}: SentencePiece vocabulary without one score per token")
    if model == "gpt2" and vocab.pre_name not in _PRE_TOKENIZER_REGEXES:
        raise ModelLoadError(f"{source}: unsupported tokenizer.ggml.pre {vocab.pre!r}")
    return vocab


def _spm_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal token into two vocabulary tokens, best score first."""
    ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for i, tok in enumerate(vocab.tokens):
        if vocab.token_types[i] != TOKEN_NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                ranked.append((-vocab.scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_spm(vocab: GGUFVocab) -> HFTokenizer:
    token_ids = {tok: i for i, tok in enumerate(vocab.tokens)}
    unk = vocab.tokens[vocab.unk_token_id] if vocab.unk_token_id is not None else None
    tok = HFTokenizer(
        models.BPE(
            vocab=token_ids,
            merges=_spm_merges(vocab),
            unk_token=unk,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    steps: list[normalizers.Normalizer] = []
    if vocab.add_space_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    decode_steps: list[decoders.Decoder] = [
        decoders.Replace("▁", " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if vocab.add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode_steps)
    return tok


def _build_bpe(vocab: GGUFVocab) -> HFTokenizer:
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    pre = vocab.pre_name
    tok = HFTokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(vocab.tokens)},
            merges=merges,
            ignore_merges=pre in _IGNORE_MERGES,
        )
    )
    splits: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        for pattern in _PRE_TOKENIZER_REGEXES[pre]
    ]
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()
    return tok


def build_hf_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """Build the ``tokenizers.Tokenizer`` that tokenizes like llama.cpp does for ``vocab``.

    Control tokens become special added tokens and user-defined tokens plain added tokens, so both
    are matched whole in the input text (llama.cpp's ``parse_special``) and control tokens are the
    ones ``skip_special_tokens`` drops when decoding.
    """
    tok = _build_spm(vocab) if vocab.model == "llama" else _build_bpe(vocab)
    boundary_ids = {vocab.bos_token_id, vocab.eos_token_id}
    special: list[AddedToken] = []
    plain: list[AddedToken] = []
    for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.token_types, strict=True)):
        if kind == TOKEN_CONTROL or i in boundary_ids:
            special.append(AddedToken(text, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            plain.append(AddedToken(text, special=False, normalized=False))
    tok.add_special_tokens(special)
    tok.add_tokens(plain)
    bos = vocab.bos_token_id if vocab.add_bos else None
    eos = vocab.eos_token_id if vocab.add_eos_token else None
    if bos is not None or eos is not None:
        tok.post_processor = bos_eos_processor(
            None if bos is None else (vocab.tokens[bos], bos),
            None if eos is None else (vocab.tokens[eos], eos),
        )
    return tok
