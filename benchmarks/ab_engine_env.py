"""Two engines in one process, one built with an environment switch set: their decode steps,
alternated request set by request set (the in-engine A/B of a switch read when an engine is
built, such as ``CARPOOL_WEIGHT_PAGES=0``: the weights left on the loader's 4 KiB pages).

Both engines load the same model with the same threads on this thread (one OpenMP pool). Each
round gives each engine, in turn (the order alternated), ``--batch`` new requests of
``--prompt-len`` tokens and ``--gen-len`` new tokens and steps it until they finish; the step
records of pure decode steps at the full batch count. Prints the median step of each engine
and the ratio (the switch's engine over the default one), per batch size.

    python benchmarks/ab_engine_env.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --env CARPOOL_WEIGHT_PAGES=0 --batch 1,16 --rounds 8
"""

from __future__ import annotations

import argparse
import os
import statistics

import checkout  # noqa: F401  (this checkout's src first on sys.path)

from carpool import LLM, SamplingParams


def decode_step_ms(llm: LLM, batch: int, prompt_len: int, gen_len: int, seed: int) -> float:
    """Median ms of the pure decode steps at ``batch`` sequences of one request set."""
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    for i in range(batch):  # prompts of their own: a cached prefix would skip the prefill
        start = 7919 * seed + 131 * i
        engine.add_request([3 + (start + j) % (vocab - 3) for j in range(prompt_len)], params)
    steps = []
    while engine.has_unfinished():
        engine.step()
        rec = engine.stats.records[-1]
        if rec.num_prefill_tokens == 0 and rec.num_seqs == batch:
            steps.append(rec.duration)
    assert steps, "no pure decode step at the full batch"
    return statistics.median(steps) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="GGUF file or HF directory")
    ap.add_argument("--env", required=True, help="NAME=VALUE set while the second engine builds")
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    name, _, value = a.env.partition("=")
    sizes = [int(b) for b in a.batch.split(",")]
    kw = dict(
        max_num_seqs=max(sizes),
        max_model_len=a.prompt_len + a.gen_len + 16,
        threads=a.threads,
        dtype=a.dtype,
    )
    engines = {"default": LLM(a.model, **kw)}
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        engines[a.env] = LLM(a.model, **kw)
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
    print(f"{a.model}: {a.threads} threads, decode ms a step, medians of {a.rounds} rounds")
    print(f"| batch | default | {a.env} | {a.env} / default |")
    print("|---:|---:|---:|---:|")
    for b in sizes:
        for llm in engines.values():  # warm-up
            decode_step_ms(llm, b, a.prompt_len, 16, 10_000)
        times: dict[str, list[float]] = {k: [] for k in engines}
        for r in range(a.rounds):
            order = list(engines) if r % 2 else list(reversed(engines))
            for k in order:
                times[k].append(decode_step_ms(engines[k], b, a.prompt_len, a.gen_len, r))
        d, s = (statistics.median(times[k]) for k in engines)
        print(f"| {b} | {d:.2f} | {s:.2f} | {s / d:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
