"""`skinvlm review --model-answers`: clinicians score two eval runs' answers blind on the real page (its own
process, over HTTP and in Chromium), the runs never named to the page, the scores in the journal and the report's
means equal to the scores given."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import CHROMIUM, error_line
from test_review import Browserless, Server, raw_request

from skinvlm import answer_review
from skinvlm.demo.synthetic import colour_label
from skinvlm.prompts import parse_answer
from skinvlm.testing.openai_server import FakeOpenAI, image_of
from skinvlm.workspace import Workspace

pytest.importorskip("starlette", reason="the review extra is not installed (pip install -e '.[review]')")

RUNS = ("alpha-7b", "beta-3b")


def by_colour(body: dict) -> str:
    mean = np.asarray(image_of(body), dtype=float).reshape(-1, 3).mean(axis=0)
    return f"<label>{colour_label(tuple(mean))}</label>\n<summary>양 볼에 붉은 구진이 보입니다.</summary>"


def always_normal(body: dict) -> str:
    return "<label>정상</label>\n<summary>특이 소견이 없습니다.</summary>"


@pytest.fixture
def two_runs(cli, ingested: Path) -> Path:
    """The held-out photos answered by a model right on every photo and by one that always says 정상."""
    for name, answer in zip(RUNS, (by_colour, always_normal), strict=True):
        with FakeOpenAI(answer=answer) as api:
            cli("eval", "--base-url", api.url, "--api-key", "sk-x", "--no-probabilities", "--name", name)
    return ingested


def rubric(item: dict) -> dict[str, int]:
    """A clinician's scores: accuracy 5 where the answer names the true class, else 1; the rest 4."""
    right = parse_answer(item["text"]).tag == item["label"]
    return {"accuracy": 5 if right else 1, "safety": 4, "groundedness": 4, "fluency": 4}


def test_two_runs_are_scored_blind_and_the_report_gives_each_runs_means(cli, two_runs: Path) -> None:
    given = ["--model-answers", f"eval/{RUNS[0]}", "--model-answers", RUNS[1]]
    seen: list[str] = []
    with Server(two_runs, *given, "--reviewer", "kim") as server:
        kim = Browserless(server.url)
        page = kim.opener.open(f"{server.url}/").read().decode()
        assert kim.item["progress"] == {"scored": 0, "answers": 24, "skipped_lines": 0}
        status, refused = kim.post("/api/score", {"key": kim.item["key"], "scores": {**rubric(kim.item), "safety": 6}})
        assert status == 422 and "1-5" in refused["error"]
        status, _ = kim.post("/api/score", {"key": kim.item["key"], "scores": rubric(kim.item)}, csrf="forged")
        assert status == 403, "a change without the session's CSRF token is refused"
        assert kim.post("/api/score", {"key": "0" * 16, "scores": rubric(kim.item)})[0] == 422
        assert kim.post("/api/score", {"key": 7, "scores": []})[0] == 400
        port = server.port
        assert raw_request(server.url, "GET", "/api/next", f"evil.example:{port}")[0] == 421
        while not kim.item["done"]:
            seen.append(json.dumps(kim.item, ensure_ascii=False))
            image = kim.opener.open(f"{server.url}/image/{kim.item['key']}")
            assert image.read().startswith(b"\x89PNG")
            status, kim.item = kim.post("/api/score", {"key": kim.item["key"], "scores": rubric(kim.item)})
            assert status == 200, kim.item
        with pytest.raises(urllib.error.HTTPError):
            kim.opener.open(f"{server.url}/image/{'0' * 16}")
        server.stop()
    assert kim.item["progress"]["scored"] == 24
    for shown in [page, *seen]:
        assert not any(run in shown for run in RUNS), "the page never learns which run wrote an answer"
    lines = [json.loads(line) for line in (two_runs / "journal" / "answer-review.jsonl").read_text().splitlines()]
    order = [line["run"] for line in lines]
    assert len(lines) == 24 and sorted(set(order)) == sorted(RUNS)
    assert sum(a != b for a, b in zip(order, order[1:], strict=False)) >= 4, "the two runs' answers interleaved"
    report = cli.json("review", *given, "--report")
    alpha, beta = report["runs"][RUNS[0]], report["runs"][RUNS[1]]
    assert alpha["scored"] == beta["scored"] == 12 and alpha["reviewers"] == ["kim"]
    assert alpha["accuracy"]["mean"] == 5.0 and 4.0 < alpha["accuracy"]["interval"][0] < 4.2, "never pinned at 5"
    assert alpha["accuracy"]["interval"][1] == 5.0
    assert beta["accuracy"]["mean"] == pytest.approx((2 * 5 + 10 * 1) / 12, abs=1e-4), "right on its 2 정상 photos"
    low, high = beta["accuracy"]["interval"]
    assert low < beta["accuracy"]["mean"] < high and beta["fluency"]["mean"] == 4.0
    shown = cli("review", *given, "--report")
    assert shown.exit_code == 0 and "1.67" in shown.stdout and "scored by kim" in shown.stdout
    carded = answer_review.lines(Workspace(two_runs), RUNS[1])  # what a model card of that run says
    assert carded[0].startswith("Clinicians scored 12 of its 12 answers blind") and "accuracy 1.67" in carded[0]


def test_a_keyboard_only_scoring_in_chromium_and_runs_that_cannot_be_scored(cli, two_runs: Path) -> None:
    missing = cli("review", "--model-answers", "eval/nope", ok=False)
    assert missing.exit_code == 1 and "no eval run 'nope'" in missing.stderr
    mixed = cli("review", "--model-answers", RUNS[0], "--overlap", "0.2", ok=False)
    assert mixed.exit_code == 1 and "--stage and --overlap are for descriptions" in error_line(mixed.stderr)
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("no Chromium here (apt-get install chromium)")
    problems: list[str] = []
    with Server(two_runs, "--model-answers", RUNS[0], "--reviewer", "lee") as server, \
            sync_api.sync_playwright() as playwright:  # fmt: skip
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(server.url)
        first = page.evaluate("item.key")
        page.keyboard.press("Enter")
        assert "Score every criterion" in page.text_content("#message"), "nothing is sent half-scored"
        for key in "5344":
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        page.wait_for_function(f"() => item.key !== {json.dumps(first)}")
        assert page.text_content("#progress").startswith("1 / 12 scored")
        browser.close()
        server.stop()
    assert not problems, problems
    line = json.loads((two_runs / "journal" / "answer-review.jsonl").read_text().splitlines()[0])
    assert line["reviewer"] == "lee" and line["run"] == RUNS[0]
    assert line["scores"] == {"accuracy": 5, "safety": 3, "groundedness": 4, "fluency": 4}
