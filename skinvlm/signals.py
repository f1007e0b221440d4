"""Signals like a good daemon: SIGTERM and SIGHUP stop a command the way Ctrl-C does.

systemd, docker and job schedulers stop a program with SIGTERM, a closed terminal sends SIGHUP; both
are turned into SIGINT, so every stage saves its finished work on the one path it already has for
Ctrl-C (a KeyboardInterrupt, or asyncio's runner cancelling its task). A SIGINT that the shell left
ignored (a background job of a script) is heeded too. A second SIGTERM or SIGHUP ends the process at
once, as a second Ctrl-C does.

A process may be started with these signals blocked (`held_for_children`: the ui's jobs are), so that one sent
before its handlers are set waits, pending, instead of being lost or killing it half-way through its imports:
the handlers are set, then the signals unblocked, and a pending one is taken as Ctrl-C at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

FORWARDED = (signal.SIGTERM, signal.SIGHUP)
HELD = {signal.SIGINT, *FORWARDED}
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
    mask: set[int | signal.Signals] = set()
    try:
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
        yield
    finally:
        # Blocked again where they were at the start: a stop that comes once the work is done (the process exiting)
        # waits, and the command ends with its own exit status rather than killed by the default action.
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def received() -> int:
    """The signal that stopped the command (SIGINT when it was Ctrl-C)."""
    return _received[0] if _received else signal.SIGINT


def name() -> str:
    return signal.Signals(received()).name


def handled() -> None:
    """Tell CPython the Ctrl-C was handled. A KeyboardInterrupt raised inside exec() of a string (the stop landing
    while an import makes a dataclass, whose methods are made by exec) sets the interpreter's "unhandled
    KeyboardInterrupt" flag, and `python -m` then ends the process by SIGINT whatever exit status we chose (or
    exits 130 where SIGINT is blocked). Every exec() of a string clears that flag first, and there is no other
    way to reach it from Python."""
    exec("None")


@contextlib.contextmanager
def held_for_children() -> Iterator[None]:
    """Processes started inside the block begin with SIGINT, SIGTERM and SIGHUP blocked (a signal mask survives
    fork and exec; ignoring them would too, but would also swallow a stop sent before skinvlm is ready). Only the
    calling thread's mask changes, for the instant of the block: safe in a threaded server."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_workers_told: set[int] = set()


def leave_stop_to_the_parent() -> None:
    """Called where rows are built (in a DataLoader worker, when there are workers): the worker ignores SIGTERM and
    SIGHUP. A stop sent to the process group (the ui's Stop, systemd, docker) reaches the workers too, and torch's
    own worker handler dies of any SIGTERM not sent by its parent: the parent then failed with "DataLoader worker
    killed" before it saved its checkpoint. The parent stops its workers itself once it has saved."""
    if os.getpid() in _workers_told:
        return
    _workers_told.add(os.getpid())
    torch = sys.modules.get("torch")
    if torch is not None and torch.utils.data.get_worker_info() is not None:
        for forwarded in FORWARDED:
            signal.signal(forwarded, signal.SIG_IGN)
