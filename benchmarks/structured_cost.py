"""Per-token CPU cost of three grammar engines with carpool's real tokenizers.

For each engine (llguidance, xgrammar, outlines-core) and tokenizer (the embedded model's
4096-token BPE and SmolLM2-135M's 49152-token BPE from its GGUF), compile one JSON schema, then
walk a valid document token by token: per token, compute the allowed-token mask and advance the
matcher. Prints one line per (tokenizer, engine) with the compile time and the median per-token
cost, and writes JSON.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/structured_cost.py \
        --gguf PATH  # SmolLM2: carpool.model.source.default_chat_model_path()
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch

from carpool.tokenizer.tokenizer import Tokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
DOC = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.com",
    "tags": ["math", "engines", "poetry"],
    "address": {"city": "London", "zip": "W1"},
    "active": True,
}


def _bench_llguidance(tok: Tokenizer, ids: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer(
        tok.backend_json(), n_vocab=tok.vocab_size, eos_token=list(tok.eos_token_ids)
    )
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}
    )
    m = llguidance.LLMatcher(lltok, grammar)
    assert not m.is_error(), m.get_error()
    compile_s = time.perf_counter() - t0
    mask = lt.allocate_token_bitmask(1, tok.vocab_size)
    per: list[float] = []
    for t in ids:
        t0 = time.perf_counter()
        lt.fill_next_token_bitmask(m, mask, 0)
        ok = m.consume_token(t)
        per.append(time.perf_counter() - t0)
        assert ok, f"llguidance rejected {t}: {m.get_error()}"
    print(f"  llguidance tokenizer build {tok_s * 1e3:.0f} ms")
    return compile_s, per


def _bench_xgrammar(tok: Tokenizer, ids: list[int]) -> tuple[float, list[float]]:
    import xgrammar as xgr
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tok.backend_json()))
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(
        hf, vocab_size=tok.vocab_size, stop_token_ids=list(tok.eos_token_ids)
    )
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    per: list[float] = []
    for t in ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        ok = m.accept_token(t)
        per.append(time.perf_counter() - t0)
        assert ok, f"xgrammar rejected {t}"
    print(f"  xgrammar tokenizer build {tok_s * 1e3:.0f} ms")
    return compile_s, per


def _token_bytes(tok: Tokenizer) -> dict[bytes, list[int]]:
    # Byte-level BPE: every vocabulary string maps back to bytes through GPT-2's byte table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    decoder = {chr(c): b for b, c in zip(bs, cs, strict=True)}
    eos = set(tok.eos_token_ids)
    out: dict[bytes, list[int]] = {}
    for i, s in enumerate(tok.convert_ids_to_tokens(list(range(tok.vocab_size)))):
        if s is None or i in eos or any(ch not in decoder for ch in s):
            continue
        out.setdefault(bytes(decoder[ch] for ch in s), []).append(i)
    return out


def _bench_outlines(tok: Tokenizer, ids: list[int]) -> tuple[float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    vocab = Vocabulary(tok.eos_token_ids[0], _token_bytes(tok))
    t0 = time.perf_counter()
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index = Index(regex, vocab)
    compile_s = time.perf_counter() - t0
    guide = Guide(index)
    mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    per: list[float] = []
    for t in ids:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        guide.advance(t, return_tokens=False)
        per.append(time.perf_counter() - t0)
    return compile_s, per


ENGINES: dict[str, Callable[[Tokenizer, list[int]], tuple[float, list[float]]]] = {
    "llguidance": _bench_llguidance,
    "xgrammar": _bench_xgrammar,
    "outlines-core": _bench_outlines,
}


def main() -> None:
    """Run every engine on every tokenizer and print/write the costs."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="a GGUF file whose tokenizer to add (SmolLM2)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--json-out", default="benchmarks/results/structured_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    toks = {"embedded": Tokenizer.from_pretrained_dir(str(files("carpool") / "data/default_model"))}
    if args.gguf:
        toks["smollm2"] = Tokenizer.from_gguf(args.gguf)
    text = json.dumps(DOC, separators=(",", ":"))
    results = []
    for tname, tok in toks.items():
        ids = tok.encode(text, add_special_tokens=False)
        for ename in args.engines.split(","):
            compile_s, per = ENGINES[ename](tok, ids)
            row = {
                "tokenizer": tname,
                "vocab": tok.vocab_size,
                "engine": ename,
                "compile_ms": compile_s * 1e3,
                "tokens": len(ids),
                "per_token_us_median": statistics.median(per) * 1e6,
                "per_token_us_p90": sorted(per)[int(0.9 * len(per))] * 1e6,
                "per_token_us_mean": statistics.fmean(per) * 1e6,
            }
            results.append(row)
            print(
                f"{tname:9s} vocab={tok.vocab_size:6d} {ename:13s}"
                f" compile={row['compile_ms']:8.1f} ms"
                f"  per-token median={row['per_token_us_median']:7.1f} us"
                f" p90={row['per_token_us_p90']:7.1f} us mean={row['per_token_us_mean']:7.1f} us"
                f"  ({len(ids)} tokens)"
            )
    with open(args.json_out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
