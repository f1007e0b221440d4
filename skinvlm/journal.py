"""The describe journal: append-only JSON lines, one per finished record, fsynced before it counts.

Both ways of asking (`describe` request by request, `describe --batch` through the Batch API) write
here, so a kill -9 in either loses at most the answers not yet on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinvlm import pricing
from skinvlm.workspace import now_iso


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    invalid: int = 0
    cut: int = 0  # answers longer than openai_api.MAX_ANSWER_CHARS, kept cut
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dollars: float | None = 0.0
    reasons: dict[str, int] = field(default_factory=dict)  # why requests failed, for a loud last line
    endpoints: list[dict[str, Any]] = field(default_factory=list)  # endpoints.Pool.summary(): who answered how fast

    def add(self, record: dict[str, Any], model: str, batch: bool = False) -> None:
        self.done += 1
        self.failed += record["status"] == "failed"
        if record["status"] == "failed":
            reason = (record.get("error") or "no reason given").splitlines()[0][:120]
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.invalid += record["status"] == "invalid"
        self.cut += bool(record.get("cut"))
        self.prompt_tokens += record["prompt_tokens"]
        self.completion_tokens += record["completion_tokens"]
        spent = pricing.cost(model, record["prompt_tokens"], record["completion_tokens"], batch=batch)
        self.dollars = None if spent is None or self.dollars is None else self.dollars + spent


@dataclass
class Task:
    split: str
    index: int
    id: str
    label: str
    view: str
    sha256: str = ""
    restate: bool = False  # re-asked because the earlier <label> named another class


def last_by_id(
    path: Path, keeps: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None
) -> dict[str, dict[str, Any]]:
    """The last record per id of a JSON-lines file appended to as work finishes (describe's journal, eval's
    predictions), unless `keeps(earlier, later)` says the earlier one stays; the torn last line of a killed run
    is left out."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    with path.open("rb") as handle:  # bytes: a torn last line may end inside a Hangul character
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            earlier = records.get(record["id"])
            if earlier is None or keeps is None or not keeps(earlier, record):
                records[record["id"]] = record
    return records


def good_answer_stays(earlier: dict[str, Any], later: dict[str, Any]) -> bool:
    """A paid, good answer is replaced only by a newer good one, never by a failure (`--redo ok` against an
    endpoint that has gone down)."""
    return earlier["status"] == "ok" and later["status"] != "ok"


class Journal:
    """Append-only JSON lines, one per finished record; the last line for an id wins, but a good answer gives
    way only to a newer good one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, dict[str, Any]]:
        return last_by_id(self.path, good_answer_stays)

    def open(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+b")
        handle.seek(0, os.SEEK_END)
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a torn line must not swallow the next record
                handle.write(b"\n")
        return handle

    @staticmethod
    def append(handle: Any, record: dict[str, Any]) -> None:
        handle.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def finish(handle: Any, done: dict[str, Any], stats: Progress, progress: Callable[[Progress], None] | None) -> None:
    """A record is counted only once its journal line is on disk."""
    Journal.append(handle, done)
    stats.add(done, done["model"], batch=bool(done.get("batch")))
    if progress:
        progress(stats)


def rows_of(ingested: Any, splits: Iterable[str]) -> Iterable[Task]:
    for split in splits:
        if split in ingested:
            ds = ingested[split]
            columns = zip(ds["id"], ds["label"], ds["view"], ds["sha256"], strict=True)
            for index, (rid, label, view, sha) in enumerate(columns):
                yield Task(split, index, rid, label, view, sha)


def record(
    task: Task,
    status: str,
    output: str,
    model: str,
    attempts: int,
    prompt_tokens: int,
    completion_tokens: int,
    error: str | None,
    prompt_hash: str,
    endpoint: str = "",
) -> dict[str, Any]:
    """One journal line; `endpoint` is where the answer came from, as it may be shown (no credentials)."""
    return {
        "id": task.id,
        "split": task.split,
        "sha256": task.sha256,
        "label": task.label,
        "restated": task.restate,
        "status": status,
        "output": output,
        "model": model,
        "attempts": attempts,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "error": error,
        "prompt_hash": prompt_hash,
        "endpoint": endpoint,
        "at": now_iso(),
    }
