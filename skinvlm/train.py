"""`skinvlm train`: QLoRA with Unsloth on a GPU, or transformers + PEFT anywhere (CPU included).

Rows become chat samples (user: the instruction + the image; assistant: the cleaned answer) and
the loss covers only the assistant answer. Two backends behind one `if`: `unsloth`
(FastVisionModel, 4-bit, UnslothVisionDataCollator with responses-only training) and `hf`
(AutoModelForImageTextToText + PEFT LoRA, 4-bit via bitsandbytes only on CUDA, TRL's
assistant-only loss). Both hand a TRL SFTTrainer the same dataset and settings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError
from skinvlm.prompts import instruction, parse_answer
from skinvlm.rules import Rules
from skinvlm.vlm import load_processor, set_image_resolution, write_settings
from skinvlm.workspace import Workspace, manifest, now_iso, stage_fingerprint

DEFAULT_BASE = "unsloth/Qwen2.5-VL-7B-Instruct-unsloth-bnb-4bit"
# At most 1,024 vision tokens per image (28x28 pixels each after 2x2 merging): a 1024x1024 photo
# is seen at 896x896 instead of ~1,369 tokens at full size, 25% fewer, with lesion detail kept.
DEFAULT_MAX_PIXELS = 1024 * 28 * 28
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Vision blocks, and the merger MLP that projects image features into the language model.
VISION_TARGETS = r".*visual\.(blocks.*\.(qkv|attn\.proj|gate_proj|up_proj|down_proj)|merger\.mlp\.[02])"


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
    save_steps: int = 200
    save_total_limit: int = 3
    resume: bool = False
    report_to: str = "none"
    load_in_4bit: bool = True
    gpu: str | None = None
    output: str | None = None

    def check(self) -> None:
        if self.backend not in ("auto", "unsloth", "hf"):
            raise SkinvlmError(f"--backend must be auto, unsloth or hf, not {self.backend!r}")
        if self.report_to not in ("none", "wandb", "tensorboard"):
            raise SkinvlmError(f"--report-to must be none, wandb or tensorboard, not {self.report_to!r}")
        if self.max_pixels < 28 * 28 * 4:
            raise SkinvlmError("--max-pixels must be at least 3136 (56x56)")
        if not (self.finetune_vision or self.finetune_language):
            raise SkinvlmError("LoRA needs the vision layers, the language layers or both")


@dataclass
class TrainResult:
    output: Path
    backend: str
    steps: int
    rows: int
    skipped: int
    final_loss: float | None
    seconds: float
    peak_rss_mb: float
    log: list[dict[str, Any]] = field(default_factory=list)


def select_gpus(gpu: str | None) -> None:
    """Must run before torch is imported: CUDA reads CUDA_VISIBLE_DEVICES once."""
    if gpu is None:
        return
    ids = [g.strip() for g in gpu.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise SkinvlmError(f"--gpu takes GPU numbers like 0 or 0,1; got {gpu!r}")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)


def check_gpus(gpu: str | None) -> bool:
    import torch

    if gpu is None:
        return torch.cuda.is_available()
    wanted = len(gpu.split(","))
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < wanted:
        raise SkinvlmError(
            f"--gpu {gpu} asks for {wanted} GPU(s) but CUDA sees {found} here "
            "(run without --gpu to train on the CPU with --backend hf)"
        )
    return True


def pick_backend(requested: str, cuda: bool) -> str:
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth" and not (cuda and has_unsloth):
        raise SkinvlmError(
            "--backend unsloth needs CUDA and `pip install -e .[gpu]`: Unsloth cannot load "
            "vision models on the CPU; use --backend hf there"
        )
    backend = ("unsloth" if cuda and has_unsloth else "hf") if requested == "auto" else requested
    if backend == "hf":
        check_assistant_masking()
    return backend


def check_assistant_masking() -> None:
    """TRL masks all but the answer of vision samples only with transformers>=5.18 (the unsloth pins exclude it)."""
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("transformers")) < Version("5.18.0.dev0"):
        raise SkinvlmError(
            f"--backend hf needs transformers>=5.18 for answer-only loss on images (found "
            f"{version('transformers')}); use --backend unsloth on that stack"
        )


# -- data ------------------------------------------------------------------------------------
def training_rows(ws: Workspace) -> tuple[Any, str, int]:
    """The text stage joined with images, only rows with a usable answer; (data, stage, skipped)."""
    import warnings

    stage = "fixed" if (ws.fixed / "dataset_dict.json").exists() else "described"
    if stage == "described":
        warnings.warn("datasets/fixed is missing: training on datasets/described (run `skinvlm fix`)", stacklevel=2)
    data = ws.load(stage)
    skipped = 0
    for split in list(data):
        ds = data[split]
        keep = [
            i
            for i, (out, status) in enumerate(zip(ds["output"], ds["status"], strict=True))
            if status == "ok" and parse_answer(out).well_formed
        ]
        skipped += ds.num_rows - len(keep)
        data[split] = ds.select(keep) if len(keep) < ds.num_rows else ds
    if data["train"].num_rows == 0:
        raise SkinvlmError(
            f"no usable rows in datasets/{stage}: every output is empty, failed or malformed (see `skinvlm audit`)"
        )
    return data, stage, skipped


def chat_dataset(ds: Any, rules: Rules) -> Any:
    """`messages` (text, built without touching images) joined with the `image` column, no copy."""
    from datasets import Dataset, concatenate_datasets

    prompt = instruction(rules)
    messages = Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                for answer in ds["output"]
            ]
        }
    )
    return concatenate_datasets([ds.select_columns(["image"]), messages], axis=1)


# -- the two backends ------------------------------------------------------------------------
def load_hf(settings: TrainSettings, cuda: bool) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda and settings.load_in_4bit and importlib.util.find_spec("bitsandbytes"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForImageTextToText.from_pretrained(settings.model, **kwargs)
    targets = "|".join(
        t
        for t, on in ((LANGUAGE_TARGETS, settings.finetune_language), (VISION_TARGETS, settings.finetune_vision))
        if on
    )
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=f"({targets})",
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), load_processor(settings.model)


def load_unsloth(settings: TrainSettings) -> tuple[Any, Any]:
    from unsloth import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(
        settings.model, load_in_4bit=settings.load_in_4bit, use_gradient_checkpointing="unsloth"
    )
    model = FastVisionModel.get_peft_model(
        model,
        finetune_vision_layers=settings.finetune_vision,
        finetune_language_layers=settings.finetune_language,
        finetune_attention_modules=True,
        finetune_mlp_modules=True,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        bias="none",
        random_state=settings.seed,
    )
    FastVisionModel.for_training(model)
    return model, processor


def sft_config(settings: TrainSettings, output: Path, backend: str, cuda: bool, has_eval: bool) -> Any:
    from trl import SFTConfig

    optim = settings.optim if cuda and importlib.util.find_spec("bitsandbytes") else "adamw_torch"
    return SFTConfig(
        output_dir=str(output / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        optim=optim,
        max_grad_norm=settings.max_grad_norm,
        max_steps=settings.max_steps if settings.epochs is None else -1,
        num_train_epochs=settings.epochs or 1.0,
        seed=settings.seed,
        logging_steps=1,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        max_length=settings.max_length,
        report_to=[] if settings.report_to == "none" else [settings.report_to],
        bf16=cuda,
        use_cpu=not cuda,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        gradient_checkpointing=cuda,
        assistant_only_loss=backend == "hf",
        dataset_kwargs={"skip_prepare_dataset": True} if backend == "unsloth" else None,
        disable_tqdm=True,
    )


def build_trainer(settings: TrainSettings, rules: Rules, data: Any, backend: str, cuda: bool, output: Path) -> Any:
    from trl import SFTTrainer

    model, processor = load_unsloth(settings) if backend == "unsloth" else load_hf(settings, cuda)
    set_image_resolution(processor, settings.max_pixels)
    train_set = chat_dataset(data["train"], rules)
    eval_set = None
    if settings.eval_rows and "test" in data and data["test"].num_rows:
        test = data["test"].shuffle(seed=settings.seed).select(range(min(settings.eval_rows, data["test"].num_rows)))
        eval_set = chat_dataset(test, rules)
    collator = None
    if backend == "unsloth":
        from unsloth.trainer import UnslothVisionDataCollator

        collator = UnslothVisionDataCollator(
            model,
            processor,
            train_on_responses_only=True,
            instruction_part="<|im_start|>user\n",
            response_part="<|im_start|>assistant\n",
        )
    return SFTTrainer(
        model=model,
        args=sft_config(settings, output, backend, cuda, eval_set is not None),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=processor,
        data_collator=collator,
    )


# -- the stage -------------------------------------------------------------------------------
def log_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Every logged step as one flushed JSON line, so a crash keeps the curve so far."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

    return JsonlLog()


def newest_checkpoint(output: Path) -> str | None:
    found = sorted((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def train(ws: Workspace, rules: Rules, settings: TrainSettings) -> TrainResult:
    settings.check()
    select_gpus(settings.gpu)
    cuda = check_gpus(settings.gpu)
    backend = pick_backend(settings.backend, cuda)
    started, clock = now_iso(), time.perf_counter()
    output = Path(settings.output) if settings.output else ws.adapter
    resume_from = newest_checkpoint(output) if settings.resume else None
    if settings.resume and resume_from is None:
        raise SkinvlmError(f"--resume: no checkpoint in {output / 'checkpoints'}")
    if not settings.resume and (output / "adapter_config.json").exists():
        raise SkinvlmError(f"{output} already holds an adapter; pass --resume to continue it or --output elsewhere")
    data, stage, skipped = training_rows(ws)
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "train_log.jsonl"
    if not settings.resume:
        log_path.unlink(missing_ok=True)
    trainer = build_trainer(settings, rules, data, backend, cuda, output)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the JSONL log replaces dict printouts on stdout
    trainer.add_callback(log_callback(log_path))
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:
        trainer._save_checkpoint(trainer.model, trial=None)  # so --resume continues from here
        raise
    trainer.save_model(str(output))
    trainer.processing_class.save_pretrained(str(output))
    write_settings(
        output,
        {
            "base_model": settings.model,
            "backend": backend,
            "max_pixels": settings.max_pixels,
            "instruction": instruction(rules),
            "classes": rules.class_names,
            "lora_r": settings.lora_r,
            "lora_alpha": settings.lora_alpha,
        },
    )
    log = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()]
    plot_loss(log, output / "loss.png")
    losses = [e["loss"] for e in log if "loss" in e]
    result = TrainResult(
        output,
        backend,
        trainer.state.global_step,
        data["train"].num_rows,
        skipped,
        losses[-1] if losses else None,
        round(time.perf_counter() - clock, 1),
        peak_rss_mb(),
        log,
    )
    counts = {
        "splits": {s: d.num_rows for s, d in data.items()},
        "skipped_rows": skipped,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": result.seconds,
    }
    inputs = {"stage": stage, "fingerprint": stage_fingerprint(ws.dataset(stage)), "model": settings.model}
    from skinvlm.workspace import write_manifest

    write_manifest(output, manifest("train", asdict(settings) | {"backend": backend}, inputs, counts, started))
    return result


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def plot_loss(log: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = [(e["step"], e[key]) for e in log if key in e]
        if points:
            axis.plot(*zip(*points, strict=True), label=label, marker="." if key == "eval_loss" else None)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
