"""`skinvlm publish`: the dataset and a proper dataset card, to the Hugging Face Hub.

Always builds `<workspace>/publish/` first: parquet shards (about 500 MB each, images embedded)
and README.md with YAML metadata. `--dry-run` stops there; otherwise that very folder is
uploaded with `HfApi.upload_folder`, to a private repo unless `--public`, in one commit that also
deletes the repo's earlier data files, so the Hub holds what this publish made and nothing more.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinvlm import openai_api
from skinvlm.audit import AuditReport, audit
from skinvlm.errors import SkinvlmError
from skinvlm.rules import Rules
from skinvlm.workspace import Workspace, now_iso, read_manifest, writes

SHARD_BYTES = 500 * 2**20
REPLACED_ON_UPLOAD = ["data/*", "README.md"]  # what an earlier publish left that this one replaces
AIHUB_URL = "https://www.aihub.or.kr/aihubdata/data/view.do?dataSetSn=71863"


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
        shards = max(1, math.ceil(ds.data.nbytes / SHARD_BYTES))
        for i in range(shards):
            path = folder / "data" / f"{split}-{i:05d}-of-{shards:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.shard(shards, i, contiguous=True).to_parquet(str(path))
            written.append(path)
    return written


def made_by(described: dict[str, Any] | None) -> str:
    """Who wrote the text, from the describe manifest's per-record provenance."""
    described = described or {}
    made = described.get("counts", {}).get("made_by")
    if made:
        return "; ".join(
            f"offline class templates (`describe --template`) for {m['records']:,} records"
            if m["model"] == "template"
            else f"`{m['model']}` (prompt `{m['prompt_hash']}`) for {m['records']:,} records"
            for m in made
        )
    if described.get("template_made"):
        return "offline class templates (`describe --template`)"
    settings = described.get("settings", {})
    return f"`{settings.get('model', 'unknown')}` at detail `{settings.get('detail', '?')}`"


def audit_lines(report: AuditReport) -> list[str]:
    """The card's honest account of the audit: passed, or what failed and in how many records."""
    if not report.problems:
        return ["- Checked with `skinvlm audit --strict`: no record has a problem."]
    failed = {
        "English words (occurrences)": sum(report.english_words.values()),
        "other scripts (records)": sum(report.foreign_scripts.values()),
        "<label> naming another class than the folder": report.mismatches,
        "<label> that is no class": sum(report.not_class_tags.values()),
        "missing <label> or <summary>": report.invalid,
        "empty answers": report.empty,
        "summaries too short": report.too_short,
    }
    listed = [f"  - {check}: {n:,}" for check, n in failed.items() if n]
    return [
        f"- **Published with `--ignore-audit` although `skinvlm audit` finds {report.problems:,} of {report.records:,} "
        "records with problems:**",
        *listed,
    ]


def card(repo: str, data: Any, rules: Rules, stage: str, described: dict[str, Any] | None, report: AuditReport) -> str:
    total = sum(ds.num_rows for ds in data.values())
    splits = list(data)
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
        "# license: choose one after reading AI Hub's terms of use (the images are AI Hub's)",
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
    for split, ds in data.items():
        pairs = list(zip(ds["label"], ds["view"], strict=True))
        for c in rules.classes:
            counts = [sum(1 for label, view in pairs if label == c.name and view == v) for v in views]
            table.append(
                f"| {split} | {c.name} | {c.english} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |"
            )
    body = [
        f"# {repo}",
        "",
        "Facial skin photos with a Korean description of what is visible, for instruction-tuning "
        "vision-language models to name the condition and explain it. Built with skinvlm from the "
        "AI Hub set 안면부 피부질환 이미지.",
        "",
        "## Contents",
        "",
        f"{total:,} images; classes {', '.join(rules.class_names)}; views {', '.join(views)}; "
        f"splits {', '.join(f'{s} ({data[s].num_rows:,})' for s in splits)}.",
        "",
        *table,
        "",
        "Columns: `image`, `label` (the folder's diagnosis: ground truth), `view`, `output` "
        "(`<label>질병명</label>` + `<summary>소견</summary>`), `status`, and provenance columns.",
        "",
        "## How the text was made",
        "",
        f"- Descriptions: {made_by(described)}, conditioned on the known diagnosis of each photo.",
        f"- Prompt hash: `{(described or {}).get('prompt_hash', 'unknown')}`; described "
        f"{(described or {}).get('finished', 'unknown')}; published stage `{stage}` on {now_iso()[:10]}.",
        "- Cleaned with the rule file (label aliases, English term translations, phrase rewrites)."
        if stage == "fixed"
        else "- Not cleaned: the text is as `skinvlm describe` wrote it.",
        *audit_lines(report),
        "",
        "## Source and terms",
        "",
        f"Images: AI Hub, 안면부 피부질환 이미지 ({AIHUB_URL}). Use them under AI Hub's terms of use: cite "
        "the source, and get approval before any commercial use. The descriptions are machine-generated "
        "and are not medical advice.",
        "",
    ]
    return "\n".join(yaml + [""] + body)


def build(
    ws: Workspace, rules: Rules, repo: str, stage: str, report: AuditReport
) -> tuple[Path, list[tuple[str, int]]]:
    data = ws.load(stage)
    folder = ws.publish_dir
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_shards(data, folder)
    text = card(repo, data, rules, stage, read_manifest(ws.described), report)
    (folder / "README.md").write_text(text, encoding="utf-8")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    return folder, files


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
    repo = repo or openai_api.setting(ws, "HF_REPO_NAME")
    if not repo or repo.count("/") != 1:
        raise SkinvlmError("name the Hub repo as OWNER/NAME (argument or HF_REPO_NAME)")
    phase(f"auditing {stage}")
    report = audit(ws, rules, stage)
    if report.problems and not force:
        raise SkinvlmError(
            f"audit of {stage} finds {report.problems} records with problems "
            f"(skinvlm audit --stage {stage}); fix them or pass --ignore-audit"
        )
    phase("writing Parquet shards and the dataset card")
    folder, files = build(ws, rules, repo, stage, report)
    result = PublishResult(repo, not public, folder, files)
    if dry_run:
        return result
    token = token or openai_api.setting(ws, "HF_TOKEN")
    if not token:
        raise SkinvlmError("no Hugging Face token: set HF_TOKEN in the environment or <workspace>/.env")
    if not yes:
        if not sys.stdin.isatty() or confirm is None:
            raise SkinvlmError("publishing needs confirmation: pass --yes (no terminal to ask on)")
        if not confirm(f"upload {len(files)} files to {'private' if not public else 'PUBLIC'} dataset {repo}?"):
            raise SkinvlmError("not confirmed; nothing was uploaded")
    phase(f"uploading {len(files)} files to {repo}")
    result.url = upload(folder, repo, token, private=not public)
    result.uploaded = True
    return result


def upload(folder: Path, repo: str, token: str, private: bool) -> str:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo,
            repo_type="dataset",
            commit_message="Upload with skinvlm publish",
            delete_patterns=REPLACED_ON_UPLOAD,
        )
    except OfflineModeIsEnabled:
        raise SkinvlmError("HF_HUB_OFFLINE is set: unset it to publish (nothing was uploaded)") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        raise SkinvlmError(
            f"the Hub refused the upload to {repo} (HTTP {status}): check that HF_TOKEN may write there "
            "(a write token, and OWNER is you or an organization you belong to)"
        ) from None
    except Exception as err:
        if not is_network_error(err):
            raise
        raise SkinvlmError(
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to publish {repo} ({type(err).__name__}): "
            "check the network, a proxy (HTTPS_PROXY) or HF_ENDPOINT; nothing was uploaded"
        ) from None
    return f"https://huggingface.co/datasets/{repo}"


def is_network_error(err: BaseException) -> bool:
    """Connection failures of whichever HTTP library this huggingface_hub uses (httpx, httpx2 or requests)."""
    library = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or library in {"httpx", "httpx2", "httpcore", "requests", "urllib3"}
