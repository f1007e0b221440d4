"""The training data: the text stage joined with images, only rows worth learning from; the development rows
held out for evaluations; a few-shot sample when asked."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from skinvlm.errors import SkinvlmError
from skinvlm.prompts import agrees, parse_answer
from skinvlm.rules import Rules
from skinvlm.train_settings import TrainSettings
from skinvlm.workspace import Workspace


# -- data ------------------------------------------------------------------------------------
def training_stage(ws: Workspace) -> str:
    return "fixed" if (ws.fixed / "dataset_dict.json").exists() else "described"


@dataclass
class Rows:
    """The training data: the text stage joined with images, only rows worth learning from."""

    data: Any
    stage: str
    unusable: int  # empty, failed or malformed answers
    mismatched: int  # answers whose <label> names another class than the folder (kept with --keep-mismatches)
    review_left_out: int = 0  # rejected or disputed by clinicians (and unreviewed, with --reviewed-only)


def left_out_by_review(outcome: str | None, reviewed_only: bool) -> bool:
    """Rejected and disputed records never teach; with --reviewed-only, neither do records no clinician read."""
    if reviewed_only:
        return outcome not in ("accepted", "edited")
    return outcome in ("rejected", "disputed")


def training_rows(ws: Workspace, rules: Rules, keep_mismatches: bool = False, reviewed_only: bool = False) -> Rows:
    import warnings

    stage = training_stage(ws)
    if stage == "described":
        warnings.warn("datasets/fixed is missing: training on datasets/described (run `skinvlm fix`)", stacklevel=2)
    data = ws.load(stage)
    unusable = mismatched = review_left_out = 0
    if data["train"].num_rows == 0:
        raise SkinvlmError(f"the training split of datasets/{stage} is empty: ingest a tree with a Training folder, "
                           "or pool the photos with `skinvlm ingest SRC --force --resplit 0.1`")  # fmt: skip
    for split in list(data):
        ds = data[split]
        if ds.num_rows == 0:
            continue
        keep = []
        outcomes = ds["review"] if "review" in ds.column_names else [None] * ds.num_rows
        rows = zip(ds["output"], ds["status"], ds["label"], outcomes, strict=True)
        for i, (out, status, label, outcome) in enumerate(rows):
            if left_out_by_review(outcome, reviewed_only):
                review_left_out += 1
            elif status != "ok" or not parse_answer(out).well_formed:
                unusable += 1
            elif not (keep_mismatches or agrees(out, label, rules)):
                mismatched += 1  # the describer's mistake would be taught as the answer
            else:
                keep.append(i)
        data[split] = ds.select(keep) if len(keep) < ds.num_rows else ds
    if data["train"].num_rows == 0:
        raise SkinvlmError(
            f"no usable rows in datasets/{stage}: every output is empty, failed, malformed, names another class "
            "than its folder (see `skinvlm audit`) or was left out by the clinicians' review"
        )
    classes = sorted(set(data["train"]["label"]))
    if len(classes) < 2:
        raise SkinvlmError(
            f"the usable training rows hold one class ({classes[0]}) of {len(rules.class_names)}: a model trained "
            "on them would name it for every photo; describe and fix the other classes' photos first"
        )
    return Rows(data, stage, unusable, mismatched, review_left_out)


def with_dev_split(rows: Rows, settings: TrainSettings) -> Rows:
    """The training rows less a development share (`dev` in rows.data) when evaluations are asked for: the eval
    loss and the best step come from photos that neither train nor `eval` report on. Whole patients go to one
    side (a patient's other photos would make the development figures optimistic); each class keeps its share."""
    train = rows.data["train"]
    if not settings.eval_rows:
        return rows
    groups = train["patient"] if "patient" in train.column_names else train["id"]
    dev = development_indices(list(train["label"]), list(groups), settings.dev_fraction, settings.seed)
    if not dev or len(dev) == train.num_rows:
        return rows
    chosen = set(dev)
    rows.data["dev"] = train.select(sorted(dev))
    rows.data["train"] = train.select([i for i in range(train.num_rows) if i not in chosen])
    return rows


def few_shot(rows: Rows, per_class: int | None, seed: int) -> Rows:
    """--per-class N: a seeded sample of N training photos per class, taken after the development rows are set aside
    (they stay out of training either way); a class with fewer keeps them all, and says so."""
    import random
    import warnings

    if per_class is None:
        return rows
    train = rows.data["train"]
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(train["label"]):
        by_class.setdefault(label, []).append(i)
    short = {label: len(found) for label, found in sorted(by_class.items()) if len(found) < per_class}
    if short:
        counts = ", ".join(f"{label} {n}" for label, n in short.items())
        warnings.warn(
            f"--per-class {per_class}: fewer training photos in {counts}; all of those are used", stacklevel=2
        )
    rng = random.Random(seed)
    keep = [i for label in sorted(by_class) for i in rng.sample(by_class[label], min(per_class, len(by_class[label])))]
    rows.data["train"] = train.select(sorted(keep))
    return rows


def development_indices(labels: list[str], groups: list[str], fraction: float, seed: int) -> list[int]:
    """Rows of whole groups (patients), about `fraction` of each class, seeded: each class's groups in a shuffled
    order, taken while the class's share is not yet reached; a class with one group keeps it for training."""
    import random

    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    by_class: dict[str, list[str]] = {}
    for group, rows in sorted(members.items()):
        by_class.setdefault(Counter(labels[i] for i in rows).most_common(1)[0][0], []).append(group)
    rng, chosen = random.Random(seed), []
    for label in sorted(by_class):
        candidates = by_class[label]
        rng.shuffle(candidates)
        target = max(1, round(fraction * sum(len(members[g]) for g in candidates)))
        taken = 0
        for group in candidates[:-1]:  # the last group always trains
            if taken >= target:
                break
            chosen += members[group]
            taken += len(members[group])
    return sorted(chosen)


def eval_rows(data: Any, settings: TrainSettings) -> Any | None:
    if not settings.eval_rows or "dev" not in data or not data["dev"].num_rows:
        return None
    dev = data["dev"].shuffle(seed=settings.seed)
    return dev.select(range(min(settings.eval_rows, dev.num_rows)))
