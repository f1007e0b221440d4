"""CLI conventions: --version, -h, -w before the command, choices at parse time, --config, one line per error."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import error_line

from skinvlm import __version__
from skinvlm.cli import app
from skinvlm.describe import DescribeSettings
from skinvlm.evaluate import EvalSettings
from skinvlm.rules import default_rules_path
from skinvlm.serve import ServeSettings
from skinvlm.train import TrainSettings


@pytest.fixture
def fixed(cli, ingested: Path) -> Path:
    cli("describe", "--template")
    cli("fix")
    return ingested


def test_version_and_short_help(cli) -> None:
    version = cli.runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"skinvlm {__version__}"
    for args in (["-h"], ["train", "-h"]):
        shown = cli.runner.invoke(app, args)
        assert shown.exit_code == 0 and "Usage" in shown.stdout and "<bool>" not in shown.stdout


def test_the_workspace_may_come_before_the_command(cli, ingested: Path) -> None:
    status = cli.runner.invoke(app, ["-w", str(ingested), "status", "--json"])
    assert status.exit_code == 0, status.stderr
    stages = {s["name"]: s for s in json.loads(status.stdout)["stages"]}
    assert json.loads(status.stdout)["workspace"] == str(ingested) and stages["ingested"]["present"]


def test_choices_are_checked_when_the_command_line_is_read(cli) -> None:
    bogus = cli("train", "--backend", "bogus", ok=False)
    assert bogus.exit_code == 2 and all(f"'{choice}'" in bogus.stderr for choice in ("auto", "unsloth", "hf"))
    assert "auto|unsloth|hf" in cli.runner.invoke(app, ["train", "-h"], env={"COLUMNS": "200"}).stdout


def test_errors_keep_their_square_brackets(cli, ingested: Path) -> None:
    rules = ingested / "postprocess.toml"
    shipped = default_rules_path().read_text(encoding="utf-8")
    rules.write_text(shipped.replace("[labels.aliases]\n", '[labels.aliases]\n"Acne" = "nothing"\n'), encoding="utf-8")
    refused = cli("audit", ok=False)
    assert refused.exit_code == 1 and "[labels.aliases] 'Acne' maps to 'nothing'" in error_line(refused.stderr)


def test_every_settings_field_is_a_flag_of_its_command() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for command, settings in (
        ("train", TrainSettings),
        ("describe", DescribeSettings),
        ("eval", EvalSettings),
        ("serve", ServeSettings),
    ):
        params = {p.name for p in commands[command].params}
        assert {f.name for f in dataclasses.fields(settings)} <= params, command


def test_a_config_file_gives_what_the_flags_leave_at_their_defaults(cli, fixed: Path, tiny: Path) -> None:
    config = fixed / "run.toml"
    config.write_text("[train]\nmax_steps = 7\nlearning_rate = 1e-3\nlora_r = 8\n", encoding="utf-8")
    settings = cli.json("train", "--config", config, "--model", tiny, "--dry-run")["settings"]
    assert (settings["max_steps"], settings["learning_rate"], settings["lora_r"]) == (7, 1e-3, 8)
    assert settings["model"] == str(tiny), "a relative or absolute --model is stored absolute"
    flags_win = cli.json("train", "--config", config, "--model", tiny, "--dry-run", "--max-steps", "3")
    assert flags_win["settings"]["max_steps"] == 3
    config.write_text("[train]\nmax_stepz = 7\n", encoding="utf-8")
    unknown = cli("train", "--config", config, "--model", tiny, "--dry-run", ok=False)
    assert unknown.exit_code == 1 and "has no key 'max_stepz'" in error_line(unknown.stderr)
    config.write_text('[train]\nbackend = "bogus"\n', encoding="utf-8")
    wrong = cli("train", "--config", config, "--model", tiny, "--dry-run", ok=False)
    assert wrong.exit_code == 1 and "--backend must be auto, unsloth or hf" in error_line(wrong.stderr)


# Known bad inputs of every command: each is one line on stderr and exit 1, never a traceback.
BAD_INPUTS = [
    ("ingest", "{tmp}/nowhere"),
    ("ingest", "{tmp}/a-file"),
    ("describe", "--template"),
    ("describe", "--rules", "{tmp}/a-file"),
    ("audit",),
    ("fix",),
    ("publish", "no-slash", "--dry-run"),
    ("train",),
    ("train", "--config", "{tmp}/missing.toml"),
    ("train", "--lora-r", "0", "--dry-run"),
    ("merge",),
    ("serve", "--print-command"),
    ("eval",),
    ("eval", "--compare", "never-ran"),
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=lambda args: " ".join(args))
def test_known_bad_inputs_are_one_line_and_exit_1(cli, tmp_path: Path, args: tuple[str, ...]) -> None:
    (tmp_path / "a-file").write_text("not a folder = [", encoding="utf-8")
    refused = cli(*(arg.format(tmp=tmp_path) for arg in args), ok=False)
    assert refused.exit_code == 1, refused.stdout + refused.stderr
    assert error_line(refused.stderr).startswith("error: ")


def test_a_mistyped_workspace_is_one_line_and_leaves_nothing_behind(cli, tmp_path: Path) -> None:
    typo = tmp_path / "my-workspcae"
    for command in (["fix"], ["describe", "--template"], ["train"], ["eval"], ["merge"]):
        refused = cli.runner.invoke(app, ["-w", str(typo), *command])
        assert refused.exit_code == 1 and f"no workspace at {typo}" in error_line(refused.stderr), command
        assert not typo.exists(), command


def test_the_default_base_without_the_hub_or_cuda_is_one_line(fixed: Path) -> None:
    """The Hub is out of reach (HF_HUB_OFFLINE=1) and there is no CUDA: the preflight answers before any
    model library loads."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "skinvlm", "-w", str(fixed), "train", "--backend", "hf"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1 and "trains only on CUDA" in error_line(done.stderr)
    assert "--backend hf --model Qwen/Qwen2.5-VL-7B-Instruct" in done.stderr


def test_serve_prints_its_command_as_json(cli, workspace: Path) -> None:
    model = workspace / "models" / "merged"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    shown = cli.json("serve", "--print-command", "--port", "8123", "--gpu", "1")
    assert shown["command"][:3] == ["vllm", "serve", str(model)] and "8123" in shown["command"]
    assert shown["env"] == {"CUDA_VISIBLE_DEVICES": "1"} and shown["shell"].startswith("CUDA_VISIBLE_DEVICES=1 vllm")
    assert (shown["endpoint"], shown["model"]) == ("http://127.0.0.1:8123/v1", "skinvlm")
