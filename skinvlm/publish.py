"""`skinvlm publish`: the dataset and a proper dataset card, to the Hugging Face Hub.

The token and the repository are checked first (who the token is, that it may write under OWNER), so a
refusal comes before minutes of shard writing. Then `<workspace>/publish/` is built: parquet shards (about
500 MB each, images embedded; only PUBLISHED_COLUMNS: no file names or paths) and README.md whose counts
are read back from those shards. `--dry-run` stops there; otherwise that very folder is uploaded with
`HfApi.upload_folder`, to a private repo unless `--public`, in one commit that also deletes the repo's
earlier data files, so the Hub holds what this publish made and nothing more.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinvlm import metadata, openai_api
from skinvlm.audit import AuditReport, audit, leak_failures, strict_failures
from skinvlm.errors import SkinvlmError
from skinvlm.rules import Rules
from skinvlm.workspace import Workspace, now_iso, read_manifest, write_json, writes

SHARD_BYTES = 500 * 2**20
# What an earlier publish left that this one replaces (a model's weights may have been sharded otherwise)
REPLACED_ON_UPLOAD = {
    "dataset": ["data/*", "README.md"],
    "model": ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.txt", "README.md"],
}
AIHUB_URL = "https://www.aihub.or.kr/aihubdata/data/view.do?dataSetSn=71863"
# What leaves the machine of each record: never `source` (file names and folders can hold a patient's name),
# `sha256` (of the source file, metadata included) or the describe errors.
PUBLISHED_COLUMNS = (
    "id",
    "image",
    "label",
    "view",
    "split",
    "width",
    "height",
    "output",
    "status",
    "model",
    "prompt_hash",
    "review",
)


@dataclass
class PublishResult:
    repo: str
    private: bool
    folder: Path
    files: list[tuple[str, int]] = field(default_factory=list)
    uploaded: bool = False
    url: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "private": self.private,
            "folder": str(self.folder),
            "uploaded": self.uploaded,
            "url": self.url,
            "files": [{"path": p, "bytes": n} for p, n in self.files],
        }


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def write_shards(data: Any, folder: Path) -> list[Path]:
    written = []
    for split, ds in data.items():
        if not ds.num_rows:
            continue  # an empty split has no file to point a config at (and datasets 4 cannot write one)
        ds = ds.select_columns([c for c in PUBLISHED_COLUMNS if c in ds.column_names])
        shards = max(1, math.ceil(ds.data.nbytes / SHARD_BYTES))
        for i in range(shards):
            path = folder / "data" / f"{split}-{i:05d}-of-{shards:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.shard(shards, i, contiguous=True).to_parquet(str(path))
            written.append(path)
    return written


def shard_counts(shards: list[Path]) -> dict[str, Counter[tuple[str, str]]]:
    """Per split, records per (label, view), read back from the written shards: the card states what they hold."""
    import pyarrow.parquet as pq

    counts: dict[str, Counter[tuple[str, str]]] = {}
    for path in shards:
        table = pq.read_table(path, columns=["split", "label", "view"]).to_pydict()
        split = path.name.split("-")[0]
        counts.setdefault(split, Counter()).update(zip(table["label"], table["view"], strict=True))
    return counts


def made_by(data: Any) -> list[str]:
    """Who wrote the published text, per model, prompt and endpoint, with counts of the published records."""
    made: Counter[tuple[str, str, str]] = Counter()
    for ds in data.values():
        columns = [ds[c] if c in ds.column_names else [""] * ds.num_rows for c in ("model", "prompt_hash", "endpoint")]
        made.update(zip(*columns, strict=True))
    return [
        f"- offline class templates (`describe --template`): {n:,} records"
        if model == "template"
        else f"- `{model or 'no model'}` at `{endpoint or 'an endpoint not recorded'}`, prompt `{prompt or '?'}`: "
        f"{n:,} records"
        for (model, prompt, endpoint), n in made.most_common()
    ]


def audit_lines(report: AuditReport) -> list[str]:
    """The card's honest account of the audit: passed, or what failed (the records' problems and the leakage
    between splits, as `audit --strict` refuses them)."""
    failed_gate = strict_failures(report)
    if not failed_gate:
        return ["- Checked with `skinvlm audit --strict`: no record has a problem, no personal data was found, and "
                "no patient or near-duplicate photo is in both splits."]  # fmt: skip
    if not report.problems:
        failures = "; ".join(failed_gate)
        return [f"- **Published with `--ignore-audit` although `skinvlm audit --strict` fails: {failures}** (held-out "
                "figures on this split are optimistic)."]  # fmt: skip
    failed = {
        "personal data (records; values not shown)": report.personal_records,
        "English words (occurrences)": sum(report.english_words.values()),
        "other scripts (records)": sum(report.foreign_scripts.values()),
        "<label> naming another class than the folder": report.mismatches,
        "<label> that is no class": sum(report.not_class_tags.values()),
        "missing <label> or <summary>": report.invalid,
        "empty answers": report.empty,
        "summaries too short": report.too_short,
    }
    listed = [f"  - {check}: {n:,}" for check, n in failed.items() if n]
    leaks = [f"  - {phrase}" for phrase in leak_failures(report.leakage)]
    return [
        f"- **Published with `--ignore-audit` although `skinvlm audit` finds {report.problems:,} of {report.records:,} "
        "records with problems:**",
        *listed,
        *leaks,
    ]


@dataclass
class Provenance:
    """What the card says of where the records came from and what was left out, from the stages' manifests."""

    ingested: dict[str, Any]
    described: dict[str, Any]
    fixed: dict[str, Any] | None
    ingested_rows: dict[str, int]

    @classmethod
    def of(cls, ws: Workspace, stage: str) -> Provenance:
        ingested = read_manifest(ws.ingested) or {}
        return cls(
            ingested,
            read_manifest(ws.described) or {},
            read_manifest(ws.fixed) if stage == "fixed" else None,
            ingested.get("counts", {}).get("splits", {}),  # rows per split, as ingest counted them
        )

    def left_out(self, published: dict[str, int]) -> list[str]:
        skipped = Counter(reason_kind(s["reason"]) for s in self.ingested.get("skipped", []))
        lines = [f"- Files not ingested: {sum(skipped.values()):,}" + (f" ({counts_text(skipped)})" if skipped else "")]
        for split, n in self.ingested_rows.items():
            gone = n - published.get(split, 0)
            if gone:
                lines.append(
                    f"- `{split}`: {gone:,} of {n:,} ingested photos left out by `skinvlm fix` ({self.fix_drops()})"
                )
        return lines

    def fix_drops(self) -> str:
        settings = (self.fixed or {}).get("settings", {})
        dropped = (self.fixed or {}).get("counts", {}).get("dropped_by") or {}
        chosen = [flag for flag, on in (("--drop-invalid", settings.get("drop_invalid")),
                                        ("--drop-mismatches", settings.get("drop_mismatches"))) if on]  # fmt: skip
        return counts_text(Counter(dropped)) if dropped else ", ".join(chosen) or "reason not recorded"

    def metadata_lines(self) -> list[str]:
        meta = self.ingested.get("counts", {}).get("metadata") or {}
        return [
            f"- File metadata (EXIF with GPS and camera serials, PNG text, JPEG APP segments and comments) was removed "
            f"at ingest from {meta.get('cleaned', 0):,} files without re-encoding their pixels; "
            f"{meta.get('turned', 0):,} photos were turned upright by their EXIF orientation and stored as PNG.",
            "- File names and folder paths are not published (no `source` column), nor the source files' hashes.",
        ]


def review_lines(data: Any) -> list[str]:
    """What clinicians made of the published records (`skinvlm review`, applied by `fix`)."""
    outcomes: Counter[str] = Counter()
    for ds in data.values():
        outcomes.update(ds["review"] if "review" in ds.column_names else ["unreviewed"] * ds.num_rows)
    total, read = sum(outcomes.values()), sum(n for status, n in outcomes.items() if status != "unreviewed")
    if not read:
        return ["- Not reviewed by clinicians: every description is as the model wrote it, after the rules."]
    shown = ", ".join(f"{status} {n:,}" for status, n in outcomes.most_common())
    return [
        f"- Reviewed by clinicians in `skinvlm review`: {read:,} of {total:,} records ({shown}); the `review` "
        "column says each record's outcome, and edited descriptions and corrected labels are the clinicians'."
    ]


def reason_kind(reason: str) -> str:
    """'cannot decode: broken PNG file (bad checksum in IDAT chunk)' -> 'cannot decode'."""
    return reason.split(":")[0].split(" (")[0]


def counts_text(counts: Counter[str]) -> str:
    return ", ".join(f"{what}: {n:,}" for what, n in counts.most_common())


def card(
    repo: str,
    data: Any,
    counts: dict[str, Counter[tuple[str, str]]],
    rules: Rules,
    stage: str,
    provenance: Provenance,
    report: AuditReport,
) -> str:
    per_split = {split: sum(c.values()) for split, c in counts.items()}
    total = sum(per_split.values())
    splits = list(counts)
    views = list(rules.views)
    yaml = [
        "---",
        "language:",
        "- ko",
        "task_categories:",
        "- image-text-to-text",
        "- image-classification",
        "size_categories:",
        f"- {size_category(total)}",
        "# license: choose one that the photos' terms of use allow",
        "tags:",
        "- medical",
        "- dermatology",
        "- vision-language",
        "pretty_name: Korean facial skin disease VLM data",
        "configs:",
        "- config_name: default",
        "  data_files:",
        *[f"  - split: {s}\n    path: data/{s}-*" for s in splits],
        "---",
    ]
    header = "| split | class | English | " + " | ".join(views) + " | total |"
    table = [header, "|" + "---|" * (4 + len(views))]
    for split, pairs in counts.items():
        for c in rules.classes:
            row = [pairs[(c.name, v)] for v in views]
            table.append(f"| {split} | {c.name} | {c.english} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    described = provenance.described
    body = [
        f"# {repo}",
        "",
        "Facial skin photos with a Korean description of what is visible, for instruction-tuning "
        "vision-language models to name the condition and explain it. Built with skinvlm from: "
        f"{photos_about(provenance.ingested)}.",
        "",
        "## Contents",
        "",
        f"{total:,} records; classes {', '.join(rules.class_names)}; views {', '.join(views)}; "
        f"splits {', '.join(f'{s} ({per_split[s]:,})' for s in splits)}. The counts below are read from the "
        "published files.",
        "",
        *table,
        "",
        "Columns: `image`, `label` (the folder's diagnosis: ground truth), `view`, `split`, `width` and `height` "
        "(as shown), `output` (`<label>질병명</label>` + `<summary>소견</summary>`), `status`, `model` and "
        "`prompt_hash` (who wrote the text).",
        "",
        "## What was left out",
        "",
        *provenance.left_out(per_split),
        "",
        "## How the text was made",
        "",
        "Descriptions conditioned on the known diagnosis of each photo, written by:",
        "",
        *made_by(data),
        "",
        f"- Described {described.get('finished', 'at an unrecorded time')}; published stage `{stage}` on "
        f"{now_iso()[:10]}.",
        "- Cleaned with the rule file (label aliases, English term translations, phrase rewrites, personal data "
        "redacted)."
        if stage == "fixed"
        else "- Not cleaned: the text is as `skinvlm describe` wrote it.",
        *audit_lines(report),
        *review_lines(data),
        "",
        "## Privacy",
        "",
        *provenance.metadata_lines(),
        "",
        "## Source and terms",
        "",
        *source_lines(provenance.ingested),
        "",
    ]
    return "\n".join(yaml + [""] + body)


NOT_DESCRIBED = "photos not described at ingest (to be written by the team: `skinvlm ingest SRC --about TEXT --force`)"


def photos_about(ingested: dict[str, Any]) -> str:
    """What the photos are, as `ingest --about` recorded it (the cards never guess a source)."""
    return ingested.get("settings", {}).get("about") or NOT_DESCRIBED


def source_lines(ingested: dict[str, Any]) -> list[str]:
    about = photos_about(ingested)
    lines = [f"Images: {about}."]
    if "AI Hub" in about or "aihub" in about.lower():
        lines[0] += (f" AI Hub's set is at {AIHUB_URL}: use it under AI Hub's terms of use (cite the source, get "
                     "approval before any commercial use).")  # fmt: skip
    else:
        lines.append("Terms of use of the photos: to be written by the team.")
    return [*lines, "The descriptions are machine-generated (or templates) and are not medical advice."]


def build(
    ws: Workspace, rules: Rules, repo: str, stage: str, report: AuditReport
) -> tuple[Path, list[tuple[str, int]]]:
    data = ws.load(stage)
    folder = ws.publish_dataset
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards = write_shards(data, folder)
    text = card(repo, data, shard_counts(shards), rules, stage, Provenance.of(ws, stage), report)
    (folder / "README.md").write_text(text, encoding="utf-8")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    return folder, files


def metadata_kept(ws: Workspace) -> str | None:
    """Why the ingested images may still carry file metadata, or None when ingest removed it."""
    settings = (read_manifest(ws.ingested) or {}).get("settings", {})
    if "keep_metadata" not in settings:
        return "datasets/ingested was made by a skinvlm that kept file metadata"
    return "datasets/ingested keeps file metadata (ingest --keep-metadata)" if settings["keep_metadata"] else None


def refuse_photos_with_metadata(data: Any) -> None:
    """Every stored photo passes ingest's metadata rule again (`metadata.leftover`) before a shard is written:
    whatever made the dataset (an older skinvlm, a hand edit), nothing outside the kept set leaves."""
    from datasets import Image

    found: list[str] = []
    for split, ds in data.items():
        for batch in ds.cast_column("image", Image(decode=False)).iter(batch_size=256):
            for record_id, image in zip(batch["id"], batch["image"], strict=True):
                if reason := metadata.leftover(image["bytes"] or b""):
                    found.append(f"{split}/{record_id} ({reason})")
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise SkinvlmError(
            f"{len(found)} stored photos hold file metadata outside what skinvlm keeps: {shown}; "
            "run `skinvlm ingest SRC --force` (answers already paid for are kept); nothing was written"
        )


def repo_name(ws: Workspace, repo: str | None) -> str:
    repo = repo or openai_api.setting(ws, "HF_REPO_NAME")
    if not repo or repo.count("/") != 1 or not all(repo.split("/")):
        raise SkinvlmError("name the Hub repo as OWNER/NAME (argument or HF_REPO_NAME)")
    return repo


def hub_token(ws: Workspace, token: str | None) -> str:
    token = token or openai_api.setting(ws, "HF_TOKEN")
    if not token:
        raise SkinvlmError("no Hugging Face token: set HF_TOKEN in the environment or <workspace>/.env")
    return token


def ready_to_upload(
    ws: Workspace, repo: str, token: str | None, yes: bool, confirm: Callable[[str], bool] | None
) -> str:
    """Everything an upload needs that can be known before a file is written: a token that may write under the
    repo's owner, and a way to confirm. Returns the token."""
    token = hub_token(ws, token)
    check_access(repo, token)
    if not yes and (not sys.stdin.isatty() or confirm is None):
        raise SkinvlmError("publishing needs confirmation: pass --yes (no terminal to ask on)")
    return token


@writes("publish")
def publish(
    ws: Workspace,
    rules: Rules,
    repo: str | None,
    *,
    stage: str = "fixed",
    public: bool = False,
    dry_run: bool = False,
    yes: bool = False,
    force: bool = False,
    token: str | None = None,
    confirm: Callable[[str], bool] | None = None,
    phase: Callable[[str], None] = lambda _: None,
) -> PublishResult:
    repo = repo_name(ws, repo)
    if reason := metadata_kept(ws):
        raise SkinvlmError(f"{reason}: run `skinvlm ingest SRC --force` (answers already paid for are kept) to publish")
    ws.require(stage)  # before the audit, which reads a fix that review decisions overtook
    phase(f"checking the metadata of every photo in {stage}")
    refuse_photos_with_metadata(ws.load(stage))
    phase(f"auditing {stage}")
    report = audit(ws, rules, stage)
    if (failed := strict_failures(report)) and not force:
        raise SkinvlmError(
            f"`skinvlm audit --stage {stage} --strict` fails: {'; '.join(failed)}: fix them (records: `skinvlm fix`; "
            "a leak: `skinvlm ingest SRC --force --resplit 0.1`) or pass --ignore-audit"
        )
    if not dry_run:
        phase(f"checking HF_TOKEN and {repo}")
        token = ready_to_upload(ws, repo, token, yes, confirm)
    phase("writing Parquet shards and the dataset card")
    folder, files = build(ws, rules, repo, stage, report)
    result = PublishResult(repo, not public, folder, files)
    if dry_run:
        return result
    assert token is not None
    return confirmed_upload(ws, "dataset", result, token, yes, confirm, phase)


def confirmed_upload(
    ws: Workspace,
    kind: str,
    result: PublishResult,
    token: str,
    yes: bool,
    confirm: Callable[[str], bool] | None,
    phase: Callable[[str], None],
) -> PublishResult:
    """Ask (unless `yes`), upload `result.folder` as a `kind` repo, and remember where it went."""
    shown = f"{len(result.files)} files to {'private' if result.private else 'PUBLIC'} {kind} {result.repo}"
    if not yes and not (confirm and confirm(f"upload {shown}?")):
        raise SkinvlmError("not confirmed; nothing was uploaded")
    phase(f"uploading {shown}")
    result.url = upload(result.folder, result.repo, token, private=result.private, repo_type=kind)
    result.uploaded = True
    remember(ws, kind, result)
    return result


def remember(ws: Workspace, kind: str, result: PublishResult) -> None:
    """Which repo a publish reached, for the other kind's card (a model card names its dataset)."""
    known = json.loads(ws.published.read_text(encoding="utf-8")) if ws.published.is_file() else {}
    known[kind] = {"repo": result.repo, "url": result.url, "private": result.private, "uploaded": result.uploaded}
    write_json(ws.published, known)


@contextmanager
def hub_errors(repo: str, doing: str) -> Iterator[None]:
    """The Hub's refusals and unreachability as one line each; nothing else is caught."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise SkinvlmError(f"HF_HUB_OFFLINE is set: unset it to {doing} (nothing was uploaded)") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        raise SkinvlmError(
            f"the Hub refused to {doing} {repo} (HTTP {status}): check that HF_TOKEN may write there "
            "(a write token, and OWNER is you or an organization you belong to)"
        ) from None
    except Exception as err:
        if not is_network_error(err):
            raise
        raise SkinvlmError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to {doing} {repo} ({type(err).__name__}): "
            "check the network, a proxy (HTTPS_PROXY) or HF_ENDPOINT; nothing was uploaded"
        ) from None


def check_access(repo: str, token: str) -> None:
    """The token is valid, may write, and its owner is the repo's OWNER or one of the owner's organizations."""
    from huggingface_hub import HfApi

    with hub_errors(repo, "check the token for"):
        me = HfApi(token=token).whoami()
    owner = repo.split("/")[0]
    names = [me.get("name"), *(org.get("name") for org in me.get("orgs") or [])]
    if owner not in names:
        raise SkinvlmError(
            f"HF_TOKEN belongs to {me.get('name')!r}, which may not write under {owner!r} "
            f"(its own name and organizations: {', '.join(str(n) for n in names if n)}); nothing was written"
        )
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise SkinvlmError(
            "HF_TOKEN is a read-only token: make a write token at https://huggingface.co/settings/tokens"
        )


def upload(folder: Path, repo: str, token: str, private: bool, repo_type: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with hub_errors(repo, "upload to"):
        api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo,
            repo_type=repo_type,
            commit_message="Upload with skinvlm publish",
            delete_patterns=REPLACED_ON_UPLOAD[repo_type],
        )
    return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"


def is_network_error(err: BaseException) -> bool:
    """Connection failures of whichever HTTP library this huggingface_hub uses (httpx, httpx2 or requests)."""
    library = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or library in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}
