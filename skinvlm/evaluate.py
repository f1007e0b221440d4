"""`skinvlm eval`: accuracy, macro F1, per-class and per-view report, confusion matrix.

Images and true labels come from datasets/ingested (eval works right after ingest), a clinician's label
correction in the review journal standing for the folder's, as in fix, train and publish. Answers come
from any OpenAI-compatible server (async, concurrent, retried as in describe) or from a model
folder run in-process with transformers (CPU or GPU, batched). The `<label>` of each answer is
mapped through the rule file's aliases; anything else is `unparsed` and counts as wrong.
Predictions are appended to predictions.jsonl as they arrive, each with the key of what made it
(endpoint or model folder, model, prompt, generation settings, image resolution, image bytes): a
re-run of the same --name reuses exactly the answers whose key still matches and asks the rest.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from skinvlm import (
    __version__,
    checklist,
    devices,
    endpoints,
    explanation,
    external,
    leakage,
    openai_api,
    review,
    subgroups,
)
from skinvlm.config import check_choice, check_seconds
from skinvlm.endpoints import Pool
from skinvlm.errors import SkinvlmError, read_json_object
from skinvlm.eval_result import EvalResult, Metrics
from skinvlm.images import as_rgb
from skinvlm.journal import last_by_id
from skinvlm.numbers import auc_phrase, bounds, calibration_phrase, p_value, rate, score, seconds
from skinvlm.prompts import LABEL_END, LABEL_START, conversation, instruction, parse_answer
from skinvlm.rules import Rules
from skinvlm.sampling import stratified_sample
from skinvlm.vlm import MIN_PIXELS, read_settings
from skinvlm.workspace import (
    Workspace,
    fingerprint,
    manifest,
    now_iso,
    patients_known,
    stage_fingerprint,
    write_json,
    write_manifest,
    write_text,
    writes,
)

UNPARSED = "unparsed"
LABELS_ONLY_TOKENS = 24  # room for the longest label and its tags; generation stops at </label> before
TOP_LOGPROBS = 20  # the most OpenAI and vLLM (by default) return per token


@dataclass
class EvalSettings:
    name: str | None = None
    split: str = "test"
    limit: int | None = None
    seed: int = 42
    base_url: tuple[str, ...] = ()  # several: requests spread over them (see endpoints.Pool)
    model: str = "skinvlm"
    concurrency: int = 32  # per endpoint
    timeout: float = 120.0
    max_tokens: int = 256
    temperature: float = 0.0
    detail: str = "auto"
    max_pixels: int | None = None  # photos sent to a server: default, the workspace model's trained resolution
    max_attempts: int = 6
    backoff: float = 1.0
    model_dir: str | None = None
    batch_size: int = 8
    gpu: str | None = None
    confusion_matrix: bool = False
    wait: float = 0.0  # seconds to wait for the server to come up before the first request
    labels_only: bool = False  # stop each answer at </label>: accuracy runs in a fraction of the time
    probabilities: bool = True  # class probabilities: every label scored (model dir) or logprobs (server)
    constrained: bool = False  # the label decoded from the classes only, then the summary freely
    target_accuracy: float = 0.95  # the referral threshold's goal: answer only photos this likely to be right
    dataset: str | None = None  # external photos: a folder of class folders or a Hub dataset id (external.py)
    judge_model: str | None = None  # a rubric judge over an OpenAI-compatible endpoint (judge.py)
    judge_base_url: tuple[str, ...] = ()
    judge_max_cost: float | None = None  # dollars: refuse to judge above this estimate

    def __post_init__(self) -> None:
        self.base_url = (self.base_url,) if isinstance(self.base_url, str) else tuple(self.base_url or ())
        self.judge_base_url = (
            (self.judge_base_url,) if isinstance(self.judge_base_url, str) else tuple(self.judge_base_url or ())
        )

    def check(self) -> None:
        check_choice("--detail", self.detail, openai_api.Detail)
        if self.limit is not None and self.limit < 1:
            raise SkinvlmError(f"--limit must be at least 1, not {self.limit}")
        check_seconds("--timeout", self.timeout)
        if self.max_pixels is not None and self.max_pixels < MIN_PIXELS:
            raise SkinvlmError(f"--max-pixels must be at least {MIN_PIXELS} (56x56), not {self.max_pixels}")
        if not 0 < self.target_accuracy <= 1:
            raise SkinvlmError(f"--target-accuracy is a share in (0, 1], not {self.target_accuracy}")


LOCAL_SERVER = "http://127.0.0.1:8000/v1"  # `skinvlm serve`'s default


@dataclass
class Item:
    index: int
    id: str
    label: str  # the true label: the folder's, or a clinician's correction in `skinvlm review`
    view: str
    sha256: str
    corrected: bool = False  # the label is a clinician's correction
    patient: str = ""  # a keyed hash from ingest --patient-pattern; "" when patients are unknown
    subgroups: dict[str, str] = field(default_factory=dict)  # from ingest --metadata


# -- choosing images -------------------------------------------------------------------------
def eval_items(ws: Workspace, settings: EvalSettings) -> tuple[Any, list[Item]]:
    from datasets import load_from_disk

    data = load_from_disk(str(ws.require("ingested")))
    if settings.split not in data:
        raise SkinvlmError(f"datasets/ingested has no split {settings.split!r} (has: {', '.join(data)})")
    ds = data[settings.split]
    truth = true_labels(ds, review.decisions_of(ws)[0])
    known = patients_known(ws)
    patients = ds["patient"] if known and "patient" in ds.column_names else [""] * ds.num_rows
    groups = ds["subgroups"] if "subgroups" in ds.column_names else [""] * ds.num_rows
    columns = zip(ds["id"], truth, ds["label"], ds["view"], ds["sha256"], patients, groups, strict=True)
    items = [Item(i, rid, label, view, sha, label != was, patient, subgroups.from_column(group))
             for i, (rid, label, was, view, sha, patient, group) in enumerate(columns)]  # fmt: skip
    if not items:
        raise SkinvlmError(f"split {settings.split!r} is empty")
    return ds, stratified_sample(items, settings.limit, settings.seed, lambda i: i.label, lambda i: i.view)


def external_items(rules: Rules, settings: EvalSettings) -> tuple[Any, list[Item], list[str]]:
    """--dataset: its photos as items (out-of-scope ones labelled OUT_OF_SCOPE), and each photo's own class name."""
    from datasets import Image

    assert settings.dataset is not None
    ds, names = external.load(settings.dataset, settings.split)
    raw = ds.cast_column("image", Image(decode=False))
    items = []
    for i, name in enumerate(names):
        image = raw[i]["image"]
        data = image["bytes"] or Path(image["path"]).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        items.append(Item(i, external.record_id(settings.dataset, i, name), external.our_class(name, rules), "unknown",
                          sha))  # fmt: skip
    if not any(item.label for item in items):
        mapped = ", ".join(sorted(set(names))[:8])
        raise SkinvlmError(f"--dataset {external.shown_name(settings.dataset)}: none of its classes ({mapped}) maps "
                           "to ours: name them under [external.labels] in the rule file")  # fmt: skip
    chosen = stratified_sample(items, settings.limit, settings.seed, lambda i: i.label, lambda i: i.view)
    return ds, chosen, names


def true_labels(ds: Any, decisions: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each photo's true label: its folder's, or the one the clinicians agreed on in `skinvlm review` (as in fix)."""
    return [o.label for o in review.reviewed_outcomes(ds["id"], ds, decisions)]


def answerer(ws: Workspace, settings: EvalSettings, asked: list[openai_api.Endpoint]) -> dict[str, Any]:
    """Who answers, as precisely as we can name it: the model folder's content, or the endpoints and model."""
    if settings.model_dir:
        folder = Path(settings.model_dir).resolve()
        weights = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.safetensors"))]
        made = stage_fingerprint(folder) or fingerprint(weights)
        return {"model_dir": str(folder), "made": made, "max_pixels": read_settings(folder).get("max_pixels")}
    sent = {"encoding": "png", "max_pixels": served_resolution(ws, settings)}
    return {"endpoint": ", ".join(sorted(ep.where for ep in asked)), "model": settings.model, "image": sent}


def server_endpoints(ws: Workspace, settings: EvalSettings, api_key: str | None) -> list[openai_api.Endpoint]:
    return openai_api.endpoints(ws, settings.base_url, api_key, settings.model, settings.timeout, LOCAL_SERVER)


def served_resolution(ws: Workspace, settings: EvalSettings) -> int | None:
    """The resolution photos are sent to a server at: --max-pixels, else the one the workspace's model was trained
    at (models/merged, else models/adapter), else None: the original size (an API model)."""
    if settings.max_pixels:
        return settings.max_pixels
    return next((found for f in (ws.merged, ws.adapter) if (found := read_settings(f).get("max_pixels"))), None)


def ask_key(who: dict[str, Any], prompt: str, settings: EvalSettings) -> str:
    """The key of an answer, less the image: what must match for a stored answer to count again."""
    generation = {k: getattr(settings, k) for k in ("max_tokens", "temperature", "detail", "labels_only")}
    if settings.constrained:  # only then: answers kept from earlier free runs keep their key
        generation["constrained"] = True
    generation["probabilities"] = settings.probabilities
    return fingerprint(who, prompt, generation)


# -- what is asked ---------------------------------------------------------------------------
def answer_budget(settings: EvalSettings) -> int:
    return min(settings.max_tokens, LABELS_ONLY_TOKENS) if settings.labels_only else settings.max_tokens


def server_extras(settings: EvalSettings, rules: Rules) -> dict[str, Any]:
    extra: dict[str, Any] = {"stop": [LABEL_END]} if settings.labels_only else {}
    if settings.probabilities:
        extra |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
    if settings.constrained:
        extra["extra_body"] = {"structured_outputs": {"regex": label_pattern(rules)}}  # not in OpenAI's own API
    return extra


def label_pattern(rules: Rules) -> str:
    """vLLM's structured outputs (`structured_outputs.regex`): the label one of the classes, the rest free."""
    classes = "|".join(re.escape(c) for c in rules.class_names)
    return f"{re.escape(LABEL_START)}({classes}){re.escape(LABEL_END)}[\\s\\S]*"


def unconstrained(record: dict[str, Any], settings: EvalSettings) -> str | None:
    """Why a --constrained run must stop at this answer: the server refused the field, or ignored it."""
    if not settings.constrained:
        return None
    error = record.get("error") or ""
    if error and ("400" in error or "422" in error or "structured" in error.lower()):
        return f"the server refused structured outputs ({error.splitlines()[0][:160]})"
    if not error and record["predicted"] == UNPARSED:
        return f"the server ignored structured outputs: its answer {record['raw'][:60]!r} names no class"
    return None


def closed(text: str | None, settings: EvalSettings) -> str | None:
    """A server leaves the stop sequence out of its answer: close the tag it cut."""
    if settings.labels_only and text and LABEL_START in text and LABEL_END not in text:
        return text + LABEL_END
    return text


Tokens = list[tuple[bytes, list[tuple[bytes, float]]]]


def label_distribution(tokens: Tokens | None, classes: list[str]) -> dict[str, float] | None:
    """Class probabilities from the alternatives of the answer's first label token, normalised over the classes.
    The six classes begin with six different syllables, so that token tells them apart; an alternative counts for
    the one class it begins (or that begins it: an alias such as 지루성 counts for 지루). Matching is on bytes: a
    token may end inside a Hangul syllable, and one that could begin several classes counts for none.
    None without logprobs."""
    start = LABEL_START.encode()
    seen = b""
    for i, (token, alternatives) in enumerate(tokens or []):
        joined = seen + token
        if start in joined:
            after = len(joined) - joined.index(start) - len(start)  # label bytes inside this token
            if after == 0:
                return normalised(tokens[i + 1][1] if tokens and i + 1 < len(tokens) else [], classes)
            head = len(token) - after
            return normalised([(alt[head:], lp) for alt, lp in alternatives if alt[:head] == token[:head]], classes)
        seen = joined
    return None


def normalised(alternatives: list[tuple[bytes, float]], classes: list[str]) -> dict[str, float] | None:
    """Each class's share of the alternatives' probability, in log space (a log-probability of -1e4 or a wild
    one must not overflow). A value no log-probability can take (above 0, NaN, infinite) makes this photo's
    probabilities unknown (None), never the whole run's."""
    import math

    names = {c: c.encode() for c in classes}
    logs: dict[str, list[float]] = {c: [] for c in classes}
    for alt, logprob in alternatives:
        if not isinstance(logprob, int | float) or not math.isfinite(logprob) or logprob > 1e-3:
            return None
        alt = alt.strip()
        matching = [c for c, name in names.items() if alt and (name.startswith(alt) or alt.startswith(name))]
        if len(matching) == 1:
            logs[matching[0]].append(logprob)
    if not any(logs.values()):
        return None
    top = max(v for values in logs.values() for v in values)
    mass = {c: sum(math.exp(v - top) for v in values) for c, values in logs.items()}
    total = sum(mass.values())
    return {c: round(m / total, 6) for c, m in mass.items()}


# -- predictions -----------------------------------------------------------------------------
def prediction(
    item: Item, raw: str | None, latency: float, rules: Rules, error: str | None = None, cut: bool = False
) -> dict[str, Any]:
    predicted = predicted_class(raw, rules)
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
    asked: list[openai_api.Endpoint],
    rules: Rules,
    sink: Callable[[dict[str, Any]], None],
    live: list[dict[str, Any]],
) -> None:
    """Ask the server(s) for every item; `live` is kept to the endpoints' summary (endpoints.Pool.summary)."""
    pool = Pool(asked, settings.concurrency, backoff=settings.backoff)
    queue = list(reversed(items))
    max_pixels = served_resolution(ws, settings)

    async def worker() -> None:
        while queue:
            item = queue.pop()
            encode = functools.partial(openai_api.lossless_data_url, max_pixels=max_pixels)
            url, _, _ = await openai_api.row_image_url(ds, item.index, encode)
            messages = openai_api.chat_messages(None, prompt, url, settings.detail)
            start = time.perf_counter()
            reply = await pool.complete(
                messages,
                max_tokens=answer_budget(settings),
                temperature=settings.temperature,
                max_attempts=settings.max_attempts,
                extra=server_extras(settings, rules),
            )
            latency = time.perf_counter() - start
            record = prediction(item, closed(reply.text, settings), latency, rules, reply.error, reply.cut)
            record["prompt_tokens"] = reply.prompt_tokens  # the server's count, image included
            record["endpoint"] = reply.endpoint
            if settings.probabilities:
                record["probabilities"] = label_distribution(reply.tokens, rules.class_names)
            if problem := unconstrained(record, settings):
                raise SkinvlmError(f"--constrained: {problem}; nothing falls back to free answers")
            live[:] = pool.summary()
            sink(record)

    try:
        await pool.work(worker, len(items), settings.wait)
    finally:
        live[:] = pool.summary()


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
    read_json_object(folder / "config.json", "the model's")
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
        stop = {"stop_strings": [LABEL_END], "tokenizer": processor.tokenizer} if settings.labels_only else {}
        vision = (inputs["input_ids"] == image_token).sum(dim=1).tolist()
        scored = [
            class_probabilities(model, processor, text, image, rules)
            if settings.probabilities or settings.constrained
            else None
            for image in images
        ]
        if settings.constrained:  # the label is the best-scored class; generation goes on after </label>
            answers = constrained_answers(model, processor, text, images, scored, settings)
        else:
            answers = greedy_answers(model, processor, inputs, answer_budget(settings), **stop)
        per_image = (time.perf_counter() - clock) / len(batch)
        for item, answer, tokens, probabilities in zip(batch, answers, vision, scored, strict=True):
            record = prediction(item, answer, per_image, rules) | {"image_tokens": tokens}
            sink(record | {"probabilities": probabilities} if probabilities and settings.probabilities else record)


def greedy_answers(model: Any, processor: Any, inputs: Any, max_new_tokens: int, **stop: Any) -> list[str]:
    """The model's greedy answers to processed inputs, the prompt cut off: how eval generates, and how GRPO's
    selection reads the development rows (selection.generation_scores), so both score the same answers."""
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **stop)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def predicted_class(raw: str | None, rules: Rules) -> str:
    """The class an answer's <label> names (through the aliases), or UNPARSED."""
    return rules.canonical(parse_answer(raw).tag) or UNPARSED


def constrained_answers(
    model: Any, processor: Any, prompt: str, images: list[Any], scored: list[Any], settings: EvalSettings
) -> list[str]:
    """`<label>` + the class the scores rank first + `</label>`, then (unless --labels-only) the model's own words
    after it, generated from that prefix."""
    import torch

    labels = [LABEL_START + max(probabilities, key=probabilities.get) + LABEL_END for probabilities in scored]
    if settings.labels_only:
        return labels
    texts = [prompt + label for label in labels]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=settings.max_tokens, do_sample=False)
    rest = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [label + more for label, more in zip(labels, rest, strict=True)]


def class_probabilities(model: Any, processor: Any, prompt: str, image: Any, rules: Rules) -> dict[str, float]:
    """P(class, then </label> | the image, the prompt, <label>) for every class, from one forward pass over the
    continuations of the same prefix, normalised over the classes. Each is scored from the first token where the
    sequences part (a tokenizer may join `>` to the label), so all are probabilities of text from one point."""
    import torch

    classes = rules.class_names
    texts = [prompt + LABEL_START + c + LABEL_END for c in classes]
    tokenizer, side = processor.tokenizer, processor.tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        inputs = processor(text=texts, images=[image] * len(classes), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    ids, lengths = inputs["input_ids"], inputs["attention_mask"].sum(dim=1)
    start = int((ids == ids[0]).all(dim=0).int().argmin())  # the first position where the continuations differ
    with torch.no_grad():
        logits = model(**inputs.to(model.device)).logits.float().cpu()
    # The token at position j is predicted by the logits at j - 1.
    token_logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    sums = torch.stack([token_logprobs[i, start - 1 : int(lengths[i]) - 1].sum() for i in range(len(classes))])
    return {c: round(float(p), 6) for c, p in zip(classes, torch.softmax(sums, dim=0), strict=True)}


def reusable(record: dict[str, Any] | None, key: str, item: Item) -> bool:
    """A stored answer counts again only if the same model, prompt and settings gave it for these image bytes."""
    if record is None:
        return False
    return record.get("key") == key and record.get("sha256") == item.sha256 and not record["error"]


def check_failures(result: EvalResult) -> None:
    """A run that left photos without an answer fails once its figures are shown: a script must not take them for
    the model's (they count as wrong)."""
    if result["failed"]:
        reasons = "; ".join(f"{reason} ({n}x)" for reason, n in result["failure_reasons"].items())
        raise SkinvlmError(
            f"{result['failed']} of the {result['n']} photos got no answer ({reasons}) and count as wrong in these "
            f"figures; the answers are saved: `skinvlm eval --name {result['name']}` again asks only those"
        )


def failure_reasons(records: list[dict[str, Any]]) -> Counter[str]:
    return Counter((r["error"] or "").splitlines()[0][:120] for r in records if r["error"])


def require_an_answer(records: list[dict[str, Any]]) -> None:
    failed = failure_reasons(records)
    if records and sum(failed.values()) == len(records):
        reasons = "; ".join(f"{reason} ({n}x)" for reason, n in failed.most_common(3))
        raise SkinvlmError(f"no image got an answer, all {len(records)} requests failed: {reasons}")


# -- metrics ---------------------------------------------------------------------------------
def metrics(records: list[dict[str, Any]], rules: Rules, wall: float, target_accuracy: float = 0.95) -> Metrics:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    from skinvlm import stats  # numpy: loaded when a run is scored, not at every CLI start

    classes = rules.class_names
    truth = [r["label"] for r in records]
    predicted = [r["predicted"] for r in records]
    p, r, f, support = precision_recall_fscore_support(truth, predicted, labels=classes, zero_division=0)
    scored = [c for c in classes if c in set(truth)] or classes  # macro figures: the classes with photos here
    macro, weighted = (
        [round(float(v), 4) for v in precision_recall_fscore_support(truth, predicted, labels=scored, average=avg,
                                                                      zero_division=0)[:3]]
        for avg in ("macro", "weighted")
    )  # fmt: skip
    views: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        views[record["view"]].append(record["predicted"] == record["label"])
    patients = patients_of(records)
    trust = stats.intervals(truth, predicted, classes, patients=patients)
    latencies = sorted(rec["latency"] for rec in records)
    vision = [rec["image_tokens"] for rec in records if rec.get("image_tokens") is not None]  # in-process runs
    columns = [*classes, UNPARSED]
    return {
        "n": len(records),
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        "macro_precision": macro[0],
        "macro_recall": macro[1],
        "macro_f1": macro[2],
        "weighted_precision": weighted[0],
        "weighted_recall": weighted[1],
        "weighted_f1": weighted[2],
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
        "labels": classes,  # the classes only: what scikit-learn's `labels=` takes (unparsed is counted apart)
        "macro_over": scored,  # the classes macro figures average: those with photos in this set
        "predicted_labels": columns,  # the confusion matrix's columns: the classes, then unparsed
        "confusion_matrix": confusion_matrix(truth, predicted, labels=columns)[: len(classes)].tolist(),
        "unparsed": predicted.count(UNPARSED),
        "latency_p50": round(percentile(latencies, 0.50), 4),
        "latency_p95": round(percentile(latencies, 0.95), 4),
        "throughput": round(len(records) / wall, 3) if wall > 0 else None,
        "image_tokens": {"min": min(vision), "max": max(vision)} if vision else None,
        "answers_cut": sum(1 for rec in records if rec.get("cut")),
        "patients": trust["patients"],
        "ci_method": trust["ci_method"],
        "design_effect": trust["design_effect"],
        "minimal_detectable_difference": trust["minimal_detectable_difference"],
        "intervals": trust | {"per_view": view_intervals(records)},
        "probabilities": probability_summary(records, classes),
        "selective": selective_summary(records, target_accuracy),
        "subgroups": subgroups.breakdown(records),
    }


def patients_of(records: list[dict[str, Any]]) -> list[str] | None:
    return [r["patient"] for r in records] if records and all(r.get("patient") for r in records) else None


def view_intervals(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each view's accuracy interval by its own design effect: a view holds about one photo a patient, so the
    whole set's (two views a patient) made them 1.3x too wide."""
    from skinvlm import stats

    views: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        views[record["view"]].append(record)
    return {
        view: stats.share_interval([r["predicted"] == r["label"] for r in members], patients_of(members))
        for view, members in sorted(views.items())
    }


def selective_summary(records: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """Answer only when sure enough, refer the rest (stats.selective): where class probabilities were read."""
    from skinvlm import stats

    scored = [r for r in records if r.get("probabilities")]
    if len(scored) < 2:
        return None
    confidence = [max(r["probabilities"].values()) for r in scored]
    truth, predicted = [r["label"] for r in scored], [r["predicted"] for r in scored]
    return stats.selective(truth, predicted, confidence, target, patients=patients_of(scored))


def probability_summary(records: list[dict[str, Any]], classes: list[str]) -> dict[str, Any] | None:
    from skinvlm import stats

    scored = [r for r in records if r.get("probabilities")]
    if not scored:
        return None
    table = [[r["probabilities"][c] for c in classes] for r in scored]
    return stats.probability_metrics([r["label"] for r in scored], table, classes, patients=patients_of(scored))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    position = (len(values) - 1) * q
    low, high = int(position), min(int(position) + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def hangul_font() -> str | None:
    """The family of a Hangul font registered with matplotlib here (NanumGothic, as koreanize-matplotlib ships
    it), or None: registered by path, for this figure's use only."""
    from matplotlib import font_manager

    from skinvlm.report_html import hangul_font_file

    path = hangul_font_file()
    if path is None:
        return None
    font_manager.fontManager.addfont(str(path))
    return str(font_manager.FontProperties(fname=str(path)).get_name())


def plot_confusion(result: EvalResult, rules: Rules, path: Path) -> list[str]:
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
    with plt.rc_context({"font.family": [korean, "sans-serif"]} if korean else None):
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
            f"n={result['n']} ({short_backend(result['backend'])})",
            fontsize=14,
        )
        figure.tight_layout()
        figure.savefig(path, bbox_inches="tight")
        plt.close(figure)
    return [c.replace("\n", " ") for c in columns]


def plot_reliability(name: str, probabilities: dict[str, Any], path: Path) -> None:
    """The reliability diagram: accuracy against confidence of the top class per bin; the diagonal is perfect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = probabilities["reliability"]
    figure, axis = plt.subplots(figsize=(6, 6), dpi=120)
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.bar(
        [(b["low"] + b["high"]) / 2 for b in bins],
        [b["accuracy"] for b in bins],
        width=[b["high"] - b["low"] for b in bins],
        edgecolor="black",
        alpha=0.7,
        label="accuracy in the bin",
    )
    axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="darkred", label="bin mean")
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence of the top class", ylabel="accuracy")
    axis.set_title(f"{name}: ECE {probabilities['ece']:.3f} (n={probabilities['n']})")
    axis.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def short_backend(backend: str) -> str:
    """A picture's title names the model folder, not its absolute path (which says where a clinic keeps files)."""
    return f"model dir {Path(backend.removeprefix('model dir ')).name}" if backend.startswith("model dir ") else backend


def report_markdown(result: EvalResult, rules: Rules, with_checklist: bool = True) -> str:
    from skinvlm.report_html import matrix_axes

    rows, columns, counts = matrix_axes(result)
    lines = [
        f"# Evaluation {result['name']}",
        "",
        f"- images: {result['n']} ({result['backend']})",
        f"- accuracy: {result['accuracy']:.4f} (95% CI {bounds(result['intervals']['accuracy'])})",
        f"- macro F1: {result['macro_f1']:.4f} (95% CI {bounds(result['intervals']['macro_f1'])}); "
        f"weighted F1: {result['weighted_f1']:.4f}",
        *([f"- external photos: {external_line(result['external'])}"] if result.get("external") else []),
        f"- intervals: {interval_method(result)}",
        *([f"- sample: {line}"] if (line := sample_size_line(result)) else []),
        f"- unparsed answers: {result['unparsed']}",
        f"- latency p50/p95: {seconds(result['latency_p50'])} / {seconds(result['latency_p95'])}; "
        f"throughput {rate(result['throughput'])}",
        "",
        "| class | precision | recall | F1 (95% CI) | support |",
        "|---|---|---|---|---|",
    ]
    for c, m in result["per_class"].items():
        f1 = f"{m['f1']:.3f} ({bounds(result['intervals']['f1'][c])})"
        lines.append(f"| {c} ({rules.english(c)}) | {m['precision']:.3f} | {m['recall']:.3f} | {f1} | {m['support']} |")
    if probabilities := result.get("probabilities"):
        lines += [
            "",
            f"Class probabilities ({probabilities['n']} images): {auc_phrase(probabilities)}, "
            f"top-2 accuracy {score(probabilities['top2_accuracy'])}, {calibration_phrase(probabilities)}",
        ]
    lines += selective_lines(result)
    lines += ["", "| view | accuracy |", "|---|---|"]
    per_view = result["intervals"].get("per_view", {})
    lines += [f"| {view} | {acc:.3f} ({bounds(per_view[view])}) |" if view in per_view else f"| {view} | {acc:.3f} |"
              for view, acc in result["per_view"].items()]  # fmt: skip
    if said := explanation.lines(result.get("explanation")):
        lines += ["", *said]
    if result.get("judge"):
        from skinvlm import judge

        lines += ["", *judge.lines(result["judge"])]
    if said := subgroups.lines(result.get("subgroups") or {}):
        lines += ["", "Subgroups (accuracy, 95% CI by patient; the worst is picked on these photos):", ""]
        lines += [f"- {line}" for line in said]
    lines += [
        "",
        "Confusion matrix (rows: true, columns: predicted)",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for label, row in zip(rows, counts, strict=True):
        lines.append(f"| {label} | " + " | ".join(map(str, row)) + " |")
    if with_checklist and result.get("checklist"):
        lines += checklist.markdown(result["checklist"])
    return "\n".join(lines) + "\n"


def selective_lines(result: EvalResult) -> list[str]:
    """The referral threshold, as report.md and the model card state it."""
    chosen = result.get("selective")
    if not chosen:
        return []
    target = f"{chosen['target_accuracy']:.0%}"
    if chosen["threshold"] is None:
        return ["", f"Referral: {chosen['why_none']} (AURC {chosen['aurc']:.3f})."]
    accuracy = (
        "-" if chosen["accuracy"] is None else f"{chosen['accuracy']:.3f} ({bounds(chosen['accuracy_interval'])})"
    )
    return [
        "",
        f"Referral for {target} accuracy: answer when the top class's probability is at least "
        f"{chosen['threshold']:.3f} (chosen on {chosen['chosen_on']} photos); on the other {chosen['measured_on']}: "
        f"coverage {chosen['coverage']:.3f} ({bounds(chosen['coverage_interval'])}), accuracy {accuracy}; "
        f"the rest referred. AURC {chosen['aurc']:.3f}.",
    ]


def external_line(found: dict[str, Any]) -> str:
    out = found["out_of_scope"]
    answered = ", ".join(f"{c} {n}" for c, n in sorted(out["answered"].items())) or "none"
    mapped = ", ".join(f"{theirs} -> {ours}" for theirs, ours in found["mapped"].items())
    return (f"{found['dataset']}: {found['scored']} photos scored ({mapped}); {out['n']} out of scope "
            f"({', '.join(out['classes']) or 'none'}), answered: {answered}")  # fmt: skip


def sample_size_line(result: EvalResult) -> str | None:
    """Who the photos are and what this set can detect (runs before patient-aware eval: None)."""
    if "ci_method" not in result:
        return None
    detectable = f"{result['minimal_detectable_difference'] * 100:.1f} points"
    if result["ci_method"] == "patient":
        deff = result["design_effect"]
        who = (f"{result['patients']:,} patients; intervals by patient (design effect {deff:.2f}: "
               f"{result['n']:,} photos count as {result['n'] / deff:,.0f} independent ones)")  # fmt: skip
    else:
        who = "patients unknown: each photo counted as independent (`ingest --patient-pattern` declares them)"
    return f"{who}; a comparison of two models on these photos detects an accuracy difference of about {detectable}"


def interval_method(result: EvalResult) -> str:
    """How a run's 95% intervals were made (runs before Wilson and the F1 posterior: a stratified bootstrap)."""
    return result["intervals"].get("method") or "bootstrap stratified by class"


# -- the stage -------------------------------------------------------------------------------
@writes("eval")
def evaluate(
    ws: Workspace,
    rules: Rules,
    settings: EvalSettings,
    api_key: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> EvalResult:
    settings.check()
    devices.return_freed_memory()
    name = settings.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run = ws.eval_run(name)
    names: list[str] = []
    if settings.dataset:
        ds, items, names = external_items(rules, settings)
    else:
        ds, items = eval_items(ws, settings)
    folder = Path(settings.model_dir) if settings.model_dir else ws.merged
    prompt = read_settings(folder).get("instruction") or instruction(rules)
    asked = [] if settings.model_dir else server_endpoints(ws, settings, api_key)
    who = answerer(ws, settings, asked)
    key = ask_key(who, prompt, settings)
    fresh = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    path = run / "predictions.jsonl"
    done = last_by_id(path)
    cached = [i for i in items if reusable(done.get(i.id), key, i)]
    todo = [i for i in items if not reusable(done.get(i.id), key, i)]
    started, clock = now_iso(), time.perf_counter()
    answered: set[str] = set()
    got_answers: list[str] = []  # answered without error: what a stopped run must keep
    live: list[dict[str, Any]] = []  # the endpoints' summary, kept current while a server is asked
    try:
        with path.open("a", encoding="utf-8") as handle:

            def sink(record: dict[str, Any]) -> None:
                record["key"] = key
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())  # an answer paid for survives a power cut, as the describe journal's do
                done[record["id"]] = record
                answered.add(record["id"])
                if not record["error"]:
                    got_answers.append(record["id"])
                if progress:
                    progress(len(cached) + len(answered), len(items), endpoints.note(live))

            if settings.model_dir:
                ask_local(ds, todo, prompt, settings, rules, sink)
            elif todo:
                asyncio.run(ask_server(ds, todo, prompt, ws, settings, asked, rules, sink, live))
        # A request that failed for good counts as an unparsed, wrong answer: never silently dropped.
        scored = [i for i in items if i.id in done and done[i.id].get("key") == key]
        # a correction made after the answer counts; the patient as ingest knows it now
        answers = [{**done[i.id], "label": i.label, "patient": i.patient, "subgroups": i.subgroups} for i in scored]
        records = [r for r in answers if r["label"] != external.OUT_OF_SCOPE]  # out of scope: counted, not scored
        require_an_answer(records)
    except BaseException:
        # Every answer is kept, on any exit (Ctrl-C, SIGTERM, an error): a re-run asks only the rest. Only a new
        # run that got no answer at all (nothing asked, or every request failed) leaves no folder behind.
        if fresh and not got_answers:
            shutil.rmtree(run, ignore_errors=True)
        raise
    wall = time.perf_counter() - clock
    backend = f"model dir {settings.model_dir}" if settings.model_dir else f"{who['endpoint']} ({settings.model})"
    result: EvalResult = {
        "name": name,
        "backend": backend,
        **metrics(records, rules, wall, settings.target_accuracy),
        "constrained": settings.constrained,
        "label_corrections": sum(1 for item in scored if item.corrected),
        "failed": sum(1 for record in records if record["error"]),
        "failure_reasons": dict(failure_reasons(records).most_common(3)),
        "from_cache": len(cached),
        "asked": len(todo),
        "endpoints": live,
        "key": key,
        "output_dir": str(run),
    }
    reviewed: dict[str, str] = {}
    if settings.dataset:
        result["external"] = external.summary(settings.dataset, names, answers, rules)
    else:  # the workspace's own held-out photos: whether they leak (the last audit), how well they are explained
        result["leakage"] = leakage.counts(leakage.last_check(ws))
        reviewed = explanation.references(ws, settings.split)
        result["explanation"] = explained(records, reviewed, settings, rules)
    index_of = {item.id: item.index for item in items}
    if settings.judge_model:
        result["judge"] = judged(ws, ds, records, index_of, reviewed, settings, run)
    result["notes"] = run_notes(result, records, settings)
    result["skinvlm_version"] = __version__
    # the checklist travels to the model card: the folder's name, never where this machine keeps it
    result["checklist"] = checklist.rows(ws, result | {"backend": short_backend(backend)}, settings.model_dir)
    write_json(ws.eval_metrics(name), result)
    write_text(run / "report.md", report_markdown(result, rules))
    if settings.confusion_matrix:
        plot_confusion(result, rules, run / "confusion_matrix.png")
    if result["probabilities"]:
        plot_reliability(name, result["probabilities"], run / "reliability.png")
    from skinvlm import report_html

    pictures = report_html.thumbnails(ds, {r["id"]: index_of[r["id"]] for r in records})
    report_html.write_report(run / "report.html", result, records, rules, pictures)

    inputs = {
        "stage": "ingested",
        "fingerprint": stage_fingerprint(ws.ingested),
        "model": settings.model_dir or settings.model,
    }

    used = asdict(settings) | {"name": name, "base_url": None if settings.model_dir else who["endpoint"]}
    write_manifest(run, manifest("eval", used, inputs, {"n": len(records)}, started))
    return result


def explained(
    records: list[dict[str, Any]], reviewed: dict[str, str], settings: EvalSettings, rules: Rules
) -> dict[str, Any]:
    """The answers' summaries against the clinician-reviewed descriptions of the same photos (explanation.py)."""
    if settings.labels_only:
        return {"n": 0, "why": "--labels-only answers stop at the label, with no summary to score"}
    return explanation.explanation_scores(records, reviewed, rules.class_names)


def judged(
    ws: Workspace,
    ds: Any,
    records: list[dict[str, Any]],
    index_of: dict[str, int],
    reviewed: dict[str, str],
    settings: EvalSettings,
    run: Path,
) -> dict[str, Any]:
    """--judge-model's rubric over every answered photo (judge.py), its judgements kept in the run folder."""
    from skinvlm import judge

    judge.check_answers(records)
    assert settings.judge_model  # for mypy: called only with one
    asked = openai_api.endpoints(ws, settings.judge_base_url, None, settings.judge_model, settings.timeout)
    return judge.judge(
        ds,
        records,
        index_of,
        reviewed,
        asked,
        run / "judgements.jsonl",
        concurrency=settings.concurrency,
        backoff=settings.backoff,
        max_attempts=settings.max_attempts,
        max_cost=settings.judge_max_cost,
    )


def run_notes(result: EvalResult, records: list[dict[str, Any]], settings: EvalSettings) -> list[str]:
    """What a reader of the figures must know: most answers unparsed (the model knew more than the format let it
    say when the probabilities disagree), no log-probabilities from the endpoint."""
    notes = [said] if (said := leakage.warning(result.get("leakage"))) else []
    unparsed = [r for r in records if r["predicted"] == UNPARSED and not r["error"]]
    if len(unparsed) * 2 > len(records):
        auc = (result.get("probabilities") or {}).get("macro_auc")
        known = f"; yet the class probabilities give macro AUC {auc:.3f}" if auc is not None else ""
        example = " ".join(unparsed[0]["raw"].split())[:120]
        notes.append(
            f"{len(unparsed)} of {len(records)} answers have no <label> naming a class{known}: the accuracy reflects "
            f"the answer format more than the model's judgement; e.g. {example!r}"
        )
    if result["label_corrections"]:
        notes.append(
            f"{result['label_corrections']} of the {len(records)} photos are scored against the label a clinician "
            "gave in `skinvlm review`, not their folder's"
        )
    if len(result["macro_over"]) < len(result["labels"]):
        absent = [c for c in result["labels"] if c not in result["macro_over"]]
        notes.append(f"macro figures average the {len(result['macro_over'])} classes with photos in this set; "
                     f"{', '.join(absent)} have none here")  # fmt: skip
    if settings.probabilities and result["probabilities"] is None:
        notes.append("the endpoint returned no logprobs: no class probabilities, AUC or calibration")
    return notes


def compare(ws: Workspace, names: list[str], rules: Rules) -> dict[str, Any]:
    """The runs' metrics side by side, and each later run paired with the first on the same photos."""
    runs = [ws.read_eval(name) for name in names]
    paired = [paired_with(ws, runs[0], run, rules) for run in runs[1:]]
    detectable = runs[0].get("minimal_detectable_difference")
    return {"runs": runs, "paired": [pair | {"said": comparison_verdict(pair, detectable)} for pair in paired]}


VERDICTS = {
    "no difference shown": "no difference shown",
    "second better": "{second} is better than {first}",
    "first better": "{second} is worse than {first}",
}


def comparison_verdict(pair: dict[str, Any], detectable: float | None) -> str:
    """The test's counts, p-value and verdict in one sentence; the detectable difference only as what these photos
    can tell (80% power), never as a second verdict (one that disagreed with the test did, 36-66% of the time)."""
    t = pair["test"]
    said = VERDICTS[t["verdict"]].format(first=pair["first"], second=pair["second"])
    power = (f"; on these photos a difference of {detectable * 100:.1f} accuracy points is found 80% of the time"
             if detectable is not None else "")  # fmt: skip
    return (
        f"{pair['second']} vs {pair['first']} on {pair['n']} photos both answered: {said} "
        f"({t['method']}: only {pair['first']} right {t['only_first_right']}, only {pair['second']} right "
        f"{t['only_second_right']}; p {'' if t['p_value'] < 1e-4 else '= '}{p_value(t['p_value'])}){power}"
    )


def run_answers(ws: Workspace, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The answers a run's metrics were computed from: its predictions made under its key."""
    found = last_by_id(ws.eval_run(run["name"]) / "predictions.jsonl")
    return {i: r for i, r in found.items() if r.get("key") == run.get("key", r.get("key"))}


def paired_with(ws: Workspace, first: dict[str, Any], second: dict[str, Any], rules: Rules) -> dict[str, Any]:
    from datasets import load_from_disk

    from skinvlm import stats

    a, b = run_answers(ws, first), run_answers(ws, second)
    photos_a, photos_b = {(i, r["sha256"]) for i, r in a.items()}, {(i, r["sha256"]) for i, r in b.items()}
    if photos_a != photos_b:
        raise SkinvlmError(
            f"runs {first['name']!r} and {second['name']!r} were evaluated on different photos ({len(photos_a)} and "
            f"{len(photos_b)}, {len(photos_a & photos_b)} in common): evaluate both with the same --split, --limit "
            "and --seed to compare them"
        )
    both = sorted(i for i in a if not a[i]["error"] and not b[i]["error"])  # the photos both runs answered
    if not both:
        raise SkinvlmError(f"no photo was answered by both {first['name']!r} and {second['name']!r}")
    decisions = review.decisions_of(ws)[0]
    ingested = load_from_disk(str(ws.require("ingested")))
    now = {i: label for ds in ingested.values() for i, label in zip(ds["id"], true_labels(ds, decisions), strict=True)}
    truth = [now.get(i, a[i]["label"]) for i in both]  # the true labels as they stand, not as when answered
    known = patients_known(ws)
    patient_of = {i: p for ds in ingested.values() if "patient" in ds.column_names
                  for i, p in zip(ds["id"], ds["patient"], strict=True)}  # fmt: skip
    patients = [patient_of.get(i, i) for i in both] if known else None
    result = stats.paired(
        truth,
        [a[i]["predicted"] for i in both],
        [b[i]["predicted"] for i in both],
        rules.class_names,
        patients=patients,
    )
    return {"first": first["name"], "second": second["name"], **result}
