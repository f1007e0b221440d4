"""GRPO's rewards: plain functions of an answer's text and its photo's class, each logged apart.

- label: 1 for the right class (through the aliases), `group_credit` for a class in the same group of the rule
  file's [labels.groups] (아토피 for 지루: the dermatitis family), 0 otherwise;
- format: 1 when the `<label>`/`<summary>` answer parses, its label names a class (as `eval` parses it) and its
  summary passes the audit (Korean only, at least [audit] min_summary_chars); 0.5 when only the summary fails the
  audit; 0 otherwise. A parsing answer whose label is no class earns nothing: on the tiny model a format reward
  that asked only for the tags was met by one made-up label for every photo, and the label reward never rose;
- length (optional, weight 0 by default): 1 when nothing follows `</summary>` and the answer ended before the
  token budget, 0 otherwise: rambling past the answer costs tokens at serving time.

No reasoning text is asked or rewarded: for classification a plain right-answer reward does best.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from skinvlm.audit import korean_only
from skinvlm.prompts import SUMMARY_TAG, parse_answer
from skinvlm.rules import Rules
from skinvlm.train_settings import TrainSettings

REWARDS = ("label", "format", "length")


def answer_text(completion: Any) -> str:
    """A completion as TRL hands it: plain text, or (conversational prompts) a list of messages."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, list):  # structured content items
        return "".join(item.get("text", "") for item in content if isinstance(item, dict))
    return str(content)


def label_reward(text: str, truth: str, rules: Rules, group_credit: float) -> float:
    named = rules.canonical(parse_answer(text).tag)
    if named == truth:
        return 1.0
    return group_credit if named is not None and rules.same_group(named, truth) else 0.0


def format_reward(text: str, rules: Rules) -> float:
    answer = parse_answer(text)
    if not answer.well_formed or rules.canonical(answer.tag) is None:
        return 0.0
    summary = (answer.summary or "").strip()
    return 1.0 if korean_only(summary, rules) and len(summary) >= rules.audit.min_summary_chars else 0.5


def length_reward(text: str, truncated: bool) -> float:
    end = SUMMARY_TAG.search(text)
    return 1.0 if end is not None and not truncated and not text[end.end() :].strip() else 0.0


def weights(settings: TrainSettings) -> dict[str, float]:
    """Each reward's weight in the total; a reward of weight 0 is not computed."""
    chosen = {"label": 1.0, "format": settings.format_weight, "length": settings.length_weight}
    return {name: weight for name, weight in chosen.items() if weight > 0}


def scores(text: str, truth: str, rules: Rules, settings: TrainSettings, truncated: bool = False) -> dict[str, float]:
    """Every weighted reward of one answer, and their weighted sum as `total`."""
    each = {
        "label": label_reward(text, truth, rules, settings.group_credit),
        "format": format_reward(text, rules),
        "length": length_reward(text, truncated),
    }
    chosen = weights(settings)
    kept = {name: each[name] for name in chosen}
    return kept | {"total": round(sum(chosen[name] * value for name, value in kept.items()), 4)}


def reward_functions(rules: Rules, settings: TrainSettings) -> tuple[list[Any], list[float]]:
    """The rewards as TRL's GRPOTrainer calls them (completions and the dataset's columns as lists), named so that
    its log reads rewards/label/mean, and their weights."""
    budget = settings.max_completion_tokens

    def label(completions: list[Any], label: list[str], **_: Any) -> list[float]:
        texts = map(answer_text, completions)
        return [label_reward(t, truth, rules, settings.group_credit) for t, truth in zip(texts, label, strict=True)]

    def format(completions: list[Any], **_: Any) -> list[float]:  # noqa: A001 - the name TRL logs it under
        return [format_reward(answer_text(c), rules) for c in completions]

    def length(completions: list[Any], completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [
            length_reward(answer_text(c), len(ids) >= budget)
            for c, ids in zip(completions, completion_ids, strict=True)
        ]

    functions: dict[str, Callable[..., list[float]]] = {"label": label, "format": format, "length": length}
    chosen = weights(settings)
    return [functions[name] for name in chosen], list(chosen.values())


def reward_log(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per logged step: the mean total reward and each reward's mean (and the KL to the start, when --beta > 0)."""
    rows = []
    for entry in log:
        if "reward" not in entry:
            continue
        row = {"step": entry["step"], "mean": round(float(entry["reward"]), 4)}
        for name in REWARDS:
            if f"rewards/{name}/mean" in entry:
                row[name] = round(float(entry[f"rewards/{name}/mean"]), 4)
        if "kl" in entry:
            row["kl"] = round(float(entry["kl"]), 6)
        rows.append(row)
    return rows
