"""GRPO after SFT: from a trained adapter, answers to the training photos are sampled (`--num-generations` per
photo, at `--temperature`), scored by the rewards (rewards.py), and the adapter moves toward the answers that
scored above their group's mean (TRL's GRPOTrainer: clipped ratio, KL to the start with --beta).

The prompt is `conversation(instruction(rules))`, the chat SFT, eval and serve use, so parity holds. Held-out
scoring for `--select-by macro_f1` runs every --eval-steps on the development rows, as in SFT (selection.py);
GRPO's own evaluation (sampling on the eval rows) is not asked for: its figures are rewards, not class scores.

Why the defaults (temperature 0.3, KL weight 0): on the tiny CPU model, sampling at temperature 1.0 gave almost
no answer that parses (every group scored alike: nothing to learn). `--min-p 0.1` mends that (it drops the
unlikely tokens that break the answer's form, the classes the model hesitates between stay in the draw) and the
sampled label reward rose further (0.06 to 0.35 in 60 steps), yet the greedy answers `eval` scores gained less
than after training at 0.3, whose samples lie closer to the greedy answer: 0.3 is the default, min-p is off.
KL weight 0 (TRL's default, as in DAPO and Dr. GRPO): no reference model in memory; the ratio clipping
(epsilon 0.2) bounds each step.
"""

from __future__ import annotations

from typing import Any

from skinvlm.prompts import conversation, instruction
from skinvlm.rules import Rules
from skinvlm.samples import prompt_rows
from skinvlm.train.rewards import reward_functions, scores
from skinvlm.train.setup import Setup, trainer_args
from skinvlm.train_settings import TrainSettings
from skinvlm.vlm import END_OF_TURN

DRY_RUN_PHOTOS = 2  # photos whose sampled answers the dry run scores


def grpo_config(setup: Setup, settings: TrainSettings, weights: list[float]) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        **trainer_args(setup, settings),
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_tokens,
        temperature=settings.temperature,
        min_p=settings.min_p or None,
        beta=settings.beta,
        reward_weights=weights,
        eval_strategy="no",
        log_completions=False,
    )


def build_trainer(setup: Setup, rules: Rules, settings: TrainSettings) -> Any:
    from trl import GRPOTrainer

    functions, weights = reward_functions(rules, settings)
    return GRPOTrainer(
        model=setup.model,
        reward_funcs=functions,
        args=grpo_config(setup, settings, weights),
        train_dataset=prompt_rows(setup.rows.data["train"], instruction(rules)),
        processing_class=setup.processor,
    )


def sample_rewards(setup: Setup, rules: Rules, settings: TrainSettings) -> list[dict[str, Any]]:
    """What GRPO would see first: `--num-generations` answers sampled for a few training photos and their rewards."""
    import torch

    from skinvlm.images import as_rgb

    model, processor = setup.model, setup.processor
    text = processor.apply_chat_template(conversation(instruction(rules)), add_generation_prompt=True, tokenize=False)
    rows = setup.rows.data["train"].select(range(min(DRY_RUN_PHOTOS, setup.rows.data["train"].num_rows)))
    ends = {processor.tokenizer.convert_tokens_to_ids(END_OF_TURN), processor.tokenizer.eos_token_id}
    torch.manual_seed(settings.seed)
    sampled = []
    model.eval()
    for row in rows:
        inputs = processor(text=[text], images=[as_rgb(row["image"])], return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=settings.temperature,
                min_p=settings.min_p or None,
                max_new_tokens=settings.max_completion_tokens,
                num_return_sequences=settings.num_generations,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        for ids, answer in zip(new, processor.batch_decode(new, skip_special_tokens=True), strict=True):
            truncated = not ends.intersection(ids.tolist())
            scored = scores(answer, row["label"], rules, settings, truncated)
            sampled.append({"id": row["id"], "class": row["label"], "answer": answer} | scored)
    return sampled
