"""Run a command as a child process and report wall time and the peak RSS of its whole process tree."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time

import psutil


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds, peak MiB summed over the process and its children, sampled every 20 ms)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        try:
            root = psutil.Process(proc.pid)
            while not stop.is_set():
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak = max(peak, total / 2**20)
                time.sleep(0.02)
        except psutil.Error:
            return

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    _, stderr = proc.communicate()
    stop.set()
    watcher.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{stderr.decode()[-2000:]}")
    return time.perf_counter() - start, peak


def line(name: str, n: int, seconds: float, peak_mb: float, unit: str = "images/s") -> str:
    return f"{name:<34} {n / seconds:8.1f} {unit}  {seconds:7.1f}s  peak RSS {peak_mb:6.0f} MiB"
