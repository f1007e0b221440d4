"""CLI conventions: --version, -h, -w before the command, choices at parse time, --config, one line per error."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from conftest import error_line

from skinvlm import __version__
from skinvlm.cli import app
from skinvlm.describe_settings import DescribeSettings
from skinvlm.evaluate import EvalSettings
from skinvlm.rules import default_rules_path
from skinvlm.serve import ServeSettings
from skinvlm.train_settings import TrainSettings


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
    # What will run on this CPU, not what was asked (auto, adamw_8bit and 4 bits by default).
    assert (settings["backend"], settings["optim"], settings["load_in_4bit"]) == ("hf", "adamw_torch", False)
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
    commands = [["fix"], ["describe", "--template"], ["train"], ["eval"], ["merge"], ["status"], ["audit"]]
    commands += [["eval", "--compare", "a", "b"], ["publish", "me/x", "--dry-run"], ["serve", "--print-command"]]
    commands += [["ui", "--port", "1"], ["review", "--report"]]
    for command in commands:
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


def write_bad_inputs(ws: Path, tmp: Path) -> None:
    """The damaged files of the third fault pass: non-UTF-8 user files, corrupt JSON of ours and of libraries,
    a lock path that is no file, rule files whose replacements cannot work."""
    (tmp / "latin1.toml").write_bytes(b"[train]\nmax_steps = 5  # caf\xe9\n")
    (tmp / "latin1.txt").write_bytes(b"Describe the photo, caf\xe9.\n")
    for run in ("a", "b"):
        (ws / "eval" / run).mkdir(parents=True)
        (ws / "eval" / run / "metrics.json").write_text('{"name": "a", "accuracy": 0.5', encoding="utf-8")
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{not json", encoding="utf-8")
    (ws / "models" / "adapter").mkdir(parents=True)
    (ws / "models" / "adapter" / "adapter_config.json").write_text('{"r": 8,', encoding="utf-8")
    (ws / "models" / "merged").mkdir(parents=True)
    (ws / "models" / "merged" / "config.json").write_text("{}", encoding="utf-8")
    shipped = default_rules_path().read_text(encoding="utf-8")
    (tmp / "group.toml").write_text(shipped + '\n[[rewrite]]\npattern = "(a)b"\nreplace = "\\\\3"\n', encoding="utf-8")
    big = "가" * 1_000_000
    (tmp / "big.toml").write_text(shipped + f'\n[[rewrite]]\npattern = "ab"\nreplace = "{big}"\n', encoding="utf-8")


FAULT_PASS_3 = [
    (("train", "--config", "{tmp}/latin1.toml", "--dry-run"), "is not UTF-8 text (byte 0xe9"),
    (("describe", "--prompt-file", "{tmp}/latin1.txt", "--dry-run"), "is not UTF-8 text"),
    (("eval", "--compare", "a", "b"), "is damaged (not valid JSON"),
    (("eval", "--model-dir", "{tmp}/model"), "config.json is damaged"),
    (("merge",), "adapter_config.json is damaged"),
    (("eval", "--name", "x" * 300), "must be 1-100 letters"),
    (("eval", "--timeout", "nan"), "--timeout must be a number of seconds above 0, not nan"),
    (("describe", "--timeout", "inf"), "--timeout must be a number of seconds above 0, not inf"),
    (("serve", "--print-command", "--gpu", "0,0"), "names a GPU twice"),
    (("serve", "--print-command", "--max-model-len", "-1"), "--max-model-len must be at least 256"),
    (("describe", "--template", "--rules", "{tmp}/group.toml"), "refers to group \\3, but the pattern has 1"),
    (("describe", "--template", "--rules", "{tmp}/big.toml"), "is 1,000,000 characters long"),
]


@pytest.mark.parametrize("args,said", FAULT_PASS_3, ids=lambda v: " ".join(v)[:40] if isinstance(v, tuple) else "")
def test_damaged_and_odd_inputs_are_one_line(cli, ingested: Path, tmp_path: Path, args: tuple, said: str) -> None:
    write_bad_inputs(ingested, tmp_path)
    refused = cli(*(arg.format(tmp=tmp_path) for arg in args), ok=False)
    assert refused.exit_code == 1, refused.stdout + refused.stderr
    line = error_line(refused.stderr)
    assert line.startswith("error: ") and said in line and "internal error" not in line, line


def test_a_damaged_env_file_and_lock_path_are_one_line(cli, ingested: Path) -> None:
    (ingested / ".env").write_bytes(b"OPENAI_API_KEY=caf\xe9\n")
    refused = cli("describe", ok=False)
    assert refused.exit_code == 1 and "the workspace's .env file" in error_line(refused.stderr)
    (ingested / ".env").unlink()
    lock = ingested / ".skinvlm.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    refused = cli("describe", "--template", ok=False)
    assert "is a folder, where skinvlm keeps its lock file" in error_line(refused.stderr)
    lock.rmdir()
    lock.symlink_to(ingested / "nowhere")
    assert "is a link to nothing" in error_line(cli("describe", "--template", ok=False).stderr)


def test_secrets_in_a_urls_query_are_masked() -> None:
    from skinvlm.redaction import redact_text

    url = "http://host:8000/v1?api_key=abc123def&model=x&token=t0k3n&sig=zz"
    assert redact_text(f"{url} does not know model 'x' (404)") == (
        "http://host:8000/v1?api_key=***&model=x&token=***&sig=*** does not know model 'x' (404)"
    )


def test_help_shows_the_config_tables_and_describe_offers_no_flag_it_lacks(cli, ingested: Path) -> None:
    shown = cli.runner.invoke(app, ["train", "-h"], env={"COLUMNS": "250"}).stdout
    assert "([train], [describe], [eval], [serve])" in shown
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    described = cli("describe", "--base-url", dead, "--api-key", "sk-x", ok=False)
    assert "nothing answers" in error_line(described.stderr) and "--wait" not in described.stderr
    evaluated = cli("eval", "--base-url", dead, "--api-key", "sk-x", ok=False)
    assert "give it time with --wait SECONDS" in error_line(evaluated.stderr)


def test_no_module_of_the_package_imports_itself_back() -> None:
    """Each import between skinvlm's modules (at the top, in a function, or for type checking only) goes one
    way: settings live in modules of their own (describe_settings, train_settings) so stages never import
    each other in a circle."""
    import ast
    import graphlib

    import skinvlm

    package = Path(skinvlm.__file__).parent
    modules = {
        ".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("skinvlm"):
                imported |= {node.module or ""} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = {m for m in imported if m in modules and m != name and m != "skinvlm"}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the circle


RECIPES = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_every_example_recipe_loads_checks_and_keeps_the_effective_batch(recipe: Path) -> None:
    from skinvlm import config
    from skinvlm.devices import gpu_ids

    train = config.resolve(TrainSettings, "train", recipe, {}, set())
    train.check()
    assert train.batch_size * train.grad_accum * max(1, len(gpu_ids(train.gpu))) == 8, "8 photos a step"
    config.resolve(ServeSettings, "serve", recipe, {}, set())
    assert recipe.read_text(encoding="utf-8").startswith("# "), "each says what it is for"


def test_every_option_of_every_command_says_what_it_does() -> None:
    from typer.core import TyperOption

    group = typer.main.get_command(app)
    missing = [
        f"{name} {param.opts[0]}"
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        for param in command.params
        if isinstance(param, TyperOption) and not (param.help or "").strip()
    ]
    assert missing == [], missing


def test_help_fits_an_80_column_terminal_without_cutting_words(cli) -> None:
    """Env var names, paths and flag names must survive a narrow terminal whole (typer's rich table cut them)."""
    group = typer.main.get_command(app)
    for name, command in [("", group), *group.commands.items()]:  # type: ignore[attr-defined]
        shown = cli.runner.invoke(app, [name, "-h"] if name else ["-h"], env={"COLUMNS": "80"}).stdout
        assert "…" not in shown, name
        assert max(map(len, shown.splitlines())) <= 80, name
        for param in command.params:
            for opt in param.opts if isinstance(param, click.Option) else []:
                assert opt in shown, f"{name} {opt}"


def test_a_failed_command_leaves_no_lock_in_a_folder_that_is_no_workspace(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from skinvlm.cli import app

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("a user's own folder")
    for command in (["fix"], ["describe", "--template"], ["ingest", str(tmp_path / "nothing-here")]):
        result = CliRunner().invoke(app, ["-w", str(home), *command])
        assert result.exit_code == 1, (command, result.stdout, result.stderr)
        assert sorted(p.name for p in home.iterdir()) == ["notes.txt"], command
