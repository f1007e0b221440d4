"""`skinvlm audit`: what is wrong with the generated text, counted, with examples.

Checks English words, other scripts, `<label>` tags (raw and after aliases), label mismatches,
tags that are no class, malformed/empty/failed records, summary length and reuse, and personal data
(names, phone, resident and chart numbers, e-mail: `personal.py`; shown masked, never whole). A record with
any problem counts once in `problems`; reused summaries are reported but are not a problem by
themselves (template answers repeat on purpose).
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from skinvlm import personal
from skinvlm.leakage import leakage
from skinvlm.prompts import parse_answer
from skinvlm.rules import Rules, nfc
from skinvlm.workspace import TEXT_STAGES

ENGLISH_WORD = re.compile(r"[A-Za-z]{3,}")
TAGS = re.compile(r"</?(?:label|summary)>")
SCRIPTS = {  # runs of each script, so --suggest can propose a rule per word
    "Han": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+"),
    "Hiragana": re.compile(r"[\u3040-\u309f]+"),
    "Katakana": re.compile(r"[\u30a0-\u30ff]+"),
    "Cyrillic": re.compile(r"[\u0400-\u04ff]+"),
    "Greek": re.compile(r"[\u0370-\u03ff]+"),
    "Arabic": re.compile(r"[\u0600-\u06ff]+"),
    "Thai": re.compile(r"[\u0e00-\u0e7f]+"),
    "Devanagari": re.compile(r"[\u0900-\u097f]+"),
}
EXAMPLES = 2
# Modifiers a word swap gets wrong (`severe 염증` wants `심한 염증`): --suggest proposes a [[rewrite]] for
# these and for every English adverb (-ly), a [[term]] for the rest.
MODIFIER_WORDS = (
    "severe mild moderate diffuse scattered multiple localized generalized chronic acute bilateral "
    "symmetric symmetrical prominent slight marked extensive small large numerous few several faint dense patchy"
)
MODIFIERS = frozenset(MODIFIER_WORDS.split())


@dataclass
class AuditReport:
    stage: str
    records: int
    english_words: Counter[str] = field(default_factory=Counter)
    foreign_scripts: Counter[str] = field(default_factory=Counter)
    tag_labels: Counter[str] = field(default_factory=Counter)
    tag_classes: Counter[str] = field(default_factory=Counter)
    not_class_tags: Counter[str] = field(default_factory=Counter)
    mismatch_pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    script_runs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (script, characters): for --suggest
    statuses: Counter[str] = field(default_factory=Counter)
    english_records: int = 0  # records with any English word
    script_records: int = 0  # records with any other script
    missing_label: int = 0
    missing_summary: int = 0
    invalid: int = 0
    empty: int = 0
    too_short: int = 0
    personal_kinds: Counter[str] = field(default_factory=Counter)  # occurrences per kind
    personal_records: int = 0
    personal_examples: list[dict[str, str]] = field(default_factory=list)  # record id, kind, masked value
    review: dict[str, int] = field(default_factory=dict)  # records per review outcome, once fix applied a review
    lengths: list[int] = field(default_factory=list)
    reused: list[tuple[str, int]] = field(default_factory=list)
    problems: int = 0
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    leakage: dict[str, Any] = field(default_factory=dict)  # between splits (leakage.py); {} for fix's own audit

    @property
    def mismatches(self) -> int:
        return sum(self.mismatch_pairs.values())

    @property
    def disagreements(self) -> dict[str, int]:
        """Per folder class: records whose <label> names another class (or none)."""
        found: Counter[str] = Counter()
        for (label, _), n in self.mismatch_pairs.items():
            found[label] += n
        return dict(found)

    def example(self, key: str, text: str) -> None:
        if len(self.examples[key]) < EXAMPLES:
            self.examples[key].append(text)

    def length_stats(self) -> dict[str, float]:
        if not self.lengths:
            return {}
        return {
            "min": min(self.lengths),
            "median": statistics.median(self.lengths),
            "mean": round(statistics.fmean(self.lengths), 1),
            "max": max(self.lengths),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "records": self.records,
            "english_words": dict(self.english_words.most_common()),
            "foreign_scripts": dict(self.foreign_scripts),
            "tag_labels": dict(self.tag_labels.most_common()),
            "tag_classes": dict(self.tag_classes),
            "not_class_tags": dict(self.not_class_tags),
            "mismatches": self.mismatches,
            "disagreements": self.disagreements,
            "mismatch_pairs": [
                {"label": label, "tag": tag, "count": n} for (label, tag), n in self.mismatch_pairs.most_common()
            ],
            "statuses": dict(self.statuses),
            "missing_label": self.missing_label,
            "missing_summary": self.missing_summary,
            "invalid": self.invalid,
            "empty": self.empty,
            "too_short": self.too_short,
            "summary_length": self.length_stats(),
            "reused_summaries": [{"summary": text, "count": n} for text, n in self.reused],
            "review": self.review,
            "personal_data": self.personal_records,
            "personal_data_by_kind": dict(self.personal_kinds.most_common()),
            "personal_data_examples": self.personal_examples,
            "english_records": self.english_records,
            "script_records": self.script_records,
            "problems": self.problems,
            "leakage": self.leakage,
        }


def snippet(text: str, at: int, width: int = 30) -> str:
    start = max(0, at - width)
    return (
        ("…" if start else "") + text[start : at + width].replace("\n", " ") + ("…" if at + width < len(text) else "")
    )


def korean_only(text: str, rules: Rules) -> bool:
    """No English word the rules do not allow and no run of another script: what the audit counts against a text."""
    text = TAGS.sub(" ", nfc(text))
    allow = set(rules.audit.allow)
    english = any(match.group().lower() not in allow for match in ENGLISH_WORD.finditer(text))
    return not english and not any(pattern.search(text) for pattern in SCRIPTS.values())


def audit_rows(stage: str, rows: list[dict[str, Any]], rules: Rules) -> AuditReport:
    """rows: dicts with at least `label`, `output` and, when known, `status`."""
    report = AuditReport(stage=stage, records=len(rows))
    summaries: Counter[str] = Counter()
    allow = set(rules.audit.allow)
    for row in rows:
        flagged = check_record(report, row, rules, allow, summaries)
        report.problems += flagged
    common = [(text, n) for text, n in summaries.most_common() if n >= max(2, rules.audit.repeated_summary_min)]
    report.reused = [(personal.mask_all(text), n) for text, n in common[:10]]
    return report


def check_record(
    report: AuditReport, row: dict[str, Any], rules: Rules, allow: set[str], summaries: Counter[str]
) -> bool:
    output = nfc(row.get("output") or "")
    status = row.get("status") or "ok"
    report.statuses[status] += 1
    flagged = status != "ok"
    if not output.strip():
        report.empty += 1
        return True
    found = check_personal(report, row, output)
    shown = personal.mask_all(output) if found else output  # examples never show personal data (same length)
    text, shown_text = TAGS.sub(" ", output), TAGS.sub(" ", shown)
    english = False
    for match in ENGLISH_WORD.finditer(text):
        word = match.group().lower()
        if word not in allow:
            report.english_words[word] += 1
            report.example(f"en:{word}", snippet(shown_text, match.start()))
            english = True
    scripts = False
    for script, pattern in SCRIPTS.items():
        runs = list(pattern.finditer(text))
        if runs:
            report.foreign_scripts[script] += 1
            report.example(f"script:{script}", snippet(shown_text, runs[0].start()))
            report.script_runs.update((script, run.group()) for run in runs)
            scripts = True
    report.english_records += english
    report.script_records += scripts
    return check_tags(report, row, output, shown, rules, summaries) or flagged or english or scripts or found


def check_personal(report: AuditReport, row: dict[str, Any], output: str) -> bool:
    findings = personal.find(output)
    for finding in findings:
        report.personal_kinds[finding.kind] += 1
        if sum(e["kind"] == finding.kind for e in report.personal_examples) < personal.EXAMPLES_PER_KIND:
            report.personal_examples.append({"id": row.get("id", ""), "kind": finding.kind, "value": finding.masked})
    report.personal_records += bool(findings)
    return bool(findings)


def check_tags(
    report: AuditReport, row: dict[str, Any], output: str, shown: str, rules: Rules, summaries: Counter[str]
) -> bool:
    """`shown`: the output as examples may show it (personal data masked)."""
    answer = parse_answer(output)
    flagged = False
    if answer.tag is None:
        report.missing_label += 1
    if answer.summary is None:
        report.missing_summary += 1
    if not answer.well_formed:
        report.invalid += 1
        report.example("invalid", shown[:80].replace("\n", " "))
        flagged = True
    if answer.tag is not None:
        tag = " ".join(nfc(answer.tag).split())
        report.tag_labels[tag] += 1
        mapped = rules.canonical(tag)
        report.tag_classes[mapped or f"({tag})"] += 1
        if mapped is None:
            report.not_class_tags[tag] += 1
        if mapped != row["label"]:
            report.mismatch_pairs[(row["label"], mapped or tag)] += 1
            report.example(f"mismatch:{row['label']}:{mapped or tag}", shown[:80].replace("\n", " "))
            flagged = True
    if answer.summary is not None:
        summary = answer.summary.strip()
        report.lengths.append(len(summary))
        summaries[summary] += 1
        if len(summary) < rules.audit.min_summary_chars:
            report.too_short += 1
            report.example("too_short", personal.mask_all(summary))
            flagged = True
    return flagged


def strict_failures(report: AuditReport) -> list[str]:
    """What `audit --strict` refuses, one phrase each ([] where it passes): the one gate, so `publish` refuses
    exactly this and its card, with --ignore-audit, says exactly this."""
    found = []
    if report.problems:
        personal = f", {report.personal_records} of them with personal data" if report.personal_records else ""
        found.append(f"{report.problems} records with problems{personal}")
    return found + leak_failures(report.leakage)


def leak_failures(leak: dict[str, Any]) -> list[str]:
    """The leakage between splits that `audit --strict` refuses, one phrase each."""
    found = []
    if leak.get("patients_in_both_splits"):
        found.append(f"{leak['patients_in_both_splits']} patients with photos in both splits")
    if leak.get("near_duplicates_across_splits"):
        found.append(f"{leak['near_duplicates_across_splits']} near-duplicate photos across the splits")
    return found


def audit(ws: Any, rules: Rules, stage: str | None = None) -> AuditReport:
    """The text stage's records and the leakage between splits; on a workspace with photos and no text yet, the
    leakage alone (a leaky split is worth knowing before 10,800 descriptions are paid for)."""
    from datasets import load_from_disk

    if stage is None and not any((ws.dataset(s) / "dataset_dict.json").exists() for s in TEXT_STAGES):
        report = AuditReport(stage="ingested", records=0)
        report.leakage = leakage(ws, rules)
        return report
    stage = stage or ws.newest_text_stage()

    text = load_from_disk(str(ws.require(stage, newer_reviews=True)))
    labels = load_from_disk(str(ws.require("ingested")))
    rows = []
    reviewed: Counter[str] = Counter()
    for split, ds in text.items():
        label_of = dict(zip(labels[split]["id"], labels[split]["label"], strict=True))
        if "label" in ds.column_names:  # a clinician's correction (fix, after review) stands for the folder's
            label_of |= dict(zip(ds["id"], ds["label"], strict=True))
        status = ds["status"] if "status" in ds.column_names else [None] * ds.num_rows
        for rid, output, state in zip(ds["id"], ds["output"], status, strict=True):
            rows.append({"id": rid, "label": label_of[rid], "output": output, "status": state})
        if "review" in ds.column_names:
            reviewed.update(ds["review"])
    report = audit_rows(stage, rows, rules)
    report.review = dict(reviewed)
    report.leakage = leakage(ws, rules)
    return report


def toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def suggest(report: AuditReport, rules: Rules) -> str:
    """TOML stanzas (and commands) for every kind of problem the audit found, most frequent first."""
    lines = [
        "# Suggestions from `skinvlm audit --suggest`: fill in every empty value, then append the whole of it",
        "# to postprocess.toml (`>>`): [[term]], [[alias]] and [[rewrite]] entries may be added any number of",
        "# times. Modifiers (severe, mild, diffuse, ...) get a [[rewrite]]: write the whole phrase in Korean.",
    ]
    covered = [w for w in report.english_words if any(r.regex.search(f"{w} ") for r in rules.rewrites)]
    missing = [(w, n) for w, n in report.english_words.most_common() if w not in rules.terms and w not in covered]
    for word, n in missing:
        example = toml_string(report.examples.get(f"en:{word}", [""])[0])
        if word in MODIFIERS or word.endswith("ly"):
            pattern = toml_string(f"(?i)\\b{re.escape(word)}\\s+")
            lines += ["", f"# {n}x  e.g. {example}", "[[rewrite]]", f"pattern = {pattern}", 'replace = ""']
            lines.append(f"note = {toml_string(word)}")
        else:
            lines += ["", f"# {n}x  e.g. {example}", "[[term]]", f"english = {toml_string(word)}", 'korean = ""']
    tags = [(tag, n) for tag, n in report.not_class_tags.most_common() if tag != rules.unreadable]
    for tag, n in tags:
        lines += ["", f"# {n}x; class is one of: {', '.join(rules.class_names)}", "[[alias]]"]
        lines += [f"tag = {toml_string(tag)}", 'class = ""']
    for (script, run), n in report.script_runs.most_common():
        lines += [
            "",
            f"# {script}, {n}x: write the Korean it stands for in replace",
            "[[rewrite]]",
            f"pattern = {toml_string(re.escape(run))}",
            'replace = ""',
            f"note = {toml_string(f'{script} {run}')}",
        ]
    known = [w for w in report.english_words if w in rules.terms or w in covered]
    if known and report.stage != "fixed":
        lines += ["", f"# {len(known)} English words ({', '.join(sorted(known)[:8])}) already have a rule in your "
                      f"rule file: `skinvlm fix` applies it"]  # fmt: skip
    lines += command_hints(report, rules)
    if len(lines) == 3:
        lines.append(
            "# nothing to suggest: the audit found no problem"
            if not report.problems
            else f"# no rule or command to suggest for the {report.problems} records with problems: read them in "
            f"`skinvlm audit --stage {report.stage}` (its table names each kind) or decide them in `skinvlm review`"
        )
    return "\n".join(lines) + "\n"


def command_hints(report: AuditReport, rules: Rules) -> list[str]:
    """What no rule can mend, as the commands that do."""
    hints = []
    if report.personal_records:
        kinds = ", ".join(f"{personal.LABELS[k]} {n}" for k, n in report.personal_kinds.most_common())
        hints += [
            f"# {report.personal_records} records hold personal data ({kinds}): `skinvlm fix` redacts it with the",
            "#   shipped rule file's [[rewrite]] rules (copy them into yours if it lacks them); publish refuses it",
        ]
    if report.mismatches:
        pairs = ", ".join(f"{label} -> {tag}: {n}" for (label, tag), n in report.mismatch_pairs.most_common(5))
        hints += [
            f"# {report.mismatches} answers name another class than their folder ({pairs}):",
            "#   re-ask them with the folder label restated: skinvlm describe --redo mismatch",
            "#   or leave them out: skinvlm fix --drop-mismatches (train leaves them out by default)",
        ]
    failed = sum(n for status, n in report.statuses.items() if status != "ok")
    broken = failed + report.invalid + report.empty
    if broken:
        hints.append(
            f"# {report.invalid} malformed, {report.empty} empty and {failed} failed records: "
            "skinvlm describe --redo failed,invalid (or fix --drop-invalid)"
        )
    if report.too_short:
        hints += [
            f"# {report.too_short} summaries are shorter than [audit] min_summary_chars = "
            f"{rules.audit.min_summary_chars}: ask again, or lower it:",
            f"# [audit]\n# min_summary_chars = {rules.audit.min_summary_chars}",
        ]
    return [""] + hints if hints else []
