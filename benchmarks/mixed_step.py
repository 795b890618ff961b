"""A prompt arriving while other sequences decode: the time of the engine step that prefills it.

Continuous batching puts a new request's prompt chunk into the same step as the running
sequences' decode tokens. ``--decoding`` requests with short prompts are started and stepped
until they all decode; then one request with a ``--prompt``-token prompt is added and the next
step (its prompt beside their decode tokens) is timed, then a pure decode step for comparison.
Medians of ``--rounds`` rounds, each round on a fresh set of requests.

``--cached-context N`` adds a second case: a follow-up turn (an N-token prompt already in the
prefix cache plus 16 new tokens: a 16-token chunk at context N) arriving with the new prompt,
their step against each alone.

    python benchmarks/mixed_step.py --model small-BF16.gguf --decoding 1,4,16 --prompt 512
    python benchmarks/mixed_step.py --model small-BF16.gguf --decoding 1 --cached-context 1904
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

from py_peer import random_prompts  # noqa: E402

from carpool import LLM, SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file or HF directory")
    ap.add_argument("--decoding", default="1,4,16", help="comma-separated running sequences")
    ap.add_argument("--prompt", type=int, default=512, help="the arriving prompt's tokens")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cached-context", type=int, help="a follow-up turn's cached tokens")
    ap.add_argument(
        "--row-limits",
        choices=("default", "any", "128"),
        default="default",
        help="the quantized kernels' row limits: this CPU's, none (every row count), or 128",
    )
    a = ap.parse_args()
    set_row_limits(a.row_limits)
    sizes = [int(x) for x in a.decoding.split(",")]
    llm = LLM(
        a.model,
        max_num_seqs=max(sizes) + 1,
        # The whole prompt and every decode token in one step.
        max_num_batched_tokens=a.prompt + max(sizes) + (16 if a.cached_context else 0),
        max_model_len=max(a.prompt, (a.cached_context or 0) + 16) + 64,
        kv_cache_memory_fraction=1.0,
        threads=a.threads,
    )
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    print(f"{a.model}: {a.threads} threads, a {a.prompt}-token prompt arriving; ms a step")
    print("| decoding | prompt alone | prompt + decoding (mixed) | pure decode |")
    print("|---:|---:|---:|---:|")
    for n in [0, *sizes]:
        mixed, decode = [], []
        for r in range(a.rounds + 1):  # the first round untimed
            for p in random_prompts(n, 32, vocab, 100 * r + n):
                engine.add_request(p, params)
            while n and _step(engine).num_prefill_tokens:
                pass  # until the running sequences' prompts are done
            # (a new prompt each time: a cached prefix would skip its prefill)
            engine.add_request(random_prompts(1, a.prompt, vocab, -1 - 1000 * n - r)[0], params)
            rec = _step(engine)
            assert rec.num_prefill_tokens == a.prompt, ("the prompt in one step", rec)
            if n:
                pure = _step(engine)  # the new sequence's first decode beside the others
                assert pure.num_prefill_tokens == 0
            if r:
                mixed.append(rec.duration * 1e3)
                if n:
                    decode.append(pure.duration * 1e3)
            while engine.has_unfinished():
                engine.step()
        m = statistics.median(mixed)
        d = f"{statistics.median(decode):.1f}" if decode else "-"
        if n == 0:
            alone = m
            print(f"| 0 | {alone:.1f} | - | - |", flush=True)
        else:
            print(f"| {n} | {alone:.1f} | {m:.1f} ({m / alone:.2f}x) | {d} |", flush=True)
    if a.cached_context:
        follow_up(engine, a.cached_context, a.prompt, a.rounds)


def follow_up(engine, cached: int, prompt: int, rounds: int) -> None:  # noqa: ANN001
    """A follow-up turn (``cached`` tokens in the prefix cache + 16 new ones) arriving with a
    new ``prompt``-token prompt: their step, and each alone (ms, medians)."""
    vocab = engine.model_config.vocab_size
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {"both": [], "follow-up": [], "prompt": []}
    for r in range(rounds + 1):
        for case in times:
            history = random_prompts(1, cached, vocab, 7000 + 10 * r + len(case))[0]
            engine.add_request(history, one)  # the earlier turn, into the prefix cache
            while engine.has_unfinished():
                engine.step()
            new = 16 if case != "prompt" else 0
            if case != "prompt":
                engine.add_request(history + random_prompts(1, 16, vocab, -r)[0], one)
            if case != "follow-up":
                seed = 9000 + 10 * r + len(case)  # new each time: nothing of it cached
                engine.add_request(random_prompts(1, prompt, vocab, seed)[0], one)
                new += prompt
            rec = _step(engine)
            assert rec.num_prefill_tokens == new, ("the cached prefix reused", rec)
            if r:
                times[case].append(rec.duration * 1e3)
            while engine.has_unfinished():
                engine.step()
    m = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"\nA follow-up turn (16 new tokens at context {cached}) with a new {prompt}-token "
        f"prompt: {m['both']:.1f} ms together; alone {m['follow-up']:.1f} + {m['prompt']:.1f} = "
        f"{m['follow-up'] + m['prompt']:.1f} ms"
    )


def set_row_limits(which: str) -> None:
    """``fused_ops``' row limits for the quantized kernels: this CPU's defaults, none (the
    kernels take every row count, as where bf16 is emulated) or at most 128 (the widened GEMM
    past them, as before the twenty-ninth pass); set before the model is built."""
    from carpool.model import fused_ops

    if which == "default":
        return
    for name in fused_ops.ROW_LIMITS:
        limit = getattr(fused_ops, name)
        setattr(fused_ops, name, fused_ops.ANY_ROWS if which == "any" else min(limit, 128))


def _step(engine):  # noqa: ANN001, ANN202
    """One engine step; its record."""
    before = engine.stats.steps
    engine.step()
    assert engine.stats.steps == before + 1
    return engine.stats.records[-1]


if __name__ == "__main__":
    main()
