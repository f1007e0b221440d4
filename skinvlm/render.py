"""Rich renderings of stage results, kept out of cli.py so commands stay short."""

from __future__ import annotations

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
