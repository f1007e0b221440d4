"""No silent wrong answers across stages and re-runs: describe provenance, label agreement, stale stages,
stratified --limit. Driven through the real CLI against a real OpenAI-protocol server on 127.0.0.1."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import error_line, fake_secret

from skinvlm.demo.synthetic import write_tree
from skinvlm.demo.tiny import build
from skinvlm.testing.openai_server import FakeOpenAI, label_conditioned, user_text

KEY = fake_secret("sk-", "test-provenance")


def describe(cli, server: FakeOpenAI, *args: str, ok: bool = True):
    return cli("describe", "--base-url", server.url, "--api-key", KEY, "--backoff", "0.01", *args, ok=ok)


def manifest(workspace: Path, stage: str) -> dict:
    return json.loads((workspace / "datasets" / stage / "manifest.json").read_text())


def journal(workspace: Path) -> list[dict]:
    return [json.loads(line) for line in (workspace / "journal" / "describe.jsonl").read_text().splitlines()]


def test_another_model_or_prompt_cannot_claim_earlier_answers(cli, ingested: Path, tmp_path: Path) -> None:
    with FakeOpenAI() as server:
        describe(cli, server, "--model", "model-a")
        hash_a = manifest(ingested, "described")["prompt_hash"]
        refused = describe(cli, server, "--model", "model-b", ok=False)
        assert refused.exit_code == 1 and server.requests == 48, "nothing is sent, nothing is claimed"
        assert f"48 records were described otherwise (48 by model-a with prompt {hash_a})" in refused.stderr
        assert "--redo changed" in refused.stderr
        prompt = tmp_path / "prompt.txt"
        prompt.write_text("다른 시스템 프롬프트입니다.")
        other_prompt = describe(cli, server, "--model", "model-a", "--prompt-file", str(prompt), ok=False)
        assert other_prompt.exit_code == 1 and "described otherwise" in other_prompt.stderr
        redone = json.loads(describe(cli, server, "--model", "model-b", "--redo", "changed", "--json").stdout)
        assert server.requests == 96 and redone["statuses"] == {"ok": 48}
    made_by = manifest(ingested, "described")["counts"]["made_by"]
    assert [{k: v for k, v in m.items() if k != "endpoint"} for m in made_by] == [
        {"model": "model-b", "prompt_hash": hash_a, "records": 48}
    ]
    assert made_by[0]["endpoint"].startswith("http://127.0.0.1:"), "where the answers came from"


def calls_psoriasis_atopy(body: dict) -> str:
    """A describer that, unless reminded, names 아토피 for every 건선 photo."""
    text = label_conditioned(body)
    if "'건선'" in user_text(body) and "이전 답의" not in user_text(body):
        return text.replace("<label>건선</label>", "<label>아토피</label>")
    return text


def test_label_disagreements_are_counted_reasked_dropped_and_kept_out_of_training(
    cli, ingested: Path, tmp_path: Path
) -> None:
    with FakeOpenAI(answer=calls_psoriasis_atopy) as server:
        describe(cli, server)
        report = cli.json("audit")
        assert report["disagreements"] == {"건선": 8} and report["mismatches"] == 8
        tiny = build(tmp_path / "tiny")
        with pytest.warns(UserWarning, match="datasets/fixed is missing: training on datasets/described"):
            dry = cli.json("train", "--dry-run", "--model", tiny, "--max-pixels", "12544")
        assert dry["rows"] + dry["dev_rows"] == 30 and dry["mismatched"] == 8, "6 train, 2 test: 아토피 for 건선"
        assert dry["dev_rows"] == 5, "one development photo of each class left (건선's are all mismatched)"
        with pytest.warns(UserWarning, match="datasets/fixed is missing"):
            kept = cli.json("train", "--dry-run", "--model", tiny, "--max-pixels", "12544", "--keep-mismatches")
        assert kept["rows"] + kept["dev_rows"] == 36 and kept["mismatched"] == 0
        dropped = cli.json("fix", "--drop-mismatches")
        assert dropped["dropped"] == 8 and dropped["audit"]["mismatches"] == 0
        asked = server.requests
        describe(cli, server, "--redo", "mismatch")
        assert server.requests == asked + 8, "exactly the disagreeing records are asked again"
        assert all("이 사진의 진단은 '건선'" in user_text(body) for body in server.bodies[asked:]), "label restated"
    assert cli.json("audit", "--stage", "described")["mismatches"] == 0
    restated = [r for r in journal(ingested) if r.get("restated")]
    assert len(restated) == 8 and {r["label"] for r in restated} == {"건선"}


def test_a_reingest_makes_later_stages_stale_and_they_refuse(cli, ingested: Path, tmp_path: Path) -> None:
    cli("describe", "--template")
    cli("fix")
    assert not any(s["stale"] for s in cli.json("status")["stages"])
    cli("ingest", ingested.parent / "extracted_data", "--force")  # the same tree again: nothing changed
    assert not any(s["stale"] for s in cli.json("status")["stages"]), "a no-op re-run stales nothing"
    write_tree(tmp_path / "other", {"train": 2, "test": 1}, size=24)
    cli("ingest", tmp_path / "other", "--force")
    stages = {s["name"]: s for s in cli.json("status")["stages"]}
    assert stages["described"]["rerun"] == ["skinvlm describe"]
    assert stages["fixed"]["rerun"] == ["skinvlm describe", "skinvlm fix"]
    assert "stale" in cli("status").stdout
    for command in (("audit",), ("fix",), ("publish", "me/x", "--dry-run"), ("train", "--model", str(tmp_path))):
        refused = cli(*command, ok=False)
        assert refused.exit_code == 1 and "made from data that has changed since" in refused.stderr, command
        assert "`skinvlm describe`" in error_line(refused.stderr)
    cli("describe", "--template")
    stages = {s["name"]: s for s in cli.json("status")["stages"]}
    assert not stages["described"]["stale"] and stages["fixed"]["rerun"] == ["skinvlm fix"]


def test_limit_is_a_stratified_sample_and_must_be_positive(cli, ingested: Path) -> None:
    from datasets import load_from_disk

    with FakeOpenAI() as server:
        describe(cli, server, "--limit", "12")
    rows = {
        rid: (label, view)
        for split in load_from_disk(str(ingested / "datasets" / "ingested")).values()
        for rid, label, view in zip(split["id"], split["label"], split["view"], strict=True)
    }
    strata = Counter(rows[r["id"]] for r in journal(ingested))
    assert len(strata) == 12 and set(strata.values()) == {1}, "each class and view once, not the first folder"
    for command in ("describe", "eval"):
        for bad in ("0", "-1"):
            result = cli(command, "--limit", bad, ok=False)
            assert result.exit_code == 2 and "--limit" in result.stderr, (command, bad)
