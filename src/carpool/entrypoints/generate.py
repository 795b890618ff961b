"""``carpool generate``: run many prompts through one engine, like llama.cpp's ``parallel``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from carpool.entrypoints.engine_args import add_engine_arguments, engine_config_from_args
from carpool.errors import CarpoolError

if TYPE_CHECKING:
    from carpool.llm import LLM
    from carpool.outputs import RequestOutput


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p", "--prompt", action="append", default=[], help="a prompt (repeat for several)"
    )
    p.add_argument(
        "--prompts-file",
        type=Path,
        help="prompts, one per line, or JSONL with a 'prompt' field per line",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the model's chat template",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style penalty")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="generate past EOS")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    add_engine_arguments(p)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        for n, line in enumerate(args.prompts_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CarpoolError(f"{args.prompts_file}:{n}: bad JSONL line ({e})") from None
            else:
                prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        prompts = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range("]
    return prompts


def run(args: argparse.Namespace) -> int:
    from carpool.llm import LLM  # the engine (torch) only when the command runs
    from carpool.sampling_params import SamplingParams

    try:
        prompts = read_prompts(args)
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            stop=args.stop,
            seed=args.sampling_seed,
            ignore_eos=args.ignore_eos,
        )
        llm = LLM(**vars(engine_config_from_args(args)))
        start = time.perf_counter()
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outs = llm.generate(prompts, params)
        wall = time.perf_counter() - start
    except CarpoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        c = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": c.text,
                        "tokens": len(c.token_ids),
                        "finish_reason": c.finish_reason,
                    }
                )
            )
        else:
            # The prompt on its own line, then the answer alone (never glued to the prompt).
            print(f"=== [{i}] prompt: {prompt!r}")
            print(c.text)
            print(f"=== [{i}] {len(c.token_ids)} tokens, finish: {c.finish_reason}")
    print(timing_line(outs, wall, llm.engine.stats.mean_batch_size), file=sys.stderr)
    hint = instruct_hint(llm, outs, args.chat)
    if hint:
        print(hint, file=sys.stderr)
    return 0


def timing_line(outs: list[RequestOutput], wall: float, mean_batch: float) -> str:
    """TTFT, prefill and decode speeds reported apart (one wall-clock tokens/s hides both).

    Prefill: prompt tokens over the time until the last request's first token (the prompts
    are prefilled together); decode: the tokens after each first one over the time after it.
    """
    generated = sum(o.num_generated_tokens for o in outs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    ttfts = sorted(t.ttft for o in outs for t in o.timings if t.ttft is not None)
    line = f"requests={len(outs)} generated_tokens={generated} wall={wall:.2f}s"
    if ttfts:
        prefill_time = ttfts[-1]
        decode_tokens = generated - len(ttfts)
        decode_time = max(wall - prefill_time, 1e-9)
        line += (
            f" ttft_median={ttfts[len(ttfts) // 2] * 1e3:.0f}ms"
            f" prefill={prompt_tokens / max(prefill_time, 1e-9):.1f}tok/s"
            f" decode={decode_tokens / decode_time:.1f}tok/s"
        )
    return line + f" mean_batch_size={mean_batch:.2f}"


def instruct_hint(llm: LLM, outs: list[RequestOutput], chat: bool) -> str | None:
    """A hint when a chat model answered a raw prompt with (almost) nothing: use --chat."""
    if chat or llm.tokenizer.chat_template is None:
        return None
    if all(o.outputs[0].finish_reason == "stop" and len(o.outputs[0].token_ids) <= 1 for o in outs):
        return (
            "hint: the model stopped at once; it has a chat template (an instruct model), so "
            "try --chat to send each prompt as a user message"
        )
    return None
