"""How much to trust an eval figure: intervals, paired comparison of two runs, and what class probabilities add
(ROC-AUC, calibration, top-2).

A share (accuracy, a view's accuracy, a referral's coverage) gets Wilson's score interval: closed form, and
unlike a percentile bootstrap it moves off an all-right or all-wrong sample (24 of 24 right: 0.862-1.000, not
1.000-1.000). F1 (per class and macro) gets the interval of a Dirichlet posterior of each true class's row of the
confusion matrix (Perks' prior: one pseudo-photo per row, spread over its cells; class counts fixed, as a
validation set drawn per class has them): a row that is all right or all wrong still varies, which a bootstrap
stratified by class cannot do, and with hundreds of photos per class the prior weighs nothing. Where the observed
F1 lies at a bound (1.0 when every photo is right) the posterior's draws cannot reach it, so its interval is
widened to hold the observed figure, as Wilson's does. The paired comparison of two runs resamples
photos stratified by class. All draws are seeded: the same figures on every run.
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


def stratified_indices(truth: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices: within each true class, as many draws with replacement as it has photos."""
    rng = np.random.default_rng(seed)
    columns = [
        members[rng.integers(0, len(members), size=(resamples, len(members)))]
        for members in (np.flatnonzero(truth == c) for c in np.unique(truth))
    ]
    return np.concatenate(columns, axis=1)


def confusions(truth: np.ndarray, predicted: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    """(resamples, k, k) confusion matrices, one per row of indices."""
    codes = truth[rows] * k + predicted[rows] + (np.arange(len(rows)) * k * k)[:, None]
    return np.bincount(codes.ravel(), minlength=len(rows) * k * k).reshape(len(rows), k, k)


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
    from scipy.stats import norm

    n, right = len(hits) / deff, float(sum(bool(h) for h in hits)) / deff
    if n == 0:
        return [0.0, 1.0]
    z = float(norm.ppf(1 - (1 - level) / 2))
    share, spread = right / n, z * z / n
    centre = (share + spread / 2) / (1 + spread)
    half = z * np.sqrt(share * (1 - share) / n + spread / (4 * n)) / (1 + spread)
    return [round(float(max(0.0, centre - half)), 4), round(float(min(1.0, centre + half)), 4)]


INTERVAL_METHOD = "Wilson score for shares; F1 from a Dirichlet posterior of each class's confusion row"
PRIOR_PER_ROW = 1.0  # pseudo-photos per true class in the F1 posterior (Perks: 1/cells a cell)


def posterior_confusions(
    truth: np.ndarray, predicted: np.ndarray, k: int, draws: int, seed: int, deff: float = 1.0
) -> np.ndarray:
    """(draws, k, k) confusion matrices in expected counts: each true class's row drawn from the Dirichlet
    posterior of its predictions (observed counts / deff + PRIOR_PER_ROW / k), times the class's photo count."""
    rng = np.random.default_rng(seed)
    observed = confusions(truth, predicted, k, np.arange(len(truth))[None, :])[0].astype(float) / deff
    drawn = np.zeros((draws, k, k))
    for row in np.unique(truth):
        drawn[:, row, :] = rng.dirichlet(observed[row] + PRIOR_PER_ROW / k, size=draws) * observed[row].sum()
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
    whole = scores(confusions(t, p, k, np.arange(len(t))[None, :]), len(classes))
    return {
        "resamples": resamples,
        "level": LEVEL,
        "method": INTERVAL_METHOD + (f"; by patient: each counted as n / {deff:.2f} photos" if patients else ""),
        "ci_method": "patient" if patients else "photo",
        "patients": len(set(patients)) if patients else None,
        "design_effect": round(deff, 3),
        "minimal_detectable_difference": detectable_difference(list(t == p), deff),
        "accuracy": proportion_interval(list(t == p), deff=deff),
        "macro_f1": holding(interval(drawn["macro_f1"]), whole["macro_f1"][0]),
        "f1": {c: holding(interval(drawn["f1"][:, i]), whole["f1"][0, i]) for i, c in enumerate(classes)},
    }


def design_effect(right: list[bool], patients: list[str]) -> float:
    """Variance of accuracy when patients are sampled (a ratio estimator over clusters) over its variance when
    photos are, at least 1: how many photos one independent photo is worth here. 1 when every photo is its own
    patient or the accuracy is 0 or 1 (no variance to compare)."""
    hits: dict[str, list[int]] = {}
    for patient, hit in zip(patients, right, strict=True):
        hits.setdefault(patient, []).append(int(hit))
    n, k = len(right), len(hits)
    share = sum(right) / n if n else 0.0
    if k < 2 or k == n or share in (0.0, 1.0):
        return 1.0
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
    runs resampled by the same indices: photos stratified by class, or whole patients when `patients` are known),
    and McNemar's exact test on the photos exactly one run got right."""
    from scipy.stats import binomtest

    t, a, b = encode(truth, classes), encode(first, classes), encode(second, classes)
    k = len(classes) + 1
    if patients:
        drawn_a, drawn_b = patient_resampled(t, a, b, k, patients, resamples, seed, len(classes))
    else:
        rows = stratified_indices(t, resamples, seed)
        drawn_a = scores(confusions(t, a, k, rows), len(classes))
        drawn_b = scores(confusions(t, b, k, rows), len(classes))
    whole_a = scores(confusions(t, a, k, np.arange(len(t))[None, :]), len(classes))
    whole_b = scores(confusions(t, b, k, np.arange(len(t))[None, :]), len(classes))
    right_a, right_b = a == t, b == t
    only_first, only_second = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    discordant = only_first + only_second
    p_value = binomtest(min(only_first, only_second), discordant, 0.5).pvalue if discordant else 1.0
    return {
        "n": len(t),
        "resampled": "patients" if patients else "photos, stratified by class",
        "difference": {
            metric: {
                "value": round(float(whole_b[metric][0] - whole_a[metric][0]), 4),
                "interval": interval(drawn_b[metric] - drawn_a[metric]),
            }
            for metric in ("accuracy", "macro_f1")
        },
        "mcnemar": {
            "both_right": int((right_a & right_b).sum()),
            "only_first_right": only_first,
            "only_second_right": only_second,
            "both_wrong": int((~right_a & ~right_b).sum()),
            "p_value": round(float(p_value), 6),
        },
    }


def patient_resampled(
    t: np.ndarray, a: np.ndarray, b: np.ndarray, k: int, patients: list[str], resamples: int, seed: int, n_classes: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Both runs' scores over resamples of whole patients (a cluster bootstrap: each resample draws as many
    patients as there are, with replacement, and takes all their photos)."""
    groups: dict[str, list[int]] = {}
    for i, patient in enumerate(patients):
        groups.setdefault(patient, []).append(i)
    members = [np.asarray(g) for g in groups.values()]
    rng = np.random.default_rng(seed)
    drawn: tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]] = ([], [])
    for _ in range(resamples):
        rows = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])[None, :]
        drawn[0].append(scores(confusions(t, a, k, rows), n_classes))
        drawn[1].append(scores(confusions(t, b, k, rows), n_classes))
    return tuple({m: np.concatenate([d[m] for d in side]) for m in ("accuracy", "macro_f1")} for side in drawn)  # type: ignore[return-value]


def probability_metrics(truth: list[str], probabilities: list[list[float]], classes: list[str]) -> dict[str, Any]:
    """One-vs-rest ROC-AUC per class and their mean, top-2 accuracy, and expected calibration error of the top
    class with the reliability diagram's bins."""
    from sklearn.metrics import roc_auc_score, top_k_accuracy_score

    t, probs = encode(truth, classes), np.asarray(probabilities, dtype=float)
    auc = {
        c: round(float(roc_auc_score(t == i, probs[:, i])), 4)
        for i, c in enumerate(classes)
        if 0 < (t == i).sum() < len(t)  # AUC needs photos of the class and photos of others
    }
    top2 = top_k_accuracy_score(t, probs, k=2, labels=np.arange(len(classes))) if len(classes) > 2 else None
    ece, bins = calibration(t, probs)
    return {
        "n": len(t),
        "auc": auc,
        "macro_auc": round(float(np.mean(list(auc.values()))), 4) if auc else None,
        "top2_accuracy": round(float(top2), 4) if top2 is not None else None,
        "ece": ece,
        "reliability": bins,
    }


def calibration(truth: np.ndarray, probs: np.ndarray) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width confidence bins. Our own few lines: sklearn's
    calibration_curve is for one binary class, and ECE is defined on the top class of a multi-class answer."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == truth
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, CALIBRATION_BINS - 1)
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
    truth: list[str], predicted: list[str], confidence: list[float], target: float, seed: int = SEED
) -> dict[str, Any]:
    """Answer only when the top class is probable enough, refer the rest: the risk-coverage curve (accuracy of the
    photos answered against the share answered, most confident first), the area under its risk (AURC: lower is
    better), and a referral threshold for `target` accuracy chosen on one half of the photos (stratified by class,
    seeded) and measured on the other, with 95% intervals, so the figures are not those the threshold was fit to."""
    right = np.asarray([t == p for t, p in zip(truth, predicted, strict=True)], dtype=float)
    sure = np.asarray(confidence, dtype=float)
    order = np.argsort(-sure, kind="stable")
    answered_accuracy = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    step = max(1, len(order) // 100)  # at most ~100 points: enough to draw, small in metrics.json
    curve = [
        {"coverage": round((k + 1) / len(order), 4), "accuracy": round(float(answered_accuracy[k]), 4)}
        for k in range(len(order) - 1, -1, -step)
    ][::-1]
    fit, held = halves(truth, seed)
    too_few = min(len(fit), len(held)) < MIN_REFERRAL_HALF
    threshold = None if too_few else referral_threshold(right[fit], sure[fit], target)
    answered = sure[held] >= threshold if threshold is not None else np.zeros(len(held), dtype=bool)
    hits = right[held][answered]
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
        "coverage_interval": proportion_interval(list(answered)) if len(held) else None,
        "accuracy": round(float(hits.mean()), 4) if len(hits) else None,
        "accuracy_interval": proportion_interval(list(hits.astype(bool))) if len(hits) else None,
    }


def halves(truth: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of the photos, each class split evenly between them (the first half takes an odd one)."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    labels = np.asarray(truth)
    for label in sorted(set(truth)):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = (len(members) + 1) // 2
        fit += members[:cut].tolist()
        held += members[cut:].tolist()
    return np.asarray(sorted(fit), dtype=int), np.asarray(sorted(held), dtype=int)


def referral_threshold(right: np.ndarray, sure: np.ndarray, target: float) -> float | None:
    """The lowest confidence above which the answered photos are at least `target` accurate (the most answered),
    or None when no threshold reaches it."""
    best = None
    for candidate in sorted(set(sure.tolist()), reverse=True):
        answered = sure >= candidate
        if right[answered].mean() >= target:
            best = candidate
    return best
