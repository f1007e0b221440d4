"""The demo end to end (small), and every command's --help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skinvlm.cli import app

COMMANDS = [
    "ingest", "status", "describe", "audit", "fix", "publish", "review", "train", "merge", "serve", "eval", "doctor",
    "demo", "ui",
]  # fmt: skip


def test_top_level_help_lists_exactly_the_working_commands(cli) -> None:
    text = cli.runner.invoke(app, ["--help"]).stdout
    for command in COMMANDS:
        assert f" {command} " in text
    assert len([c for c in app.registered_commands]) == len(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_renders(cli, command: str) -> None:
    result = cli.runner.invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "Usage" in result.stdout
    assert command == "demo" or "--workspace" in result.stdout, "the demo makes its own workspace"
    for jargon in ("list[", "x>=", "x<=", "<=x"):
        assert jargon not in result.stdout, f"{command} -h shows {jargon!r}"


def test_top_level_help_gives_each_command_its_whole_first_sentence(cli) -> None:
    text = cli.runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).stdout
    commands = text.split("Commands:")[1]
    assert "..." not in commands and all(len(line) <= 80 for line in commands.splitlines()), commands
    assert "per class and view, confusion matrix." in " ".join(commands.split()), "eval's summary whole, wrapped"


def test_a_missing_extra_is_named_for_the_installation_at_hand() -> None:
    from skinvlm.errors import editable_install, install_hint

    assert editable_install(), "the tests run on an editable install of this checkout"
    assert install_hint("review") == "pip install -e '.[review]'"
    assert install_hint("gpu", pinned=True) == "pip install -c constraints-gpu.txt -e '.[gpu]'"


@pytest.mark.slow
def test_demo_runs_every_stage(cli, tmp_path: Path) -> None:
    result = cli.runner.invoke(app, ["-w", str(tmp_path / "demo"), "demo", "--per-folder", "2", "--steps", "12"])
    assert result.exit_code == 0, result.stdout + result.stderr
    ws = tmp_path / "demo" / "workspace"  # -w names the demo's folder, as DIR would
    for made in (
        "datasets/ingested",
        "datasets/described",
        "datasets/fixed",
        "models/adapter/adapter_config.json",
        "models/merged/config.json",
        "eval/demo/metrics.json",
        "eval/demo/confusion_matrix.png",
    ):
        assert (ws / made).exists(), made
    assert "broken-truncated.png" in result.stderr and "skinvlm demo done" in result.stdout
    assert "the pictures" in result.stdout and "--confusion-matrix" in result.stdout, "the panel's lines wrap, not cut"
    assert "audit problems" in result.stdout and "-> 0" in result.stdout
    assert "step 1/12  loss" in result.stderr and "step 12/12  loss" in result.stderr, "training progress in a log"
    listed = json.loads(cli.runner.invoke(app, ["-w", str(ws), "status", "--json"]).stdout)
    figures = {stage["name"]: stage["figures"] for stage in listed["stages"]}
    assert figures["adapter"].startswith("12 steps, final loss ") and figures["merged"].startswith("merge error ")
    assert figures["eval/demo"].startswith("accuracy ") and figures["eval/demo"].endswith(", 24 photos")


def test_the_readme_is_short_and_every_page_it_links_exists() -> None:
    import re

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 300, "what a user needs first; the detail lives in docs/"
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([\w./-]+\.(?:md|jpg|png))\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
