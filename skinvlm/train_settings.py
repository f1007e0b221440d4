"""train's settings: every flag of `skinvlm train` with its default, and the checks that hold for flags and
config files alike. A module of its own: the collators (samples) read them without importing training."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from skinvlm.config import check_choice
from skinvlm.errors import SkinvlmError

DEFAULT_BASE = "unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit"
# At most 1,024 vision tokens per image (28x28 pixels each after 2x2 merging): a 1024x1024 photo
# is seen at 896x896 instead of ~1,369 tokens at full size, 25% fewer, with lesion detail kept.
DEFAULT_MAX_PIXELS = 1024 * 28 * 28


class Backend(StrEnum):
    auto = "auto"
    unsloth = "unsloth"
    hf = "hf"


class Method(StrEnum):
    sft = "sft"
    grpo = "grpo"


class ReportTo(StrEnum):
    none = "none"
    wandb = "wandb"
    tensorboard = "tensorboard"


# The smallest value each count may take; checked for flags and config files alike.
LOWEST = {
    "max_steps": 1,
    "lora_r": 1,
    "lora_alpha": 1,
    "batch_size": 1,
    "grad_accum": 1,
    "warmup_steps": 0,
    "weight_decay": 0,
    "eval_steps": 1,
    "eval_rows": 0,
    "save_steps": 1,
    "save_total_limit": 1,
    "dataloader_workers": 0,
    "num_generations": 2,
    "max_completion_tokens": 8,
}


SELECT_BY = ("macro_f1", "loss", "last")  # what the kept adapter is best by (selection.py)


@dataclass
class TrainSettings:
    model: str = DEFAULT_BASE
    backend: str = "auto"
    method: str = "sft"  # sft: learn the answers; grpo: from an SFT adapter, reward sampled answers (train/grpo.py)
    from_adapter: str | None = None  # --from: the SFT adapter GRPO starts from
    per_class: int | None = None  # few-shot: a seeded sample of N training photos per class
    max_steps: int = 3000
    epochs: float | None = None
    learning_rate: float = 5e-5
    lora_r: int = 128
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    finetune_vision: bool = True
    finetune_language: bool = True
    batch_size: int = 2
    grad_accum: int = 4
    warmup_steps: int = 5
    weight_decay: float = 0.01
    optim: str = "adamw_8bit"
    max_grad_norm: float = 5.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_length: int = 4096
    seed: int = 1234
    eval_steps: int = 50
    eval_rows: int = 64
    dev_fraction: float = 0.1  # of the training photos, held out as development rows when eval_rows > 0
    save_steps: int = 200
    save_total_limit: int = 3
    dataloader_workers: int = 2
    resume: bool = False
    keep_mismatches: bool = False
    reviewed_only: bool = False
    select_by: str = "macro_f1"  # which evaluation's adapter is kept: macro_f1 (class scores), loss or last
    patience: int | None = None  # stop after this many evaluations without improvement
    keep_checkpoints: bool = False  # keep the best evaluation's adapter folder (models/adapter/best) too
    report_to: str = "none"
    load_in_4bit: bool = True
    gpu: str | None = None
    processes: int | None = None
    output: str | None = None
    # GRPO (--method grpo): answers sampled per photo, each at most this many tokens, at this temperature; the KL
    # weight to the SFT start; the rewards' weights (label weighs 1) and the credit for a class of the same group.
    num_generations: int = 8
    max_completion_tokens: int = 256
    temperature: float = 0.3
    min_p: float = 0.0  # sampling drops tokens less likely than this share of the likeliest one (0: none)
    beta: float = 0.0
    format_weight: float = 0.5
    length_weight: float = 0.0
    group_credit: float = 0.5

    def check(self) -> None:
        check_choice("--backend", self.backend, Backend)
        check_choice("--report-to", self.report_to, ReportTo)
        check_choice("--method", self.method, Method)
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise SkinvlmError(f"--{name.replace('_', '-')} must be a finite number, not {value}")
        if self.method == "sft" and self.from_adapter:
            raise SkinvlmError("--from is where --method grpo starts; SFT starts from --model: drop --from")
        if self.max_pixels < 28 * 28 * 4:
            raise SkinvlmError("--max-pixels must be at least 3136 (56x56)")
        if self.max_length < 64:
            raise SkinvlmError("--max-length must be at least 64 tokens")
        for name, lowest in LOWEST.items():
            if getattr(self, name) < lowest:
                raise SkinvlmError(f"--{name.replace('_', '-')} must be at least {lowest}, not {getattr(self, name)}")
        if self.learning_rate <= 0 or self.max_grad_norm <= 0 or (self.epochs is not None and self.epochs <= 0):
            raise SkinvlmError("--learning-rate, --max-grad-norm and --epochs must be above 0")
        if not 0 <= self.lora_dropout < 1:
            raise SkinvlmError(f"--lora-dropout must be in [0, 1), not {self.lora_dropout}")
        if not 0 < self.dev_fraction < 0.5:
            raise SkinvlmError(f"--dev-fraction is a share of the training photos in (0, 0.5), not {self.dev_fraction}")
        if self.select_by not in SELECT_BY:
            raise SkinvlmError(f"--select-by is one of {', '.join(SELECT_BY)}, not {self.select_by!r}")
        if self.patience is not None and self.patience < 1:
            raise SkinvlmError(f"--patience counts evaluations: at least 1, not {self.patience}")
        if not (self.finetune_vision or self.finetune_language):
            raise SkinvlmError("LoRA needs the vision layers, the language layers or both")
        if self.per_class is not None and self.per_class < 1:
            raise SkinvlmError(f"--per-class is a number of photos per class: at least 1, not {self.per_class}")
        if self.method == "grpo":
            self.check_grpo()

    def check_grpo(self) -> None:
        if not self.from_adapter:
            raise SkinvlmError(
                "--method grpo starts from a trained SFT adapter: pass --from models/adapter (or another)"
            )
        if self.temperature <= 0 or self.beta < 0 or self.format_weight < 0 or self.length_weight < 0:
            raise SkinvlmError("--temperature must be above 0; --beta, --format-weight and --length-weight at least 0")
        if not 0 <= self.min_p < 1:
            raise SkinvlmError(f"--min-p is a share of the likeliest token's probability in [0, 1), not {self.min_p}")
        if not 0 <= self.group_credit < 1:
            raise SkinvlmError(
                f"--group-credit is a share of a right answer's reward in [0, 1), not {self.group_credit}"
            )
        if self.select_by == "loss":
            raise SkinvlmError(
                "--select-by loss means nothing for GRPO (its loss is no likelihood): use macro_f1 or last"
            )
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise SkinvlmError(
                f"GRPO samples --num-generations {self.num_generations} answers per photo in each step's batch: "
                f"--batch-size x --grad-accum ({self.batch_size} x {self.grad_accum}) must be a multiple of it"
            )
