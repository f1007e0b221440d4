"""`skinvlm merge`: models/adapter -> models/merged, a 16-bit folder that transformers and vLLM load.

One path for both backends: the LoRA adapter (Unsloth saves a standard PEFT adapter) is merged
with PEFT `merge_and_unload` into the 16-bit base in `--dtype`, never into 4-bit weights; an
Unsloth 4-bit training base is replaced by its 16-bit twin (`unsloth/X-unsloth-bnb-4bit` ->
`unsloth/X`). The folder gets the processor, tokenizer, chat template, skinvlm.json (image
resolution, instruction) and a generation config that stops at <|im_end|>. Then it is verified
the same way on CPU and GPU: on one training-shaped sample, the merged model's logits must stay
close to base + adapter compared with how far the adapter moves the base (16-bit rounding moves
them a little; a lost or mis-scaled adapter as much as the adapter itself), and every
LoRA-targeted weight must differ from the base. One model is in memory at a time.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from skinvlm import devices
from skinvlm.config import check_choice
from skinvlm.errors import SkinvlmError, read_json_object
from skinvlm.prompts import conversation, format_answer
from skinvlm.vlm import END_OF_TURN, load_processor, read_settings, set_image_resolution, write_settings
from skinvlm.workspace import Workspace, manifest, now_iso, stage_fingerprint, staged, write_manifest, writes


class Dtype(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"


UNSLOTH_4BIT_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")


@dataclass
class MergeResult:
    output: Path
    backend: str
    base: str
    trained_on: str
    dtype: str
    merge_error: float  # RMS of merged - (base + adapter) logits
    adapter_effect: float  # RMS of (base + adapter) - base logits
    tolerance: float  # the largest merge_error accepted: half the effect, or the dtype's rounding if larger
    max_logit_diff: float
    agreement: float  # share of positions where both pick the same next token
    changed_weights: int
    lora_targets: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self) | {"output": str(self.output)}


def adapter_settings(adapter: Path) -> dict[str, Any]:
    if not (adapter / "adapter_config.json").exists():
        raise SkinvlmError(f"{adapter} holds no adapter: run `skinvlm train` first")
    read_json_object(adapter / "adapter_config.json", "the adapter's")
    return read_settings(adapter)


def sixteen_bit_twin(name: str) -> str:
    """Unsloth publishes each 4-bit model beside its 16-bit original under the name without the suffix."""
    for suffix in UNSLOTH_4BIT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_quantized(base: str) -> bool:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is not None


@writes("merge")
def merge(
    ws: Workspace,
    *,
    adapter: Path | None = None,
    output: Path | None = None,
    base: str | None = None,
    dtype: str = "bfloat16",
    gpu: str | None = None,
    phase: Callable[[str], None] = lambda _: None,
) -> MergeResult:
    check_choice("--dtype", dtype, Dtype)
    devices.select_gpus(gpu)
    cuda = devices.check_gpus(gpu)
    adapter, output = adapter or ws.adapter, output or ws.merged
    recorded = adapter_settings(adapter)
    check_safetensors(adapter / "adapter_model.safetensors")
    trained_on = recorded.get("base_model") or base
    if not trained_on:
        raise SkinvlmError(f"{adapter}/skinvlm.json names no base model; pass --base")
    base = base or sixteen_bit_twin(trained_on)
    if is_quantized(base):
        raise SkinvlmError(
            f"base {base} is 4-bit: merging into quantized weights loses the adapter; "
            "pass --base with the 16-bit model (e.g. Qwen/Qwen2.5-VL-7B-Instruct)"
        )
    started, clock = now_iso(), time.perf_counter()
    sample = sample_inputs(adapter, recorded)
    with staged(output, "merge") as tmp:
        before = merge_into(base, adapter, tmp, dtype, cuda, sample, phase)
        finish_folder(adapter, tmp, recorded)
        phase("verifying: the saved folder reloaded against base + adapter")
        check = verify(tmp, dtype, cuda, sample, before)
        backend = recorded.get("backend", "hf")
        seconds = round(time.perf_counter() - clock, 1)
        result = MergeResult(
            output, backend, base, trained_on, dtype, **check, lora_targets=len(before.weights), seconds=seconds
        )
        counts = check | {"lora_targets": len(before.weights)}
        inputs = {"adapter": str(adapter), "fingerprint": stage_fingerprint(adapter), "model": base}
        settings = {"dtype": dtype, "backend": result.backend, "base": base, "trained_on": trained_on}
        write_manifest(tmp, manifest("merge", settings, inputs, counts, started))
    return result


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensors a safetensors file lists, by name, and where its data begins ({} where the header is damaged)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = handle.read(length) if 0 < length <= size - 8 else b""
    try:
        tensors = json.loads(header)
    except ValueError:
        return {}, size
    if not isinstance(tensors, dict) or not all(isinstance(v, dict) for v in tensors.values()):
        return {}, size
    return {k: v for k, v in tensors.items() if k != "__metadata__"}, 8 + length


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    return {name: list(entry.get("shape") or [0]) for name, entry in safetensors_header(path)[0].items()}


def check_safetensors(path: Path) -> None:
    """A weights file whole (its header parses and its tensors end where the file does), checked before a base
    model of many GB is loaded: a copy cut short otherwise surfaces as the Rust loader's error deep in peft."""
    if not path.is_file():
        return  # peft names what is missing in its own words (a .bin adapter, or none)
    size = path.stat().st_size
    tensors, start = safetensors_header(path)
    try:
        end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError):
        tensors = {}  # no offsets to read: damaged
    if not tensors or start + end > size:
        raise SkinvlmError(f"{path} is damaged or cut short ({size:,} bytes): copy the adapter again or train again")


def load_model(folder: str | Path, dtype: str, cuda: bool) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(
        str(folder), dtype=getattr(torch, dtype), device_map="auto" if cuda else None
    ).eval()


def logits(model: Any, sample: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return model(**{k: v.to(model.device) for k, v in sample.items()}).logits.float().cpu()


def checksum(weight: Any) -> tuple[float, float]:
    values = weight.detach().float()
    return values.sum().item(), values.square().sum().item()


@dataclass
class BeforeMerge:
    """What the merged model is checked against: logits with and without the adapter, base weight checksums."""

    with_adapter: Any
    without_adapter: Any
    weights: dict[str, tuple[float, float]]


def merge_into(
    base: str, adapter: Path, out: Path, dtype: str, cuda: bool, sample: dict[str, Any], phase: Callable[[str], None]
) -> BeforeMerge:
    """Base + adapter measured on the sample (with and without the adapter), then merged and saved."""
    from peft import PeftModel

    phase(f"loading {base} and the adapter in {dtype}")
    try:
        model = PeftModel.from_pretrained(load_model(base, dtype, cuda), str(adapter)).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # a damaged or foreign adapter file
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise SkinvlmError(f"the adapter in {adapter} cannot be loaded onto {base}: {reason}") from None
    with_adapter = logits(model, sample)
    with model.disable_adapter():
        without_adapter = logits(model, sample)
    weights = {
        name.replace("base_model.model.", "", 1): checksum(module.base_layer.weight)
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "base_layer")
    }
    phase("merging")
    merged = model.merge_and_unload()
    phase("saving the merged weights")
    merged.save_pretrained(str(out))
    del model, merged
    release_memory()
    return BeforeMerge(with_adapter, without_adapter, weights)


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rms(values: Any) -> float:
    return float(values.pow(2).mean().sqrt().item())


def rounding_floor(dtype: str, reference: Any) -> float:
    """How far the dtype's own rounding moves logits, adapter or not: merged weights are rounded once more
    than base + adapter, so logits differ by about the dtype's epsilon times their size. An adapter whose
    effect is below this (a few steps' training) is judged by the weights it changed, not by logits."""
    import torch

    return 2 * torch.finfo(getattr(torch, dtype)).eps * rms(reference)


def verify(merged: Path, dtype: str, cuda: bool, sample: dict[str, Any], before: BeforeMerge) -> dict[str, Any]:
    """The merged folder reloaded and compared with base + adapter; raises when the merge lost the adapter."""
    model = load_model(merged, dtype, cuda)
    got = logits(model, sample)
    modules = dict(model.named_modules())
    changed = sum(
        1 for name, weights in before.weights.items() if name in modules and checksum(modules[name].weight) != weights
    )
    del model
    release_memory()
    reference = before.with_adapter
    error, effect = rms(got - reference), rms(reference - before.without_adapter)
    diff = (got - reference).abs().max().item()
    agreement = (reference.argmax(-1) == got.argmax(-1)).float().mean().item()
    tolerance = max(0.5 * effect, rounding_floor(dtype, reference))
    if not math.isfinite(diff) or error > tolerance:
        raise SkinvlmError(
            f"the merged model does not reproduce base + adapter (logit RMS error {error:.4g} against an adapter "
            f"effect of {effect:.4g}, tolerance {tolerance:.4g}): merge failed"
        )
    if before.weights and changed == 0:
        raise SkinvlmError(
            "the merged weights equal the base everywhere LoRA was applied: the adapter is empty "
            "or was lost in the merge"
        )
    return {
        "merge_error": round(error, 6),
        "adapter_effect": round(effect, 6),
        "tolerance": round(tolerance, 6),
        "max_logit_diff": round(diff, 6),
        "agreement": round(agreement, 4),
        "changed_weights": changed,
    }


def finish_folder(adapter: Path, out: Path, recorded: dict[str, Any]) -> None:
    """Processor, chat template, skinvlm.json and an EOS that stops at the end of the answer."""
    from transformers import GenerationConfig

    processor = load_processor(adapter)
    set_image_resolution(processor, recorded.get("max_pixels"))
    processor.save_pretrained(str(out))
    end = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    try:
        generation = GenerationConfig.from_pretrained(str(out))
    except OSError:
        generation = GenerationConfig()
    eos = generation.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    generation.eos_token_id = sorted({*eos_ids, end})
    generation.pad_token_id = processor.tokenizer.pad_token_id
    generation.save_pretrained(str(out))
    write_settings(out, recorded)


def sample_inputs(adapter: Path, recorded: dict[str, Any]) -> dict[str, Any]:
    """One training-shaped chat (image, instruction, answer) at the recorded resolution."""
    from PIL import Image

    processor = load_processor(adapter)
    set_image_resolution(processor, recorded.get("max_pixels"))
    image = Image.new("RGB", (224, 224), (200, 60, 60))
    chat = conversation(recorded.get("instruction", ""), format_answer("건선", "붉은 판"))
    text = processor.apply_chat_template(chat, tokenize=False)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))
