"""The trust figures against their definitions: sklearn on the whole set, intervals around the estimate."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from skinvlm import stats

CLASSES = ["건선", "아토피", "여드름", "주사", "지루", "정상"]


def simulated(n: int, right: float, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    truth = [str(c) for c in rng.choice(CLASSES, n)]
    guesses = [*CLASSES, "unparsed"]
    return truth, [t if rng.random() < right else str(rng.choice(guesses)) for t in truth]


def test_resampled_scores_are_sklearns_on_the_whole_set_and_intervals_hold_the_estimate() -> None:
    truth, predicted = simulated(1200, 0.83, seed=1)
    t, p = stats.encode(truth, CLASSES), stats.encode(predicted, CLASSES)
    whole = stats.scores(stats.confusion(t, p, len(CLASSES) + 1), len(CLASSES))
    assert whole["accuracy"][0] == pytest.approx(accuracy_score(truth, predicted))
    assert whole["macro_f1"][0] == pytest.approx(f1_score(truth, predicted, labels=CLASSES, average="macro"))
    found = stats.intervals(truth, predicted, CLASSES)
    low, high = found["accuracy"]
    assert low < accuracy_score(truth, predicted) < high and 0.02 < high - low < 0.06
    assert found == stats.intervals(truth, predicted, CLASSES), "seeded: the same intervals every run"


def test_paired_comparison_counts_discordant_photos() -> None:
    truth, first = simulated(600, 0.80, seed=2)
    second = list(truth)  # right everywhere
    paired = stats.paired(truth, first, second, CLASSES)
    wrong = sum(a != t for a, t in zip(first, truth, strict=True))
    assert paired["test"]["only_second_right"] == wrong and paired["test"]["only_first_right"] == 0
    assert paired["test"]["p_value"] < 1e-6 and paired["test"]["verdict"] == "second better"
    low, high = paired["difference"]["accuracy"]["interval"]
    difference = paired["difference"]["accuracy"]["value"]
    assert difference == pytest.approx(wrong / 600, abs=1e-4) and low <= difference <= high


def test_probability_metrics_of_a_sure_and_right_model() -> None:
    truth = CLASSES * 10
    sure = [[1.0 if c == t else 0.0 for c in CLASSES] for t in truth]
    found = stats.probability_metrics(truth, sure, CLASSES)
    assert found["macro_auc"] == 1.0 and found["top2_accuracy"] == 1.0 and found["ece"] == 0.0
    hesitant = [[0.5 if c == t else 0.1 for c in CLASSES] for t in truth]
    assert stats.probability_metrics(truth, hesitant, CLASSES)["ece"] == pytest.approx(0.5)


def test_figures_are_written_one_way_everywhere() -> None:
    from skinvlm.numbers import p_value, rate, score, seconds

    assert (score(1.0), score(0.9623), score(None)) == ("1.000", "0.962", "-")
    assert (seconds(0.4668), seconds(1.53)) == ("0.47 s", "1.53 s")
    assert (p_value(0.0), p_value(3e-7), p_value(0.125)) == ("< 0.0001", "< 0.0001", "0.1250")
    assert rate(32.456) == "32.5 images/s"


def test_intervals_move_off_an_all_right_sample_and_off_a_one_class_model() -> None:
    truth = CLASSES * 4  # 24 photos, 4 a class
    right = stats.intervals(truth, list(truth), CLASSES)
    low, high = right["accuracy"]
    assert high == 1.0 and 0.82 < low < 0.9, "24 of 24 right: Wilson's 0.862-1.000, never 1.000-1.000"
    assert right["macro_f1"][1] == 1.0 and right["macro_f1"][0] < 0.95
    assert all(f1[0] < 1.0 for f1 in right["f1"].values())
    wrong = stats.intervals(truth, ["unparsed"] * 24, CLASSES)
    assert wrong["accuracy"][0] == 0.0 and wrong["accuracy"][1] > 0.1, "all wrong: an upper bound above 0"
    assert wrong["macro_f1"][1] > 0.0
    one_class = stats.intervals(truth, ["건선"] * 24, CLASSES)  # a 30-step demo model that answers one class
    assert one_class["accuracy"][0] < 1 / 6 < one_class["accuracy"][1]
    low, high = one_class["macro_f1"]
    assert high - low > 0.05, f"macro F1 must vary: {low}-{high}"
    assert one_class == stats.intervals(truth, ["건선"] * 24, CLASSES), "seeded"
    assert stats.proportion_interval([True] * 24) == [0.862, 1.0]


def test_selection_keeps_the_later_of_equal_scores_and_the_development_rows_are_whole_patients() -> None:
    from skinvlm.selection import better
    from skinvlm.train.rows import development_indices

    first, later = {"step": 100, "macro_f1": 1.0, "loss": 1.54}, {"step": 300, "macro_f1": 1.0, "loss": 1.35}
    assert better(later, first, "macro_f1"), "a tie goes to the later evaluation with the lower loss"
    assert not better({"step": 400, "macro_f1": 1.0, "loss": 1.6}, later, "macro_f1")
    assert not better({"step": 500, "macro_f1": 0.9, "loss": 0.1}, later, "macro_f1")
    labels = [c for c in CLASSES for _ in range(20)]
    patients = [f"{label}-{i // 2}" for label in CLASSES for i in range(20)]  # two photos a patient
    dev = development_indices(labels, patients, 0.1, seed=3)
    assert dev == development_indices(labels, patients, 0.1, seed=3), "seeded"
    assert {labels[i] for i in dev} == set(CLASSES) and len(dev) == 2 * len(CLASSES), "each class its share"
    chosen = {patients[i] for i in dev}
    assert not chosen & {patients[i] for i in range(len(labels)) if i not in dev}, "whole patients on one side"


def test_resampled_auc_is_sklearns_with_sample_weights_ties_included() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    sure = np.round(rng.random(300), 2)  # rounded: many ties
    positive = rng.random(300) < 0.3 + 0.4 * sure
    weights = rng.integers(0, 3, (4, 300)).astype(float)
    expected = [roc_auc_score(positive, sure, sample_weight=w) for w in weights]
    assert stats.weighted_auc(sure, positive, weights) == pytest.approx(expected)


def test_ece_of_a_calibrated_model_lies_within_what_chance_gives_on_few_photos() -> None:
    rng = np.random.default_rng(4)
    truth = [CLASSES[i % 6] for i in range(60)]
    table = []
    for label in truth:  # says 80% for its answer, and is right 80% of the time: calibrated by construction
        answer = CLASSES.index(label) if rng.random() < 0.8 else (CLASSES.index(label) + 1) % 6
        table.append([0.8 if i == answer else 0.04 for i in range(6)])
    found = stats.probability_metrics(truth, table, CLASSES, patients=[f"p{i // 2}" for i in range(60)])
    low, high = found["ece_if_calibrated"]
    assert low <= found["ece"] <= high and high > 0.05, "on 60 photos chance alone gives a calibrated model ECE"
    assert found["ece_interval"][0] <= found["ece"] <= found["ece_interval"][1]
    low, high = found["macro_auc_interval"]
    assert low <= found["macro_auc"] <= high < 1.0
