"""`python -m skinvlm.demo.tiny DIR [--shape 7b]`: a randomly initialised Qwen2.5-VL, built offline.

Offline and deterministic: a byte-level BPE tokenizer trained here on Korean text from the rule
file and prompts (plus the Qwen2-VL special tokens and the standard chat template), the PIL image
processor, and a model small enough to train on a laptop CPU in seconds. Tests, the CPU smoke run
and the demo use it; it reloads with `from_pretrained`. `--shape 7b` builds the same thing with
Qwen2.5-VL-7B-Instruct's layer shapes (random bf16 weights, ~16 GB): speed and memory do not
depend on weight values, so the GPU smoke benchmark times the real recipe without a download.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from skinvlm.prompts import format_answer, instruction
from skinvlm.rules import Rules, default_rules_path, load_rules

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB_SIZE = 1024
# Qwen2.5-VL-7B-Instruct's config.json, the parts that decide compute and memory.
SHAPE_7B: dict[str, dict[str, Any]] = {
    "text": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "mrope_section": [16, 24, 24],
        "initializer_range": 0.02,
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "initializer_range": 0.02,
    },
}
SHAPE_TINY: dict[str, dict[str, Any]] = {
    "text": {
        "vocab_size": None,  # the tokenizer's
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        # mrope sections (temporal, height, width) must sum to head_dim / 2 = 8
        "mrope_section": [2, 3, 3],
        # Wider than the usual 0.02: a few hundred CPU steps then give logits with clear margins.
        "initializer_range": 0.1,
    },
    "vision": {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "fullatt_block_indexes": [1],
        "initializer_range": 0.1,
    },
}
SHAPES = {"tiny": SHAPE_TINY, "7b": SHAPE_7B}


def corpus(rules: Rules) -> list[str]:
    texts = [instruction(rules), "You are a helpful assistant.", "system user assistant"]
    for c in rules.classes:
        texts += [c.name, c.english, c.features, c.template, format_answer(c.name, c.template)]
    texts += list(rules.terms.values()) + list(rules.aliases) + [rules.unreadable]
    return texts * 4


def build_tokenizer(rules: Rules) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import qwen2_5_vl_chat_template

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus(rules), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=4096,
    )
    tokenizer.chat_template = qwen2_5_vl_chat_template
    return tokenizer


def build_config(tokenizer: Any, shape: dict[str, dict[str, Any]] = SHAPE_TINY) -> Any:
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(shape["text"])
    mrope, theta = text.pop("mrope_section"), text.pop("rope_theta")
    return Qwen2_5_VLConfig(
        text_config={
            **text,
            "vocab_size": text["vocab_size"] or len(tokenizer),
            "rope_scaling": {"type": "mrope", "mrope_section": mrope},
            "rope_parameters": {"rope_type": "default", "rope_theta": theta, "mrope_section": mrope},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            **shape["vision"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=shape["text"]["tie_word_embeddings"],
    )


def build(folder: Path, rules: Rules | None = None, seed: int = 0, shape: str = "tiny") -> Path:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from skinvlm.vlm import image_only_processor_class, quiet_transformers

    quiet_transformers()
    rules = rules or load_rules(default_rules_path())
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(rules)
    config = build_config(tokenizer, SHAPES[shape])
    big = shape != "tiny"
    # A 7B-shaped model is made in bf16, on the GPU when there is one: minutes faster than the CPU.
    device = "cuda" if big and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16 if big else torch.float32)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        eos_token_id=[eos],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=config.text_config.bos_token_id,
        do_sample=False,
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = image_only_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    shape = "tiny"
    if args[-2:-1] == ["--shape"]:
        shape, args = args[-1], args[:-2]
    if len(args) != 1 or shape not in SHAPES:
        sys.exit(f"usage: python -m skinvlm.demo.tiny DIR [--shape {'|'.join(SHAPES)}]")
    folder = build(Path(args[0]), shape=shape)
    print(f"{shape} Qwen2.5-VL written to {folder}")


if __name__ == "__main__":
    main()
