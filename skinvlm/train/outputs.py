"""What a finished run leaves beside its adapter: the processor, skinvlm.json, loss.png and the manifest."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from skinvlm.prompts import instruction
from skinvlm.rules import Rules
from skinvlm.samples import Summary
from skinvlm.train.preflight import Plan
from skinvlm.train.rewards import reward_log
from skinvlm.train.rows import Rows
from skinvlm.train_settings import TrainSettings
from skinvlm.vlm import load_processor, set_image_resolution, write_settings
from skinvlm.workspace import Workspace, manifest, now_iso, stage_fingerprint, write_manifest


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def save_outputs(
    ws: Workspace,
    rules: Rules,
    settings: TrainSettings,
    plan: Plan,
    rows: Rows,
    summary: Summary,
    log: list[dict[str, Any]],
    started: str,
    evals: list[dict[str, Any]],
    best_step: int | None,
) -> None:
    output = plan.output
    # A fresh processor, not the trainer's: the collators switch truncation on in the tokenizer they call,
    # and a saved tokenizer would keep cutting prompts at --max-length when serving.
    processor = load_processor(settings.model)
    set_image_resolution(processor, settings.max_pixels)
    processor.save_pretrained(str(output))
    write_settings(
        output,
        {
            "base_model": settings.model,
            "backend": plan.backend,
            "max_pixels": settings.max_pixels,
            "instruction": instruction(rules),
            "classes": rules.class_names,
            "lora_r": settings.lora_r,
            "lora_alpha": settings.lora_alpha,
            "method": settings.method,
            **({"from_adapter": settings.from_adapter} if settings.from_adapter else {}),
        },
    )
    plot_loss(log, output / "loss.png", f"{output.name}: {settings.model.rsplit('/', 1)[-1]}, {now_iso()[:16]} UTC")
    losses = [e["loss"] for e in log if "loss" in e]
    counts = {
        "splits": {s: d.num_rows for s, d in rows.data.items()},
        "skipped_rows": rows.unusable,
        "mismatched_rows_left_out": rows.mismatched,
        "review_rows_left_out": rows.review_left_out,
        "steps": max((e["step"] for e in log), default=0),
        "final_loss": losses[-1] if losses else None,
        "world_size": summary.world_size,
        "effective_batch_size": summary.effective_batch_size,
        "truncated_rows": summary.truncated_rows,
        "evals": evals,
        "best_step": best_step,
        "method": settings.method,
    }
    if rewards := reward_log(log):
        counts["mean_reward"] = {"first": rewards[0]["mean"], "last": rewards[-1]["mean"]}
    stage = rows.stage
    inputs = {"stage": stage, "fingerprint": stage_fingerprint(ws.dataset(stage)), "model": settings.model}
    if settings.from_adapter:
        inputs["from_adapter"] = settings.from_adapter
    settings_used = asdict(settings) | {"backend": plan.backend}
    write_manifest(output, manifest("train", settings_used, inputs, counts, started))


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_vram_mb(reserved: bool = False) -> float:
    import torch

    peak = torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()
    return round(peak / 2**20, 1)


def plot_loss(log: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and eval loss (GRPO: the mean reward, its loss being no likelihood), and the learning rate on a second
    axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    grpo = any("reward" in e for e in log)
    curves = (
        (("reward", "mean reward", "-"),) if grpo else (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-"))
    )
    for key, label, style in curves:
        points = [(e["step"], e[key]) for e in log if key in e]
        if points:
            axis.plot(*zip(*points, strict=True), style, label=label, markersize=4)
    axis.set_xlabel("step")
    axis.set_ylabel("reward" if grpo else "loss")
    axis.grid(alpha=0.3)
    rates = [(e["step"], e["learning_rate"]) for e in log if "learning_rate" in e]
    handles, labels = axis.get_legend_handles_labels()
    if rates:
        second = axis.twinx()
        (line,) = second.plot(*zip(*rates, strict=True), color="tab:gray", linestyle="--", linewidth=1)
        second.set_ylabel("learning rate")
        handles, labels = [*handles, line], [*labels, "learning rate"]
    axis.legend(handles, labels, loc="upper right")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
