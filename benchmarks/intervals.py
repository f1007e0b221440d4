"""Benchmark: do eval's intervals and --compare's test hold against a known truth?

    python benchmarks/intervals.py [--replicates 1000] [--workers 2] [--quick] [--json FILE]

Synthetic predictions with a known truth, scored by skinvlm's own functions (`stats.intervals`, `stats.paired`,
`stats.detectable_difference`): 6 classes; 60, 240 or 1,200 photos; independent photos, or two photos a patient (two
views) whose right-or-wrong agree at a within-patient correlation of 0, 0.3 or 0.7 (with that probability both
photos share one draw); accuracy 0.83, 0.95 or 0.99 in every class, a wrong answer any other class; class counts
balanced or one class at 5%. That is 72 scenarios. The truth is the figure of the expected confusion matrix
(accuracy; macro F1 over the six classes). For each: the share of replicates whose 95% interval holds the truth
(coverage, Monte Carlo error about 0.7 points at 1,000 replicates) and the mean width, for skinvlm's interval
(accuracy, macro F1, and each class's F1: the worst-covered class) and a reference measured in the same run:
Wilson's on photos for accuracy (patients ignored) and a percentile bootstrap of whole patients within each class
for macro F1; and the spread of the macro F1 estimate itself (its middle 95% over the replicates), the width an
exact interval would have. Then --compare's one test: how often it says two equally good models differ (5% asked)
and how often it finds a true difference as large as the detectable difference it reports (80% asked), beside
McNemar's exact test on photos.

--quick runs four scenarios and the type-I check at 300 replicates (tests/test_intervals.py runs it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread a worker: the workers are the parallelism
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from skinvlm import stats  # noqa: E402

CLASSES = ["건선", "아토피", "여드름", "주사", "지루", "정상"]
K = len(CLASSES)
REFERENCE_RESAMPLES = 1000


@dataclass(frozen=True)
class Scenario:
    n: int
    accuracy: float
    balanced: bool
    pairs: bool  # two photos a patient (patients known to eval), else independent photos
    correlation: float  # within a patient: how alike its two photos' right-or-wrong are

    @property
    def name(self) -> str:
        structure = f"2/patient r={self.correlation}" if self.pairs else "independent"
        return f"n={self.n} acc={self.accuracy} {'balanced' if self.balanced else 'one class 5%'} {structure}"


def scenarios() -> list[Scenario]:
    structures = [(False, 0.0), (True, 0.0), (True, 0.3), (True, 0.7)]
    return [
        Scenario(n, acc, balanced, pairs, rho)
        for n, acc, balanced, (pairs, rho) in itertools.product(
            [60, 240, 1200], [0.83, 0.95, 0.99], [True, False], structures
        )
    ]


QUICK = [
    Scenario(240, 0.83, True, False, 0.0),
    Scenario(240, 0.95, False, True, 0.7),
    Scenario(60, 0.83, True, True, 0.3),
    Scenario(1200, 0.99, True, True, 0.7),
]


def design(s: Scenario) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's true class and patient: class counts fixed (a validation set drawn per class)."""
    unit = 2 if s.pairs else 1
    units = s.n // unit
    if s.balanced:
        per_class = [units // K] * K
    else:
        small = max(1, round(0.05 * units))
        per_class = [small] + [(units - small) // (K - 1)] * (K - 1)
        per_class[1] += units - sum(per_class)
    truth = np.repeat(np.arange(K), np.asarray(per_class) * unit)
    return truth, np.repeat(np.arange(units), unit)


def right_answers(rng: np.random.Generator, s: Scenario, accuracy: float, n: int) -> np.ndarray:
    """Which photos a model gets right: with probability `correlation` a patient's two photos share one draw."""
    own = rng.random(n) < accuracy
    if not s.pairs:
        return own
    shared = np.repeat(rng.random(n // 2) < accuracy, 2)
    together = np.repeat(rng.random(n // 2) < s.correlation, 2)
    return np.where(together, shared, own)


def answers(rng: np.random.Generator, truth: np.ndarray, right: np.ndarray) -> np.ndarray:
    wrong = (truth + rng.integers(1, K, len(truth))) % K
    return np.where(right, truth, wrong)


def true_scores(truth: np.ndarray, accuracy: float) -> dict[str, np.ndarray]:
    """Macro F1 and each class's F1 of the expected confusion matrix."""
    counts = np.bincount(truth, minlength=K).astype(float)
    expected = np.zeros((K + 1, K + 1))
    expected[:K, :K] = np.outer(counts, np.full(K, (1 - accuracy) / (K - 1)))
    expected[np.arange(K), np.arange(K)] = counts * accuracy
    found = stats.scores(expected[None], K)
    return {"macro_f1": found["macro_f1"][0], "f1": found["f1"][0]}


def bootstrap_macro_f1(t: np.ndarray, p: np.ndarray, patients: list[str] | None, seed: int) -> list[float]:
    """The reference: a percentile bootstrap of whole patients (photos without them) within each class."""
    units = stats.units_of(t, patients)
    weights = stats.resample_weights(t, units, REFERENCE_RESAMPLES, seed)
    return stats.interval(stats.scores(stats.weighted_confusions(t, p, K + 1, units, weights), K)["macro_f1"])


def covered(bounds: list[float], truth: float) -> bool:
    return bounds[0] - 1e-9 <= truth <= bounds[1] + 1e-9  # the bounds are rounded to 4 decimals


def run_scenario(args: tuple[Scenario, int, int]) -> dict[str, object]:
    s, replicates, seed = args
    truth, patient_numbers = design(s)
    labels = [CLASSES[c] for c in truth]
    patients = [str(p) for p in patient_numbers] if s.pairs else None
    true = true_scores(truth, s.accuracy)
    f1_truth = float(true["macro_f1"])
    rng = np.random.default_rng(seed)
    tally = {key: [0, 0.0] for key in ("accuracy", "accuracy_photos", "macro_f1", "macro_f1_bootstrap")}
    each_class = np.zeros((2, K))  # per class: intervals holding its true F1, summed widths
    estimates = np.zeros(replicates)  # macro F1 of each replicate: the spread an interval has to match
    for r in range(replicates):
        predicted_codes = answers(rng, truth, right_answers(rng, s, s.accuracy, len(truth)))
        predicted = [CLASSES[c] for c in predicted_codes]
        ours = stats.intervals(labels, predicted, CLASSES, patients=patients, seed=seed + r)
        hits = list(predicted_codes == truth)
        estimates[r] = stats.scores(stats.confusion(truth, predicted_codes, K + 1), K)["macro_f1"][0]
        found = {
            "accuracy": (ours["accuracy"], s.accuracy),
            "accuracy_photos": (stats.proportion_interval(hits), s.accuracy),
            "macro_f1": (ours["macro_f1"], f1_truth),
            "macro_f1_bootstrap": (bootstrap_macro_f1(truth, predicted_codes, patients, seed + r), f1_truth),
        }
        for key, (bounds, target) in found.items():
            tally[key][0] += covered(bounds, target)
            tally[key][1] += bounds[1] - bounds[0]
        for i, c in enumerate(CLASSES):
            each_class[:, i] += covered(ours["f1"][c], float(true["f1"][i])), ours["f1"][c][1] - ours["f1"][c][0]
    return {
        "scenario": s.name,
        **asdict(s),
        "true_macro_f1": round(f1_truth, 4),
        **{f"{key}_coverage": hits / replicates for key, (hits, _) in tally.items()},
        **{f"{key}_width": round(width / replicates, 4) for key, (_, width) in tally.items()},
        "class_f1_coverage": float(each_class[0].min() / replicates),  # the worst-covered class
        "macro_f1_spread": round(float(np.subtract(*np.percentile(estimates, [97.5, 2.5]))), 4),
        "class_f1_width": round(float(each_class[1].mean() / replicates), 4),
    }


def run_comparison(args: tuple[Scenario, bool, int, int]) -> dict[str, object]:
    """How often --compare's test says two runs differ: under no difference (type-I error) or at a true difference
    equal to the detectable difference eval reports (power), each model with its own patient difficulty."""
    s, different, replicates, seed = args
    truth, patient_numbers = design(s)
    labels = [CLASSES[c] for c in truth]
    patients = [str(p) for p in patient_numbers] if s.pairs else None
    rng = np.random.default_rng(seed)
    deff = 1 + s.correlation if s.pairs else 1.0  # Kish, two photos a patient
    gap = stats.detectable_difference([True] * round(s.accuracy * s.n) + [False] * round((1 - s.accuracy) * s.n), deff)
    second_accuracy = min(1.0, s.accuracy + gap) if different else s.accuracy
    ours = photos_exact = contradictions = 0
    from scipy.stats import binomtest

    for r in range(replicates):
        first = answers(rng, truth, right_answers(rng, s, s.accuracy, len(truth)))
        second = answers(rng, truth, right_answers(rng, s, second_accuracy, len(truth)))
        pair = stats.paired(labels, [CLASSES[c] for c in first], [CLASSES[c] for c in second], CLASSES,
                            resamples=200, seed=seed + r, patients=patients)  # fmt: skip
        test = pair["test"]
        said_differ = test["verdict"] != "no difference shown"
        ours += said_differ
        contradictions += said_differ != (test["p_value"] < 0.05)
        b, c = test["only_first_right"], test["only_second_right"]
        photos_exact += (b + c > 0) and binomtest(min(b, c), b + c, 0.5).pvalue < 0.05
    return {
        "scenario": s.name,
        "true_difference": round(second_accuracy - s.accuracy, 4),
        "says_different": ours / replicates,
        "mcnemar_exact_on_photos": photos_exact / replicates,
        "verdicts_against_their_p": contradictions,
    }


def comparisons(quick: bool) -> list[tuple[Scenario, bool]]:
    chosen = [Scenario(240, 0.83, True, False, 0.0), Scenario(240, 0.83, True, True, 0.7)]
    if not quick:
        chosen += [Scenario(1200, 0.83, True, False, 0.0), Scenario(1200, 0.83, True, True, 0.7),
                   Scenario(240, 0.95, False, True, 0.3)]  # fmt: skip
    return [(s, different) for s in chosen for different in ((False,) if quick else (False, True))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=None, help="per scenario (1000; 300 with --quick)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="four scenarios and the type-I check")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    replicates = args.replicates or (300 if args.quick else 1000)
    chosen = QUICK if args.quick else scenarios()
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        rows = list(pool.map(run_scenario, [(s, replicates, 1000 * i) for i, s in enumerate(chosen)]))
        compared = list(pool.map(run_comparison, [(s, d, replicates, 7919 * (i + 1))
                                                  for i, (s, d) in enumerate(comparisons(args.quick))]))  # fmt: skip
    print(f"{len(rows)} scenarios x {replicates} replicates; coverage (share of 95% intervals holding the truth) "
          f"and mean width, skinvlm against the reference")  # fmt: skip
    print(f"{'scenario':<40} {'accuracy':>15} {'Wilson photos':>15} {'macro F1':>15} {'bootstrap':>15} "
          f"{'class F1 (worst)':>16}")  # fmt: skip
    for row in rows:
        cells = [f"{row[f'{k}_coverage']:.3f} / {row[f'{k}_width']:.3f}"
                 for k in ("accuracy", "accuracy_photos", "macro_f1", "macro_f1_bootstrap", "class_f1")]  # fmt: skip
        print(f"{row['scenario']:<40} " + " ".join(f"{c:>15}" for c in cells))
    summary = summarise(rows)
    for line in summary["lines"]:
        print(line)
    print("--compare's one test: how often it says the runs differ")
    for row in compared:
        print(f"  {row['scenario']:<40} true difference {row['true_difference']:+.3f}: skinvlm "
              f"{row['says_different']:.3f}, McNemar exact on photos {row['mcnemar_exact_on_photos']:.3f}; "
              f"verdicts against their own p-value: {row['verdicts_against_their_p']}")  # fmt: skip
    print(f"{time.perf_counter() - started:.0f} s on {args.workers} workers")
    if args.json:
        args.json.write_text(json.dumps({"replicates": replicates, "scenarios": rows, "compare": compared,
                                         "summary": summary["figures"]}, ensure_ascii=False, indent=1))  # fmt: skip


def summarise(rows: list[dict[str, object]]) -> dict[str, object]:
    def lowest(key: str) -> float:
        return min(float(r[key]) for r in rows)  # type: ignore[arg-type]

    ratios = [float(r["macro_f1_width"]) / float(r["macro_f1_bootstrap_width"])  # type: ignore[arg-type]
              for r in rows if float(r["macro_f1_bootstrap_width"]) > 0]  # type: ignore[arg-type]  # fmt: skip
    fair = [float(r["macro_f1_width"]) / float(r["macro_f1_bootstrap_width"])  # type: ignore[arg-type]
            for r in rows if float(r["macro_f1_bootstrap_coverage"]) >= 0.93]  # type: ignore[arg-type]  # fmt: skip

    def over_spread(r: dict[str, object], key: str) -> float:
        return round(float(r[key]) / float(r["macro_f1_spread"]), 2)  # type: ignore[arg-type]

    # Where ours is over 1.3x a bootstrap that covers: both against the width an exact interval would have.
    wide = [{"scenario": r["scenario"], "skinvlm": over_spread(r, "macro_f1_width"),
             "bootstrap": over_spread(r, "macro_f1_bootstrap_width")}
            for r in rows if float(r["macro_f1_bootstrap_coverage"]) >= 0.93  # type: ignore[arg-type]
            and float(r["macro_f1_width"]) > 1.3 * float(r["macro_f1_bootstrap_width"])]  # type: ignore[arg-type]  # fmt: skip
    figures = {
        "accuracy_lowest_coverage": lowest("accuracy_coverage"),
        "macro_f1_lowest_coverage": lowest("macro_f1_coverage"),
        "bootstrap_lowest_coverage": lowest("macro_f1_bootstrap_coverage"),
        "class_f1_lowest_coverage": lowest("class_f1_coverage"),
        "width_ratio_where_bootstrap_covers": [round(min(fair), 2), round(max(fair), 2)] if fair else None,
        "width_ratio_all": [round(min(ratios), 2), round(max(ratios), 2)] if ratios else None,
        "over_1_3x_a_covering_bootstrap": wide,
    }
    lines = [
        f"lowest coverage: skinvlm accuracy {figures['accuracy_lowest_coverage']:.3f}, macro F1 "
        f"{figures['macro_f1_lowest_coverage']:.3f}, a class's F1 {figures['class_f1_lowest_coverage']:.3f}; the "
        f"patient bootstrap's macro F1 {figures['bootstrap_lowest_coverage']:.3f}",
        f"macro F1 width, skinvlm over the bootstrap: {figures['width_ratio_where_bootstrap_covers']} where the "
        f"bootstrap covers 93% or more; {figures['width_ratio_all']} over all",
        *(
            f"  {w['scenario']}: over 1.3x the bootstrap; against the estimate's own spread (the middle 95% of it "
            f"over the replicates) skinvlm {w['skinvlm']:.2f}x, the bootstrap {w['bootstrap']:.2f}x"
            for w in wide
        ),
    ]
    return {"figures": figures, "lines": lines}


if __name__ == "__main__":
    main()
