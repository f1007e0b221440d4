"""The reporting checklist (TRIPOD+AI, CLAIM) that ends report.md, report.html and the model card: every item an
automatic report can fill, filled from the workspace's manifests and the run's figures; the rest marked "to be
written by the team" or "not applicable", never left blank. Made once per eval run and kept in its metrics.json,
so the report and the card state the same rows.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from skinvlm import explanation, judge, subgroups
from skinvlm.eval_result import EvalResult
from skinvlm.leakage import found_any, last_check
from skinvlm.numbers import auc_phrase, bounds, calibration_phrase
from skinvlm.workspace import Workspace, read_manifest

FILLED, NOT_APPLICABLE, TEAM = "filled", "not applicable", "to be written by the team"
TITLE = "Reporting checklist (TRIPOD+AI)"


def rows(ws: Workspace, result: EvalResult, model_dir: str | None) -> list[dict[str, str]]:
    """[{item, status, detail}] for one eval run."""
    ingested = read_manifest(ws.ingested) or {}
    settings, counts = ingested.get("settings", {}), ingested.get("counts", {})
    fixed = read_manifest(ws.fixed) or {}
    trained = training_manifest(model_dir)
    ci = result["intervals"]
    leakage = last_check(ws)
    found: list[tuple[str, str, str]] = [
        ("Data source", *(filled(settings["about"]) if settings.get("about") else team("ingest --about"))),
        ("Dates of the photos", *team("when the photos were taken")),
        ("Date the data set was made", *filled(str(ingested.get("finished", ""))[:10] or "unknown")),
        (
            "Eligibility of photos",
            *team(f"who and what was photographed; files skipped at ingest: {counts.get('skipped', 0)}"),
        ),  # fmt: skip
        ("Photos per split", *filled(", ".join(f"{k} {v:,}" for k, v in (counts.get("splits") or {}).items()))),
        ("Patients per split", *patients_row(counts.get("patients") or {})),
        ("How the split was made", *filled(settings.get("split_made_by") or "the source's folders")),
        ("Leakage between splits", *leakage_row(leakage)),
        (
            "Outcome (label) source",
            *filled(
                "the folders' diagnoses; clinicians' corrections in `skinvlm review`: "
                f"{result.get('label_corrections', 0)} of the evaluated photos"
            ),
        ),  # fmt: skip
        ("Label review coverage", *review_row(fixed)),
        ("Missing data: failed answers", *filled(f"{result.get('failed', 0)} of {result['n']} photos, scored wrong")),
        ("Missing data: unparsed answers", *filled(f"{result['unparsed']} of {result['n']}, scored wrong")),
        ("Model", *filled(result["backend"])),
        ("Training", *training_row(trained)),
        ("Model selection", *selection_row(trained)),
        ("Evaluation photos", *evaluation_row(result, leakage)),
        ("Accuracy with interval", *filled(f"{result['accuracy']:.4f} (95% CI {bounds(ci['accuracy'])})")),
        ("Macro F1 with interval", *filled(f"{result['macro_f1']:.4f} (95% CI {bounds(ci['macro_f1'])})")),
        ("Interval method", *filled(ci.get("method") or "bootstrap stratified by class")),
        ("Per-class figures", *filled("precision, recall and F1 (95% CI) per class: the per-class table")),
        ("Subgroups", *filled(subgroup_text(result))),
        ("Generated explanation", *explanation_row(result.get("explanation"), result.get("judge"))),
        ("Discrimination (AUC)", *auc_row(result.get("probabilities"))),
        ("Calibration", *calibration_row(result.get("probabilities"))),
        ("Sample size and detectable difference", *sample_row(result)),
        ("External validation", *external_row(result)),
        ("Intended use", *filled("decision support read by a clinician: the model card's Intended use")),
        ("Limitations", *team("beyond the model card's Limitations: population, cameras, settings")),
        ("Consent and ethics approval", *team("consent and IRB approval for the photos")),
        ("Code and versions", *filled(f"skinvlm {result.get('skinvlm_version', '?')}; eval run `{result['name']}`")),
    ]
    return [{"item": item, "status": status, "detail": detail} for item, status, detail in found]


def filled(detail: str) -> tuple[str, str]:
    return FILLED, detail


def team(what: str) -> tuple[str, str]:
    return TEAM, what


def training_manifest(model_dir: str | None) -> dict[str, Any] | None:
    """The adapter's manifest behind a merged model folder, when the run evaluated one."""
    if not model_dir:
        return None
    merged = read_manifest(Path(model_dir)) or {}
    adapter = merged.get("inputs", {}).get("adapter")
    return read_manifest(Path(adapter)) if adapter else None


def patients_row(patients: dict[str, Any]) -> tuple[str, str]:
    if not patients.get("known"):
        return TEAM, "patients unknown: each photo counted as its own patient (`ingest --patient-pattern`)"
    return filled(", ".join(f"{k} {v:,}" for k, v in patients.items() if k != "known"))


def leakage_row(found: dict[str, Any] | None) -> tuple[str, str]:
    if found is None:
        return TEAM, "not checked for this data set: run `skinvlm audit`"
    return filled(f"{found['near_duplicates_across_splits']} near-duplicate photos and "
                  f"{found['patients_in_both_splits']} patients in both splits"
                  + ("" if found["patients_known"] else " (patients unknown)"))  # fmt: skip


def review_row(fixed: dict[str, Any]) -> tuple[str, str]:
    review = (fixed.get("counts") or {}).get("review")
    if not review:
        return TEAM, "no clinician review recorded (`skinvlm review`)"
    return filled(", ".join(f"{status} {n:,}" for status, n in review.items()))


def training_row(trained: dict[str, Any] | None) -> tuple[str, str]:
    if trained is None:
        return NOT_APPLICABLE, "not a model trained in this workspace"
    counts = trained.get("counts", {})
    splits = ", ".join(f"{k} {v:,}" for k, v in (counts.get("splits") or {}).items())
    return filled(
        f"LoRA, {counts.get('steps', '?')} steps on `{trained.get('inputs', {}).get('stage', '?')}` ({splits})"
    )


def selection_row(trained: dict[str, Any] | None) -> tuple[str, str]:
    if trained is None:
        return NOT_APPLICABLE, "not a model trained in this workspace"
    counts = trained.get("counts", {})
    dev = (counts.get("splits") or {}).get("dev", 0)
    if not dev or counts.get("best_step") is None:
        return filled("the last step (no development rows scored)")
    return filled(f"step {counts['best_step']}, chosen on {dev} development photos held out of training")


def auc_row(probabilities: dict[str, Any] | None) -> tuple[str, str]:
    if not probabilities or probabilities.get("macro_auc") is None:
        return NOT_APPLICABLE, "no class probabilities in this run"
    return filled(f"{auc_phrase(probabilities)} (one-vs-rest, per class in the report)")


def subgroup_text(result: EvalResult) -> str:
    views = "view: " + ", ".join(f"{v} {a:.3f}" for v, a in result["per_view"].items())
    said = subgroups.lines(result.get("subgroups") or {})
    return "; ".join([views, *said]) if said else f"{views}; no other attribute known (ingest --metadata CSV)"


def explanation_row(found: dict[str, Any] | None, judged: dict[str, Any] | None) -> tuple[str, str]:
    said = " ".join(judge.lines(judged)) if judged else ""
    if found is None or not found["n"]:
        if said:
            return filled(said)
        why = found["why"] if found else "photos from another source have no reviewed descriptions"
        return (NOT_APPLICABLE if found is None else TEAM), f"not scored: {why}"
    return filled(" ".join([*explanation.lines(found), said]).strip())


def calibration_row(probabilities: dict[str, Any] | None) -> tuple[str, str]:
    if not probabilities:
        return NOT_APPLICABLE, "no class probabilities in this run"
    return filled(f"{calibration_phrase(probabilities)}; reliability diagram in reliability.png")


def sample_row(result: EvalResult) -> tuple[str, str]:
    if "minimal_detectable_difference" not in result:
        return filled(f"{result['n']} photos")
    who = f"{result['patients']} patients" if result.get("patients") else "patients unknown"
    return filled(f"{result['n']} photos, {who}; detectable accuracy difference "
                  f"{result['minimal_detectable_difference'] * 100:.1f} points (80% power)")  # fmt: skip


def evaluation_row(result: EvalResult, leakage: dict[str, Any] | None) -> tuple[str, str]:
    """Where the photos come from, and whether training saw them: never, or in part (the leakage audit's finding
    says so here too, not only in its own row)."""
    if found := result.get("external"):
        return filled(f"{result['n']} photos of the external set {found['dataset']}, never trained on")
    held_out = f"{result['n']} photos of the workspace's held-out split"
    if leakage is None:
        return filled(f"{held_out}; not checked for leakage (`skinvlm audit`)")
    if found_any(leakage):
        return filled(f"{held_out}, NOT independent of training: {leakage['patients_in_both_splits']} patients and "
                      f"{leakage['near_duplicates_across_splits']} near-duplicate photos are in both splits "
                      "(`skinvlm ingest SRC --force --resplit 0.1` divides them by patient)")  # fmt: skip
    return filled(f"{held_out}, never trained on (no patient or near-duplicate photo in both splits)")


def external_row(result: EvalResult) -> tuple[str, str]:
    if found := result.get("external"):
        out = found["out_of_scope"]["n"]
        return filled(f"this run: {found['dataset']}, {found['scored']} photos scored, {out} out of scope")
    return TEAM, "none in this run: `skinvlm eval --dataset` scores photos from another source"


def markdown(found: list[dict[str, str]]) -> list[str]:
    lines = ["", f"## {TITLE}", "", "| item | status | value or where |", "|---|---|---|"]
    return lines + [f"| {r['item']} | {r['status']} | {r['detail'].replace('|', '/')} |" for r in found]


def html(found: list[dict[str, str]]) -> str:
    body = "".join(
        f"<tr><td>{escape(r['item'])}</td><td>{escape(r['status'])}</td><td>{escape(r['detail'])}</td></tr>"
        for r in found
    )
    return (f'<h2>{TITLE}</h2><table id="checklist"><tr><th>item</th><th>status</th><th>value or where</th></tr>'
            f"{body}</table>")  # fmt: skip
