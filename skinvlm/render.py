"""Rich renderings of stage results, kept out of cli.py so commands stay short."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from skinvlm.ingest import IngestResult
from skinvlm.rules import Rules


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
    for item in result.skipped:
        err.print(f"  [yellow]skipped[/] {item['path']}: {item['reason']}", highlight=False)
    for group in result.duplicates:
        err.print(f"  [yellow]duplicate[/] {' = '.join(group)}", highlight=False)
    for group in result.cross_split_duplicates:
        err.print(f"  [bold red]LEAKAGE: the same image is in train and test[/] {' = '.join(group)}", highlight=False)


def money(dollars: float | None) -> str:
    return "price unknown" if dollars is None else f"${dollars:,.4f}" if dollars < 1 else f"${dollars:,.2f}"


def progress_note(p: Any) -> str:
    return (
        f"failed {p.failed}  invalid {p.invalid}  tokens {p.prompt_tokens + p.completion_tokens:,}  {money(p.dollars)}"
    )


def describe_dry_run(out: Console, preview: Any, settings: Any) -> None:
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
    if result.statuses.get("failed") or result.statuses.get("invalid"):
        out.print("ask again for those with: skinvlm describe --redo failed,invalid")
