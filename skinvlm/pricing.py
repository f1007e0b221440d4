"""Prices and image-token rules of common OpenAI vision models: the one place to update them.

Prices are USD per million tokens (standard tier); the Batch API costs half. Image tokens follow
OpenAI's published rules: tile-based models count a base plus a cost per 512px tile at high detail;
patch-based models count 32px patches (capped) times a multiplier. Unknown models cost nothing known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class Price:
    input: float
    output: float
    image_base: int = 85  # tile-based: tokens at low detail
    image_tile: int = 170  # tile-based: tokens per 512px tile at high detail
    patch_multiplier: float = 0.0  # patch-based models (> 0) ignore base/tile


PRICES: dict[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.60, image_base=2833, image_tile=5667),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60, patch_multiplier=1.62),
    "gpt-4.1-nano": Price(0.10, 0.40, patch_multiplier=2.46),
    "o4-mini": Price(1.10, 4.40, patch_multiplier=1.72),
}


def price_for(model: str) -> Price | None:
    if model in PRICES:
        return PRICES[model]
    # Dated snapshots ("gpt-4o-mini-2024-07-18") price like their family; longest name first.
    return next((PRICES[name] for name in sorted(PRICES, key=len, reverse=True) if model.startswith(name + "-")), None)


def image_tokens(model: str, width: int, height: int, detail: str) -> int:
    price = price_for(model) or Price(0, 0)
    if price.patch_multiplier:
        patches = min(1536, math.ceil(width / 32) * math.ceil(height / 32))
        return math.ceil(patches * price.patch_multiplier)
    if detail == "low":
        return price.image_base
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / min(w, h))
    tiles = math.ceil(w * scale / 512) * math.ceil(h * scale / 512)
    return price.image_base + price.image_tile * tiles


def text_tokens(text: str) -> int:
    """A rough count without a tokenizer download: Hangul ~0.8 token per syllable, else ~4 bytes a token."""
    hangul = sum(1 for ch in text if "\uac00" <= ch <= "\ud7a3")
    other = len(text.encode("utf-8")) - 3 * hangul
    return math.ceil(hangul * 0.8 + other / 4)


def cost(model: str, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float | None:
    price = price_for(model)
    if price is None:
        return None
    dollars = (prompt_tokens * price.input + completion_tokens * price.output) / 1e6
    return dollars * (BATCH_DISCOUNT if batch else 1.0)
