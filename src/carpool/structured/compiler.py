"""Compile ``StructuredOutputsParams`` into xgrammar grammars, once per distinct constraint.

xgrammar was chosen by measurement (``benchmarks/structured_cost.py``, BENCHMARKS.md): its
per-token mask + advance cost was the lowest of the engines that also compile a schema in
milliseconds (outlines-core is cheaper per token but compiles an index for seconds and has no
grammars; llguidance compiles fastest but costs ~6x more per token).

Compilation is thread-safe and cached by the constraint itself, so the HTTP server compiles a
request's grammar in a worker thread before submitting it and the engine thread only finds it
in the cache: one client's new schema never stalls the others' decode.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from carpool.errors import InvalidRequestError
from carpool.structured.params import StructuredOutputsParams
from carpool.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    import xgrammar as xgr

_CACHE_SIZE = 256


def _vocab_type(tokenizer: Tokenizer) -> Any:
    """How vocabulary strings spell bytes: GPT-2 byte-level, SentencePiece byte fallback, raw."""
    import xgrammar as xgr

    spec = json.loads(tokenizer.backend_json())
    decoder = json.dumps(spec.get("decoder") or {})
    if '"ByteLevel"' in decoder:
        return xgr.VocabType.BYTE_LEVEL
    if '"ByteFallback"' in decoder:
        return xgr.VocabType.BYTE_FALLBACK
    return xgr.VocabType.RAW


def _choice_ebnf(choice: tuple[str, ...]) -> str:
    # GBNF string literals take JSON's escapes; keep non-ASCII as is (no \u escapes).
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choice)


class GrammarCompiler:
    """Turns constraints into ``xgr.CompiledGrammar`` for one tokenizer, with an LRU cache.

    Args:
        tokenizer: the model's tokenizer.
        vocab_size: width of the model's logits (may exceed the tokenizer's vocabulary).
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr  # seconds to import: only when a constraint is first seen

        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        tokens = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
        info = xgr.TokenizerInfo(
            [t or "" for t in tokens],
            _vocab_type(tokenizer),
            vocab_size=self.vocab_size,
            stop_token_ids=list(tokenizer.eos_token_ids),
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._cache: OrderedDict[StructuredOutputsParams, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar of ``params`` (from the cache when seen before).

        Raises:
            InvalidRequestError: the schema, regex or grammar does not compile; ``param`` names
                the request field it came from.
        """
        key = StructuredOutputsParams(**{**params.__dict__, "param": "structured_outputs"})
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(params)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, p: StructuredOutputsParams) -> xgr.CompiledGrammar:
        try:
            if p.json is not None:
                # No free whitespace: a weak model would otherwise pad until max_tokens.
                return self._compiler.compile_json_schema(p.json, any_whitespace=False)
            if p.json_object:
                return self._compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if p.regex is not None:
                return self._compiler.compile_regex(p.regex)
            if p.choice is not None:
                return self._compiler.compile_grammar(_choice_ebnf(p.choice))
            assert p.grammar is not None
            return self._compiler.compile_grammar(p.grammar)
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(
                f"cannot compile the {p.kind} constraint: {exc}", param=p.param
            ) from None


_compilers: weakref.WeakKeyDictionary[Tokenizer, dict[int, GrammarCompiler]]
_compilers = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int) -> GrammarCompiler:
    """The shared ``GrammarCompiler`` of a tokenizer (built on first use, ~0.1-1 s).

    The server and the engine of one process get the same object, so a grammar the server
    compiled in a worker thread is a cache hit on the engine thread.
    """
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        raise InvalidRequestError(
            "structured outputs need the xgrammar package, which is not installed"
            " (pip install --no-deps xgrammar apache-tvm-ffi; see requirements/constraints.txt)",
            code="structured_outputs_unavailable",
        ) from None
    with _compilers_lock:
        per_tok = _compilers.setdefault(tokenizer, {})
        comp = per_tok.get(vocab_size)
        if comp is None:
            comp = per_tok[vocab_size] = GrammarCompiler(tokenizer, vocab_size)
        return comp
