"""The Korean explanation scored: eval's chrF and ROUGE-L of each answer's summary against the description a
clinician accepted or edited in `skinvlm review`, equal to sacrebleu's and a character LCS's on those pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sacrebleu.metrics import CHRF
from test_review import Browserless, Server, load_outputs

from skinvlm.demo.openai_server import FakeOpenAI, image_of
from skinvlm.demo.synthetic import colour_label
from skinvlm.explanation import pair_scores
from skinvlm.prompts import parse_answer

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
