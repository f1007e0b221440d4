"""The two backends: `hf` (transformers + PEFT LoRA, 4-bit through bitsandbytes on CUDA, our answer-only
collator) and `unsloth` (FastVisionModel, 4-bit, Unsloth's vision collator). Both load the same processor."""

from __future__ import annotations

from typing import Any

from skinvlm import devices
from skinvlm.errors import SkinvlmError
from skinvlm.samples import AnswerOnlyCollator, unsloth_collator
from skinvlm.train_settings import TrainSettings
from skinvlm.vlm import load_processor

LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Vision blocks, and the merger MLP that projects image features into the language model.
VISION_TARGETS = r".*visual\.(blocks.*\.(qkv|attn\.proj|gate_proj|up_proj|down_proj)|merger\.mlp\.[02])"
UNSLOTH_ZOO_PIN = "unsloth_zoo==2026.10.9"
KEPT_16BIT = ("visual", "lm_head")  # modules (by name part) that 4-bit loading leaves in 16 bits


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
    processor = load_processor(settings.model)
    if settings.method == "grpo":  # GRPO trains the SFT adapter further
        from peft import PeftModel

        try:
            return PeftModel.from_pretrained(model, str(settings.from_adapter), is_trainable=True), processor
        except (OSError, ValueError, RuntimeError, KeyError) as err:  # as merge says it: a damaged or foreign file
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            start = f"--from {settings.from_adapter}"
            raise SkinvlmError(f"{start} cannot be loaded onto {settings.model}: {reason}") from None
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=lora_targets(settings),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), processor


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
    if dry_run and settings.method == "sft":  # a GRPO dry run samples answers: it needs the weights
        return (shape_only_model(settings.model) if backend == "unsloth" else None), load_processor(settings.model)
    return load_unsloth(settings) if backend == "unsloth" else load_hf(settings, cuda)


def collator_for(backend: str, model: Any, processor: Any, settings: TrainSettings) -> Any:
    if backend == "unsloth":
        return unsloth_collator(model, processor, settings.max_length)
    return AnswerOnlyCollator(processor, settings.max_length)
