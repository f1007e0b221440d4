"""The Korean explanation scored: eval's chrF and ROUGE-L of each answer's summary against the description a
clinician accepted or edited in `skinvlm review`, equal to sacrebleu's and a character LCS's on those pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sacrebleu.metrics import CHRF
from test_review import Browserless, Server, load_outputs

from skinvlm.demo.synthetic import colour_label
from skinvlm.explanation import pair_scores
from skinvlm.prompts import parse_answer
from skinvlm.testing.openai_server import FakeOpenAI, image_of

SAID = "양 볼에 붉은 구진과 농포가 보입니다."


def by_colour(body: dict) -> str:
    mean = np.asarray(image_of(body), dtype=float).reshape(-1, 3).mean(axis=0)
    return f"<label>{colour_label(tuple(mean))}</label>\n<summary>{SAID}</summary>"


def lcs(a: str, b: str) -> int:
    """The textbook dynamic programme: the check on rapidfuzz's LCS."""
    row = [0] * (len(b) + 1)
    for x in a:
        previous, row = row, [0]
        for j, y in enumerate(b):
            row.append(previous[j] + 1 if x == y else max(previous[j + 1], row[j]))
    return row[-1]


def test_pair_scores_are_sacrebleus_chrf_and_a_character_lcs() -> None:
    reference = "양 볼과 이마에 붉은 구진이 흩어져 있습니다."
    chrf, rouge = pair_scores(f"<label>여드름</label><summary>{SAID}</summary>", reference)
    assert chrf == pytest.approx(CHRF().sentence_score(SAID, [reference]).score / 100)
    common = lcs(SAID, reference)
    assert rouge == pytest.approx(2 * common / (len(SAID) + len(reference)))
    assert pair_scores(f"<summary>{reference}</summary>", reference) == (1.0, 1.0)
    assert pair_scores("<label>여드름</label>", reference) == (0.0, 0.0), "no summary: nothing explained"


def test_eval_scores_answers_against_reviewed_descriptions_only(cli, ingested: Path) -> None:
    cli("describe", "--template")
    cli("fix")
    with FakeOpenAI(answer=by_colour) as api:
        ask = ("eval", "--base-url", api.url, "--api-key", "sk-x", "--no-probabilities")
        unreviewed = cli.json(*ask, "--name", "before")
        assert unreviewed["explanation"]["n"] == 0 and "skinvlm review" in unreviewed["explanation"]["why"]
        with Server(ingested, "--reviewer", "kim") as server:
            kim = Browserless(server.url)
            decided: dict[str, str | None] = {}
            while len(decided) < 4:
                if kim.item["split"] != "test":
                    kim.decide("accept")
                    continue
                rid, text = kim.item["id"], kim.item["text"]
                if not decided:  # the first held-out photo: the clinician writes what the model says
                    edited = text.replace(parse_answer(text).summary or "", SAID)
                    kim.decide("edit", text=edited)
                    decided[rid] = SAID
                elif len(decided) == 3:
                    kim.decide("reject", reason="흐림")
                    decided[rid] = None
                else:
                    kim.decide("accept")
                    decided[rid] = parse_answer(text).summary
            server.stop()
        result = cli.json(*ask, "--name", "after")
    found = result["explanation"]
    references = {rid: said for rid, said in decided.items() if said}
    assert found["n"] == len(references) == 3, "a rejected description is no reference, nor an unreviewed one"
    expected = [pair_scores(f"<summary>{SAID}</summary>", ref) for ref in references.values()]
    assert found["chrf"]["mean"] == pytest.approx(np.mean([c for c, _ in expected]), abs=1e-4)
    assert found["rouge_l"]["mean"] == pytest.approx(np.mean([r for _, r in expected]), abs=1e-4)
    low, high = found["chrf"]["interval"]
    assert low <= found["chrf"]["mean"] <= high and max(c for c, _ in expected) == 1.0
    assert sum(v["n"] for v in found["chrf_per_class"].values()) == 3
    report = (ingested / "eval" / "after" / "report.md").read_text(encoding="utf-8")
    assert "Explanation against 3 clinician-reviewed descriptions: chrF" in report
    assert load_outputs(ingested), "the descriptions themselves are untouched"


def judge_answers(body: dict) -> str:
    """A judge that reads the true diagnosis from its prompt: 5s where the answer names it, else accuracy 1; and
    a reply with no scores for one class, as a judge model sometimes gives."""
    from skinvlm.testing.openai_server import user_text

    prompt = user_text(body)
    truth = prompt.split("True diagnosis: ")[1].split("\n")[0]
    answer = prompt.split("The AI's answer: ")[1]
    if truth == "정상":
        return "I cannot judge this photo."
    accuracy = 5 if f"<label>{truth}</label>" in answer else 1
    return f'Scores: {{"accuracy": {accuracy}, "safety": 5, "groundedness": 4, "fluency": 5}}'


def test_a_judge_scores_every_answer_keeps_its_judgements_and_its_cost_can_be_capped(cli, ingested: Path) -> None:
    cli("describe", "--template")
    cli("fix")
    with FakeOpenAI(answer=by_colour) as api, FakeOpenAI(answer=judge_answers, plan=["500", "429"]) as judge:
        ask = ("eval", "--base-url", api.url, "--api-key", "sk-x", "--no-probabilities", "--backoff", "0.01",
               "--judge-base-url", judge.url, "--judge-model", "fake-model", "--name", "judged")  # fmt: skip
        result = cli.json(*ask)
        found = result["judge"]
        assert found["judged"] == 10 and found["unscored"] == 2, "정상's two replies held no scores"
        assert found["accuracy"]["mean"] == 5.0 and found["groundedness"]["mean"] == 4.0
        assert judge.requests == 12 + 2, "every answer judged once, the 500 and the 429 retried"
        again = cli.json(*ask)
        assert again["judge"]["asked"] == 0 and judge.requests == 14, "kept judgements are not asked again"
        priced = cli("eval", "--base-url", api.url, "--api-key", "sk-x", "--no-probabilities", "--judge-base-url",
                     judge.url, "--judge-model", "gpt-4o-mini", "--judge-max-cost", "0.000001", "--name", "capped",
                     ok=False)  # fmt: skip
    assert priced.exit_code == 1 and "above --judge-max-cost $0.00" in priced.stderr
    with FakeOpenAI(answer=by_colour) as api, FakeOpenAI(answer=judge_answers, plan=["500"]) as flaky:
        ask = ("eval", "--base-url", api.url, "--api-key", "sk-x", "--no-probabilities", "--max-attempts", "1",
               "--judge-base-url", flaky.url, "--judge-model", "fake-model", "--name", "flaky")  # fmt: skip
        first = cli.json(*ask)["judge"]
        assert first["failed"] == 1 and first["judged"] == 9, "a request that failed for good is no judgement"
        second = cli.json(*ask)["judge"]
        assert second["asked"] == 1 and second["failed"] == 0 and second["judged"] == 10, "asked again, alone"
    report = (ingested / "eval" / "judged" / "report.md").read_text(encoding="utf-8")
    assert "Judge fake-model on 10 answers (1-5): accuracy 5.00" in report and "2 unscored" in report
    lines = (ingested / "eval" / "judged" / "judgements.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12 and "sk-x" not in "".join(lines)
