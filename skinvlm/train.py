"""`skinvlm train`: QLoRA with Unsloth on a GPU, or transformers + PEFT anywhere (CPU included).

Rows become chat samples (`samples.chat_rows`: the image, then the instruction; the answer) and
the loss covers only the answer and its end-of-turn token. Two backends behind one `if`:
`unsloth` (FastVisionModel, 4-bit, Unsloth's vision collator with responses-only training) and
`hf` (AutoModelForImageTextToText + PEFT LoRA, 4-bit via bitsandbytes on CUDA, our answer-only
collator). Both hand a TRL SFTTrainer the same samples and settings. Before step 1 one real
batch is collated and checked (`samples.summarize`); `--dry-run` stops there. `--gpu 0,1` or
`--processes N` relaunch the command under torchrun, one DDP process each.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from skinvlm import devices, selection
from skinvlm.errors import SkinvlmError, install_hint
from skinvlm.prompts import agrees, conversation, instruction, parse_answer
from skinvlm.rules import Rules
from skinvlm.samples import AnswerOnlyCollator, Summary, chat_rows, summarize, unsloth_collator
from skinvlm.train_settings import TrainSettings
from skinvlm.vlm import check_chat_template, load_processor, set_image_resolution, write_settings
from skinvlm.workspace import Workspace, manifest, now_iso, stage_fingerprint, write_manifest, writes

LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Vision blocks, and the merger MLP that projects image features into the language model.
VISION_TARGETS = r".*visual\.(blocks.*\.(qkv|attn\.proj|gate_proj|up_proj|down_proj)|merger\.mlp\.[02])"
UNSLOTH_ZOO_PIN = "unsloth_zoo==2026.10.9"
KEPT_16BIT = ("visual", "lm_head")  # modules (by name part) that 4-bit loading leaves in 16 bits


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

    def as_json(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if k not in ("summary", "log")}
        return fields | {"output": str(self.output), "summary": self.summary.as_json()}


@dataclass
class Plan:
    """What preflight settled before anything heavy loads."""

    backend: str
    cuda: bool
    output: Path
    resume_from: str | None
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # --resume: settings changed since


SETTINGS_SNAPSHOT = "train_settings.json"  # the effective settings of the last run into an output folder
MIN_FREE_GB = 2  # checkpoints of a 7B LoRA adapter with its optimizer state


# -- before anything heavy -------------------------------------------------------------------
def preflight(ws: Workspace, settings: TrainSettings, dry_run: bool) -> Plan:
    """Everything that can be checked in seconds, before torch loads a model: one line for each problem."""
    settings.check()
    ws.require(training_stage(ws))  # exists, and is not stale
    if Path(settings.model).exists():
        settings.model = str(Path(settings.model).resolve())  # merge, run from elsewhere, must find it
    devices.select_gpus(settings.gpu)
    cuda = devices.check_gpus(settings.gpu)
    backend = pick_backend(settings.backend, cuda, dry_run)
    settings.model = base_for_precision(settings.model, settings.load_in_4bit)
    check_base_model(settings.model, cuda, dry_run)
    # From here the settings say what will run, not what was asked: the dry run shows them, the manifest keeps them.
    settings.backend = backend
    settings.optim, settings.load_in_4bit = what_runs(settings, backend, cuda)
    if settings.report_to != "none" and importlib.util.find_spec(settings.report_to) is None:
        raise SkinvlmError(f"--report-to {settings.report_to} needs `pip install {settings.report_to}`")
    output = Path(settings.output).resolve() if settings.output else ws.adapter
    resume_from = newest_checkpoint(output) if settings.resume else None
    if settings.resume and resume_from is None:
        raise SkinvlmError(f"--resume: no checkpoint in {output / 'checkpoints'}")
    if not (settings.resume or dry_run) and (output / "adapter_config.json").exists():
        raise SkinvlmError(f"{output} already holds an adapter; pass --resume to continue it or --output elsewhere")
    if not dry_run:
        check_free_disk(output)
    return Plan(backend, cuda, output, resume_from, changed_since(output, settings) if settings.resume else {})


def is_prequantized(name: str) -> bool:
    """A base whose weights are stored in 4 bits: a local folder whose config says so, or an Unsloth 4-bit name."""
    from skinvlm.merge import UNSLOTH_4BIT_SUFFIXES

    config = Path(name) / "config.json"
    if Path(name).exists():
        return config.is_file() and '"quantization_config"' in config.read_text(encoding="utf-8")
    return name.endswith(UNSLOTH_4BIT_SUFFIXES)


def base_for_precision(name: str, load_in_4bit: bool) -> str:
    """--no-load-in-4bit asks for 16-bit weights: a pre-quantized Hub base gives way to its 16-bit twin
    (loading it would silently train in 4 bits); a pre-quantized local folder has none, so it stops."""
    from skinvlm.merge import sixteen_bit_twin

    if load_in_4bit or not is_prequantized(name):
        return name
    if Path(name).exists():
        raise SkinvlmError(
            f"--no-load-in-4bit: {name} holds 4-bit weights; pass --model with its 16-bit original "
            "(e.g. Qwen/Qwen2.5-VL-7B-Instruct) or drop --no-load-in-4bit"
        )
    twin = sixteen_bit_twin(name)
    import warnings

    warnings.warn(f"--no-load-in-4bit: training the 16-bit {twin} instead of the 4-bit {name}", stacklevel=2)
    return twin


def what_runs(settings: TrainSettings, backend: str, cuda: bool) -> tuple[str, bool]:
    """The optimizer and the 4-bit loading that will run: 8-bit and paged optimizers and the hf backend's 4-bit
    loading need bitsandbytes on CUDA (Unsloth brings its own); without it, AdamW in full precision and 16 bits."""
    bitsandbytes = cuda and importlib.util.find_spec("bitsandbytes") is not None
    needs_bitsandbytes = "8bit" in settings.optim or "paged" in settings.optim
    optim = settings.optim if bitsandbytes or not needs_bitsandbytes else "adamw_torch"
    four_bit = settings.load_in_4bit and cuda and (backend == "unsloth" or bitsandbytes)
    return optim, four_bit


def check_base_model(name: str, cuda: bool, dry_run: bool) -> None:
    """The base model can be found (a local folder, the Hugging Face cache, or the Hub), and a 4-bit base is
    only trained where CUDA is (bitsandbytes has no CPU kernels for training)."""
    folder = Path(name)
    if folder.exists() and not (folder / "config.json").is_file():
        raise SkinvlmError(f"--model {folder} holds no model (config.json missing)")
    if is_prequantized(name) and not cuda and not dry_run:
        raise SkinvlmError(
            f"{name} is a 4-bit (bitsandbytes) model, which trains only on CUDA: here, train a 16-bit base with "
            "--backend hf --model Qwen/Qwen2.5-VL-7B-Instruct (slow on a CPU), or make a smoke run on the tiny "
            "model (`python -m skinvlm.demo.tiny DIR`, then --model DIR)"
        )
    if not folder.exists():
        check_on_hub(name)


def check_on_hub(name: str) -> None:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise SkinvlmError(
            f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it where there is "
            f"network (`hf download {name}`), or pass a local folder with --model"
        )
    try:
        HfApi().model_info(name, timeout=8)
    except GatedRepoError:
        raise SkinvlmError(f"{name} is gated on the Hub: accept its terms there and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SkinvlmError(f"{name} is neither a folder here nor a model on the Hub: check --model") from None
    except Exception as err:  # noqa: BLE001 - whichever HTTP library huggingface_hub uses
        raise SkinvlmError(
            f"cannot reach the Hugging Face Hub to fetch {name} ({type(err).__name__}): check the network or "
            "HF_ENDPOINT, or pass a local folder with --model"
        ) from None


def check_free_disk(output: Path) -> None:
    folder = next(p for p in [output, *output.parents] if p.exists())
    free = shutil.disk_usage(folder).free / 2**30
    if free < MIN_FREE_GB:
        raise SkinvlmError(f"{free:.1f} GiB free under {folder}: checkpoints need about {MIN_FREE_GB} GiB; free some")


def changed_since(output: Path, settings: TrainSettings) -> dict[str, tuple[Any, Any]]:
    """Settings that differ from the run that wrote the checkpoints being resumed: {name: (then, now)}."""
    try:
        then = json.loads((output / SETTINGS_SNAPSHOT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    now = asdict(settings)
    return {k: (then.get(k), v) for k, v in now.items() if k not in ("resume",) and then.get(k) != v}


def pick_backend(requested: str, cuda: bool, dry_run: bool = False) -> str:
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "auto":
        return "unsloth" if cuda and has_unsloth else "hf"
    if requested == "unsloth" and cuda and not has_unsloth:
        raise SkinvlmError(f"--backend unsloth needs `{install_hint('train,gpu', pinned=True)}`")
    if requested == "unsloth" and not cuda:
        if not dry_run:
            raise SkinvlmError(
                "--backend unsloth needs CUDA: Unsloth cannot load vision models on the CPU; use --backend hf "
                "here, or --dry-run to check Unsloth's batches on the CPU"
            )
        if importlib.util.find_spec("unsloth_zoo") is None:
            raise SkinvlmError(
                "--backend unsloth --dry-run on a CPU needs Unsloth's collator: "
                f"`pip install --no-deps {UNSLOTH_ZOO_PIN}`"
            )
    return requested


def import_unsloth(cuda: bool) -> None:
    """Unsloth patches transformers, trl and peft as it is imported: imported after them, its patches miss.

    On a CPU (dry runs) only unsloth_zoo loads, with its GPU set-up switched off.
    """
    early = [name for name in ("transformers", "trl", "peft") if name in sys.modules]
    if early:
        raise SkinvlmError(f"internal error: {', '.join(early)} imported before Unsloth, which must come first")
    if not cuda:
        os.environ.setdefault("UNSLOTH_ZOO_DISABLE_GPU_INIT", "1")
    importlib.import_module("unsloth" if cuda else "unsloth_zoo")


# -- data ------------------------------------------------------------------------------------
def training_stage(ws: Workspace) -> str:
    return "fixed" if (ws.fixed / "dataset_dict.json").exists() else "described"


@dataclass
class Rows:
    """The training data: the text stage joined with images, only rows worth learning from."""

    data: Any
    stage: str
    unusable: int  # empty, failed or malformed answers
    mismatched: int  # answers whose <label> names another class than the folder (kept with --keep-mismatches)
    review_left_out: int = 0  # rejected or disputed by clinicians (and unreviewed, with --reviewed-only)


def left_out_by_review(outcome: str | None, reviewed_only: bool) -> bool:
    """Rejected and disputed records never teach; with --reviewed-only, neither do records no clinician read."""
    if reviewed_only:
        return outcome not in ("accepted", "edited")
    return outcome in ("rejected", "disputed")


def training_rows(ws: Workspace, rules: Rules, keep_mismatches: bool = False, reviewed_only: bool = False) -> Rows:
    import warnings

    stage = training_stage(ws)
    if stage == "described":
        warnings.warn("datasets/fixed is missing: training on datasets/described (run `skinvlm fix`)", stacklevel=2)
    data = ws.load(stage)
    unusable = mismatched = review_left_out = 0
    for split in list(data):
        ds = data[split]
        keep = []
        outcomes = ds["review"] if "review" in ds.column_names else [None] * ds.num_rows
        rows = zip(ds["output"], ds["status"], ds["label"], outcomes, strict=True)
        for i, (out, status, label, outcome) in enumerate(rows):
            if left_out_by_review(outcome, reviewed_only):
                review_left_out += 1
            elif status != "ok" or not parse_answer(out).well_formed:
                unusable += 1
            elif not (keep_mismatches or agrees(out, label, rules)):
                mismatched += 1  # the describer's mistake would be taught as the answer
            else:
                keep.append(i)
        data[split] = ds.select(keep) if len(keep) < ds.num_rows else ds
    if data["train"].num_rows == 0:
        raise SkinvlmError(
            f"no usable rows in datasets/{stage}: every output is empty, failed, malformed, names another class "
            "than its folder (see `skinvlm audit`) or was left out by the clinicians' review"
        )
    return Rows(data, stage, unusable, mismatched, review_left_out)


def with_dev_split(rows: Rows, settings: TrainSettings) -> Rows:
    """The training rows less a development share (`dev` in rows.data) when evaluations are asked for: the eval
    loss and the best step come from photos that neither train nor `eval` report on. Whole patients go to one
    side (a patient's other photos would make the development figures optimistic); each class keeps its share."""
    train = rows.data["train"]
    if not settings.eval_rows:
        return rows
    groups = train["patient"] if "patient" in train.column_names else train["id"]
    dev = development_indices(list(train["label"]), list(groups), settings.dev_fraction, settings.seed)
    if not dev or len(dev) == train.num_rows:
        return rows
    chosen = set(dev)
    rows.data["dev"] = train.select(sorted(dev))
    rows.data["train"] = train.select([i for i in range(train.num_rows) if i not in chosen])
    return rows


def development_indices(labels: list[str], groups: list[str], fraction: float, seed: int) -> list[int]:
    """Rows of whole groups (patients), about `fraction` of each class, seeded: each class's groups in a shuffled
    order, taken while the class's share is not yet reached; a class with one group keeps it for training."""
    import random

    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    by_class: dict[str, list[str]] = {}
    for group, rows in sorted(members.items()):
        by_class.setdefault(Counter(labels[i] for i in rows).most_common(1)[0][0], []).append(group)
    rng, chosen = random.Random(seed), []
    for label in sorted(by_class):
        candidates = by_class[label]
        rng.shuffle(candidates)
        target = max(1, round(fraction * sum(len(members[g]) for g in candidates)))
        taken = 0
        for group in candidates[:-1]:  # the last group always trains
            if taken >= target:
                break
            chosen += members[group]
            taken += len(members[group])
    return sorted(chosen)


def eval_rows(data: Any, settings: TrainSettings) -> Any | None:
    if not settings.eval_rows or "dev" not in data or not data["dev"].num_rows:
        return None
    dev = data["dev"].shuffle(seed=settings.seed)
    return dev.select(range(min(settings.eval_rows, dev.num_rows)))


# -- the two backends ------------------------------------------------------------------------
def lora_targets(settings: TrainSettings) -> str:
    chosen = [
        pattern
        for pattern, on in ((LANGUAGE_TARGETS, settings.finetune_language), (VISION_TARGETS, settings.finetune_vision))
        if on
    ]
    return f"({'|'.join(chosen)})"


def load_hf(settings: TrainSettings, cuda: bool) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    quantized = settings.load_in_4bit  # what_runs left it on only where bitsandbytes can load it
    if cuda:
        kwargs["device_map"] = {"": devices.local_rank()}
    if quantized:
        kwargs["quantization_config"] = quantization_config()
    model = AutoModelForImageTextToText.from_pretrained(settings.model, **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora_targets(settings),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), load_processor(settings.model)


def quantization_config() -> Any:
    """QLoRA's 4-bit NF4 for the language model only: the vision tower, its merger and the output head stay
    16-bit, as Unsloth keeps them, so both backends train the same model (and the merge into a 16-bit
    tower does not drift). The skip list replaces transformers' default, which holds only lm_head."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(KEPT_16BIT),
    )


def load_unsloth(settings: TrainSettings) -> tuple[Any, Any]:
    from unsloth import FastVisionModel

    # Unsloth's own processor is set aside for ours: one loader for both backends, the dry run, merge and eval,
    # so all see the same processor (for one it cannot resolve, Unsloth falls back to a text-only tokenizer).
    model, _ = FastVisionModel.from_pretrained(
        settings.model,
        load_in_4bit=settings.load_in_4bit,
        max_seq_length=settings.max_length,
        use_gradient_checkpointing="unsloth",
        device_map={"": devices.local_rank()},
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
    return model, load_processor(settings.model)


def shape_only_model(name: str) -> Any:
    """The model's structure and config on the meta device: all Unsloth's collator reads, no weights loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a 4-bit base's shapes are its 16-bit shapes; nothing is loaded
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def load(settings: TrainSettings, backend: str, cuda: bool, dry_run: bool) -> tuple[Any, Any]:
    if dry_run:
        return (shape_only_model(settings.model) if backend == "unsloth" else None), load_processor(settings.model)
    return load_unsloth(settings) if backend == "unsloth" else load_hf(settings, cuda)


def collator_for(backend: str, model: Any, processor: Any, settings: TrainSettings) -> Any:
    if backend == "unsloth":
        return unsloth_collator(model, processor, settings.max_length)
    return AnswerOnlyCollator(processor, settings.max_length)


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
    rows = with_dev_split(training_rows(ws, rules, settings.keep_mismatches, settings.reviewed_only), settings)
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
    return Setup(plan, rows, model, processor, collator, summary)


def dry_run(ws: Workspace, rules: Rules, settings: TrainSettings) -> Summary:
    """Build the rows and the backend's real collator, collate one batch, measure; no model weights, no step."""
    return set_up(ws, rules, settings, preflight(ws, settings, dry_run=True), dry_run=True).summary


def sft_config(settings: TrainSettings, output: Path, backend: str, cuda: bool, has_eval: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output / "checkpoints"),
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay,
        optim=settings.optim,
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
        max_length=settings.max_length,  # applied by both collators, which truncate
        report_to=[] if settings.report_to == "none" else [settings.report_to],
        bf16=cuda,
        use_cpu=not cuda,
        remove_unused_columns=False,
        # PNG decoding and the processor's resize run in these processes, beside the training step.
        dataloader_num_workers=settings.dataloader_workers,
        dataloader_persistent_workers=settings.dataloader_workers > 0,
        # Unsloth sets up its own gradient checkpointing; the trainer's would replace it.
        **checkpointing_args(cuda and backend == "hf"),
        ddp_find_unused_parameters=False,
        dataset_kwargs={"skip_prepare_dataset": True},  # the collators render and tokenize
        disable_tqdm=True,
    )


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


def build_trainer(setup: Setup, rules: Rules, settings: TrainSettings) -> Any:
    from trl import SFTTrainer

    prompt = instruction(rules)
    evaluation = eval_rows(setup.rows.data, settings)
    return SFTTrainer(
        model=setup.model,
        args=sft_config(settings, setup.plan.output, setup.plan.backend, setup.plan.cuda, evaluation is not None),
        train_dataset=chat_rows(setup.rows.data["train"], prompt),
        eval_dataset=chat_rows(evaluation, prompt) if evaluation is not None else None,
        processing_class=setup.processor,
        data_collator=setup.collator,
    )


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
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(entry) + "\n")
                if on_step:
                    on_step(entry | {"max_steps": state.max_steps})

    return JsonlLog()


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


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training, with what can be resumed: the newest checkpoint (None: none) and
    whether it was saved just now (one process saves at once; under DDP the last periodic one stands)."""

    def __init__(self, checkpoint: str | None, saved_now: bool) -> None:
        super().__init__()
        self.checkpoint, self.saved_now = checkpoint, saved_now


def newest_checkpoint(output: Path) -> str | None:
    found = sorted((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


@writes("train")
def train(
    ws: Workspace,
    rules: Rules,
    settings: TrainSettings,
    on_summary: Callable[[Summary, Plan], None] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train; `on_summary` sees the checked first batch before step 1, `on_step` every logged step (rank 0)."""
    plan = preflight(ws, settings, dry_run=False)
    started, clock = now_iso(), time.perf_counter()
    setup = set_up(ws, rules, settings, plan, dry_run=False)
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
    chooser = choosing_callback(setup, rules, settings, on_step)
    if chooser is not None:
        trainer.add_callback(chooser)
    vision = VisionCalls(trainer.model)
    try:
        trainer.train(resume_from_checkpoint=plan.resume_from)
    except KeyboardInterrupt:
        alone = devices.world_size() == 1
        if alone and trainer.state.global_step > 0:  # one process: save so --resume continues from here
            trainer._save_checkpoint(trainer.model, trial=None)
        raise TrainingInterrupted(newest_checkpoint(plan.output), alone and trainer.state.global_step > 0) from None
    trainer.save_model(str(plan.output))  # the trainer writes on rank 0 only
    best_step = chosen_step(chooser, settings, trainer.state.global_step)
    if main and chooser is not None:
        selection.keep_best(plan.output, best_step, trainer.state.global_step, settings.keep_checkpoints)
    evals = chooser.evals if chooser is not None else []
    log = read_log(log_path) if main else []  # rank 0 writes the log; the others return without it
    if main:
        save_outputs(ws, rules, settings, setup, log, started, evals, best_step)
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
    )


def choosing_callback(
    setup: Setup, rules: Rules, settings: TrainSettings, on_step: Callable[[dict[str, Any]], None] | None
) -> Any:
    """The callback that scores each evaluation and keeps the best adapter (selection.py); None without held-out
    rows, where there is nothing to choose by."""
    rows = eval_rows(setup.rows.data, settings)
    if rows is None:
        return None
    prompt_text = setup.processor.apply_chat_template(
        conversation(instruction(rules)), add_generation_prompt=True, tokenize=False
    )

    def shown(entry: dict[str, Any]) -> None:
        if on_step:
            on_step({f"eval_{k}": v for k, v in entry.items() if k != "step"} | {"step": entry["step"]})

    return selection.selection_callback(
        setup.plan.output, setup.processor, prompt_text, rows, rules, settings.select_by, settings.patience, shown
    )


def chosen_step(chooser: Any, settings: TrainSettings, last_step: int) -> int | None:
    if chooser is None or chooser.best is None:
        return None
    return last_step if settings.select_by == "last" else int(chooser.best["step"])


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def save_outputs(
    ws: Workspace,
    rules: Rules,
    settings: TrainSettings,
    setup: Setup,
    log: list[dict[str, Any]],
    started: str,
    evals: list[dict[str, Any]],
    best_step: int | None,
) -> None:
    output = setup.plan.output
    # A fresh processor, not the trainer's: the collators switch truncation on in the tokenizer they call,
    # and a saved tokenizer would keep cutting prompts at --max-length when serving.
    processor = load_processor(settings.model)
    set_image_resolution(processor, settings.max_pixels)
    processor.save_pretrained(str(output))
    write_settings(
        output,
        {
            "base_model": settings.model,
            "backend": setup.plan.backend,
            "max_pixels": settings.max_pixels,
            "instruction": instruction(rules),
            "classes": rules.class_names,
            "lora_r": settings.lora_r,
            "lora_alpha": settings.lora_alpha,
        },
    )
    plot_loss(log, output / "loss.png", f"{output.name}: {settings.model.rsplit('/', 1)[-1]}, {now_iso()[:16]} UTC")
    losses = [e["loss"] for e in log if "loss" in e]
    counts = {
        "splits": {s: d.num_rows for s, d in setup.rows.data.items()},
        "skipped_rows": setup.rows.unusable,
        "mismatched_rows_left_out": setup.rows.mismatched,
        "review_rows_left_out": setup.rows.review_left_out,
        "steps": max((e["step"] for e in log), default=0),
        "final_loss": losses[-1] if losses else None,
        "world_size": setup.summary.world_size,
        "effective_batch_size": setup.summary.effective_batch_size,
        "truncated_rows": setup.summary.truncated_rows,
        "evals": evals,
        "best_step": best_step,
    }
    stage = setup.rows.stage
    inputs = {"stage": stage, "fingerprint": stage_fingerprint(ws.dataset(stage)), "model": settings.model}
    settings_used = asdict(settings) | {"backend": setup.plan.backend}
    write_manifest(output, manifest("train", settings_used, inputs, counts, started))


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_vram_mb(reserved: bool = False) -> float:
    import torch

    peak = torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()
    return round(peak / 2**20, 1)


def plot_loss(log: list[dict[str, Any]], path: Path, title: str) -> None:
    """Train and eval loss, and the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=120)
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        points = [(e["step"], e[key]) for e in log if key in e]
        if points:
            axis.plot(*zip(*points, strict=True), style, label=label, markersize=4)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
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
