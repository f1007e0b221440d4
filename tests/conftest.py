"""Fixtures that make real files: image trees with real defects, workspaces, a CLI runner."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skinvlm.cli import app
from skinvlm.demo.pipeline import short_rules, tiny_train_flags
from skinvlm.demo.synthetic import image_bytes, write_tree
from skinvlm.demo.tiny import build


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("SKINVLM_WORKSPACE", "SKINVLM_RULES", "OPENAI_API_KEY", "OPENAI_BASE_URL", "HF_TOKEN", "HF_REPO_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


CHROMIUM = os.environ.get("SKINVLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on now: every server a test starts takes one (never a fixed port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    """The process is running (a zombie, exited but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")


def fake_secret(prefix: str, label: str) -> str:
    """A key-shaped test value (`sk-...`, `hf_...`) made when the tests run, so no committed line looks like a
    real credential to a secret scanner, while redaction still sees the shape it must mask."""
    return prefix + label + hashlib.sha256(label.encode()).hexdigest()[:24]


PHASE_LINE = re.compile(r"^(merge|fix|publish|checking images|describing|evaluating): ")  # progress, when piped


def error_line(stderr: str) -> str:
    """The one line a failed command prints: no traceback, nothing else but the phases it got through."""
    lines = [line for line in stderr.strip().splitlines() if not PHASE_LINE.match(line)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


class Cli:
    """Runs the real `skinvlm` app in-process; stdout and stderr kept apart."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True, env: dict[str, str] | None = None):
        result = self.runner.invoke(app, [*map(str, args), "-w", str(self.workspace)], env=env)
        if ok and result.exit_code != 0:
            raise AssertionError(
                f"exit {result.exit_code}\nstdout:{result.stdout}\nstderr:{result.stderr}\n{result.exception!r}"
            )
        return result

    def json(self, *args: str) -> dict:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "ws"
    path.mkdir()
    return path


@pytest.fixture
def cli(workspace: Path) -> Cli:
    return Cli(workspace)


@pytest.fixture
def clean_tree(tmp_path: Path) -> Path:
    """A clean AI-Hub-shaped tree: 6 classes x 2 views, 3 train and 1 test image per folder."""
    root = tmp_path / "extracted_data"
    write_tree(root, {"train": 3, "test": 1}, size=32)
    return root


@pytest.fixture
def ingested(cli, clean_tree: Path, workspace: Path) -> Path:
    """The clean tree ingested: the workspace."""
    cli("ingest", clean_tree)
    return workspace


@pytest.fixture
def ugly_tree(clean_tree: Path) -> Path:
    """The clean tree plus every defect real downloads have."""
    train = clean_tree / "Training" / "images"
    (train / "TS_건선_정면" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (train / "TS_건선_정면" / "notes.txt").write_text("not an image")
    (train / "TS_건선_정면" / ".DS_Store").write_bytes(b"junk")
    (train / "TS_건선_정면" / "UPPER.JPG").write_bytes(image_bytes("건선", 900, 32, "RGB", "JPEG"))
    (train / "TS_아토피_측면" / "nested" / "deeper").mkdir(parents=True)
    (train / "TS_아토피_측면" / "nested" / "deeper" / "x.jpeg").write_bytes(
        image_bytes("아토피", 901, 32, "RGB", "JPEG")
    )
    nfd = unicodedata.normalize("NFD", "TS_여드름_측면")
    (train / nfd).mkdir()
    (train / nfd / "decomposed.png").write_bytes(image_bytes("여드름", 902, 32))
    good = image_bytes("주사", 903, 32)
    (train / "TS_주사_정면" / "truncated.png").write_bytes(good[: len(good) // 2])
    (train / "TS_주사_정면" / "empty.png").write_bytes(b"")
    (train / "TS_주사_정면" / "fake.png").write_text("<html>this is not a png</html>")
    dup = (train / "TS_정상_정면").glob("*.png").__next__().read_bytes()
    (train / "TS_정상_정면" / "copy-of-first.png").write_bytes(dup)
    leaked = next((clean_tree / "Validation" / "images" / "VS_지루_측면").glob("*.png")).read_bytes()
    (train / "TS_지루_측면" / "leaked.png").write_bytes(leaked)
    (clean_tree / "__MACOSX").mkdir()
    return clean_tree


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real `skinvlm` in a fresh Python process: for what must not share this one (import order, torchrun)."""
    return subprocess.run([sys.executable, "-m", "skinvlm", *map(str, args)], capture_output=True, text=True)


# -- the tiny model and workspaces to train it on -----------------------------------------------
FAST = tiny_train_flags()  # the tiny recipe, as `train` flags


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2.5-VL (224k parameters), built offline once per test session."""
    return build(tmp_path_factory.mktemp("tiny") / "model")


def describe_tree(cli, workspace: Path, src: Path, per_folder: dict[str, int], size: int) -> Path:
    write_tree(src, per_folder, size=size)
    cli("ingest", src)
    cli("describe", "--template")
    cli("fix")
    return workspace


@pytest.fixture
def described(cli, tmp_path: Path, workspace: Path) -> Path:
    """~60 train and 24 held-out class-coloured 112px images, described offline from templates."""
    short_rules(workspace / "postprocess.toml")
    return describe_tree(cli, workspace, tmp_path / "src", {"train": 5, "test": 2}, 112)


@pytest.fixture
def photos(cli, tmp_path: Path, workspace: Path) -> Path:
    """1024x1024 photos as in the AI Hub set (12 train, 12 test), described offline with the shipped rules."""
    return describe_tree(cli, workspace, tmp_path / "src", {"train": 1, "test": 1}, 1024)
