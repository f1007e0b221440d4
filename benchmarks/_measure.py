"""Run a command as a child process and report wall time and the peak RSS of its whole process tree."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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
    return f"{name:<36} {n / seconds:8.1f} {unit}  {seconds:7.1f}s  peak RSS {peak_mb:6.0f} MiB"


def ingested_workspace(prefix: str, per_folder: dict[str, int], size: int) -> tuple[Path, dict[str, str]]:
    """A synthetic AI-Hub tree ingested into a fresh workspace; (workspace, env for skinvlm runs)."""
    from skinvlm.demo.synthetic import write_tree

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    write_tree(tmp / "src", per_folder, size=size)
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, "-m", "skinvlm", "ingest", str(tmp / "src"), "-w", str(tmp / "ws")]
    subprocess.run(command, env=env, check=True, capture_output=True)
    return tmp / "ws", env
