"""How good the model's Korean explanation is: its `<summary>` against the clinician-reviewed description of the
same held-out photo (accepted as written, or as edited in `skinvlm review`), by character n-gram F-score (chrF,
sacrebleu's) and the longest common character subsequence (ROUGE-L's F-measure, by rapidfuzz's LCS). Korean
joins particles to words, so word n-grams (BLEU) count 피부에 and 피부가 as two different words; characters do
not. Only reviewed descriptions are references: an unreviewed one is a model's text too."""

from __future__ import annotations

from typing import Any

import numpy as np

from skinvlm.prompts import parse_answer
from skinvlm.workspace import Workspace

REVIEWED = ("accepted", "edited")


def references(ws: Workspace, split: str) -> dict[str, str]:
    """Record id -> the summary a clinician accepted or wrote, for the split's photos (none without a review)."""
    from datasets import load_from_disk

    from skinvlm import review

    decisions = review.decisions_of(ws)[0]
    if not decisions or not (stage := ws.newest_text_stage()):
        return {}
    text = load_from_disk(str(ws.require(stage, newer_reviews=True)))
    ingested = load_from_disk(str(ws.require("ingested")))
    if split not in text or split not in ingested:
        return {}
    ids, outputs = text[split]["id"], text[split]["output"]
    found = {}
    outcomes = review.reviewed_outcomes(ids, ingested[split], decisions)
    for rid, output, decided in zip(ids, outputs, outcomes, strict=True):
        if decided.status in REVIEWED:
            summary = parse_answer(decided.text if decided.status == "edited" else output).summary
            if summary and summary.strip():
                found[rid] = summary.strip()
    return found


def pair_scores(answer: str | None, reference: str) -> tuple[float, float]:
    """(chrF, ROUGE-L F) of one answer's summary against its reference, each in [0, 1]; no summary scores 0."""
    from rapidfuzz.distance import LCSseq
    from sacrebleu.metrics import CHRF

    summary = (parse_answer(answer).summary or "").strip()
    if not summary:
        return 0.0, 0.0
    chrf = CHRF().sentence_score(summary, [reference]).score / 100
    common = LCSseq.similarity(summary, reference)
    precision, recall = common / len(summary), common / len(reference)
    rouge = 2 * precision * recall / (precision + recall) if common else 0.0
    return float(chrf), float(rouge)


def explanation_scores(records: list[dict[str, Any]], reviewed: dict[str, str], classes: list[str]) -> dict[str, Any]:
    """chrF and ROUGE-L of every evaluated photo with a reviewed description, their means overall and per true
    class with 95% intervals (a bootstrap of patients, of photos when unknown, within each class)."""
    from skinvlm import stats

    scored = [r for r in records if r["id"] in reviewed]
    if not scored:
        return {"n": 0, "why": "no evaluated photo has a clinician-reviewed description (skinvlm review)"}
    pairs = np.asarray([pair_scores(r["raw"], reviewed[r["id"]]) for r in scored])
    truth = stats.encode([r["label"] for r in scored], classes)
    patients = [r["patient"] for r in scored] if all(r.get("patient") for r in scored) else None
    units = stats.units_of(truth, patients)
    weights = stats.resample_weights(truth, units, stats.RESAMPLES, stats.SEED)
    photo_weights = weights[:, units]
    found: dict[str, Any] = {"n": len(scored), "without_summary": int((pairs[:, 0] == 0).sum())}
    for column, metric in enumerate(("chrf", "rouge_l")):
        values = pairs[:, column]
        found[metric] = mean_with_interval(values, photo_weights)
        found[f"{metric}_per_class"] = {
            c: mean_with_interval(values[truth == i], photo_weights[:, truth == i])
            for i, c in enumerate(classes)
            if (truth == i).any()
        }
    return found


def mean_with_interval(values: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    from skinvlm import stats

    drawn = (weights @ values) / weights.sum(axis=1)
    return {"mean": round(float(values.mean()), 4), "interval": stats.interval(drawn), "n": len(values)}


def lines(found: dict[str, Any] | None) -> list[str]:
    """The scores in sentences: what report.md, the card and the checklist say."""
    if not found:
        return []
    if not found["n"]:
        return [f"Explanation: not scored: {found['why']}"]
    said = [
        f"Explanation against {found['n']} clinician-reviewed descriptions: chrF {score_text(found['chrf'])}, "
        f"ROUGE-L {score_text(found['rouge_l'])} (characters; {found['without_summary']} answers had no summary)"
    ]
    said.append("chrF per class: " + ", ".join(f"{c} {score_text(v)}" for c, v in found["chrf_per_class"].items()))
    return said


def score_text(figure: dict[str, Any]) -> str:
    low, high = figure["interval"]
    return f"{figure['mean']:.3f} ({low:.3f}-{high:.3f})"
