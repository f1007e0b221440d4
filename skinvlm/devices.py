"""GPUs, processes and memory: `--gpu` selection, the torchrun relaunch behind `--gpu 0,1` /
`--processes N`, ranks; and the bounds that keep image decoding's memory flat.

Multi-GPU training is plain DDP through torchrun (one process per GPU, gloo on the CPU); nothing
here schedules or communicates by itself. Rank 0 alone writes files and prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from skinvlm.errors import SkinvlmError


def gpu_ids(gpu: str | None) -> list[str]:
    if gpu is None:
        return []
    ids = [g.strip() for g in gpu.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise SkinvlmError(f"--gpu takes GPU numbers like 0 or 0,1; got {gpu!r}")
    if len(set(ids)) < len(ids):
        raise SkinvlmError(f"--gpu {gpu} names a GPU twice: each GPU holds one process or shard")
    return ids


def select_gpus(gpu: str | None) -> None:
    """Must run before torch is imported: CUDA reads CUDA_VISIBLE_DEVICES once."""
    ids = gpu_ids(gpu)
    if ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)


def check_gpus(gpu: str | None) -> bool:
    """Whether to use CUDA; a --gpu that CUDA cannot see is a one-line error."""
    import torch

    if gpu is None:
        return torch.cuda.is_available()
    wanted = len(gpu_ids(gpu))
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < wanted:
        raise SkinvlmError(
            f"--gpu {gpu} asks for {wanted} GPU(s) but CUDA sees {found} here "
            "(run without --gpu to train on the CPU with --backend hf)"
        )
    return True


def launched() -> bool:
    """True inside a process that torchrun started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def processes_wanted(processes: int | None, gpu: str | None) -> int:
    """--processes, else one per --gpu id, else one."""
    if processes is not None and processes < 1:
        raise SkinvlmError(f"--processes must be at least 1, not {processes}")
    return processes or max(1, len(gpu_ids(gpu)))


def relaunch(processes: int, argv: list[str], stdout: Any = None) -> int:
    """Run `skinvlm ARGV` as `processes` DDP workers under torchrun; their exit code.

    `stdout`: where the workers' stdout goes (under --json, the real stdout that rank 0's document needs).

    Ctrl-C reaches torchrun with the rest of the process group; it stops its workers, so here we
    only wait for it (and kill it if it hangs).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "skinvlm",
        *argv,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cpu_count() // processes)))}
    child = subprocess.Popen(command, env=env, stdout=stdout)
    try:
        return child.wait()
    except KeyboardInterrupt:
        try:
            child.send_signal(signal.SIGINT)
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        raise


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def return_freed_memory() -> None:
    """Make large freed blocks go back to the OS at once, for the image stages (ingest, describe, eval).

    glibc keeps what a thread frees in that thread's arena: after eight threads each decode a
    150 MB photo, RSS stays at 8 x 150 MB though one decode runs at a time. With a fixed mmap
    threshold every block of a megabyte or more is its own mapping, unmapped when freed. Not set
    for training, where tensors of that size come and go every step. A no-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return


class PixelBudget:
    """At most `limit` pixels being decoded at once across the workers (an image over it still goes, alone),
    so peak memory depends on the budget, not on the number of workers."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self.changed:
                self.used -= pixels
                self.changed.notify_all()
