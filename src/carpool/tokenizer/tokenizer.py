"""The engine's tokenizer: text <-> token ids, special tokens and the chat template.

One class over a ``tokenizers.Tokenizer`` whichever way the model ships its vocabulary: a Hugging
Face directory (``tokenizer.json`` + ``tokenizer_config.json``) or the metadata of a GGUF file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from carpool.errors import InvalidRequestError, ModelLoadError
from carpool.tokenizer.chat_template import ChatTemplate
from carpool.tokenizer.gguf_vocab import build_hf_tokenizer, read_gguf_vocab
from carpool.tokenizer.post_processor import bos_eos_processor


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as configs spell it: a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_chat_template(value: Any) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (take "default")."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class Tokenizer:
    """Encodes and decodes text, and renders chat conversations to prompts.

    Build one with :meth:`from_pretrained_dir` or :meth:`from_gguf`.

    Args:
        backend: the ``tokenizers.Tokenizer`` doing the work, post-processor included (it decides
            which special tokens ``encode(..., add_special_tokens=True)`` adds).
        bos_token: text of the beginning-of-sequence token, if the model has one.
        eos_token: text of the end-of-sequence token, if the model has one.
        extra_eos_token_ids: more ids that end generation (``generation_config.json``).
        chat_template: Jinja source of the chat template, if any.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: list[int] | tuple[int, ...] = (),
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._bos_token = bos_token
        self._eos_token = eos_token
        eos_ids: list[int] = []
        for token_id in [self._id_of(eos_token), *extra_eos_token_ids]:
            if token_id is not None and token_id not in eos_ids:
                eos_ids.append(token_id)
        self._eos_token_ids = tuple(eos_ids)
        self._chat_template = chat_template
        self._compiled: ChatTemplate | None = None

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face tokenizer directory.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens,
        ``add_bos_token``/``add_eos_token``, chat template), ``chat_template.jinja`` (newer layout,
        preferred over the config's template) and ``generation_config.json`` (extra EOS ids).

        Args:
            path: the model or tokenizer directory.

        Returns:
            The tokenizer.

        Raises:
            ModelLoadError: ``tokenizer.json`` is missing, or a file is unreadable or corrupt; the
                message names the file.
        """
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{tokenizer_file}: tokenizer file not found")
        try:
            backend = HFTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises plain Exception on malformed files
            raise ModelLoadError(f"{tokenizer_file}: cannot load tokenizer: {exc}") from exc

        config_file = root / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        bos_token = _token_text(config.get("bos_token"))
        eos_token = _token_text(config.get("eos_token"))

        # transformers rebuilds the post-processor from these flags when the config sets them.
        if "add_bos_token" in config or "add_eos_token" in config:
            bos_id = backend.token_to_id(bos_token) if bos_token else None
            eos_id = backend.token_to_id(eos_token) if eos_token else None
            add_bos = bool(config.get("add_bos_token")) and bos_token and bos_id is not None
            add_eos = bool(config.get("add_eos_token")) and eos_token and eos_id is not None
            backend.post_processor = bos_eos_processor(
                (bos_token, bos_id) if add_bos else None,  # type: ignore[arg-type]
                (eos_token, eos_id) if add_eos else None,  # type: ignore[arg-type]
            )

        template_file = root / "chat_template.jinja"
        if template_file.is_file():
            try:
                chat_template: str | None = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"{template_file}: cannot read: {exc}") from exc
        else:
            chat_template = _pick_chat_template(config.get("chat_template"))

        generation_file = root / "generation_config.json"
        extra_eos: list[int] = []
        if generation_file.is_file():
            extra_eos = _ids(_read_json(generation_file).get("eos_token_id"))

        return cls(
            backend,
            bos_token=bos_token,
            eos_token=eos_token,
            extra_eos_token_ids=extra_eos,
            chat_template=chat_template,
        )

    @classmethod
    def from_gguf(cls, path_or_reader: str | os.PathLike[str] | Any) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its ``tokenizer.*`` metadata.

        The result tokenizes exactly as llama.cpp does for the supported kinds
        (SentencePiece ``"llama"`` and byte-level BPE ``"gpt2"``).

        Args:
            path_or_reader: a GGUF file path, an open ``GGUFFile`` or ``gguf.GGUFReader``.

        Returns:
            The tokenizer.

        Raises:
            ModelLoadError: the file is unreadable or its vocabulary kind is unsupported.
        """
        vocab = read_gguf_vocab(path_or_reader)
        backend = build_hf_tokenizer(vocab)

        def text(token_id: int | None) -> str | None:
            if token_id is None or not 0 <= token_id < len(vocab.tokens):
                return None
            return vocab.tokens[token_id]

        return cls(
            backend,
            bos_token=text(vocab.bos_token_id),
            eos_token=text(vocab.eos_token_id),
            chat_template=vocab.chat_template,
        )

    # ----------------------------------------------------------------- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize ``text``.

        Special-token text inside ``text`` (e.g. ``<|eot_id|>`` written by a chat template) is
        recognised as that token.

        Args:
            text: the text.
            add_special_tokens: add the tokens the model's config asks for (usually BOS).

        Returns:
            The token ids.
        """
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Turn token ids back into text.

        Args:
            ids: the token ids.
            skip_special_tokens: leave out special tokens (BOS, EOS, control tokens).

        Returns:
            The text.
        """
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        """The vocabulary strings of ``ids`` (``None`` for an id outside the vocabulary)."""
        return [self._backend.id_to_token(i) for i in ids]

    def backend_json(self) -> str:
        """The ``tokenizers`` JSON of this tokenizer (grammar engines read the vocabulary)."""
        return self._backend.to_str()

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ----------------------------------------------------------------- special tokens

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        """Text of the beginning-of-sequence token."""
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        """Text of the end-of-sequence token."""
        return self._eos_token

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-sequence token."""
        return self._id_of(self._bos_token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the tokenizer's EOS, then generation config's."""
        return self._eos_token_ids

    # ----------------------------------------------------------------- chat

    @property
    def chat_template(self) -> str | None:
        """Jinja source of the chat template, if the model has one."""
        return self._chat_template

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Render a conversation with the model's chat template.

        Args:
            messages: the conversation, each a dict with ``role`` and ``content``.
            add_generation_prompt: end with the header that opens the assistant's turn.
            tokenize: return token ids instead of text. The template writes BOS itself when the
                model wants it, so no special tokens are added on top (as transformers does).
            **extra: further template variables (``tools``, ``enable_thinking``...).

        Returns:
            The prompt text, or its token ids when ``tokenize`` is true.

        Raises:
            InvalidRequestError: the model has no chat template, or the template rejected the
                conversation (e.g. a system message for Gemma).
        """
        if self._chat_template is None:
            raise InvalidRequestError(
                "this model's tokenizer has no chat template; send a plain-text prompt instead"
            )
        if self._compiled is None:
            self._compiled = ChatTemplate(self._chat_template)
        text = self._compiled.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
            **extra,
        )
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text
