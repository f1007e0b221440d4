"""The workspace: one folder that every command shares, and the only place that builds its paths.

Layout::

    datasets/ingested  datasets/described  datasets/fixed   (DatasetDicts, splits train/test)
    models/adapter     models/merged
    eval/<run>/
    journal/describe.jsonl                                   (append-only describe journal)
    publish/                                                 (publish --dry-run output)

Each stage folder holds a ``manifest.json`` written by the stage: resolved settings, input
fingerprint, counts, package versions and start/end time; never a secret.

Text stages (described, fixed) store only their own columns plus ``id``; loading them joins
the images of ``datasets/ingested`` back in without copying, so gigabytes of image bytes are
stored once however many text stages there are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skinvlm.errors import SkinvlmError
from skinvlm.redaction import redact

if TYPE_CHECKING:
    from datasets import DatasetDict

DATASET_STAGES = ("ingested", "described", "fixed")
MADE_BY = {"ingested": "skinvlm ingest SRC", "described": "skinvlm describe", "fixed": "skinvlm fix"}
REMADE_BY = {"describe": "skinvlm describe", "fix": "skinvlm fix", "train": "skinvlm train", "merge": "skinvlm merge"}
TEXT_STAGES = ("described", "fixed")
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
VERSIONED_PACKAGES = (
    "skinvlm",
    "datasets",
    "pillow",
    "openai",
    "transformers",
    "torch",
    "peft",
    "trl",
    "accelerate",
    "unsloth",
    "vllm",
    "scikit-learn",
)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: Path | str | None) -> Workspace:
        path = Path(root or os.environ.get("SKINVLM_WORKSPACE") or ".").expanduser()
        if path.exists() and not path.is_dir():
            raise SkinvlmError(f"workspace {path} is a file, not a folder")
        return cls(path.resolve())

    # -- paths -------------------------------------------------------------------------------
    def dataset(self, stage: str) -> Path:
        if stage not in DATASET_STAGES:
            raise SkinvlmError(f"unknown stage {stage!r}; choose one of {', '.join(DATASET_STAGES)}")
        return self.root / "datasets" / stage

    @property
    def ingested(self) -> Path:
        return self.dataset("ingested")

    @property
    def described(self) -> Path:
        return self.dataset("described")

    @property
    def fixed(self) -> Path:
        return self.dataset("fixed")

    @property
    def adapter(self) -> Path:
        return self.root / "models" / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "models" / "merged"

    @property
    def eval_root(self) -> Path:
        return self.root / "eval"

    def eval_run(self, name: str) -> Path:
        if not re.fullmatch(r"[\w.\-]+", name):
            raise SkinvlmError(f"run name {name!r} may hold only letters, digits, '.', '-' and '_'")
        return self.eval_root / name

    @property
    def describe_journal(self) -> Path:
        return self.root / "journal" / "describe.jsonl"

    @property
    def publish_dir(self) -> Path:
        return self.root / "publish"

    @property
    def rules_file(self) -> Path:
        return self.root / "postprocess.toml"

    @property
    def env_file(self) -> Path:
        return self.root / ".env"

    def require(self, stage: str) -> Path:
        """The stage's folder, which must exist and still match what it was made from."""
        path = self.dataset(stage)
        if not (path / "dataset_dict.json").exists():
            raise SkinvlmError(f"{path} does not exist yet: run `{MADE_BY[stage]}` first")
        rerun = out_of_date(self, path)
        if rerun:
            steps = " then ".join(f"`{command}`" for command in rerun)
            raise SkinvlmError(f"datasets/{stage} was made from data that has changed since: run {steps}")
        return path

    def newest_text_stage(self) -> str:
        present = [s for s in TEXT_STAGES if (self.dataset(s) / "dataset_dict.json").exists()]
        if not present:
            raise SkinvlmError(f"no described or fixed dataset in {self.root}: run `skinvlm describe` first")
        return max(present, key=lambda s: (self.dataset(s) / MANIFEST).stat().st_mtime)

    # -- datasets ----------------------------------------------------------------------------
    def load(self, stage: str) -> DatasetDict:
        """Load a stage; text stages come back joined with the ingested images (no copy)."""
        from datasets import DatasetDict, concatenate_datasets, load_from_disk

        data = load_from_disk(str(self.require(stage)))
        if stage not in TEXT_STAGES:
            return data
        images = load_from_disk(str(self.require("ingested")))
        joined = {}
        for split, text in data.items():
            base = images[split]
            base_ids, text_ids = list(base["id"]), list(text["id"])
            if base_ids != text_ids:  # rows were dropped (fix --drop-invalid): pick them by id, no copy
                position = {rid: i for i, rid in enumerate(base_ids)}
                if any(rid not in position for rid in text_ids):
                    raise SkinvlmError(
                        f"{self.dataset(stage)} no longer matches datasets/ingested ({split} ids differ): "
                        "ingest was re-run; run describe again"
                    )
                base = base.select([position[rid] for rid in text_ids])
            keep = [c for c in base.column_names if c not in text.column_names]
            joined[split] = concatenate_datasets([base.select_columns(keep), text], axis=1)
        return DatasetDict(joined)

    def save(self, stage: str, data: DatasetDict, manifest: dict[str, Any]) -> Path:
        """Write a stage atomically: a crash mid-write leaves the previous version intact."""
        from datasets import disable_progress_bars

        disable_progress_bars()  # our own rich bars run on stderr; tqdm lines would garble them
        target = self.dataset(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{stage}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        data.save_to_disk(str(tmp))
        write_manifest(tmp, manifest | {"content": content_digest(data)})
        replace_dir(tmp, target)
        return target


def replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# -- manifests -------------------------------------------------------------------------------
def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def manifest(
    stage: str, settings: dict[str, Any], inputs: dict[str, Any], counts: dict[str, Any], started: str, **extra: Any
) -> dict[str, Any]:
    return {
        "stage": stage,
        "settings": settings,
        "inputs": inputs,
        "counts": counts,
        "versions": package_versions(),
        "started": started,
        "finished": now_iso(),
        **extra,
    }


def write_manifest(folder: Path, content: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(redact(content), ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SkinvlmError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None


def fingerprint(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, ensure_ascii=False, default=str).encode())
    return digest.hexdigest()[:16]


def content_digest(data: DatasetDict, columns: tuple[str, ...] | None = None) -> str:
    """What a stage holds, for the stages made from it: by default every column (text stages); ingest
    names its small columns, so no image byte is read."""
    digest = hashlib.sha256()
    for split in sorted(data):
        for column in columns or tuple(data[split].column_names):
            digest.update(json.dumps([split, column, data[split][column]], ensure_ascii=False, default=str).encode())
    return digest.hexdigest()[:16]


def stage_fingerprint(folder: Path) -> str | None:
    """A stage's identity for the manifests of the stages built from it: its content digest when it has one,
    so a re-run that changes nothing leaves the stages after it current."""
    found = read_manifest(folder)
    if not found:
        return None
    return found.get("content") or fingerprint(found)


def out_of_date(ws: Workspace, folder: Path) -> list[str]:
    """The commands to re-run, in order, because what `folder` was made from changed since; [] when current."""
    found = read_manifest(folder) or {}
    inputs = found.get("inputs", {})
    if inputs.get("stage") in DATASET_STAGES:
        source = ws.dataset(inputs["stage"])
    elif inputs.get("adapter"):
        source = Path(inputs["adapter"])
    else:
        return []  # made from a folder of images, or by hand
    upstream = out_of_date(ws, source)
    if upstream or inputs.get("fingerprint") != stage_fingerprint(source):
        return [*upstream, REMADE_BY.get(found.get("stage", ""), f"skinvlm {found.get('stage')}")]
    return []


@dataclass(frozen=True)
class StageStatus:
    name: str
    path: Path
    present: bool
    rows: dict[str, int]
    finished: str
    inputs: str
    rerun: list[str]  # what to re-run because its input changed since; [] when current


def stage_status(ws: Workspace) -> list[StageStatus]:
    """What each stage folder holds, read from the manifests the stages wrote."""
    folders = [(s, ws.dataset(s)) for s in DATASET_STAGES] + [("adapter", ws.adapter), ("merged", ws.merged)]
    if ws.eval_root.is_dir():
        folders += [(f"eval/{p.name}", p) for p in sorted(ws.eval_root.iterdir()) if p.is_dir()]
    out = []
    for name, path in folders:
        found = read_manifest(path) if path.is_dir() else None
        counts = (found or {}).get("counts", {})
        rows = counts.get("splits") if isinstance(counts.get("splits"), dict) else {}
        inputs = (found or {}).get("inputs", {})
        source = inputs.get("src") or inputs.get("stage") or inputs.get("model") or ""
        present = path.is_dir() and any(path.iterdir())
        rerun = out_of_date(ws, path) if found else []
        out.append(StageStatus(name, path, present, rows, (found or {}).get("finished", ""), str(source), rerun))
    return out
