"""Leakage between splits: a patient with photos in both, or one photo in both (resized, re-encoded, brightened,
or cropped by a percent or so: pHash is sensitive to larger crops). Either makes held-out figures look better
than they are, and nobody can tell from them.

Photos are compared by a perceptual hash (imagehash's pHash: 64 bits from the low frequencies of a 32x32 DCT),
cached by the source file's sha256 under `cache/`, so a second audit hashes nothing. Pairs across splits within
`near_duplicate_distance` bits are found by comparing every training hash with every held-out one in numpy
blocks (see `near_duplicates` for why not an index).
"""

from __future__ import annotations

import heapq
import json
import operator
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from skinvlm import devices
from skinvlm.rules import Rules
from skinvlm.workspace import Workspace, patients_known, stage_fingerprint, write_json

EXAMPLES = 20  # pairs and patients listed in full; the counts are always whole


def phash(data: bytes) -> int:
    import io

    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (256, 256))  # a JPEG decodes at a fraction of its size: pHash looks at 32x32 anyway
        return int(str(imagehash.phash(image.convert("L"))), 16)


def photo_hashes(ws: Workspace, ingested: Any) -> dict[str, dict[str, int]]:
    """split -> record id -> pHash, computed on threads for photos not in the cache, which is then rewritten."""
    from datasets import Image

    path = ws.phash_cache
    cache: dict[str, str] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    found: dict[str, dict[str, int]] = {}
    hashed = False
    for split, ds in ingested.items():
        rows = ds.select_columns(["id", "sha256"])
        missing = [i for i, sha in enumerate(rows["sha256"]) if sha not in cache]
        if missing:
            images = ds.cast_column("image", Image(decode=False)).select(missing)
            with ThreadPoolExecutor(devices.cpu_count()) as pool:
                made = list(pool.map(phash, (row["image"]["bytes"] for row in images)))
            cache.update((rows[i]["sha256"], f"{h:016x}") for i, h in zip(missing, made, strict=True))
            hashed = True
        found[split] = {rid: int(cache[sha], 16) for rid, sha in zip(rows["id"], rows["sha256"], strict=True)}
    if hashed:  # a second audit reads the cache and writes nothing
        write_json(path, cache)
    return found


def near_pairs(train: dict[str, int], held_out: dict[str, int], radius: int) -> Iterator[tuple[str, str, int]]:
    """(training id, held-out id, distance) of every pair within `radius` bits, a block at a time, unsorted.

    Every pair is compared, a block of held-out hashes at a time against all training hashes, by a vectorised
    XOR and popcount (about 1e9 pairs a second here). Two indexes were measured first (benchmarks/leakage.py):
    a BK-tree and multi-index hashing (radius + 1 bands, one of which a near pair must share); on 64-bit hashes
    at radius 8 both prune too little to pay for their Python bookkeeping and ran 14-200x slower at 100,000.
    A generator: 20,000 copies of one photo are 200 million pairs, which no list of them should hold.
    """
    import numpy as np

    ids, held_ids = list(train), list(held_out)
    values = np.array([train[i] for i in ids], dtype=np.uint64)
    held = np.array([held_out[i] for i in held_ids], dtype=np.uint64)
    block = max(1, BLOCK_PAIRS // max(1, len(values)))
    for start in range(0, len(held), block):
        distance = np.bitwise_count(held[start : start + block, None] ^ values[None, :])
        rows, columns = np.nonzero(distance <= radius)
        yield from ((ids[c], held_ids[start + r], int(distance[r, c])) for r, c in zip(rows, columns, strict=True))


def near_duplicates(
    train: dict[str, int], held_out: dict[str, int], radius: int, keep: int = EXAMPLES
) -> tuple[int, list[tuple[str, str, int]]]:
    """How many pairs lie within `radius` bits, and the `keep` nearest (memory bounded by `keep`, not the count)."""
    count, nearest = 0, []
    order = operator.itemgetter(2, 0, 1)
    for pair in near_pairs(train, held_out, radius):
        count += 1
        nearest.append(pair)
        if len(nearest) > 4 * keep:
            nearest = heapq.nsmallest(keep, nearest, key=order)
    return count, heapq.nsmallest(keep, nearest, key=order)


BLOCK_PAIRS = 2**20  # pairs compared at once


def shared_patients(ingested: Any) -> Counter[str]:
    """Patient (keyed hash) -> photos, for patients with photos in more than one split."""
    splits_of: dict[str, set[str]] = {}
    photos: Counter[str] = Counter()
    for split, ds in ingested.items():
        for patient in ds["patient"] if "patient" in ds.column_names else []:
            splits_of.setdefault(patient, set()).add(split)
            photos[patient] += 1
    return Counter({p: photos[p] for p, splits in splits_of.items() if len(splits) > 1})


def leakage(ws: Workspace, rules: Rules) -> dict[str, Any]:
    """What `audit --json` says under `leakage`: counts, then the pairs and patients themselves (ids only)."""
    from datasets import load_from_disk

    ingested = load_from_disk(str(ws.require("ingested")))
    known = patients_known(ws)
    hashes = photo_hashes(ws, ingested)
    radius = rules.audit.near_duplicate_distance
    count, pairs = near_duplicates(hashes.get("train", {}), hashes.get("test", {}), radius)
    patients = shared_patients(ingested) if known else Counter()
    # the pairs' files as ingest stored their paths (patient ids hashed): for the clinic to look at, on this machine
    shown = {rid for a, b, _ in pairs for rid in (a, b)}
    where = {rid: source for ds in ingested.values() for rid, source in zip(ds["id"], ds["source"], strict=True)
             if rid in shown}  # fmt: skip
    found = {
        "patients_known": known,
        "patients_in_both_splits": len(patients),
        "near_duplicates_across_splits": count,
        "max_distance": radius,
        "pairs": [
            {"train": a, "test": b, "distance": d, "train_path": where.get(a), "test_path": where.get(b)}
            for a, b, d in pairs
        ],  # fmt: skip
        "patients": [{"patient": p, "photos": n} for p, n in patients.most_common(EXAMPLES)],
    }
    write_json(ws.leakage_record, {"ingested": stage_fingerprint(ws.ingested), **found})
    return found


def last_check(ws: Workspace) -> dict[str, Any] | None:
    """The last audit's leakage figures, while datasets/ingested is still what it checked (else None)."""
    path = ws.leakage_record
    if not path.is_file():
        return None
    found = json.loads(path.read_text(encoding="utf-8"))
    return found if found.get("ingested") == stage_fingerprint(ws.ingested) else None


def found_any(found: dict[str, Any]) -> bool:
    return bool(found.get("patients_in_both_splits") or found.get("near_duplicates_across_splits"))


def warning(found: dict[str, Any] | None) -> str | None:
    """The one sentence every place that shows held-out figures says while the split leaks (None: it does not, or
    it was never checked)."""
    if not found or not found_any(found):
        return None
    return (
        f"{found['patients_in_both_splits']} patients and {found['near_duplicates_across_splits']} near-duplicate "
        "photos are in both splits: held-out figures are optimistic; `skinvlm ingest SRC --force --resplit 0.1` "
        "makes a split that cannot leak"
    )


def counts(found: dict[str, Any] | None) -> dict[str, Any] | None:
    """The figures metrics.json and the ui carry of the last check (no pairs or patients named)."""
    keys = ("patients_known", "patients_in_both_splits", "near_duplicates_across_splits")
    return {k: found.get(k) for k in keys} if found else None


def shown_pairs(pairs: Iterable[dict[str, Any]]) -> list[str]:
    return [f"{p.get('train_path') or p['train']} ~ {p.get('test_path') or p['test']} ({p['distance']} bits apart)"
            for p in pairs]  # fmt: skip
