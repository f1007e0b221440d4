"""Failures are loud and secrets stay secret: dead endpoints, runs where every request fails, torn journals,
Retry-After, Batch API failures, and planted credentials looked for in every file and message."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from conftest import fake_secret

from skinvlm.testing.openai_server import FakeOpenAI

PLANTED_KEY = fake_secret("sk-", "planted-SECRET")
PLANTED_TOKEN = fake_secret("hf_", "plantedTOKEN")
PASSWORD = "hunter2pass"


def dead_url(with_password: bool = False) -> str:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://{'user:' + PASSWORD + '@' if with_password else ''}127.0.0.1:{port}/v1"


def test_a_dead_endpoint_is_one_line_at_once(cli, ingested: Path) -> None:
    described = cli("describe", "--base-url", dead_url(True), "--api-key", PLANTED_KEY, ok=False)
    assert described.exit_code == 1 and "nothing answers at http://***@127.0.0.1:" in described.stderr
    assert len(described.stderr.strip().splitlines()) == 1 and PASSWORD not in described.stderr
    evaluated = cli("eval", "--base-url", dead_url(), "--name", "nobody", "--wait", "1", ok=False)
    assert evaluated.exit_code == 1 and "nothing answers at" in evaluated.stderr and "within 1s" in evaluated.stderr
    assert not (ingested / "eval" / "nobody").exists(), "a run with no answer leaves no folder"
    assert not [s for s in cli.json("status")["stages"] if s["name"].startswith("eval/")]


def test_every_request_failing_exits_non_zero_with_the_reasons(cli, ingested: Path) -> None:
    with FakeOpenAI(default="500") as server:
        args = ("--base-url", server.url, "--api-key", PLANTED_KEY, "--backoff", "0.01", "--max-attempts", "2")
        described = cli("describe", *args, ok=False)
        evaluated = cli("eval", *args, "--name", "broken", ok=False)
    assert described.exit_code == 1 and "every one of the 48 requests failed" in described.stderr
    assert "InternalServerError" in described.stderr and "(48x)" in described.stderr
    assert evaluated.exit_code == 1 and "all 12 requests failed" in evaluated.stderr and "(12x)" in evaluated.stderr
    assert not (ingested / "eval" / "broken").exists()


def test_eval_reads_the_endpoint_from_the_workspace_env_file(cli, ingested: Path) -> None:
    with FakeOpenAI(key=PLANTED_KEY) as server:
        (ingested / ".env").write_text(f"OPENAI_BASE_URL={server.url}\nOPENAI_API_KEY={PLANTED_KEY}\n")
        result = cli.json("eval", "--name", "from-env")
        assert server.requests == 12
    assert result["n"] == 12 and result["backend"].startswith(server.url)


def test_planted_secrets_reach_no_file_and_no_message(cli, ingested: Path) -> None:
    (ingested / ".env").write_text(f"OPENAI_API_KEY={PLANTED_KEY}\nHF_TOKEN={PLANTED_TOKEN}\n")
    seen = []
    with FakeOpenAI() as server:
        url = server.url.replace("http://", f"http://user:{PASSWORD}@")
        seen.append(cli("describe", "--base-url", url, "--limit", "6", "--backoff", "0.01"))
        seen.append(cli("eval", "--base-url", url, "--name", "secret", "--limit", "6"))
    with FakeOpenAI(key=fake_secret("sk-", "the-right-key")) as server:
        url = server.url.replace("http://", f"http://user:{PASSWORD}@")
        seen.append(cli("describe", "--base-url", url, "--redo", "all", "--backoff", "0.01", ok=False))
    seen.append(cli("fix"))
    seen.append(cli("publish", "me/secret", "--dry-run", "--ignore-audit"))
    assert "refused the API key (401)" in seen[2].stderr
    texts = [r.stdout + r.stderr for r in seen]
    texts += [
        p.read_bytes().decode("utf-8", "replace") for p in ingested.rglob("*") if p.is_file() and p.name != ".env"
    ]
    for secret in (PLANTED_KEY, PLANTED_TOKEN, PASSWORD):
        assert not [t for t in texts if secret in t], f"{secret} leaked"
    settings = json.loads((ingested / "datasets" / "described" / "manifest.json").read_text())["settings"]
    assert settings["max_tokens"] == 512, "a field named like a token count is no secret"
    assert settings["base_url"][0].startswith("http://***@127.0.0.1:")


def test_a_torn_journal_line_is_repaired_and_its_record_asked_again(cli, ingested: Path) -> None:
    with FakeOpenAI() as server:
        cli("describe", "--base-url", server.url, "--api-key", PLANTED_KEY, "--limit", "6")
        path = ingested / "journal" / "describe.jsonl"
        lines = path.read_text().splitlines()
        torn = json.loads(lines[-1])
        path.write_text("\n".join(lines[:-1]) + "\n" + json.dumps(torn)[:40])  # killed mid-write
        asked = server.requests
        result = cli.json("describe", "--base-url", server.url, "--api-key", PLANTED_KEY)
        assert server.requests == asked + 43, "the torn record and the 42 never asked"
    assert result["statuses"] == {"ok": 48}
    entries = path.read_text().splitlines()
    assert entries[5] == json.dumps(torn)[:40], "the torn line stays as it was..."
    assert json.loads(entries[6])["status"] == "ok", "...and the next record starts on its own line"


def test_retry_after_is_honoured(cli, ingested: Path) -> None:
    with FakeOpenAI(plan=["429"], retry_after="1") as server:
        args = ("--base-url", server.url, "--api-key", PLANTED_KEY, "--limit", "1", "--backoff", "0.01")
        cli("describe", *args, "--concurrency", "1")
        assert server.requests == 2 and server.times[1] - server.times[0] >= 0.9, "waited as the server asked"


def test_a_batch_that_expires_fails_its_records_loudly(cli, ingested: Path) -> None:
    with FakeOpenAI(key=PLANTED_KEY) as server:
        server.batch_outcome = "expired"
        args = ("--base-url", server.url, "--api-key", PLANTED_KEY, "--batch", "--poll-seconds", "0.01")
        result = cli("describe", *args, ok=False)
    assert result.exit_code == 1 and "every one of the 48 requests failed" in result.stderr
    assert "batch_expired" in result.stderr
    records = [json.loads(line) for line in (ingested / "journal" / "describe.jsonl").read_text().splitlines()]
    assert len(records) == 48 and all(r["status"] == "failed" and "expired" in r["error"] for r in records)
    assert not (ingested / "journal" / "batch.json").exists(), "merged: nothing left to collect"


def test_an_open_batch_of_another_model_is_not_abandoned_silently(cli, ingested: Path) -> None:
    state = {"model": "gpt-4o-mini", "prompt_hash": "x", "batches": [{"id": "batch-9", "merged": False}]}
    (ingested / "journal").mkdir()
    (ingested / "journal" / "batch.json").write_text(json.dumps(state))
    with FakeOpenAI(key=PLANTED_KEY) as server:
        args = ("--base-url", server.url, "--api-key", PLANTED_KEY, "--batch", "--model", "gpt-4.1-mini")
        result = cli("describe", *args, ok=False)
    assert result.exit_code == 1 and "is still open" in result.stderr and server.requests == 0
