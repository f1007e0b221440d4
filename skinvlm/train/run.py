"""A training run, either method: preflight, set-up, the method's trainer, the JSONL log and live progress,
held-out selection, Ctrl-C/SIGTERM with a checkpoint, what is saved, and the result."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from skinvlm import devices, selection
from skinvlm.errors import SkinvlmError
from skinvlm.prompts import conversation, instruction
from skinvlm.rules import Rules
from skinvlm.samples import Summary
from skinvlm.train.grpo import build_trainer as grpo_trainer
from skinvlm.train.grpo import sample_rewards
from skinvlm.train.outputs import peak_rss_mb, peak_vram_mb, read_log, save_outputs
from skinvlm.train.preflight import SETTINGS_SNAPSHOT, Plan, newest_checkpoint, preflight
from skinvlm.train.rewards import reward_log
from skinvlm.train.rows import eval_rows
from skinvlm.train.setup import Setup, set_up
from skinvlm.train.sft import build_trainer as sft_trainer
from skinvlm.train_settings import TrainSettings
from skinvlm.workspace import Workspace, now_iso, writes


@dataclass
class TrainResult:
    output: Path
    backend: str
    steps: int
    rows: int
    skipped: int
    mismatched: int
    final_loss: float | None
    seconds: float
    peak_rss_mb: float
    peak_vram_mb: float | None  # the most held by tensors at once
    peak_vram_reserved_mb: float | None  # the most PyTorch's allocator took from the GPU (what nvidia-smi sees)
    vision_forward_calls: int | None  # forward calls of the vision tower while training (None: no tower found)
    world_size: int
    effective_batch_size: int
    summary: Summary
    log: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # {step, loss, accuracy, macro_f1} per evaluation
    best_step: int | None = None  # the evaluation whose adapter was kept (--select-by)
    method: str = "sft"
    from_adapter: str | None = None  # GRPO: the SFT adapter it started from
    rewards: list[dict[str, Any]] = field(default_factory=list)  # GRPO: {step, mean, label, format} per step
    kept: dict[str, Any] | None = None  # what selection kept against the first evaluation: step, macro F1, unparsed

    def as_json(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k not in ("summary", "log")}
        return fields | {"output": str(self.output), "summary": self.summary.as_json()}


def dry_run(ws: Workspace, rules: Rules, settings: TrainSettings) -> Summary:
    """Build the rows and the backend's real collator, collate one batch, measure; no step. SFT loads no weights;
    GRPO loads its start and scores a few sampled answers (what its first steps would learn from)."""
    setup = set_up(ws, rules, settings, preflight(ws, rules, settings, dry_run=True), dry_run=True)
    if settings.method == "grpo":
        setup.summary.sampled = sample_rewards(setup, rules, settings)
    return setup.summary


def build_trainer(setup: Setup, rules: Rules, settings: TrainSettings) -> Any:
    return (grpo_trainer if settings.method == "grpo" else sft_trainer)(setup, rules, settings)


# -- the stage -------------------------------------------------------------------------------
def log_callback(path: Path, on_step: Callable[[dict[str, Any]], None] | None) -> Any:
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Every logged step as one flushed JSON line (rank 0 only), so a crash keeps the curve so far;
        and handed to `on_step`, which draws the live progress. `seconds` since training began on each
        line gives the steady-state speed (benchmarks leave out the warm-up steps)."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.began = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if state.is_world_process_zero:
                seconds = round(time.perf_counter() - getattr(self, "began", time.perf_counter()), 3)
                entry = {"step": state.global_step, **(logs or {}), "seconds": seconds}
                if cuda_in_use():  # the peak so far on every line: a run cut short still tells its memory
                    entry["peak_vram_mb"] = peak_vram_mb()
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\n")
                if on_step:
                    on_step(entry | {"max_steps": state.max_steps})

    return JsonlLog()


def cuda_in_use() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()


class VisionCalls:
    """Counts forward calls of the vision tower during training: the proof that images reach the model
    (a collator that dropped them would still train, on text alone)."""

    def __init__(self, model: Any) -> None:
        self.calls = 0
        tower = next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "visual"), None)
        self.found = tower is not None
        if tower is not None:
            tower.register_forward_hook(self.count)

    def count(self, *_: Any) -> None:
        self.calls += 1


def divergence_guard(model: Any) -> Any:
    """Stops a run whose loss or trainable weights stop being finite (a learning rate far too high), before a
    checkpoint of such weights is saved: the run then fails with its last finite checkpoint kept."""
    from transformers import TrainerCallback

    class Divergence(TrainerCallback):
        def __init__(self) -> None:
            self.at: tuple[int, str] | None = None  # the step and what was not finite

        def stop(self, state: Any, control: Any, what: str) -> None:
            self.at = self.at or (state.global_step, what)
            control.should_save = False
            control.should_training_stop = True

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if (control.should_save or control.should_log or state.global_step >= state.max_steps) and not finite(
                model
            ):
                self.stop(state, control, "the trainable weights are NaN or infinite")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            loss = (logs or {}).get("loss")
            if isinstance(loss, float) and not math.isfinite(loss):
                self.stop(state, control, f"the loss is {loss}")

    return Divergence()


def finite(model: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def diverged(at: tuple[int, str], settings: TrainSettings, output: Path) -> SkinvlmError:
    step, what = at
    newest = newest_checkpoint(output)
    kept = f"{newest} (the last saved before it) is kept" if newest else "no checkpoint had been saved before it"
    return SkinvlmError(
        f"training diverged at step {step}: {what}; lower --learning-rate (it was {settings.learning_rate:g}) and "
        f"train again. No adapter was saved; {kept}"
    )


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training, with what can be resumed: the newest checkpoint (None: none) and
    whether it was saved just now (one process saves at once; under DDP the last periodic one stands)."""

    def __init__(self, checkpoint: str | None, saved_now: bool) -> None:
        super().__init__()
        self.checkpoint, self.saved_now = checkpoint, saved_now


@writes("train")
def train(
    ws: Workspace,
    rules: Rules,
    settings: TrainSettings,
    on_summary: Callable[[Summary, Plan], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train; `on_summary` sees the checked first batch before step 1, `on_step` every logged step (rank 0)."""
    import torch

    plan = preflight(ws, rules, settings, dry_run=False)
    started, clock = now_iso(), time.perf_counter()
    try:
        setup = set_up(ws, rules, settings, plan, dry_run=False)
    except torch.OutOfMemoryError:
        raise out_of_memory(settings, None, plan.output) from None
    main = devices.is_main_process()
    if on_summary and main:
        on_summary(setup.summary, plan)
    if problem := setup.summary.problem():
        raise SkinvlmError(f"refusing to train: {problem}")
    log_path = plan.output / "train_log.jsonl"
    if main:
        plan.output.mkdir(parents=True, exist_ok=True)
        if not settings.resume:
            log_path.unlink(missing_ok=True)
        (plan.output / SETTINGS_SNAPSHOT).write_text(json.dumps(asdict(settings), indent=2), encoding="utf-8")
    trainer = build_trainer(setup, rules, settings)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the JSONL log replaces dict printouts on stdout
    trainer.add_callback(log_callback(log_path, on_step))
    chooser = choosing_callback(setup, rules, settings, on_step, log_path)
    if chooser is not None:
        trainer.add_callback(chooser)
    vision = VisionCalls(trainer.model)
    guard = divergence_guard(trainer.model)
    trainer.add_callback(guard)
    try:
        trainer.train(resume_from_checkpoint=plan.resume_from)
    except KeyboardInterrupt:
        alone = devices.world_size() == 1
        if alone and trainer.state.global_step > 0 and finite(trainer.model):  # so --resume continues from here
            trainer._save_checkpoint(trainer.model, trial=None)
        raise TrainingInterrupted(newest_checkpoint(plan.output), alone and trainer.state.global_step > 0) from None
    except torch.OutOfMemoryError:
        raise out_of_memory(settings, trainer.state.global_step, plan.output) from None
    if guard.at is not None:
        raise diverged(guard.at, settings, plan.output)
    trainer.save_model(str(plan.output))  # the trainer writes on rank 0 only
    best_step = chosen_step(chooser, settings, trainer.state.global_step)
    if main and chooser is not None:
        selection.keep_best(plan.output, best_step, trainer.state.global_step, settings.keep_checkpoints)
    evals = chooser.evals if chooser is not None else []
    log = read_log(log_path) if main else []  # rank 0 writes the log; the others return without it
    if main:
        save_outputs(ws, rules, settings, setup.plan, setup.rows, setup.summary, log, started, evals, best_step)
    losses = [e["loss"] for e in log if "loss" in e]
    return TrainResult(
        plan.output,
        plan.backend,
        trainer.state.global_step,
        setup.rows.data["train"].num_rows,
        setup.rows.unusable,
        setup.rows.mismatched,
        round(losses[-1], 4) if losses else None,
        round(time.perf_counter() - clock, 1),
        peak_rss_mb(),
        peak_vram_mb() if plan.cuda else None,
        peak_vram_mb(reserved=True) if plan.cuda else None,
        vision.calls if vision.found else None,
        setup.summary.world_size,
        setup.summary.effective_batch_size,
        setup.summary,
        log,
        evals,
        best_step,
        settings.method,
        settings.from_adapter,
        reward_log(log),
        kept_account(chooser, best_step),
    )


def out_of_memory(settings: TrainSettings, step: int | None, output: Path) -> SkinvlmError:
    """CUDA out of memory as one line: what to lower (each change keeps what the run learns from) and what is
    kept, rather than the allocator's page of numbers. `step` None: while the model loaded."""
    if step is None:
        lower = ["--load-in-4bit"] if not settings.load_in_4bit else []
        lower.append("a GPU with more free memory (nvidia-smi shows what else holds it)")
        return SkinvlmError(f"the GPU ran out of memory loading {settings.model}: try {'; or '.join(lower)}")
    lower = []
    if settings.batch_size > 1:
        accumulated = settings.batch_size * settings.grad_accum
        lower.append(f"--batch-size 1 --grad-accum {accumulated} (the same effective batch)")
    if settings.method == "grpo":  # its photos must reach the model as in SFT: --max-pixels stays the adapter's
        lower.append(f"--num-generations {max(2, settings.num_generations // 2)}")
        lower.append(f"--max-completion-tokens {max(8, settings.max_completion_tokens // 2)}")
    else:
        lower.append(f"--max-pixels {settings.max_pixels // 2} (fewer image tokens per photo)")
    if not settings.load_in_4bit:
        lower.append("--load-in-4bit")
    newest = newest_checkpoint(output)
    kept = f"{newest} is kept: add --resume to go on from it" if newest else "no checkpoint had been saved yet"
    return SkinvlmError(f"the GPU ran out of memory at step {step + 1}: try {'; or '.join(lower)}. {kept}")


def choosing_callback(
    setup: Setup, rules: Rules, settings: TrainSettings, on_step: Callable[[dict[str, Any]], None] | None, log: Path
) -> Any:
    """The callback that scores each evaluation and keeps the best adapter (selection.py); None without held-out
    rows, where there is nothing to choose by. Each evaluation's scores also go to the training log, as a line
    of their own, so a page drawing the run sees them as they come."""
    rows = eval_rows(setup.rows.data, settings)
    if rows is None:
        return None
    prompt_text = setup.processor.apply_chat_template(
        conversation(instruction(rules)), add_generation_prompt=True, tokenize=False
    )

    def shown(entry: dict[str, Any]) -> None:
        scored = {f"eval_{k}": v for k, v in entry.items() if k not in ("step", "loss")} | {"step": entry["step"]}
        with log.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(scored) + "\n")
        if on_step:
            on_step(scored | {"eval_loss": entry.get("loss")})

    # GRPO's trainer runs no evaluation of its own here: the scoring runs every --eval-steps steps instead, on free
    # answers (what GRPO changes), as long as the ones it samples.
    grpo = settings.method == "grpo"
    every = settings.eval_steps if grpo else None
    return selection.selection_callback(
        setup.plan.output,
        setup.processor,
        prompt_text,
        rows,
        rules,
        settings.select_by,
        settings.patience,
        shown,
        every,
        settings.max_completion_tokens if grpo else None,
    )


def kept_account(chooser: Any, best_step: int | None) -> dict[str, Any] | None:
    """The first evaluation (GRPO's start) beside the kept one, and why training stopped early if it did."""
    if chooser is None or not chooser.evals or best_step is None:
        return None
    first = chooser.evals[0]
    kept = next((e for e in chooser.evals if e["step"] == best_step), chooser.evals[-1])
    keys = ("step", "macro_f1", "accuracy", "unparsed")
    return {"first": {k: first.get(k) for k in keys}, "kept": {k: kept.get(k) for k in keys},
            "collapsed": chooser.collapsed}  # fmt: skip


def chosen_step(chooser: Any, settings: TrainSettings, last_step: int) -> int | None:
    if chooser is None or chooser.best is None:
        return None
    return last_step if settings.select_by == "last" else int(chooser.best["step"])
