"""Config building blocks: ``option`` fields (default + flag help), value parsers, one check.

Every engine and server option is a dataclass field made with ``option``; the command-line
flags are generated from that metadata (``carpool.entrypoints.config_args``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any


def option(
    default: Any,
    help: str,  # noqa: A002  (argparse's name)
    *,
    choices: Sequence[str] | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A config field with its default and what its command-line flag says.

    Args:
        default: the one default of the option.
        help: the flag's help text (the default is appended by the flag generator).
        choices: the allowed values (the flag refuses others; validate them in
            ``__post_init__`` too).
        parse: turns the flag's text into the value (default: the field's type).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "parse": parse}
    return field(default=default, metadata=meta)


_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "kb": 1e3, "mb": 1e6, "gb": 1e9}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1e6"`` -> bytes.

    Raises:
        ValueError: not a size.
    """
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_int_list(text: str) -> tuple[int, ...]:
    """``"32,64,128"`` -> ``(32, 64, 128)``.

    Raises:
        ValueError: an item is not an int.
    """
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"not a comma-separated list of ints: {text!r}") from None


def check_positive(config: object, *names: str, low: int = 1) -> None:
    """The one integer check of every config: each named field is an int >= ``low`` (or None).

    Raises:
        ValueError: naming the field and the value.
    """
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        # bool is an int subclass: ``block_size=True`` is a bug at the caller, not "1".
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
