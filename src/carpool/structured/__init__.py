"""Structured outputs: constraints on what a request may generate, enforced while decoding.

``params.StructuredOutputsParams`` (the request side) names one constraint: a JSON schema, any
JSON object, a regex, a choice of strings or an EBNF grammar. ``compiler.GrammarCompiler`` turns
it into an xgrammar ``CompiledGrammar`` (cached, thread-safe, so the server compiles off the
engine thread), and ``processor.LogitsProcessor`` applies every constrained row's token mask,
and ``logit_bias``, to a step's logits in one batched call before sampling.

Only ``params`` is imported here: xgrammar loads when a compiler or processor is first used.
"""

from carpool.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
