"""`skinvlm eval`: accuracy, macro F1, per-class and per-view report, confusion matrix.

Images and true labels come from datasets/ingested (eval works right after ingest). Answers come
from any OpenAI-compatible server (async, concurrent, retried as in describe) or from a model
folder run in-process with transformers (CPU or GPU, batched). The `<label>` of each answer is
mapped through the rule file's aliases; anything else is `unparsed` and counts as wrong.
Predictions are appended to predictions.jsonl as they arrive, each with the key of what made it
(endpoint or model folder, model, prompt, generation settings, image resolution, image bytes): a
re-run of the same --name reuses exactly the answers whose key still matches and asks the rest.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from skinvlm import devices, openai_api
from skinvlm.errors import SkinvlmError
from skinvlm.images import as_rgb
from skinvlm.prompts import conversation, instruction, parse_answer
from skinvlm.redaction import redact_text
from skinvlm.rules import Rules
from skinvlm.sampling import stratified_sample
from skinvlm.vlm import read_settings
from skinvlm.workspace import Workspace, fingerprint, manifest, now_iso, stage_fingerprint, write_manifest, writes

UNPARSED = "unparsed"


@dataclass
class EvalSettings:
    name: str | None = None
    split: str = "test"
    limit: int | None = None
    seed: int = 42
    base_url: str | None = None
    model: str = "skinvlm"
    concurrency: int = 32
    timeout: float = 120.0
    max_tokens: int = 256
    temperature: float = 0.0
    detail: str = "auto"
    max_side: int = 1024
    max_attempts: int = 6
    backoff: float = 1.0
    model_dir: str | None = None
    batch_size: int = 8
    gpu: str | None = None
    confusion_matrix: bool = False
    wait: float = 0.0  # seconds to wait for the server to come up before the first request

    def check(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise SkinvlmError(f"--limit must be at least 1, not {self.limit}")


LOCAL_SERVER = "http://127.0.0.1:8000/v1"  # `skinvlm serve`'s default


@dataclass
class Item:
    index: int
    id: str
    label: str
    view: str
    sha256: str


# -- choosing images -------------------------------------------------------------------------
def eval_items(ws: Workspace, settings: EvalSettings) -> tuple[Any, list[Item]]:
    from datasets import load_from_disk

    data = load_from_disk(str(ws.require("ingested")))
    if settings.split not in data:
        raise SkinvlmError(f"datasets/ingested has no split {settings.split!r} (has: {', '.join(data)})")
    ds = data[settings.split]
    columns = zip(ds["id"], ds["label"], ds["view"], ds["sha256"], strict=True)
    items = [Item(i, rid, label, view, sha) for i, (rid, label, view, sha) in enumerate(columns)]
    if not items:
        raise SkinvlmError(f"split {settings.split!r} is empty")
    return ds, stratified_sample(items, settings.limit, settings.seed, lambda i: i.label, lambda i: i.view)


def answerer(ws: Workspace, settings: EvalSettings) -> dict[str, Any]:
    """Who answers, as precisely as we can name it: the model folder's content, or the endpoint and model."""
    if settings.model_dir:
        folder = Path(settings.model_dir).resolve()
        weights = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors"))]
        made = stage_fingerprint(folder) or fingerprint(weights)
        return {"model_dir": str(folder), "made": made, "max_pixels": read_settings(folder).get("max_pixels")}
    url = openai_api.setting(ws, "OPENAI_BASE_URL", settings.base_url) or LOCAL_SERVER
    return {"endpoint": redact_text(url), "model": settings.model, "max_side": settings.max_side}


def ask_key(who: dict[str, Any], prompt: str, settings: EvalSettings) -> str:
    """The key of an answer, less the image: what must match for a stored answer to count again."""
    generation = {k: getattr(settings, k) for k in ("max_tokens", "temperature", "detail")}
    return fingerprint(who, prompt, generation)


# -- predictions -----------------------------------------------------------------------------
def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """The last record per id; a failed request (error set) is asked again on the next run."""
    found: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_bytes().splitlines():  # bytes: a torn line may end inside a Hangul character
            try:
                record = json.loads(line)
            except ValueError:
                continue  # the torn last line of a killed run
            found[record["id"]] = record
    return found


def prediction(
    item: Item, raw: str | None, latency: float, rules: Rules, error: str | None = None, cut: bool = False
) -> dict[str, Any]:
    predicted = rules.canonical(parse_answer(raw).tag) or UNPARSED
    return {
        "id": item.id,
        "sha256": item.sha256,
        "label": item.label,
        "view": item.view,
        "predicted": predicted,
        "raw": raw or "",
        "latency": round(latency, 4),
        "error": error,
        "cut": cut,
    }


async def ask_server(
    ds: Any,
    items: list[Item],
    prompt: str,
    ws: Workspace,
    settings: EvalSettings,
    api_key: str | None,
    rules: Rules,
    sink: Callable[[dict[str, Any]], None],
) -> None:
    url = openai_api.setting(ws, "OPENAI_BASE_URL", settings.base_url) or LOCAL_SERVER
    ep = openai_api.endpoint(ws, url, api_key, settings.model, settings.timeout)
    client = ep.client()
    queue = list(reversed(items))

    async def worker() -> None:
        while queue:
            item = queue.pop()
            url, _, _ = await openai_api.row_image_url(ds, item.index, settings.max_side)
            messages = openai_api.chat_messages(None, prompt, url, settings.detail)
            start = time.perf_counter()
            reply = await openai_api.complete(
                client,
                ep,
                messages,
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                max_attempts=settings.max_attempts,
                backoff=settings.backoff,
            )
            sink(prediction(item, reply.text, time.perf_counter() - start, rules, reply.error, reply.cut))

    try:
        await openai_api.check_server(client, ep, settings.wait)
        async with asyncio.TaskGroup() as group:
            for _ in range(min(settings.concurrency, len(items))):
                group.create_task(worker())
    except* SkinvlmError as errors:
        raise errors.exceptions[0] from None
    finally:
        await client.close()


def ask_local(
    ds: Any,
    items: list[Item],
    prompt: str,
    settings: EvalSettings,
    rules: Rules,
    sink: Callable[[dict[str, Any]], None],
) -> None:
    """transformers generation in-process, batched, greedy; latency is the batch time per image."""
    import torch
    from transformers import AutoModelForImageTextToText

    from skinvlm.vlm import IMAGE_TOKEN, load_processor, set_image_resolution

    devices.select_gpus(settings.gpu)
    cuda = devices.check_gpus(settings.gpu)
    folder = Path(settings.model_dir or "")
    if not (folder / "config.json").exists():
        raise SkinvlmError(f"--model-dir {folder} holds no model (config.json missing)")
    processor = load_processor(folder)
    set_image_resolution(processor, read_settings(folder).get("max_pixels"))
    processor.tokenizer.padding_side = "left"
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model = AutoModelForImageTextToText.from_pretrained(
        str(folder), dtype=torch.bfloat16 if cuda else torch.float32, device_map="auto" if cuda else None
    ).eval()
    text = processor.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)
    for start in range(0, len(items), settings.batch_size):
        batch = items[start : start + settings.batch_size]
        images = [as_rgb(ds[item.index]["image"]) for item in batch]
        clock = time.perf_counter()
        inputs = processor(text=[text] * len(batch), images=images, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=settings.max_tokens, do_sample=False)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        per_image = (time.perf_counter() - clock) / len(batch)
        vision = (inputs["input_ids"] == image_token).sum(dim=1).tolist()
        for item, answer, tokens in zip(batch, answers, vision, strict=True):
            sink(prediction(item, answer, per_image, rules) | {"image_tokens": tokens})


def reusable(record: dict[str, Any] | None, key: str, item: Item) -> bool:
    """A stored answer counts again only if the same model, prompt and settings gave it for these image bytes."""
    if record is None:
        return False
    return record.get("key") == key and record.get("sha256") == item.sha256 and not record["error"]


def require_an_answer(records: list[dict[str, Any]]) -> None:
    failed = Counter((r["error"] or "").splitlines()[0][:120] for r in records if r["error"])
    if records and sum(failed.values()) == len(records):
        reasons = "; ".join(f"{reason} ({n}x)" for reason, n in failed.most_common(3))
        raise SkinvlmError(f"no image got an answer, all {len(records)} requests failed: {reasons}")


# -- metrics ---------------------------------------------------------------------------------
def metrics(records: list[dict[str, Any]], rules: Rules, wall: float) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = rules.class_names
    truth = [r["label"] for r in records]
    predicted = [r["predicted"] for r in records]
    p, r, f, support = precision_recall_fscore_support(truth, predicted, labels=classes, zero_division=0)
    averages = {
        avg: precision_recall_fscore_support(truth, predicted, labels=classes, average=avg, zero_division=0)
        for avg in ("macro", "weighted")
    }
    views: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        views[record["view"]].append(record["predicted"] == record["label"])
    latencies = sorted(rec["latency"] for rec in records)
    vision = [rec["image_tokens"] for rec in records if rec.get("image_tokens") is not None]  # in-process runs
    labels = [*classes, UNPARSED]
    return {
        "n": len(records),
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        **{
            f"{avg}_{name}": round(float(values[i]), 4)
            for avg, values in averages.items()
            for i, name in enumerate(("precision", "recall", "f1"))
        },
        "per_class": {
            c: {
                "precision": round(float(p[i]), 4),
                "recall": round(float(r[i]), 4),
                "f1": round(float(f[i]), 4),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "per_view": {view: round(sum(hits) / len(hits), 4) for view, hits in sorted(views.items())},
        "labels": labels,
        "confusion_matrix": confusion_matrix(truth, predicted, labels=labels).tolist(),
        "unparsed": predicted.count(UNPARSED),
        "latency_p50": round(percentile(latencies, 0.50), 4),
        "latency_p95": round(percentile(latencies, 0.95), 4),
        "throughput": round(len(records) / wall, 3) if wall > 0 else None,
        "image_tokens": {"min": min(vision), "max": max(vision)} if vision else None,
        "answers_cut": sum(1 for rec in records if rec.get("cut")),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    position = (len(values) - 1) * q
    low, high = int(position), min(int(position) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def hangul_font() -> bool:
    """Whether matplotlib can draw Hangul here (koreanize-matplotlib registers a font; the `fonts` extra)."""
    try:
        import koreanize_matplotlib  # noqa: F401

        return True
    except ImportError:
        return False


def plot_confusion(result: dict[str, Any], rules: Rules, path: Path) -> list[str]:
    """Counts and row-normalised shares side by side, each with its colour bar; the unparsed column only when
    some answer was unparsed. Returns the column labels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = rules.class_names
    korean = hangul_font()
    names = [f"{c}\n{rules.english(c)}" if korean else rules.english(c) for c in classes]
    counts = np.array(result["confusion_matrix"], dtype=float)[: len(classes)]
    if counts[:, -1].sum() == 0:
        counts = counts[:, :-1]  # no unparsed answer: no empty column
    columns = names + [UNPARSED] * (counts.shape[1] - len(classes))
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    figure, axes = plt.subplots(1, 2, figsize=(16, 7), dpi=120)
    for axis, matrix, title, fmt, top in (
        (axes[0], counts, "images", "{:.0f}", max(counts.max(), 1)),
        (axes[1], shares, "share of the true class (recall on the diagonal)", "{:.2f}", 1.0),
    ):
        shown = axis.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
        axis.set_xticks(range(len(columns)), columns, rotation=40, ha="right", fontsize=11)
        axis.set_yticks(range(len(classes)), names, fontsize=11)
        axis.set_xlabel("predicted", fontsize=12)
        axis.set_ylabel("true", fontsize=12)
        axis.set_title(title, fontsize=13)
        for (i, j), value in np.ndenumerate(matrix):
            colour = "white" if value > top / 2 else "black"
            axis.text(j, i, fmt.format(value), ha="center", va="center", fontsize=11, color=colour)
    figure.suptitle(
        f"{result['name']}: accuracy {result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}, "
        f"n={result['n']} ({result['backend']})",
        fontsize=14,
    )
    figure.tight_layout()
    figure.savefig(path, bbox_inches="tight")
    plt.close(figure)
    return [c.replace("\n", " ") for c in columns]


def report_markdown(result: dict[str, Any], rules: Rules) -> str:
    lines = [
        f"# Evaluation {result['name']}",
        "",
        f"- images: {result['n']} ({result['backend']})",
        f"- accuracy: {result['accuracy']:.4f}",
        f"- macro F1: {result['macro_f1']:.4f}; weighted F1: {result['weighted_f1']:.4f}",
        f"- unparsed answers: {result['unparsed']}",
        f"- latency p50/p95: {result['latency_p50']}s / {result['latency_p95']}s; "
        f"throughput {result['throughput']} images/s",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for c, m in result["per_class"].items():
        lines.append(
            f"| {c} ({rules.english(c)}) | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        )
    lines += ["", "| view | accuracy |", "|---|---|"]
    lines += [f"| {view} | {acc:.3f} |" for view, acc in result["per_view"].items()]
    lines += [
        "",
        "Confusion matrix (rows: true, columns: predicted)",
        "",
        "| | " + " | ".join(result["labels"]) + " |",
        "|---" * (len(result["labels"]) + 1) + "|",
    ]
    for label, row in zip(result["labels"], result["confusion_matrix"], strict=False):
        if label != UNPARSED:
            lines.append(f"| {label} | " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines) + "\n"


# -- the stage -------------------------------------------------------------------------------
@writes("eval")
def evaluate(
    ws: Workspace,
    rules: Rules,
    settings: EvalSettings,
    api_key: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    settings.check()
    devices.return_freed_memory()
    name = settings.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run = ws.eval_run(name)
    ds, items = eval_items(ws, settings)
    folder = Path(settings.model_dir) if settings.model_dir else ws.merged
    prompt = read_settings(folder).get("instruction") or instruction(rules)
    key = ask_key(answerer(ws, settings), prompt, settings)
    fresh = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    path = run / "predictions.jsonl"
    done = read_predictions(path)
    cached = [i for i in items if reusable(done.get(i.id), key, i)]
    todo = [i for i in items if not reusable(done.get(i.id), key, i)]
    started, clock = now_iso(), time.perf_counter()
    answered: set[str] = set()
    try:
        with path.open("a", encoding="utf-8") as handle:

            def sink(record: dict[str, Any]) -> None:
                record["key"] = key
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                done[record["id"]] = record
                answered.add(record["id"])
                if progress:
                    progress(len(cached) + len(answered), len(items))

            if settings.model_dir:
                ask_local(ds, todo, prompt, settings, rules, sink)
            elif todo:
                asyncio.run(ask_server(ds, todo, prompt, ws, settings, api_key, rules, sink))
        # A request that failed for good counts as an unparsed, wrong answer: never silently dropped.
        records = [done[i.id] for i in items if i.id in done and done[i.id].get("key") == key]
        require_an_answer(records)
    except BaseException:
        if fresh:  # a run that got no answer leaves no folder behind
            shutil.rmtree(run, ignore_errors=True)
        raise
    wall = time.perf_counter() - clock
    who = answerer(ws, settings)
    backend = f"model dir {settings.model_dir}" if settings.model_dir else f"{who['endpoint']} ({settings.model})"
    result = {
        "name": name,
        "backend": backend,
        **metrics(records, rules, wall),
        "failed": sum(1 for record in records if record["error"]),
        "from_cache": len(cached),
        "asked": len(todo),
        "output_dir": str(run),
    }
    (run / "metrics.json").write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    (run / "report.md").write_text(report_markdown(result, rules), encoding="utf-8")
    if settings.confusion_matrix:
        plot_confusion(result, rules, run / "confusion_matrix.png")

    inputs = {
        "stage": "ingested",
        "fingerprint": stage_fingerprint(ws.ingested),
        "model": settings.model_dir or settings.model,
    }

    write_manifest(run, manifest("eval", asdict(settings), inputs, {"n": len(records)}, started))
    return result


def compare(ws: Workspace, names: list[str]) -> list[dict[str, Any]]:
    runs = []
    for name in names:
        path = ws.eval_run(name) / "metrics.json"
        if not path.exists():
            raise SkinvlmError(f"no eval run {name!r} in {ws.eval_root} (metrics.json missing)")
        runs.append(json.loads(path.read_text(encoding="utf-8")))
    return runs
