"""The jobs of `skinvlm ui`: each one the CLI command a terminal would run, in a child process of its own session (so
it outlives the page and the ui itself), its output in a log file, its state in `jobs/<id>.json`. Stop sends
SIGTERM to the job's process group, as a terminal's Ctrl-C would: the checkpoint or the answers are kept.

A small watcher process (`python -m skinvlm.web.jobs JOBFILE`) runs each command and writes its exit status into
the job file when it ends, so a ui started later still knows how every job ended. Both start with SIGTERM blocked
(`signals.held_for_children`), so a Stop sent before the command has set its handler waits for it instead of
being lost. A process is known by its pid and its start time, so a pid the system gave to another process (after
a reboot) is never taken for the job's, nor signalled. Job files change under one lock (`jobs/.lock`): a Stop and
the end of a job, or two uis starting jobs, cannot overwrite each other.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skinvlm import signals
from skinvlm.errors import SkinvlmError
from skinvlm.web.security import BadRequest
from skinvlm.workspace import Workspace, now_iso

COMMANDS = ("describe", "fix", "audit", "train", "merge", "eval")  # what the page may start
STOPPED = (128 + signal.SIGTERM, 130)  # the exit codes of a command stopped by SIGTERM or Ctrl-C
JOB_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{1,12}")


@dataclass
class Job:
    id: str
    argv: list[str]  # after `skinvlm`, without -w
    started: str
    log: str
    pid: int | None = None  # the watcher's, the leader of the job's process group
    pid_started: int | None = None  # its start time (clock ticks since boot), which a reused pid does not share
    child: int | None = None  # the command's own process, and its start time
    child_started: int | None = None
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
    if not JOB_ID.fullmatch(job_id) or not (jobs_dir(ws) / f"{job_id}.json").is_file():
        raise BadRequest(404, f"no job {job_id[:40]!r}")
    return jobs_dir(ws) / f"{job_id}.json"


def jobs_lock(ws_jobs: Path) -> Any:
    from filelock import FileLock

    ws_jobs.mkdir(parents=True, exist_ok=True)
    return FileLock(ws_jobs / ".lock", timeout=30)


def read_job(path: Path) -> Job:
    return Job(**json.loads(path.read_text(encoding="utf-8")))


def write_job(path: Path, job: Job) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(job), ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(temporary, path)


def start_time(pid: int | None) -> int | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); None: no such live process.
    Where there is no /proc, a live pid is taken as it is (0)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except FileNotFoundError:
        return 0 if not Path("/proc/self/stat").exists() and exists(pid) else None
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def same_process(pid: int | None, started: int | None) -> bool:
    found = start_time(pid)
    return found is not None and (started is None or found == started or found == 0)


def is_running(job: Job) -> bool:
    """The watcher is alive, or the command is (a watcher killed with -9 leaves its command running)."""
    return job.status == "running" and (
        same_process(job.pid, job.pid_started) or same_process(job.child, job.child_started)
    )


def list_jobs(ws: Workspace) -> list[Job]:
    """Every job of the workspace, newest first; a running job whose processes are all gone is `lost`."""
    found = []
    for path in sorted(jobs_dir(ws).glob("*.json"), reverse=True) if jobs_dir(ws).is_dir() else []:
        try:
            job = read_job(path)
        except (OSError, ValueError, TypeError):
            continue
        if job.status == "running" and not is_running(job):
            job = read_job(path)  # the watcher may have written its end since
            if job.status == "running" and not is_running(job):
                job.status = "lost"
        found.append(job)
    return found


def start(ws: Workspace, argv: list[str]) -> Job:
    """Start `skinvlm ARGV -w WORKSPACE` as a job; one at a time per workspace, whichever ui starts it."""
    if not argv or argv[0] not in COMMANDS:
        raise SkinvlmError(f"a job is one of {', '.join(COMMANDS)}")
    with jobs_lock(jobs_dir(ws)):
        running = [job for job in list_jobs(ws) if job.status == "running"]
        if running:
            raise SkinvlmError(
                f"one job at a time: `{running[0].command}` has run since {running[0].started}; stop it first"
            )
        job_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 10000:04d}{time.monotonic_ns() % 1000:03d}"
        path = jobs_dir(ws) / f"{job_id}.json"
        job = Job(job_id, list(argv), now_iso(), str(path.with_suffix(".log")))
        write_job(path, job)
        with signals.held_for_children():
            watcher = subprocess.Popen(
                [sys.executable, "-m", "skinvlm.web.jobs", str(path), str(ws.root)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        job.pid, job.pid_started = watcher.pid, start_time(watcher.pid)
        write_job(path, job)
    return job


def stop(ws: Workspace, job_id: str) -> Job:
    path = job_file(ws, job_id)
    with jobs_lock(jobs_dir(ws)):
        job = read_job(path)
        if not is_running(job):
            raise SkinvlmError(f"job {job_id} is not running ({'lost' if job.status == 'running' else job.status})")
        job.stop_requested = True
        write_job(path, job)
        leader = job.pid if same_process(job.pid, job.pid_started) else os.getpgid(job.child)  # type: ignore[arg-type]
        os.killpg(leader, signal.SIGTERM)  # type: ignore[arg-type]  # the job's process group: its workers too
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
    SIGTERM reaches the whole group: the command saves and stops, and the watcher (its SIGTERM blocked since
    birth, which the command inherits until its handler is set) waits for it. A Stop that came before the
    command existed is passed on to it."""
    job = read_job(path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(job.log, "ab") as log:
        command = [sys.executable, "-m", "skinvlm", *job.argv, "-w", str(root)]
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        with jobs_lock(path.parent):
            job = read_job(path)
            job.child, job.child_started = child.pid, start_time(child.pid)
            write_job(path, job)
        if job.stop_requested:
            child.send_signal(signal.SIGTERM)
        code = child.wait()
    with jobs_lock(path.parent):
        job = read_job(path)
        stopped = job.stop_requested and (code in STOPPED or code < 0)
        job.status = "finished" if code == 0 else ("stopped" if stopped else "failed")
        job.returncode, job.ended = code, now_iso()
        write_job(path, job)
    return code


if __name__ == "__main__":
    sys.exit(watch(Path(sys.argv[1]), Path(sys.argv[2])))
