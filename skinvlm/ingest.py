"""`skinvlm ingest SRC`: image folders -> a DatasetDict (train/test) in which every image decodes.

Images are decoded fully in worker threads (truncated, empty or fake files are listed, never
stored). Verified bytes are stored as they are and the ``image`` feature decodes them as RGB:
re-encoding a 1024x1024 PNG costs ~7x its decode, so pixels are re-encoded only when they must
change (real transparency flattened onto white, or ``--max-side`` downscaling).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError
from skinvlm.rules import Rules, nfc
from skinvlm.workspace import (
    SPLITS,
    Workspace,
    content_digest,
    fingerprint,
    manifest,
    now_iso,
    replace_dir,
    write_manifest,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
SPLIT_FOLDERS = {"training": "train", "validation": "test"}
IGNORED_DIRS = {"__macosx"}
FOLDER_PATTERN = re.compile(r"^(?:(?:TS|VS|TL|VL)_)?(?P<label>.+?)(?:_(?P<view>[^_]+))?$")
UNKNOWN_VIEW = "unknown"


@dataclass(frozen=True)
class ImageFile:
    path: Path
    source: str  # relative to SRC, '/'-separated, NFC
    split: str
    label: str
    view: str


@dataclass
class IngestResult:
    path: Path
    splits: dict[str, int]
    counts: dict[str, dict[str, dict[str, int]]]
    skipped: list[dict[str, str]]
    ignored: int
    duplicates: list[list[str]]
    cross_split_duplicates: list[list[str]]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "splits": self.splits,
            "counts": self.counts,
            "skipped": self.skipped,
            "ignored": self.ignored,
            "duplicates": self.duplicates,
            "cross_split_duplicates": self.cross_split_duplicates,
            "seconds": self.seconds,
        }


# -- discovering files -----------------------------------------------------------------------
def parse_folder(name: str, rules: Rules) -> tuple[str, str] | None:
    """`TS_건선_정면` -> ("건선", "정면"); a bare class folder (`건선`) has an unknown view."""
    match = FOLDER_PATTERN.match(nfc(name))
    if not match:
        return None
    label, view = match["label"], match["view"]
    if view is not None and view not in rules.views:
        label, view = f"{label}_{view}", None
    canonical = rules.canonical(label)
    return (canonical, view or UNKNOWN_VIEW) if canonical else None


def split_roots(src: Path) -> dict[str, Path] | None:
    """Training/ and Validation/ (their images/ subfolder when present), or None for a flat tree."""
    roots = {}
    for child in src.iterdir():
        split = SPLIT_FOLDERS.get(nfc(child.name).lower())
        if split and child.is_dir():
            images = next((c for c in child.iterdir() if c.is_dir() and c.name.lower() == "images"), None)
            roots[split] = images or child
    return roots or None


def walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in IGNORED_DIRS)
        for name in sorted(filenames):
            yield Path(dirpath) / name


def classify(path: Path, root: Path, rules: Rules) -> tuple[str, str] | str:
    """The (label, view) of the nearest class folder above `path`, or the folder that is unknown."""
    folders = path.relative_to(root).parts[:-1]
    for folder in reversed(folders):
        parsed = parse_folder(folder, rules)
        if parsed:
            return parsed
    return folders[0] if folders else "(top level)"


def discover(src: Path, rules: Rules, test_size: float, seed: int) -> tuple[list[ImageFile], int]:
    if not src.is_dir():
        raise SkinvlmError(f"source folder {src} does not exist or is not a folder")
    roots = split_roots(src)
    found: list[ImageFile] = []
    ignored = 0
    unknown: Counter[str] = Counter()
    for split, root in (roots or {"train": src}).items():
        for path in walk(root):
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored += 1
                continue
            where = classify(path, root, rules)
            if isinstance(where, str):
                unknown[nfc(where)] += 1
                continue
            source = nfc(path.relative_to(src).as_posix())
            found.append(ImageFile(path, source, split, *where))
    if unknown:
        listed = ", ".join(f"{name} ({n} images)" for name, n in sorted(unknown.items()))
        raise SkinvlmError(
            f"unknown class folder(s) in {src}: {listed}; known classes: {', '.join(rules.class_names)} "
            "(add an alias under [labels.aliases] in the rule file)"
        )
    if not found:
        raise SkinvlmError(f"no .png/.jpg/.jpeg images found under {src}")
    if roots is None:
        found = stratified_split(found, test_size, seed)
    return sorted(found, key=lambda f: (f.split, f.source)), ignored


def stratified_split(files: list[ImageFile], test_size: float, seed: int) -> list[ImageFile]:
    if not 0 < test_size < 1:
        raise SkinvlmError(f"--test-size must be between 0 and 1, got {test_size}")
    groups: dict[tuple[str, str], list[ImageFile]] = defaultdict(list)
    for f in sorted(files, key=lambda f: f.source):
        groups[(f.label, f.view)].append(f)
    rng = random.Random(seed)
    out = []
    for members in groups.values():
        rng.shuffle(members)
        n_test = round(len(members) * test_size)
        out += [
            ImageFile(f.path, f.source, "test" if i < n_test else "train", f.label, f.view)
            for i, f in enumerate(members)
        ]
    return out


# -- checking images (runs in worker processes) ----------------------------------------------
def inspect_image(path: Path, max_side: int | None) -> dict[str, Any]:
    """Decode fully; return the bytes to store and their facts, or {"error": reason}."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as err:
        return {"error": f"unreadable: {err.strerror or err}"}
    if not data:
        return {"error": "empty file"}
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _stored_form(image, data, max_side)
    except UnidentifiedImageError:
        return {"error": "not an image (unknown format)"}
    except Image.DecompressionBombError as err:
        return {"error": f"too large: {err}"}
    except (OSError, SyntaxError, ValueError) as err:
        return {"error": f"cannot decode: {err}"}


def _stored_form(image: Any, data: bytes, max_side: int | None) -> dict[str, Any]:
    from PIL import Image

    sha = hashlib.sha256(data).hexdigest()
    too_big = bool(max_side) and max(image.size) > (max_side or 0)
    if not too_big and not _must_flatten(image):
        return {"bytes": data, "width": image.width, "height": image.height, "sha256": sha}
    rgb = _flatten(image)
    if too_big:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=3)
    return {"bytes": out.getvalue(), "width": rgb.width, "height": rgb.height, "sha256": sha}


def _must_flatten(image: Any) -> bool:
    """True when a plain RGB conversion would be wrong: real transparency, or an exotic mode."""
    if image.mode in ("RGB", "L"):
        return False
    if image.mode in ("RGBA", "LA", "PA"):
        return image.getextrema()[-1][0] < 255  # per-band extrema, no pixel copy
    if "transparency" in image.info:
        return image.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return image.mode not in ("P", "CMYK", "YCbCr")


def _flatten(image: Any) -> Any:
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode.startswith("I") or image.mode == "F":
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def inspect_all(
    files: list[ImageFile], max_side: int | None, pool: ThreadPoolExecutor | None
) -> Iterator[dict[str, Any]]:
    """Results in input order, at most 4 per worker in flight so memory stays flat.

    Threads, not processes: Pillow's decoders and hashlib release the GIL, so threads use every
    core without pickling megabytes of image bytes between processes."""
    if pool is None:
        yield from (inspect_image(f.path, max_side) for f in files)
        return
    queue = iter(files)
    pending = deque(pool.submit(inspect_image, f.path, max_side) for f in islice(queue, pool._max_workers * 4))
    while pending:
        result = pending.popleft().result()
        nxt = next(queue, None)
        if nxt is not None:
            pending.append(pool.submit(inspect_image, nxt.path, max_side))
        yield result


# -- building the dataset --------------------------------------------------------------------
def features() -> Any:
    from datasets import Features, Image, Value

    return Features(
        {
            "id": Value("string"),
            "image": Image(mode="RGB"),
            "label": Value("string"),
            "view": Value("string"),
            "split": Value("string"),
            "source": Value("string"),
            "width": Value("int32"),
            "height": Value("int32"),
            "sha256": Value("string"),
        }
    )


def write_split(rows: Iterator[dict[str, Any]], folder: Path, split: str) -> Any:
    """Stream rows, 32 at a time, straight into `save_to_disk` layout: images are written once.

    Writing a temporary Arrow file and then calling save_to_disk would copy every image a
    second time (about 16 GB for the AI Hub set)."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "data-00000-of-00001.arrow"
    with ArrowWriter(features=features(), path=str(data_file), writer_batch_size=32) as writer:
        for row in rows:
            writer.write(row)
        writer.finalize()
    dataset = Dataset.from_file(str(data_file))
    dataset.info.write_to_directory(str(folder))
    state = {
        "_data_files": [{"filename": data_file.name}],
        "_fingerprint": dataset._fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": split,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    return dataset


def record_id(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def ingest(
    ws: Workspace,
    src: Path,
    rules: Rules,
    *,
    force: bool = False,
    test_size: float = 0.1,
    seed: int = 42,
    max_side: int | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    from datasets import DatasetDict

    started, clock = now_iso(), time.perf_counter()
    if (ws.ingested / "dataset_dict.json").exists() and not force:
        raise SkinvlmError(f"{ws.ingested} already exists; pass --force to replace it")
    if max_side is not None and max_side < 16:
        raise SkinvlmError(f"--max-side must be at least 16 pixels, got {max_side}")
    files, ignored = discover(src, rules, test_size, seed)
    workers = workers or os.cpu_count() or 1
    skipped: list[dict[str, str]] = []
    by_hash: dict[str, list[ImageFile]] = defaultdict(list)
    done = 0

    def rows(split: str) -> Iterator[dict[str, Any]]:
        nonlocal done
        chosen = [f for f in files if f.split == split]
        for f, found in zip(chosen, inspect_all(chosen, max_side, pool), strict=True):
            done += 1
            if progress:
                progress(done, len(files))
            if "error" in found:
                skipped.append({"path": f.source, "reason": found["error"]})
                continue
            by_hash[found["sha256"]].append(f)
            yield {
                "id": record_id(f.source),
                "image": {"bytes": found.pop("bytes"), "path": None},
                "label": f.label,
                "view": f.view,
                "split": split,
                "source": f.source,
                **found,
            }

    tmp = ws.ingested.with_name(f".ingested.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        data = DatasetDict({split: write_split(rows(split), tmp / split, split) for split in SPLITS})
        (tmp / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
        result = _result(ws, files, data, skipped, ignored, by_hash, time.perf_counter() - clock)
        result.settings = {
            "src": str(src.resolve()),
            "test_size": test_size,
            "seed": seed,
            "max_side": max_side,
            "rules": str(rules.path),
            "workers": workers,
        }
        inputs = {
            "src": str(src.resolve()),
            "files": len(files) + ignored,
            "fingerprint": fingerprint([(f.source, f.path.stat().st_size) for f in files]),
        }
        counts = {
            "splits": result.splits,
            "per_class": result.counts,
            "skipped": len(skipped),
            "ignored": ignored,
            "duplicates": len(result.duplicates),
            "cross_split_duplicates": len(result.cross_split_duplicates),
        }
        write_manifest(
            tmp,
            manifest(
                "ingest",
                result.settings,
                inputs,
                counts,
                started,
                skipped=skipped,
                cross_split=result.cross_split_duplicates,
                content=content_digest(data, ("id", "sha256", "label", "view", "split")),
            ),
        )
        replace_dir(tmp, ws.ingested)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _result(
    ws: Workspace,
    files: list[ImageFile],
    data: Any,
    skipped: list[dict[str, str]],
    ignored: int,
    by_hash: dict[str, list[ImageFile]],
    seconds: float,
) -> IngestResult:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for split, ds in data.items():
        table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for label, view in zip(ds["label"], ds["view"], strict=True):
            table[label][view] += 1
        counts[split] = {label: dict(views) for label, views in table.items()}
    groups = [members for members in by_hash.values() if len(members) > 1]
    duplicates = [[f.source for f in g] for g in groups if len({f.split for f in g}) == 1]
    cross = [[f.source for f in g] for g in groups if len({f.split for f in g}) > 1]
    return IngestResult(
        path=ws.ingested,
        splits={split: ds.num_rows for split, ds in data.items()},
        counts=counts,
        skipped=skipped,
        ignored=ignored,
        duplicates=duplicates,
        cross_split_duplicates=cross,
        seconds=round(seconds, 2),
    )
