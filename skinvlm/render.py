"""Rich renderings of stage results, kept out of the cli package so commands stay short."""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import table as rich_table
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from skinvlm import personal
from skinvlm.eval_result import EvalResult
from skinvlm.ingest import IngestResult
from skinvlm.numbers import auc_phrase, calibration_phrase, rate, score, seconds
from skinvlm.rules import Rules


class Table(rich_table.Table):
    """rich's table with cells that fold by default: rich's own default cuts a long value short with '…' on a
    narrow terminal, losing what tells rows apart (an endpoint's port, the end of a path)."""

    def add_column(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)


def ingest_report(out: Console, err: Console, result: IngestResult, rules: Rules) -> None:
    views = sorted(
        {v for split in result.counts.values() for per in split.values() for v in per},
        key=lambda v: (v not in rules.views, v),
    )
    table = Table(title=f"ingested -> {result.path}")
    table.add_column("split")
    table.add_column("class")
    for view in views:
        table.add_column(view, justify="right")
    table.add_column("total", justify="right")
    for split, per_class in result.counts.items():
        for label in sorted(per_class, key=lambda c: rules.class_names.index(c)):
            row = [per_class[label].get(v, 0) for v in views]
            table.add_row(split, label, *map(str, row), str(sum(row)))
        table.add_section()
    out.print(table)
    out.print(
        f"{sum(result.splits.values()):,} images stored in {result.seconds:.1f}s; "
        f"{len(result.skipped)} skipped, {result.ignored} non-image files ignored"
    )
    meta = result.metadata
    out.print(
        "file metadata kept as it is (--keep-metadata): EXIF, PNG text and JPEG APP segments go wherever the images go"
        if meta.get("kept")
        else f"file metadata removed from {meta.get('cleaned', 0):,} files (EXIF, PNG text, JPEG APP segments; "
        f"pixels unchanged); {meta.get('turned', 0):,} photos turned upright by their EXIF orientation",
        highlight=False,
    )
    out.print(escape(patients_line(result.patients)), highlight=False)
    if named := result.subgroups:
        out.print(
            f"subgroups ({', '.join(named['attributes'])}, by {named['keyed_by']}): {named['photos_with']:,} photos "
            f"named, {named['photos_without']:,} not; kept for eval, never published",
            highlight=False,
        )
    if result.leakage is not None:
        from skinvlm.leakage import warning

        said = warning(result.leakage)
        none = "leakage: no patient and no near-duplicate photo in both splits"
        out.print(f"[bold red]LEAKAGE:[/] {escape(said)}" if said else none, highlight=False)
    for item in result.skipped:
        err.print(f"  [yellow]skipped[/] {escape(item['path'])}: {escape(item['reason'])}", highlight=False)
    for kind, groups in (
        ("[yellow]duplicate[/]", result.duplicates),
        ("[bold red]LEAKAGE: the same image is in train and test[/]", result.cross_split_duplicates),
    ):
        for group in groups[:GROUPS_SHOWN]:
            err.print(f"  {kind} {escape(shown_group(group))}", highlight=False)
        if len(groups) > GROUPS_SHOWN:
            err.print(f"  {kind} and {len(groups) - GROUPS_SHOWN:,} more groups (the manifest lists them)",
                      highlight=False)  # fmt: skip


GROUPS_SHOWN = 10  # groups of copies printed by ingest; the manifest has every one


def shown_group(paths: list[str], most: int = 3) -> str:
    """A group of copies of one photo as one readable line: a few of its paths and how many more (the manifest
    lists them all)."""
    more = f" (and {len(paths) - most:,} more, listed in datasets/ingested/manifest.json)" if len(paths) > most else ""
    return " = ".join(paths[:most]) + more


PATIENTS_UNKNOWN = (
    "patients unknown: each photo counts as its own patient, so figures treat two photos of one person as "
    "independent; declare them with `ingest --patient-pattern REGEX` (or [patients] pattern in the rule file)"
)


def patients_line(patients: dict[str, Any]) -> str:
    from skinvlm.workspace import patients_text

    return patients_text(patients) if patients.get("known") else PATIENTS_UNKNOWN


def money(dollars: float | None) -> str:
    return "price unknown" if dollars is None else f"${dollars:,.4f}" if dollars < 1 else f"${dollars:,.2f}"


def progress_note(p: Any) -> str:
    from skinvlm.endpoints import note

    tokens = p.prompt_tokens + p.completion_tokens
    counts = f"failed {p.failed}  invalid {p.invalid}  tokens {tokens:,}  {money(p.dollars)}"
    return "  ".join(filter(None, [counts, note(p.endpoints)]))


def describe_dry_run(out: Console, preview: Any, settings: Any) -> None:
    if not preview.records:
        out.print(
            "nothing to ask: every record has its answer (--redo failed,invalid, mismatch, changed or all asks "
            "again); nothing was sent"
        )
        return
    out.print("[bold]example request[/] (image elided):")
    out.print_json(json.dumps(preview.example, ensure_ascii=False))
    table = Table(title=f"estimate for {preview.records:,} records with {settings.model} (detail={settings.detail})")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("prompt tokens (text + image)", f"{preview.prompt_tokens:,}")
    table.add_row("completion tokens", f"{preview.completion_tokens:,}")
    table.add_row("cost", money(preview.dollars))
    table.add_row("cost with --detail low", money(preview.dollars_low_detail))
    table.add_row("cost through the Batch API", money(preview.dollars_batch))
    out.print(table)
    out.print(f"prompt hash {preview.prompt_hash}; nothing was sent. Token counts are estimates.")


def describe_summary(out: Console, result: Any) -> None:
    table = Table(title=f"described -> {result.path}")
    table.add_column("status")
    table.add_column("records", justify="right")
    for status, n in sorted(result.statuses.items()):
        table.add_row(status, f"{n:,}")
    out.print(table)
    run = result.run
    out.print(
        f"this run: {run.done:,} records in {result.seconds:.1f}s with {result.model}, "
        f"{run.prompt_tokens:,} prompt + {run.completion_tokens:,} completion tokens, {money(run.dollars)}"
    )
    if result.note:
        out.print(result.note)
    endpoint_table(out, run.endpoints)
    if result.statuses.get("failed") or result.statuses.get("invalid"):
        out.print("ask again for those with: skinvlm describe --redo failed,invalid")


def endpoint_table(out: Console, summary: list[dict[str, Any]]) -> None:
    """Who carried the run, when it went to more than one endpoint (describe and eval)."""
    if len(summary) < 2:
        return
    table = Table(title="endpoints")
    for column in ("endpoint", "sent", "answered", "per second", "events"):
        table.add_column(column, justify="right" if column in ("sent", "answered", "per second") else "left")
    for e in summary:
        events = "; ".join(e["events"]) or "-"
        table.add_row(e["endpoint"], f"{e['sent']:,}", f"{e['answered']:,}", f"{e['per_second']:.2f}", events)
    out.print(table)


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="right" if i == 1 else "left")
    return table


def leakage_report(out: Console, found: dict[str, Any]) -> None:
    from skinvlm.leakage import shown_pairs

    if not found:
        return
    if not found["patients_known"]:
        out.print(escape(PATIENTS_UNKNOWN), highlight=False)
    near, shared = found["near_duplicates_across_splits"], found["patients_in_both_splits"]
    if not near and not shared:
        out.print(f"leakage: none (no photo within {found['max_distance']} bits of one in the other split"
                  + (", no patient in both splits)" if found["patients_known"] else ")"), highlight=False)  # fmt: skip
        return
    table = _table("leakage between train and test", "kind", "count", "examples")
    table.add_row("the same photo (near duplicates)", f"{near:,}", "\n".join(shown_pairs(found["pairs"][:5])))
    if found["patients_known"]:
        shown = [f"patient {p['patient']}: {p['photos']} photos" for p in found["patients"][:5]]
        table.add_row("patients in both splits", f"{shared:,}", "\n".join(shown))
    out.print(table)
    out.print("held-out figures are optimistic while these remain: `skinvlm ingest SRC --force --resplit 0.1` "
              "pools the photos and holds out a tenth of each class, each patient and each group of copies wholly "
              "on one side", highlight=False)  # fmt: skip


def audit_report(out: Console, report: Any, brief: bool = False) -> None:
    ex = report.examples
    if report.english_words:
        table = _table("English words", "word", "count", "example")
        for word, n in report.english_words.most_common(8 if brief else 30):
            table.add_row(word, str(n), (ex.get(f"en:{word}") or [""])[0])
        out.print(table)
    if report.foreign_scripts:
        table = _table("other scripts (records)", "script", "records", "example")
        for script, n in report.foreign_scripts.most_common():
            table.add_row(script, str(n), (ex.get(f"script:{script}") or [""])[0])
        out.print(table)
    if report.personal_records:
        table = _table("personal data (masked)", "kind", "count", "record: value")
        for kind, n in report.personal_kinds.most_common():
            shown = [f"{e['id']}: {e['value']}" for e in report.personal_examples if e["kind"] == kind]
            table.add_row(kind, str(n), ", ".join(shown))
        out.print(table)
    if not brief:
        table = _table("<label> tags", "raw tag", "count", "maps to")
        for tag, n in report.tag_labels.most_common(20):
            table.add_row(tag, str(n), report.tag_classes and _mapped(report, tag))
        out.print(table)
    if report.mismatch_pairs:
        table = _table("label mismatches (folder label vs tag after aliases)", "label -> tag", "count", "example")
        for (label, tag), n in report.mismatch_pairs.most_common(15):
            table.add_row(f"{label} -> {tag}", str(n), (ex.get(f"mismatch:{label}:{tag}") or [""])[0])
        out.print(table)
        per_class = ", ".join(f"{label} {n}" for label, n in report.disagreements.items())
        out.print(
            f"disagreements by folder class: {per_class}; `describe --redo mismatch` re-asks them, "
            "`fix --drop-mismatches` drops them, `train` leaves them out unless --keep-mismatches",
            highlight=False,
        )
    if report.reused and not brief:
        table = _table("summaries reused across images", "summary", "images")
        for text, n in report.reused[:5]:
            table.add_row(text[:80], str(n))
        out.print(table)
    summary = _table(f"audit of {report.stage}: {report.records:,} records", "check", "records")
    stats = report.length_stats()
    for name, value in (
        ("personal data", report.personal_records),
        ("English words", report.english_records),
        ("other scripts", report.script_records),
        ("not a class (tag)", sum(report.not_class_tags.values())),
        ("mismatches", report.mismatches),
        ("missing <label>/<summary>", report.invalid),
        ("empty output", report.empty),
        ("summary too short", report.too_short),
        ("describe status not ok", sum(n for s, n in report.statuses.items() if s != "ok")),
        ("summary length min/median/max", "/".join(str(stats.get(k, "-")) for k in ("min", "median", "max"))),
        ("records with problems (each once)", report.problems),
    ):
        summary.add_row(name, str(value))
    out.print(summary)
    out.print("a record with several problems is in several rows above and once in the last", style="dim")
    if report.review:
        outcomes = ", ".join(f"{status} {n:,}" for status, n in report.review.items())
        out.print(f"clinicians' review (skinvlm review, applied by fix): {outcomes}")


def _mapped(report: Any, tag: str) -> str:
    from skinvlm.rules import nfc

    return "(not a class)" if nfc(tag) in report.not_class_tags else "class"


def fix_report(out: Console, result: Any, ws: Any) -> None:
    table = _table("rule hits", "rule", "hits")
    for rule, n in result.hits.most_common(25):
        table.add_row(rule, str(n))
    out.print(table)
    for before, after in result.examples:  # personal data masked: fix prints what it redacts, not the data
        before, after = personal.mask_all(before)[:160], personal.mask_all(after)[:160]
        out.print(f"[dim]before[/] {before!r}\n[green]after [/] {after!r}", highlight=False)
    where = f"-> {ws.fixed}" if result.written else "(dry run: nothing written)"
    out.print(f"{result.changed:,} records changed, {result.dropped:,} dropped {where}")
    if result.review_lines_skipped:
        out.print(skipped_lines_note(result.review_lines_skipped))
    decided = {k: v for k, v in result.review.items() if k != "unreviewed"}
    if decided:
        outcomes = ", ".join(f"{status} {n:,}" for status, n in decided.items())
        out.print(f"clinicians' review applied: {outcomes}; {result.labels_corrected:,} labels corrected, "
                  f"{result.texts_replaced:,} texts replaced by their edits", highlight=False)  # fmt: skip
    audit_report(out, result.report, brief=True)


def skipped_lines_note(n: int) -> str:
    return f"journal/review.jsonl: {n:,} lines are not decisions (damaged or written by hand) and were skipped"


def plain(text: str) -> str:
    """Text from a journal or a page as the console shows it: Rich markup escaped, control characters (ESC, OSC,
    newlines, bidi overrides) made visible instead of obeyed."""
    shown = "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)
    return escape(shown)


def publish_report(out: Console, result: Any) -> None:
    table = _table(
        f"{'uploaded to' if result.uploaded else 'would upload to'} {result.repo} "
        f"({'private' if result.private else 'PUBLIC'})",
        "file",
        "bytes",
    )
    for path, size in result.files:
        table.add_row(path, f"{size:,}")
    out.print(table)
    out.print(result.url if result.uploaded else f"dry run: files are in {result.folder}; nothing was uploaded")


def answer_review_report(out: Console, found: dict[str, Any]) -> None:
    from skinvlm.answer_review import score_text

    criteria = found["criteria"]
    table = _table("model answers scored blind by clinicians (1-5)", "eval run", "scored", *criteria)
    for run, figures in found["runs"].items():
        cells = [score_text(figures.get(c)) for c in criteria]
        table.add_row(plain(run), f"{figures['scored']:,} of {figures['answers']:,}", *cells)
    out.print(table)
    for run, figures in found["runs"].items():
        who = ", ".join(plain(r) for r in figures["reviewers"]) or "nobody yet"
        out.print(f"{plain(run)}: scored by {who}", highlight=False)
    if found.get("skipped_lines"):
        out.print(f"journal/answer-review.jsonl: {found['skipped_lines']:,} lines are not scores and were skipped")


def review_report(out: Console, found: dict[str, Any]) -> None:
    if not found["reviewers"]:
        out.print(f"review: {found['records']:,} records, no decision yet (`skinvlm review` opens the page)")
        if found.get("skipped_lines"):
            out.print(skipped_lines_note(found["skipped_lines"]))
        return
    table = _table(f"review: {found['records']:,} records", "reviewer", "accepted", "edited", "rejected", "per hour")
    for name, counts in found["reviewers"].items():
        per_hour = "-" if counts["per_hour"] is None else f"{counts['per_hour']:,.0f}"
        table.add_row(plain(name), *(f"{counts[k]:,}" for k in ("accepted", "edited", "rejected")), per_hour)
    out.print(table)
    out.print("final status: " + ", ".join(f"{status} {n:,}" for status, n in found["decisions"].items()))
    if found.get("skipped_lines"):
        out.print(skipped_lines_note(found["skipped_lines"]))
    for rejection in found.get("rejections", [])[:20]:
        reason = plain(rejection["reason"]) if rejection["reason"] else "(no reason given)"
        out.print(f"  rejected {rejection['id']} by {plain(rejection['reviewer'])}: {reason}", highlight=False)
    agreement = found["agreement"]
    left_out = agreement.get("unblinded_left_out", 0)
    if left_out:
        out.print(f"agreement leaves out {left_out:,} records whose second reviewer saw the first outcome (an older "
                  "journal): only blind reads are independent opinions", highlight=False)  # fmt: skip
    if not agreement["items"]:
        out.print("agreement: no record was read blind by two reviewers (--overlap F offers a share F a second time)")
        return
    for what in ("keep_or_reject", "label"):
        figure = agreement[what]
        kappa = "-" if figure["kappa"] is None else f"{figure['kappa']:.3f}"
        interval = f" (95% CI {figure['interval'][0]:.3f}-{figure['interval'][1]:.3f})" if figure["interval"] else ""
        out.print(f"agreement on {what.replace('_', ' ')}: {agreement['method']} kappa {kappa}{interval}, "
                  f"{agreement['items']:,} records read blind twice")  # fmt: skip
    for item in agreement["disagreements"][:10]:
        said = "; ".join(f"{plain(name)}: {d['decision']} {plain(d['label'])}" for name, d in item["reviewers"].items())
        out.print(f"  disagree on {item['id']}: {said}", highlight=False)


def eval_report(out: Console, result: EvalResult, rules: Any) -> None:
    from skinvlm.evaluate import external_line, interval_method, sample_size_line

    ci = result["intervals"]
    table = _table(
        f"eval {result['name']}: {result['n']} images, {result['backend']}",
        "class",
        "precision",
        "recall",
        "F1",
        "95% CI",
        "AUC",
        "support",
    )
    table.columns[4].no_wrap = True
    auc = (result.get("probabilities") or {}).get("auc", {})
    for c, m in result["per_class"].items():
        table.add_row(
            f"{c} ({rules.english(c)})",
            f"{m['precision']:.3f}",
            f"{m['recall']:.3f}",
            f"{m['f1']:.3f}",
            f"{ci['f1'][c][0]:.3f}-{ci['f1'][c][1]:.3f}",
            f"{auc[c]:.3f}" if c in auc else "",
            str(m["support"]),
        )
    out.print(table)
    views = ", ".join(f"{v} {a:.3f}" for v, a in result["per_view"].items())
    out.print(
        f"accuracy {result['accuracy']:.4f} {span(ci['accuracy'])}  macro F1 {result['macro_f1']:.4f} "
        f"{span(ci['macro_f1'])}  (95% CI: {interval_method(result)})\n"
        f"weighted F1 {result['weighted_f1']:.4f}  unparsed {result['unparsed']}  per view: {views}\n"
        f"latency p50 {seconds(result['latency_p50'])}, p95 {seconds(result['latency_p95'])}; "
        f"{rate(result['throughput'])}",
        highlight=False,
    )
    if probabilities := result.get("probabilities"):
        out.print(
            f"class probabilities ({probabilities['n']} images): {auc_phrase(probabilities)}, "
            f"top-2 accuracy {score(probabilities['top2_accuracy'])}, {calibration_phrase(probabilities)}",
            highlight=False,
        )
    from skinvlm.evaluate import selective_lines

    for line in selective_lines(result)[1:]:  # the referral threshold, as report.md says it
        out.print(line, highlight=False)
    if sample := sample_size_line(result):
        out.print(escape(sample), highlight=False)
    if result.get("external"):
        out.print(escape(f"external photos: {external_line(result['external'])}"), highlight=False)
    for note in result.get("notes", []):
        out.print(f"[yellow]note[/]: {escape(note)}")
    from skinvlm.report_html import matrix_axes

    rows, columns, counts = matrix_axes(result)
    matrix = _table("confusion matrix (rows: true, columns: predicted)", "true", *columns)
    for label, row in zip(rows, counts, strict=True):
        matrix.add_row(label, *map(str, row))
    out.print(matrix)
    made = [
        p.name
        for p in sorted(Path(result["output_dir"]).iterdir())
        if p.suffix in (".json", ".jsonl", ".md", ".png", ".html")
    ]
    out.print(f"written to {result['output_dir']}/ ({', '.join(made)})", highlight=False)


def span(bounds: list[float]) -> str:
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def compare_runs(out: Console, compared: dict[str, Any], rules: Any) -> None:
    runs = compared["runs"]
    table = Table(title="eval runs side by side (95% CI)")
    table.add_column("metric")
    for run in runs:
        table.add_column(run["name"], justify="right")
    for pair in compared["paired"]:
        table.add_column(f"{pair['second']} - {pair['first']}", justify="right")
    differences = [pair["difference"] for pair in compared["paired"]]

    def interval_of(run: dict[str, Any], metric: str) -> str:
        return span(run["intervals"][metric]) if "intervals" in run else ""

    table.add_row("images", *(str(r["n"]) for r in runs), *(str(pair["n"]) for pair in compared["paired"]))
    for metric, title in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        table.add_row(
            title,
            *(f"{r[metric]:.4f} {interval_of(r, metric)}" for r in runs),
            *(f"{d[metric]['value']:+.4f} {span(d[metric]['interval'])}" for d in differences),
        )
    table.add_row("unparsed", *(str(r["unparsed"]) for r in runs), *("" for _ in differences))
    for c in rules.class_names:
        table.add_row(
            f"F1 {c}", *(f"{r['per_class'].get(c, {}).get('f1', 0):.3f}" for r in runs), *("" for _ in differences)
        )
    out.print(table)
    for pair in compared["paired"]:
        out.print(pair["said"], highlight=False)


def demo_step(out: Console, err: Console, kind: str, result: Any, rules: Any) -> None:
    if kind == "ingest":
        ingest_report(out, err, result, rules)
    elif kind == "audit":
        out.print(
            f"audit of the raw answers: {result.problems} records with problems; English words "
            f"{dict(result.english_words.most_common(5))}; tags {dict(result.tag_labels.most_common())}"
        )
    elif kind == "fix":
        out.print(
            f"fix: {result.changed} records changed by {sum(result.hits.values())} rule hits; "
            f"problems left: {result.report.problems}"
        )
        if result.examples:
            before, after = result.examples[0]
            out.print(f"  [dim]before[/] {before!r}\n  [green]after [/] {after!r}", highlight=False)
    elif kind == "train":
        out.print(
            f"trained {result.steps} steps in {result.seconds:.0f}s, final loss {result.final_loss:.3f}, "
            f"peak RSS {result.peak_rss_mb:.0f} MiB -> {result.output}"
        )
    elif kind == "batch":
        train_summary(out, result)
    elif kind == "merge":
        out.print(
            f"merged -> {result.output}; verified: logit RMS error {result.merge_error:.3g} against an adapter "
            f"effect of {result.adapter_effect:.3g}; "
            f"{result.changed_weights}/{result.lora_targets} LoRA weights changed"
        )


def demo_closing(out: Console, result: Any, rules: Any) -> None:
    from rich.panel import Panel

    eval_report(out, result.metrics, rules)
    ws = result.workspace
    folders = "\n".join(
        f"  {sub:<19} {what}"
        for sub, what in (
            ("datasets/ingested", "images + labels, all decoded"),
            ("datasets/described", "template answers with English, variants"),
            ("datasets/fixed", "answers after the rule file"),
            ("models/adapter", "LoRA adapter, train_log.jsonl, loss.png"),
            ("models/merged", "16-bit model for transformers and vLLM"),
            ("eval/demo", "metrics, predictions, report.md, report.html (open it in a browser), the pictures"),
        )
    )
    real = (
        "skinvlm ingest ./extracted_data\nskinvlm describe --dry-run && skinvlm describe\n"
        "skinvlm audit && skinvlm fix && skinvlm audit --stage fixed --strict\n"
        "skinvlm train --gpu 0 && skinvlm merge\nskinvlm serve --gpu 0 &  skinvlm eval --confusion-matrix"
    )
    out.print(
        Panel(
            f"accuracy {result.metrics['accuracy']:.3f}, macro F1 {result.metrics['macro_f1']:.3f} in "
            f"{result.seconds:.0f}s; audit problems {result.audit_before} -> {result.audit_after}\n\n"
            f"What the demo made in {ws}:\n{folders}\n\nOn real data (a GPU for train/serve):\n{real}",
            title="skinvlm demo done",
            expand=False,
        ),
        soft_wrap=False,  # the console's soft wrap would crop a panel's long lines (a deep workspace path)
    )


def stage_json(s: Any) -> dict[str, Any]:
    return {
        "name": s.name,
        "present": s.present,
        "rows": s.rows,
        "finished": s.finished,
        "inputs": s.inputs,
        "stale": bool(s.rerun),
        "rerun": s.rerun,
        "figures": s.figures,
    }


WIDE_STATUS = 140  # below this many columns the table's seven columns break words: one block per stage instead


def status_table(out: Console, ws: Any, stages: list[Any]) -> None:
    if out.width < WIDE_STATUS:
        status_blocks(out, ws, stages)
        return
    table = Table(title=f"workspace {ws.root}")
    for column in ("stage", "present", "rows", "figures", "finished", "from", "current"):
        table.add_column(column, no_wrap=column in ("stage", "present", "finished"))  # names and dates read whole
    for s in stages:
        rows = ", ".join(f"{k} {v:,}" for k, v in s.rows.items())
        when = s.finished[:16].replace("T", " ")
        current = f"[yellow]stale[/]: run {' then '.join(s.rerun)}" if s.rerun else ("yes" if s.present else "")
        present = "[green]yes[/]" if s.present else "[dim]no[/]"
        table.add_row(s.name, present, rows, escape(s.figures), when, escape(s.inputs), current)
    out.print(table)


def status_blocks(out: Console, ws: Any, stages: list[Any]) -> None:
    """`status` for a narrow terminal: a stage's name, state and date on one line, then its facts indented."""
    out.print(f"workspace {escape(str(ws.root))}", highlight=False)
    for s in stages:
        if not s.present:
            out.print(f"[bold]{s.name}[/]  [dim]not made yet[/]", highlight=False)
            continue
        state = f"[yellow]stale[/]: run {escape(' then '.join(s.rerun))}" if s.rerun else "[green]current[/]"
        out.print(f"[bold]{s.name}[/]  {state}  {s.finished[:16].replace('T', ' ')}", highlight=False)
        facts = [("rows", ", ".join(f"{k} {v:,}" for k, v in s.rows.items())), ("figures", s.figures),
                 ("from", s.inputs)]  # fmt: skip
        for name, value in facts:
            if value:
                out.print(f"  {name}: {escape(value)}", highlight=False, soft_wrap=True)  # the terminal folds a path


def merge_result(out: Console, result: Any) -> None:
    out.print(
        f"merged {result.backend} adapter into {result.base} ({result.dtype}) -> {result.output}\n"
        f"verified against base + adapter: logit RMS error {result.merge_error:.3g} (the adapter moves them "
        f"{result.adapter_effect:.3g}), max |difference| {result.max_logit_diff:.3g}, {result.agreement:.1%} same "
        f"next token; {result.changed_weights}/{result.lora_targets} LoRA-targeted weights changed",
        highlight=False,
    )


class Counting:
    """Progress of a step that counts its units (images, requests): a bar on a terminal; in logs a line at each
    tenth of the way at most every LOG_EVERY_S seconds, and the last, so a piped run shows it is alive without
    flooding the log; nothing with --quiet."""

    LOG_EVERY_S = 5.0

    def __init__(self, console: Console, title: str, quiet: bool = False) -> None:
        self.console, self.title, self.quiet = console, title, quiet
        self.bar: Progress | None = None
        self.task: Any = None
        self.tenths_shown = 0
        self.logged_at = time.monotonic()

    def __enter__(self) -> Counting:
        if not self.quiet and self.console.is_terminal:
            self.bar = Progress(
                TextColumn(self.title),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.title, total=None, note="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, done: int, total: int, note: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total, note=note)
            return
        tenths, now = done * 10 // max(total, 1), time.monotonic()
        due = tenths > self.tenths_shown and now - self.logged_at >= self.LOG_EVERY_S
        if not self.quiet and total and (due or done == total):
            self.tenths_shown, self.logged_at = tenths, now
            self.console.print(f"{self.title}: {done:,}/{total:,}  {note}".rstrip(), markup=False, highlight=False)


class Phases:
    """The phase a step without countable units is in (merge, fix, publish): a spinner on a terminal, a plain
    line per phase in logs, nothing with --quiet."""

    def __init__(self, console: Console, title: str, quiet: bool = False) -> None:
        self.console, self.title, self.quiet = console, title, quiet
        self.spinner: Any = None

    def __enter__(self) -> Phases:
        if not self.quiet and self.console.is_terminal:
            self.spinner = self.console.status(self.title)
            self.spinner.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.spinner:
            self.spinner.stop()

    def __call__(self, phase: str) -> None:
        if self.spinner:
            self.spinner.update(f"{self.title}: {escape(phase)}")
        elif not self.quiet:
            self.console.print(f"{self.title}: {phase}", markup=False, highlight=False)

    def ask(self, question: str, confirm: Callable[[str], bool]) -> bool:
        """A question must not be drawn over by the spinner."""
        if self.spinner:
            self.spinner.stop()
        try:
            return confirm(question)
        finally:
            if self.spinner:
                self.spinner.start()


class TrainProgress:
    """Live training figures (rank 0): redrawn in place on a terminal; a plain line every `every` steps when
    the output is a file or a pipe, so logs of nohup or CI stay readable."""

    def __init__(self, console: Console, quiet: bool = False, every: int = 10) -> None:
        self.console, self.quiet, self.every = console, quiet, every
        self.bar: Progress | None = None
        self.task: Any = None
        self.started = 0.0
        self.eval_loss: float | None = None
        self.eval_f1: float | None = None  # held-out macro F1 by class scores, at each evaluation (--select-by)

    def start(self, summary: Any, plan: Any) -> None:
        train_summary(self.console, summary)
        for name, (then, now) in plan.changed.items():
            self.console.print(
                f"[yellow]resuming with a changed setting[/]: {name} {then!r} -> {now!r}", highlight=False
            )
        self.begin()

    def begin(self) -> None:
        """The clock and the bar (or, in a log, the sparse lines), without the summary a caller shows itself."""
        self.started = time.perf_counter()
        if self.quiet or not self.console.is_terminal:
            return
        self.bar = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=None, figures="")

    def step(self, event: dict[str, Any]) -> None:
        if event.get("eval_loss") is not None:
            self.eval_loss = event["eval_loss"]
        if event.get("eval_macro_f1") is not None:
            self.eval_f1 = event["eval_macro_f1"]
        if "loss" not in event or self.quiet:
            return
        step, total = event["step"], event.get("max_steps") or 0
        per_step = (time.perf_counter() - self.started) / max(step, 1)
        figures = training_figures(event, self.eval_loss, per_step, self.eval_f1)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, total=total, figures=figures)
        elif step % self.every == 0 or step == total or step == 1:
            eta = f"  ETA {per_step * (total - step):,.0f}s" if total else ""
            self.console.print(f"step {step}/{total}  {figures}{eta}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def training_figures(
    event: dict[str, Any], eval_loss: float | None, per_step: float, eval_f1: float | None = None
) -> str:
    parts = [reward_figures(event) if "reward" in event else f"loss {event['loss']:.4f}"]
    if eval_loss is not None:
        parts.append(f"eval {eval_loss:.4f}")
    if eval_f1 is not None:
        parts.append(f"held-out F1 {eval_f1:.3f}")
    if "learning_rate" in event:
        parts.append(f"lr {event['learning_rate']:.2e}")
    if event.get("grad_norm") is not None:
        parts.append(f"grad {event['grad_norm']:.3g}")
    parts.append(f"{per_step:.2f} s/step")
    if gpu := gpu_memory():
        parts.append(gpu)
    return "  ".join(parts)


def reward_figures(event: dict[str, Any]) -> str:
    """GRPO's step: the mean reward of the sampled answers, the share that named the right class, and the KL."""
    text = f"reward {event['reward']:.3f}"
    if "rewards/label/mean" in event:
        text += f" (right class {event['rewards/label/mean']:.0%}"
        if "rewards/format/mean" in event:
            text += f", format {event['rewards/format/mean']:.2f}"
        text += ")"
    if "kl" in event:
        text += f"  KL {event['kl']:.4f}"
    return text


def gpu_memory() -> str:
    import sys

    torch = sys.modules.get("torch")  # only when training loaded it; never imported here for a figure
    if torch is None or not torch.cuda.is_available():
        return ""
    return f"GPU {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


def train_summary(console: Console, summary: Any, settings: dict[str, Any] | None = None) -> None:
    """What training sees: one collated batch and the whole training set, with the supervised span in green."""
    from rich.text import Text

    expected = summary.expected_image_tokens_per_row
    table = Table(title=f"training batch ({summary.backend} collator)", show_header=False)
    table.add_column("")
    table.add_column("value")
    left_out = (
        f"{summary.skipped} unusable, {summary.mismatched} with another class's <label> and "
        f"{summary.review_left_out} by the clinicians' review left out"
    )
    table.add_row("rows", f"{summary.rows:,} ({left_out})")
    if summary.dev_rows:
        table.add_row("development rows", f"{summary.dev_rows:,} held out of training: the best step is chosen there")
    table.add_row("pixel_values in the batch", "yes" if summary.pixel_values else "[bold red]NO[/]")
    implied = f"(--max-pixels {summary.max_pixels:,} implies {expected})"
    table.add_row("image tokens per row", f"{summary.image_tokens_per_row} {implied}")
    table.add_row("supervised tokens per row", str(summary.supervised_tokens_per_row))
    lengths = f"max {summary.sequence_length_max:,}, p95 {summary.sequence_length_p95:,}"
    table.add_row("sequence length", f"{lengths} (--max-length {summary.max_length:,})")
    cut = f"[bold yellow]{summary.truncated_rows:,}[/]" if summary.truncated_rows else "0"
    table.add_row("rows --max-length cuts", cut)
    table.add_row("processes", str(summary.world_size))
    table.add_row("effective batch size", f"{summary.effective_batch_size} (per device x grad accum x processes)")
    console.print(table)
    example = Text("first row (supervised in green): ", style="bold")
    for text, supervised in summary.segments:
        example.append(text, style="bold green" if supervised else "dim")
    console.print(example)
    if summary.sampled:
        sampled_rewards(console, summary.sampled)
    if settings is not None:
        effective = Table(title="effective settings (flags > --config > defaults)", show_header=False)
        effective.add_column("")
        effective.add_column("value")
        for name, value in settings.items():
            effective.add_row(name, escape(repr(getattr(value, "value", value))))  # an enum as the flag takes it
        console.print(effective)


def sampled_rewards(console: Console, sampled: list[dict[str, Any]]) -> None:
    """GRPO's dry run: answers sampled from the starting adapter and what each reward gave them."""
    names = [k for k in sampled[0] if k not in ("id", "class", "answer")]
    table = Table(title="sampled answers and their rewards (what GRPO starts from)")
    for column in ("class", "answer", *names):
        table.add_column(column)
    for row in sampled:
        answer = escape(" ".join(row["answer"].split())[:160])
        table.add_row(row["class"], answer, *(f"{row[name]:.2f}" for name in names))
    console.print(table)
    mean = sum(row["total"] for row in sampled) / len(sampled)
    varied = len({row["total"] for row in sampled}) > 1
    note = "" if varied else ": every answer scored alike, so GRPO has nothing to learn from (try --temperature)"
    console.print(f"mean reward {mean:.3f} over {len(sampled)} sampled answers{note}", highlight=False)


def train_result(out: Console, result: Any) -> None:
    vram = (
        f", peak VRAM {result.peak_vram_mb:,.0f} MiB ({result.peak_vram_reserved_mb:,.0f} MiB reserved)"
        if result.peak_vram_mb is not None
        else ""
    )
    if result.vision_forward_calls is not None:
        vram += f"; the vision tower ran {result.vision_forward_calls:,} times"
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "none logged"
    if result.rewards:  # GRPO: the rewards say how it went, its loss does not
        first, last = result.rewards[0], result.rewards[-1]
        loss = f"mean reward {first['mean']:.3f} at step {first['step']} -> {last['mean']:.3f} at step {last['step']}"
        loss += f" (GRPO from {result.from_adapter})"
    else:
        loss = f"final loss {loss}"
    out.print(
        f"{result.steps} steps on {result.rows:,} rows ({result.skipped} unusable and {result.mismatched} "
        f"mismatched rows left out) with "
        f"{result.backend} x {result.world_size} process(es), effective batch {result.effective_batch_size}, in "
        f"{result.seconds:.0f}s; {loss}; peak RSS {result.peak_rss_mb:,.0f} MiB{vram} -> {result.output}",
        highlight=False,
    )
    if result.kept:
        out.print(escape(kept_line(result.kept)), highlight=False)


def kept_line(kept: dict[str, Any]) -> str:
    """What selection kept against the first evaluation (for GRPO the start), as a user checks it."""
    first, chosen = kept["first"], kept["kept"]
    where = "the start" if chosen["step"] == 0 else f"step {chosen['step']}"
    figures = f"held-out macro F1 {first['macro_f1']} -> {chosen['macro_f1']}"
    if first.get("unparsed") is not None:
        figures += f", unparsed {first['unparsed']} -> {chosen['unparsed']}"
    stopped = f"; stopped early at {kept['collapsed']}" if kept.get("collapsed") else ""
    return f"kept {where}: {figures} (first evaluation at step {first['step']}){stopped}"


def training_interrupted(checkpoint: str | None, saved_now: bool, resume: str) -> str:
    """The one line after Ctrl-C or SIGTERM in training: what was kept, and how to go on."""
    if checkpoint is None:
        return "[yellow]interrupted[/] before the first checkpoint: nothing to resume; run the command again"
    step = checkpoint.rsplit("-", 1)[-1]
    kept = "a checkpoint was saved" if saved_now else "the newest checkpoint (steps after it are redone)"
    return f"[yellow]interrupted[/]: {kept} at step {step}; continue with\n  {escape(resume)}"


def doctor_report(out: Console, report: Any) -> None:
    table = Table(title="skinvlm doctor")
    for column in ("check", "", "detail"):
        table.add_column(column)
    marks = {True: "[green]✓[/]", False: "[bold red]✗[/]", None: "[dim]·[/]"}
    for check in report.checks:
        mark = marks[check.ok] if check.ok is not False or check.needed else "[yellow]✗[/]"
        table.add_row(check.name, mark, escape(check.detail))
    out.print(table)
    out.print("[green]ready[/]" if report.ok else "[bold red]something needed is missing[/] (red ✗ above)")
