"""`skinvlm describe` against a real OpenAI-protocol server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import error_line, fake_secret
from datasets import load_from_disk

from skinvlm.testing.openai_server import FakeOpenAI

KEY = fake_secret("sk-", "test-SECRET")


def describe(cli, server: FakeOpenAI, *args: str, ok: bool = True):
    return cli("describe", "--base-url", server.url, "--api-key", KEY, "--backoff", "0.01", *args, ok=ok)


def described(workspace: Path) -> dict[str, list]:
    data = load_from_disk(str(workspace / "datasets" / "described"))
    return {split: data[split].to_list() for split in data}


def journal_lines(workspace: Path) -> list[dict]:
    return [json.loads(line) for line in (workspace / "journal" / "describe.jsonl").read_text().splitlines()]


def test_all_records_end_ok_and_concurrency_is_respected(cli, ingested: Path) -> None:
    with FakeOpenAI(latency=0.05, key=KEY) as server:
        result = json.loads(describe(cli, server, "--concurrency", "3", "--json").stdout)
    assert result["statuses"] == {"ok": 48}
    assert server.requests == 48 and len(set(server.images)) == 48
    assert server.max_in_flight == 3, "in-flight requests must reach but never exceed --concurrency"
    rows = described(ingested)
    assert all(r["status"] == "ok" and r["output"].startswith("<label>") for s in rows.values() for r in s)
    first = server.bodies[0]
    assert first["model"] == "gpt-4o-mini" and first["messages"][0]["role"] == "system"
    assert first["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert first["messages"][1]["content"][1]["type"] == "text", "image first, then the instruction"
    manifest = json.loads((ingested / "datasets" / "described" / "manifest.json").read_text())
    assert manifest["counts"]["statuses"] == {"ok": 48} and manifest["prompt_hash"]
    assert KEY not in json.dumps(manifest)
    joined = __import__("skinvlm.workspace", fromlist=["Workspace"]).Workspace.open(ingested).load("described")
    assert joined["train"][0]["image"].size == (32, 32) and joined["train"][0]["output"]


def test_faults_are_retried_and_malformed_answers_kept_as_invalid(cli, ingested: Path) -> None:
    plan = ["429", "500", "reset", "slow", "badjson", "garbage", "garbage", "400"]
    with FakeOpenAI(plan=plan, slow_seconds=3) as server:
        out = describe(cli, server, "--concurrency", "1", "--timeout", "1", "--json", ok=False)
    # A run that leaves an image without an answer exits non-zero, its summary still printed.
    assert out.exit_code == 1 and error_line(out.stderr) == (
        "error: 1 of the 48 requests of this run failed (BadRequestError: Error code: 400 - Invalid image (1x)); "
        "every answer is saved: `skinvlm describe --redo failed` asks those again"
    )
    statuses = json.loads(out.stdout)["statuses"]
    # garbage twice on one record (1 format retry) -> invalid; the 400 -> failed; all else ok
    assert statuses == {"ok": 46, "invalid": 1, "failed": 1}
    records = {r["status"]: r for r in journal_lines(ingested)}
    assert records["ok"]["attempts"] == 1, "after the faulty first records, the rest go through at once"
    assert "I am unable" in records["invalid"]["output"] and records["invalid"]["error"]
    assert "400" in records["failed"]["error"] or "Invalid image" in records["failed"]["error"]
    first = journal_lines(ingested)[0]
    # 429, 500, reset, timeout and bad JSON are retried; then garbage twice (1 format retry) -> invalid
    assert first["status"] == "invalid" and first["attempts"] == 7
    with FakeOpenAI() as server:
        again = json.loads(describe(cli, server, "--redo", "failed,invalid", "--json").stdout)
    assert again["statuses"] == {"ok": 48} and server.requests == 2


def test_a_bad_key_stops_at_once_and_never_prints(cli, ingested: Path, workspace: Path) -> None:
    with FakeOpenAI(key="sk-the-right-one") as server:
        result = describe(cli, server, "--concurrency", "4", ok=False)
    assert result.exit_code == 1
    assert "refused the API key (401)" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert server.requests <= 4, "a 401 must stop the run after a handful of requests"
    journal = workspace / "journal" / "describe.jsonl"
    everything = result.stdout + result.stderr + (journal.read_text() if journal.exists() else "")
    assert KEY not in everything
    assert not (workspace / "datasets" / "described").exists(), "a refused run makes no stage"
    with FakeOpenAI(key=KEY) as good:
        describe(cli, good, "--limit", "6")
    manifest = (workspace / "datasets" / "described" / "manifest.json").read_text()
    with FakeOpenAI(key="sk-another-one") as refusing:
        describe(cli, refusing, "--redo", "all", ok=False)
    assert (workspace / "datasets" / "described" / "manifest.json").read_text() == manifest, "left as it was"
    assert refusing.url not in manifest


def test_key_from_workspace_env_file(cli, ingested: Path) -> None:
    (ingested / ".env").write_text(f"OPENAI_API_KEY={KEY}\n")
    with FakeOpenAI(key=KEY) as server:
        result = cli("describe", "--base-url", server.url, "--limit", "5", "--json")
    assert json.loads(result.stdout)["statuses"] == {"ok": 5, "pending": 43}
    assert KEY not in result.stdout + result.stderr


def test_missing_key_is_a_clear_error(cli, ingested: Path) -> None:
    result = cli("describe", ok=False)
    assert result.exit_code == 1 and "no API key" in result.stderr


def test_dry_run_sends_nothing_and_estimates_cost(cli, ingested: Path) -> None:
    text = cli("describe", "--dry-run").stdout
    assert "<elided>" in text and "$" in text and "gpt-4o-mini" in text
    preview = json.loads(cli("describe", "--dry-run", "--detail", "low", "--json").stdout)
    assert preview["records"] == 48 and preview["dollars"] > 0
    assert preview["dollars_batch"] == pytest.approx(preview["dollars"] / 2)
    assert not (ingested / "journal").exists()
    with FakeOpenAI() as server:
        describe(cli, server)
        done = describe(cli, server, "--dry-run").stdout
    assert done.startswith("nothing to ask: every record has its answer") and "{}" not in done


def test_template_answers_are_offline_and_marked(cli, ingested: Path) -> None:
    result = json.loads(cli("describe", "--template", "--json").stdout)
    assert result["statuses"] == {"ok": 48} and result["model"] == "template"
    manifest = json.loads((ingested / "datasets" / "described" / "manifest.json").read_text())
    assert manifest["template_made"] is True
    row = described(ingested)["train"][0]
    assert row["model"] == "template" and "<summary>" in row["output"]


def test_prompt_file_overrides_and_its_hash_is_recorded(cli, ingested: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.toml"
    prompt.write_text('system = "짧게 답하세요."\nuser = "진단은 \'{label}\'입니다. {view_hint}"\n')
    with FakeOpenAI() as server:
        out = json.loads(describe(cli, server, "--prompt-file", str(prompt), "--limit", "2", "--json").stdout)
    assert server.bodies[0]["messages"][0]["content"] == "짧게 답하세요."
    manifest = json.loads((ingested / "datasets" / "described" / "manifest.json").read_text())
    assert manifest["prompt_hash"] == out["prompt_hash"] and manifest["settings"]["prompt_source"] == str(prompt)


def test_kill_9_mid_run_loses_nothing_finished(ingested: Path) -> None:
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    with FakeOpenAI(latency=0.15, key=KEY) as server:
        cmd = [
            sys.executable,
            "-m",
            "skinvlm",
            "describe",
            "-w",
            str(ingested),
            "--base-url",
            server.url,
            "--concurrency",
            "4",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while server.requests < 16 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = len(journal_lines(ingested))
        assert 8 <= finished < 48
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        duplicates = server.requests - len(set(server.images))
    assert all(r["status"] == "ok" for rows in described(ingested).values() for r in rows)
    assert len({r["id"] for r in journal_lines(ingested)}) == 48
    assert duplicates <= 4, f"{duplicates} images were asked twice; at most --concurrency may be"


def test_batch_api_submits_once_and_a_rerun_collects(cli, ingested: Path) -> None:
    with FakeOpenAI(key=KEY) as server:
        server.batch_polls = 5
        first = json.loads(describe(cli, server, "--batch", "--submit-only", "--json").stdout)
        assert "submitted" in first["note"] and first["statuses"] == {"pending": 48}
        state = json.loads((ingested / "journal" / "batch.json").read_text())
        assert len(state["batches"]) == 1 and state["batches"][0]["requests"] == 48
        done = json.loads(describe(cli, server, "--batch", "--poll-seconds", "0.01", "--json").stdout)
        assert len(server.files) == 2, "one upload and one result file: the re-run did not submit again"
        assert len(server.batches) == 1
    assert done["statuses"] == {"ok": 48} and "merged" in done["note"]
    assert not (ingested / "journal" / "batch.json").exists()
    assert done["dollars"] == pytest.approx(48 * (100 * 0.15 + 50 * 0.60) / 1e6 / 2), "the Batch API costs half"
    rows = journal_lines(ingested)
    assert all(r["batch"] and r["status"] == "ok" for r in rows)


def test_a_redo_against_a_failing_endpoint_keeps_the_good_answers(cli, ingested: Path) -> None:
    def rows() -> list[dict]:
        return [row for split in described(ingested).values() for row in split]

    with FakeOpenAI(key=KEY) as server:
        describe(cli, server)
    before = rows()
    assert {row["status"] for row in before} == {"ok"}
    for redo in ("ok", "all"):
        with FakeOpenAI(key=KEY, default="500") as down:
            describe(cli, down, "--redo", redo, "--max-attempts", "2", ok=False)
        assert [(r["status"], r["output"]) for r in rows()] == [(r["status"], r["output"]) for r in before]
    assert {line["status"] for line in journal_lines(ingested)} == {"ok", "failed"}, "the failures are journalled"
