"""`skinvlm fix`: apply the rule file to the generated text: datasets/described -> datasets/fixed.

Order: [[rewrite]] phrase rules, then [terms] longest first (whole English words, any case; a
Hangul particle right after the word still counts as a boundary, and is made to agree with the
Korean word that replaces it: "erythema가" -> "홍반이"), then the `<label>` tag mapped through the
aliases; then the clinicians' review (`skinvlm review`): an edited description replaces the text, a corrected
label the folder's, and a `review` column says each record's outcome (unreviewed, accepted, edited, rejected,
disputed). Otherwise the folder label is ground truth. Fixing twice changes nothing the second time. Only
text columns (and the reviewed label) are written; images stay in datasets/ingested.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from skinvlm import review
from skinvlm.audit import AuditReport, audit_rows
from skinvlm.prompts import LABEL_TAG, SUMMARY_TAG, agrees, parse_answer
from skinvlm.rules import Rules, nfc
from skinvlm.workspace import Workspace, fingerprint, manifest, now_iso, stage_fingerprint, writes

EXAMPLES = 3


@dataclass
class FixResult:
    hits: Counter[str]
    changed: int
    dropped: int
    examples: list[tuple[str, str]]
    report: AuditReport
    written: bool
    seconds: float = 0.0
    review_lines_skipped: int = 0  # review journal lines that are not decisions
    review: dict[str, int] = field(default_factory=dict)  # records per review outcome applied
    labels_corrected: int = 0  # records whose label a clinician changed from the folder's
    texts_replaced: int = 0  # records whose text a clinician's edit replaced

    def as_json(self) -> dict[str, Any]:
        return {
            "hits": dict(self.hits.most_common()),
            "changed": self.changed,
            "dropped": self.dropped,
            "examples": [{"before": b, "after": a} for b, a in self.examples],
            "written": self.written,
            "review_lines_skipped": self.review_lines_skipped,
            "review": self.review,
            "labels_corrected": self.labels_corrected,
            "texts_replaced": self.texts_replaced,
            "audit": self.report.as_json(),
        }


# Particle pairs: (after a final consonant, after a vowel); 으로/로 takes 로 after ㄹ too.
PARTICLES = (("은", "는"), ("이", "가"), ("을", "를"), ("과", "와"), ("으로", "로"))
# A particle attached to the replaced word (or one space away, as mixed-script text often has it), ending where the
# Hangul ends: 과는, 으로도 are left alone. A lone 이 one space away is also "this" (scale 이 병변): taken as the
# particle only before a predicate that a subject comes before (scale 이 보입니다, scale 이 있고).
PREDICATES = "보|있|없|관찰|나타|뚜렷|확인|동반|존재|두드러|많|적|심하|흩어|덮"
PARTICLE = (
    r"(?P<particle>(?:으로|로|은|는|이|가|을|를|과|와)(?![가-힣])| (?:으로|로|은|는|가|을|를|과|와)(?![가-힣])"
    rf"| 이(?= (?:{PREDICATES})))?"
)


def particle_after(word: str, particle: str) -> str:
    """The form of `particle` that agrees with the last syllable of `word` (unchanged after a non-Hangul end)."""
    last = word[-1:]
    if not "가" <= last <= "힣":
        return particle
    final = (ord(last) - ord("가")) % 28  # 0: no final consonant; 8: ㄹ
    for consonant, vowel in PARTICLES:
        if particle in (consonant, vowel):
            if consonant == "으로":
                return vowel if final in (0, 8) else consonant
            return consonant if final else vowel
    return particle


def ingested_labels(ingested: Any, ds: Any) -> list[str]:
    """The folder label of each record of `ds`, in its order."""
    label_of = dict(zip(ingested["id"], ingested["label"], strict=True))
    return [label_of[rid] for rid in ds["id"]]


def term_pattern(rules: Rules) -> re.Pattern[str] | None:
    if not rules.terms:
        return None
    words = sorted(rules.terms, key=len, reverse=True)
    alternatives = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words)
    return re.compile(rf"(?<![A-Za-z])(?P<term>{alternatives})(?![A-Za-z]){PARTICLE}", re.IGNORECASE)


def fix_text(text: str, rules: Rules, terms: re.Pattern[str] | None, hits: Counter[str]) -> str:
    """Rewrites and terms on the prose (tags kept), then the label tag mapped through aliases."""
    text = nfc(text)

    def prose(part: str) -> str:
        for rule in rules.rewrites:
            part, n = rule.apply(part)
            if n:
                hits[f"rewrite: {rule.note or rule.pattern}"] += n
        if terms is not None:

            def swap(match: re.Match[str]) -> str:
                key = " ".join(match.group("term").lower().split())
                hits[f"term: {key}"] += 1
                korean = rules.terms[key]
                particle = (match.group("particle") or "").strip()
                return korean + particle_after(korean, particle) if particle else korean

            part = terms.sub(swap, part)
        return part

    summary = SUMMARY_TAG.search(text)
    if summary:
        text = text[: summary.start(1)] + prose(summary.group(1)) + text[summary.end(1) :]
    elif not LABEL_TAG.search(text):
        text = prose(text)
    label = LABEL_TAG.search(text)
    if label:
        raw = " ".join(label.group(1).split())
        mapped = rules.canonical(raw)
        if mapped and mapped != label.group(1):
            hits[f"label: {raw} -> {mapped}"] += 1
            text = text[: label.start(1)] + mapped + text[label.end(1) :]
    return text


@writes("fix")
def fix(
    ws: Workspace,
    rules: Rules,
    *,
    dry_run: bool = False,
    drop_invalid: bool = False,
    drop_mismatches: bool = False,
    phase: Callable[[str], None] = lambda _: None,
) -> FixResult:
    from datasets import DatasetDict, load_from_disk

    started, clock = now_iso(), time.perf_counter()
    described = load_from_disk(str(ws.require("described")))
    labels = load_from_disk(str(ws.require("ingested")))
    terms = term_pattern(rules)
    decisions, decided, skipped_lines = review.decisions_of(ws)
    reviewed: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    examples: list[tuple[str, str]] = []
    rows_for_audit: list[dict[str, Any]] = []
    splits, changed, corrected, replaced = {}, 0, 0, 0
    dropped_by: Counter[str] = Counter()
    for split, ds in described.items():
        phase(f"rewriting {split} ({ds.num_rows} records)")
        outputs = list(ds["output"])
        fixed = [fix_text(o or "", rules, terms, hits) if o else (o or "") for o in outputs]
        for before, after in zip(outputs, fixed, strict=True):
            if before != after:
                changed += 1
                if len(examples) < EXAMPLES:
                    examples.append((before or "", after))
        outcomes = review.reviewed_outcomes(ds["id"], labels[split], decisions)
        reviewed.update(o.status for o in outcomes)
        folders = ingested_labels(labels[split], ds)
        corrected += sum(o.label != folder for o, folder in zip(outcomes, folders, strict=True))
        replaced += sum(o.text is not None for o in outcomes)
        fixed = [fixed_text if o.text is None else o.text for fixed_text, o in zip(fixed, outcomes, strict=True)]
        table = (
            ds.remove_columns("output")
            .add_column("output", fixed)
            .add_column("label", [o.label for o in outcomes])
            .add_column("review", [o.status for o in outcomes])
        )
        rows = [
            {"id": r, "label": o.label, "output": text, "status": s}
            for r, o, text, s in zip(table["id"], outcomes, fixed, table["status"], strict=True)
        ]
        if drop_invalid or drop_mismatches:
            reasons = [drop_reason(row, rules, drop_invalid, drop_mismatches) for row in rows]
            dropped_by.update(reason for reason in reasons if reason)
            keep = [i for i, reason in enumerate(reasons) if reason is None]
            table, rows = table.select(keep), [rows[i] for i in keep]
        splits[split] = table
        rows_for_audit += rows
    phase("auditing the result")
    report = audit_rows("fixed", rows_for_audit, rules)
    result = FixResult(hits, changed, sum(dropped_by.values()), examples, report, not dry_run, 0.0, skipped_lines)
    result.review = {status: reviewed[status] for status in review.STATUSES if reviewed[status]}
    result.labels_corrected, result.texts_replaced = corrected, replaced
    if not dry_run:
        data = DatasetDict(splits).flatten_indices()
        settings = {
            "rules": str(rules.path),
            "rules_fingerprint": fingerprint(rules.path.read_text("utf-8")),
            "drop_invalid": drop_invalid,
            "drop_mismatches": drop_mismatches,
        }
        inputs = {"stage": "described", "fingerprint": stage_fingerprint(ws.described), "review": decided}
        counts = {
            "splits": {s: d.num_rows for s, d in data.items()},
            "changed": changed,
            "dropped": result.dropped,
            "dropped_by": dict(dropped_by),
            "review": result.review,
            "labels_corrected": corrected,
            "hits": dict(hits),
            "problems_after": report.problems,
        }
        phase("saving datasets/fixed")
        ws.save("fixed", data, manifest("fix", settings, inputs, counts, started))
    result.seconds = round(time.perf_counter() - clock, 2)
    return result


def drop_reason(row: dict[str, Any], rules: Rules, drop_invalid: bool, drop_mismatches: bool) -> str | None:
    """Why --drop-invalid or --drop-mismatches leaves the record out ('invalid', 'mismatch'), or None to keep it."""
    usable = row["status"] in (None, "ok") and parse_answer(row["output"]).well_formed
    if drop_invalid and not usable:
        return "invalid"
    # A malformed answer names no class: it is a mismatch only when it is a well-formed one.
    return "mismatch" if drop_mismatches and usable and not agrees(row["output"], row["label"], rules) else None
