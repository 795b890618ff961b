"""A float32 model's prompt attention over a bf16 cache in bf16 or in float32: prefill time.

``attention.BF16_PROMPT_ATTENTION`` switched per round in one engine (the order alternated):
the prompt rectangles' SDPA calls in bf16 (queries rounded, K/V gathered as the cache's bf16
values) or in float32 (K/V widened). For each ``--prompt-len``, a fresh random prompt each
round is prefilled in the engine's chunks of
``--max-num-batched-tokens`` until its first token; medians of ``--rounds``. Then the same
prompt once each way: the largest difference of its first token's logits and whether the
greedy token agrees. Last, torch's SDPA alone at the model's head shape, float32 against bf16
(a tile of rows over 512 keys, the causal square).

    python benchmarks/prefill_bf16_attention.py --prompt-len 512,1024,2048 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import checkout  # noqa: F401  (this checkout's src first on sys.path)
import torch
import torch.nn.functional as F

from carpool import LLM, SamplingParams
from carpool.model import attention

DEFAULT_MODEL = "SmolLM2-135M-Instruct.Q4_1 (the default model)"


def prefill_ms(llm: LLM, prompt: list[int]) -> tuple[float, int, dict[int, float]]:
    """Steps from the prompt's arrival to its first token: ms, the (greedy) token, and the
    top-5 logprobs of that position."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=5)
    engine = llm.engine
    engine.add_request(prompt, params)
    start = time.perf_counter()
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    ms = (time.perf_counter() - start) * 1e3
    [out] = [o for o in outputs if o.finished]
    first = out.outputs[0].logprobs[0]
    return ms, first.token_id, dict(first.top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help=f"GGUF file or HF directory ({DEFAULT_MODEL})")
    ap.add_argument("--prompt-len", default="512,1024,2048", help="comma-separated lengths")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-cache-dtype", default="bfloat16", choices=("bfloat16", "int8"))
    a = ap.parse_args()
    lengths = [int(x) for x in a.prompt_len.split(",")]
    llm = LLM(
        a.model,
        max_num_seqs=4,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=max(lengths) + 16,
        threads=a.threads,
        enable_prefix_caching=False,  # the same prompt computed each way
        kv_cache_dtype=a.kv_cache_dtype,
    )
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    model = a.model or DEFAULT_MODEL
    cache = engine.runner.kv_caches[0].dtype
    print(f"{model}: {a.threads} threads, KV cache {cache}, chunks of {a.max_num_batched_tokens}")
    print("| prompt | float32 ms | bf16 ms | float32 / bf16 | top-5 logprob diff | same token |")
    print("|---:|---:|---:|---:|---:|---|")
    rnd = random.Random(0)
    paths = {"float32": False, "bf16": True}
    for n in lengths:
        times: dict[str, list[float]] = {k: [] for k in paths}
        for r in range(a.rounds + 1):  # the first round untimed
            order = list(paths) if r % 2 else list(reversed(paths))
            for name in order:
                attention.BF16_PROMPT_ATTENTION = paths[name]
                ms, _, _ = prefill_ms(llm, [rnd.randrange(3, vocab) for _ in range(n)])
                if r:
                    times[name].append(ms)
        prompt = [rnd.randrange(3, vocab) for _ in range(n)]
        tokens, tops = {}, {}
        for name, on in paths.items():
            attention.BF16_PROMPT_ATTENTION = on
            _, tokens[name], tops[name] = prefill_ms(llm, prompt)
        f, b = (statistics.median(times[k]) for k in paths)
        if tops["float32"].keys() == tops["bf16"].keys():
            diff = max(abs(tops["float32"][i] - tops["bf16"][i]) for i in tops["bf16"])
            diff_text = f"{diff:.4f}"
        else:
            diff_text = "other top 5"
        same = tokens["float32"] == tokens["bf16"]
        print(f"| {n} | {f:.0f} | {b:.0f} | {f / b:.2f}x | {diff_text} | {same} |", flush=True)
    attention.BF16_PROMPT_ATTENTION = None
    sdpa_alone(engine.model_config, a.threads)


def sdpa_alone(config, threads: int) -> None:  # noqa: ANN001
    """torch's SDPA at the model's head shape: float32 against bf16, medians of 20 calls."""
    torch.set_num_threads(threads)
    h, kvh = config.num_attention_heads, config.num_key_value_heads
    d = config.hidden_size // h
    print(f"\nSDPA alone ({h} heads / {kvh} kv heads of {d}, 512 keys), us a call")
    print("| rows | float32 | bf16 | float32 / bf16 |")
    print("|---:|---:|---:|---:|")
    for rows in (32, 128, 512):
        us = {}
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(1, h, rows, d, dtype=dtype)
            k, v = (torch.randn(1, kvh, 512, d, dtype=dtype) for _ in range(2))

            def call() -> None:
                F.scaled_dot_product_attention(q, k, v, is_causal=rows == 512, enable_gqa=True)  # noqa: B023

            for _ in range(3):
                call()
            ts = []
            for _ in range(20):
                start = time.perf_counter()
                call()
                ts.append(time.perf_counter() - start)
            us[dtype] = statistics.median(ts) * 1e6
        f, b = us[torch.float32], us[torch.bfloat16]
        print(f"| {rows} | {f:.0f} | {b:.0f} | {f / b:.2f}x |")


if __name__ == "__main__":
    main()
