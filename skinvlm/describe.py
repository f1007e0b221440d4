"""`skinvlm describe`: a label-conditioned Korean description of every ingested image.

Concurrent (a fixed pool of workers, so in-flight requests never exceed --concurrency), rate
limited (--rpm/--tpm token buckets), retried (see openai_api), and crash-safe: every finished
record is appended to ``journal/describe.jsonl`` and fsynced before the next is counted, so kill -9
loses at most the requests in flight. ``datasets/described`` is rebuilt from ingested + journal at
the end and on Ctrl-C; it holds only text columns, so checkpoints never rewrite images.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from skinvlm import devices, openai_api, pricing
from skinvlm.describe_settings import STATUSES, DescribeSettings, RunContext
from skinvlm.endpoints import Pool
from skinvlm.errors import SkinvlmError
from skinvlm.journal import Journal, Progress, Task, finish, record, rows_of
from skinvlm.prompts import DescribePrompt, agrees, format_answer, parse_answer
from skinvlm.rules import Rules
from skinvlm.sampling import stratified_sample
from skinvlm.workspace import Workspace, manifest, now_iso, stage_fingerprint, writes

TEMPLATE_MODEL = "template"
DEFAULT_COMPLETION_TOKENS = 300


@dataclass
class DescribeResult:
    path: Path
    statuses: dict[str, int]
    run: Progress
    seconds: float
    prompt_hash: str
    model: str
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "statuses": self.statuses,
            "requests_this_run": self.run.done,
            "prompt_tokens": self.run.prompt_tokens,
            "completion_tokens": self.run.completion_tokens,
            "dollars": self.run.dollars,
            "seconds": self.seconds,
            "prompt_hash": self.prompt_hash,
            "model": self.model,
            "answers_cut": self.run.cut,
            "failed_this_run": self.run.failed,
            "endpoints": self.run.endpoints,
            "note": self.note,
        }


# -- choosing the work -----------------------------------------------------------------------
def answer_for(task: Task, journal: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The journal's answer for this image, unless it was given for another image or label under this id
    (a re-ingest from another source): then the image has no answer yet."""
    known = journal.get(task.id)
    if known is None or known.get("sha256", task.sha256) != task.sha256 or known.get("label", task.label) != task.label:
        return None
    return known


def made_otherwise(known: dict[str, Any], model: str, prompt_hash: str) -> bool:
    return known["model"] != model or known.get("prompt_hash") != prompt_hash


def pending_tasks(
    ingested: Any,
    journal: dict[str, dict[str, Any]],
    settings: DescribeSettings,
    rules: Rules,
    prompt_hash: str,
) -> list[Task]:
    redo = set(STATUSES) if "all" in settings.redo else set(settings.redo)
    model = TEMPLATE_MODEL if settings.template else settings.model
    tasks = []
    for task in rows_of(ingested, settings.splits):
        known = answer_for(task, journal)
        if known is None or known["status"] in redo:
            tasks.append(task)
        elif known["model"] == TEMPLATE_MODEL and not settings.template:
            tasks.append(task)  # template answers are placeholders until a model describes the image
        elif "changed" in redo and made_otherwise(known, model, prompt_hash):
            tasks.append(task)
        elif "mismatch" in redo and known["status"] == "ok" and not agrees(known["output"], task.label, rules):
            task.restate = True
            tasks.append(task)
    return stratified_sample(tasks, settings.limit, settings.seed, lambda t: t.label, lambda t: t.view)


def check_provenance(
    ingested: Any, journal: dict[str, dict[str, Any]], settings: DescribeSettings, prompt_hash: str
) -> None:
    """A re-run with another model or prompt must not claim answers it did not make."""
    if settings.template or {"all", "changed"} & set(settings.redo):
        return
    others: Counter[str] = Counter()
    for task in rows_of(ingested, settings.splits):
        known = answer_for(task, journal)
        if known and known["model"] != TEMPLATE_MODEL and made_otherwise(known, settings.model, prompt_hash):
            others[f"{known['model']} with prompt {known.get('prompt_hash') or '?'}"] += 1
    if others:
        listed = ", ".join(f"{n} by {who}" for who, n in others.most_common(3))
        raise SkinvlmError(
            f"{sum(others.values())} records were described otherwise ({listed}); pass --redo changed to describe "
            f"them again with {settings.model} and prompt {prompt_hash}, or use the model and prompt that made them"
        )


# -- one request -----------------------------------------------------------------------------
async def describe_one(task: Task, ingested: Any, ctx: RunContext, pool: Pool) -> dict[str, Any]:
    s = ctx.settings
    encode = openai_api.describe_encoding(s.max_side, s.detail)
    url, width, height = await openai_api.row_image_url(ingested[task.split], task.index, encode)
    user_text = ctx.prompt.user_text(ctx.rules, task.label, task.view, task.restate)
    messages = openai_api.chat_messages(ctx.prompt.system, user_text, url, s.detail)
    estimate = estimate_prompt_tokens(ctx.prompt, user_text, s.model, width, height, s.detail) + s.max_tokens
    attempts = prompt_tokens = completion_tokens = 0
    reply: openai_api.Reply | None = None
    for _ in range(s.format_retries + 1):
        reply = await pool.complete(
            messages,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            max_attempts=s.max_attempts,
            tokens=estimate,
        )
        attempts += reply.attempts
        prompt_tokens += reply.prompt_tokens
        completion_tokens += reply.completion_tokens
        if reply.error or parse_answer(reply.text).well_formed:
            break
    assert reply is not None
    if reply.error:
        status, output = "failed", ""
    else:
        status = "ok" if parse_answer(reply.text).well_formed else "invalid"
        output = reply.text or ""
    error = reply.error or (None if status == "ok" else "answer lacks <label> or <summary>")
    done = record(
        task,
        status,
        output,
        s.model,
        attempts,
        prompt_tokens,
        completion_tokens,
        error,
        ctx.prompt.hash,
        endpoint=reply.endpoint,
    )
    return done | {"cut": reply.cut}


async def run_requests(
    tasks: list[Task],
    ingested: Any,
    ctx: RunContext,
    journal: Journal,
    stats: Progress,
    progress: Callable[[Progress], None] | None,
) -> None:
    queue: asyncio.Queue[Task] = asyncio.Queue()
    for task in tasks:
        queue.put_nowait(task)
    s = ctx.settings
    pool = Pool(ctx.endpoints, s.concurrency, s.rpm, s.tpm, s.backoff)
    handle = journal.open()

    async def worker() -> None:
        while not queue.empty():
            task = queue.get_nowait()
            done = await describe_one(task, ingested, ctx, pool)
            stats.endpoints = pool.summary()
            finish(handle, done, stats, progress)

    try:
        await pool.work(worker, len(tasks))
    finally:
        handle.close()


# -- the stage -------------------------------------------------------------------------------
@writes("describe")
def describe(
    ws: Workspace,
    rules: Rules,
    settings: DescribeSettings,
    prompt: DescribePrompt,
    api_key: str | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> DescribeResult:
    from datasets import load_from_disk

    settings.check()
    devices.return_freed_memory()
    started, clock = now_iso(), time.perf_counter()
    ingested = load_from_disk(str(ws.require("ingested")))
    journal = Journal(ws.describe_journal)
    known = journal.read()
    check_provenance(ingested, known, settings, prompt.hash)
    tasks = pending_tasks(ingested, known, settings, rules, prompt.hash)
    stats = Progress(total=len(tasks))
    model = TEMPLATE_MODEL if settings.template else settings.model
    note = ""
    try:
        if settings.template:
            write_templates(tasks, rules, journal, stats, prompt.hash, progress)
        elif settings.batch:
            from skinvlm import batch

            batch.check_resume(batch.read_state(batch.state_path(journal)), settings.model)
            ctx = run_context(ws, settings, rules, prompt, api_key)
            note = asyncio.run(
                batch.run_batch(
                    tasks, ingested, ctx, journal, stats, progress, not settings.submit_only, settings.poll_seconds
                )
            )
        elif tasks:
            ctx = run_context(ws, settings, rules, prompt, api_key)
            asyncio.run(run_requests(tasks, ingested, ctx, journal, stats, progress))
    except BaseException:
        if stats.done:  # what this run finished is made current; a run refused at once (401) leaves all as it was
            materialise(ws, ingested, journal.read(), settings, prompt, stats, started)
        raise
    statuses = materialise(ws, ingested, journal.read(), settings, prompt, stats, started)
    if stats.done and stats.failed == stats.done:
        raise SkinvlmError(
            f"every one of the {stats.done} requests failed: {top_reasons(stats)} (each is in journal/describe.jsonl)"
        )
    seconds = round(time.perf_counter() - clock, 2)
    return DescribeResult(ws.described, statuses, stats, seconds, prompt.hash, model, note)


def top_reasons(stats: Progress) -> str:
    return "; ".join(f"{reason} ({n}x)" for reason, n in Counter(stats.reasons).most_common(3))


def check_failures(result: DescribeResult) -> None:
    """A run that left images without an answer fails once its summary is shown, so a script does not go on as if
    every photo had its description."""
    run = result.run
    if run.failed:
        raise SkinvlmError(
            f"{run.failed} of the {run.done} requests of this run failed ({top_reasons(run)}); every answer is saved: "
            "`skinvlm describe --redo failed` asks those again"
        )


def run_context(
    ws: Workspace, settings: DescribeSettings, rules: Rules, prompt: DescribePrompt, api_key: str | None
) -> RunContext:
    found = openai_api.endpoints(ws, settings.base_url, api_key, settings.model, settings.timeout)
    if settings.batch and len(found) > 1:
        raise SkinvlmError(
            f"--batch goes through one provider's Batch API, not {len(found)} endpoints: give one --base-url"
        )
    return RunContext(settings, rules, prompt, found)


def write_templates(
    tasks: Iterable[Task],
    rules: Rules,
    journal: Journal,
    stats: Progress,
    prompt_hash: str,
    progress: Callable[[Progress], None] | None,
) -> None:
    """Offline answers from the rule file's class templates: label-only training, demos, dry runs."""
    templates = {c.name: c.template for c in rules.classes}
    tags = {c.name: c.template_label or c.name for c in rules.classes}
    handle = journal.open()
    try:
        for task in tasks:
            if not templates.get(task.label):
                raise SkinvlmError(f"the rule file has no template for class {task.label!r} ([labels.classes])")
            done = record(
                task,
                "ok",
                format_answer(tags[task.label], templates[task.label]),
                TEMPLATE_MODEL,
                0,
                0,
                0,
                None,
                prompt_hash,
            )
            finish(handle, done, stats, progress)
    finally:
        handle.close()


TEXT_COLUMNS = (
    "id",
    "output",
    "status",
    "model",
    "prompt_hash",
    "endpoint",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "error",
)
PENDING: dict[str, Any] = {
    "status": "pending",
    "output": "",
    "model": "",
    "prompt_hash": "",
    "endpoint": "",
    "attempts": 0,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "error": None,
}


def materialise(
    ws: Workspace,
    ingested: Any,
    journal: dict[str, dict[str, Any]],
    settings: DescribeSettings,
    prompt: DescribePrompt,
    stats: Progress,
    started: str,
) -> dict[str, int]:
    """ingested ids + journal -> datasets/described (text columns only; images stay in ingested)."""
    from datasets import Dataset, DatasetDict, Features, Value

    kinds = {"attempts": "int32", "prompt_tokens": "int32", "completion_tokens": "int32"}
    feats = Features({c: Value(kinds.get(c, "string")) for c in TEXT_COLUMNS})
    statuses: Counter[str] = Counter()
    made_by: Counter[tuple[str, str, str]] = Counter()
    splits = {}
    rows: dict[str, dict[str, list[Any]]] = {split: {c: [] for c in TEXT_COLUMNS} for split in ingested}
    for task in rows_of(ingested, ingested):
        found = answer_for(task, journal) or PENDING
        statuses[found["status"]] += 1
        if found["model"]:
            made_by[(found["model"], found.get("prompt_hash") or "", found.get("endpoint") or "")] += 1
        for column in TEXT_COLUMNS:
            rows[task.split][column].append(task.id if column == "id" else found.get(column))
    for split, columns in rows.items():
        splits[split] = Dataset.from_dict(columns, features=feats)
    template_made = sum(n for (model, _, _), n in made_by.items() if model == TEMPLATE_MODEL)
    used = {k: v for k, v in asdict(settings).items() if k != "limit"} | {"prompt_source": prompt.source}
    counts = {
        "splits": {s: d.num_rows for s, d in splits.items()},
        "statuses": dict(statuses),
        "made_by": [
            {"model": m, "prompt_hash": h, "endpoint": e, "records": n} for (m, h, e), n in made_by.most_common()
        ],
        "template_made": template_made,
        "this_run": asdict(stats),
    }
    inputs = {"stage": "ingested", "fingerprint": stage_fingerprint(ws.ingested), "journal": str(ws.describe_journal)}
    ws.save(
        "described",
        DatasetDict(splits),
        manifest("describe", used, inputs, counts, started, prompt_hash=prompt.hash, template_made=template_made > 0),
    )
    return dict(statuses)


# -- cost ------------------------------------------------------------------------------------
def estimate_prompt_tokens(
    prompt: DescribePrompt, user_text: str, model: str, width: int, height: int, detail: str
) -> int:
    text = pricing.text_tokens(prompt.system) + pricing.text_tokens(user_text) + 12
    return text + pricing.image_tokens(model, width, height, "high" if detail == "auto" else detail)


@dataclass
class DryRun:
    example: dict[str, Any]
    records: int
    prompt_tokens: int
    completion_tokens: int
    dollars: float | None
    dollars_low_detail: float | None
    dollars_batch: float | None
    prompt_hash: str


def dry_run(ws: Workspace, rules: Rules, settings: DescribeSettings, prompt: DescribePrompt) -> DryRun:
    """One full example request (image elided) and what the whole run would cost; nothing is sent."""
    from datasets import load_from_disk

    settings.check()
    ingested = load_from_disk(str(ws.require("ingested")))
    journal = Journal(ws.describe_journal).read()
    check_provenance(ingested, journal, settings, prompt.hash)
    tasks = pending_tasks(ingested, journal, settings, rules, prompt.hash)
    seen = [r["completion_tokens"] for r in journal.values() if r["status"] == "ok" and r["completion_tokens"]]
    per_answer = min(
        settings.max_tokens, round(sum(seen) / len(seen)) if len(seen) >= 10 else DEFAULT_COMPLETION_TOKENS
    )
    prompt_tokens = low_tokens = 0
    example: dict[str, Any] = {}
    sizes = {split: list(zip(ds["width"], ds["height"], strict=True)) for split, ds in ingested.items()}
    for task in tasks:
        width, height = fit(*sizes[task.split][task.index], settings.max_side)
        user_text = prompt.user_text(rules, task.label, task.view, task.restate)
        prompt_tokens += estimate_prompt_tokens(prompt, user_text, settings.model, width, height, settings.detail)
        low_tokens += estimate_prompt_tokens(prompt, user_text, settings.model, width, height, "low")
        if not example:
            messages = openai_api.chat_messages(
                prompt.system, user_text, "data:image/jpeg;base64,<elided>", settings.detail
            )
            example = {
                "model": settings.model,
                "max_tokens": settings.max_tokens,
                "temperature": settings.temperature,
                "messages": messages,
            }
    completion = per_answer * len(tasks)
    return DryRun(
        example,
        len(tasks),
        prompt_tokens,
        completion,
        pricing.cost(settings.model, prompt_tokens, completion),
        pricing.cost(settings.model, low_tokens, completion),
        pricing.cost(settings.model, prompt_tokens, completion, batch=True),
        prompt.hash,
    )


def fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return round(width * scale), round(height * scale)
