"""The `skinvlm` command line: read options, call a stage function, render its result. Nothing more."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from skinvlm import render
from skinvlm.errors import SkinvlmError, machine_problem
from skinvlm.ingest import DEFAULT_MAX_PIXELS_IN
from skinvlm.redaction import redact_text
from skinvlm.rules import Rules, load_rules, resolve_rules_path
from skinvlm.train import DEFAULT_BASE, DEFAULT_MAX_PIXELS
from skinvlm.workspace import Workspace

app = typer.Typer(
    help="Facial skin photo folders -> a served, evaluated Korean vision-language model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

WorkspaceOpt = Annotated[
    Path | None,
    typer.Option(
        "--workspace",
        "-w",
        envvar="SKINVLM_WORKSPACE",
        file_okay=False,
        help="Workspace folder shared by all commands (default: current folder).",
    ),
]
RulesOpt = Annotated[
    Path | None,
    typer.Option(
        "--rules",
        envvar="SKINVLM_RULES",
        dir_okay=False,
        help="Rule file (default: <workspace>/postprocess.toml, else the shipped one).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


def user_errors(fn: F) -> F:
    """A SkinvlmError becomes one line on stderr and exit 1; Ctrl-C exits 130 after the stage saved."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SkinvlmError as problem:
            err.print(f"[bold red]error:[/] {escape(redact_text(str(problem)))}", highlight=False, markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished work is saved; run the same command again to go on")
            raise typer.Exit(130) from None
        except Exception as problem:
            line = machine_problem(problem, Workspace.open(kwargs.get("workspace")).root)
            if line is None:
                raise
            err.print(f"[bold red]error:[/] {escape(redact_text(line))}", highlight=False, markup=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def open_workspace(workspace: Path | None, rules: Path | None = None) -> tuple[Workspace, Rules]:
    ws = Workspace.open(workspace)
    return ws, load_rules(resolve_rules_path(rules, ws.root))


def progress_bar(description: str) -> Progress:
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2, default=str) + "\n")


@app.command()
@user_errors
def ingest(
    src: Annotated[
        Path, typer.Argument(help="AI Hub folder (Training/ and Validation/) or a folder of class folders.")
    ],
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing datasets/ingested.")] = False,
    test_size: Annotated[float, typer.Option(help="Test share for a tree without Training/Validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of that split.")] = 42,
    max_side: Annotated[int | None, typer.Option(help="Downscale images whose longer side exceeds PX.")] = None,
    max_pixels_in: Annotated[
        int,
        typer.Option(help="Skip images of more pixels than this (JPEGs are decoded smaller with --max-side)."),
    ] = DEFAULT_MAX_PIXELS_IN,
    workers: Annotated[int | None, typer.Option(help="Decoding threads (default: all cores).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every image under SRC and write datasets/ingested (splits train/test)."""
    from skinvlm.ingest import ingest as run_ingest

    ws, loaded = open_workspace(workspace, rules)
    with progress_bar("checking images") as bar:
        task = bar.add_task("ingest", total=None, note="")
        result = run_ingest(
            ws,
            src,
            loaded,
            force=force,
            test_size=test_size,
            seed=seed,
            max_side=max_side,
            max_pixels_in=max_pixels_in,
            workers=workers,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    if as_json:
        print_json(result.as_json())
        return
    render.ingest_report(out, err, result, loaded)


@app.command()
@user_errors
def status(workspace: WorkspaceOpt = None, as_json: JsonOpt = False) -> None:
    """Show what the workspace holds, stage by stage."""
    from skinvlm.workspace import stage_status

    ws = Workspace.open(workspace)
    stages = stage_status(ws)
    if as_json:
        print_json(
            {
                "workspace": str(ws.root),
                "stages": [
                    {
                        "name": s.name,
                        "present": s.present,
                        "rows": s.rows,
                        "finished": s.finished,
                        "inputs": s.inputs,
                        "stale": bool(s.rerun),
                        "rerun": s.rerun,
                    }
                    for s in stages
                ],
            }
        )
        return
    table = Table(title=f"workspace {ws.root}")
    for column in ("stage", "present", "rows", "finished", "from", "current"):
        table.add_column(column)
    for s in stages:
        rows = ", ".join(f"{k} {v:,}" for k, v in s.rows.items())
        when = s.finished[:16].replace("T", " ")
        current = f"[yellow]stale[/]: run {' then '.join(s.rerun)}" if s.rerun else ("yes" if s.present else "")
        table.add_row(s.name, "[green]yes[/]" if s.present else "[dim]no[/]", rows, when, s.inputs, current)
    out.print(table)


@app.command()
@user_errors
def describe(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    model: Annotated[str, typer.Option(help="Model name at the endpoint.")] = "gpt-4o-mini",
    base_url: Annotated[
        str | None, typer.Option(envvar="OPENAI_BASE_URL", help="OpenAI-compatible endpoint (default: api.openai.com).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: $OPENAI_API_KEY or <workspace>/.env).", show_default=False)
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 16,
    rpm: Annotated[int | None, typer.Option(help="Client-side limit: requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Client-side limit: tokens per minute (estimated).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per request before it is retried.")] = 120.0,
    max_tokens: Annotated[int, typer.Option(help="Answer length limit in tokens.")] = 512,
    temperature: Annotated[float, typer.Option()] = 0.2,
    image_max_side: Annotated[int, typer.Option(help="Images are re-encoded to fit this many pixels.")] = 1024,
    detail: Annotated[str, typer.Option(help="Image detail: low, high or auto.")] = "auto",
    format_retries: Annotated[int, typer.Option(help="Re-asks when an answer lacks <label>/<summary>.")] = 1,
    max_attempts: Annotated[int, typer.Option(help="Tries per request on 429/5xx/timeouts.")] = 6,
    backoff: Annotated[float, typer.Option(help="Base seconds of the exponential backoff (with jitter).")] = 1.0,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="Describe a seeded sample of N pending records, stratified by label and view."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample.")] = 42,
    redo: Annotated[
        str,
        typer.Option(
            help="Ask again (comma-separated): failed, invalid, ok, all; changed (made by another model or prompt); "
            "mismatch (the <label> named another class: asked again with the folder label restated)."
        ),
    ] = "",
    split: Annotated[list[str] | None, typer.Option(help="Only these splits (repeatable).")] = None,
    prompt_file: Annotated[Path | None, typer.Option(help="System prompt: TOML (system, user) or text.")] = None,
    template: Annotated[
        bool, typer.Option("--template", help="Offline answers from the rule file's class templates; nothing is sent.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show one request and the cost; send nothing.")] = False,
    batch: Annotated[
        bool,
        typer.Option(
            "--batch",
            help="Go through the OpenAI Batch API (half price, up to 24 h); a re-run resumes a submitted batch.",
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="With --batch: wait for the results, or submit and return.")
    ] = True,
    poll_seconds: Annotated[float, typer.Option(help="With --batch: seconds between status checks.")] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Describe every ingested image in Korean with GPT-4o-mini or any OpenAI-compatible model (resumable)."""
    from skinvlm import describe as stage
    from skinvlm.prompts import load_describe_prompt

    ws, loaded = open_workspace(workspace, rules)
    settings = stage.DescribeSettings(
        model=model,
        base_url=base_url,
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        timeout=timeout,
        max_tokens=max_tokens,
        temperature=temperature,
        image_max_side=image_max_side,
        detail=detail,
        format_retries=format_retries,
        max_attempts=max_attempts,
        limit=limit,
        seed=seed,
        redo=tuple(x.strip() for x in redo.split(",") if x.strip()),
        splits=tuple(split or ("train", "test")),
        template=template,
        backoff=backoff,
        batch=batch,
        wait=wait,
        poll_seconds=poll_seconds,
    )
    prompt = load_describe_prompt(prompt_file, loaded)
    if dry_run:
        preview = stage.dry_run(ws, loaded, settings, prompt)
        return print_json(asdict(preview)) if as_json else render.describe_dry_run(out, preview, settings)
    with progress_bar("describing") as bar:
        task = bar.add_task("describe", total=None, note="")
        result = stage.describe(
            ws,
            loaded,
            settings,
            prompt,
            api_key,
            progress=lambda p: bar.update(task, completed=p.done, total=p.total, note=render.progress_note(p)),
        )
    return print_json(result.as_json()) if as_json else render.describe_summary(out, result)


class TextStage(StrEnum):
    """The stages that hold generated text (audit and publish work on these)."""

    described = "described"
    fixed = "fixed"


StageOpt = Annotated[TextStage | None, typer.Option(help="Which text stage (default: the newest).")]


@app.command()
@user_errors
def audit(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    stage: StageOpt = None,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when any record has a problem.")] = False,
    suggest: Annotated[bool, typer.Option("--suggest", help="Print TOML stanzas for what the rules miss.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Report what is wrong with the generated text: English, other scripts, label tags, format, length."""
    from skinvlm.audit import audit as run_audit
    from skinvlm.audit import suggest as suggestions

    ws, loaded = open_workspace(workspace, rules)
    report = run_audit(ws, loaded, stage.value if stage else None)
    if suggest:
        sys.stdout.write(suggestions(report, loaded))
    elif as_json:
        print_json(report.as_json())
    else:
        render.audit_report(out, report)
    if strict and report.problems:
        raise typer.Exit(1)


@app.command()
@user_errors
def fix(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show rule hits and examples; write nothing.")] = False,
    drop_invalid: Annotated[
        bool, typer.Option("--drop-invalid", help="Leave out records still malformed, empty or failed.")
    ] = False,
    drop_mismatches: Annotated[
        bool,
        typer.Option("--drop-mismatches", help="Leave out answers whose <label> names another class than the folder."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply the rule file (rewrites, terms, label aliases): datasets/described -> datasets/fixed."""
    from skinvlm.fix import fix as run_fix

    ws, loaded = open_workspace(workspace, rules)
    result = run_fix(ws, loaded, dry_run=dry_run, drop_invalid=drop_invalid, drop_mismatches=drop_mismatches)
    return print_json(result.as_json()) if as_json else render.fix_report(out, result, ws)


@app.command()
@user_errors
def publish(
    repo: Annotated[str | None, typer.Argument(help="OWNER/NAME on the Hub (default: $HF_REPO_NAME).")] = None,
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    stage: Annotated[TextStage, typer.Option(help="Which text stage to publish.")] = TextStage.fixed,
    public: Annotated[bool, typer.Option("--public", help="Make the dataset public (default: private).")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write shards and card to <workspace>/publish/; upload nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Publish even when audit --strict would fail.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Push a text stage with its images and a dataset card to the Hugging Face Hub (token: HF_TOKEN)."""
    from skinvlm.publish import publish as run_publish

    ws, loaded = open_workspace(workspace, rules)
    result = run_publish(
        ws,
        loaded,
        repo,
        stage=stage.value,
        public=public,
        dry_run=dry_run,
        yes=yes,
        force=force,
        confirm=lambda question: typer.confirm(question, default=False),
    )
    return print_json(result.as_json()) if as_json else render.publish_report(out, result)


GpuOpt = Annotated[str | None, typer.Option(help="GPU number(s), e.g. 0 or 0,1 (sets CUDA_VISIBLE_DEVICES).")]


@app.command()
@user_errors
def train(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    model: Annotated[str, typer.Option(help="Base model: Hub name or local folder.")] = DEFAULT_BASE,
    backend: Annotated[
        str, typer.Option(help="auto (unsloth on CUDA when installed, else hf), unsloth or hf.")
    ] = "auto",
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (ignored with --epochs).")] = 3000,
    epochs: Annotated[float | None, typer.Option(help="Train for this many epochs instead of --max-steps.")] = None,
    learning_rate: Annotated[float, typer.Option()] = 5e-5,
    lora_r: Annotated[int, typer.Option()] = 128,
    lora_alpha: Annotated[int, typer.Option()] = 128,
    lora_dropout: Annotated[float, typer.Option()] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Per-device batch size.")] = 2,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 4,
    max_pixels: Annotated[
        int,
        typer.Option(
            help="Image resolution cap in pixels (max_pixels/784 vision tokens); recorded for merge, serve and eval."
        ),
    ] = DEFAULT_MAX_PIXELS,
    max_length: Annotated[
        int, typer.Option(help="Tokens per sample at most (image included); longer ones are cut.")
    ] = 4096,
    seed: Annotated[int, typer.Option()] = 1234,
    eval_steps: Annotated[int, typer.Option(help="Evaluate on --eval-rows test rows every N steps.")] = 50,
    eval_rows: Annotated[int, typer.Option(help="Test rows for the eval loss (0: none).")] = 64,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps (3 kept).")] = 200,
    load_in_4bit: Annotated[
        bool, typer.Option("--load-in-4bit/--no-load-in-4bit", help="QLoRA: the base in 4 bits on CUDA.")
    ] = True,
    gpu: GpuOpt = None,
    processes: Annotated[
        int | None,
        typer.Option(help="DDP processes under torchrun (default: one per --gpu id; on a CPU they use gloo)."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False,
    keep_mismatches: Annotated[
        bool,
        typer.Option(
            "--keep-mismatches", help="Also train on answers whose <label> names another class than the folder."
        ),
    ] = False,
    report_to: Annotated[str, typer.Option(help="none, wandb or tensorboard.")] = "none",
    output: Annotated[Path | None, typer.Option(help="Adapter folder (default: models/adapter).")] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Collate one batch with the real collator and show what training would see."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune with LoRA on datasets/fixed: Unsloth QLoRA on a GPU, transformers + PEFT anywhere."""
    from skinvlm import devices
    from skinvlm import train as stage

    ws, loaded = open_workspace(workspace, rules)
    settings = stage.TrainSettings(
        model=model,
        backend=backend,
        max_steps=max_steps,
        epochs=epochs,
        learning_rate=learning_rate,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_pixels=max_pixels,
        max_length=max_length,
        load_in_4bit=load_in_4bit,
        seed=seed,
        eval_steps=eval_steps,
        eval_rows=eval_rows,
        save_steps=save_steps,
        gpu=gpu,
        processes=processes,
        resume=resume,
        keep_mismatches=keep_mismatches,
        report_to=report_to,
        output=str(output) if output else None,
    )
    if dry_run:
        summary = stage.dry_run(ws, loaded, settings)
        print_json(summary.as_json()) if as_json else render.train_summary(out, summary)
        if problem := summary.problem():
            raise SkinvlmError(problem)
        return
    wanted = devices.processes_wanted(processes, gpu)
    if wanted > 1 and not devices.launched():
        stage.preflight(ws, settings, dry_run=False)  # one clear line here rather than one per process
        with ws.writing("train"):  # held here for the workers, who inherit it
            raise typer.Exit(devices.relaunch(wanted, sys.argv[1:]))
    result = stage.train(ws, loaded, settings, on_summary=lambda summary: render.train_summary(err, summary))
    if devices.is_main_process():
        print_json(result.as_json()) if as_json else render.train_result(out, result)


@app.command()
@user_errors
def merge(
    workspace: WorkspaceOpt = None,
    base: Annotated[
        str | None,
        typer.Option(help="16-bit base model (default: the one recorded in the adapter, or its 16-bit twin)."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 or float16.")] = "bfloat16",
    adapter: Annotated[Path | None, typer.Option(help="Adapter folder (default: models/adapter).")] = None,
    output: Annotated[Path | None, typer.Option(help="Merged folder (default: models/merged).")] = None,
    gpu: GpuOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge the LoRA adapter into a 16-bit model folder that transformers and vLLM load, and verify it."""
    from skinvlm.merge import merge as run_merge

    ws = Workspace.open(workspace)
    result = run_merge(ws, adapter=adapter, output=output, base=base, dtype=dtype, gpu=gpu)
    if as_json:
        return print_json(result.as_json())
    out.print(
        f"merged {result.backend} adapter into {result.base} ({result.dtype}) -> {result.output}\n"
        f"verified against base + adapter: logit RMS error {result.merge_error:.3g} (the adapter moves them "
        f"{result.adapter_effect:.3g}), max |difference| {result.max_logit_diff:.3g}, {result.agreement:.1%} same "
        f"next token; {result.changed_weights}/{result.lora_targets} LoRA-targeted weights changed",
        highlight=False,
    )


@app.command()
@user_errors
def serve(
    workspace: WorkspaceOpt = None,
    model: Annotated[Path | None, typer.Option(help="Model folder (default: models/merged).")] = None,
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    gpu: GpuOpt = None,
    dtype: Annotated[str, typer.Option()] = "auto",
    max_model_len: Annotated[int, typer.Option()] = 4096,
    gpu_memory_utilization: Annotated[float, typer.Option()] = 0.9,
    tensor_parallel_size: Annotated[
        int | None, typer.Option(help="GPUs to shard the model over (default: one per --gpu id).")
    ] = None,
    served_model_name: Annotated[str, typer.Option()] = "skinvlm",
    limit_mm_per_prompt: Annotated[str, typer.Option(help="JSON, e.g. '{\"image\":1}'.")] = '{"image":1}',
    generation_config_vllm: Annotated[
        bool,
        typer.Option(
            "--generation-config-vllm",
            help="Pass --generation-config vllm (ignore the model's generation_config.json).",
        ),
    ] = False,
    print_command: Annotated[bool, typer.Option("--print-command", help="Print the vllm command and exit.")] = False,
) -> None:
    """Serve models/merged with vLLM's OpenAI-compatible server (CUDA); Ctrl-C stops it."""
    import shlex

    from skinvlm import serve as stage

    ws = Workspace.open(workspace)
    folder = model or ws.merged
    settings = stage.ServeSettings(
        host=host,
        port=port,
        gpu=gpu,
        dtype=dtype,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
        served_model_name=served_model_name,
        limit_mm_per_prompt=limit_mm_per_prompt,
        generation_config_vllm=generation_config_vllm,
    )
    if print_command:
        stage.check_model(folder)
        sys.stdout.write(shlex.join(stage.build_command(folder, settings)) + "\n")
        return
    process, endpoint = stage.start(folder, settings)
    out.print(
        f"[green]ready[/]: {endpoint} (model name {served_model_name!r}); Ctrl-C stops it\n"
        f"{stage.curl_example(endpoint, served_model_name)}",
        highlight=False,
    )
    try:
        process.wait()
    finally:
        stage.stop(process)


@app.command(name="eval")
@user_errors
def eval_(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    name: Annotated[str | None, typer.Option(help="Run name: eval/<name>/ (default: a timestamp).")] = None,
    split: Annotated[str, typer.Option(help="Split of datasets/ingested.")] = "test",
    limit: Annotated[
        int | None, typer.Option(min=1, help="A seeded sample of N images, stratified by label and view.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 42,
    base_url: Annotated[
        str | None,
        typer.Option(
            envvar="OPENAI_BASE_URL",
            help="OpenAI-compatible server (default: http://127.0.0.1:8000/v1, i.e. skinvlm serve).",
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="Model name at the server.")] = "skinvlm",
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: $OPENAI_API_KEY or <workspace>/.env).", show_default=False)
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 32,
    timeout: Annotated[float, typer.Option()] = 120.0,
    max_tokens: Annotated[int, typer.Option()] = 256,
    backoff: Annotated[float, typer.Option(help="Base seconds of the retry backoff.")] = 1.0,
    max_attempts: Annotated[int, typer.Option(min=1, help="Tries per request on 429/5xx/timeouts.")] = 6,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the server to answer /v1/models before the first image.")
    ] = 0.0,
    model_dir: Annotated[
        Path | None,
        typer.Option(help="Run this model folder in-process with transformers instead of asking a server (CPU ok)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per generate() call with --model-dir.")] = 8,
    gpu: GpuOpt = None,
    confusion_matrix: Annotated[
        bool, typer.Option("--confusion-matrix", help="Also write confusion_matrix.png and print the matrix.")
    ] = False,
    compare: Annotated[list[str] | None, typer.Option(help="Print these runs side by side (repeatable).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate against a server or a model folder: accuracy, macro F1, per class and view, confusion matrix."""
    from skinvlm import evaluate as stage

    ws, loaded = open_workspace(workspace, rules)
    if compare:
        runs = stage.compare(ws, compare)
        return print_json(runs) if as_json else render.compare_runs(out, runs, loaded)
    settings = stage.EvalSettings(
        name=name,
        split=split,
        limit=limit,
        seed=seed,
        base_url=base_url,
        model=model,
        concurrency=concurrency,
        timeout=timeout,
        max_tokens=max_tokens,
        backoff=backoff,
        max_attempts=max_attempts,
        wait=wait,
        model_dir=str(model_dir) if model_dir else None,
        batch_size=batch_size,
        gpu=gpu,
        confusion_matrix=confusion_matrix,
    )
    with progress_bar("evaluating") as bar:
        task = bar.add_task("eval", total=None, note="")
        result = stage.evaluate(
            ws, loaded, settings, api_key, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    return print_json(result) if as_json else render.eval_report(out, result, loaded)


@app.command()
@user_errors
def doctor(workspace: WorkspaceOpt = None, gpu: GpuOpt = None, as_json: JsonOpt = False) -> None:
    """Check this machine: Python, torch and CUDA, GPUs, package versions against the GPU pins, backends, disk, keys.

    Exits 1 when something needed is missing: the train extra always, the GPU stack when --gpu is given.
    """
    from skinvlm.doctor import doctor as run_doctor

    report = run_doctor(Workspace.open(workspace), gpu)
    print_json(report.as_json()) if as_json else render.doctor_report(out, report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@user_errors
def demo(
    folder: Annotated[Path, typer.Argument(help="Where the demo writes everything.")] = Path("skinvlm-demo"),
    per_folder: Annotated[int, typer.Option(help="Training images per class-and-view folder.")] = 5,
    steps: Annotated[int, typer.Option(help="Training steps of the tiny model.")] = 160,
) -> None:
    """Run every stage for real on a small synthetic set: offline, CPU only, a few minutes."""
    from skinvlm.demo import run_demo
    from skinvlm.rules import load_rules

    rules_path = folder / "workspace" / "postprocess.toml"  # written by the demo before its first step
    out.rule("[bold]skinvlm demo")
    say = lambda line: out.print(f"\n[bold cyan]{line}[/]")  # noqa: E731
    show = lambda kind, result: render.demo_step(out, err, kind, result, load_rules(rules_path))  # noqa: E731
    result = run_demo(folder, say, show, per_folder=per_folder, steps=steps)
    render.demo_closing(out, result, load_rules(rules_path))


def main() -> None:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    app()
