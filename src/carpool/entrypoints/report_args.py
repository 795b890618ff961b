"""The report flags every ``carpool bench`` mode that writes files shares: ``--output`` (JSON)
and ``--plot`` (PNG, its path by default ``--output``'s with ``.png``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_report_arguments(group: argparse._ArgumentGroup, output_help: str, plot_help: str) -> None:
    """Add ``--output JSON`` and ``--plot [PNG]`` (bare ``--plot``: the default path)."""
    group.add_argument("--output", default=None, metavar="JSON", help=output_help)
    group.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG", help=plot_help)


def plot_path(args: argparse.Namespace, default_output: str) -> Path | None:
    """Where ``--plot`` writes: its own path, else ``--output`` (or ``default_output``) with
    ``.png``; None without ``--plot``."""
    if args.plot is None:
        return None
    if args.plot:
        return Path(args.plot)
    return Path(args.output or default_output).with_suffix(".png")
