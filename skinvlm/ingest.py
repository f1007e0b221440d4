"""`skinvlm ingest SRC`: image folders -> a DatasetDict (train/test) in which every image decodes.

Any tree is survived: the walk has no recursion limit and never enters folder links; only regular
files are opened (a FIFO or a link to /dev/zero is named and skipped, never read), at most
MAX_FILE_BYTES each; names that are not UTF-8 (a Korean zip unpacked as CP949 bytes) are read as
CP949 or shown with \\xNN escapes. Every bad file is listed with its reason and the good ones go in.

Images are decoded fully in worker threads (truncated, empty or fake files are listed, never
stored), at most --max-pixels-in each, with a shared pixel budget so memory stays flat in the
number of workers. Verified bytes are stored as they are and the ``image`` feature decodes them
as RGB: re-encoding a 1024x1024 PNG costs ~7x its decode, so pixels are re-encoded only when they
must change (real transparency flattened onto white, or ``--max-side`` downscaling).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import io
import json
import os
import random
import re
import stat
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

from skinvlm import devices, metadata
from skinvlm.errors import SkinvlmError
from skinvlm.images import as_rgb
from skinvlm.rules import Rules, linear_regex, nfc, patient_pattern_problem
from skinvlm.subgroups import Metadata, as_column, read_metadata
from skinvlm.workspace import (
    SPLITS,
    Workspace,
    content_digest,
    fingerprint,
    manifest,
    now_iso,
    patients_known,
    secret_key,
    staged,
    write_manifest,
    writes,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_FILE_BYTES = 256 * 2**20  # no photo is this big; larger files are named and skipped unread
DEFAULT_MAX_PIXELS_IN = 64 * 2**20  # 64 MP: 64 of the AI Hub's 1024x1024 photos
WRITE_BATCH = 16  # rows per Arrow record batch; the images of one batch are held in memory together
SPLIT_FOLDERS = {"training": "train", "validation": "test"}
SPLIT_NAMES = {"train": "Training", "test": "Validation"}
IGNORED_DIRS = {"__macosx"}
FOLDER_PATTERN = re.compile(r"^(?:(?:TS|VS|TL|VL)_)?(?P<label>.+?)(?:_(?P<view>[^_]+))?$")
UNKNOWN_VIEW = "unknown"


@dataclass(frozen=True)
class ImageFile:
    path: Path
    source: str  # relative to SRC, '/'-separated, NFC, printable (see `shown`)
    split: str
    label: str
    view: str
    size: int  # bytes at discovery: nothing later stats a file that may be gone by then
    subgroups: str = ""  # its attributes from --metadata (subgroups.as_column), "" when none are known


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
    metadata: dict[str, Any] = field(default_factory=dict)  # kept, or how many files were cleaned and turned
    patients: dict[str, Any] = field(default_factory=dict)  # known (a pattern gave them), and per split
    settings: dict[str, Any] = field(default_factory=dict)
    leakage: dict[str, Any] | None = None  # where patients are known: the leakage audit's counts, run at once
    subgroups: dict[str, Any] | None = None  # with --metadata: its attributes and how many photos it named

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "splits": self.splits,
            "counts": self.counts,
            "skipped": self.skipped,
            "ignored": self.ignored,
            "duplicates": self.duplicates,
            "cross_split_duplicates": self.cross_split_duplicates,
            "metadata": self.metadata,
            "patients": self.patients,
            "leakage": self.leakage,
            "subgroups": self.subgroups,
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


def shown(name: str) -> str:
    """A file or folder name as text that can be stored and printed: bytes that are not UTF-8 are read as
    CP949 (how Korean zips often unpack) or else written as \\xNN; control characters are escaped, so a
    newline in a name cannot split a report line."""
    raw = os.fsencode(name)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp949")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", "backslashreplace")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in nfc(text))


@dataclass(frozen=True)
class Found:
    """One entry of the walk: a regular file with its size, or a `problem` that names why it is skipped."""

    path: Path
    size: int = 0
    problem: str | None = None


def walk(root: Path) -> Iterator[Found]:
    """Every file under root: an explicit stack, so no depth limit, and folder links are reported, not entered."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            yield Found(folder, problem=f"unreadable folder: {err.strerror or err}")
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if not entry.name.startswith(".") and entry.name.lower() not in IGNORED_DIRS:
                    stack.append(Path(entry.path))
            elif entry.name.startswith("."):
                yield Found(Path(entry.path))  # .DS_Store and friends: counted as ignored
            elif entry.is_symlink() and os.path.isdir(entry.path):
                yield Found(Path(entry.path), problem="a link to a folder: not followed")
            else:
                yield regular_file(Path(entry.path))


def regular_file(path: Path) -> Found:
    """Only regular files are ever opened; a link is followed to see what it points at."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return Found(path)  # counted as ignored
    try:
        facts = os.stat(path)
    except FileNotFoundError:
        return Found(path, problem="a broken link (its target does not exist)")
    except OSError as err:
        reason = "a link loop" if err.errno == errno.ELOOP else f"cannot stat: {err.strerror or err}"
        return Found(path, problem=reason)
    if not stat.S_ISREG(facts.st_mode):
        return Found(path, problem="not a regular file (a FIFO, device or socket): never read")
    if facts.st_size > MAX_FILE_BYTES:
        return Found(path, problem=f"{facts.st_size / 2**20:,.0f} MB: larger than {MAX_FILE_BYTES // 2**20} MB")
    return Found(path, facts.st_size)


def classify(path: Path, root: Path, rules: Rules) -> tuple[str, str] | str:
    """The (label, view) of the nearest class folder above `path`, or the folder that is unknown."""
    folders = path.relative_to(root).parts[:-1]
    for folder in reversed(folders):
        parsed = parse_folder(shown(folder), rules)
        if parsed:
            return parsed
    return shown(folders[0]) if folders else "(top level)"


def discover(src: Path, rules: Rules, test_size: float, seed: int) -> tuple[list[ImageFile], int, list[dict[str, str]]]:
    """(images to decode, files ignored, files skipped with their reasons)."""
    if not src.is_dir():
        raise SkinvlmError(f"source folder {shown(str(src))} does not exist or is not a folder")
    roots = split_roots(src)
    found: list[ImageFile] = []
    skipped: list[dict[str, str]] = []
    ignored = 0
    unknown: Counter[str] = Counter()
    for split, root in (roots or {"train": src}).items():
        for entry in walk(root):
            source = "/".join(shown(part) for part in entry.path.relative_to(src).parts)
            if entry.problem:
                skipped.append({"path": source, "reason": entry.problem})
                continue
            if entry.path.suffix.lower() not in IMAGE_SUFFIXES or entry.path.name.startswith("."):
                ignored += 1
                continue
            where = classify(entry.path, root, rules)
            if isinstance(where, str):
                unknown[where] += 1
                continue
            found.append(ImageFile(entry.path, source, split, *where, entry.size))
    if unknown:
        listed = ", ".join(f"{name} ({n} images)" for name, n in sorted(unknown.items()))
        raise SkinvlmError(
            f"unknown class folder(s) in {shown(str(src))}: {listed}; known classes: {', '.join(rules.class_names)} "
            "(add an alias under [labels.aliases] in the rule file)"
        )
    if not found:
        raise SkinvlmError(f"no .png/.jpg/.jpeg images found under {shown(str(src))}")
    if roots is None:
        found = stratified_split(found, test_size, seed)
    return sorted(found, key=lambda f: (f.split, f.source)), ignored, skipped


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
        out += [replace(f, split="test" if i < n_test else "train") for i, f in enumerate(members)]
    return out


# -- checking images (runs in worker threads) -----------------------------------------------
def inspect_image(
    path: Path,
    max_side: int | None,
    max_pixels: int,
    budget: devices.PixelBudget,
    deep: bool = False,
    keep_metadata: bool = False,
) -> dict[str, Any]:
    """Check one image; return the bytes to store and their facts, or {"error": reason}.

    By default the check is structural, as fast as copying: the header (format, size, mode), every PNG
    chunk's CRC up to IEND, a JPEG's end marker; that catches empty, truncated, fake and corrupt files.
    `deep` decodes every pixel too. Metadata is removed losslessly (`metadata.py`) unless `keep_metadata`;
    images that must change (--max-side, an EXIF orientation, a format that cannot be cleaned) are decoded
    and stored as PNG. `width`/`height` are as the photo is shown; `sha256` is of the source file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:  # a regular file: the walk checked, so this cannot block
            expected = min(os.fstat(handle.fileno()).st_size, MAX_FILE_BYTES)
            data = handle.read(expected + 1)  # sized to the file: a 256 MB read buffer costs 1 ms an image
    except OSError as err:
        return {"error": f"unreadable: {err.strerror or err}"}
    if not data:
        return {"error": "empty file"}
    if len(data) > expected:
        return {"error": "grew while being read (still being written?)"}
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
            reduced = pixels > max_pixels and max_side is not None and image.format == "JPEG"
            if reduced and max_side is not None:
                image.draft("RGB", (max_side, max_side))  # JPEG decodes at 1/2, 1/4 or 1/8 scale directly
                pixels = image.width * image.height
            if pixels > max_pixels:
                return {"error": f"{image.width}x{image.height} = {pixels:,} pixels, over --max-pixels-in "
                                 f"{max_pixels:,} (raise it to take this image)"}  # fmt: skip
            png, problem = structural_check(data, image.format)
            if problem:
                return {"error": problem}
            turn = metadata.orientation(image, data, png)
            clean = None if keep_metadata else metadata.cleaned(data, image.format, png)
            resize = reduced or (max_side is not None and max(image.size) > max_side)
            redraw = resize or (not keep_metadata and (turn != 1 or clean is None))
            stored, size = (data if clean is None else clean), metadata.shown_size(image.size, turn)
            if not (deep or redraw or image.format not in STRUCTURAL_FORMATS):
                return stored_facts(data, stored, size)
            with budget.hold(pixels):
                image.load()
                if redraw:
                    return redrawn(image, data, max_side if resize else None, turn, cleaned=not keep_metadata)
                return stored_facts(data, stored, size)
    except UnidentifiedImageError:
        return {"error": "not an image (unknown format)"}
    except (OSError, SyntaxError, ValueError) as err:
        return {"error": f"cannot decode: {err}"}


STRUCTURAL_FORMATS = ("PNG", "JPEG", "MPO")  # others are decoded to be checked


def structural_check(data: bytes, image_format: str | None) -> tuple[list[tuple[bytes, int, int]] | None, str | None]:
    """(a PNG's chunks, what is wrong with the file's structure), read without decoding a pixel: every PNG
    chunk's length and CRC through IEND, a JPEG's end marker. Catches truncated and corrupt files as fast as
    copying them."""
    if image_format in metadata.JPEG_CLEANED:
        return None, None if metadata.jpeg_ends(data) else "cannot decode: truncated (no JPEG end marker)"
    if image_format == "PNG":
        return metadata.png_chunks(data)
    return None, None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored_facts(source: bytes, stored: bytes, size: tuple[int, int]) -> dict[str, Any]:
    return {
        "bytes": stored,
        "width": size[0],
        "height": size[1],
        "sha256": sha256(source),
        "cleaned": stored is not source,
        "turned": False,
    }


def redrawn(image: Any, data: bytes, max_side: int | None, turn: int, cleaned: bool) -> dict[str, Any]:
    """The decoded pixels turned upright (EXIF orientation), made smaller when `max_side` says so, stored as PNG:
    nothing but pixels leaves the source file (used where bytes cannot be kept: a resize, a turn, a format that
    cannot be cleaned losslessly)."""
    from PIL import Image, ImageOps

    turned = ImageOps.exif_transpose(image)
    if max_side is not None:
        turned = as_rgb(turned).copy()
        turned.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    stored = metadata.png_bytes(turned)
    return {
        "bytes": stored,
        "width": turned.width,
        "height": turned.height,
        "sha256": sha256(data),
        "cleaned": cleaned,
        "turned": turn != 1,
    }


def inspect_all(
    files: list[ImageFile],
    max_side: int | None,
    max_pixels: int,
    deep: bool,
    keep_metadata: bool,
    pool: ThreadPoolExecutor | None,
) -> Iterator[dict[str, Any]]:
    """Results in input order, a bounded window of them in flight so memory stays flat.

    Threads, not processes: Pillow's decoders and hashlib release the GIL, so threads use every
    core without pickling megabytes of image bytes between processes."""
    budget = devices.PixelBudget(max_pixels)
    check = functools.partial(
        inspect_image, max_side=max_side, max_pixels=max_pixels, budget=budget, deep=deep, keep_metadata=keep_metadata
    )
    if pool is None:
        yield from (check(f.path) for f in files)
        return
    queue = iter(files)
    # Enough in flight that the workers keep checking while the writer flushes a batch, and no more:
    # memory stays bounded whatever the number of workers.
    window = WRITE_BATCH + min(pool._max_workers * 2, 16)
    pending = deque(pool.submit(check, f.path) for f in islice(queue, window))
    while pending:
        result = pending.popleft().result()
        nxt = next(queue, None)
        if nxt is not None:
            pending.append(pool.submit(check, nxt.path))
        yield result


# -- building the dataset --------------------------------------------------------------------
def features() -> Any:
    from datasets import Features, Image, Value

    return Features(
        {
            "id": Value("string"),
            "image": Image(),  # the stored mode; consumers convert with images.as_rgb
            "label": Value("string"),
            "view": Value("string"),
            "split": Value("string"),
            "source": Value("string"),
            "width": Value("int32"),
            "height": Value("int32"),
            "sha256": Value("string"),
            "patient": Value("string"),  # a keyed hash of the id in the file's path, or the record id when unknown
            "subgroups": Value("string"),  # --metadata's attributes as a JSON object; never published
        }
    )


def write_split(rows: Iterator[dict[str, Any]], folder: Path, split: str) -> Any:
    """Stream rows, WRITE_BATCH at a time, straight into `save_to_disk` layout: images are written once.

    Writing a temporary Arrow file and then calling save_to_disk would copy every image a
    second time (about 16 GB for the AI Hub set)."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "data-00000-of-00001.arrow"
    with data_file.open("wb") as out, ArrowWriter(features=features(), stream=out) as writer:
        while batch := list(islice(rows, WRITE_BATCH)):
            writer.write_table(arrow_batch(batch))
            start_writeback(out)
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


def arrow_batch(rows: list[dict[str, Any]]) -> Any:
    """The rows as one Arrow table of `features()`.

    Built here rather than by ArrowWriter.write: Arrow's Python converter grows its buffer as it copies
    (22 ms for 16 photos), while joining zero-copy views of the bytes allocates once (6 ms)."""
    import pyarrow as pa

    schema = features().arrow_schema
    images = pa.concat_arrays([binary_view(row["image"]["bytes"]) for row in rows])
    no_paths = pa.nulls(len(rows), pa.string())
    columns = {
        name: pa.StructArray.from_arrays([images, no_paths], names=["bytes", "path"])
        if name == "image"
        else pa.array([row[name] for row in rows], schema.field(name).type)
        for name in schema.names
    }
    return pa.table(columns, schema=schema)


def binary_view(data: bytes) -> Any:
    """A one-element Arrow binary array over `data`, without copying it."""
    import pyarrow as pa

    offsets = pa.array([0, len(data)], pa.int32()).buffers()[1]
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, pa.py_buffer(data)])


def start_writeback(out: Any) -> None:
    """Hand what is written so far to the disk now, without waiting, so that the fsync that makes the stage
    durable finds little left to do and gigabytes of images do not crowd the page cache (Linux starts the
    writeback of dirty pages on POSIX_FADV_DONTNEED; elsewhere this does nothing)."""
    if hasattr(os, "posix_fadvise"):
        out.flush()
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def record_id(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


@writes("ingest")
def ingest(
    ws: Workspace,
    src: Path,
    rules: Rules,
    *,
    force: bool = False,
    test_size: float = 0.1,
    seed: int = 42,
    max_side: int | None = None,
    max_pixels_in: int = DEFAULT_MAX_PIXELS_IN,
    deep: bool = False,
    keep_metadata: bool = False,
    workers: int | None = None,
    about: str | None = None,
    patient_pattern: str | None = None,
    resplit: float | None = None,
    metadata: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    from datasets import DatasetDict
    from PIL import Image

    started, clock = now_iso(), time.perf_counter()
    if (ws.ingested / "dataset_dict.json").exists() and not force:
        raise SkinvlmError(f"{ws.ingested} already exists; pass --force to replace it")
    if max_side is not None and max_side < 16:
        raise SkinvlmError(f"--max-side must be at least 16 pixels, got {max_side}")
    if max_pixels_in < 64 * 64:
        raise SkinvlmError(f"--max-pixels-in must be at least 4096, got {max_pixels_in}")
    about = checked_about(about)
    Image.MAX_IMAGE_PIXELS = None  # our --max-pixels-in check, made before decoding, replaces Pillow's warning
    devices.return_freed_memory()
    files, ignored, skipped = discover(src, rules, test_size, seed)
    pattern = patient_pattern or rules.patients.pattern
    key = patient_key(ws) if pattern else b""
    described = read_metadata(metadata, (lambda raw: patient_hash(raw, key)) if pattern else None) if metadata else None
    files, patient_of = patient_ids(with_subgroups(files, described, "path", {}), pattern, key)
    files = with_subgroups(files, described, "patient", patient_of)
    named = subgroup_counts(files, described, metadata)
    skipped = skipped_without_ids(skipped, pattern, key)
    if resplit is not None:
        files = split_without_leakage(files, patient_of, resplit, seed, rules.audit.near_duplicate_distance)
    check_both_splits(files, resplit)
    workers = workers or os.cpu_count() or 1
    by_hash: dict[str, list[ImageFile]] = defaultdict(list)
    changed: Counter[str] = Counter()
    done = 0

    def rows(split: str) -> Iterator[dict[str, Any]]:
        nonlocal done
        chosen = [f for f in files if f.split == split]
        checked = inspect_all(chosen, max_side, max_pixels_in, deep, keep_metadata, pool)
        for f, found in zip(chosen, checked, strict=True):
            done += 1
            if progress:
                progress(done, len(files))
            if "error" in found:
                skipped.append({"path": f.source, "reason": found["error"]})
                continue
            by_hash[found["sha256"]].append(f)
            changed.update(k for k in ("cleaned", "turned") if found.pop(k))
            yield {
                "id": record_id(f.source),
                "image": {"bytes": found.pop("bytes"), "path": None},
                "label": f.label,
                "view": f.view,
                "split": split,
                "source": f.source,
                "patient": patient_of.get(f.source) or record_id(f.source),
                "subgroups": f.subgroups,
                **found,
            }

    def write(tmp: Path) -> IngestResult:
        data = DatasetDict({split: write_split(rows(split), tmp / split, split) for split in SPLITS})
        (tmp / "dataset_dict.json").write_text(json.dumps({"splits": list(SPLITS)}), encoding="utf-8")
        result = _result(ws, files, data, skipped, ignored, by_hash, time.perf_counter() - clock)
        result.metadata = {"kept": keep_metadata, "cleaned": changed["cleaned"], "turned": changed["turned"]}
        per_split = {split: len(set(data[split]["patient"])) for split in SPLITS}
        result.patients = {"known": pattern is not None, **per_split}
        result.subgroups = named
        result.settings = {
            "src": str(src.resolve()),
            "test_size": test_size,
            "seed": seed,
            "max_side": max_side,
            "max_pixels_in": max_pixels_in,
            "deep": deep,
            "keep_metadata": keep_metadata,
            "rules": str(rules.path),
            "workers": workers,
            "about": about,
            "patient_pattern": pattern,
            "resplit": resplit,
            "metadata_file": str(metadata.resolve()) if metadata else None,
            "split_made_by": split_description(resplit, seed, rules.audit.near_duplicate_distance, pattern),
        }
        inputs = {
            "src": str(src.resolve()),
            "files": len(files) + ignored,
            "fingerprint": fingerprint([(f.source, f.size) for f in files]),
        }
        counts = {
            "splits": result.splits,
            "per_class": result.counts,
            "skipped": len(skipped),
            "ignored": ignored,
            "duplicates": len(result.duplicates),
            "cross_split_duplicates": len(result.cross_split_duplicates),
            "metadata": result.metadata,
            "patients": result.patients,
            "subgroups": result.subgroups,
        }
        content = content_digest(data, ("id", "sha256", "label", "view", "split"))
        extra = {"skipped": skipped, "cross_split": result.cross_split_duplicates, "content": content}
        write_manifest(tmp, manifest("ingest", result.settings, inputs, counts, started, **extra))
        return result

    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        with staged(ws.ingested, "ingest") as tmp:
            result = write(tmp)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if pattern is not None:  # patients known: whether the split leaks, before anything is paid to describe it
        from skinvlm.leakage import counts, leakage

        result.leakage = counts(leakage(ws, rules))
    return result


def check_both_splits(files: list[ImageFile], resplit: float | None) -> None:
    """Training needs photos, and every figure needs held-out ones: a split --resplit cannot make is refused before
    any photo is stored; a tree without one of its folders is said in one line (a set ingested to be described
    and published whole may have none held out)."""
    import warnings

    for split, word in (("test", "held out"), ("train", "left to train on")):
        if any(f.split == split for f in files):
            continue
        if resplit is not None:
            raise SkinvlmError(
                f"--resplit {resplit}: no photo would be {word} (the {split} split would be empty): patients and "
                "copies of one photo go whole to one side, and these photos form too few such groups for this "
                "share; choose a share nearer 0.1-0.3, or add photos; nothing was written"
            )
        warnings.warn(
            f"the {split} split is empty (no photo {word}): the tree has no {SPLIT_NAMES[split]} folder with "
            "photos in it, or too few photos a class and view for --test-size; `--resplit 0.1` pools the photos "
            "and holds out a tenth of each class",
            stacklevel=2,
        )


def split_description(resplit: float | None, seed: int, radius: int, pattern: str | None) -> str:
    if resplit is None:
        return "the source's folders (Training/Validation), or a seeded split stratified by class and view"
    patients = "each patient" if pattern else "each photo (patients unknown)"
    return (
        f"ingest --resplit {resplit} --seed {seed}: every photo pooled; {resplit:.0%} of each class held out, "
        f"{patients} and each group of near-duplicate photos (pHash within {radius} bits) wholly on one side"
    )


def split_without_leakage(
    files: list[ImageFile], patient_of: dict[str, str], fraction: float, seed: int, radius: int
) -> list[ImageFile]:
    """Every photo pooled and split again: groups that must not be cut (a patient's photos, photos that are one
    photo re-exported) go whole to one side; each class sends about `fraction` of its photos to test."""
    from skinvlm.leakage import near_pairs

    if not 0 < fraction < 1:
        raise SkinvlmError(f"--resplit is the held-out share of the photos, between 0 and 1, not {fraction}")
    parent = list(range(len(files)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of: dict[str, int] = {}
    for i, f in enumerate(files):  # a patient's photos: one group
        j = first_of.setdefault(patient_of.get(f.source, f.source), i)
        parent[root(i)] = root(j)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        found = list(pool.map(hash_or_none, files))
    hashes = {str(i): h for i, h in enumerate(found) if h is not None}  # a broken file is skipped later anyway
    for a, b, _ in near_pairs(hashes, hashes, radius):  # one photo exported twice: one group
        parent[root(int(a))] = root(int(b))
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(files)):
        groups[root(i)].append(i)
    return assign_groups(files, list(groups.values()), fraction, seed)


def hash_or_none(f: ImageFile) -> int | None:
    from skinvlm.leakage import phash

    try:
        return phash(f.path.read_bytes())
    except Exception:  # noqa: BLE001 - not an image, truncated, unreadable: the check that follows names it
        return None


def assign_groups(files: list[ImageFile], groups: list[list[int]], fraction: float, seed: int) -> list[ImageFile]:
    """Whole groups to test, class by class in a seeded order, until each class holds its share there."""
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for group in sorted(groups):
        by_class[Counter(files[i].label for i in group).most_common(1)[0][0]].append(group)
    rng, split = random.Random(seed), ["train"] * len(files)
    for label in sorted(by_class):
        candidates = by_class[label]
        rng.shuffle(candidates)
        target, held = fraction * sum(len(g) for g in candidates), 0
        for group in candidates:
            if held + len(group) / 2 > target:
                continue
            for i in group:
                split[i] = "test"
            held += len(group)
    return sorted((replace(f, split=s) for f, s in zip(files, split, strict=True)), key=lambda f: (f.split, f.source))


def patient_ids(files: list[ImageFile], pattern: str | None, key: bytes) -> tuple[list[ImageFile], dict[str, str]]:
    """The files with the patient id in each path replaced by its keyed hash, and source -> that hash ({} without
    a pattern). File names hold chart numbers: from here on only the hash is in a path, so nothing stored or
    printed (the `source` column, the manifest's lists, the leakage line) holds an id."""
    if pattern is None:
        return files, {}
    if problem := patient_pattern_problem(pattern):
        raise SkinvlmError(f"--patient-pattern {problem}")
    regex = linear_regex(pattern)
    renamed, found, missed = [], {}, 0
    for f in files:
        source, hashed = hidden_patient(f.source, regex, key)
        if hashed is None:
            missed += 1
            continue
        renamed.append(replace(f, source=source))
        found[source] = hashed
    if missed:
        raise SkinvlmError(
            f"the patient pattern finds no patient id in {missed:,} of {len(files):,} photo paths (it is searched in "
            "each path relative to SRC, e.g. Training/images/TS_건선_정면/P0012_1.png): correct it; nothing was written"
        )
    if len(files) > 2 and len(set(found.values())) == 1:
        raise SkinvlmError(
            f"the patient pattern finds one patient in all {len(files):,} photos: its (?P<patient>...) group must "
            "hold the whole id (e.g. P(?P<patient>[0-9]+)_, not P(?P<patient>[0-9])); nothing was written"
        )
    return renamed, found


def patient_key(ws: Workspace) -> bytes:
    """The key patient ids are hashed with. Made once; a new one gives every patient a new hash, so one is not
    made silently where the ingested photos name patients by the old one."""
    if not ws.patient_key.exists() and ws.ingested.exists() and patients_known(ws):
        raise SkinvlmError(
            f"{ws.patient_key} is missing, and datasets/ingested names its patients by it: restore the key from a "
            "backup, or remove datasets/ingested to give every patient a new hash"
        )
    return secret_key(ws.patient_key, "restore it from a backup (a new key would give every patient a new hash)")


def hidden_patient(source: str, regex: Any, key: bytes) -> tuple[str, str | None]:
    """`source` with the id its pattern finds replaced by the id's keyed hash, and the hash (None: no id found)."""
    group = regex.groupindex["patient"]
    match = regex.search(source)
    if not match or not match.group(group):
        return source, None
    start, end = match.span(group)
    hashed = patient_hash(match.group(group), key)
    return source[:start] + hashed + source[end:], hashed


def patient_hash(raw: str, key: bytes) -> str:
    """A patient id's keyed hash: what every stored path, column and line names a patient by."""
    return "p" + hmac.new(key, raw.encode(), "sha256").hexdigest()[:15]


def with_subgroups(
    files: list[ImageFile], described: Metadata | None, key: str, patient_of: dict[str, str]
) -> list[ImageFile]:
    """The files with their --metadata attributes, matched by `key`: the path (before the patient id in it is
    hashed: the CSV names the photos as they are on disk) or the patient's keyed hash."""
    if described is None or described.key != key:
        return files
    name = (lambda f: f.source) if key == "path" else (lambda f: patient_of.get(f.source, ""))
    return [replace(f, subgroups=as_column(described.rows.get(name(f)))) for f in files]


def subgroup_counts(files: list[ImageFile], described: Metadata | None, path: Path | None) -> dict[str, Any] | None:
    """How many photos --metadata named; none at all is an error (the key column names photos some other way)."""
    if described is None or path is None:
        return None
    named = sum(1 for f in files if f.subgroups)
    if not named and files:
        example = "Training/images/TS_건선_정면/P0012_1.png" if described.key == "path" else "the id the pattern finds"
        raise SkinvlmError(
            f"--metadata {path} names none of the {len(files):,} photos: its {described.key} column must hold each "
            f"photo's {described.key} as ingest sees it (e.g. {example}); nothing was written"
        )
    return {
        "attributes": described.attributes,
        "keyed_by": described.key,
        "photos_with": named,
        "photos_without": len(files) - named,
        "rows": len(described.rows),
    }


def skipped_without_ids(skipped: list[dict[str, str]], pattern: str | None, key: bytes) -> list[dict[str, str]]:
    if pattern is None:
        return skipped
    regex = linear_regex(pattern)
    return [entry | {"path": hidden_patient(entry["path"], regex, key)[0]} for entry in skipped]


def checked_about(about: str | None) -> str | None:
    """--about: what the photos are, one line the cards quote; never a person's name or number."""
    from skinvlm import personal

    if about is None or not about.strip():
        return None
    about = " ".join(about.split())
    if len(about) > 300:
        raise SkinvlmError("--about is one line of 300 characters at most (what the photos are, where from)")
    if found := personal.find(about):
        raise SkinvlmError(f"--about holds what looks like personal data ({found[0].kind}): the cards publish it")
    return about


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
