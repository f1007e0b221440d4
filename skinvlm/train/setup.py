"""What SFT and GRPO share before their trainers: the rows, the model, the processor at the run's resolution, the
collator and the first batch checked; and the trainer arguments both configs take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from skinvlm import devices
from skinvlm.prompts import instruction
from skinvlm.rules import Rules
from skinvlm.samples import Summary, chat_rows, summarize
from skinvlm.train.backends import collator_for, load
from skinvlm.train.preflight import Plan, import_unsloth
from skinvlm.train.rows import Rows, few_shot, training_rows, with_dev_split
from skinvlm.train_settings import TrainSettings
from skinvlm.vlm import check_chat_template, set_image_resolution
from skinvlm.workspace import Workspace


@dataclass
class Setup:
    """Everything that training and its dry run share."""

    plan: Plan
    rows: Rows
    model: Any
    processor: Any
    collator: Any
    summary: Summary


def set_up(ws: Workspace, rules: Rules, settings: TrainSettings, plan: Plan, dry_run: bool) -> Setup:
    """Rows, model (shape only in a dry run), processor at --max-pixels, collator, and the first batch checked."""
    if plan.backend == "unsloth":
        import_unsloth(plan.cuda)
    rows = training_rows(ws, rules, settings.keep_mismatches, settings.reviewed_only)
    rows = few_shot(with_dev_split(rows, settings), settings.per_class, settings.seed)
    if plan.cuda and not dry_run:
        import torch

        # Each DDP rank's CUDA context on its own GPU: loading with device_map {"": rank} alone leaves the
        # current device at cuda:0, where every rank would open a context.
        torch.cuda.set_device(devices.local_rank())
    model, processor = load(settings, plan.backend, plan.cuda, dry_run)
    set_image_resolution(processor, settings.max_pixels)
    check_chat_template(processor)
    collator = collator_for(plan.backend, model, processor, settings)
    prompt = instruction(rules)
    summary = summarize(
        collator,
        chat_rows(rows.data["train"], prompt),
        rows.data["train"],
        prompt,
        processor,
        settings,
        backend=plan.backend,
        skipped=rows.unusable,
        mismatched=rows.mismatched,
        review_left_out=rows.review_left_out,
        # A dry run reports the world that `train` would launch; a worker, the one it is in.
        world_size=devices.processes_wanted(settings.processes, settings.gpu) if dry_run else devices.world_size(),
    )
    summary.dev_rows = rows.data["dev"].num_rows if "dev" in rows.data else 0
    summary.method = settings.method
    return Setup(plan, rows, model, processor, collator, summary)


def trainer_args(setup: Setup, settings: TrainSettings) -> dict[str, Any]:
    """The TrainingArguments SFT's and GRPO's configs share: batches, schedule, checkpoints, logging, devices."""
    cuda, backend = setup.plan.cuda, setup.plan.backend
    return {
        "output_dir": str(setup.plan.output / "checkpoints"),
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": settings.warmup_steps,
        "weight_decay": settings.weight_decay,
        "optim": settings.optim,
        "max_grad_norm": settings.max_grad_norm,
        "max_steps": settings.max_steps if settings.epochs is None else -1,
        "num_train_epochs": settings.epochs or 1.0,
        "seed": settings.seed,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": settings.save_steps,
        "save_total_limit": settings.save_total_limit,
        "report_to": [] if settings.report_to == "none" else [settings.report_to],
        "bf16": cuda,
        "use_cpu": not cuda,
        "remove_unused_columns": False,
        # PNG decoding and the processor's resize run in these processes, beside the training step.
        "dataloader_num_workers": settings.dataloader_workers,
        "dataloader_persistent_workers": settings.dataloader_workers > 0,
        # Unsloth sets up its own gradient checkpointing; the trainer's would replace it.
        **checkpointing_args(cuda and backend == "hf"),
        "ddp_find_unused_parameters": False,
        "disable_tqdm": True,
    }


def checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing on or off, under the name the installed transformers reads: it became
    `activation_checkpointing` after 5.17 and the old name warns there (TRL's default sets it)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    prefix = "activation" if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)} else "gradient"
    args: dict[str, Any] = {f"{prefix}_checkpointing": enabled}
    if enabled:
        args[f"{prefix}_checkpointing_kwargs"] = {"use_reentrant": False}
    return args
