"""Loading Qwen2.5-VL-family models and processors, also where torchvision is missing (CPU laptops).

The stock Qwen2.5-VL processor needs a video processor, which needs torchvision; skinvlm only
uses images, so `ImageOnlyProcessor` drops the video part and is registered with AutoProcessor
for the folders that name it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError

SETTINGS_FILE = "skinvlm.json"  # image resolution and instruction, beside the weights


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


def load_processor(path: Path | str) -> Any:
    from transformers import AutoProcessor

    quiet_transformers()
    try:
        processor = AutoProcessor.from_pretrained(str(path))
        if hasattr(processor, "image_processor"):
            return processor
    except (ImportError, ValueError, OSError, TypeError):
        pass
    # No torchvision, or a folder saved by ImageOnlyProcessor (AutoProcessor then returns a bare
    # tokenizer): load the image-only variant.
    return image_only_processor_class().from_pretrained(str(path))


def read_settings(folder: Path) -> dict[str, Any]:
    path = Path(folder) / SETTINGS_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SkinvlmError(f"{path} is not valid JSON: {err.msg}") from None


def write_settings(folder: Path, settings: dict[str, Any]) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / SETTINGS_FILE).write_text(json.dumps(settings, ensure_ascii=False, indent=2), encoding="utf-8")


def set_image_resolution(processor: Any, max_pixels: int | None) -> None:
    """Cap the vision tokens per image: max_pixels / (28*28) tokens after 2x2 merging."""
    if not max_pixels:
        return
    image_processor = processor.image_processor
    image_processor.max_pixels = max_pixels
    image_processor.min_pixels = min(getattr(image_processor, "min_pixels", 3136) or 3136, max_pixels)
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict):
        size["longest_edge"] = max_pixels
        size["shortest_edge"] = image_processor.min_pixels
