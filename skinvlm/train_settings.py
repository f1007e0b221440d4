"""train's settings: every flag of `skinvlm train` with its default, and the checks that hold for flags and
config files alike. A module of its own: the collators (samples) read them without importing training."""

from __future__ import annotations

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
}


SELECT_BY = ("macro_f1", "loss", "last")  # what the kept adapter is best by (selection.py)


@dataclass
class TrainSettings:
    model: str = DEFAULT_BASE
    backend: str = "auto"
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

    def check(self) -> None:
        check_choice("--backend", self.backend, Backend)
        check_choice("--report-to", self.report_to, ReportTo)
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
