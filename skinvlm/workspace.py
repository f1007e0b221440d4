"""The workspace: one folder that every command shares, and the only place that builds its paths.

Layout::

    datasets/ingested  datasets/described  datasets/fixed   (DatasetDicts, splits train/test)
    models/adapter     models/merged
    eval/<run>/
    journal/describe.jsonl                                   (append-only describe journal)
    publish/                                                 (publish --dry-run output)

Each stage folder holds a ``manifest.json`` written by the stage: resolved settings, input
fingerprint, counts, package versions and start/end time; never a secret.

State changes the way git makes them. One writer at a time: every writing command holds the
workspace lock (``.skinvlm.lock``, via filelock; the OS frees it when its holder dies, so a killed
run leaves nothing to clean up), and a second writer is refused at once with who holds it. A stage
(``datasets/fixed``, ``models/merged``, ...) is a link to a versioned folder beside it
(``.fixed.v3``): a new version is written and fsynced beside the old one and made current by
renaming a new link over the old, one atomic step, so at every instant a complete stage is in
place. Leftovers of writers that died are removed when the next writer takes the lock.

Text stages (described, fixed) store only their own columns plus ``id``; loading them joins
the images of ``datasets/ingested`` back in without copying, so gigabytes of image bytes are
stored once however many text stages there are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from skinvlm.errors import SkinvlmError, json_problem, read_json_object
from skinvlm.redaction import redact

if TYPE_CHECKING:
    from datasets import DatasetDict

DATASET_STAGES = ("ingested", "described", "fixed")
MADE_BY = {"ingested": "skinvlm ingest SRC", "described": "skinvlm describe", "fixed": "skinvlm fix"}
REMADE_BY = {"describe": "skinvlm describe", "fix": "skinvlm fix", "train": "skinvlm train", "merge": "skinvlm merge"}
TEXT_STAGES = ("described", "fixed")
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
METRICS = "metrics.json"  # an eval run's figures: written last, so its presence says the run finished
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

    def require_root(self) -> None:
        """The workspace folder exists: every command but ingest (which starts one) and doctor needs it."""
        if not self.root.is_dir():
            raise SkinvlmError(
                f"no workspace at {self.root}: check -w, or start one with `skinvlm ingest SRC -w {self.root}`"
            )

    def eval_run(self, name: str) -> Path:
        if not re.fullmatch(r"[\w.\-]{1,100}", name) or name in (".", ".."):
            shown = name if len(name) <= 40 else name[:40] + "..."
            raise SkinvlmError(f"run name {shown!r} must be 1-100 letters, digits, '.', '-' or '_'")
        return self.eval_root / name

    def eval_metrics(self, name: str) -> Path:
        """An eval run's figures: the file whose presence says the run finished."""
        return self.eval_run(name) / METRICS

    def finished_evals(self) -> list[str]:
        """The names of the eval runs that finished (wrote their metrics), sorted."""
        if not self.eval_root.is_dir():
            return []
        return sorted(p.parent.name for p in self.eval_root.glob(f"*/{METRICS}") if p.is_file())

    def read_eval(self, name: str) -> dict[str, Any]:
        """An eval run's metrics, or one line naming what is wrong: missing (not run, or stopped before its
        figures) or damaged (a half-copied or hand-edited file), never a JSON traceback."""
        path = self.eval_metrics(name)
        if not path.is_file():
            raise SkinvlmError(f"no eval run {name!r} in {self.eval_root} ({METRICS} missing)")
        return read_json_object(path, f"eval run {name!r}:")

    @property
    def describe_journal(self) -> Path:
        return self.root / "journal" / "describe.jsonl"

    @property
    def review_journal(self) -> Path:
        return self.root / "journal" / "review.jsonl"

    @property
    def answer_review_journal(self) -> Path:
        return self.root / "journal" / "answer-review.jsonl"

    @property
    def review_key(self) -> Path:
        return self.root / "journal" / "review.key"

    @property
    def phash_cache(self) -> Path:
        return self.root / "cache" / "phash.json"

    @property
    def leakage_record(self) -> Path:
        return self.root / "cache" / "leakage.json"  # the last audit's leakage figures, for eval's checklist

    @property
    def patient_key(self) -> Path:
        return self.root / "journal" / "patient.key"

    @property
    def publish_dataset(self) -> Path:
        """What `publish` uploads as a dataset repo, exactly: shards and card."""
        return self.root / "publish" / "dataset"

    @property
    def publish_model(self) -> Path:
        """What `publish --model-dir` uploads as a model repo, exactly: the model's files and its card."""
        return self.root / "publish" / "model"

    @property
    def published(self) -> Path:
        """Which repos this workspace's publishes reached (beside, not inside, the uploaded folders)."""
        return self.root / "publish" / "published.json"

    @property
    def rules_file(self) -> Path:
        return self.root / "postprocess.toml"

    @property
    def env_file(self) -> Path:
        return self.root / ".env"

    def require(self, stage: str, newer_reviews: bool = False) -> Path:
        """The stage's folder, which must exist and still match what it was made from (and, unless
        `newer_reviews`, the clinicians' review decisions as they stand: review itself and audit read on)."""
        path = current(self.dataset(stage))
        if not (path / "dataset_dict.json").exists():
            raise SkinvlmError(f"{path} does not exist yet: run `{MADE_BY[stage]}` first")
        rerun = out_of_date(self, path, reviews=not newer_reviews)
        if rerun:
            steps = " then ".join(f"`{command}`" for command in rerun)
            if reviewed_since(self, (read_manifest(path) or {}).get("inputs", {})):
                raise SkinvlmError(f"clinicians made review decisions after datasets/{stage} was made: run {steps}")
            raise SkinvlmError(f"datasets/{stage} was made from data that has changed since: run {steps}")
        return path

    def newest_text_stage(self) -> str:
        present = [s for s in TEXT_STAGES if (self.dataset(s) / "dataset_dict.json").exists()]
        if not present:
            raise SkinvlmError(f"no described or fixed dataset in {self.root}: run `skinvlm describe` first")
        return max(present, key=lambda s: (self.dataset(s) / MANIFEST).stat().st_mtime)

    # -- datasets ----------------------------------------------------------------------------
    def load(self, stage: str, newer_reviews: bool = False) -> DatasetDict:
        """Load a stage; text stages come back joined with the ingested images (no copy)."""
        from datasets import DatasetDict, concatenate_datasets, load_from_disk

        data = load_from_disk(str(self.require(stage, newer_reviews)))
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
        """Write a stage as a new version and make it current atomically (see `staged`)."""
        from datasets import disable_progress_bars

        disable_progress_bars()  # our own rich bars run on stderr; tqdm lines would garble them
        target = self.dataset(stage)
        with staged(target, manifest["stage"]) as tmp:
            # One shard a split: text stages are small, and datasets cannot load back an empty split it sharded
            # itself (a tree too small for a test split would break every later command).
            data.save_to_disk(str(tmp), num_shards={split: 1 for split in data})
            write_manifest(tmp, manifest | {"content": content_digest(data)})
        return target

    def stage_targets(self) -> list[Path]:
        """The folders that are replaced as a whole, by `staged`."""
        return [*(self.dataset(s) for s in DATASET_STAGES), self.merged]

    def writing(self, command: str) -> AbstractContextManager[None]:
        return writing(self, command)


# -- one writer, atomic stages ----------------------------------------------------------------
LOCK_FILE = ".skinvlm.lock"
HOLDER_FILE = ".skinvlm.lock.json"  # who holds the lock, for the message a second writer gets
HELD_FOR = "SKINVLM_LOCK_HELD_FOR"  # the workspace a parent process holds the lock of, for its children
CRASH_AT = "SKINVLM_CRASH_AT"  # fault injection for the tests: die at this step of a swap
Params = ParamSpec("Params")
Result = TypeVar("Result")


def crash_point(step: str) -> None:
    """The tests kill a writer between the steps of a swap by naming the step; a no-op otherwise."""
    if os.environ.get(CRASH_AT) == step:
        os._exit(99)


@contextmanager
def writing(ws: Workspace, command: str) -> Iterator[None]:
    """Hold the workspace lock while `skinvlm COMMAND` writes; refuse at once if another writer holds it."""
    from filelock import FileLock, Timeout

    if os.environ.get(HELD_FOR) == str(ws.root):  # our parent (torchrun's launcher) holds it for us
        yield
        return
    if command != "ingest":  # a mistyped -w must not leave a folder behind
        ws.require_root()
    ws.root.mkdir(parents=True, exist_ok=True)
    path = ws.root / LOCK_FILE
    made_lock = not path.exists()
    if path.is_dir() or (path.is_symlink() and not path.exists()):
        kind = "a folder" if path.is_dir() else "a link to nothing"
        raise SkinvlmError(f"{path} is {kind}, where skinvlm keeps its lock file: remove it and run again")
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SkinvlmError(f"{ws.root} is busy: {lock_holder(ws)} is writing to it; wait for it or stop it") from None
    holder = ws.root / HOLDER_FILE
    try:
        holder.write_text(json.dumps({"command": command, "pid": os.getpid(), "since": now_iso()}), encoding="utf-8")
        os.environ[HELD_FOR] = str(ws.root)
        for target in ws.stage_targets():
            tidy(target)
        yield
    finally:
        os.environ.pop(HELD_FOR, None)
        holder.unlink(missing_ok=True)
        lock.release()
        if made_lock and not holds_work(ws):  # a command that failed in a folder it never made a workspace of
            path.unlink(missing_ok=True)


WORK = ("datasets", "models", "eval", "journal", "publish")


def holds_work(ws: Workspace) -> bool:
    """Whether a stage ever wrote in this folder (what makes it a workspace, beyond a rule file or keys)."""
    return any((ws.root / name).exists() for name in WORK)


def writes(command: str) -> Callable[[Callable[Params, Result]], Callable[Params, Result]]:
    """A stage function (its first argument the Workspace) that runs holding the workspace lock."""

    def wrap(stage: Callable[Params, Result]) -> Callable[Params, Result]:
        @functools.wraps(stage)
        def locked(*args: Params.args, **kwargs: Params.kwargs) -> Result:
            ws = args[0]
            assert isinstance(ws, Workspace)
            with writing(ws, command):
                return stage(*args, **kwargs)

        return locked

    return wrap


def lock_holder(ws: Workspace) -> str:
    try:
        found = json.loads((ws.root / HOLDER_FILE).read_text(encoding="utf-8"))
        return f"`skinvlm {found['command']}` (PID {found['pid']}, since {found['since'][11:19]} UTC)"
    except (OSError, ValueError, KeyError, TypeError):
        return "another skinvlm command"


def versions(target: Path) -> list[Path]:
    """The versioned folders beside a stage, oldest first."""
    found = []
    for path in target.parent.glob(f".{target.name}.v*"):
        number = path.name.rsplit(".v", 1)[-1]
        if number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def current(target: Path) -> Path:
    """The stage a reader should open: `target`, or, in the instant after a crash that left it without its
    link (possible only while a pre-versioning folder is migrated), its newest complete version."""
    if target.exists():
        return target
    complete = [v for v in versions(target) if (v / MANIFEST).exists()]
    return complete[-1] if complete else target


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def point(target: Path, version: Path) -> None:
    """Make `target` a link to `version` in one rename, over whatever link was there."""
    link = target.with_name(f".{target.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    os.symlink(version.name, link)
    crash_point("linked")
    if target.is_dir() and not target.is_symlink():  # a stage written before versioned folders
        os.rename(target, target.with_name(f".{target.name}.v0"))
        crash_point("migrated")
    os.replace(link, target)
    fsync_dir(target.parent)


def swap_in(new: Path, target: Path) -> None:
    """`new` (complete) becomes the stage at `target`; the version it replaces is removed afterwards."""
    fsync_tree(new)
    numbers = [int(v.name.rsplit(".v", 1)[-1]) for v in versions(target)]
    version = target.with_name(f".{target.name}.v{max(numbers, default=0) + 1}")
    os.rename(new, version)
    crash_point("renamed")
    point(target, version)
    crash_point("swapped")
    for old in versions(target):
        if old != version:
            shutil.rmtree(old, ignore_errors=True)


def check_replaceable(target: Path, stage: str) -> None:
    """`target` may be replaced only where it holds what `stage` wrote before (a link to its version, or a folder
    from before versioned stages, its manifest naming the stage), or nothing: an empty folder or none. A folder
    the user chose (merge --output) may be the workspace itself, or hold a clinic's files."""
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    try:
        found = read_manifest(target) if target.is_dir() else None
    except SkinvlmError:
        found = None
    if not isinstance(found, dict) or found.get("stage") != stage:
        raise SkinvlmError(
            f"{target} holds files that `skinvlm {stage}` did not write: it replaces only its own earlier output, "
            "an empty folder or none; choose another folder"
        )


@contextmanager
def staged(target: Path, stage: str) -> Iterator[Path]:
    """A fresh folder beside `target` for its next version; made current on success, removed on failure.
    Refused before anything is written where `target` holds what `stage` did not make (`check_replaceable`)."""
    check_replaceable(target, stage)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tidy(target: Path) -> None:
    """What writers that died left beside a stage: temporary folders and links, versions no link points at;
    and a stage left without its link is pointed back at its newest complete version."""
    if not target.parent.is_dir():
        return
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*", f".{target.name}.link-*"):
        for leftover in target.parent.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    found = versions(target)
    if not target.exists():
        complete = [v for v in found if (v / MANIFEST).exists()]
        if complete:
            point(target, complete[-1])
    live = target.resolve() if target.is_symlink() else None
    for version in found:
        if version.resolve() != live:
            shutil.rmtree(version, ignore_errors=True)


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


def write_json(path: Path, content: Any) -> None:
    write_text(path, json.dumps(content, ensure_ascii=False, indent=2, default=str))


def write_text(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of either (a full disk leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_manifest(folder: Path, content: dict[str, Any]) -> None:
    write_json(folder / MANIFEST, redact(content))


def secret_key(path: Path, damaged: str = "delete it (open review pages will then ask to be reloaded)") -> bytes:
    """A workspace secret (32 random bytes, readable by its owner only), made once and shared by every process:
    written whole under another name and linked into place, so one starting at the same moment never reads half
    of it."""
    if path.is_symlink() and not path.exists() or path.exists() and not path.is_file():
        raise SkinvlmError(f"{path} is not a file (a folder or a broken link): remove it and run again")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        try:
            os.link(draft, path)
        except FileExistsError:  # another process made it first: theirs stands
            pass
        except OSError:  # a filesystem without hard links: a rename is whole too, if not exclusive
            os.replace(draft, path)
        draft.unlink(missing_ok=True)
    try:
        key = path.read_bytes()
    except OSError as err:
        raise SkinvlmError(f"cannot read {path} ({err.strerror or err}): remove it and run again") from None
    if len(key) != 32:
        raise SkinvlmError(f"{path} is damaged: {damaged}")
    return key


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SkinvlmError(f"{path} is not valid JSON ({json_problem(err)})") from None


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


def patients_known(ws: Workspace) -> bool:
    """Whether datasets/ingested was made with a patient pattern (its `patient` column then names patients)."""
    return bool((read_manifest(ws.ingested) or {}).get("settings", {}).get("patient_pattern"))


def patients_text(patients: dict[str, Any]) -> str:
    """Ingest's patient counts as `status` and ingest print them ('patients: train 24, test 18')."""
    return "patients: " + ", ".join(f"{split} {n:,}" for split, n in patients.items() if split != "known")


def stage_fingerprint(folder: Path) -> str | None:
    """A stage's identity for the manifests of the stages built from it: its content digest when it has one,
    so a re-run that changes nothing leaves the stages after it current."""
    found = read_manifest(folder)
    if not found:
        return None
    return found.get("content") or fingerprint(found)


def journal_digest(data: bytes) -> str | None:
    """A journal's finished lines, as a digest (None when it has none): a line still being written is not one."""
    finished = data[: data.rfind(b"\n") + 1]
    return hashlib.sha256(finished).hexdigest()[:16] if finished else None


def review_digest(ws: Workspace) -> str | None:
    """The clinicians' decisions as they stand now (None: no review yet)."""
    return journal_digest(ws.review_journal.read_bytes()) if ws.review_journal.exists() else None


def reviewed_since(ws: Workspace, inputs: dict[str, Any]) -> bool:
    """Whether review decisions were made after the stage with these manifest `inputs` (a fix) applied them; stages
    that apply none say nothing."""
    return "review" in inputs and inputs["review"] != review_digest(ws)


def out_of_date(ws: Workspace, folder: Path, reviews: bool = True) -> list[str]:
    """The commands to re-run, in order, because what `folder` was made from changed since (with `reviews`, the
    review decisions a fix applied too); [] when current."""
    found = fields(read_manifest(folder))
    inputs = fields(found.get("inputs"))
    if inputs.get("stage") in DATASET_STAGES:
        source = ws.dataset(inputs["stage"])
    elif inputs.get("adapter"):
        source = Path(inputs["adapter"])
    else:
        return []  # made from a folder of images, or by hand
    upstream = out_of_date(ws, source, reviews)
    changed = inputs.get("fingerprint") != stage_fingerprint(source) or (reviews and reviewed_since(ws, inputs))
    if upstream or changed:
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
    figures: str = ""  # the headline of a model or eval run: steps and loss, merge error, accuracy and macro F1


def stage_status(ws: Workspace) -> list[StageStatus]:
    """What each stage folder holds, read from the manifests the stages wrote."""
    folders = [(s, ws.dataset(s)) for s in DATASET_STAGES] + [("adapter", ws.adapter), ("merged", ws.merged)]
    models = ws.root / "models"
    if models.is_dir():  # adapters and merged models trained with --output elsewhere under models/
        known = {ws.adapter.name, ws.merged.name}
        folders += [
            (f"models/{p.name}", p)
            for p in sorted(models.iterdir())
            if p.is_dir() and not p.name.startswith(".") and p.name not in known and (p / MANIFEST).exists()
        ]
    if ws.eval_root.is_dir():
        folders += [(f"eval/{p.name}", p) for p in sorted(ws.eval_root.iterdir()) if p.is_dir()]
    out = []
    for name, link in folders:
        path = current(link)
        found = read_manifest(path) if path.is_dir() else None
        counts = fields(fields(found).get("counts"))
        rows = fields(counts.get("splits"))
        inputs = fields(fields(found).get("inputs"))
        source = inputs.get("src") or inputs.get("stage") or inputs.get("model") or ""
        present = path.is_dir() and any(path.iterdir())
        rerun = out_of_date(ws, path) if found else []
        if present and not isinstance(found, dict) and name in REMAKE:
            rerun = [REMAKE[name]]  # a folder without its manifest: unfinished, damaged or made by hand
        if name.startswith("eval/") and not (path / METRICS).is_file():
            rerun = [f"eval --name {path.name}"]  # stopped before its figures: the answers kept, the run not done
        finished = str(fields(found).get("finished", ""))
        out.append(StageStatus(name, path, present, rows, finished, str(source), rerun, headline(found, path)))
    return out


REMAKE = {"ingested": "skinvlm ingest SRC --force", **{k: MADE_BY[k] for k in TEXT_STAGES},
          "adapter": REMADE_BY["train"], "merged": REMADE_BY["merge"]}  # fmt: skip


def fields(value: Any) -> dict[str, Any]:
    """A manifest's object, or {} for what is not one (a manifest edited by hand, or written by another tool)."""
    return value if isinstance(value, dict) else {}


def headline(found: dict[str, Any] | None, path: Path) -> str:
    """The figures a list of runs shows (as `gh run list` or `llm logs` do): from an eval run's metrics.json, or
    the counts a train or merge manifest keeps."""
    metrics = path / METRICS
    if (path / "predictions.jsonl").is_file() and not metrics.is_file():
        with (path / "predictions.jsonl").open("rb") as answers:
            kept = sum(1 for line in answers if line.strip())
        return f"unfinished: {kept:,} answers kept"
    if metrics.is_file():
        try:
            m = json.loads(metrics.read_text(encoding="utf-8"))
            return f"accuracy {m['accuracy']:.3f}, macro F1 {m['macro_f1']:.3f}, {m['n']:,} photos"
        except (ValueError, KeyError, TypeError):
            return "metrics.json damaged"
    try:
        return manifest_headline(fields(found))
    except (TypeError, ValueError, AttributeError, KeyError):  # a field of another type than skinvlm writes
        return "manifest.json damaged"


def manifest_headline(found: dict[str, Any]) -> str:
    counts = fields(found.get("counts"))
    if found.get("stage") == "train" and counts.get("method") == "grpo":
        start = Path(found.get("inputs", {}).get("from_adapter", "?")).name
        reward = counts.get("mean_reward") or {}
        rose = f", mean reward {reward['first']:.3f} -> {reward['last']:.3f}" if reward else ""
        return f"GRPO from {start}: {counts.get('steps', 0):,} steps{rose}"
    if found.get("stage") == "train":
        loss = counts.get("final_loss")
        return f"{counts.get('steps', 0):,} steps" + (f", final loss {loss:.4f}" if isinstance(loss, float) else "")
    if found.get("stage") == "ingest" and counts.get("patients"):
        patients = counts["patients"]
        return patients_text(patients) if patients.get("known") else "patients unknown (ingest --patient-pattern)"
    if found.get("stage") == "fix" and counts.get("review"):
        return "review: " + ", ".join(f"{status} {n:,}" for status, n in counts["review"].items())
    if found.get("stage") == "merge" and isinstance(counts.get("merge_error"), float):
        return f"merge error {counts['merge_error']:.3g} (tolerance {counts.get('tolerance', 0):.3g})"
    return ""
