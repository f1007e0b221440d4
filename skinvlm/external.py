"""`eval --dataset`: photos from outside the workspace (another clinic, a public set), scored by the same eval.

A folder of class folders (`acne/*.jpg`, `rosacea/*.png`), or a Hugging Face Hub dataset with an image and a
label column. Its class names reach ours through `[external.labels]` in the rule file (`acne = "여드름"`), or
directly when a folder is already named by a class, an alias or a class's English name. Photos of other classes
are out of scope: asked like the rest, never scored, counted with what the model answered for them.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError
from skinvlm.ingest import DEFAULT_MAX_PIXELS_IN, IMAGE_SUFFIXES
from skinvlm.rules import Rules, nfc

OUT_OF_SCOPE = ""  # an Item's label when its photo's class is none of ours


def shown_name(dataset: str) -> str:
    """How a report names the external set: a folder by its own name (not where this machine keeps it)."""
    path = Path(dataset)
    return path.name if path.exists() else dataset


def load(dataset: str, split: str) -> tuple[Any, list[str]]:
    """(a Dataset with an `image` column, each photo's class name as the source gives it)."""
    path = Path(dataset).expanduser()
    shown: list[str] | None = None  # how each photo is named in a line about it (a folder's: its relative path)
    if path.exists():
        ds, names, shown = from_folder(path)
    elif looks_local(dataset):
        raise SkinvlmError(f"--dataset {dataset}: no such folder here (a Hub dataset id is OWNER/NAME, tried only "
                           "where no folder of that name's first part exists)")  # fmt: skip
    elif dataset.count("/") == 1:
        ds, names = from_hub(dataset, split)
    else:
        raise SkinvlmError(f"--dataset {dataset}: no such folder, and not a Hub dataset id (OWNER/NAME)")
    return with_sizes(ds, shown), names


def looks_local(dataset: str) -> bool:
    """A path that cannot be a Hub id: absolute, relative to here or home, or under a folder that exists."""
    first = dataset.split("/", 1)[0]
    return dataset.startswith(("/", ".", "~")) or "\\" in dataset or (bool(first) and Path(first).is_dir())


def with_sizes(ds: Any, shown: list[str] | None) -> Any:
    """`width` and `height` from each photo's header, as datasets/ingested has them (the decoder's memory budget
    reads them before it opens a photo); each photo decoded once here, under ingest's pixel cap, so a broken or
    enormous one is one line naming it before any is sent, not an error inside the concurrent eval."""
    import io

    from datasets import Image as ImageFeature
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # the cap below is checked before decoding; Pillow's would only warn or raise
    sizes = []
    for i, row in enumerate(ds.cast_column("image", ImageFeature(decode=False))):
        source = io.BytesIO(row["image"]["bytes"]) if row["image"]["bytes"] else row["image"]["path"]
        name = shown[i] if shown else f"photo {i + 1}"
        try:
            with Image.open(source) as image:
                if image.width * image.height > DEFAULT_MAX_PIXELS_IN:
                    raise SkinvlmError(
                        f"--dataset: {name} is {image.width}x{image.height} pixels, more than "
                        f"{DEFAULT_MAX_PIXELS_IN // 2**20} MP: scale it down or leave it out"
                    )
                image.load()
                sizes.append(image.size)
        except (OSError, SyntaxError, ValueError) as err:
            raise SkinvlmError(f"--dataset: {name} cannot be read ({err}): replace it or leave it out") from None
    return ds.add_column("width", [w for w, _ in sizes]).add_column("height", [h for _, h in sizes])


def from_folder(root: Path) -> tuple[Any, list[str], list[str]]:
    """Photos in class folders under `root`, no link followed: a folder given to eval (unpacked from a zip,
    perhaps) must not send photos from elsewhere on this machine to the endpoint."""
    from datasets import Dataset, Image

    if not root.is_dir():
        raise SkinvlmError(f"--dataset {root.name} is not a folder of class folders")
    paths, names, links = [], [], []
    for folder in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if folder.is_symlink():
            links.append(folder)
            continue
        if not folder.is_dir():
            continue
        for where, dirs, files in os.walk(folder):  # os.walk follows no link to a folder
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            links += [Path(where, d) for d in dirs if Path(where, d).is_symlink()]
            for file in sorted(files):
                photo = Path(where, file)
                if photo.is_symlink():
                    links.append(photo)
                elif photo.suffix.lower() in IMAGE_SUFFIXES and not file.startswith("."):
                    paths.append(str(photo))
                    names.append(nfc(folder.name))
    if links:
        raise SkinvlmError(f"--dataset {root.name} holds {len(links)} link(s) (e.g. {links[0].relative_to(root)}): "
                           "eval follows none out of the folder; put the photos themselves there")  # fmt: skip
    if not paths:
        raise SkinvlmError(f"--dataset {root.name}: no .png/.jpg photos in class folders under it")
    shown = [str(Path(p).relative_to(root)) for p in paths]
    return Dataset.from_dict({"image": paths}).cast_column("image", Image()), names, shown


def from_hub(repo: str, split: str) -> tuple[Any, list[str]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(repo, split=split)
    except (OSError, ValueError) as err:  # not found, offline, refused
        raise SkinvlmError(f"--dataset {repo} --split {split}: no such folder here, and the Hub cannot give it "
                           f"({type(err).__name__})") from None  # fmt: skip
    if "image" not in ds.column_names or "label" not in ds.column_names:
        raise SkinvlmError(f"--dataset {repo} needs an `image` and a `label` column (has {', '.join(ds.column_names)})")
    feature = ds.features["label"]
    names = [feature.int2str(v) if hasattr(feature, "int2str") else str(v) for v in ds["label"]]
    return ds.select_columns(["image"]), [nfc(n) for n in names]


def our_class(name: str, rules: Rules) -> str:
    """The class an external class name maps to, or OUT_OF_SCOPE."""
    return rules.external_labels.get(name) or rules.canonical(name) or OUT_OF_SCOPE


def record_id(dataset: str, index: int, name: str) -> str:
    return hashlib.sha1(f"{shown_name(dataset)}:{name}:{index}".encode()).hexdigest()[:16]


def summary(dataset: str, names: list[str], records: list[dict[str, Any]], rules: Rules) -> dict[str, Any]:
    """What metrics.json says under `external`: the set, what was scored, and the photos out of scope."""
    scope = Counter(our_class(n, rules) != OUT_OF_SCOPE for n in names)
    out = [r for r in records if r["label"] == OUT_OF_SCOPE]
    return {
        "dataset": shown_name(dataset),
        "classes": dict(Counter(names)),
        "mapped": {n: our_class(n, rules) for n in sorted(set(names)) if our_class(n, rules)},
        "scored": scope[True],
        "out_of_scope": {
            "n": scope[False],
            "classes": dict(Counter(n for n in names if our_class(n, rules) == OUT_OF_SCOPE)),
            "answered": dict(Counter(r["predicted"] for r in out)),
        },
    }
