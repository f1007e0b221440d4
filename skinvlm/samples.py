"""Training samples: dataset rows -> chat samples -> collated batches, for both backends, and what they look like.

A sample is `{"images": [image], "messages": conversation(instruction, answer)}`, made lazily from
the stored rows (no image is copied). The hf backend collates with `AnswerOnlyCollator`, the
unsloth backend with Unsloth's own `UnslothVisionDataCollator`; both leave images to the
processor, whose resolution `set_image_resolution` fixed, so training sees images as eval and
serve do. `summarize` collates one real batch and reports what training will see: the numbers
`train --dry-run` prints and `train` checks before step 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from skinvlm import signals
from skinvlm.errors import SkinvlmError
from skinvlm.images import as_rgb
from skinvlm.prompts import conversation
from skinvlm.train_settings import TrainSettings
from skinvlm.vlm import END_OF_TURN, IMAGE_TOKEN, INSTRUCTION_MARKER, RESPONSE_MARKER, vision_tokens

IGNORE = -100  # the label value the loss skips


def chat_rows(ds: Any, instruction: str) -> Any:
    """The rows as chat samples, built on access: the stored image bytes are read, never copied."""

    def to_chat(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        signals.leave_stop_to_the_parent()
        return {
            "images": [[as_rgb(image)] for image in batch["image"]],
            "messages": [conversation(instruction, answer) for answer in batch["output"]],
        }

    return ds.select_columns(["image", "output"]).with_transform(to_chat)


def prompt_rows(ds: Any, instruction: str) -> Any:
    """The rows as GRPO's prompts: the same chat as `chat_rows` without the answer (TRL fills the image item from
    `images`), and the class the rewards score against."""

    def to_prompt(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        signals.leave_stop_to_the_parent()
        return {
            "prompt": [conversation(instruction) for _ in batch["label"]],
            "images": [[as_rgb(image)] for image in batch["image"]],
            "label": batch["label"],
        }

    return ds.select_columns(["image", "label"]).with_transform(to_prompt)


def answer_labels(input_ids: Any, attention_mask: Any, marker: list[int], end: int) -> Any:
    """Labels that supervise only what follows the last `marker` up to and including `end`."""
    import torch

    labels = torch.full_like(input_ids, IGNORE)
    width = len(marker)
    for row, ids in enumerate(input_ids.tolist()):
        starts = [i + width for i in range(len(ids) - width + 1) if ids[i : i + width] == marker]
        if not starts:
            continue  # truncated before the answer: nothing to learn from this row
        start = starts[-1]
        stop = ids.index(end, start) + 1 if end in ids[start:] else len(ids)
        labels[row, start:stop] = input_ids[row, start:stop]
    labels[attention_mask == 0] = IGNORE
    return labels


class AnswerOnlyCollator:
    """hf backend: each chat rendered by the processor's template, tokenized with its image, and
    supervised only on the answer and its end-of-turn token.

    Our own rather than TRL's assistant-only loss, which needs transformers>=5.18 for images while
    the Unsloth pins stop at 5.17. The answer is found in the token ids after image expansion.
    """

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.max_length = max_length
        tokenizer = processor.tokenizer
        self.marker = tokenizer(RESPONSE_MARKER, add_special_tokens=False).input_ids
        self.end = tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        texts = [self.processor.apply_chat_template(row["messages"], tokenize=False) for row in rows]
        batch = self.processor(
            text=texts,
            images=[row["images"] for row in rows],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch["labels"] = answer_labels(batch["input_ids"], batch["attention_mask"], self.marker, self.end)
        return batch


def unsloth_collator(model: Any, processor: Any, max_length: int) -> Any:
    """Unsloth's collator (from unsloth_zoo, which `unsloth` re-exports), set up for our rows."""
    from unsloth_zoo.vision_utils import UnslothVisionDataCollator

    return UnslothVisionDataCollator(
        model,
        processor,
        max_seq_length=max_length,
        # "max" leaves images to the processor, whose size --max-pixels set; the default "min" would
        # shrink them to 512 px for Qwen2.5-VL: 324 vision tokens in training against 1,024 when serving.
        resize="max",
        train_on_responses_only=True,
        instruction_part=INSTRUCTION_MARKER,
        response_part=RESPONSE_MARKER,
    )


# -- what training will see ------------------------------------------------------------------
@dataclass
class Summary:
    """One collated batch and the whole training set, as `train --dry-run --json` prints them."""

    backend: str
    rows: int
    skipped: int
    mismatched: int
    pixel_values: bool
    image_tokens_per_row: list[int]
    expected_image_tokens_per_row: list[int]
    supervised_tokens_per_row: list[int]
    max_pixels: int
    max_length: int
    sequence_length_max: int
    sequence_length_p95: int
    truncated_rows: int
    world_size: int
    effective_batch_size: int
    example: str  # the first row decoded, image run collapsed, supervised spans in ⟦ ⟧
    example_supervised: str
    review_left_out: int = 0  # rejected or disputed in the clinicians' review (unreviewed too with --reviewed-only)
    dev_rows: int = 0  # held out of `rows` as development rows (--dev-fraction), where the best step is chosen
    method: str = "sft"
    sampled: list[dict[str, Any]] = field(default_factory=list)  # GRPO's dry run: sampled answers and their rewards
    segments: list[tuple[str, bool]] = field(default_factory=list, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "segments"}

    def problem(self) -> str | None:
        """Why training on these batches would be wrong, or None."""
        if not self.pixel_values or not any(self.image_tokens_per_row):
            return "no image token reaches the training batch: the model would learn from text alone"
        if self.image_tokens_per_row != self.expected_image_tokens_per_row:
            return (
                f"training batches carry {self.image_tokens_per_row} vision tokens per image but --max-pixels "
                f"{self.max_pixels} means {self.expected_image_tokens_per_row}: images are resized behind our back"
            )
        if not all(self.supervised_tokens_per_row):
            return "a row of the batch has no supervised token: the answer marker was not found"
        return None


def token_counts(ds: Any, instruction: str, processor: Any) -> tuple[list[int], list[int]]:
    """(tokens per training row, tokens before its answer), after image expansion, without decoding a single
    image: their sizes are stored."""
    tokenizer = processor.tokenizer
    texts = [
        processor.apply_chat_template(conversation(instruction, answer), tokenize=False) for answer in ds["output"]
    ]
    prompt = processor.apply_chat_template(conversation(instruction), tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids) - 1  # its one image placeholder
    images = [vision_tokens(processor, w, h) for w, h in zip(ds["width"], ds["height"], strict=True)]
    counts = [len(ids) - 1 for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    return [count + image for count, image in zip(counts, images, strict=True)], [prompt_tokens + i for i in images]


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else 0


def decoded_segments(tokenizer: Any, ids: list[int], labels: list[int], image_token: int) -> list[tuple[str, bool]]:
    """(text, supervised) runs of one row; a run of image tokens reads `<|image_pad|>×N`; padding is dropped."""
    pad = tokenizer.pad_token_id
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels, strict=True):
        if token == pad and label == IGNORE:
            continue
        supervised = label != IGNORE
        if runs and runs[-1][1] == supervised:
            runs[-1][0].append(token)
        else:
            runs.append(([token], supervised))
    return [(readable(tokenizer, tokens, image_token), supervised) for tokens, supervised in runs]


def readable(tokenizer: Any, tokens: list[int], image_token: int) -> str:
    """Decoded text with each run of image tokens shown as one `<|image_pad|>×N` (runs decode whole: Hangul
    spans several byte-level tokens)."""
    text, start = "", 0
    while start < len(tokens):
        stop = start
        if tokens[start] == image_token:
            while stop < len(tokens) and tokens[stop] == image_token:
                stop += 1
            text += f"{IMAGE_TOKEN}×{stop - start}"
        else:
            while stop < len(tokens) and tokens[stop] != image_token:
                stop += 1
            text += tokenizer.decode(tokens[start:stop])
        start = stop
    return text


def summarize(
    collator: Any,
    samples: Any,
    ds: Any,
    instruction: str,
    processor: Any,
    settings: TrainSettings,
    *,
    backend: str,
    skipped: int,
    mismatched: int,
    world_size: int,
    review_left_out: int = 0,
) -> Summary:
    """Collate the first batch with the real collator and measure the whole training set."""
    lengths, prompts = token_counts(ds, instruction, processor)
    if max(prompts) >= settings.max_length:
        raise SkinvlmError(
            f"--max-length {settings.max_length} leaves no room for answers: prompts take up to {max(prompts)} tokens, "
            "the image included; raise --max-length or lower --max-pixels"
        )
    first = [samples[i] for i in range(min(settings.batch_size, len(samples)))]
    batch = collator(first)
    if "labels" not in batch:
        raise SkinvlmError("the collator made no labels: nothing would be learned")
    ids, labels = batch["input_ids"], batch["labels"]
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    segments = decoded_segments(tokenizer, ids[0].tolist(), labels[0].tolist(), image_token)
    return Summary(
        backend=backend,
        rows=len(samples),
        skipped=skipped,
        mismatched=mismatched,
        review_left_out=review_left_out,
        pixel_values=batch.get("pixel_values") is not None,
        image_tokens_per_row=(ids == image_token).sum(dim=1).tolist(),
        expected_image_tokens_per_row=[vision_tokens(processor, *row["images"][0].size) for row in first],
        supervised_tokens_per_row=(labels != IGNORE).sum(dim=1).tolist(),
        max_pixels=settings.max_pixels,
        max_length=settings.max_length,
        sequence_length_max=max(lengths),
        sequence_length_p95=percentile(lengths, 0.95),
        truncated_rows=sum(length > settings.max_length for length in lengths),
        world_size=world_size,
        effective_batch_size=settings.batch_size * settings.grad_accum * world_size,
        example="".join(f"⟦{text}⟧" if supervised else text for text, supervised in segments),
        example_supervised=tokenizer.decode([t for t in labels[0].tolist() if t != IGNORE]),
        segments=segments,
    )
