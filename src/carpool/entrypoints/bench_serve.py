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


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the serving benchmark. ``--model`` (the served name) and ``--seed`` are the
    engine group's flags, ``--prompt-len``/``--gen-len`` the sweep's, reused here."""
    g = parser.add_argument_group("serving load (mode: serve)")
    g.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="server base URL; --model is then the model name sent (default: the first id of "
        "GET /v1/models)",
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

    from carpool.bench.serve_load import (
        LoadSpec,
        load_dataset,
        parse_goodput,
        run_load,
        summarize,
        synthetic_prompts,
    )

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0, got {args.request_rate}")
    goodput = parse_goodput(args.goodput) if args.goodput else None
    if args.dataset is not None:
        prompts = load_dataset(args.dataset, args.num_prompts, args.gen_len, args.seed)
    else:
        prompts = synthetic_prompts(args.num_prompts, args.prompt_len, args.gen_len, args.seed)
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
    if "goodput" in s:
        met = f"{s['good_requests']} met {s['goodput_targets_ms']}"
        lines.append(f"goodput: {s['goodput']:.2f} req/s ({met})")
    return "\n".join(lines)
