"""The one error type a user sees: the CLI prints it as a single line and exits 1; and the machine's own
errors (a full disk, a read-only folder) turned into such a line too."""

from __future__ import annotations

import errno
import functools
import json
import shutil
from pathlib import Path
from typing import Any


class SkinvlmError(Exception):
    """Something the user must fix: bad input, a missing stage, a bad setting, a refused request."""


def read_user_text(path: Path, what: str) -> str:
    """A file the user hands us (rule file, --config, --prompt-file, .env) as text, or one line saying why not."""
    if not path.is_file():
        raise SkinvlmError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SkinvlmError(
            f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): "
            "save it as UTF-8"
        ) from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object skinvlm or a library wrote (metrics.json, config.json, adapter_config.json), or one line
    naming the damaged file: a half-copied or hand-edited one must not surface as a library's traceback."""
    try:
        value = json.loads(read_user_text(path, what))
    except json.JSONDecodeError as err:
        raise SkinvlmError(f"{what} {path} is damaged (not valid JSON: {json_problem(err)})") from None
    if not isinstance(value, dict):
        raise SkinvlmError(f"{what} {path} is damaged (not a JSON object)")
    return value


def json_problem(err: json.JSONDecodeError) -> str:
    """Where a JSON text breaks, read as one phrase: json's own message may already end in 'at' ('Unterminated
    string starting at'), which once gave 'starting at at line 1'."""
    where = f"line {err.lineno}, column {err.colno}"
    return f"{err.msg} {where}" if err.msg.endswith(" at") else f"{err.msg} at {where}"


def machine_problem(exc: BaseException, where: Path) -> str | None:
    """One line for an OS error about the machine (disk full, permissions, ...) anywhere in `exc`'s chain, or
    None when the chain holds none: those are bugs and keep their traceback."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in MACHINE_ERRORS:
            path = Path(seen.filename) if isinstance(seen.filename, str) else where
            return MACHINE_ERRORS[seen.errno](path)
        seen = seen.__cause__ or seen.__context__
    return None


def no_space(path: Path) -> str:
    folder = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free / 2**30
    return (
        f"no space left on the disk holding {path} ({free:.1f} GiB free): free space there (old eval runs, "
        "models/adapter/checkpoints, the Hugging Face cache) or use a workspace on a bigger disk; finished work is kept"
    )


MACHINE_ERRORS = {
    errno.ENOSPC: no_space,
    errno.EDQUOT: no_space,
    errno.EROFS: lambda path: f"{path} is on a read-only file system: use a workspace you can write to",
    errno.EACCES: lambda path: f"no permission to write or read {path}",
    errno.EPERM: lambda path: f"not permitted: {path}",
    errno.EMFILE: lambda path: "too many open files: raise the limit (ulimit -n) or lower --workers",
    errno.ENFILE: lambda path: "the system ran out of open files: close other programs or lower --workers",
    errno.EIO: lambda path: f"input/output error at {path}: the disk may be failing",
    errno.EFBIG: lambda path: f"{path} grew past the largest file allowed here (file system or ulimit -f)",
    errno.EEXIST: lambda path: f"{path} is a file where skinvlm keeps a folder: move it away and run again",
    errno.ENOTDIR: lambda path: f"a file stands where {path} needs a folder above it: move that file away",
}


def install_hint(extras: str, pinned: bool = False) -> str:
    """The command that adds an extra to this very installation: `pip install -e '.[review]'` for a clone
    installed editable (the registry's skinvlm would replace it), `pip install 'skinvlm[review]'` otherwise;
    `pinned` adds the GPU stack's constraints file, which only a clone has."""
    constraints = "-c constraints-gpu.txt " if pinned else ""
    if editable_install():
        return f"pip install {constraints}-e '.[{extras}]'"
    return f"pip install {constraints}'skinvlm[{extras}]'"


@functools.cache
def editable_install() -> bool:
    from importlib import metadata

    try:
        direct = metadata.distribution("skinvlm").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return True  # run from a source tree without installing
    return bool(direct and json.loads(direct).get("dir_info", {}).get("editable"))
