"""How much to trust an eval figure: intervals, paired comparison of two runs, and what class probabilities add
(ROC-AUC, calibration, top-2).

Every method here was chosen by `benchmarks/intervals.py`, a simulation with a known truth (6 classes; 60, 240
and 1,200 photos; independent or two per patient at within-patient correlation 0-0.7; accuracy 0.83-0.99;
balanced or one class at 5%), and is checked against it by tests/test_intervals.py. A share (accuracy, a view's
accuracy, a referral's coverage) gets Wilson's score interval over the effective sample size: closed form, and
unlike a percentile bootstrap it moves off an all-right sample. F1 (per class and macro) gets the interval of a
Dirichlet posterior of each true class's row of the confusion matrix, its counts divided by the design effect:
the prior puts half a pseudo-photo on the right answer and a tenth spread over the wrong ones (an even prior of
one pseudo-photo a row added errors a good model never made, and its interval lay wholly below the truth in up
to half the simulated sets; a patient-cluster percentile bootstrap collapses to a point on an all-right set and
covered 32-44% at 99% accuracy on 60 photos); macro F1's reaches at least as far as accuracy's. Per-view and
referral figures count their own patients. The paired comparison of two runs is one exact test, a sign-flip
test over patients (over photos without them: mid-p McNemar), and the verdict says what that test says. All
draws are seeded: the same figures on every run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
SEED = 20261123
CALIBRATION_BINS = 10


def encode(labels: list[str], classes: list[str]) -> np.ndarray:
    """Class indices; anything that is not a class (unparsed) is len(classes)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(label, len(classes)) for label in labels], dtype=np.int64)


def confusion(truth: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """The (1, k, k) confusion matrix of the whole set (a stack of one, as `scores` takes)."""
    return np.bincount(truth * k + predicted, minlength=k * k).reshape(1, k, k)


def weighted_confusions(
    truth: np.ndarray, predicted: np.ndarray, k: int, units: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """(resamples, k, k) confusion matrices, each unit's (patient's) photos counted as often as its column of
    `weights` (resamples, units) says."""
    cells = np.zeros((weights.shape[1], k * k))
    np.add.at(cells, (units, truth * k + predicted), 1)
    return (weights @ cells).reshape(len(weights), k, k)


def units_of(truth: np.ndarray, patients: list[str] | None) -> np.ndarray:
    """Each photo's resampling unit, numbered from 0: its patient, or itself when patients are not known."""
    if patients is None:
        return np.arange(len(truth))
    return np.unique(np.asarray(patients), return_inverse=True)[1].reshape(-1)


def resample_weights(
    truth: np.ndarray, units: np.ndarray, resamples: int, seed: int, within_class: bool = True
) -> np.ndarray:
    """(resamples, units) counts of each unit in a bootstrap of whole units (patients, or photos), with
    replacement: within each true class as many as it has (a validation set is drawn per class, so its class
    counts stay fixed; a unit's class is that of its first photo), or over all units at once, where a class that
    every run gets wrong would otherwise never vary (a paired difference pinned at its estimate)."""
    first = np.unique(units, return_index=True)[1]
    strata = truth[first] if within_class else np.zeros(len(first), dtype=int)
    rng = np.random.default_rng(seed)
    picks = np.concatenate(
        [
            members[rng.integers(0, len(members), size=(resamples, len(members)))]
            for members in (np.flatnonzero(strata == c) for c in np.unique(strata))
        ],
        axis=1,
    )
    codes = picks + (np.arange(resamples) * len(first))[:, None]
    return np.bincount(codes.ravel(), minlength=resamples * len(first)).reshape(resamples, len(first)).astype(float)


def scores(matrices: np.ndarray, n_classes: int) -> dict[str, np.ndarray]:
    """Accuracy, per-class F1 and macro F1 of each matrix, as sklearn computes them with zero_division=0; macro F1
    over the classes that have photos in it (the unparsed column counting as a miss): a class an external set
    lacks is no class the model failed on (one with 2 of 6 classes, all right, scored 0.33 when it counted)."""
    tp = np.diagonal(matrices, axis1=1, axis2=2)[:, :n_classes]
    predicted = matrices.sum(axis=1)[:, :n_classes]
    actual = matrices.sum(axis=2)[:, :n_classes]
    denominator = predicted + actual
    f1 = np.divide(2 * tp, denominator, out=np.zeros(tp.shape), where=denominator > 0)
    n = matrices.sum(axis=(1, 2))
    present = actual > 0
    counted = present.sum(axis=1)
    macro = np.divide((f1 * present).sum(axis=1), counted, out=np.zeros(len(f1)), where=counted > 0)
    return {"accuracy": tp.sum(axis=1) / n, "macro_f1": macro, "f1": f1}


def interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [round(float(low), 4), round(float(high), 4)]


def proportion_interval(hits: list[bool], level: float = LEVEL, deff: float = 1.0) -> list[float]:
    """Wilson's score interval of a share: `hits` right of len(hits), counted as len(hits) / deff independent
    photos when photos come in patients (Kish's effective sample size)."""
    return wilson(float(sum(bool(h) for h in hits)), len(hits), level, deff)


def wilson(right: float, n: float, level: float = LEVEL, deff: float = 1.0) -> list[float]:
    from scipy.stats import norm

    n, right = n / deff, right / deff
    if n == 0:
        return [0.0, 1.0]
    z = float(norm.ppf(1 - (1 - level) / 2))
    share, spread = right / n, z * z / n
    centre = (share + spread / 2) / (1 + spread)
    half = z * np.sqrt(share * (1 - share) / n + spread / (4 * n)) / (1 + spread)
    return [round(float(max(0.0, centre - half)), 4), round(float(min(1.0, centre + half)), 4)]


INTERVAL_METHOD = (
    "Wilson score for shares; F1 from a Dirichlet posterior of each class's confusion row (prior 0.5 right, 0.1 "
    "wrong), macro F1's at least as wide as accuracy's, each F1 at least as wide as Wilson's for it as a share"
)
PRIOR_RIGHT = 0.5  # pseudo-photos on a row's right answer: Jeffreys' half, as for a share
PRIOR_WRONG = 0.1  # pseudo-photos spread over a row's wrong answers: a larger one biased good models low


def posterior_confusions(
    truth: np.ndarray, predicted: np.ndarray, k: int, draws: int, seed: int, deff: float = 1.0
) -> np.ndarray:
    """(draws, k, k) confusion matrices in expected counts: each true class's row drawn from the Dirichlet
    posterior of its predictions (observed counts / deff plus the prior), times the class's photo count."""
    rng = np.random.default_rng(seed)
    observed = confusion(truth, predicted, k)[0].astype(float)
    drawn = np.zeros((draws, k, k))
    for row in np.unique(truth):
        prior = np.full(k, PRIOR_WRONG / (k - 1))
        prior[row] = PRIOR_RIGHT
        drawn[:, row, :] = rng.dirichlet(observed[row] / deff + prior, size=draws) * observed[row].sum()
    return drawn


def intervals(
    truth: list[str],
    predicted: list[str],
    classes: list[str],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    patients: list[str] | None = None,
) -> dict[str, Any]:
    """95% intervals: Wilson's for accuracy, the Dirichlet posterior's for macro F1 and each class's F1. With
    `patients` (one per photo), each counts len / design effect photos: a patient's photos are not independent."""
    t, p, k = encode(truth, classes), encode(predicted, classes), len(classes) + 1
    deff = design_effect(list(t == p), patients) if patients else 1.0
    drawn = scores(posterior_confusions(t, p, k, resamples, seed, deff), len(classes))
    observed = confusion(t, p, k)
    whole = scores(observed, len(classes))
    accuracy = proportion_interval(list(t == p), deff=deff)
    return {
        "resamples": resamples,
        "level": LEVEL,
        "method": INTERVAL_METHOD + (f"; by patient: each counted as n / {deff:.2f} photos" if patients else ""),
        "ci_method": "patient" if patients else "photo",
        "patients": len(set(patients)) if patients else None,
        "design_effect": round(deff, 3),
        "minimal_detectable_difference": detectable_difference(list(t == p), deff),
        "accuracy": accuracy,
        "macro_f1": at_least_as_wide(
            holding(interval(drawn["macro_f1"]), whole["macro_f1"][0]),
            whole["macro_f1"][0],
            whole["accuracy"][0],
            accuracy,
        ),
        "f1": {c: class_f1_interval(drawn["f1"][:, i], observed[0], i, deff) for i, c in enumerate(classes)},
    }


def class_f1_interval(drawn: np.ndarray, observed: np.ndarray, row: int, deff: float) -> list[float]:
    """A class's F1 from the posterior, reaching at least as far as Wilson's interval for F1 read as the share it
    is, 2TP of 2TP + FP + FN: the posterior alone covered a class's true F1 only 90% of the time where a class had
    few errors (benchmarks/intervals.py; 40 photos a class at accuracy 0.95, 200 at 0.99)."""
    tp = observed[row, row]
    trials = observed[row, :].sum() + observed[:, row].sum()
    estimate = float(2 * tp / trials) if trials else 0.0
    bounds = holding(interval(drawn), estimate)
    if not trials:
        return bounds  # a class neither in the set nor ever answered: no share to read
    return at_least_as_wide(bounds, estimate, estimate, wilson(2 * tp, trials, deff=deff))


def at_least_as_wide(bounds: list[float], estimate: float, share: float, share_bounds: list[float]) -> list[float]:
    """`bounds` reaching at least as far from `estimate`, each side, as Wilson's `share_bounds` reach from `share`.
    Wilson's interval is what keeps a few-error set off its edge: the posterior alone gave 60 of 60 right a macro
    F1 lower bound of 0.97 and missed a true 0.95 every time. Macro F1 is no surer than accuracy (the two are one
    figure when classes are balanced and errors spread evenly)."""
    low = min(bounds[0], estimate - (share - share_bounds[0]))
    high = max(bounds[1], min(1.0, estimate + (share_bounds[1] - share)))
    return [round(max(0.0, float(low)), 4), round(float(high), 4)]


def design_effect(right: list[bool], patients: list[str]) -> float:
    """Variance of accuracy when patients are sampled (a ratio estimator over clusters) over its variance when
    photos are, at least 1: how many photos one independent photo is worth here. 1 when every photo is its own
    patient. When every photo is right (or every one wrong) nothing tells how alike a patient's photos are, so the
    worst case: a patient counts once, the mean photos per patient (a patient-alike set all right 30 patients of
    60 photos, counted as 60 independent ones, missed the truth 14% of the time)."""
    hits: dict[str, list[int]] = {}
    for patient, hit in zip(patients, right, strict=True):
        hits.setdefault(patient, []).append(int(hit))
    n, k = len(right), len(hits)
    share = sum(right) / n if n else 0.0
    if k < 2 or k == n:
        return 1.0
    if share in (0.0, 1.0):
        return n / k
    spread = sum((sum(h) - share * len(h)) ** 2 for h in hits.values())
    clustered = k / (k - 1) * spread / n**2
    return max(1.0, clustered / (share * (1 - share) / n))


def detectable_difference(right: list[bool], deff: float, power: float = 0.8) -> float:
    """The smallest difference in accuracy between two models that a comparison on these photos detects with
    `power` at the 5% level (two proportions near this accuracy, n / deff photos each; a paired comparison of
    models that err alike detects somewhat less). A difference below it may be noise."""
    from scipy.stats import norm

    n = len(right) / deff
    share = (sum(right) + 1) / (len(right) + 2)  # off 0 and 1, where the variance would vanish
    z = float(norm.ppf(1 - (1 - LEVEL) / 2) + norm.ppf(power))
    return round(z * float(np.sqrt(2 * share * (1 - share) / n)), 4) if n else 1.0


def holding(bounds: list[float], observed: float) -> list[float]:
    return [min(bounds[0], round(float(observed), 4)), max(bounds[1], round(float(observed), 4))]


def paired(
    truth: list[str],
    first: list[str],
    second: list[str],
    classes: list[str],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    patients: list[str] | None = None,
) -> dict[str, Any]:
    """The second run minus the first on the same photos: the differences with paired bootstrap intervals (both
    runs resampled by the same draws of photos, or of whole patients when `patients` are known), and the one test
    that decides whether they differ (`sign_flip_test`)."""
    t, a, b = encode(truth, classes), encode(first, classes), encode(second, classes)
    k = len(classes) + 1
    units = units_of(t, patients)
    weights = resample_weights(t, units, resamples, seed, within_class=False)
    drawn_a = scores(weighted_confusions(t, a, k, units, weights), len(classes))
    drawn_b = scores(weighted_confusions(t, b, k, units, weights), len(classes))
    whole_a, whole_b = scores(confusion(t, a, k), len(classes)), scores(confusion(t, b, k), len(classes))
    right_a, right_b = a == t, b == t
    return {
        "n": len(t),
        "resampled": "patients" if patients else "photos",
        "difference": {
            metric: {
                "value": round(float(whole_b[metric][0] - whole_a[metric][0]), 4),
                "interval": interval(drawn_b[metric] - drawn_a[metric]),
            }
            for metric in ("accuracy", "macro_f1")
        },
        "test": {
            "both_right": int((right_a & right_b).sum()),
            "only_first_right": int((right_a & ~right_b).sum()),
            "only_second_right": int((~right_a & right_b).sum()),
            "both_wrong": int((~right_a & ~right_b).sum()),
            **sign_flip_test(right_a, right_b, units),
        },
    }


TEST_METHODS = {
    "photo": "mid-p McNemar test on the photos one run got right",
    "patient": "mid-p sign-flip test over patients (McNemar's, with a patient's photos kept together)",
}


def sign_flip_test(first_right: np.ndarray, second_right: np.ndarray, units: np.ndarray) -> dict[str, Any]:
    """Whether two runs differ in accuracy: each unit's (patient's, or photo's) photos right only by the second run
    minus those right only by the first, d; under no difference either run is as likely to be the one right on a
    unit, so the sum of d is that of d with each sign flipped at random. Its exact two-sided mid-p value (ties
    count half: Fagerland et al. 2013; the exact test held 2.7-5.6% where 5% was asked); with one photo a unit
    this is mid-p McNemar. The verdict is this p-value's, and nothing else decides it."""
    gained = second_right.astype(int) - first_right.astype(int)
    d = np.bincount(units, weights=gained).astype(int)
    d = np.abs(d[d != 0])
    reach = int(d.sum())
    odds = np.zeros(2 * reach + 1)
    odds[reach] = 1.0
    for step in d:  # the sum's distribution, one unit's sign at a time
        odds = 0.5 * (np.roll(odds, step) + np.roll(odds, -step))
    observed = int(gained.sum())
    sums = np.abs(np.arange(-reach, reach + 1))
    p_value = float(odds[sums > abs(observed)].sum() + 0.5 * odds[sums == abs(observed)].sum()) if reach else 1.0
    one_photo_each = len(np.unique(units)) == len(units)
    return {
        "method": TEST_METHODS["photo" if one_photo_each else "patient"],
        "p_value": round(min(1.0, p_value), 6),
        "verdict": verdict(p_value, observed),
    }


def verdict(p_value: float, difference: int) -> str:
    if p_value >= 1 - LEVEL:
        return "no difference shown"
    return "second better" if difference > 0 else "first better"


def probability_metrics(
    truth: list[str],
    probabilities: list[list[float]],
    classes: list[str],
    patients: list[str] | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """One-vs-rest ROC-AUC per class and their mean, top-2 accuracy, and expected calibration error of the top
    class with the reliability diagram's bins, its bootstrap interval (of patients when known) and what a
    perfectly calibrated model with these confidences would score on as many photos: ECE is never below 0, and on
    few photos it is large by chance alone (0.12 on 60), so a figure within that is no sign of miscalibration."""
    from sklearn.metrics import roc_auc_score, top_k_accuracy_score

    t, probs = encode(truth, classes), np.asarray(probabilities, dtype=float)
    auc = {
        c: round(float(roc_auc_score(t == i, probs[:, i])), 4)
        for i, c in enumerate(classes)
        if 0 < (t == i).sum() < len(t)  # AUC needs photos of the class and photos of others
    }
    top2 = top_k_accuracy_score(t, probs, k=2, labels=np.arange(len(classes))) if len(classes) > 2 else None
    ece, bins = calibration(t, probs)
    units = units_of(t, patients)
    within = resample_weights(t, units, resamples, seed)[:, units]  # class counts fixed: every class keeps its photos
    per_class = [weighted_auc(probs[:, i], t == i, within) for i, c in enumerate(classes) if c in auc]
    resampled = resampled_ece(t, probs, units, resample_weights(t, units, resamples, seed, within_class=False))
    return {
        "n": len(t),
        "auc": auc,
        "macro_auc": round(float(np.mean(list(auc.values()))), 4) if auc else None,
        "macro_auc_interval": interval(np.mean(per_class, axis=0)) if auc else None,
        "top2_accuracy": round(float(top2), 4) if top2 is not None else None,
        "ece": ece,
        "ece_interval": holding(interval(resampled), ece),
        "ece_if_calibrated": interval(calibrated_ece(probs, resamples, seed)),
        "reliability": bins,
    }


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(resamples,) one-vs-rest ROC-AUC of `scores` for `positive`, each photo counted as often as its column of
    `weights` (resamples, photos) says, a tie counting half: scikit-learn's figure with sample weights, for a
    thousand resamples at once (its roc_auc_score takes one at a time)."""
    order = np.argsort(scores, kind="stable")
    ordered, is_positive, w = scores[order], positive[order], weights[:, order]
    new_score = np.r_[True, ordered[1:] != ordered[:-1]]
    negative_weight = w * ~is_positive
    tied = np.add.reduceat(negative_weight, np.flatnonzero(new_score), axis=1)  # negatives at each distinct score
    below = np.cumsum(tied, axis=1) - tied  # negatives strictly below it
    positive_weight = w * is_positive
    wins = (positive_weight * (below + 0.5 * tied)[:, np.cumsum(new_score) - 1]).sum(axis=1)
    pairs = positive_weight.sum(axis=1) * negative_weight.sum(axis=1)
    return np.divide(wins, pairs, out=np.full(len(w), np.nan), where=pairs > 0)


def confidence_bins(probs: np.ndarray) -> np.ndarray:
    """Each photo's equal-width bin of its top class's probability."""
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    return np.clip(np.digitize(probs.max(axis=1), edges[1:-1]), 0, CALIBRATION_BINS - 1)


def resampled_ece(truth: np.ndarray, probs: np.ndarray, units: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ECE of each bootstrap resample (`weights`: resamples x units): per bin, the weighted gap between the
    share right and the mean confidence."""
    which, confidence, correct = confidence_bins(probs), probs.max(axis=1), probs.argmax(axis=1) == truth
    per_unit = np.zeros((3, weights.shape[1], CALIBRATION_BINS))
    for layer, values in enumerate((np.ones(len(truth)), confidence, correct.astype(float))):
        np.add.at(per_unit[layer], (units, which), values)
    count, sure, right = (weights @ layer for layer in per_unit)
    return np.abs(right - sure).sum(axis=1) / count.sum(axis=1)


def calibrated_ece(probs: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """The ECE of a model whose confidences are exactly right, on these photos: each answer right with the
    probability it was given, `draws` times."""
    rng = np.random.default_rng(seed)
    which, confidence = confidence_bins(probs), probs.max(axis=1)
    members = np.zeros((len(confidence), CALIBRATION_BINS))
    members[np.arange(len(confidence)), which] = 1
    right = (rng.random((draws, len(confidence))) < confidence).astype(float)
    return np.abs(right @ members - confidence @ members).sum(axis=1) / len(confidence)


def calibration(truth: np.ndarray, probs: np.ndarray) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width confidence bins. Our own few lines: sklearn's
    calibration_curve is for one binary class, and ECE is defined on the top class of a multi-class answer."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == truth
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    which = confidence_bins(probs)
    ece, bins = 0.0, []
    for b in range(CALIBRATION_BINS):
        members = which == b
        if members.any():
            gap = abs(correct[members].mean() - confidence[members].mean())
            ece += gap * members.mean()
            bins.append(
                {
                    "low": round(float(edges[b]), 2),
                    "high": round(float(edges[b + 1]), 2),
                    "confidence": round(float(confidence[members].mean()), 4),
                    "accuracy": round(float(correct[members].mean()), 4),
                    "count": int(members.sum()),
                }
            )
    return round(float(ece), 4), bins


MIN_REFERRAL_HALF = 5  # photos to choose a referral threshold on, and at least as many to measure it on


def selective(
    truth: list[str],
    predicted: list[str],
    confidence: list[float],
    target: float,
    seed: int = SEED,
    patients: list[str] | None = None,
) -> dict[str, Any]:
    """Answer only when the top class is probable enough, refer the rest: the risk-coverage curve (accuracy of the
    photos answered against the share answered, most confident first), the area under its risk (AURC: lower is
    better), and a referral threshold for `target` accuracy chosen on one half of the patients (of the photos
    without them; stratified by class, seeded) and measured on the other, with 95% intervals by patient, so the
    figures are not those the threshold was fit to, nor of the same patients' other photos."""
    right = np.asarray([t == p for t, p in zip(truth, predicted, strict=True)], dtype=float)
    sure = np.asarray(confidence, dtype=float)
    order = np.argsort(-sure, kind="stable")
    answered_accuracy = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    step = max(1, len(order) // 100)  # at most ~100 points: enough to draw, small in metrics.json
    curve = [
        {"coverage": round((k + 1) / len(order), 4), "accuracy": round(float(answered_accuracy[k]), 4)}
        for k in range(len(order) - 1, -1, -step)
    ][::-1]
    fit, held = halves(truth, seed, units_of(np.asarray(truth), patients))
    too_few = min(len(fit), len(held)) < MIN_REFERRAL_HALF
    threshold = None if too_few else referral_threshold(right[fit], sure[fit], target)
    answered = sure[held] >= threshold if threshold is not None else np.zeros(len(held), dtype=bool)
    hits = right[held][answered]
    held_patients = [patients[i] for i in held] if patients else None
    answered_patients = [p for p, a in zip(held_patients, answered, strict=True) if a] if held_patients else None
    if too_few:
        why = (f"too few photos with class probabilities ({len(truth)}) to choose a threshold on one half and "
               f"measure it on the other: {2 * MIN_REFERRAL_HALF} at least")  # fmt: skip
    else:
        why = f"no threshold of the top class's probability reaches {target:.0%} accuracy on {len(fit)} photos"
    return {
        "target_accuracy": target,
        "why_none": None if threshold is not None else why,
        "aurc": round(float(np.mean(1 - answered_accuracy)), 4),
        "curve": curve,
        "threshold": None if threshold is None else round(float(threshold), 6),
        "chosen_on": len(fit),
        "measured_on": len(held),
        "coverage": round(float(answered.mean()), 4) if len(held) else None,
        "coverage_interval": share_interval(list(answered), held_patients) if len(held) else None,
        "accuracy": round(float(hits.mean()), 4) if len(hits) else None,
        "accuracy_interval": share_interval(list(hits.astype(bool)), answered_patients) if len(hits) else None,
    }


def halves(truth: list[str], seed: int, units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the photos, a unit's (patient's) photos together, each class's units split evenly between them
    (the first half takes an odd one); a unit's class is that of its first photo."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(truth)
    first = np.unique(units, return_index=True)[1]
    fit_units: list[int] = []
    for label in sorted(set(truth)):
        members = rng.permutation(units[first][labels[first] == label])
        fit_units += members[: (len(members) + 1) // 2].tolist()
    in_fit = np.isin(units, fit_units)
    return np.flatnonzero(in_fit), np.flatnonzero(~in_fit)


def share_interval(hits: list[bool], patients: list[str] | None) -> list[float]:
    """Wilson's interval of a share, by patient (its own design effect) when patients are known."""
    return proportion_interval(hits, deff=design_effect(hits, patients) if patients else 1.0)


def referral_threshold(right: np.ndarray, sure: np.ndarray, target: float) -> float | None:
    """The lowest confidence above which the answered photos are at least `target` accurate (the most answered),
    or None when no threshold reaches it."""
    best = None
    for candidate in sorted(set(sure.tolist()), reverse=True):
        answered = sure >= candidate
        if right[answered].mean() >= target:
            best = candidate
    return best
