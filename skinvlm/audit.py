"""`skinvlm audit`: what is wrong with the generated text, counted, with examples.

Checks English words, other scripts, `<label>` tags (raw and after aliases), label mismatches,
tags that are no class, malformed/empty/failed records, summary length and reuse. A record with
any problem counts once in `problems`; reused summaries are reported but are not a problem by
themselves (template answers repeat on purpose).
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from skinvlm.prompts import parse_answer
from skinvlm.rules import Rules, nfc

ENGLISH_WORD = re.compile(r"[A-Za-z]{3,}")
TAGS = re.compile(r"</?(?:label|summary)>")
SCRIPTS = {
    "Han": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
    "Hiragana": re.compile(r"[\u3040-\u309f]"),
    "Katakana": re.compile(r"[\u30a0-\u30ff]"),
    "Cyrillic": re.compile(r"[\u0400-\u04ff]"),
    "Greek": re.compile(r"[\u0370-\u03ff]"),
    "Arabic": re.compile(r"[\u0600-\u06ff]"),
    "Thai": re.compile(r"[\u0e00-\u0e7f]"),
    "Devanagari": re.compile(r"[\u0900-\u097f]"),
}
EXAMPLES = 2


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
    statuses: Counter[str] = field(default_factory=Counter)
    missing_label: int = 0
    missing_summary: int = 0
    invalid: int = 0
    empty: int = 0
    too_short: int = 0
    lengths: list[int] = field(default_factory=list)
    reused: list[tuple[str, int]] = field(default_factory=list)
    problems: int = 0
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def mismatches(self) -> int:
        return sum(self.mismatch_pairs.values())

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
            "problems": self.problems,
        }


def snippet(text: str, at: int, width: int = 30) -> str:
    start = max(0, at - width)
    return (
        ("…" if start else "") + text[start : at + width].replace("\n", " ") + ("…" if at + width < len(text) else "")
    )


def audit_rows(stage: str, rows: list[dict[str, Any]], rules: Rules) -> AuditReport:
    """rows: dicts with at least `label`, `output` and, when known, `status`."""
    report = AuditReport(stage=stage, records=len(rows))
    summaries: Counter[str] = Counter()
    allow = set(rules.audit.allow)
    for row in rows:
        flagged = check_record(report, row, rules, allow, summaries)
        report.problems += flagged
    report.reused = [(text, n) for text, n in summaries.most_common() if n >= max(2, rules.audit.repeated_summary_min)][
        :10
    ]
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
    text = TAGS.sub(" ", output)
    for match in ENGLISH_WORD.finditer(text):
        word = match.group().lower()
        if word not in allow:
            report.english_words[word] += 1
            report.example(f"en:{word}", snippet(text, match.start()))
            flagged = True
    for script, pattern in SCRIPTS.items():
        found = pattern.search(text)
        if found:
            report.foreign_scripts[script] += 1
            report.example(f"script:{script}", snippet(text, found.start()))
            flagged = True
    return check_tags(report, row, output, rules, summaries) or flagged


def check_tags(report: AuditReport, row: dict[str, Any], output: str, rules: Rules, summaries: Counter[str]) -> bool:
    answer = parse_answer(output)
    flagged = False
    if answer.tag is None:
        report.missing_label += 1
    if answer.summary is None:
        report.missing_summary += 1
    if not answer.well_formed:
        report.invalid += 1
        report.example("invalid", output[:80].replace("\n", " "))
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
            report.example(f"mismatch:{row['label']}:{mapped or tag}", output[:80].replace("\n", " "))
            flagged = True
    if answer.summary is not None:
        summary = answer.summary.strip()
        report.lengths.append(len(summary))
        summaries[summary] += 1
        if len(summary) < rules.audit.min_summary_chars:
            report.too_short += 1
            report.example("too_short", summary)
            flagged = True
    return flagged


def audit(ws: Any, rules: Rules, stage: str | None = None) -> AuditReport:
    stage = stage or ws.newest_text_stage()
    from datasets import load_from_disk

    text = load_from_disk(str(ws.require(stage)))
    labels = load_from_disk(str(ws.require("ingested")))
    rows = []
    for split, ds in text.items():
        label_of = dict(zip(labels[split]["id"], labels[split]["label"], strict=True))
        status = ds["status"] if "status" in ds.column_names else [None] * ds.num_rows
        for rid, output, state in zip(ds["id"], ds["output"], status, strict=True):
            rows.append({"id": rid, "label": label_of[rid], "output": output, "status": state})
    return audit_rows(stage, rows, rules)


def suggest(report: AuditReport, rules: Rules) -> str:
    """TOML stanzas for what the rules miss, most frequent first, for a person to fill in."""
    lines = [
        "# Suggestions from `skinvlm audit --suggest`: fill in the empty values, then merge into",
        "# postprocess.toml. Adjectives and adverbs (severe, mild, diffuse, ...) need a [[rewrite]]",
        "# phrase rule that rewrites the whole phrase in natural Korean, not a word swap.",
    ]
    missing = [(w, n) for w, n in report.english_words.most_common() if w not in rules.terms]
    if missing:
        lines += ["", "[terms]"]
        for word, n in missing:
            example = report.examples.get(f"en:{word}", [""])[0]
            lines.append(f'{word} = ""  # {n}x  e.g. "{example}"')
    if report.not_class_tags:
        lines += ["", "[labels.aliases]", f"# map each to one of: {', '.join(rules.class_names)}"]
        for tag, n in report.not_class_tags.most_common():
            if tag != rules.unreadable:
                lines.append(f'"{tag}" = ""  # {n}x')
    if not missing and not report.not_class_tags:
        lines.append("# nothing to suggest: the rules cover every English word and tag found")
    return "\n".join(lines) + "\n"
