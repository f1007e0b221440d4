"""Supervised fine-tuning: TRL's SFTTrainer on the chat samples, the loss on the answer only."""

from __future__ import annotations

from typing import Any

from skinvlm.prompts import instruction
from skinvlm.rules import Rules
from skinvlm.samples import chat_rows
from skinvlm.train.rows import eval_rows
from skinvlm.train.setup import Setup, trainer_args
from skinvlm.train_settings import TrainSettings


def sft_config(setup: Setup, settings: TrainSettings, has_eval: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        **trainer_args(setup, settings),
        per_device_eval_batch_size=settings.batch_size,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=settings.eval_steps,
        max_length=settings.max_length,  # applied by both collators, which truncate
        dataset_kwargs={"skip_prepare_dataset": True},  # the collators render and tokenize
    )


def build_trainer(setup: Setup, rules: Rules, settings: TrainSettings) -> Any:
    from trl import SFTTrainer

    prompt = instruction(rules)
    evaluation = eval_rows(setup.rows.data, settings)
    return SFTTrainer(
        model=setup.model,
        args=sft_config(setup, settings, evaluation is not None),
        train_dataset=chat_rows(setup.rows.data["train"], prompt),
        eval_dataset=chat_rows(evaluation, prompt) if evaluation is not None else None,
        processing_class=setup.processor,
        data_collator=setup.collator,
    )
