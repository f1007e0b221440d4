"""Settings: each stage's dataclass is the one source of names and defaults; `--config FILE.toml` adds a
table per command ([train], [describe], [eval], [serve]); flags given on the command line win over both.

The CLI declares each flag with the dataclass field's default, and `resolve` takes from the file only what
the command line left at its default, so a value never has two origins that disagree.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from skinvlm.errors import SkinvlmError, read_user_text

T = TypeVar("T")
SECTIONS = ("train", "describe", "eval", "serve")


def check_choice(flag: str, value: str, choices: type[StrEnum]) -> None:
    """A value from a config file gets the check a flag gets when the command line is read."""
    if value not in list(choices):
        *others, last = list(choices)
        raise SkinvlmError(f"{flag} must be {', '.join(others)} or {last}, not {value!r}")


def check_seconds(flag: str, value: float) -> None:
    """A duration: a finite number of seconds above 0 (`nan` and `inf` parse as floats)."""
    if not (math.isfinite(value) and value > 0):
        raise SkinvlmError(f"{flag} must be a number of seconds above 0, not {value}")


def read_config(path: Path) -> dict[str, dict[str, Any]]:
    text = read_user_text(path, "config file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SkinvlmError(f"config file {path} is not valid TOML: {err}") from None
    unknown = [name for name, table in data.items() if name not in SECTIONS or not isinstance(table, dict)]
    if unknown:
        raise SkinvlmError(f"{path}: unknown table {unknown[0]!r}; a config file holds [{'], ['.join(SECTIONS)}]")
    return data


def resolve(cls: type[T], section: str, config: Path | None, params: dict[str, Any], given: set[str]) -> T:
    """`cls` from the parameters given on the command line (or by environment variables), the file's [section]
    for the rest, and the dataclass defaults for what neither names."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    # What the command line gave, then the file's table, then the dataclass's own defaults for the rest.
    values = {name: params[name] for name in fields if name in given and name in params}
    table = read_config(config).get(section, {}) if config else {}
    unknown = [key for key in table if key not in fields]
    if unknown:
        raise SkinvlmError(f"{config}: [{section}] has no key {unknown[0]!r} (keys: {', '.join(fields)})")
    for key, value in table.items():
        if key not in given:
            try:
                values[key] = coerce(value, fields[key])
            except TypeError as err:
                raise SkinvlmError(f"{config}: [{section}] {err}") from None
    # Absolute, but links kept: `models/merged` stays that name in headers and manifests (resolving it would show
    # the stage's internal version folder); whoever needs a file's identity resolves it there.
    return cls(**{k: os.path.abspath(v) if isinstance(v, Path) else v for k, v in values.items()})


def coerce(value: Any, field: dataclasses.Field[Any]) -> Any:
    """A TOML value checked against the kind of the field's default (a list becomes a tuple)."""
    default = field.default
    if default is None or default is dataclasses.MISSING:
        return value
    if isinstance(default, tuple) and isinstance(value, list | str):
        return (value,) if isinstance(value, str) else tuple(value)
    if isinstance(default, bool) != isinstance(value, bool):
        raise TypeError(f"{field.name!r} must be {type(default).__name__}, not {value!r}")
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if not isinstance(value, type(default)):
        raise TypeError(f"{field.name!r} must be {type(default).__name__}, not {value!r}")
    return value
