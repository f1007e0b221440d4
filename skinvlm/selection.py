"""Keeping the best adapter, not the last: at every evaluation `train` runs (each --eval-steps, on --eval-rows
held-out rows) the rows are also scored the way `eval` scores them (class_probabilities: no generation, so it is
cheap), giving accuracy and macro F1 beside the eval loss. `--select-by macro_f1|loss|last` names what "best"
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
    # A tie goes to the later evaluation unless its eval loss is worse: the earliest of equal scores was kept
    # before, which held a 300-step run at step 100 while its loss still fell.
    return entry["loss"] is None or best["loss"] is None or entry["loss"] <= best["loss"]


def selection_callback(
    output: Path, processor: Any, prompt_text: str, rows: Any, rules: Rules, select_by: str, patience: int | None,
    on_eval: Any = None, every: int | None = None,
) -> Any:  # fmt: skip
    """`every`: score at every so many steps' end, for a trainer that runs no evaluation of its own (GRPO)."""
    from transformers import TrainerCallback

    class ModelSelection(TrainerCallback):
        def __init__(self) -> None:
            self.evals: list[dict[str, Any]] = []
            self.best: dict[str, Any] | None = None
            self.since_best = 0
            self.scoring = select_by != "loss"

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
                    entry |= score_rows(model, processor, prompt_text, rows, rules)
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
