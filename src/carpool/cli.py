"""The ``carpool`` command line: serve, chat, generate, bench, optimize, memory.

Each subcommand lives in its own module under ``carpool.entrypoints`` with
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import torch and the engine
only inside ``run``, so building every parser (``carpool --help``, ``carpool serve --help``)
stays fast: nothing here or in an ``add_arguments`` loads torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# subcommand -> module with ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("carpool.entrypoints.generate", "generate text for prompts, batched"),
    "serve": ("carpool.entrypoints.serve", "run the OpenAI-compatible HTTP server"),
    "chat": ("carpool.entrypoints.chat", "interactive streaming chat with a model"),
    "bench": ("carpool.entrypoints.bench", "benchmarks: batch sweep, strategies, serving load"),
    "memory": ("carpool.entrypoints.memory", "weights, KV cache and activation memory estimate"),
    "optimize": ("carpool.entrypoints.optimize", "largest batch that fits a memory budget"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(LOG_LEVELS)}; got {text!r}")
    return level


def add_log_level(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--log-level``: on the top parser (default INFO) and again on every subcommand.

    A subcommand's copy defaults to ``SUPPRESS`` so that it only overrides the top-level
    value when given (``carpool serve --log-level DEBUG`` works like vLLM's).
    """
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default=default if default is not None else argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"logging level: {', '.join(LOG_LEVELS)} (default: INFO)",
    )


def build_parser() -> argparse.ArgumentParser:
    from carpool import __version__

    parser = argparse.ArgumentParser(
        prog="carpool", description="carpool: LLM inference where many requests share a pass."
    )
    parser.add_argument("--version", action="version", version=f"carpool {__version__}")
    add_log_level(parser, "INFO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        add_log_level(p, None)
        p.set_defaults(_run=mod.run)
    return parser


def configure_logging(level: str) -> None:
    """One format for every command; third-party chatter (httpx per-request lines) quieted."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for noisy in ("httpx", "httpcore", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``carpool`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
