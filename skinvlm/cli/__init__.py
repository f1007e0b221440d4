"""The `skinvlm` command line: read options, call a stage function, render its result. Nothing more.

One module per command group (data: ingest to publish; model: train to eval; tools: doctor, demo) registers its
commands on the one app of `common`, in the order `skinvlm -h` lists them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from rich.markup import escape

from skinvlm.cli import data, model, tools  # noqa: F401 - importing them registers their commands
from skinvlm.cli.common import app, err

__all__ = ["app", "main"]


def show_our_warnings(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """skinvlm's own warnings as one `warning:` line; the libraries' keep Python's format (file and line)."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent.parent):  # the skinvlm package
        err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)
    else:
        PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


PYTHON_SHOWWARNING = warnings.showwarning


def main() -> None:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = show_our_warnings
    app(prog_name="skinvlm")  # `python -m skinvlm` (as the ui's jobs run it) names itself as the terminal does
