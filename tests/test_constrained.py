"""Better labels from the same model: `eval --constrained` (a server's structured outputs, a model folder's class
scores) and the referral threshold, against the local OpenAI-protocol server and the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST, error_line
from test_eval_serve import run_eval

from skinvlm.demo.synthetic import colour_label
from skinvlm.testing.openai_server import FakeOpenAI, mean_colour

CLASSES = ("건선", "아토피", "여드름", "주사", "지루", "정상")


def off_format(body: dict) -> str:
    """A model that knows the class but names it in words of its own (`건선성 피부질환`): unparsed when free."""
    label = colour_label(mean_colour(body))
    return f"<label>{label}성 피부질환</label>\n<summary>색으로 본 소견입니다.</summary>"


def knows_the_class(label: str) -> dict[str, float]:
    return {c: 0.9 if label.startswith(c) else 0.02 for c in CLASSES}


def test_constrained_server_answers_are_never_unparsed_and_a_server_must_obey(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=off_format, label_probabilities=knows_the_class) as server:
        free = run_eval(cli, server, "--name", "free")
        constrained = run_eval(cli, server, "--name", "constrained", "--constrained")
        sent = server.bodies[-1]["structured_outputs"]["regex"]
    assert free["unparsed"] == 12 and free["accuracy"] == 0.0
    assert constrained["unparsed"] == 0 and constrained["accuracy"] == 1.0 and constrained["constrained"] is True
    assert sent.startswith("<label>(건선|아토피|여드름|주사|지루|정상)</label>")
    assert constrained["key"] != free["key"], "a constrained answer is not a free one"
    for behaviour, said in (("refuses", "refused structured outputs"), ("ignores", "ignored structured outputs")):
        with FakeOpenAI(answer=off_format, structured=behaviour) as server:
            stopped = cli("eval", "--base-url", server.url, "--api-key", "sk-x", "--backoff", "0.01", "--name",
                          behaviour, "--constrained", "--concurrency", "1", ok=False)  # fmt: skip
        assert stopped.exit_code == 1 and said in error_line(stopped.stderr), stopped.stderr
        assert "nothing falls back" in stopped.stderr


def test_the_referral_threshold_is_chosen_on_one_half_and_measured_on_the_other(cli, ingested: Path) -> None:
    def sure_unless_rosacea(label: str) -> dict[str, float]:
        sure = 0.4 if label.startswith("주사") else 0.95
        return {c: sure if label.startswith(c) else (1 - sure) / 5 for c in CLASSES}

    def wrong_on_rosacea(body: dict) -> str:
        answer = off_format(body).replace("성 피부질환", "")
        return answer.replace("<label>주사</label>", "<label>지루</label>") if "주사" in answer else answer

    def probabilities(label: str) -> dict[str, float]:  # the rosacea photos, answered 지루, are the unsure ones
        return (
            sure_unless_rosacea("주사" if label == "지루" else label) if label == "지루" else sure_unless_rosacea(label)
        )

    with FakeOpenAI(answer=wrong_on_rosacea, label_probabilities=probabilities) as server:
        result = run_eval(cli, server, "--name", "refer", "--target-accuracy", "0.9")
    chosen = result["selective"]
    assert chosen["target_accuracy"] == 0.9 and chosen["chosen_on"] + chosen["measured_on"] == 12
    assert chosen["threshold"] is not None and chosen["accuracy"] >= 0.9, chosen
    low, high = chosen["coverage_interval"]
    assert low <= chosen["coverage"] <= high and chosen["coverage"] < 1.0, "the unsure photos are referred"
    assert chosen["curve"][-1]["coverage"] == 1.0 and 0 <= chosen["aurc"] <= 1
    report = (ingested / "eval" / "refer" / "report.md").read_text(encoding="utf-8")
    assert "Referral for 90% accuracy" in report


@pytest.mark.slow
def test_an_undertrained_model_names_more_classes_constrained(cli, described: Path, tiny: Path) -> None:
    cli("train", "--model", tiny, "--max-steps", "6", *FAST)
    cli("merge")
    folder = described / "models" / "merged"
    free = cli.json("eval", "--model-dir", folder, "--name", "free", "--max-tokens", "24")
    constrained = cli.json(
        "eval", "--model-dir", folder, "--name", "constrained", "--constrained", "--max-tokens", "24"
    )
    assert free["unparsed"] > free["n"] // 2, "undertrained: its free answers are mostly out of format"
    assert constrained["unparsed"] == 0 and constrained["accuracy"] >= free["accuracy"]
    assert constrained["accuracy"] > free["accuracy"] or free["accuracy"] == 1.0


def test_too_few_photos_for_a_referral_threshold_print_the_figures_and_say_why(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=off_format, label_probabilities=knows_the_class) as server:
        shown = cli("eval", "--base-url", server.url, "--api-key", "sk-x", "--name", "six", "--limit", "6",
                    "--constrained")  # fmt: skip
    assert "accuracy 1.0000" in shown.stdout, shown.stdout
    assert "too few photos with class probabilities (6)" in shown.stdout
    report = (ingested / "eval" / "six" / "report.md").read_text(encoding="utf-8")
    assert "Referral: too few photos" in report
    assert "No referral threshold: too few photos" in (ingested / "eval" / "six" / "report.html").read_text("utf-8")
