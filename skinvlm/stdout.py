"""stdout belongs to `--json`: while such a command runs, anything else written to stdout goes to stderr.

Libraries print to stdout at will (Unsloth's banner at import and its statistics at load, compile
messages, C extensions writing to file descriptor 1), and any of that line would make `--json`
unparseable. So for the whole command, file descriptor 1 and `sys.stdout` point at stderr, and the
one JSON document is written at the end to the real stdout, kept aside on a duplicated descriptor.
Processes the command starts (torchrun's DDP workers) are handed the real stdout explicitly, and
apply the same rule in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

_document: list[TextIO] = []  # the real stdout while a --json command runs


def _fileno(stream: Any) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None  # an in-memory stream (typer's CliRunner): only Python-level writes to redirect


@contextlib.contextmanager
def reserved_for_json(active: bool) -> Iterator[None]:
    """Within it (when `active`), stdout is stderr for everything but `write_json`."""
    if not active:
        yield
        return
    real, fd = sys.stdout, _fileno(sys.stdout)
    saved = None
    if fd is not None:
        real.flush()
        saved = os.dup(fd)
        os.dup2(_fileno(sys.stderr) or 2, fd)
        real = os.fdopen(saved, "w", encoding="utf-8", closefd=False)
    _document.append(real)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _document.pop()
        sys.stderr.flush()
        if saved is not None and fd is not None:
            real.flush()
            os.dup2(saved, fd)
            os.close(saved)


def real_stdout() -> TextIO | None:
    """The stdout a --json command's document goes to (for child processes to inherit); None outside one."""
    return _document[-1] if _document else None


def write_json(value: Any) -> None:
    stream = real_stdout() or sys.stdout
    stream.write(json.dumps(value, ensure_ascii=False, indent=2, default=str) + "\n")
    stream.flush()
