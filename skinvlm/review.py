"""`skinvlm review`: clinicians accept, edit or reject every description; their decisions are data.

Each decision is one line of `journal/review.jsonl` (reviewer, time, record id and image sha256, decision,
label, edited text, reason), appended under a file lock and fsynced before the page moves on, so a kill -9
loses nothing and two servers on one workspace never overwrite each other. A decision names the version of
the record it was made on (how many decisions the record had when it was shown): one made on a record
decided since is refused. The text stage under review is never rewritten here; `fix` reads the journal.

A record's final status: `unreviewed`; `accepted`, `edited` or `rejected` when its reviewers agree (keep or
reject, and the label); `disputed` when they do not, until someone decides it again on the page, which
settles it. `--overlap F` sends a stable share F of the records to a second reviewer.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinvlm import personal
from skinvlm.audit import ENGLISH_WORD, SCRIPTS
from skinvlm.errors import SkinvlmError
from skinvlm.prompts import parse_answer
from skinvlm.rules import Rules, nfc
from skinvlm.workspace import Workspace, journal_digest, now_iso, patients_known

DECISIONS = {"accept": "accepted", "edit": "edited", "reject": "rejected"}
STATUSES = ("unreviewed", "accepted", "edited", "rejected", "disputed")
MAX_TEXT = 4000  # an edited description longer than this is a paste gone wrong
IDLE_SECONDS = 600  # gaps longer than this between a reviewer's decisions are breaks, not reviewing
LOW_PROBABILITY = 0.5  # a model that gives the folder's label less than this puts the record early in the queue
HOLD_SECONDS = 900  # a record shown to one reviewer is not offered to another for this long (this server)


@dataclass(frozen=True)
class Finding:
    kind: str  # english, script, personal, mismatch, invalid
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class Item:
    id: str
    split: str
    index: int
    label: str
    view: str
    sha256: str
    text: str
    findings: tuple[Finding, ...]
    label_probability: float | None = None  # the folder label's probability in the newest eval that scored it
    patient: str | None = None  # the keyed hash ingest stored, where a patient pattern named patients

    @property
    def flagged(self) -> bool:
        return bool(self.findings) or (self.label_probability is not None and self.label_probability < LOW_PROBABILITY)


def findings(text: str, label: str, rules: Rules) -> tuple[Finding, ...]:
    """What audit would flag in one record, with spans to highlight: English words, other scripts, personal
    data; and whether the answer is malformed or names another class than the folder."""
    found = [
        Finding("english", m.start(), m.end())
        for m in ENGLISH_WORD.finditer(text)
        if m.group().lower() not in rules.audit.allow and m.group().lower() not in ("label", "summary")
    ]
    found += [Finding("script", m.start(), m.end()) for pattern in SCRIPTS.values() for m in pattern.finditer(text)]
    found += [Finding("personal", f.start, f.end) for f in personal.find(text)]
    answer = parse_answer(text)
    if not answer.well_formed:
        found.append(Finding("invalid"))
    elif rules.canonical(answer.tag) != label:
        found.append(Finding("mismatch"))
    return tuple(sorted(found, key=lambda f: (f.start, f.end)))


def queue_rank(item: Item) -> tuple[bool, bool, float]:
    """Where a record stands in the review queue: answers that name another class or do not parse, then anything
    flagged, then the rest; within each, the lowest probability of the folder label first (unscored last)."""
    broken = any(f.kind in ("mismatch", "invalid") for f in item.findings)
    doubt = item.label_probability if item.label_probability is not None else 2.0
    return (not broken, not item.flagged, doubt)


def queue_order(items: dict[str, Item]) -> list[str]:
    """Record ids in review order: by `queue_rank`, except that a patient's photos come together (where the
    patient's most urgent photo would), so a reviewer decides both views of one face one after the other."""
    urgency: dict[str, tuple[bool, bool, float]] = {}
    for item in items.values():
        if item.patient is not None:
            urgency[item.patient] = min(urgency.get(item.patient, queue_rank(item)), queue_rank(item))

    def place(record_id: str) -> tuple[tuple[bool, bool, float], str, tuple[bool, bool, float]]:
        item = items[record_id]
        own = queue_rank(item)
        return (urgency[item.patient], item.patient, own) if item.patient is not None else (own, record_id, own)

    return sorted(items, key=place)


def in_overlap(record_id: str, overlap: float) -> bool:
    """A stable share `overlap` of the records, the same on every server and every run."""
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < overlap


@dataclass
class Outcome:
    status: str
    label: str
    text: str | None  # the edited text that stands, when edited


class ReviewState:
    """The records under review and every decision made on them, kept in step with the journal on disk (which
    other servers may append to): `refresh` reads what was appended since it last looked."""

    def __init__(
        self, items: Iterable[Item], path: Path, overlap: float = 0.0, canonical: Callable[[str], str | None] = str
    ) -> None:
        from filelock import FileLock

        if not 0 <= overlap <= 1:
            raise SkinvlmError(f"--overlap is a share of the records in [0, 1], not {overlap}")
        self.items = {item.id: item for item in items}
        self.order = queue_order(self.items)
        self.by_patient: dict[str, list[str]] = defaultdict(list)
        for record_id in self.order:
            if (patient := self.items[record_id].patient) is not None:
                self.by_patient[patient].append(record_id)
        self.path, self.overlap, self.canonical = path, overlap, canonical  # canonical: a tag's class, or None
        self.lock = FileLock(str(path) + ".lock")
        self.decisions: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.shown: dict[str, tuple[str, float]] = {}  # record id -> (reviewer, monotonic time it was shown)
        self.offset = 0
        self.skipped = 0  # journal lines that are not decisions (damaged, or written by hand)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.refresh()

    def refresh(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # a torn last line (a server killed mid-write): read again once it is whole
                self.offset += len(line)
                decision = parse_decision(line)
                if decision is None:
                    self.skipped += bool(line.strip())
                elif decision["id"] in self.items:
                    apply(self.decisions, decision)

    # -- what a record's decisions come to ----------------------------------------------------------
    def outcome(self, record_id: str) -> Outcome:
        return outcome(self.items[record_id].label, self.decisions.get(record_id, []))

    def same_patient(self, record_id: str) -> list[Item]:
        """The other photos under review of this record's patient (none where patients are unknown)."""
        patient = self.items[record_id].patient
        return [self.items[i] for i in self.by_patient.get(patient or "", []) if i != record_id]

    def version(self, record_id: str) -> int:
        return len(self.decisions.get(record_id, []))

    def blind_for(self, reviewer: str, record_id: str) -> bool:
        """Whether `reviewer` reads this record as a second, blind opinion: others decided it, this reviewer did
        not, and it is not a dispute to settle (whoever settles one sees both sides). A blind read is shown
        nothing of the earlier outcome, so the agreement the report computes is between independent reads."""
        made = self.decisions.get(record_id, [])
        others = {d["reviewer"] for d in made}
        return bool(made) and reviewer.strip() not in others and self.outcome(record_id).status != "disputed"

    def text_class(self, text: str) -> str | None:
        answer = parse_answer(text)
        return self.canonical(answer.tag) if answer.well_formed and answer.tag else None

    def next_for(self, reviewer: str) -> Item | None:
        """Disputed records first for those who took no part in the dispute (anyone may settle one), then records
        awaiting a second reviewer, then new ones in queue order, then disputes this reviewer is part of; never a
        record this reviewer has decided otherwise."""
        now = time.monotonic()
        held = {r for r, (who, at) in self.shown.items() if who != reviewer and now - at < HOLD_SECONDS}
        chosen = self.first_for(reviewer, held) or self.first_for(reviewer, set())  # all held: share one
        if chosen is None:
            return None
        self.shown[chosen.id] = (reviewer, now)  # two reviewers at once are shown different records
        return chosen

    def first_for(self, reviewer: str, skipped: set[str]) -> Item | None:
        second = new = own_dispute = None
        for record_id in self.order:
            if record_id in skipped:
                continue
            made = self.decisions.get(record_id, [])
            if not made:
                new = new or record_id
                continue
            reviewers = {d["reviewer"] for d in made}
            if self.outcome(record_id).status == "disputed":
                if reviewer not in reviewers:
                    return self.items[record_id]
                own_dispute = own_dispute or record_id
                continue
            awaits_second = len(reviewers) == 1 and reviewer not in reviewers and in_overlap(record_id, self.overlap)
            if second is None and awaits_second:
                second = record_id
        chosen = second or new or own_dispute
        return self.items[chosen] if chosen else None

    def decide(
        self, reviewer: str, record_id: str, version: int, decision: str, label: str, text: str | None, reason: str
    ) -> dict[str, Any]:
        """Append one decision, or refuse it (SkinvlmError) when the record changed since it was shown."""
        item = self.items.get(record_id)
        if item is None:
            raise SkinvlmError(f"no record {record_id!r} in this review")
        if decision not in DECISIONS:
            raise SkinvlmError(f"a decision is one of {', '.join(DECISIONS)}, not {decision!r}")
        if not reviewer.strip() or len(reviewer) > 100:
            raise SkinvlmError("a reviewer needs a name of 1-100 characters")
        if decision == "edit" and not (text and text.strip()):
            raise SkinvlmError("an edit needs the edited text")
        if text is not None and len(text) > MAX_TEXT:
            raise SkinvlmError(f"the edited text is longer than {MAX_TEXT} characters")
        kept = text if decision == "edit" else item.text if decision == "accept" else None
        says = self.text_class(kept) if kept is not None else None
        if says is not None and says != label:
            raise LabelDisagrees(
                f"the text says {says}, the label chosen is {label}: choose one (the label, written into the text "
                "as an edit, or the text's class as the label); nothing was saved"
            )
        with self.lock:
            self.refresh()
            made = self.decisions.get(record_id, [])
            if version != len(made):
                last = made[-1] if made else {}
                raise SkinvlmError(
                    f"this record was decided by {last.get('reviewer', 'someone')} since it was shown to you "
                    "(nothing was saved): look at it again"
                )
            settles = self.outcome(record_id).status == "disputed"
            blind = self.blind_for(reviewer, record_id)
            line = {
                "reviewer": reviewer.strip(),
                "at": now_iso(),
                "time": time.time(),
                "id": record_id,
                "sha256": item.sha256,
                "decision": decision,
                "label": label,
                "text": nfc(text) if decision == "edit" and text else None,
                "reason": reason.strip() if reason else "",
                "version": version,
                "settles": settles,
                "blind": blind,
            }
            append_line(self.path, line)
            self.shown.pop(record_id, None)  # decided: free for a second reviewer
            self.refresh()
        return line


class LabelDisagrees(SkinvlmError):
    """A decision whose kept text names another class than the label chosen: the clinician picks one."""


def parse_decision(line: bytes) -> dict[str, Any] | None:
    """One journal line as a decision, or None when it is not one (not JSON, torn, or JSON of another shape:
    every field the readers use is checked here, so they never meet a list, a number or an unknown decision)."""
    try:
        decision = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(decision, dict):
        return None
    if decision.get("decision") == "undo":
        standing = isinstance(decision.get("id"), str) and isinstance(decision.get("reviewer"), str)
        return decision if standing and decision["id"] and decision["reviewer"].strip() else None
    text, reason, at = decision.get("text"), decision.get("reason", ""), decision.get("time", 0.0)
    valid = (
        isinstance(decision.get("id"), str)
        and decision["id"]
        and decision.get("decision") in DECISIONS
        and isinstance(decision.get("label"), str)
        and isinstance(decision.get("reviewer"), str)
        and decision["reviewer"].strip()
        and (text is None or isinstance(text, str))
        and (decision["decision"] != "edit" or isinstance(text, str))
        and isinstance(reason, str)
        and isinstance(at, (int, float))
        and not isinstance(at, bool)
        and isinstance(decision.get("settles", False), bool)
    )
    return decision if valid else None


def undo_last(state: ReviewState, reviewer: str) -> Item:
    """Take back `reviewer`'s newest decision (an undo line in the journal): the record is shown again. Refused
    when someone decided the record since, whose decision it would silently become."""
    with state.lock:
        state.refresh()
        mine = [(d.get("time", 0.0), rid) for rid, made in state.decisions.items() for d in made
                if d["reviewer"] == reviewer.strip()]  # fmt: skip
        if not mine:
            raise SkinvlmError("nothing to undo: you have made no decision here")
        record_id = max(mine)[1]
        last = state.decisions[record_id][-1]
        if last["reviewer"] != reviewer.strip():
            raise SkinvlmError(f"{last['reviewer']} decided your last record since: it stays as decided")
        append_line(state.path, {"reviewer": reviewer.strip(), "at": now_iso(), "time": time.time(),
                                 "id": record_id, "decision": "undo"})  # fmt: skip
        state.refresh()
    state.shown[record_id] = (reviewer, time.monotonic())
    return state.items[record_id]


def decisions_of(ws: Workspace) -> tuple[dict[str, list[dict[str, Any]]], str | None, int]:
    """Every decision in the review journal, per record id, in the order made (a torn last line left out), the
    digest of the lines read (what a fix applied, so `status` sees decisions made after it) and how many lines
    were skipped as not decisions."""
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    data = ws.review_journal.read_bytes() if ws.review_journal.exists() else b""
    skipped = 0
    for line in data.splitlines(keepends=True):
        decision = parse_decision(line)
        if decision is not None:
            apply(found, decision)
        elif line.strip() and line.endswith(b"\n"):
            skipped += 1
    return found, journal_digest(data), skipped


def apply(decisions: dict[str, list[dict[str, Any]]], decision: dict[str, Any]) -> None:
    """A journal line read: a decision joins its record's list; an undo takes back its reviewer's last one there."""
    made = decisions[decision["id"]]
    if decision["decision"] != "undo":
        made.append(decision)
    elif made and made[-1]["reviewer"] == decision["reviewer"]:
        made.pop()


def append_line(path: Path, line: dict[str, Any]) -> None:
    """One JSON line, on disk (fsynced) before this returns, as the describe journal appends (a torn line left by
    a killed writer is ended first)."""
    from skinvlm.journal import Journal

    handle = Journal(path).open()
    try:
        Journal.append(handle, line)
    finally:
        handle.close()


def latest_per_reviewer(decisions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each reviewer's own newest decision on a record, settling ones left out (they are not a second opinion)."""
    latest: dict[str, dict[str, Any]] = {}
    for decision in decisions:
        if not decision.get("settles"):
            latest[decision["reviewer"]] = decision
    return latest


def reviewed_outcomes(ids: list[str], ingested: Any, decisions: dict[str, list[dict[str, Any]]]) -> list[Outcome]:
    """Each record's review outcome: its edited text and corrected label stand; decisions made on another image
    (the photo changed at a re-ingest since) do not count."""
    facts = dict(zip(ingested["id"], zip(ingested["label"], ingested["sha256"], strict=True), strict=True))
    return [outcome(facts[r][0], [d for d in decisions.get(r, []) if d.get("sha256") == facts[r][1]]) for r in ids]


def outcome(label: str, decisions: list[dict[str, Any]]) -> Outcome:
    """What a record's decisions come to; `label` is the folder's, which stands until a reviewer changes it."""
    if not decisions:
        return Outcome("unreviewed", label, None)
    settled = [d for d in decisions if d.get("settles")]
    if settled:
        final = settled[-1]
        return Outcome(DECISIONS[final["decision"]], final["label"], final.get("text"))
    opinions = list(latest_per_reviewer(decisions).values())
    keeps = {d["decision"] != "reject" for d in opinions}
    labels = {d["label"] for d in opinions}
    if len(keeps) > 1 or len(labels) > 1:
        return Outcome("disputed", label, None)
    edits = [d for d in opinions if d["decision"] == "edit"]
    if edits:
        newest = max(edits, key=lambda d: d.get("time", 0))
        return Outcome("edited", newest["label"], newest["text"])
    return Outcome(DECISIONS[opinions[0]["decision"]], opinions[0]["label"], None)


# -- the report ---------------------------------------------------------------------------------------
def report(state: ReviewState, resamples: int = 1000, seed: int = 42) -> dict[str, Any]:
    reviewers: dict[str, Counter[str]] = defaultdict(Counter)
    times: dict[str, list[float]] = defaultdict(list)
    items: list[dict[str, dict[str, Any]]] = []
    unblinded = 0
    for record_id, made in state.decisions.items():
        for decision in made:
            times[decision["reviewer"]].append(decision.get("time", 0.0))
        opinions = latest_per_reviewer(made)
        for name, decision in opinions.items():
            reviewers[name][DECISIONS[decision["decision"]]] += 1
        if len(opinions) >= 2 and all(d.get("blind") for d in sorted(opinions.values(), key=decision_time)[1:]):
            items.append({"id": record_id, **opinions})  # type: ignore[dict-item]
        elif len(opinions) >= 2:
            unblinded += 1  # a later read that saw the earlier outcome: no independent opinion
    statuses = Counter(state.outcome(record_id).status for record_id in state.items)
    two = len(reviewers) == 2  # Cohen's kappa pairs one reviewer's ratings with the other's; Fleiss' beyond
    # Ordered by reviewer name: with two reviewers, Cohen's kappa pairs each one's ratings with the other's.
    opinions_of = [[d for k, d in sorted(item.items()) if k != "id"] for item in items]
    keep = [[d["decision"] != "reject" for d in opinions] for opinions in opinions_of]
    labels = [[d["label"] for d in opinions] for opinions in opinions_of]
    return {
        "records": len(state.items),
        "skipped_lines": state.skipped,
        "rejections": [
            {"id": record_id, "reviewer": d["reviewer"], "reason": d.get("reason", ""), "at": d.get("at", "")}
            for record_id, made in state.decisions.items()
            for d in made
            if d["decision"] == "reject"
        ],
        "reviewers": {
            name: {kind: counts[kind] for kind in ("accepted", "edited", "rejected")} | throughput(times[name])
            for name, counts in sorted(reviewers.items())
        },
        "decisions": {status: statuses[status] for status in STATUSES},
        "agreement": {
            "items": len(items),  # records read blind by two or more reviewers: what the kappas are computed on
            "unblinded_left_out": unblinded,
            "method": "cohen" if two else "fleiss",
            "keep_or_reject": agreement(keep, two, resamples, seed),
            "label": agreement(labels, two, resamples, seed),
            "disagreements": [
                {
                    "id": item["id"],
                    "reviewers": {
                        k: {"decision": d["decision"], "label": d["label"]} for k, d in item.items() if k != "id"
                    },
                }
                for item, kept, named in zip(items, keep, labels, strict=True)
                if len(set(kept)) > 1 or len(set(named)) > 1
            ],
        },
    }


def decision_time(decision: dict[str, Any]) -> float:
    return float(decision.get("time", 0.0))


def throughput(stamps: list[float]) -> dict[str, Any]:
    """Decisions per hour of active reviewing (gaps over IDLE_SECONDS are breaks) and the median seconds each."""
    stamps = sorted(stamps)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b - a <= IDLE_SECONDS]
    active = sum(gaps)
    median = sorted(gaps)[len(gaps) // 2] if gaps else None
    return {
        "decisions": len(stamps),
        "per_hour": round(len(gaps) / active * 3600, 1) if active > 0 else None,
        "median_seconds": round(median, 2) if median is not None else None,
    }


def kappa(ratings: list[list[Any]]) -> float | None:
    """Agreement beyond chance of items rated by two or more reviewers: Fleiss' kappa with per-item rater counts,
    which for two ratings an item is Cohen's kappa with both reviewers' ratings pooled (Scott's pi, the same
    figure when the two share their base rates). None when chance alone explains every rating."""
    rated = [r for r in ratings if len(r) >= 2]
    if not rated:
        return None
    categories = sorted({c for r in rated for c in r}, key=str)
    totals = Counter(c for r in rated for c in r)
    n_all = sum(totals.values())
    expected = sum((totals[c] / n_all) ** 2 for c in categories)
    observed = sum((sum(v * v for v in Counter(r).values()) - len(r)) / (len(r) * (len(r) - 1)) for r in rated) / len(
        rated
    )
    if expected >= 1:
        return 1.0 if observed >= 1 else None
    return round((observed - expected) / (1 - expected), 4)


def cohen(pairs: list[tuple[Any, Any]]) -> float | None:
    """Cohen's kappa of two reviewers (each with their own base rates)."""
    if not pairs:
        return None
    n = len(pairs)
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    observed = sum(a == b for a, b in pairs) / n
    expected = sum(first[c] * second[c] for c in set(first) | set(second)) / (n * n)
    if expected >= 1:
        return 1.0 if observed >= 1 else None
    return round((observed - expected) / (1 - expected), 4)


def agreement(ratings: list[list[Any]], two: bool, resamples: int, seed: int) -> dict[str, Any]:
    """The kappa of these ratings (Cohen's when `two` reviewers gave them all, else Fleiss') with a bootstrap
    95% interval over items."""
    import numpy as np

    measure = (lambda rs: cohen([(r[0], r[1]) for r in rs])) if two else kappa
    value = measure(ratings)
    if value is None or len(ratings) < 2:
        return {"kappa": value, "interval": None}
    rng = np.random.default_rng(seed)
    drawn = [measure([ratings[i] for i in rng.integers(0, len(ratings), len(ratings))]) for _ in range(resamples)]
    values = np.array([1.0 if v is None else v for v in drawn])
    low, high = np.percentile(values, [2.5, 97.5])
    return {"kappa": value, "interval": [round(float(low), 4), round(float(high), 4)]}


# -- the records under review ---------------------------------------------------------------------------
def load_items(ws: Workspace, rules: Rules, stage: str | None = None) -> tuple[str, list[Item]]:
    """The newest text stage (fixed where one exists), its text and the ingested facts of each record."""
    from datasets import load_from_disk

    stage = stage or ws.newest_text_stage()
    text = load_from_disk(str(ws.require(stage, newer_reviews=True)))
    ingested = load_from_disk(str(ws.require("ingested")))
    scored = label_probabilities(ws)
    known = patients_known(ws)
    items = []
    for split, ds in text.items():
        base = ingested[split]
        patients = base["patient"] if known else [None] * len(base)
        columns = zip(base["id"], base["label"], base["view"], base["sha256"], patients, strict=True)
        facts = {rid: (i, label, view, sha, patient) for i, (rid, label, view, sha, patient) in enumerate(columns)}
        for rid, output in zip(ds["id"], ds["output"], strict=True):
            index, label, view, sha, patient = facts[rid]
            shown = nfc(output or "")
            probability = scored.get((rid, sha), {}).get(label)
            found = findings(shown, label, rules)
            items.append(Item(rid, split, index, label, view, sha, shown, found, probability, patient))
    return stage, items


def label_probabilities(ws: Workspace) -> dict[tuple[str, str], dict[str, float]]:
    """(record id, image sha256) -> class probabilities, from every eval run's answers, the newest run winning."""
    from skinvlm.journal import last_by_id

    found: dict[tuple[str, str], dict[str, float]] = {}
    runs = (
        sorted(ws.eval_root.glob("*/predictions.jsonl"), key=lambda p: p.stat().st_mtime)
        if ws.eval_root.is_dir()
        else []
    )
    for path in runs:
        for record in last_by_id(path).values():
            if isinstance(record.get("probabilities"), dict):
                found[(record["id"], record.get("sha256", ""))] = record["probabilities"]
    return found


def open_review(ws: Workspace, rules: Rules, stage: str | None, overlap: float) -> tuple[ReviewState, str]:
    stage, items = load_items(ws, rules, stage)
    return ReviewState(items, ws.review_journal, overlap, rules.canonical), stage
