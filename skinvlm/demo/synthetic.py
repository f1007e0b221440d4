"""Clearly synthetic AI-Hub-shaped image trees: each class a distinct colour, for tests, benchmarks, demo.

The colour makes the class visible, so a tiny model can learn it and a test server can read it back.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "건선": (200, 40, 40),
    "아토피": (230, 150, 30),
    "여드름": (220, 220, 40),
    "주사": (200, 40, 200),
    "지루": (40, 170, 60),
    "정상": (60, 90, 220),
}
VIEWS = ("정면", "측면")
SPLIT_FOLDERS = {"train": ("Training", "TS"), "test": ("Validation", "VS")}


def image_bytes(label: str, index: int, size: int = 64, mode: str = "RGBA", fmt: str = "PNG") -> bytes:
    """A class-coloured image with a little seeded noise, so no two images are identical."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(stable_seed(label, index))
    colour = np.array(CLASS_COLOURS[label], dtype=np.int16)
    yy, xx = np.mgrid[0:size, 0:size]
    shade = ((xx + yy) * 40 // max(1, 2 * size)).astype(np.int16)[..., None]
    pixels = (colour + shade - 20 + rng.integers(-12, 13, (size, size, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def stable_seed(*parts: object) -> int:
    """Python's hash() of a str changes per process; this does not."""
    return zlib.crc32(":".join(map(str, parts)).encode())


def colour_label(rgb: tuple[float, float, float]) -> str:
    """The class whose colour is nearest to a mean pixel colour."""
    return min(CLASS_COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(CLASS_COLOURS[c], rgb, strict=True)))


def write_tree(
    root: Path,
    per_folder: dict[str, int],
    size: int = 64,
    labels: tuple[str, ...] = tuple(CLASS_COLOURS),
    views: tuple[str, ...] = VIEWS,
) -> list[Path]:
    """`root/Training/images/TS_건선_정면/건선_정면_0000.png` ...; per_folder maps split -> images per folder."""
    written = []
    for split, count in per_folder.items():
        top, prefix = SPLIT_FOLDERS[split]
        for label in labels:
            for view in views:
                folder = root / top / "images" / f"{prefix}_{label}_{view}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    path = folder / f"{label}_{view}_{split}_{i:04d}.png"
                    path.write_bytes(image_bytes(label, stable_seed(split, view, i), size))
                    written.append(path)
    return written
