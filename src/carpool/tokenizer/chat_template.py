"""Render Hugging Face chat templates (Jinja) the way ``transformers`` does.

Templates come from model repositories, so they run in jinja2's immutable sandbox. The environment
mirrors ``transformers.utils.chat_template_utils``: ``trim_blocks`` and ``lstrip_blocks``, the loop
controls extension, a ``tojson`` filter that keeps non-ASCII text and HTML characters as they are,
and the ``raise_exception`` and ``strftime_now`` globals that templates call.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from carpool.errors import InvalidRequestError


class _TemplateRaised(Exception):
    """What a template's ``raise_exception(message)`` call raises inside jinja."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; prompts need the text unchanged.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # Cached because a server renders the same template for every request.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja source, as ``tokenizer_config.json`` or GGUF metadata carries it.

    Raises:
        InvalidRequestError: the source is not valid Jinja.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = _compile(source)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidRequestError(f"chat template has a syntax error: {exc}") from exc

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        bos_token: str | None = None,
        eos_token: str | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation to prompt text.

        Args:
            messages: the conversation, each a dict with at least ``role`` and ``content``.
            add_generation_prompt: end with the header that opens the assistant's turn.
            bos_token: the text the template may print as ``bos_token``.
            eos_token: the text the template may print as ``eos_token``.
            **extra: further template variables (``tools``, ``documents``, ``enable_thinking``...).

        Returns:
            The rendered prompt.

        Raises:
            InvalidRequestError: the template rejected the conversation (``raise_exception``) or
                failed while rendering it.
        """
        variables: dict[str, Any] = {"tools": None, "documents": None}
        # An absent special token stays undefined (renders as ""), as in transformers, never "None".
        if bos_token is not None:
            variables["bos_token"] = bos_token
        if eos_token is not None:
            variables["eos_token"] = eos_token
        variables.update(extra)
        variables["messages"] = messages
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template.render(**variables)
        except _TemplateRaised as exc:
            raise InvalidRequestError(f"chat template rejected the conversation: {exc}") from exc
        except (jinja2.TemplateError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidRequestError(f"chat template failed to render: {exc}") from exc
