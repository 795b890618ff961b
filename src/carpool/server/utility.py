"""vLLM's utility endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /version``.

Shapes follow vLLM: ``/tokenize`` takes a ``prompt`` (special tokens added by default) or chat
``messages`` (rendered with the model's template; nothing added on top by default) and answers
``{count, max_model_len, tokens, token_strs}``; ``/detokenize`` takes ``tokens`` and answers
``{prompt}``.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version

from carpool.errors import CarpoolError, InvalidRequestError
from carpool.server.errors import APIError, error_to_api
from carpool.server.protocol_ext import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from carpool.server.serving import OpenAIServing


def carpool_version() -> str:
    """The installed package's version."""
    try:
        return version("carpool")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


class UtilityServing(OpenAIServing):
    """Tokenize and detokenize with the served model's tokenizer."""

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """``POST /tokenize``."""
        if req.model is not None:
            self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        try:
            if req.messages is not None:
                tools = [t.model_dump(mode="json") for t in req.tools or []]
                extra = {"tools": tools} if tools else {}
                text = await asyncio.to_thread(
                    self.tokenizer.apply_chat_template,
                    req.messages,
                    add_generation_prompt=req.add_generation_prompt,
                    **extra,
                )
                assert isinstance(text, str)
                special = bool(req.add_special_tokens)  # the template wrote BOS already
            else:
                text = req.prompt or ""
                special = req.add_special_tokens is not False
            ids = await asyncio.to_thread(self.tokenizer.encode, text, special)
        except InvalidRequestError as e:
            param = "messages" if req.messages is not None else "prompt"
            raise APIError(400, e.message, param=param) from None
        strs = [self.token(t) for t in ids] if req.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=self.limits.max_model_len, tokens=ids, token_strs=strs
        )

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """``POST /detokenize``: token ids (checked against the vocabulary) to text."""
        if req.model is not None:
            self.check_model(req.model)
        try:
            if req.tokens:
                self.limits.check_prompt_ids(req.tokens, "tokens")
        except CarpoolError as e:
            raise error_to_api(e) from None
        text = await asyncio.to_thread(self.tokenizer.decode, req.tokens)
        return DetokenizeResponse(prompt=text)
