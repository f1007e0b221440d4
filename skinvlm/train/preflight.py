"""What `train` checks in seconds, before torch loads a model: settings, data stage, GPUs, backend, base model,
output folder, disk; each problem one line. Also the import order Unsloth needs."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from skinvlm import devices
from skinvlm.errors import SkinvlmError, install_hint
from skinvlm.rules import Rules
from skinvlm.train.rows import training_stage
from skinvlm.train_settings import DEFAULT_BASE, DEFAULT_MAX_PIXELS, TrainSettings
from skinvlm.workspace import Workspace

UNSLOTH_ZOO_PIN = "unsloth_zoo==2026.10.9"


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
def preflight(ws: Workspace, rules: Rules, settings: TrainSettings, dry_run: bool) -> Plan:
    """Everything that can be checked in seconds, before torch loads a model: one line for each problem."""
    settings.check()
    ws.require(training_stage(ws))  # exists, and is not stale
    if settings.method == "grpo":
        start_from_adapter(settings, rules.class_names)
        check_grpo_kernels()
    if Path(settings.model).exists():
        settings.model = str(Path(settings.model).resolve())  # merge, run from elsewhere, must find it
    devices.select_gpus(settings.gpu)
    cuda = devices.check_gpus(settings.gpu)
    backend = pick_backend(settings.backend, cuda, dry_run, settings.method)
    settings.model = base_for_precision(settings.model, settings.load_in_4bit)
    check_base_model(settings.model, cuda, dry_run)
    # From here the settings say what will run, not what was asked: the dry run shows them, the manifest keeps them.
    settings.backend = backend
    settings.optim, settings.load_in_4bit = what_runs(settings, backend, cuda)
    if settings.report_to != "none" and importlib.util.find_spec(settings.report_to) is None:
        raise SkinvlmError(f"--report-to {settings.report_to} needs `pip install {settings.report_to}`")
    output = Path(settings.output).resolve() if settings.output else default_output(ws, settings.method)
    resume_from = newest_checkpoint(output) if settings.resume else None
    if settings.resume and resume_from is None:
        raise SkinvlmError(f"--resume: no checkpoint in {output / 'checkpoints'}")
    finished = (
        output / "manifest.json"
    ).is_file()  # a run that ended and saved its adapter (an interrupted one has none)
    if resume_from and finished and (done := checkpoint_step(Path(resume_from))) >= settings.max_steps:
        raise SkinvlmError(
            f"--resume: the run in {output} finished, its newest checkpoint at step {done}, and --max-steps is "
            f"{settings.max_steps}: nothing is left to train; raise --max-steps to go on"
        )
    if not (settings.resume or dry_run) and (output / "adapter_config.json").exists():
        raise SkinvlmError(f"{output} already holds an adapter; pass --resume to continue it or --output elsewhere")
    if not dry_run:
        check_free_disk(output)
    return Plan(backend, cuda, output, resume_from, changed_since(output, settings) if settings.resume else {})


def default_output(ws: Workspace, method: str) -> Path:
    """models/adapter for SFT; models/adapter-grpo for GRPO, beside the SFT adapter it starts from."""
    return ws.adapter if method == "sft" else ws.adapter.with_name(f"{ws.adapter.name}-grpo")


def start_from_adapter(settings: TrainSettings, classes: list[str]) -> None:
    """GRPO continues an SFT adapter: its base model and image resolution are the run's (the photos must reach the
    model as they did in SFT), and its classes must be the rule file's."""
    from skinvlm.vlm import read_settings

    folder = Path(settings.from_adapter or "").resolve()
    if not (folder / "adapter_config.json").is_file():
        raise SkinvlmError(
            f"--from {folder} holds no adapter (adapter_config.json missing): train one with --method sft"
        )
    check_adapter_files(folder)
    recorded = read_settings(folder)
    base, pixels = recorded.get("base_model"), recorded.get("max_pixels")
    if not base:
        raise SkinvlmError(f"--from {folder}/skinvlm.json names no base model: was it written by `skinvlm train`?")
    if settings.model not in (DEFAULT_BASE, base):
        raise SkinvlmError(
            f"--model {settings.model}: the adapter in --from {folder} was trained on {base}; drop --model"
        )
    if pixels and settings.max_pixels not in (DEFAULT_MAX_PIXELS, pixels):
        raise SkinvlmError(
            f"--max-pixels {settings.max_pixels}: the adapter in --from was trained at {pixels}; drop it"
        )
    if recorded.get("classes") and list(recorded["classes"]) != classes:
        raise SkinvlmError(
            f"the adapter in --from {folder} names the classes {', '.join(recorded['classes'])}; the rule file "
            f"has {', '.join(classes)}: train a new SFT adapter on these classes first"
        )
    settings.from_adapter, settings.model = str(folder), base
    settings.max_pixels = pixels or settings.max_pixels


def check_adapter_files(folder: Path) -> None:
    """An adapter's files whole and consistent before a model loads (a cut-short copy, a hand-edited config):
    its config a JSON object, its weights complete, and each LoRA matrix of the rank the config names."""
    from skinvlm.errors import read_json_object
    from skinvlm.merge import check_safetensors, safetensors_shapes

    config = read_json_object(folder / "adapter_config.json", "the adapter's")
    weights = folder / "adapter_model.safetensors"
    check_safetensors(weights)
    rank = config.get("r")
    if not weights.is_file() or config.get("rank_pattern") or not isinstance(rank, int):
        return
    wrong = [name for name, shape in safetensors_shapes(weights).items() if "lora_A" in name and shape[0] != rank]
    if wrong:
        raise SkinvlmError(
            f"the adapter in {folder} is inconsistent: its config says rank {rank}, but {len(wrong)} of its LoRA "
            "weights have another; copy the adapter again or train it again"
        )


def checkpoint_step(checkpoint: Path) -> int:
    try:
        step = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError, AttributeError):
        return 0  # the trainer names a damaged checkpoint when it loads it
    return step if isinstance(step, int) else 0


def grpo_needs_triton() -> bool:
    """trl 1.15 computes GRPO's log-probabilities only through its Triton kernel (PyTorch's CUDA build ships Triton;
    the CPU build does not); trl 1.16 falls back to plain PyTorch."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("trl")) < Version("1.16") and importlib.util.find_spec("triton") is None


def check_grpo_kernels() -> None:
    if grpo_needs_triton():
        raise SkinvlmError(
            "--method grpo: trl 1.15 (the Unsloth pins) runs GRPO only with Triton, which PyTorch's CUDA build ships: "
            "on a GPU install the CUDA build; on a CPU, `pip install 'trl>=1.16'`"
        )


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


def pick_backend(requested: str, cuda: bool, dry_run: bool = False, method: str = "sft") -> str:
    if method == "grpo":
        if requested == "unsloth":
            raise SkinvlmError(
                "--method grpo runs on --backend hf (transformers + PEFT through TRL's GRPOTrainer): Unsloth's "
                "vision GRPO generates through vLLM inside training, which skinvlm does not drive yet"
            )
        return "hf"
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


def newest_checkpoint(output: Path) -> str | None:
    found = sorted((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None
