"""Qwen2.5-VL-family processors: loading (also without torchvision), image resolution, chat markers.

The stock Qwen2.5-VL processor needs a video processor, which needs torchvision; skinvlm only
uses images, so `ImageOnlyProcessor` drops the video part and is registered with AutoProcessor
for the folders that name it.

The image resolution and the turn markers must agree between training, evaluation and serving;
they come from the functions here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError, read_json_object
from skinvlm.prompts import conversation

SETTINGS_FILE = "skinvlm.json"  # image resolution and instruction, beside the weights
MIN_PIXELS = 56 * 56  # Qwen2-VL's own lower bound: tiny images are scaled up to 4 vision tokens
# Chat-template markers of Qwen-style (ChatML) templates. Answer-only training supervises what
# follows RESPONSE_MARKER; `check_chat_template` proves the processor's real template agrees.
INSTRUCTION_MARKER = "<|im_start|>user\n"
RESPONSE_MARKER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
IMAGE_TOKEN = "<|image_pad|>"  # one per vision token after the processor expands it


def quiet_transformers() -> None:
    """Our own rich output runs on the terminal; transformers' bars and log printing would garble it."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def image_only_processor_class() -> Any:
    from transformers import AutoProcessor, Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without the video half (no torchvision needed)."""

        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any
        ) -> None:
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__module__ = __name__
    AutoProcessor.register(Qwen2_5_VLConfig, ImageOnlyProcessor, exist_ok=True)
    return ImageOnlyProcessor


def load_processor(path: Path | str, **overrides: Any) -> Any:
    """The folder's processor; `overrides` go to from_pretrained as vLLM's --mm-processor-kwargs do."""
    from transformers import AutoProcessor

    quiet_transformers()
    try:
        processor = AutoProcessor.from_pretrained(str(path), **overrides)
        if hasattr(processor, "image_processor"):
            return processor
    except (ImportError, ValueError, OSError, TypeError):
        pass
    # No torchvision, or a folder saved by ImageOnlyProcessor (AutoProcessor then returns a bare
    # tokenizer): load the image-only variant.
    return image_only_processor_class().from_pretrained(str(path), **overrides)


def read_settings(folder: Path) -> dict[str, Any]:
    path = Path(folder) / SETTINGS_FILE
    return read_json_object(path, "skinvlm's settings file") if path.exists() else {}


def write_settings(folder: Path, settings: dict[str, Any]) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(settings, ensure_ascii=False, indent=2), encoding="utf-8")


PATCH_FACTOR = 28  # 14 px patches merged 2x2: the processor resizes to multiples of this


def model_input_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) the Qwen2-VL processor resizes a photo to at this resolution cap: both sides multiples of
    28, aspect ratio kept, pixels within `pixel_bounds`. Its `smart_resize` rule, kept here because eval against a
    server runs without transformers (the train extra); a test holds it equal to the processor's own."""
    bounds = pixel_bounds(max_pixels)
    factor = PATCH_FACTOR
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > bounds["max_pixels"]:
        beta = math.sqrt(height * width / bounds["max_pixels"])
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < bounds["min_pixels"]:
        beta = math.sqrt(bounds["min_pixels"] / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def as_model_input(image: Any, max_pixels: int) -> Any:
    """The photo at the size the processor would give it, resized as the processor does (bicubic): a server's
    processor then leaves it as it is, so a served model sees the pixels training did."""
    from PIL import Image

    size = model_input_size(image.width, image.height, max_pixels)
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)


def pixel_bounds(max_pixels: int) -> dict[str, int]:
    """The one image-resolution setting as min/max pixels: for our processors and for vLLM's processor kwargs."""
    return {"min_pixels": min(MIN_PIXELS, max_pixels), "max_pixels": max_pixels}


def set_image_resolution(processor: Any, max_pixels: int | None) -> None:
    """Cap the vision tokens per image at max_pixels / (28*28), through the image processor's `size`.

    `size` (a SizeDict in transformers 5) is what the processor reads; the old `min_pixels` /
    `max_pixels` attributes are cleared, since newer transformers passes them on every call (with a
    deprecation warning) and lets them override `size`. Where they are read-only views of `size` (the
    torchvision-backed processor on a GPU machine with transformers 5.17 and Unsloth), there is nothing
    to clear; either way the cap is then checked on the processor's own count of vision tokens.
    """
    from transformers.image_utils import SizeDict

    if not max_pixels:
        return
    bounds = pixel_bounds(max_pixels)
    image_processor = processor.image_processor
    image_processor.size = SizeDict(shortest_edge=bounds["min_pixels"], longest_edge=bounds["max_pixels"])
    for legacy in ("min_pixels", "max_pixels"):
        if getattr(image_processor, legacy, None) is not None:
            with contextlib.suppress(AttributeError):  # a property without a setter: derived from `size`
                setattr(image_processor, legacy, None)
    side = 4 * int(math.sqrt(max_pixels))  # a photo far over the cap, which must be scaled down to it
    if vision_tokens(processor, side, side) * 28 * 28 > max_pixels:
        raise SkinvlmError(
            f"{type(image_processor).__name__} ignores the image resolution cap of {max_pixels} pixels: "
            "report this with your transformers version"
        )


def vision_tokens(processor: Any, width: int, height: int) -> int:
    """Vision tokens the processor makes of one width x height image (transformers' own count, as vLLM's)."""
    image_processor = processor.image_processor
    patches = image_processor.get_number_of_image_patches(height, width, {})
    return int(patches // image_processor.merge_size**2)


def check_chat_template(processor: Any) -> None:
    """Answer-only training relies on this: the prompt the model sees at inference is exactly the training
    text up to the answer, and it ends with RESPONSE_MARKER after an INSTRUCTION_MARKER turn."""
    probe = conversation("?", "!")
    full = processor.apply_chat_template(probe, tokenize=False)
    prompt = processor.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
    if not (INSTRUCTION_MARKER in prompt and prompt.endswith(RESPONSE_MARKER) and full.startswith(prompt + "!")):
        raise SkinvlmError(
            f"the model's chat template does not render turns as {INSTRUCTION_MARKER!r} ... {RESPONSE_MARKER!r} + "
            "answer, so answer-only training cannot find the answer; skinvlm supports Qwen2-VL-style templates"
        )
