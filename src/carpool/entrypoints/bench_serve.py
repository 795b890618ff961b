"""``carpool bench serve``: the load generator's flags and runner (see ``serve_load``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from carpool.entrypoints.report_args import add_report_arguments, plot_path


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``carpool bench serve`` (it starts no engine: no engine flags)."""
    g = parser.add_argument_group("serving load")
    g.add_argument(
        "--model",
        default=None,
        help="model name sent (default: the first id of GET /v1/models)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of arrivals and lengths (default: 0)")
    g.add_argument("--prompt-len", type=int, default=128, help="median prompt words (default: 128)")
    g.add_argument(
        "--gen-len", type=int, default=128, help="median max_tokens per request (default: 128)"
    )
    add_report_arguments(
        g,
        output_help="write the summary as JSON",
        plot_help="write latency percentiles and throughput over time as PNG (default path: "
        "--output with .png, else bench_serve.png)",
    )
    g.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="server base URL (default: http://127.0.0.1:8000)",
    )
    g.add_argument("--num-prompts", type=int, default=200, help="requests to send (default: 200)")
    g.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="Poisson arrivals per second (default: inf, all at once)",
    )
    g.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight (default: all)"
    )
    g.add_argument(
        "--goodput",
        default=None,
        metavar="TARGETS",
        help="latency targets in ms, e.g. ttft:500,tpot:50 (metrics: ttft, tpot, e2el)",
    )
    g.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help='JSONL of {"prompt": ..., "max_tokens": ...} (default: synthetic long-tail '
        "lengths with medians --prompt-len words and --gen-len tokens)",
    )
    g.add_argument(
        "--shared-prefix-num-prefixes",
        type=int,
        default=0,
        metavar="K",
        help="shared-prefix dataset: K system prompts shared by the requests, sent as token ids "
        "(default: 0, off)",
    )
    g.add_argument(
        "--shared-prefix-len",
        type=int,
        default=1000,
        metavar="L",
        help="shared-prefix dataset: tokens of each system prompt (default: 1000)",
    )
    g.add_argument(
        "--shared-prefix-suffix-len",
        type=int,
        default=111,
        help="shared-prefix dataset: mean tokens of each user suffix, +-50%% (default: 111, "
        "90%% shared with L=1000)",
    )
    g.add_argument(
        "--shared-prefix-vocab-size",
        type=int,
        default=256,
        help="shared-prefix dataset: token ids drawn from [3, this) (default: 256)",
    )
    g.add_argument(
        "--multi-turn",
        type=int,
        default=0,
        metavar="TURNS",
        help="multi-turn mode: ceil(num-prompts / TURNS) conversations of TURNS turns, each "
        "turn's prompt = the previous prompt + its answer + a new message (default: 0, off)",
    )
    g.add_argument(
        "--multi-turn-message-len",
        type=int,
        default=24,
        help="multi-turn mode: most words per user message (default: 24)",
    )
    g.add_argument(
        "--priority-classes",
        default=None,
        metavar="CLASSES",
        help="send a priority per request drawn from PRIORITY:SHARE pairs, e.g. 0:0.1,10:0.9; "
        "the summary reports TTFT per class",
    )
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    g.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature sent (default: 0)"
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos=true (a vLLM/carpool extension) so outputs reach max_tokens",
    )
    g.add_argument(
        "--no-usage",
        action="store_true",
        help="do not send stream_options.include_usage (for servers that reject it)",
    )


def _served_model(url: str, timeout: float) -> str:
    """The first id of ``GET /v1/models``, or ``"default"`` when it cannot be read."""
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    try:
        r = httpx.get(base + "/models", timeout=timeout, trust_env=False)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError):
        return "default"


def run_serve_cli(args: argparse.Namespace) -> int:
    """Send the load, print a summary, write JSON when ``--output`` is given."""
    from tqdm.auto import tqdm

    from carpool.bench.serve_load import LoadSpec, load_dataset, run_load, synthetic_prompts
    from carpool.bench.serve_summary import parse_goodput, summarize

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0, got {args.request_rate}")
    from carpool.bench.serve_workloads import (
        multi_turn_conversations,
        parse_priority_classes,
        run_multi_turn,
        shared_prefix_prompts,
        with_priorities,
    )

    goodput = parse_goodput(args.goodput) if args.goodput else None
    if args.dataset is not None:
        prompts = load_dataset(args.dataset, args.num_prompts, args.gen_len, args.seed)
    elif args.shared_prefix_num_prefixes > 0:
        prompts = shared_prefix_prompts(
            args.num_prompts,
            args.shared_prefix_num_prefixes,
            args.shared_prefix_len,
            args.shared_prefix_suffix_len,
            args.gen_len,
            args.seed,
            args.shared_prefix_vocab_size,
        )
    else:
        prompts = synthetic_prompts(args.num_prompts, args.prompt_len, args.gen_len, args.seed)
    if args.priority_classes:
        prompts = with_priorities(prompts, parse_priority_classes(args.priority_classes), args.seed)
    extra: dict[str, Any] = {"temperature": args.temperature}
    if args.ignore_eos:
        extra["ignore_eos"] = True
    spec = LoadSpec(
        url=args.url,
        model=args.model or _served_model(args.url, min(args.timeout, 10.0)),
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        timeout=args.timeout,
        include_usage=not args.no_usage,
        extra_body=extra,
    )
    if args.multi_turn > 0:
        turns = args.multi_turn
        conversations = multi_turn_conversations(
            -(-args.num_prompts // turns), turns, args.multi_turn_message_len, args.seed
        )
        with tqdm(total=len(conversations) * turns, unit="req", desc="bench serve") as bar:
            results, duration = asyncio.run(
                run_multi_turn(spec, conversations, args.gen_len, lambda _r: bar.update(1))
            )
    else:
        with tqdm(total=len(prompts), unit="req", desc="bench serve") as bar:
            results, duration = asyncio.run(run_load(spec, prompts, lambda _r: bar.update(1)))
    summary = summarize(results, duration, goodput)
    command = "carpool " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "carpool bench serve"
    payload = {
        "command": command,
        "url": spec.url,
        "model": spec.model,
        "request_rate": spec.request_rate if math.isfinite(spec.request_rate) else "inf",
        "max_concurrency": spec.max_concurrency,
        **summary,
    }
    print(format_summary(summary))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    png = plot_path(args, "bench_serve.json")
    if png is not None:
        from carpool.bench.serve_plot import write_serve_plot

        title = (
            f"{spec.model} at {spec.url}: {len(results)} requests, rate {payload['request_rate']}"
        )
        if write_serve_plot(png, results, summary, title):
            print(f"wrote {png}", file=sys.stderr)
    if summary["completed"] == 0:
        print(
            f"error: every request failed ({summary['failures']}); is a server running at "
            f"{spec.url}?",
            file=sys.stderr,
        )
        return 1
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """A short human-readable report of ``summarize``'s dict."""

    def ms(d: dict[str, float | None]) -> str:
        if d["p50"] is None:
            return "n/a"
        return f"p50 {d['p50']:.1f} | p90 {d['p90']:.1f} | p99 {d['p99']:.1f} ms"

    lines = [
        f"requests: {s['completed']} completed, {s['failed']} failed {s['failures'] or ''}",
        f"duration: {s['duration_s']:.2f} s",
        f"request throughput: {s['request_throughput']:.2f} req/s",
        f"output throughput: {s['output_throughput']:.1f} tok/s "
        f"({s['total_output_tokens']} tokens)",
        f"TTFT: {ms(s['ttft_ms'])}",
        f"TPOT: {ms(s['tpot_ms'])}",
        f"ITL:  {ms(s['itl_ms'])}",
        f"E2E:  {ms(s['e2el_ms'])}",
    ]
    if "prefix_cache_hit_rate" in s:
        lines.append(
            f"prefix cache: {s['total_cached_tokens']} cached prompt tokens "
            f"(hit rate {100 * s['prefix_cache_hit_rate']:.1f}%)"
        )
    for cls, c in (s.get("by_priority") or {}).items():
        lines.append(f"priority {cls}: {c['completed']} completed, TTFT {ms(c['ttft_ms'])}")
    if "goodput" in s:
        met = f"{s['good_requests']} met {s['goodput_targets_ms']}"
        lines.append(f"goodput: {s['goodput']:.2f} req/s ({met})")
    return "\n".join(lines)
