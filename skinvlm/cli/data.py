"""The data commands: ingest, status, describe, audit, fix, publish."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from skinvlm import render
from skinvlm.cli.common import (
    BaseUrlOpt,
    ConcurrencyOpt,
    ConfigOpt,
    JsonOpt,
    MaxSideOpt,
    PageHostOpt,
    RulesOpt,
    TextStage,
    WorkspaceOpt,
    command,
    counting,
    err,
    existing_workspace,
    flag,
    open_workspace,
    out,
    page_token_option,
    phases,
    print_json,
    settings_of,
)
from skinvlm.describe_settings import DescribeSettings
from skinvlm.errors import SkinvlmError
from skinvlm.ingest import DEFAULT_MAX_PIXELS_IN
from skinvlm.openai_api import Detail


@command()
def ingest(
    src: Annotated[
        Path,
        typer.Argument(metavar="SRC", help="AI Hub folder (Training/ and Validation/) or a folder of class folders."),
    ],
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    force: Annotated[bool, flag("--force", help="Replace an existing datasets/ingested.")] = False,
    test_size: Annotated[float, typer.Option(help="Test share for a tree without Training/Validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 42,
    max_side: Annotated[int | None, typer.Option(help="Downscale images whose longer side exceeds PX.")] = None,
    max_pixels_in: Annotated[
        int,
        typer.Option(help="Skip images of more pixels than this (JPEGs are decoded smaller with --max-side)."),
    ] = DEFAULT_MAX_PIXELS_IN,
    deep: Annotated[
        bool, flag("--deep", help="Decode every pixel (default: header, PNG chunk CRCs, JPEG end marker).")
    ] = False,
    keep_metadata: Annotated[
        bool,
        flag(
            "--keep-metadata",
            help="Store each file as it is, with its EXIF, PNG text and JPEG APP segments (default: removed "
            "losslessly, photos turned upright).",
        ),
    ] = False,
    workers: Annotated[int | None, typer.Option(help="Checking threads (default: all cores).")] = None,
    about: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT",
            help="What the photos are, for the dataset and model cards (e.g. 'AI Hub 안면부 피부질환 이미지, "
            "clinic A 2019-2023'); no names.",
        ),
    ] = None,
    patient_pattern: Annotated[
        str | None,
        typer.Option(
            metavar="REGEX",
            help="RE2 pattern with a group (?P<patient>...) that finds the patient id in each photo's path "
            "relative to SRC (default: [patients] pattern in the rule file; without one, each photo is its own "
            "patient). Only a keyed hash of the id is stored.",
        ),
    ] = None,
    resplit: Annotated[
        float | None,
        typer.Option(
            metavar="FRACTION",
            help="Pool every photo and hold out this share of each class as the test split, each patient and each "
            "group of near-duplicate photos wholly on one side (--seed): for trees with no split, or a leaky one.",
        ),
    ] = None,
    metadata: Annotated[
        Path | None,
        typer.Option(
            metavar="CSV",
            help="Who the photos are, for eval's subgroup figures: a key column, path (relative to SRC) or "
            "patient (the id --patient-pattern finds), then up to 8 attributes (e.g. fitzpatrick, age_band, "
            "sex). Kept with each photo; never published.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every image under SRC and write datasets/ingested (splits train/test)."""
    from skinvlm.ingest import ingest as run_ingest

    ws, loaded = open_workspace(workspace, rules, new=True)
    with counting("checking images") as progress:
        result = run_ingest(
            ws,
            src,
            loaded,
            force=force,
            test_size=test_size,
            seed=seed,
            max_side=max_side,
            max_pixels_in=max_pixels_in,
            deep=deep,
            keep_metadata=keep_metadata,
            workers=workers,
            about=about,
            patient_pattern=patient_pattern,
            resplit=resplit,
            metadata=metadata,
            progress=progress,
        )
    if as_json:
        return print_json(result.as_json())
    render.ingest_report(out, err, result, loaded)


@command()
def status(workspace: WorkspaceOpt = None, as_json: JsonOpt = False) -> None:
    """Show what the workspace holds, stage by stage, and which stages are stale."""
    from skinvlm.workspace import stage_status

    ws = existing_workspace(workspace)
    stages = stage_status(ws)
    if as_json:
        return print_json({"workspace": str(ws.root), "stages": [render.stage_json(s) for s in stages]})
    render.status_table(out, ws, stages)


def parse_redo(value: str) -> tuple[str, ...]:
    from skinvlm.describe_settings import REDO_CHOICES

    chosen = tuple(x.strip() for x in value.split(",") if x.strip())
    bad = [x for x in chosen if x not in REDO_CHOICES]
    if bad:
        raise typer.BadParameter(f"{', '.join(bad)} is not one of {', '.join(REDO_CHOICES)}")
    return chosen


@command()
def describe(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    config_file: ConfigOpt = None,
    model: Annotated[str, typer.Option(help="Model name at the endpoint.")] = DescribeSettings.model,
    base_url: BaseUrlOpt = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: $OPENAI_API_KEY or <workspace>/.env).", show_default=False)
    ] = None,
    concurrency: ConcurrencyOpt = DescribeSettings.concurrency,
    rpm: Annotated[int | None, typer.Option(help="Client-side limit per endpoint: requests per minute.")] = None,
    tpm: Annotated[
        int | None, typer.Option(help="Client-side limit per endpoint: tokens per minute (estimated).")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds per request before it is retried.")
    ] = DescribeSettings.timeout,
    max_tokens: Annotated[int, typer.Option(help="Answer length limit in tokens.")] = DescribeSettings.max_tokens,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature of the describer (0: always its likeliest words).")
    ] = DescribeSettings.temperature,
    max_side: MaxSideOpt = DescribeSettings.max_side,
    detail: Annotated[Detail, typer.Option(help="Image detail the API is asked for.")] = Detail(
        DescribeSettings.detail
    ),
    format_retries: Annotated[
        int, typer.Option(help="Re-asks when an answer lacks <label>/<summary>.")
    ] = DescribeSettings.format_retries,
    max_attempts: Annotated[
        int, typer.Option(min=1, help="Tries per request on 429/5xx/timeouts.")
    ] = DescribeSettings.max_attempts,
    backoff: Annotated[
        float, typer.Option(help="Base seconds of the exponential backoff (with jitter).")
    ] = DescribeSettings.backoff,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Describe a seeded sample of N pending records, stratified by label and view."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = DescribeSettings.seed,
    redo: Annotated[
        str,
        typer.Option(
            parser=parse_redo,
            help="Ask again (comma-separated): failed, invalid, ok, all; changed (made by another model or prompt); "
            "mismatch (the <label> named another class: asked again with the folder label restated).",
        ),
    ] = "",
    splits: Annotated[
        list[str] | None,
        typer.Option("--split", metavar="SPLIT", help="Only these splits (repeatable; default: train and test)."),
    ] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="System prompt: TOML (system, user) or text.")] = None,
    template: Annotated[
        bool, flag("--template", help="Offline answers from the rule file's class templates; nothing is sent.")
    ] = False,
    dry_run: Annotated[bool, flag("--dry-run", help="Show one request and the cost; send nothing.")] = False,
    batch: Annotated[
        bool, flag("--batch", help="Go through the OpenAI Batch API (half price, up to 24 h); a re-run resumes it.")
    ] = False,
    submit_only: Annotated[
        bool, flag("--submit-only", help="With --batch: submit and return; a later run collects the results.")
    ] = False,
    poll_seconds: Annotated[
        float, typer.Option(help="With --batch: seconds between status checks.")
    ] = DescribeSettings.poll_seconds,
    as_json: JsonOpt = False,
) -> None:
    """Describe every ingested image in Korean with GPT-4o-mini or any OpenAI-compatible model (resumable)."""
    from skinvlm import describe as stage
    from skinvlm.prompts import load_describe_prompt

    ws, loaded = open_workspace(workspace, rules)
    settings = settings_of(ctx, DescribeSettings, "describe", config_file)
    prompt = load_describe_prompt(prompt_file, loaded)
    if dry_run:
        preview = stage.dry_run(ws, loaded, settings, prompt)
        if as_json:
            return print_json(asdict(preview) | {"settings": asdict(settings)})
        return render.describe_dry_run(out, preview, settings)
    with counting("describing") as progress:
        result = stage.describe(
            ws,
            loaded,
            settings,
            prompt,
            api_key,
            progress=lambda p: progress(p.done, p.total, render.progress_note(p)),
        )
    print_json(result.as_json()) if as_json else render.describe_summary(out, result)
    stage.check_failures(result)


@command()
def audit(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    stage: Annotated[TextStage | None, typer.Option(help="Which text stage (default: the newest).")] = None,
    strict: Annotated[
        bool, flag("--strict", help="Exit 1 when any record has a problem, or photos leak between splits.")
    ] = False,
    suggest: Annotated[
        bool, flag("--suggest", help="Print TOML stanzas and commands for what the audit finds.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Report what is wrong with the generated text: English, other scripts, label tags, format, length."""
    from skinvlm.audit import audit as run_audit
    from skinvlm.audit import strict_failures
    from skinvlm.audit import suggest as suggestions

    ws, loaded = open_workspace(workspace, rules)
    report = run_audit(ws, loaded, stage.value if stage else None)
    if suggest:
        sys.stdout.write(suggestions(report, loaded))
    elif as_json:
        print_json(report.as_json())
    else:
        if report.records or report.stage != "ingested":
            render.audit_report(out, report)
        else:
            out.print("no text stage yet (`skinvlm describe`): the leakage between splits only", highlight=False)
        render.leakage_report(out, report.leakage)
    if strict and strict_failures(report):
        raise typer.Exit(1)


@command()
def fix(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    dry_run: Annotated[bool, flag("--dry-run", help="Show rule hits and examples; write nothing.")] = False,
    drop_invalid: Annotated[
        bool, flag("--drop-invalid", help="Leave out records still malformed, empty or failed.")
    ] = False,
    drop_mismatches: Annotated[
        bool, flag("--drop-mismatches", help="Leave out answers whose <label> names another class than the folder.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply the rule file (rewrites, terms, label aliases): datasets/described -> datasets/fixed."""
    from skinvlm.fix import fix as run_fix

    ws, loaded = open_workspace(workspace, rules)
    with phases("fix") as phase:
        result = run_fix(
            ws, loaded, dry_run=dry_run, drop_invalid=drop_invalid, drop_mismatches=drop_mismatches, phase=phase
        )
    return print_json(result.as_json()) if as_json else render.fix_report(out, result, ws)


@command()
def publish(
    repo: Annotated[
        str | None, typer.Argument(metavar="REPO", help="OWNER/NAME on the Hub (default: $HF_REPO_NAME).")
    ] = None,
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    stage: Annotated[TextStage, typer.Option(help="Which text stage to publish.")] = TextStage.fixed,
    model_dir: Annotated[
        Path | None,
        typer.Option(
            metavar="<dir>",
            help="Publish this merged model folder (models/merged) with a model card, instead of the dataset.",
        ),
    ] = None,
    eval_run: Annotated[
        str | None,
        typer.Option(
            metavar="<name>",
            help="With --model-dir: the eval run the card reports (default: the newest eval of that folder).",
        ),  # fmt: skip
    ] = None,
    license_name: Annotated[
        str | None,
        typer.Option(
            "--license", metavar="<id>", help="With --model-dir: the Hub license id (default: the base model's)."
        ),
    ] = None,
    public: Annotated[bool, flag("--public", help="Make the repo public (default: private).")] = False,
    dry_run: Annotated[
        bool, flag("--dry-run", help="Write files and card under <workspace>/publish/; upload nothing.")
    ] = False,
    yes: Annotated[bool, flag("--yes", help="Do not ask for confirmation.")] = False,
    ignore_audit: Annotated[
        bool, flag("--ignore-audit", help="Publish although audit --strict fails; the card says what failed.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Push a text stage with its images and a dataset card, or a merged model with a model card, to the Hugging
    Face Hub (token: HF_TOKEN)."""
    from skinvlm.model_card import publish_model
    from skinvlm.publish import publish as run_publish

    ws, loaded = open_workspace(workspace, rules)
    if model_dir is None and (eval_run or license_name):
        raise SkinvlmError("--eval-run and --license describe a model: add --model-dir DIR")
    if model_dir is not None and ignore_audit:
        raise SkinvlmError("--ignore-audit applies to datasets; a model card reports its eval as it is")
    with phases("publish") as phase:

        def ask(question: str) -> bool:
            return bool(phase.ask(question, lambda q: typer.confirm(q, default=False)))

        common: dict[str, Any] = {"public": public, "dry_run": dry_run, "yes": yes, "confirm": ask, "phase": phase}
        if model_dir is not None:
            result = publish_model(ws, loaded, repo, model_dir, eval_run=eval_run, license_name=license_name, **common)
        else:
            result = run_publish(ws, loaded, repo, stage=stage.value, force=ignore_audit, **common)
    return print_json(result.as_json()) if as_json else render.publish_report(out, result)


@command()
def review(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    stage: Annotated[
        TextStage | None, typer.Option(help="Which text stage to review (default: the newest, fixed where made).")
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the review page.")] = 8765,
    host: PageHostOpt = "127.0.0.1",
    reviewer: Annotated[
        str | None, typer.Option(metavar="<name>", help="Who reviews (default: $USER); changeable on the page.")
    ] = None,
    overlap: Annotated[
        float, typer.Option(help="Share of records (0-1) that a second reviewer is offered, for agreement.")
    ] = 0.0,
    token: Annotated[str | None, page_token_option("SKINVLM_REVIEW_TOKEN")] = None,
    report: Annotated[
        bool, flag("--report", help="Print who decided what and how well reviewers agree, instead of serving.")
    ] = False,
    model_answers: Annotated[
        list[str] | None,
        typer.Option(
            "--model-answers",
            metavar="eval/NAME",
            help="Score these eval runs' answers blind (1-5: accuracy, safety, groundedness, fluency), their runs "
            "mixed and unnamed; repeat to compare models. With --report: each run's mean scores.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Clinicians accept, edit or reject each description in a local web page; --report shows the agreement."""
    from skinvlm import review as reviewing

    ws, loaded = open_workspace(workspace, rules)
    if model_answers and (stage or overlap):
        raise SkinvlmError("--model-answers scores eval runs' answers: --stage and --overlap are for descriptions")
    if model_answers:
        return score_model_answers(ws, loaded, model_answers, report, as_json, host, port, reviewer, token)
    state, stage_name = reviewing.open_review(ws, loaded, stage.value if stage else None, overlap)
    if report:
        found = reviewing.report(state)
        print_json(found) if as_json else render.review_report(out, found)
        return
    from skinvlm.web.review import serve

    serve(ws, loaded, state, stage_name, host=host, port=port, reviewer=reviewer, token=token, say=err.print)


def score_model_answers(
    ws: Any, loaded: Any, runs: list[str], report: bool, as_json: bool, host: str, port: int,
    reviewer: str | None, token: str | None,
) -> None:  # fmt: skip
    from skinvlm import answer_review

    state = answer_review.open_answer_review(ws, runs)
    if report:
        found = answer_review.report(state)
        print_json(found) if as_json else render.answer_review_report(out, found)
        return
    from skinvlm.web.review import serve_answers

    serve_answers(ws, loaded, state, host=host, port=port, reviewer=reviewer, token=token, say=err.print)
