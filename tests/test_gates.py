"""One gate, and a leak shown wherever figures are read (issue 38): `publish` refuses exactly what
`audit --strict` refuses, leakage included, on every planted finding; the leakage audit runs before any text is
paid for; ingest, eval's console, report.html, metrics.json and the ui's overview say when the split leaks."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import error_line
from test_leakage import PATTERN, leaky_tree
from test_review import plant_text

from skinvlm.testing.openai_server import FakeOpenAI

PLANTED = {  # one finding each, as a describer's answer would carry it
    "english": "<label>{label}</label><summary>붉은 plaque 위에 인설이 보입니다.</summary>",
    "personal": "<label>{label}</label><summary>환자 홍길동(010-2345-6789)의 볼에 홍반이 보입니다.</summary>",
    "mismatch": "<label>{other}</label><summary>경계가 뚜렷한 홍반이 보입니다.</summary>",
    "invalid": "경계가 뚜렷한 홍반이 보입니다.",
}


def gate(cli) -> tuple[int, int]:
    """(audit --strict's exit code, publish --dry-run's) on the fixed stage."""
    audit = cli("audit", "--stage", "fixed", "--strict", ok=False).exit_code
    publish = cli("publish", "me/x", "--dry-run", ok=False).exit_code
    return audit, publish


def test_publish_refuses_exactly_what_audit_strict_refuses(cli, ingested: Path) -> None:
    from datasets import load_from_disk

    cli("describe", "--template")
    cli("fix")
    assert gate(cli) == (0, 0), "a clean set passes both"
    fixed = load_from_disk(str(ingested / "datasets" / "fixed"))["train"]
    ingested_rows = load_from_disk(str(ingested / "datasets" / "ingested"))["train"]
    record = fixed[0]["id"]
    label = dict(zip(ingested_rows["id"], ingested_rows["label"], strict=True))[record]
    other = "지루" if label != "지루" else "주사"
    original = fixed[0]["output"]
    for kind, text in PLANTED.items():
        plant_text(cli, ingested, record, text.format(label=label, other=other))
        assert gate(cli) == (1, 1), f"{kind}: both refuse"
        refused = cli("publish", "me/x", "--dry-run", ok=False)
        assert "audit --stage fixed --strict` fails: 1 records with problems" in error_line(refused.stderr), kind
    plant_text(cli, ingested, record, original)
    assert gate(cli) == (0, 0), "and both pass again"


def test_a_leaky_split_is_refused_by_both_and_shown_wherever_figures_are_read(cli, tmp_path: Path) -> None:
    leaky_tree(tmp_path / "src")
    ingest = cli("ingest", tmp_path / "src", "--patient-pattern", PATTERN)
    assert "LEAKAGE: 2 patients and 3 near-duplicate photos are in both splits" in ingest.stdout
    before = cli("audit", "--strict", ok=False)  # no text yet: the leakage alone, before anything is paid for
    assert before.exit_code == 1 and "leakage between splits only" in before.stdout
    assert "--resplit 0.1" in before.stdout and ".png ~ " in before.stdout, "the pairs by their local paths"
    cli("describe", "--template")
    cli("fix")
    assert gate(cli) == (1, 1)
    refused = cli("publish", "me/x", "--dry-run", ok=False)
    line = error_line(refused.stderr)
    assert "2 patients with photos in both splits; 3 near-duplicate photos across the splits" in line
    cli("publish", "me/x", "--dry-run", "--ignore-audit")
    card = (cli.workspace / "publish" / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "Published with `--ignore-audit` although `skinvlm audit --strict` fails" in card
    assert "no record has a problem" not in card
    with FakeOpenAI() as server:
        shown = cli("eval", "--base-url", server.url, "--api-key", "sk-x", "--no-probabilities", "--name", "leaky")
    assert "held-out figures are optimistic" in shown.stdout
    metrics = json.loads((cli.workspace / "eval" / "leaky" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["leakage"]["patients_in_both_splits"] == 2
    page = (cli.workspace / "eval" / "leaky" / "report.html").read_text(encoding="utf-8")
    assert '<p class="note" id="leakage">2 patients and 3 near-duplicate photos' in page
    again = cli.json("ingest", tmp_path / "src", "--patient-pattern", PATTERN, "--resplit", "0.25", "--force")
    assert again["leakage"]["patients_in_both_splits"] == 0 and again["leakage"]["near_duplicates_across_splits"] == 0


def test_the_ui_overview_says_the_split_leaks(cli, tmp_path: Path) -> None:
    from test_ui import Browser, serving

    leaky_tree(tmp_path / "src")
    cli("ingest", tmp_path / "src", "--patient-pattern", PATTERN)
    with serving(cli.workspace) as url:
        overview = Browser(url).get("/api/overview")
    assert isinstance(overview, dict) and "held-out figures are optimistic" in overview["leakage"]
