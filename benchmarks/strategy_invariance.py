"""Do the batching strategies give the sequential strategy's greedy tokens and logprobs on a model?

The same prompts (``--lengths`` tokens each, random ids) go through ``LLM.generate`` once per
configuration: every batching strategy, ``max_num_seqs=2``, other step budgets, prefix caching
off, the padded layout. Each is compared with ``batching="sequential"``: how many prompts got
other greedy tokens, and the largest difference of a chosen token's logprob. A row's numbers
should not depend on the rows that share its step; where they do (a kernel chosen by the
step's row count, an attention call shaped by the step's chunking) greedy tokens part ways.

``--row-limits`` sets the quantized kernels' row limits as ``mixed_step.py`` does (``default``:
this CPU's; ``any``: the kernels at every row count; ``128``: the widened GEMM past 128 rows).

    python benchmarks/strategy_invariance.py --model SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

from mixed_step import set_row_limits  # noqa: E402
from py_peer import _vocab_size, random_prompts  # noqa: E402

from carpool import LLM, SamplingParams  # noqa: E402

CONFIGS: dict[str, dict[str, object]] = {
    "continuous": {},
    "static": dict(batching="static", batch_size=4),
    "bucketed": dict(batching="bucketed", batch_size=4),
    "dynamic": dict(batching="dynamic", batch_size=4),
    "max_num_seqs=2": dict(max_num_seqs=2),
    "budget 64": dict(max_num_batched_tokens=64),
    "budget 100": dict(max_num_batched_tokens=100),
    "no prefix caching": dict(enable_prefix_caching=False),
    "padded layout, static": dict(batching="static", batch_size=4, layout="padded"),
    "padded layout, continuous": dict(layout="padded"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="GGUF file or HF directory")
    ap.add_argument("--lengths", default="4,40,130,300,520,700,900,1100")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--row-limits", choices=("default", "any", "128"), default="default")
    a = ap.parse_args()
    set_row_limits(a.row_limits)
    lengths = [int(n) for n in a.lengths.split(",")]
    vocab = _vocab_size(a.model)
    prompts = [random_prompts(1, n, vocab, 17 + n)[0] for n in lengths]
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True, logprobs=1)

    def run(**kw: object) -> list[list[tuple[int, float]]]:
        llm = LLM(a.model, max_model_len=max(lengths) + a.max_tokens + 8, threads=a.threads, **kw)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [[(lp.token_id, lp.logprob) for lp in o.outputs[0].logprobs] for o in outs]

    t0 = time.perf_counter()
    reference = run(batching="sequential")
    print(f"{a.model}: {len(prompts)} prompts of {a.lengths} tokens, {a.max_tokens} greedy tokens")
    print(f"row limits: {a.row_limits}; against batching='sequential'")
    print("| configuration | prompts with other tokens | largest logprob difference |")
    print("|---|---:|---:|")
    for name, kw in CONFIGS.items():
        got = run(**kw)
        other = sum(
            [t for t, _ in g] != [t for t, _ in r] for g, r in zip(got, reference, strict=True)
        )
        diff = max(_logprob_difference(g, r) for g, r in zip(got, reference, strict=True))
        print(f"| {name} | {other} of {len(prompts)} | {diff:.3g} |", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")


def _logprob_difference(got: list[tuple[int, float]], ref: list[tuple[int, float]]) -> float:
    """The largest difference of the chosen token's logprob up to the first other token."""
    worst = 0.0
    for (tg, lg), (tr, lr) in zip(got, ref, strict=True):
        if tg != tr:
            break
        worst = max(worst, abs(lg - lr))
    return worst


if __name__ == "__main__":
    main()
