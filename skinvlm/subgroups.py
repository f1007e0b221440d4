"""Who the photos are (skin type, age band, sex...): read at ingest from a CSV beside the photos, kept with each
photo, and broken down by eval. Never published: the dataset card and the Hub copy leave them out, as they leave
out file names.

The CSV has one key column, `path` (the photo's path relative to SRC, as a file listing gives it) or `patient`
(the id the patient pattern finds in a path), and up to MAX_ATTRIBUTES others, each one subgroup attribute:

    path,fitzpatrick,age_band,sex
    Training/images/TS_건선_정면/P0012_1.png,IV,40-49,F
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinvlm.errors import SkinvlmError

KEYS = ("path", "patient")
MAX_ATTRIBUTES = 8
MAX_VALUE = 40  # characters: a band or a category, not a note
ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MIN_GROUP = 10  # photos below which a subgroup's figure says nothing: it is said to be too small instead


@dataclass(frozen=True)
class Metadata:
    key: str  # "path" or "patient"
    attributes: list[str]
    rows: dict[str, dict[str, str]]  # key value (a path, or a patient's keyed hash) -> attribute -> value


def read_metadata(path: Path, hash_patient: Callable[[str], str] | None) -> Metadata:
    """The CSV, checked: a clear one-line error for a file that cannot be read, a missing or doubled key, a bad
    attribute name or value. `hash_patient` turns a raw patient id into its keyed hash (None: no patient
    pattern), so no raw id is kept even in memory past this function. A row's values are never quoted in an
    error: they are about a patient."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel writes a byte-order mark
    except (OSError, UnicodeDecodeError) as problem:
        raise SkinvlmError(f"--metadata {path}: cannot be read as UTF-8 text ({problem.__class__.__name__})") from None
    table = list(csv.reader(text.splitlines()))
    if not table:
        raise SkinvlmError(f"--metadata {path} is empty: it needs a header row (path or patient, then attributes)")
    header = [nfc(name).strip().lower() for name in table[0]]
    key, attributes = checked_header(header, path)
    if key == "patient" and hash_patient is None:
        raise SkinvlmError(f"--metadata {path} is keyed by patient: give --patient-pattern too (or key it by path)")
    rows: dict[str, dict[str, str]] = {}
    for number, row in enumerate(table[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise SkinvlmError(f"--metadata {path} row {number} has {len(row)} cells; the header has {len(header)}")
        cells = dict(zip(header, (nfc(cell).strip() for cell in row), strict=True))
        if not cells[key]:
            raise SkinvlmError(f"--metadata {path} row {number} has no {key}")
        name = hash_patient(cells[key]) if key == "patient" and hash_patient else normalised_path(cells[key])
        if name in rows:
            raise SkinvlmError(f"--metadata {path} row {number} names the same {key} as an earlier row")
        rows[name] = {a: checked_value(cells[a], path, number, a) for a in attributes if cells[a]}
    return Metadata(key, attributes, rows)


def checked_header(header: list[str], path: Path) -> tuple[str, list[str]]:
    keys = [name for name in header if name in KEYS]
    if len(keys) != 1:
        raise SkinvlmError(f"--metadata {path}: the header needs one key column, path or patient (has: "
                           f"{', '.join(header[:12]) or 'nothing'})")  # fmt: skip
    attributes = [name for name in header if name not in KEYS]
    if not attributes:
        raise SkinvlmError(f"--metadata {path} has no attribute column beside {keys[0]} (e.g. fitzpatrick, sex)")
    if len(attributes) > MAX_ATTRIBUTES:
        raise SkinvlmError(f"--metadata {path} has {len(attributes)} attribute columns; at most {MAX_ATTRIBUTES}")
    if bad := [a for a in attributes if not ATTRIBUTE_NAME.match(a)]:
        raise SkinvlmError(f"--metadata {path}: attribute names are lower-case letters, digits and _ (not {bad[0]!r})")
    if len(set(header)) != len(header):
        raise SkinvlmError(f"--metadata {path}: a column name appears twice in the header")
    return keys[0], attributes


def checked_value(value: str, path: Path, number: int, attribute: str) -> str:
    if len(value) > MAX_VALUE or not value.isprintable():
        raise SkinvlmError(f"--metadata {path} row {number}: {attribute} must be a short category (at most "
                           f"{MAX_VALUE} printable characters)")  # fmt: skip
    return value


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def normalised_path(text: str) -> str:
    """A path as `ingest` names a photo: '/'-separated, relative, NFC."""
    return nfc(text).strip().replace("\\", "/").removeprefix("./")


def as_column(values: dict[str, str] | None) -> str:
    """A photo's attributes as stored in the `subgroups` column: a JSON object, "" when none are known."""
    return json.dumps(values, ensure_ascii=False, sort_keys=True) if values else ""


def from_column(text: str | None) -> dict[str, str]:
    return json.loads(text) if text else {}


# -- eval's breakdown ----------------------------------------------------------------------------
def breakdown(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per attribute: each group's photos and accuracy with its interval (by its own patients' design effect), a
    group under MIN_GROUP photos said to be too small, and the worst group against the rest of the photos whose
    value is known. The worst is picked on these very photos, so its figure leans low: it says where to look."""
    from skinvlm import stats

    attributes = sorted({a for r in records for a in r.get("subgroups", {})})
    found: dict[str, Any] = {}
    for attribute in attributes:
        known = [r for r in records if attribute in r.get("subgroups", {})]
        groups: dict[str, list[dict[str, Any]]] = {}
        for record in known:
            groups.setdefault(record["subgroups"][attribute], []).append(record)
        figures = {value: group_figures(members, stats) for value, members in sorted(groups.items())}
        sized = [value for value, f in figures.items() if not f["too_small"]]
        worst = min(sized, key=lambda v: (figures[v]["accuracy"], v)) if len(sized) > 1 else None
        rest = [r for r in known if r["subgroups"][attribute] != worst] if worst else []
        found[attribute] = {
            "groups": figures,
            "unknown": len(records) - len(known),
            "worst": worst,
            "rest": group_figures(rest, stats) if worst else None,
        }
    return found


def group_figures(members: list[dict[str, Any]], stats: Any) -> dict[str, Any]:
    hits = [r["predicted"] == r["label"] for r in members]
    patients = [r["patient"] for r in members] if all(r.get("patient") for r in members) else None
    too_small = len(members) < MIN_GROUP
    return {
        "n": len(members),
        "patients": len(set(patients)) if patients else None,
        "too_small": too_small,
        "accuracy": None if too_small else round(sum(hits) / len(hits), 4),
        "interval": None if too_small else stats.share_interval(hits, patients),
    }


def lines(found: dict[str, Any]) -> list[str]:
    """The breakdown in sentences, one an attribute: what report.md, the card and the checklist say."""
    said = []
    for attribute, figures in found.items():
        parts = []
        for value, f in figures["groups"].items():
            if f["too_small"]:
                parts.append(f"{value} {f['n']} photos, too few to say anything")
            else:
                parts.append(f"{value} {f['accuracy']:.3f} ({f['interval'][0]:.3f}-{f['interval'][1]:.3f}, n={f['n']})")
        line = f"{attribute}: " + "; ".join(parts)
        if figures["worst"]:
            rest = figures["rest"]
            line += (f"; worst {figures['worst']} against the rest {rest['accuracy']:.3f} "
                     f"({rest['interval'][0]:.3f}-{rest['interval'][1]:.3f})")  # fmt: skip
        if figures["unknown"]:
            line += f"; {figures['unknown']} photos with no {attribute}"
        said.append(line)
    return said
