"""The ``carpool`` command line: ``serve``, ``chat``, ``generate``, ``bench``, ``optimize``, ``memory``.

Each subcommand lives in its own module under ``carpool.entrypoints`` (imported only when
used, so ``carpool generate`` does not pay for the HTTP stack); this file only wires them up.
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
    "bench": ("carpool.entrypoints.bench", "benchmarks: `carpool bench strategies` and more"),
    "memory": ("carpool.entrypoints.memory", "weights, KV cache and activation memory estimate"),
    "optimize": ("carpool.entrypoints.optimize", "largest batch that fits a memory budget"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carpool", description="carpool: LLM inference where many requests share a pass."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``carpool`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
