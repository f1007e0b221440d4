"""`skinvlm merge`: models/adapter -> models/merged, a 16-bit folder that transformers and vLLM load.

Unsloth adapters go through `save_pretrained_merged(..., "merged_16bit")`; hf adapters through
PEFT `merge_and_unload` on a 16-bit base (never on 4-bit weights). The folder gets the
processor, tokenizer, chat template, skinvlm.json (image resolution, instruction) and a
generation config that stops at <|im_end|>. Then it is verified: reloaded, its logits compared
with base + adapter on one sample, and LoRA-targeted weights checked to differ from the base.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError
from skinvlm.vlm import load_processor, read_settings, set_image_resolution, write_settings
from skinvlm.workspace import Workspace, manifest, now_iso, replace_dir, stage_fingerprint, write_manifest

DTYPES = ("bfloat16", "float16")


@dataclass
class MergeResult:
    output: Path
    backend: str
    base: str
    dtype: str
    max_logit_diff: float
    changed_weights: int
    lora_targets: int
    seconds: float


def adapter_settings(adapter: Path) -> dict[str, Any]:
    if not (adapter / "adapter_config.json").exists():
        raise SkinvlmError(f"{adapter} holds no adapter: run `skinvlm train` first")
    return read_settings(adapter)


def merge(
    ws: Workspace,
    *,
    adapter: Path | None = None,
    output: Path | None = None,
    base: str | None = None,
    dtype: str = "bfloat16",
    gpu: str | None = None,
) -> MergeResult:
    from skinvlm.train import check_gpus, select_gpus

    if dtype not in DTYPES:
        raise SkinvlmError(f"--dtype must be bfloat16 or float16, not {dtype!r}")
    select_gpus(gpu)
    cuda = check_gpus(gpu)
    adapter, output = adapter or ws.adapter, output or ws.merged
    recorded = adapter_settings(adapter)
    base = base or recorded.get("base_model")
    if not base:
        raise SkinvlmError(f"{adapter}/skinvlm.json names no base model; pass --base")
    started, clock = now_iso(), time.perf_counter()
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backend = recorded.get("backend", "hf")
    if backend == "unsloth":
        merge_unsloth(adapter, tmp, dtype)
    else:
        merge_hf(base, adapter, tmp, dtype, cuda)
    finish_folder(adapter, tmp, recorded)
    diff, changed, targets = verify(base, adapter, tmp, cuda)
    result = MergeResult(output, backend, base, dtype, diff, changed, targets, round(time.perf_counter() - clock, 1))
    counts = {"max_logit_diff": diff, "changed_weights": changed, "lora_targets": targets}
    inputs = {"adapter": str(adapter), "fingerprint": stage_fingerprint(adapter), "model": base}
    write_manifest(tmp, manifest("merge", {"dtype": dtype, "backend": backend, "base": base}, inputs, counts, started))
    replace_dir(tmp, output)
    return result


def is_quantized(base: str) -> bool:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(base), "quantization_config", None) is not None


def merge_hf(base: str, adapter: Path, out: Path, dtype: str, cuda: bool) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    if is_quantized(base):
        raise SkinvlmError(
            f"base {base} is 4-bit: merging into quantized weights loses the adapter; "
            "pass --base with the 16-bit model (e.g. Qwen/Qwen2.5-VL-7B-Instruct)"
        )
    model = AutoModelForImageTextToText.from_pretrained(
        base, dtype=getattr(torch, dtype), device_map="auto" if cuda else None
    )
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))


def merge_unsloth(adapter: Path, out: Path, dtype: str) -> None:
    from unsloth import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(str(adapter), load_in_4bit=True)
    model.save_pretrained_merged(str(out), processor, save_method="merged_16bit")


def finish_folder(adapter: Path, out: Path, recorded: dict[str, Any]) -> None:
    """Processor, chat template, skinvlm.json and an EOS that stops at the end of the answer."""
    from transformers import GenerationConfig

    processor = load_processor(adapter)
    set_image_resolution(processor, recorded.get("max_pixels"))
    processor.save_pretrained(str(out))
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
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


def verify(base: str, adapter: Path, merged: Path, cuda: bool) -> tuple[float, int, int]:
    """(max |logit difference| merged vs base+adapter, LoRA-targeted weights changed, targets)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    if cuda or is_quantized(base):
        return verify_light(merged)
    sample = sample_inputs(merged)
    reference = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), str(adapter)
    ).eval()
    loaded = AutoModelForImageTextToText.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = reference(**sample).logits, loaded(**sample).logits
    diff = (expected - got).abs().max().item()
    # 16-bit rounding moves logits a little; a failed merge moves them like noise and flips the choices.
    agree = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    if not math.isfinite(diff) or diff > 2.5 * expected.std().item() or agree < 0.95:
        raise SkinvlmError(
            f"the merged model disagrees with base + adapter (max logit difference {diff:.4f}, "
            f"{agree:.0%} of next-token choices equal): merge failed"
        )
    base_weights = reference.get_base_model().state_dict()
    targets = changed = 0
    merged_weights = loaded.state_dict()
    for name, module in reference.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            key = name.replace("base_model.model.", "", 1) + ".weight"
            original = base_weights.get(name.replace("base_model.model.", "", 1) + ".base_layer.weight")
            if original is None or key not in merged_weights:
                continue
            targets += 1
            changed += bool((merged_weights[key].float() - original.float()).abs().max().item() > 0)
    if targets and changed == 0:
        raise SkinvlmError(
            "the merged weights equal the base everywhere LoRA was applied: the adapter is empty "
            "or was lost in the merge"
        )
    return round(diff, 6), changed, targets


def verify_light(merged: Path) -> tuple[float, int, int]:
    """On a GPU or a 4-bit base the full comparison would double memory: reload and run once."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(merged), dtype="auto", device_map="auto")
    sample = {k: v.to(model.device) for k, v in sample_inputs(merged).items()}
    with torch.no_grad():
        logits = model(**sample).logits
    if not torch.isfinite(logits).all():
        raise SkinvlmError(f"{merged} produces non-finite logits after merging")
    return float("nan"), -1, -1


def sample_inputs(folder: Path) -> dict[str, Any]:
    from PIL import Image

    from skinvlm.prompts import format_answer

    processor = load_processor(folder)
    settings = read_settings(folder)
    image = Image.new("RGB", (64, 64), (200, 60, 60))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings.get("instruction", "")}]},
        {"role": "assistant", "content": [{"type": "text", "text": format_answer("건선", "붉은 판")}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))
