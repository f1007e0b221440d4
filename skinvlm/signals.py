"""Signals like a good daemon: SIGTERM and SIGHUP stop a command the way Ctrl-C does.

systemd, docker and job schedulers stop a program with SIGTERM, a closed terminal sends SIGHUP; both
are turned into SIGINT, so every stage saves its finished work on the one path it already has for
Ctrl-C (a KeyboardInterrupt, or asyncio's runner cancelling its task). A SIGINT that the shell left
ignored (a background job of a script) is heeded too. A second SIGTERM or SIGHUP ends the process at
once, as a second Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

FORWARDED = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []


def _as_ctrl_c(signum: int, frame: Any) -> None:
    _received.append(signum)
    for forwarded in FORWARDED:
        signal.signal(forwarded, signal.SIG_DFL)  # a second one forces
    signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def stopping_like_ctrl_c() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (an embedding program's worker thread)
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, *FORWARDED)}
    _received.clear()
    if previous[signal.SIGINT] == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for forwarded in FORWARDED:
        signal.signal(forwarded, _as_ctrl_c)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def received() -> int:
    """The signal that stopped the command (SIGINT when it was Ctrl-C)."""
    return _received[0] if _received else signal.SIGINT


def name() -> str:
    return signal.Signals(received()).name
