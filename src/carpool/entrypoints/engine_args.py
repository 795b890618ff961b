"""Command-line flags for ``EngineConfig``, shared by every subcommand that starts an engine.

The flags are generated from ``EngineConfig``'s fields (``config_args``); this module only
names the group.
"""

from __future__ import annotations

import argparse

from carpool.config import EngineConfig, parse_bytes
from carpool.entrypoints.config_args import add_config_arguments, config_from_args

__all__ = ["add_engine_arguments", "engine_config_from_args", "parse_bytes"]


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the engine's knobs (model, dtype, KV cache, batching limits): one per field."""
    add_config_arguments(parser, EngineConfig, "engine")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Build the ``EngineConfig`` from parsed flags."""
    return config_from_args(EngineConfig, args)
