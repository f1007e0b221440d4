"""The pixels every consumer sees: one conversion for training, describe and eval.

Stored images keep their own mode (the AI Hub photos are RGBA PNGs); `as_rgb` composites real
transparency onto white, so a see-through pixel is never shown as whatever colour hides under it,
and a 16-bit grey scan is scaled, not clipped. Training, describe and eval all call it, so they
see the same pixels by construction.
"""

from __future__ import annotations

from typing import Any


def as_rgb(image: Any) -> Any:
    """An RGB copy of `image` (or `image` itself when it is RGB already)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I") or image.mode == "F":
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
