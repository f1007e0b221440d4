"""The one error type a user sees: the CLI prints it as a single line and exits 1; and the machine's own
errors (a full disk, a read-only folder) turned into such a line too."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class SkinvlmError(Exception):
    """Something the user must fix: bad input, a missing stage, a bad setting, a refused request."""


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
}
