"""The jobs of `skinvlm ui`: each one the CLI command a terminal would run, in a child process of its own session (so
it outlives the page and the ui itself), its output in a log file, its state in `jobs/<id>.json`. Stop sends
SIGTERM to the job's process group, as a terminal's Ctrl-C would: the checkpoint or the answers are kept.

A small watcher process (`python -m skinvlm.web.jobs JOBFILE`) runs each command and writes its exit status into
the job file when it ends, so a ui started later still knows how every job ended.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError
from skinvlm.workspace import Workspace, now_iso

COMMANDS = ("describe", "fix", "audit", "train", "merge", "eval")  # what the page may start
STOPPED = (128 + signal.SIGTERM, 130)  # the exit codes of a command stopped by SIGTERM or Ctrl-C


@dataclass
class Job:
    id: str
    argv: list[str]  # after `skinvlm`, without -w
    started: str
    log: str
    pid: int | None = None
    status: str = "running"  # running, finished, stopped, failed, lost (its watcher was killed)
    returncode: int | None = None
    ended: str | None = None
    stop_requested: bool = False

    @property
    def command(self) -> str:
        return shlex.join(["skinvlm", *self.argv])

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"command": self.command}


def jobs_dir(ws: Workspace) -> Path:
    return ws.root / "jobs"


def job_file(ws: Workspace, job_id: str) -> Path:
    if not job_id.replace("-", "").isalnum():
        raise SkinvlmError(f"no job {job_id!r}")
    return jobs_dir(ws) / f"{job_id}.json"


def read_job(path: Path) -> Job:
    return Job(**json.loads(path.read_text(encoding="utf-8")))


def write_job(path: Path, job: Job) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(job), ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(temporary, path)


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")


def list_jobs(ws: Workspace) -> list[Job]:
    """Every job of the workspace, newest first; a running job whose watcher is gone is `lost`."""
    found = []
    for path in sorted(jobs_dir(ws).glob("*.json"), reverse=True) if jobs_dir(ws).is_dir() else []:
        try:
            job = read_job(path)
        except (OSError, ValueError, TypeError):
            continue
        if job.status == "running" and not alive(job.pid):
            job = read_job(path)  # the watcher may have written its end since
            if job.status == "running":
                job.status = "lost"
        found.append(job)
    return found


def start(ws: Workspace, argv: list[str]) -> Job:
    """Start `skinvlm ARGV -w WORKSPACE` as a job; one at a time per workspace."""
    if not argv or argv[0] not in COMMANDS:
        raise SkinvlmError(f"a job is one of {', '.join(COMMANDS)}")
    running = [job for job in list_jobs(ws) if job.status == "running"]
    if running:
        raise SkinvlmError(
            f"one job at a time: `{running[0].command}` has run since {running[0].started}; stop it first"
        )
    jobs_dir(ws).mkdir(parents=True, exist_ok=True)
    job_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}{time.monotonic_ns() % 1000:03d}"
    path = job_file(ws, job_id)
    job = Job(job_id, list(argv), now_iso(), str(path.with_suffix(".log")))
    write_job(path, job)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "skinvlm.web.jobs", str(path), str(ws.root)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    job.pid = watcher.pid
    write_job(path, job)
    return job


def stop(ws: Workspace, job_id: str) -> Job:
    path = job_file(ws, job_id)
    if not path.is_file():
        raise SkinvlmError(f"no job {job_id!r}")
    job = read_job(path)
    if job.status != "running" or not alive(job.pid):
        raise SkinvlmError(f"job {job_id} is not running ({job.status})")
    job.stop_requested = True
    write_job(path, job)
    os.killpg(job.pid, signal.SIGTERM)  # type: ignore[arg-type]  # the watcher leads the job's process group
    return job


def log_tail(ws: Workspace, job_id: str, limit: int = 20_000) -> str:
    log = Path(read_job(job_file(ws, job_id)).log)
    if not log.is_file():
        return ""
    with log.open("rb") as handle:
        handle.seek(max(0, log.stat().st_size - limit))
        return handle.read().decode("utf-8", errors="replace")


def watch(path: Path, root: Path) -> int:
    """The watcher: run the job's command, its output into the log, and write how it ended into the job file.
    SIGTERM reaches the whole group: the command saves and stops, and the watcher waits for it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = read_job(path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(job.log, "ab") as log:
        command = [sys.executable, "-m", "skinvlm", *job.argv, "-w", str(root)]
        code = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        ).returncode
    job = read_job(path)
    stopped = job.stop_requested and (code in STOPPED or code < 0)
    job.status = "finished" if code == 0 else ("stopped" if stopped else "failed")
    job.returncode, job.ended = code, now_iso()
    write_job(path, job)
    return code


if __name__ == "__main__":
    sys.exit(watch(Path(sys.argv[1]), Path(sys.argv[2])))
