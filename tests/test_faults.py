"""The fault suite: hostile trees, a second writer, kills between the steps of a stage swap, a full disk,
endless answers, a batch created by a run that died, the Hub out of reach. Each reproduces a fault that once
lost work or hung, on small data, through the real CLI (in-process or as a real subprocess)."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import error_line, fake_secret
from datasets import load_from_disk

from skinvlm.demo.synthetic import image_bytes
from skinvlm.testing.openai_server import FakeOpenAI
from skinvlm.workspace import Workspace

KEY = fake_secret("sk-", "test-faults")


def skinvlm(*args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "skinvlm", *map(str, args)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[arg-type]
    )


def finished(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- ingest survives any tree ----------------------------------------------------------------
@pytest.fixture
def hostile_tree(clean_tree: Path) -> Iterator[Path]:
    """The clean tree plus every hostile entry a real download or unzip has produced."""
    from PIL import Image

    folder = clean_tree / "Training" / "images" / "TS_건선_정면"
    raw = os.fsencode(folder)
    (Path(os.fsdecode(raw + b"/" + "사진.png".encode("cp949")))).write_bytes(image_bytes("건선", 801, 32))
    (Path(os.fsdecode(raw + b"/bad\xff\xfe.png"))).write_bytes(image_bytes("건선", 802, 32))
    (folder / "two\nlines.png").write_bytes(image_bytes("건선", 803, 32))
    (folder / "dangling.png").symlink_to("/nonexistent/photo.png")
    (folder / "loop-a.png").symlink_to("loop-b.png")
    (folder / "loop-b.png").symlink_to("loop-a.png")
    os.mkfifo(folder / "fifo.png")
    os.mkfifo(folder / "new\nline.png")  # a skipped file whose name could split a report line
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "linked-folder").symlink_to(clean_tree / "Validation")
    Image.new("1", (12000, 12000), 1).save(folder / "huge.png")  # 144 MP, a few KB on disk
    deep = str(folder)
    for _ in range(1100):  # deeper than Python's recursion limit
        deep += "/d"
        os.mkdir(deep)
    Path(deep, "deep.png").write_bytes(image_bytes("건선", 804, 32))
    yield clean_tree
    os.remove(Path(deep, "deep.png"))
    for _ in range(1100):  # bottom-up: shutil.rmtree, which pytest cleans up with, recurses
        os.rmdir(deep)
        deep = os.path.dirname(deep)


def test_ingest_names_every_hostile_file_and_keeps_every_good_one(cli, hostile_tree: Path, workspace: Path) -> None:
    result = cli("ingest", hostile_tree, "--workers", "4")
    report = json.loads(cli("status", "--json").stdout)
    skipped = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in ingested_manifest(workspace)["skipped"]}
    assert skipped == {
        "dangling.png": "a broken link (its target does not exist)",
        "loop-a.png": "a link loop",
        "loop-b.png": "a link loop",
        "fifo.png": "not a regular file (a FIFO, device or socket): never read",
        "new\\nline.png": "not a regular file (a FIFO, device or socket): never read",
        "zero.png": "not a regular file (a FIFO, device or socket): never read",
        "linked-folder": "a link to a folder: not followed",
        "huge.png": "12000x12000 = 144,000,000 pixels, over --max-pixels-in 67,108,864 (raise it to take this image)",
    }
    sources = load_from_disk(str(workspace / "datasets" / "ingested"))["train"]["source"]
    names = {source.rsplit("/", 1)[-1] for source in sources}
    assert {"사진.png", "bad\\xff\\xfe.png", "two\\nlines.png", "deep.png"} <= names, "CP949 read, the rest escaped"
    assert len(sources) == 36 + 4
    assert "new\\nline.png" in result.stderr and not any(
        line.startswith("line.png") for line in result.stderr.splitlines()
    ), "one report line per skipped file"
    assert "huge.png" in result.stderr and "zero.png" in result.stderr
    assert next(s for s in report["stages"] if s["name"] == "ingested")["rows"] == {"train": 40, "test": 12}


def ingested_manifest(workspace: Path) -> dict:
    return json.loads((workspace / "datasets" / "ingested" / "manifest.json").read_text())


# -- one writer at a time --------------------------------------------------------------------
def test_a_second_writer_is_refused_at_once_and_a_killed_writers_lock_is_taken_over(cli, ingested: Path) -> None:
    with FakeOpenAI(latency=0.3, key=KEY) as server:
        args = ("describe", "-w", ingested, "--base-url", server.url, "--api-key", KEY, "--concurrency", "1")
        first = skinvlm(*args)
        deadline = time.time() + 60
        while server.requests < 2 and time.time() < deadline:
            time.sleep(0.05)
        clock = time.perf_counter()
        refused = cli("fix", ok=False)
        assert time.perf_counter() - clock < 1.0, "refused at once, not after a wait"
        assert refused.exit_code == 1 and f"`skinvlm describe` (PID {first.pid}" in refused.stderr
        assert cli("ingest", ingested.parent / "extracted_data", "--force", ok=False).exit_code == 1
        assert cli("status").exit_code == 0, "readers never wait"
        first.send_signal(signal.SIGKILL)
        first.wait()
        done = cli.json("describe", "--base-url", server.url, "--api-key", KEY)
    assert done["statuses"] == {"ok": 48}, "the dead writer's lock was taken over"


# -- atomic stages ---------------------------------------------------------------------------
@pytest.fixture
def fixed(cli, ingested: Path) -> Path:
    cli("describe", "--template")
    cli("fix")
    return ingested


def complete(workspace: Path) -> int:
    """Rows of datasets/fixed, loaded as every reader does; raises when the stage is broken."""
    data = Workspace.open(workspace).load("fixed")
    return sum(split.num_rows for split in data.values())


def leftovers(workspace: Path) -> list[str]:
    return sorted(p.name for p in (workspace / "datasets").iterdir() if p.name.startswith(".fixed"))


@pytest.mark.parametrize("step", ["renamed", "linked", "swapped"])
def test_a_kill_at_any_step_of_a_swap_leaves_a_complete_stage(cli, fixed: Path, step: str) -> None:
    code, _, err = finished(skinvlm("fix", "-w", fixed, "--drop-invalid", env={"SKINVLM_CRASH_AT": step}))
    assert code == 99, err
    assert complete(fixed) == 48 and load_from_disk(str(fixed / "datasets" / "fixed"))["train"].num_rows == 36
    cli("fix")  # the next writer cleans up after the one that died
    assert leftovers(fixed) == [os.readlink(fixed / "datasets" / "fixed")], "one version, no temporary folders"


def test_a_kill_while_an_old_stage_folder_is_migrated_leaves_a_complete_stage(cli, fixed: Path) -> None:
    link = fixed / "datasets" / "fixed"
    version = link.parent / os.readlink(link)
    link.unlink()
    shutil.copytree(version, link)  # a workspace made before stages were versioned: a plain folder
    shutil.rmtree(version)
    code, _, err = finished(skinvlm("fix", "-w", fixed, env={"SKINVLM_CRASH_AT": "migrated"}))
    assert code == 99, err
    assert not link.exists() and complete(fixed) == 48, "readers find the newest complete version"
    assert next(s for s in cli.json("status")["stages"] if s["name"] == "fixed")["present"]
    cli("fix")
    assert link.is_symlink() and complete(fixed) == 48 and len(leftovers(fixed)) == 1


# -- the machine's errors --------------------------------------------------------------------
def limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG

    return apply


def test_a_write_the_disk_refuses_is_one_line_and_keeps_finished_work(ingested: Path) -> None:
    process = skinvlm("describe", "-w", ingested, "--template", preexec_fn=limit_file_size(6000))
    code, _, err = finished(process)
    assert code == 1 and "grew past the largest file allowed here" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    journal = (ingested / "journal" / "describe.jsonl").read_bytes().splitlines()
    kept = [json.loads(line) for line in journal if line.endswith(b"}")]
    assert kept and all(r["status"] == "ok" for r in kept), "what was finished is on disk"
    code, out, err = finished(skinvlm("describe", "-w", ingested, "--template", "--json"))
    assert code == 0 and json.loads(out)["statuses"] == {"ok": 48}, err


def test_a_full_disk_names_the_path_and_what_to_free(tmp_path: Path) -> None:
    from skinvlm.errors import machine_problem

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "journal" / "describe.jsonl"))
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = full
    line = machine_problem(wrapped, tmp_path)
    assert line is not None and line.startswith(f"no space left on the disk holding {tmp_path}/journal")
    assert "GiB free" in line and "finished work is kept" in line
    assert machine_problem(ValueError("a bug"), tmp_path) is None, "bugs keep their traceback"


# -- answers without end ---------------------------------------------------------------------
def test_an_endless_answer_is_stored_cut_and_counted(cli, ingested: Path) -> None:
    endless = "<label>건선</label>\n<summary>" + "붉은 판이 보입니다. " * 20_000 + "</summary>"
    with FakeOpenAI(answer=lambda body: endless, obeys_max_tokens=False) as server:
        args = ("--base-url", server.url, "--api-key", KEY)
        described = cli.json("describe", *args, "--limit", "6")
        evaluated = cli.json("eval", *args, "--name", "endless", "--limit", "6")
    journal = [json.loads(line) for line in (ingested / "journal" / "describe.jsonl").read_text().splitlines()]
    assert described["answers_cut"] == 6 and all(r["cut"] and len(r["output"]) == 20_000 for r in journal)
    predictions = (ingested / "eval" / "endless" / "predictions.jsonl").read_text()
    assert evaluated["answers_cut"] == 6 and len(predictions) < 6 * 25_000


# -- the Batch API never pays twice ----------------------------------------------------------
def test_a_batch_created_by_a_run_that_died_is_found_not_paid_again(cli, ingested: Path) -> None:
    with FakeOpenAI(key=KEY) as server:
        args = ("describe", "-w", ingested, "--base-url", server.url, "--api-key", KEY, "--batch", "--submit-only")
        code, _, err = finished(skinvlm(*args, env={"SKINVLM_CRASH_AT": "batch-created"}))
        assert code == 99, err
        state = json.loads((ingested / "journal" / "batch.json").read_text())
        assert state["batches"][0]["id"] is None, "died between creating the batch and recording it"
        done = cli.json("describe", "--base-url", server.url, "--api-key", KEY, "--batch", "--poll-seconds", "0.01")
        assert len(server.batches) == 1, "the orphan was adopted by its metadata, not created again"
    assert done["statuses"] == {"ok": 48}


# -- the Hub out of reach --------------------------------------------------------------------
def test_publishing_without_the_hub_is_one_line(cli, ingested: Path) -> None:
    cli("describe", "--template")
    cli("fix")
    endpoint = f"http://127.0.0.1:{dead_port()}"
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_fake-token-for-this-test"}
    code, _, err = finished(skinvlm("publish", "me/offline", "-w", ingested, "--yes", env=env))
    assert (
        code == 1
        and f"cannot reach the Hugging Face Hub at {endpoint} to check the token for me/offline" in error_line(err)
    ), "the token is checked before a shard is written"
    code, _, err = finished(
        skinvlm("publish", "me/offline", "-w", ingested, "--yes", env=env | {"HF_HUB_OFFLINE": "1"})
    )
    assert code == 1 and "HF_HUB_OFFLINE is set" in err


# -- a stopped eval keeps what it paid for ---------------------------------------------------
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_first_eval_stopped_midway_keeps_every_answer(cli, ingested: Path, stop: signal.Signals) -> None:
    with FakeOpenAI(key=KEY, latency=0.4) as server:
        args = ("eval", "-w", ingested, "--base-url", server.url, "--api-key", KEY, "--name", "first")
        process = skinvlm(*args, "--concurrency", "1", "--no-probabilities")
        predictions = ingested / "eval" / "first" / "predictions.jsonl"
        deadline = time.time() + 60
        while not (predictions.exists() and len(predictions.read_text().splitlines()) >= 3):
            assert time.time() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(stop)
        code, _, err = finished(process)
        kept = len(predictions.read_text().splitlines())
        assert code == 128 + stop and "finished work is saved" in err and kept >= 3
        listed = {s["name"]: s for s in cli.json("status")["stages"]}["eval/first"]
        assert listed["stale"] and listed["figures"] == f"unfinished: {kept} answers kept", "not shown as current"
        asked = server.requests
        again = cli.json("eval", "--base-url", server.url, "--api-key", KEY, "--name", "first", "--no-probabilities")
    assert again["from_cache"] == kept and server.requests - asked == 12 - kept, "only the rest is asked"


def test_a_disk_full_while_eval_writes_its_report_leaves_no_half_file(cli, ingested: Path) -> None:
    with FakeOpenAI(key=KEY) as server:
        args = ("eval", "-w", ingested, "--base-url", server.url, "--api-key", KEY, "--name", "full")
        code, _, err = finished(skinvlm(*args, preexec_fn=limit_file_size(24_000)))
    run = ingested / "eval" / "full"
    assert code == 1 and "grew past the largest file allowed here" in err and "Traceback" not in err
    assert len((run / "predictions.jsonl").read_text().splitlines()) == 12, "every answer kept"
    assert not (run / "report.html").exists() and not list(run.glob(".*.tmp")), "no half-written page"


# -- no peer can hang a run or fill its memory -----------------------------------------------
@pytest.mark.parametrize("fault", ["endless", "trickle", "huge"])
def test_a_peer_that_never_finishes_its_answer_cannot_hang_describe_or_eval(cli, ingested: Path, fault: str) -> None:
    """An endless stream, a byte a second, a 300 MB body: --timeout bounds each whole request (it bounded each
    read) and a body stops being read past MAX_BODY_BYTES, so the run ends in seconds with bounded memory."""
    import psutil

    with FakeOpenAI(key=KEY, default=fault) as server:
        args = ("-w", ingested, "--base-url", server.url, "--api-key", KEY, "--timeout", "2", "--max-attempts", "2")
        started = time.monotonic()
        for command in (
            ("describe", "--limit", "4", "--backoff", "0.01"),
            ("eval", "--limit", "4", "--backoff", "0.01"),
        ):
            process = skinvlm(command[0], *args, *command[1:])
            peak = 0
            while process.poll() is None:
                peak = max(peak, psutil.Process(process.pid).memory_info().rss)
                assert time.monotonic() - started < 90, f"{command[0]} hangs on a {fault} peer"
                time.sleep(0.1)
            code, _, err = finished(process)
            assert code == 1 and "requests failed" in err and "Traceback" not in err, err
            assert peak < 700 * 2**20, f"{command[0]} held {peak / 2**20:.0f} MiB"


def test_a_batch_result_file_without_end_is_one_line_and_pays_for_nothing_twice(cli, ingested: Path) -> None:
    with FakeOpenAI(key=KEY) as server:
        server.result_files = "endless"
        args = ("--base-url", server.url, "--api-key", KEY, "--batch", "--poll-seconds", "0.01", "--limit", "4")
        started = time.monotonic()
        refused = cli("describe", *args, ok=False)
        assert time.monotonic() - started < 60 and refused.exit_code == 1
        assert "batch result file" in error_line(refused.stderr) and "run again to retry" in refused.stderr
        server.result_files = "ok"
        done = cli.json("describe", *args)
        assert len(server.batches) == 1, "the batch is collected, not submitted again"
    assert done["statuses"]["ok"] == 4


def test_a_cut_short_adapter_and_a_cut_short_json_are_one_readable_line(cli, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}', encoding="utf-8")
    (adapter / "skinvlm.json").write_text('{"base_model": "some/base"}', encoding="utf-8")
    save_file({"lora_A.weight": torch.zeros(64, 64)}, str(adapter / "adapter_model.safetensors"))
    whole = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(whole[: len(whole) // 2])
    line = error_line(cli("merge", "--adapter", adapter, ok=False).stderr)
    assert "adapter_model.safetensors is damaged or cut short" in line and "internal error" not in line, line
    (adapter / "adapter_config.json").write_text('{"peft_type": "LO', encoding="utf-8")
    line = error_line(cli("merge", "--adapter", adapter, ok=False).stderr)
    assert "Unterminated string starting at line 1, column 15" in line and "at at" not in line, line
