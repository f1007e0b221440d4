"""Keeping the best adapter, not the last: at every evaluation `train` runs (each --eval-steps, on --eval-rows
held-out rows) the rows are also scored the way `eval` scores them (SFT: class_probabilities, no generation, so it
is cheap; GRPO, which changes the free answer itself: greedy free answers parsed as eval parses them, unparsed
counted wrong, the start scored before step 1 and kept unless a step beats it), giving accuracy and macro F1 beside
the eval loss. `--select-by macro_f1|loss|last` names what "best"
means; the best evaluation's adapter is saved aside and put in place at the end; `--patience K` stops training
after K evaluations without improvement.

Under DDP, rank 0 scores and decides; the decision (stop or go on) is broadcast, so every rank stops together.
A backend whose training forward gives no logits (Unsloth keeps them empty to save memory) is scored by loss.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from skinvlm import devices
from skinvlm.rules import Rules

BEST_FOLDER = "best"  # beside the adapter: the best evaluation's adapter until training ends
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def score_rows(model: Any, processor: Any, prompt_text: str, rows: Any, rules: Rules) -> dict[str, float]:
    """Accuracy and macro F1 of the held-out rows' best-scored class (what `eval --constrained` would name)."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score

    from skinvlm.evaluate import class_probabilities
    from skinvlm.images import as_rgb

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            predicted = []
            for row in rows:
                scores = class_probabilities(model, processor, prompt_text, as_rgb(row["image"]), rules)
                predicted.append(max(scores, key=scores.__getitem__))
    finally:
        model.train(was_training)
    truth = list(rows["label"])
    return {
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        "macro_f1": round(
            float(f1_score(truth, predicted, labels=rules.class_names, average="macro", zero_division=0)), 4
        ),
    }


SAMPLES_LOGGED = 3  # development rows whose free answers each evaluation logs, so a user can read what broke


def generation_scores(
    model: Any, processor: Any, prompt_text: str, rows: Any, rules: Rules, max_new_tokens: int
) -> dict[str, Any]:
    """The held-out rows scored the way `eval` scores a model: its greedy free answer (eval's own generation)
    parsed for a <label>; macro F1 over the classes with an unparsed answer wrong. What GRPO changes is the free
    answer (its form as much as its class), which class probabilities do not see: they stayed right while every
    answer of a class broke."""
    from sklearn.metrics import accuracy_score, f1_score

    from skinvlm.evaluate import UNPARSED, greedy_answers, predicted_class
    from skinvlm.images import as_rgb
    from skinvlm.vlm import END_OF_TURN

    was_training = model.training
    model.eval()
    # The training model's generation config may not end at the turn's end, as a merged folder's does.
    ends = [processor.tokenizer.convert_tokens_to_ids(END_OF_TURN), processor.tokenizer.eos_token_id]
    stop = {"eos_token_id": [e for e in ends if e is not None]}
    answers = []
    try:
        for row in rows:
            inputs = processor(text=[prompt_text], images=[as_rgb(row["image"])], return_tensors="pt")
            answers += greedy_answers(model, processor, inputs.to(model.device), max_new_tokens, **stop)
    finally:
        model.train(was_training)
    predicted = [predicted_class(a, rules) for a in answers]
    truth = list(rows["label"])
    return {
        "accuracy": round(float(accuracy_score(truth, predicted)), 4),
        "macro_f1": round(
            float(f1_score(truth, predicted, labels=rules.class_names, average="macro", zero_division=0)), 4
        ),
        "unparsed": predicted.count(UNPARSED),
        "classes_answered": len({p for p in predicted if p != UNPARSED}),
        "samples": [{"id": row["id"], "label": row["label"], "answer": a[:200]}
                    for row, a in zip(rows.select(range(min(SAMPLES_LOGGED, len(answers)))), answers, strict=False)],
    }  # fmt: skip


def collapse(entry: dict[str, Any], start: dict[str, Any], rows: int) -> str | None:
    """Why the held-out answers broke since the start (GRPO's collapse), or None: they lost their form, or narrowed
    to one class where the start named more."""
    if entry.get("unparsed") is None or start.get("unparsed") is None:
        return None
    if entry["unparsed"] > start["unparsed"] + max(2, rows // 4):
        return f"the held-out answers lose their form: unparsed {start['unparsed']} -> {entry['unparsed']} of {rows}"
    if entry["classes_answered"] <= 1 < start["classes_answered"]:
        return f"every held-out answer names one class (the start named {start['classes_answered']})"
    return None


def broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (as is, in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def better(entry: dict[str, Any], best: dict[str, Any] | None, select_by: str) -> bool:
    if best is None or select_by == "last":
        return True
    if select_by == "loss":
        return entry["loss"] is not None and (best["loss"] is None or entry["loss"] < best["loss"])
    if entry.get("macro_f1") is None:
        return False
    if entry["macro_f1"] != best.get("macro_f1"):
        return entry["macro_f1"] > (best.get("macro_f1") or -1.0)
    if entry.get("unparsed") is not None and best.get("unparsed") is not None:
        return entry["unparsed"] < best["unparsed"]  # free answers: a tie keeps the earlier, unless it parses more
    # A tie goes to the later evaluation unless its eval loss is worse: the earliest of equal scores was kept
    # before, which held a 300-step run at step 100 while its loss still fell.
    return entry["loss"] is None or best["loss"] is None or entry["loss"] <= best["loss"]


def selection_callback(
    output: Path, processor: Any, prompt_text: str, rows: Any, rules: Rules, select_by: str, patience: int | None,
    on_eval: Any = None, every: int | None = None, generate: int | None = None,
) -> Any:  # fmt: skip
    """`every`: score at every so many steps' end, for a trainer that runs no evaluation of its own (GRPO).
    `generate`: score free answers of at most this many tokens (`generation_scores`), and stop, saying why, when
    they collapse (`collapse`); the best evaluation, the start included, is what is kept."""
    from transformers import TrainerCallback

    class ModelSelection(TrainerCallback):
        def __init__(self) -> None:
            self.evals: list[dict[str, Any]] = []
            self.best: dict[str, Any] | None = None
            self.since_best = 0
            self.scoring = select_by != "loss"
            self.collapsed: str | None = None  # why free answers broke, where they did

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> Any:
            # GRPO starts from a trained adapter: scored before step 1, it is kept when no step does better.
            if every and state.global_step == 0:
                return self.on_evaluate(args, state, control, None, model)
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> Any:
            if every and state.global_step % every == 0:
                return self.on_evaluate(args, state, control, None, model)
            return control

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, model: Any = None, **kw: Any):
            entry: dict[str, Any] = {"step": state.global_step, "loss": (metrics or {}).get("eval_loss")}
            if devices.is_main_process() and self.scoring and model is not None:
                try:
                    entry |= (generation_scores(model, processor, prompt_text, rows, rules, generate) if generate
                              else score_rows(model, processor, prompt_text, rows, rules))  # fmt: skip
                except (RuntimeError, IndexError, ValueError):  # no logits from this backend's training forward
                    self.scoring = False
                except Exception as err:  # noqa: BLE001 - a figure must never end a run hours in; say it, go on
                    warnings.warn(
                        f"held-out scoring at step {state.global_step} failed ({type(err).__name__}: {err}); "
                        "training goes on, chosen by loss",
                        stacklevel=2,
                    )
                    self.scoring = False
            entry = broadcast(entry)
            self.evals.append(entry)
            chosen_by = select_by if (self.scoring or select_by != "macro_f1") else "loss"
            if better(entry, self.best, chosen_by):
                self.best, self.since_best = entry, 0
                if devices.is_main_process() and model is not None and select_by != "last":
                    model.save_pretrained(str(output / BEST_FOLDER))
            else:
                self.since_best += 1
            if patience is not None and self.since_best >= patience:
                control.should_training_stop = True
            if (broke := collapse(entry, self.evals[0], len(rows))) is not None:
                self.collapsed = f"step {entry['step']}: {broke}"
                warnings.warn(f"stopped at {self.collapsed}; the best evaluation is kept", stacklevel=2)
                control.should_training_stop = True
            if on_eval and devices.is_main_process():
                on_eval(entry)
            return control

    return ModelSelection()


def keep_best(output: Path, best_step: int | None, last_step: int, keep: bool) -> None:
    """The best evaluation's adapter in place of the last step's (when they differ); its folder gone unless kept."""
    saved = output / BEST_FOLDER
    if best_step is not None and best_step != last_step and saved.is_dir():
        for name in ADAPTER_FILES:
            if (saved / name).is_file():
                shutil.copy2(saved / name, output / name)
    if not keep:
        shutil.rmtree(saved, ignore_errors=True)
