"""Command-line flags generated from config dataclasses (``EngineConfig``, ``ServerConfig``).

Every field made with ``carpool.config.option`` becomes ``--field-name`` with the field's
default, its metadata's help text and choices, and a parser from its metadata or its type. A new
option is therefore written once, in its config class, and appears in every command that takes
that config.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

C = TypeVar("C")


def _value_type(hint: Any) -> Any:
    """``int | None`` -> ``int``; other hints unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()
) -> None:
    """Add a flag per ``option`` field of the dataclass ``cls`` (in an argument group).

    Args:
        parser: the (sub)command's parser.
        cls: a config dataclass whose fields carry ``option`` metadata.
        title: the argument group's title in ``--help``.
        skip: fields that get no flag here (the command sets them otherwise).
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _value_type(hints[f.name])
        help_text = meta["help"]
        if f.default is not None:  # a None default is explained by the help text itself
            help_text += f" (default: {_show(f.default)})"
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
            )
            continue
        group.add_argument(
            flag,
            type=_with_message(meta["parse"]) if meta["parse"] else kind,
            default=f.default,
            choices=meta["choices"],
            help=help_text,
        )


def _with_message(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` whose ValueError reaches the user as its own message ("argument --threads:
    not a thread count or 'auto': 'many'"), not argparse's "invalid parse_threads value"."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert


def config_from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """Build ``cls`` from the parsed flags its fields made (others keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in vars(args).items() if k in names}
    return cls(**(kwargs | overrides))
