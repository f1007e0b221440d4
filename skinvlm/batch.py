"""`skinvlm describe --batch`: the same requests through the OpenAI Batch API (half price, 24 h window).

Requests are streamed, one image at a time, into JSONL files of at most ~190 MB and 50,000 lines
(the API's limits), uploaded and submitted. Paying twice is impossible by construction: each
batch is written to `journal/batch.json` as an intent (its uploaded file) before it is created,
and created with metadata naming this run and chunk; a re-run that finds an intent without a
batch id looks the batch up by that metadata before it would create one. A crash, Ctrl-C or
`--submit-only` then only means a re-run resumes polling. Results are merged into the describe
journal like any other answer.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from skinvlm import openai_api
from skinvlm.describe_settings import RunContext
from skinvlm.errors import SkinvlmError
from skinvlm.journal import Journal, Progress, Task, finish, record, rows_of
from skinvlm.prompts import parse_answer
from skinvlm.workspace import crash_point, write_json

MAX_FILE_BYTES = 190 * 2**20
MAX_FILE_LINES = 50_000
DONE = {"completed", "failed", "expired", "cancelled"}


def state_path(journal: Journal) -> Path:
    return journal.path.with_name("batch.json")


def read_state(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def request_line(task: Task, url: str, ctx: RunContext) -> bytes:
    s = ctx.settings
    user_text = ctx.prompt.user_text(ctx.rules, task.label, task.view, task.restate)
    messages = openai_api.chat_messages(ctx.prompt.system, user_text, url, s.detail)
    body = {"model": s.model, "messages": messages, "max_tokens": s.max_tokens, "temperature": s.temperature}
    line = {"custom_id": task.id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


async def request_files(
    tasks: list[Task], ingested: Any, ctx: RunContext, folder: Path
) -> AsyncIterator[tuple[Path, int]]:
    """(JSONL file, lines) under the API's size limits, written one image at a time: memory stays flat."""
    encode = openai_api.describe_encoding(ctx.settings.max_side, ctx.settings.detail)
    number, lines, size = 0, 0, 0
    path = folder / "batch-input-0.jsonl"
    handle = path.open("wb")
    try:
        for task in tasks:
            url, _, _ = await openai_api.row_image_url(ingested[task.split], task.index, encode)
            line = request_line(task, url, ctx)
            if lines and (size + len(line) > MAX_FILE_BYTES or lines == MAX_FILE_LINES):
                handle.close()
                yield path, lines
                number, lines, size = number + 1, 0, 0
                path = folder / f"batch-input-{number}.jsonl"
                handle = path.open("wb")
            handle.write(line)
            lines, size = lines + 1, size + len(line)
        handle.close()
        if lines:
            yield path, lines
    finally:
        handle.close()


async def submit(tasks: list[Task], ingested: Any, ctx: RunContext, path: Path) -> dict[str, Any]:
    state: dict[str, Any] = {
        "model": ctx.settings.model,
        "prompt_hash": ctx.prompt.hash,
        "run": uuid.uuid4().hex,
        "batches": [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, state)
    async for upload, lines in request_files(tasks, ingested, ctx, path.parent):
        with upload.open("rb") as handle:
            sent = await ctx.client.files.create(file=handle, purpose="batch")
        upload.unlink()
        entry = {"chunk": len(state["batches"]), "input_file_id": sent.id, "requests": lines, "id": None}
        state["batches"].append(entry | {"merged": False})
        write_json(path, state)  # the intent, before the batch exists: a crash now cannot lead to a second one
        await create(state, state["batches"][-1], ctx, path)
    return state


async def create(state: dict[str, Any], entry: dict[str, Any], ctx: RunContext, path: Path) -> None:
    """Create the batch of an intent, unless a run that died already did: then adopt that one."""
    metadata = {"skinvlm_run": state["run"], "skinvlm_chunk": str(entry["chunk"])}
    async for batch in ctx.client.batches.list(limit=100):
        if (batch.metadata or {}) == metadata:
            entry["id"] = batch.id
            break
    else:
        batch = await ctx.client.batches.create(
            input_file_id=entry["input_file_id"],
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=metadata,
        )
        crash_point("batch-created")
        entry["id"] = batch.id
    write_json(path, state)


def merge_output(
    text: str,
    tasks: dict[str, Task],
    ctx: RunContext,
    handle: Any,
    stats: Progress,
    progress: Callable[[Progress], None] | None,
) -> None:
    for line in text.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        task = tasks.get(item.get("custom_id", ""))
        if task is None:
            continue
        response = item.get("response") or {}
        body = response.get("body") or {}
        usage = body.get("usage") or {}
        choices = body.get("choices") or []
        text_out = (choices[0].get("message") or {}).get("content") if choices else None
        if response.get("status_code") == 200 and text_out is not None:
            status = "ok" if parse_answer(text_out).well_formed else "invalid"
            error = None if status == "ok" else "answer lacks <label> or <summary>"
        else:
            status, text_out = "failed", ""
            error = json.dumps(item.get("error") or body.get("error") or response, ensure_ascii=False)[:500]
        done = record(
            task,
            status,
            text_out or "",
            ctx.settings.model,
            1,
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0),
            error,
            ctx.prompt.hash,
            endpoint=ctx.endpoint.where,
        )
        done["batch"] = True
        finish(handle, done, stats, progress)


async def run_batch(
    tasks: list[Task],
    ingested: Any,
    ctx: RunContext,
    journal: Journal,
    stats: Progress,
    progress: Callable[[Progress], None] | None,
    wait: bool,
    poll_seconds: float,
) -> str:
    """Submit (or resume) and, when waiting, merge every finished batch; returns a one-line status."""
    path = state_path(journal)
    state = read_state(path)
    try:
        await openai_api.check_server(ctx.client, ctx.endpoint)
        if state is None:
            if not tasks:
                return "nothing to describe"
            state = await submit(tasks, ingested, ctx, path)
        for entry in state["batches"]:
            if entry["id"] is None:  # an intent whose run died around the create call
                await create(state, entry, ctx, path)
        by_id = {task.id: task for task in tasks_for(state, ingested, tasks)}
        handle = journal.open()
        try:
            while True:
                pending = [b for b in state["batches"] if not b["merged"]]
                for entry in pending:
                    batch = await ctx.client.batches.retrieve(entry["id"])
                    if batch.status not in DONE:
                        continue
                    for file_id in (batch.output_file_id, batch.error_file_id):
                        if file_id:
                            timeout = ctx.endpoint.timeout
                            text = await openai_api.bounded_file(ctx.client, file_id, entry["requests"], timeout)
                            merge_output(text, by_id, ctx, handle, stats, progress)
                    entry["merged"], entry["status"] = True, batch.status
                    write_json(path, state)
                if all(b["merged"] for b in state["batches"]):
                    path.unlink()
                    return f"{len(state['batches'])} batch(es) merged"
                if not wait:
                    ids = ", ".join(b["id"] for b in state["batches"] if not b["merged"])
                    return f"submitted and waiting at OpenAI: {ids}; run `skinvlm describe --batch` again to collect"
                await asyncio.sleep(poll_seconds)
        finally:
            handle.close()
    finally:
        await ctx.client.close()


def tasks_for(state: dict[str, Any], ingested: Any, tasks: list[Task]) -> list[Task]:
    """Resuming: the ids of a submitted batch may no longer be pending in this run's view; find them all."""
    known = {t.id for t in tasks}
    return [*tasks, *(task for task in rows_of(ingested, ingested) if task.id not in known)]


def check_resume(state: dict[str, Any] | None, model: str) -> None:
    if state and state.get("model") != model:
        raise SkinvlmError(
            f"a batch for model {state.get('model')!r} is still open (journal/batch.json); "
            "collect it with the same --model, or delete that file to abandon it"
        )
