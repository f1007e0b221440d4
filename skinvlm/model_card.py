"""`skinvlm publish REPO --model-dir DIR`: a merged model folder, with a model card a clinic could show an ethics
board: what the model is for and not for, what it learnt from, how well it did in this workspace (the newest
eval of that very folder, with 95% intervals), its limits, and how to serve it.

The folder is built under `<workspace>/publish/model/` from hard links to the model's files (a 7B model's
16 GB are not copied). Left out: the workspace's manifest.json (absolute paths of this machine) and any README
(the card replaces it); skinvlm.json goes as a copy whose base model is a Hub name, never a local path.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinvlm import answer_review, checklist, leakage
from skinvlm.errors import SkinvlmError
from skinvlm.eval_result import as_result
from skinvlm.publish import (
    PublishResult,
    confirmed_upload,
    made_by,
    photos_about,
    ready_to_upload,
    repo_name,
    review_lines,
)
from skinvlm.rules import Rules
from skinvlm.vlm import SETTINGS_FILE, read_settings, write_settings
from skinvlm.workspace import MANIFEST, Workspace, out_of_date, read_manifest, stage_fingerprint, writes

LEFT_OUT = {MANIFEST, "README.md", SETTINGS_FILE}  # skinvlm.json goes as a cleaned copy
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
LICENSE_LINE = re.compile(r"^license:\s*(\S+)\s*$", re.MULTILINE)


@dataclass
class ModelFacts:
    """Everything the card states, gathered from the folder and the workspace before a file is written."""

    folder: Path
    record: dict[str, Any]  # skinvlm.json
    base: str | None  # a Hub name, or None for a local base
    base_shown: str
    license: str | None
    evaluation: dict[str, Any] | None  # metrics.json of the newest eval of this folder
    eval_name: str
    training: dict[str, Any]  # counts and provenance of the training data, when the workspace still has it
    dataset_repo: str | None
    ingested: dict[str, Any]  # datasets/ingested's manifest: what the photos are (`ingest --about`)
    external: list[str]  # the card's lines on evals of this folder on photos from elsewhere
    clinician_scores: list[str]  # review --model-answers of the eval run


def model_record(folder: Path) -> dict[str, Any]:
    """The merged folder's skinvlm.json, after checking that the folder is a complete merged model."""
    if not folder.is_dir():
        raise SkinvlmError(f"--model-dir {folder} is not a folder")
    missing = [name for name in ("config.json", SETTINGS_FILE) if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not any(
        (folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
    ):
        missing.append("a chat template")
    if missing:
        raise SkinvlmError(
            f"{folder} is not a merged model folder (missing {', '.join(missing)}): run `skinvlm merge` first"
        )
    return read_settings(folder)


def hub_name(name: str | None) -> str | None:
    """`name` when it is a Hub repo id, None for a local folder (whose path says where a clinic keeps files)."""
    if not name or os.path.isabs(name) or Path(name).exists() or not HUB_ID.match(name):
        return None
    return name


def base_of(folder: Path, record: dict[str, Any]) -> str:
    """The 16-bit base the merged weights build on: merge's record of it, else what training recorded."""
    merged = (read_manifest(folder) or {}).get("settings", {})
    return str(merged.get("base") or record.get("base_model") or "")


def license_of(base: str, given: str | None) -> str | None:
    """--license, else the base's own card (a local folder's README, or one in the Hugging Face cache)."""
    if given:
        return given
    readme: Path | None = Path(base) / "README.md" if base and Path(base).is_dir() else None
    if readme is None and hub_name(base):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "README.md")
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    front = readme.read_text(encoding="utf-8", errors="replace").split("---")
    found = LICENSE_LINE.search(front[1]) if len(front) > 2 else None
    return found.group(1).strip("'\"") if found else None


def newest_eval(ws: Workspace, folder: Path, name: str | None) -> tuple[str, dict[str, Any] | None]:
    """(run name, metrics) of the eval to report: `name`, else the newest finished eval of this very folder made
    after it was merged (an eval through a server cannot be tied to a folder: name it with --eval-run)."""
    if name:
        if not ws.eval_metrics(name).is_file():
            raise SkinvlmError(f"--eval-run {name}: no finished eval of that name in {ws.eval_root}")
        return name, ws.read_eval(name)
    found = runs_of(ws, folder, external=False)
    if not found:
        return "", None
    newest = max(found)[2]
    return newest, ws.read_eval(newest)


def runs_of(ws: Workspace, folder: Path, external: bool) -> list[tuple[str, int, str]]:
    """(finished, metrics mtime, name) of the finished evals of this very folder made after it was merged: on
    the workspace's photos, or (`external`) on photos from elsewhere (`eval --dataset`)."""
    merged_at = (read_manifest(folder) or {}).get("finished", "")
    # manifests say the second a run finished; two runs in one second are told apart by when their metrics landed
    found: list[tuple[str, int, str]] = []
    for name in ws.finished_evals():
        made = read_manifest(ws.eval_run(name)) or {}
        model = made.get("inputs", {}).get("model") or ""
        same = bool(model) and Path(model).exists() and os.path.realpath(model) == os.path.realpath(folder)
        if same and made.get("finished", "") >= merged_at and ("external" in ws.read_eval(name)) == external:
            found.append((made.get("finished", ""), ws.eval_metrics(name).stat().st_mtime_ns, name))
    return found


def external_lines(ws: Workspace, folder: Path) -> list[str]:
    """Each eval of this folder on photos from elsewhere, beside the workspace's own figures above."""
    from skinvlm.evaluate import external_line

    found = sorted(runs_of(ws, folder, external=True))
    if not found:
        return ["None: photos from another source were not evaluated (`skinvlm eval --model-dir DIR --dataset PATH`)."]
    lines = []
    for _, _, name in found:
        m = ws.read_eval(name)
        ci = m["intervals"]
        lines.append(f"- `{name}`: accuracy {m['accuracy']:.4f} ({ci['accuracy'][0]:.3f}-{ci['accuracy'][1]:.3f}), "
                     f"macro F1 {m['macro_f1']:.4f} ({ci['macro_f1'][0]:.3f}-{ci['macro_f1'][1]:.3f}) on "
                     f"{external_line(m['external'])}")  # fmt: skip
    return lines


def training_data(ws: Workspace, folder: Path) -> dict[str, Any]:
    """The training split's counts per class and view, and who wrote its text, when the workspace still holds the
    very stage the adapter was trained on; else only what the adapter's manifest says."""
    adapter = Path((read_manifest(folder) or {}).get("inputs", {}).get("adapter") or ws.adapter)
    trained = read_manifest(adapter) or {}
    stage = trained.get("inputs", {}).get("stage")
    facts: dict[str, Any] = {"stage": stage, "counts": trained.get("counts", {}), "inputs": trained.get("inputs", {})}
    if not stage or stage_fingerprint(ws.dataset(stage)) != trained.get("inputs", {}).get("fingerprint"):
        return facts
    data = ws.load(stage, newer_reviews=True)  # the data the model learnt from, whatever was decided since
    train = data["train"]
    facts["per_class_view"] = Counter(zip(train["label"], train["view"], strict=True))
    facts["data"] = data
    return facts


def serve_command(repo: str, folder: Path) -> str:
    """`vllm serve` as `skinvlm serve` builds it for this model, with the Hub name in place of the folder."""
    from skinvlm.serve import ServeSettings, build_command, executable

    # One GPU as given: the card shows the plain command, whatever GPUs the publishing machine has.
    command = build_command(folder, ServeSettings(tensor_parallel_size=1))[len(executable()) :]
    return shlex.join(["vllm", *(repo if part == str(folder) else part for part in command)])


def gather(ws: Workspace, folder: Path, eval_run: str | None, license_name: str | None) -> ModelFacts:
    record = model_record(folder)
    base = base_of(folder, record)
    if rerun := out_of_date(ws, folder):
        steps = " then ".join(f"`{command}`" for command in rerun)
        raise SkinvlmError(f"{folder} was made from data that has changed since (`skinvlm status` calls it stale): "
                           f"run {steps} before publishing it")  # fmt: skip
    name, evaluation = newest_eval(ws, folder, eval_run)
    published = json.loads(ws.published.read_text(encoding="utf-8")) if ws.published.is_file() else {}
    dataset = published.get("dataset", {})
    return ModelFacts(
        folder=folder,
        record=record,
        base=hub_name(base),
        base_shown=hub_name(base) or f"a local model folder ({Path(base).name or 'unnamed'})",
        license=license_of(base, license_name),
        evaluation=evaluation,
        eval_name=name,
        training=training_data(ws, folder),
        dataset_repo=dataset.get("repo") if dataset.get("uploaded") else None,
        ingested=read_manifest(ws.ingested) or {},
        external=external_lines(ws, folder),
        clinician_scores=answer_review.lines(ws, name) if name else [],
    )


# -- the card -------------------------------------------------------------------------------------
def front_matter(repo: str, facts: ModelFacts) -> list[str]:
    lines = ["---"]
    if facts.base:
        lines += ["base_model:", f"- {facts.base}"]
    lines += ["library_name: transformers", "pipeline_tag: image-text-to-text", "language:", "- ko"]
    if facts.license:
        lines += [f"license: {facts.license}"]
    elif facts.base:  # the base's own card on the Hub states it
        lines += [
            "license: other",
            "license_name: see-base-model",
            f"license_link: https://huggingface.co/{facts.base}",
        ]
    else:
        lines += ["license: unknown"]
    if facts.dataset_repo:
        lines += ["datasets:", f"- {facts.dataset_repo}"]
    lines += ["tags:", "- medical", "- dermatology", "- vision-language", "- skinvlm", "- lora"]
    if metrics := facts.evaluation:
        lines += [
            "model-index:",
            f"- name: {repo.split('/')[1]}",
            "  results:",
            "  - task:",
            "      type: image-classification",
            "    dataset:",
            f"      name: {facts.dataset_repo or 'held-out photos of this workspace'}",
            "      type: image",
            "    metrics:",
            "    - type: accuracy",
            f"      value: {metrics['accuracy']}",
            "    - type: f1",
            "      name: macro F1",
            f"      value: {metrics['macro_f1']}",
        ]
    return [*lines, "---"]


def training_lines(facts: ModelFacts, rules: Rules) -> list[str]:
    training = facts.training
    counts = training.get("counts", {})
    lines = [
        f"Fine-tuned with LoRA by skinvlm from {facts.base_shown}, on the `{training.get('stage') or 'unknown'}` "
        f"stage of a skinvlm workspace: {counts.get('steps', '?')} optimizer steps, effective batch "
        f"{counts.get('effective_batch_size', '?')}, images at most {facts.record.get('max_pixels', '?')} pixels.",
        *grpo_lines(training, counts),
        "",
        selection_line(counts),
        "",
    ]
    pairs = training.get("per_class_view")
    if pairs is None:
        return [*lines, "The workspace no longer holds the data this model was trained on, so its counts are not "
                        "stated here; see the training run's manifest."]  # fmt: skip
    views = list(rules.views)
    lines += ["| class | English | " + " | ".join(views) + " | total |", "|" + "---|" * (3 + len(views))]
    for c in rules.classes:
        row = [pairs[(c.name, v)] for v in views]
        lines.append(f"| {c.name} | {c.english} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
    train = training["data"]["train"]
    by_model = set(train["model"]) - {"template"} if "model" in train.column_names else set()
    written = (
        "written by a vision-language model told the diagnosis" if by_model else "offline class templates, no model"
    )
    lines += [
        "",
        f"Photos: {photos_about(facts.ingested)}; {train.num_rows:,} in the training split. Labels are the folders' "
        f"diagnoses (or a clinician's correction in `skinvlm review`). Descriptions: {written}; checked by "
        "`skinvlm audit` (English words, other scripts, label agreement, personal data) and cleaned by "
        "`skinvlm fix`:",
        "",
        *made_by({"train": train}),
        *review_lines({"train": train}),
    ]
    return lines


def grpo_lines(training: dict[str, Any], counts: dict[str, Any]) -> list[str]:
    """What GRPO adds to the story: from which SFT adapter it started and what its rewards did."""
    if counts.get("method") != "grpo":
        return []
    start = Path(training.get("inputs", {}).get("from_adapter") or "an SFT adapter").name
    reward = counts.get("mean_reward") or {}
    rose = f"; the mean reward went from {reward['first']:.3f} to {reward['last']:.3f}" if reward else ""
    return [
        "",
        f"Those steps were GRPO (reinforcement learning on sampled answers) from the supervised adapter `{start}`: "
        "answers rewarded for naming the folder's class (partial credit within a [labels.groups] family) and for a "
        f"well-formed Korean answer{rose}.",
    ]


def selection_line(counts: dict[str, Any]) -> str:
    dev = (counts.get("splits") or {}).get("dev", 0)
    if not dev or counts.get("best_step") is None:
        return "Model selection: the last step was kept (no development photos were scored during training)."
    return (
        f"Model selection: the adapter of step {counts['best_step']} was kept, chosen on {dev:,} development "
        "photos held out of the training split (whole patients, each class's share), never on the held-out "
        "photos the evaluation below reports."
    )


def evaluation_lines(facts: ModelFacts, rules: Rules) -> list[str]:
    from skinvlm.evaluate import interval_method, report_markdown, short_backend

    metrics = facts.evaluation
    if metrics is None:
        return [
            "Not evaluated in this workspace after it was merged: run `skinvlm eval --model-dir DIR` (or name a run "
            "with `publish --eval-run`)."
        ]
    shown = as_result(metrics | {"backend": short_backend(metrics["backend"])})
    report = report_markdown(shown, rules, with_checklist=False).splitlines()[1:]  # its title is ours
    leak = leakage.warning(metrics.get("leakage"))
    photos = (f"{metrics['n']} held-out photos, not independent of training ({leak})" if leak
              else f"{metrics['n']} held-out photos never used in training")  # fmt: skip
    return [
        f"Eval run `{facts.eval_name}` on {photos} (95% intervals: "
        f"{interval_method(shown)}; calibration where the model's label probabilities were read).",
        *report,
        *([""] + facts.clinician_scores if facts.clinician_scores else []),
    ]


def card(repo: str, facts: ModelFacts, rules: Rules) -> str:
    classes = ", ".join(f"{c.name} ({c.english})" for c in rules.classes)
    body = [
        f"# {repo}",
        "",
        f"A Korean vision-language model that looks at a photo of a face, names one of {len(rules.classes)} skin "
        f"conditions ({classes}) and describes in Korean what it sees. Answers have the form "
        "`<label>질병명</label>` + `<summary>소견</summary>`.",
        "",
        "## Intended use",
        "",
        "Decision support for dermatology teams: a second look, a draft description, triage of photo backlogs, "
        "research on the conditions above. A clinician reads every answer; the model's label is a suggestion, "
        "not a diagnosis.",
        "",
        "## Out of scope",
        "",
        "- Diagnosis or treatment decisions without a clinician; use by patients on themselves.",
        "- Skin outside the face, other conditions than the six above, skin cancer screening: it will name one of "
        "its six classes for any photo.",
        "- Populations, cameras and lighting unlike its training photos; children unless such photos were in them.",
        "- Identifying people: it was not trained for it, and its photos must not be used for it.",
        "",
        "## Training data",
        "",
        *training_lines(facts, rules),
        "",
        "## Evaluation",
        "",
        *evaluation_lines(facts, rules),
        "",
        "## External validation",
        "",
        *facts.external,
        "",
        "## Limitations",
        "",
        f"- One source of photos ({photos_about(facts.ingested)}), two views (front and side): figures on other "
        "photos will differ.",
        "- Labels come from folder names unless a clinician corrected them; descriptions are checked by rules, "
        "and read by a clinician only where `skinvlm review` says so above.",
        "- The held-out photos come from the same source as the training photos; no external validation.",
        "- It answers even when unsure; read class probabilities (`skinvlm eval --probabilities`) where it matters.",
        "",
        "## Population",
        "",
        "To be written by the team: who the photos show (ages, sexes, skin types, setting) and who they leave out.",
        "",
        "## Consent and ethics approval",
        "",
        "To be written by the team: the consent under which the photos were taken and the approval (IRB) under "
        "which they were used. skinvlm cannot know either.",
        "",
        "## Regulatory status",
        "",
        "To be written by the team. Not cleared as a medical device unless the team states a clearance here.",
        "",
        "## How to use",
        "",
        "Served with vLLM's OpenAI-compatible server (what `skinvlm serve` runs):",
        "",
        "```bash",
        serve_command(repo, facts.folder),
        "```",
        "",
        f"The instruction it was trained with, and its image resolution, are in `{SETTINGS_FILE}`; "
        "`skinvlm eval --base-url http://127.0.0.1:8000/v1` asks it the same way.",
        "",
    ]
    if facts.evaluation and facts.evaluation.get("checklist"):
        body += checklist.markdown(facts.evaluation["checklist"])[1:] + [""]
    else:
        body += ["## Reporting checklist (TRIPOD+AI)", "", "To be written by the team: no eval run of this folder."]
    return "\n".join([*front_matter(repo, facts), "", *body])


# -- the folder -----------------------------------------------------------------------------------
def build_folder(target: Path, facts: ModelFacts, text: str) -> list[tuple[str, int]]:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for source in sorted(facts.folder.iterdir()):
        if source.is_file() and source.name not in LEFT_OUT and not source.name.startswith("."):
            link_or_copy(source, target / source.name)
    write_settings(target, facts.record | {"base_model": facts.base or facts.base_shown})
    (target / "README.md").write_text(text, encoding="utf-8")
    return sorted((p.name, p.stat().st_size) for p in target.iterdir() if p.is_file())


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the weights), or a copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@writes("publish")
def publish_model(
    ws: Workspace,
    rules: Rules,
    repo: str | None,
    model_dir: Path,
    *,
    eval_run: str | None = None,
    license_name: str | None = None,
    public: bool = False,
    dry_run: bool = False,
    yes: bool = False,
    token: str | None = None,
    confirm: Callable[[str], bool] | None = None,
    phase: Callable[[str], None] = lambda _: None,
) -> PublishResult:
    """A merged model folder and its model card to a model repo, private unless `public`."""
    repo = repo_name(ws, repo)
    phase(f"reading {model_dir} and this workspace's eval runs")
    facts = gather(ws, model_dir, eval_run, license_name)
    if not dry_run:
        phase(f"checking HF_TOKEN and {repo}")
        token = ready_to_upload(ws, repo, token, yes, confirm)
    phase("writing the model card and linking the model's files")
    files = build_folder(ws.publish_model, facts, card(repo, facts, rules))
    result = PublishResult(repo, not public, ws.publish_model, files)
    if dry_run:
        return result
    assert token is not None
    return confirmed_upload(ws, "model", result, token, yes, confirm, phase)
