"""`review --model-answers eval/NAME`: clinicians score the model's own answers blind, on the judge's rubric
(accuracy, safety, groundedness in the photo, Korean fluency; 1-5 each), as SkinGPT-R1's dermatologists did.

Blind: an answer is shown under an opaque key (a digest of its run and record), never its run's name, and the
answers of every run given are interleaved in one order fixed by those digests, so a reviewer scoring two models
cannot tell which wrote what. Each score is one fsynced line of journal/answer-review.jsonl (who, when, the run,
the record and its photo's digest); a reviewer's newest score of an answer counts. `--report` gives each run's
mean per criterion with a 95% interval (a bootstrap of patients, of photos where unknown)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skinvlm.errors import SkinvlmError
from skinvlm.judge import CRITERIA
from skinvlm.workspace import Workspace, fingerprint, now_iso

MAX_COMMENT = 1000


@dataclass(frozen=True)
class Answer:
    key: str  # what the page knows the answer by: the run stays hidden
    run: str
    record_id: str
    sha256: str
    split: str
    index: int  # the photo's row in its split of the ingested dataset
    label: str
    view: str
    patient: str
    text: str


def run_name(given: str) -> str:
    """`eval/NAME` (as `status` lists it) or `NAME`."""
    return given.removeprefix("eval/").strip("/")


def load_answers(ws: Workspace, runs: list[str]) -> list[Answer]:
    """Every answered photo of each run, in the blind order; an error (no answer) is nothing to score."""
    from datasets import load_from_disk

    from skinvlm.evaluate import run_answers

    ingested = load_from_disk(str(ws.require("ingested")))
    photos = {
        (rid, sha): (split, i, patient)
        for split, ds in ingested.items()
        for i, (rid, sha, patient) in enumerate(zip(ds["id"], ds["sha256"], patients(ds), strict=True))
    }
    found: list[Answer] = []
    for name in dict.fromkeys(run_name(r) for r in runs):
        metrics = ws.read_eval(name)
        if metrics.get("external"):
            raise SkinvlmError(f"eval run {name!r} answered an external set (--dataset): its photos are not here")
        answered = [r for r in run_answers(ws, metrics).values() if not r.get("error")]
        strays = [r["id"] for r in answered if (r["id"], r["sha256"]) not in photos]
        if strays:
            raise SkinvlmError(f"eval run {name!r}: {len(strays):,} of its photos are no longer ingested as they were "
                               f"(first {strays[0]}): evaluate again to score its answers")  # fmt: skip
        for r in answered:
            split, index, patient = photos[(r["id"], r["sha256"])]
            key = fingerprint("model-answer", name, r["id"], r["sha256"])[:16]
            found.append(Answer(key, name, r["id"], r["sha256"], split, index, r["label"], r["view"], patient,
                                r["raw"]))  # fmt: skip
    if not found:
        raise SkinvlmError("no answer to score: the runs given hold only failed requests")
    return sorted(found, key=lambda a: fingerprint("order", a.key))


def patients(ds: Any) -> list[str]:
    return list(ds["patient"]) if "patient" in ds.column_names else [""] * ds.num_rows


def parse_score(line: bytes) -> dict[str, Any] | None:
    """One journal line as a score, or None (not JSON, torn, or another shape)."""
    try:
        found = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(found, dict) or not isinstance(found.get("scores"), dict):
        return None
    valid = (
        isinstance(found.get("item"), str)
        and isinstance(found.get("reviewer"), str)
        and found["reviewer"].strip()
        and isinstance(found.get("comment", ""), str)
        and all(is_score(found["scores"].get(c)) for c in CRITERIA)
    )
    return found if valid else None


def is_score(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5


@dataclass
class AnswerReview:
    """The answers under review and every score given so far (journal order: a later line replaces a reviewer's
    earlier score of the same answer)."""

    answers: list[Answer]
    path: Path
    scores: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.by_key = {a.key: a for a in self.answers}
        self.refresh()

    def refresh(self) -> None:
        data = self.path.read_bytes() if self.path.exists() else b""
        scores, skipped = {}, 0
        for line in data.splitlines(keepends=True):
            found = parse_score(line)
            if found is not None and found["item"] in self.by_key:
                scores[(found["reviewer"].strip(), found["item"])] = found
            elif found is None and line.strip() and line.endswith(b"\n"):
                skipped += 1
        self.scores, self.skipped = scores, skipped

    def next_for(self, reviewer: str) -> Answer | None:
        return next((a for a in self.answers if (reviewer.strip(), a.key) not in self.scores), None)

    def scored_by(self, reviewer: str) -> int:
        return sum(1 for who, _ in self.scores if who == reviewer.strip())

    def score(self, reviewer: str, key: str, scores: dict[str, Any], comment: str) -> None:
        answer = self.by_key.get(key)
        if answer is None:
            raise SkinvlmError("no such answer under review")
        if set(scores) != set(CRITERIA) or not all(is_score(v) for v in scores.values()):
            raise SkinvlmError(f"a score gives {', '.join(CRITERIA)} each as a whole number 1-5")
        if len(comment) > MAX_COMMENT:
            raise SkinvlmError(f"a comment is {MAX_COMMENT} characters at most")
        from skinvlm.review import append_line

        line = {"reviewer": reviewer.strip(), "at": now_iso(), "time": time.time(), "item": key, "run": answer.run,
                "id": answer.record_id, "sha256": answer.sha256, "scores": {c: scores[c] for c in CRITERIA},
                "comment": comment.strip()}  # fmt: skip
        with self.lock:
            append_line(self.path, line)
            self.refresh()


def open_answer_review(ws: Workspace, runs: list[str]) -> AnswerReview:
    return AnswerReview(load_answers(ws, runs), ws.answer_review_journal)


def report(state: AnswerReview, resamples: int = 1000, seed: int = 42) -> dict[str, Any]:
    """Per run: how many answers, how many scored, by whom, and each criterion's mean (an answer's score the mean
    of its reviewers') with its 95% interval."""
    from skinvlm import stats

    runs: dict[str, Any] = {}
    for run in dict.fromkeys(a.run for a in state.answers):
        mine = [a for a in state.answers if a.run == run]
        given = {a.key: [s for (_, key), s in state.scores.items() if key == a.key] for a in mine}
        scored = [a for a in mine if given[a.key]]
        reviewers = sorted({s["reviewer"] for a in scored for s in given[a.key]})
        found: dict[str, Any] = {"answers": len(mine), "scored": len(scored), "reviewers": reviewers}
        if scored:
            labels = sorted({a.label for a in scored})
            truth = stats.encode([a.label for a in scored], labels)
            known = all(a.patient for a in scored)
            units = stats.units_of(truth, [a.patient for a in scored] if known else None)
            weights = stats.resample_weights(truth, units, resamples, seed, within_class=False)[:, units]
            for criterion in CRITERIA:
                values = np.asarray([np.mean([s["scores"][criterion] for s in given[a.key]]) for a in scored])
                found[criterion] = score_interval(values, weights, int(units.max()) + 1)
        runs[run] = found
    method = "mean of 1-5 scores; 95% bootstrap interval of patients (photos where unknown), Wilson's where all agree"
    return {"runs": runs, "criteria": list(CRITERIA), "skipped_lines": state.skipped, "method": method}


def score_interval(values: np.ndarray, weights: np.ndarray, units: int) -> dict[str, Any]:
    """The mean score with its bootstrap interval (over all patients, not within each class: a class whose answers
    all score alike would otherwise never vary). Where every score is the same the bootstrap is pinned at it, so
    the mean is read as a share of the 1-5 range with Wilson's interval over the patients (the widest a bounded
    score's can need)."""
    from skinvlm import stats
    from skinvlm.explanation import mean_with_interval

    found = mean_with_interval(values, weights)
    if values.min() == values.max():
        low, high = stats.wilson((values[0] - 1) / 4 * units, units)
        found["interval"] = [round(1 + 4 * low, 4), round(1 + 4 * high, 4)]
    return found


def lines(ws: Workspace, run: str) -> list[str]:
    """The clinicians' blind scores of a run's answers in a sentence, for its model card (none: no score given, or
    the run's photos are no longer those ingested)."""
    if not ws.answer_review_journal.exists():
        return []
    try:
        found = report(AnswerReview(load_answers(ws, [run]), ws.answer_review_journal))["runs"][run]
    except SkinvlmError:
        return []
    if not found["scored"]:
        return []
    figures = ", ".join(f"{c} {score_text(found[c])}" for c in CRITERIA)
    return [f"Clinicians scored {found['scored']:,} of its {found['answers']:,} answers blind "
            f"(`skinvlm review --model-answers`, {len(found['reviewers'])} reviewer(s), 1-5): {figures}."]  # fmt: skip


def score_text(figure: dict[str, Any] | None) -> str:
    if not figure:
        return "-"
    low, high = figure["interval"]
    return f"{figure['mean']:.2f} (95% CI {low:.2f}-{high:.2f})"
