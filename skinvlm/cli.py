"""The `skinvlm` command line: read options, call a stage function, render its result. Nothing more.

Each flag's default is its settings dataclass's field (`= TrainSettings.max_steps`), so a default lives in
one place; `--config FILE.toml` fills what the command line left at its default (`config.resolve`).
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from skinvlm import config, render, signals, stdout
from skinvlm.describe import DescribeSettings
from skinvlm.errors import SkinvlmError, machine_problem
from skinvlm.evaluate import EvalSettings
from skinvlm.ingest import DEFAULT_MAX_PIXELS_IN
from skinvlm.merge import Dtype as MergeDtype
from skinvlm.openai_api import Detail
from skinvlm.redaction import redact_text
from skinvlm.rules import Rules, load_rules, resolve_rules_path
from skinvlm.serve import Dtype as ServeDtype
from skinvlm.serve import ServeSettings
from skinvlm.train import Backend, ReportTo, TrainSettings
from skinvlm.workspace import Workspace


class TypelessHelp:
    """typer gives its own -h/--help a <bool> type column; like every other flag it shows none here."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Group(TypelessHelp, TyperGroup):
    pass


class Command(TypelessHelp, TyperCommand):
    pass


app = typer.Typer(
    cls=Group,
    help="Facial skin photo folders -> a served, evaluated Korean vision-language model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])
COMMANDS = ("ingest", "status", "describe", "audit", "fix", "publish", "train", "merge", "serve", "eval", "doctor")


def flag(*names: str, help: str) -> Any:  # noqa: A002 - typer's own name
    """A boolean flag, shown without a type in --help."""
    return typer.Option(*names, help=help, metavar="")


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
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        dir_okay=False,
        # Escaped: rich reads [train] as markup and would print "(, , , )".
        help="TOML file with a table for this command (\\[train], \\[describe], \\[eval], \\[serve]); flags win.",
    ),
]
JsonOpt = Annotated[bool, flag("--json", help="Print one JSON object instead of tables.")]
GpuOpt = Annotated[str | None, typer.Option(help="GPU number(s), e.g. 0 or 0,1 (sets CUDA_VISIBLE_DEVICES).")]
DetailOpt = Annotated[Detail, typer.Option(help="Image detail the API is asked for.")]
MaxSideOpt = Annotated[int, typer.Option(help="Images are sent scaled to fit this many pixels on their longer side.")]


class TextStage(StrEnum):
    """The stages that hold generated text (audit and publish work on these)."""

    described = "described"
    fixed = "fixed"


def show_version(value: bool) -> None:
    if value:
        out.print(f"skinvlm {metadata.version('skinvlm')}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    debug: Annotated[bool, flag("--debug", help="Show the traceback of an error (or set SKINVLM_DEBUG=1).")] = False,
    quiet: Annotated[bool, flag("--quiet", "-q", help="No progress bars or live training figures.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, metavar="", help="Show the version.")
    ] = False,
) -> None:
    """Facial skin photo folders -> a served, evaluated Korean vision-language model."""
    GLOBAL.update(debug=debug or os.environ.get("SKINVLM_DEBUG") == "1", quiet=quiet)
    if quiet:  # the libraries' own bars (loading weights, downloads, map) read these when they are imported
        os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if workspace is not None:  # `skinvlm -w WS status` as well as `skinvlm status -w WS`
        ctx.default_map = {command: {"workspace": str(workspace)} for command in COMMANDS}


GLOBAL = {"debug": False, "quiet": False}  # the options before the command, set by `main_options` each run


def global_option(name: str) -> bool:
    return GLOBAL[name]


def user_errors(fn: F) -> F:
    """Every error a user can meet is one line on stderr, exit 1 (a usage error is click's, exit 2); Ctrl-C exits
    130 after the stage saved. Anything else is a bug: one line too, and its traceback with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with signals.stopping_like_ctrl_c(), stdout.reserved_for_json(bool(kwargs.get("as_json"))):
                return fn(*args, **kwargs)
        except SkinvlmError as problem:
            fail(str(problem))
        except KeyboardInterrupt:
            err.print(f"{interrupted()}: finished work is saved; run the same command again to go on")
            raise typer.Exit(stopped_code()) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # exit codes and usage errors the command chose
        except Exception as problem:
            line = machine_problem(problem, Workspace.open(kwargs.get("workspace")).root)
            if line is not None:
                fail(line)
            if global_option("debug"):
                raise
            fail(f"internal error: {type(problem).__name__}: {problem} (--debug shows the traceback; please report it)")

    return wrapper  # type: ignore[return-value]


def interrupted() -> str:
    """How a stopped command's line begins: Ctrl-C, or the signal a service manager sent."""
    by = "" if signals.received() == signal.SIGINT else f" by {signals.name()}"
    return f"[yellow]interrupted{by}[/]"


def stopped_code() -> int:
    return 128 + signals.received()  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM


def command(name: str | None = None) -> Callable[[F], F]:
    """A subcommand: its user errors rendered as one line, its help without types on flags."""

    def register(fn: F) -> F:
        wrapped = user_errors(fn)
        app.command(name=name, cls=Command)(wrapped)
        return wrapped

    return register


def fail(line: str) -> None:
    err.print(f"[bold red]error:[/] {escape(redact_text(line.splitlines()[0] if line else line))}", highlight=False)
    raise typer.Exit(1)


def existing_workspace(workspace: Path | None) -> Workspace:
    """The workspace a command reads or writes: a mistyped -w is one line naming it, from every command."""
    ws = Workspace.open(workspace)
    ws.require_root()
    return ws


def open_workspace(workspace: Path | None, rules: Path | None = None, new: bool = False) -> tuple[Workspace, Rules]:
    """The workspace (`new`: it may not exist yet, for ingest) and its rule file."""
    ws = Workspace.open(workspace) if new else existing_workspace(workspace)
    return ws, load_rules(resolve_rules_path(rules, ws.root))


def settings_of(ctx: typer.Context, cls: type[Any], section: str, config_file: Path | None) -> Any:
    """The command's settings dataclass: its parameters, and the config file for what was left at its default."""
    defaults = {"DEFAULT", "DEFAULT_MAP"}
    given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) not in defaults}
    return config.resolve(cls, section, config_file, ctx.params, given)


def counting(title: str) -> render.Counting:
    return render.Counting(err, title, quiet=global_option("quiet"))


def phases(title: str) -> render.Phases:
    return render.Phases(err, title, quiet=global_option("quiet"))


def print_json(value: Any) -> None:
    stdout.write_json(value)


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
    workers: Annotated[int | None, typer.Option(help="Checking threads (default: all cores).")] = None,
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
            workers=workers,
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
    from skinvlm.describe import REDO_CHOICES

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
    base_url: Annotated[
        str | None, typer.Option(envvar="OPENAI_BASE_URL", help="OpenAI-compatible endpoint (default: api.openai.com).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: $OPENAI_API_KEY or <workspace>/.env).", show_default=False)
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at most.")] = DescribeSettings.concurrency,
    rpm: Annotated[int | None, typer.Option(help="Client-side limit: requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Client-side limit: tokens per minute (estimated).")] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds per request before it is retried.")
    ] = DescribeSettings.timeout,
    max_tokens: Annotated[int, typer.Option(help="Answer length limit in tokens.")] = DescribeSettings.max_tokens,
    temperature: Annotated[float, typer.Option()] = DescribeSettings.temperature,
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
        list[str] | None, typer.Option("--split", help="Only these splits (repeatable; default: train and test).")
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
    return print_json(result.as_json()) if as_json else render.describe_summary(out, result)


@command()
def audit(
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    stage: Annotated[TextStage | None, typer.Option(help="Which text stage (default: the newest).")] = None,
    strict: Annotated[bool, flag("--strict", help="Exit 1 when any record has a problem.")] = False,
    suggest: Annotated[
        bool, flag("--suggest", help="Print TOML stanzas and commands for what the audit finds.")
    ] = False,
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
    public: Annotated[bool, flag("--public", help="Make the dataset public (default: private).")] = False,
    dry_run: Annotated[
        bool, flag("--dry-run", help="Write shards and card to <workspace>/publish/; upload nothing.")
    ] = False,
    yes: Annotated[bool, flag("--yes", help="Do not ask for confirmation.")] = False,
    ignore_audit: Annotated[
        bool, flag("--ignore-audit", help="Publish although audit --strict fails; the card says what failed.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Push a text stage with its images and a dataset card to the Hugging Face Hub (token: HF_TOKEN)."""
    from skinvlm.publish import publish as run_publish

    ws, loaded = open_workspace(workspace, rules)
    with phases("publish") as phase:
        result = run_publish(
            ws,
            loaded,
            repo,
            stage=stage.value,
            public=public,
            dry_run=dry_run,
            yes=yes,
            force=ignore_audit,
            confirm=lambda question: phase.ask(question, lambda q: typer.confirm(q, default=False)),
            phase=phase,
        )
    return print_json(result.as_json()) if as_json else render.publish_report(out, result)


T = TrainSettings  # the defaults below are its fields'


@command()
def train(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    config_file: ConfigOpt = None,
    model: Annotated[str, typer.Option(help="Base model: Hub name or local folder.")] = T.model,
    backend: Annotated[
        Backend, typer.Option(help="auto: unsloth on CUDA when installed, else hf (transformers + PEFT).")
    ] = Backend(T.backend),
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (ignored with --epochs).")] = T.max_steps,
    epochs: Annotated[float | None, typer.Option(help="Train for this many epochs instead of --max-steps.")] = None,
    learning_rate: Annotated[float, typer.Option()] = T.learning_rate,
    lora_r: Annotated[int, typer.Option()] = T.lora_r,
    lora_alpha: Annotated[int, typer.Option()] = T.lora_alpha,
    lora_dropout: Annotated[float, typer.Option()] = T.lora_dropout,
    finetune_vision: Annotated[
        bool, typer.Option("--finetune-vision/--no-finetune-vision", metavar="", help="LoRA on the vision tower.")
    ] = T.finetune_vision,
    finetune_language: Annotated[
        bool, typer.Option("--finetune-language/--no-finetune-language", metavar="", help="LoRA on the language model.")
    ] = T.finetune_language,
    batch_size: Annotated[int, typer.Option(help="Per-device batch size.")] = T.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = T.grad_accum,
    warmup_steps: Annotated[int, typer.Option()] = T.warmup_steps,
    weight_decay: Annotated[float, typer.Option()] = T.weight_decay,
    optim: Annotated[str, typer.Option(help="Optimizer (adamw_torch where bitsandbytes is missing).")] = T.optim,
    max_grad_norm: Annotated[float, typer.Option()] = T.max_grad_norm,
    max_pixels: Annotated[
        int,
        typer.Option(
            help="Image resolution cap in pixels (max_pixels/784 vision tokens); recorded for merge, serve and eval."
        ),
    ] = T.max_pixels,
    max_length: Annotated[
        int, typer.Option(help="Tokens per sample at most (image included); longer ones are cut.")
    ] = T.max_length,
    seed: Annotated[int, typer.Option()] = T.seed,
    eval_steps: Annotated[int, typer.Option(help="Evaluate on --eval-rows test rows every N steps.")] = T.eval_steps,
    eval_rows: Annotated[int, typer.Option(help="Test rows for the eval loss (0: none).")] = T.eval_rows,
    save_steps: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = T.save_steps,
    save_total_limit: Annotated[int, typer.Option(help="Checkpoints kept.")] = T.save_total_limit,
    dataloader_workers: Annotated[
        int, typer.Option(help="Processes that decode and resize the next batches' photos while a step runs.")
    ] = T.dataloader_workers,
    load_in_4bit: Annotated[
        bool, typer.Option("--load-in-4bit/--no-load-in-4bit", metavar="", help="QLoRA: the base in 4 bits on CUDA.")
    ] = T.load_in_4bit,
    gpu: GpuOpt = None,
    processes: Annotated[
        int | None,
        typer.Option(help="DDP processes under torchrun (default: one per --gpu id; on a CPU they use gloo)."),
    ] = None,
    resume: Annotated[bool, flag("--resume", help="Continue from the newest checkpoint.")] = False,
    keep_mismatches: Annotated[
        bool, flag("--keep-mismatches", help="Also train on answers whose <label> names another class than the folder.")
    ] = False,
    report_to: Annotated[ReportTo, typer.Option(help="Where else to log the run.")] = ReportTo(T.report_to),
    output: Annotated[Path | None, typer.Option(help="Adapter folder (default: models/adapter).")] = None,
    dry_run: Annotated[
        bool, flag("--dry-run", help="Collate one batch with the real collator and show what training would see.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune with LoRA on datasets/fixed: Unsloth QLoRA on a GPU, transformers + PEFT anywhere."""
    from skinvlm import devices
    from skinvlm import train as stage

    ws, loaded = open_workspace(workspace, rules)
    settings = settings_of(ctx, TrainSettings, "train", config_file)
    if dry_run:
        summary = stage.dry_run(ws, loaded, settings)
        if as_json:
            print_json(summary.as_json() | {"settings": asdict(settings)})
        else:
            render.train_summary(out, summary, asdict(settings))
        if problem := summary.problem():
            raise SkinvlmError(problem)
        return
    wanted = devices.processes_wanted(processes, gpu)
    if wanted > 1 and not devices.launched():
        stage.preflight(ws, settings, dry_run=False)  # one clear line here rather than one per process
        with ws.writing("train"):  # held here for the workers, who inherit it
            try:
                code = devices.relaunch(wanted, sys.argv[1:], stdout.real_stdout())
            except KeyboardInterrupt:
                raise typer.Exit(stopped_code()) from None  # rank 0 has said what was kept
            raise typer.Exit(code)
    live = render.TrainProgress(err, quiet=global_option("quiet"))
    try:
        result = stage.train(ws, loaded, settings, on_summary=lambda s, plan: live.start(s, plan), on_step=live.step)
    except stage.TrainingInterrupted as stop:
        live.close()
        if devices.is_main_process():  # one line, not one per DDP rank
            again = [*sys.argv[1:], *([] if "--resume" in sys.argv else ["--resume"])]
            line = render.training_interrupted(stop.checkpoint, stop.saved_now, shlex.join(["skinvlm", *again]))
            err.print(line.replace("[yellow]interrupted[/]", interrupted()))
        raise typer.Exit(stopped_code()) from None
    live.close()
    if devices.is_main_process():
        print_json(result.as_json()) if as_json else render.train_result(out, result)


@command()
def merge(
    workspace: WorkspaceOpt = None,
    base: Annotated[
        str | None,
        typer.Option(help="16-bit base model (default: the one recorded in the adapter, or its 16-bit twin)."),
    ] = None,
    dtype: Annotated[MergeDtype, typer.Option(help="Weights of the merged model.")] = MergeDtype.bfloat16,
    adapter: Annotated[Path | None, typer.Option(help="Adapter folder (default: models/adapter).")] = None,
    output: Annotated[Path | None, typer.Option(help="Merged folder (default: models/merged).")] = None,
    gpu: GpuOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge the LoRA adapter into a 16-bit model folder that transformers and vLLM load, and verify it."""
    from skinvlm.merge import merge as run_merge

    ws = existing_workspace(workspace)
    with phases("merge") as phase:
        result = run_merge(ws, adapter=adapter, output=output, base=base, dtype=dtype.value, gpu=gpu, phase=phase)
    print_json(result.as_json()) if as_json else render.merge_result(out, result)


S = ServeSettings  # the defaults below are its fields'


@command()
def serve(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    config_file: ConfigOpt = None,
    model_dir: Annotated[Path | None, typer.Option(help="Model folder (default: models/merged).")] = None,
    host: Annotated[str, typer.Option()] = S.host,
    port: Annotated[int, typer.Option()] = S.port,
    gpu: GpuOpt = None,
    dtype: Annotated[ServeDtype, typer.Option()] = ServeDtype(S.dtype),
    max_model_len: Annotated[int, typer.Option()] = S.max_model_len,
    gpu_memory_utilization: Annotated[float, typer.Option()] = S.gpu_memory_utilization,
    tensor_parallel_size: Annotated[
        int | None, typer.Option(help="GPUs to shard the model over (default: one per --gpu id).")
    ] = None,
    served_model_name: Annotated[str, typer.Option()] = S.served_model_name,
    limit_mm_per_prompt: Annotated[str, typer.Option(help="JSON, e.g. '{\"image\":1}'.")] = S.limit_mm_per_prompt,
    generation_config_vllm: Annotated[
        bool,
        flag("--generation-config-vllm", help="Pass --generation-config vllm (ignore the model's generation_config)."),
    ] = False,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for /health.")] = S.startup_timeout,
    print_command: Annotated[bool, flag("--print-command", help="Print the vllm command and exit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Serve models/merged with vLLM's OpenAI-compatible server (CUDA); Ctrl-C stops it."""
    from skinvlm import serve as stage

    ws = Workspace.open(workspace) if model_dir else existing_workspace(workspace)
    folder = model_dir or ws.merged
    settings = settings_of(ctx, ServeSettings, "serve", config_file)
    if print_command:
        stage.check_model(folder)
        printed = stage.printed_command(folder, settings)
        if as_json:
            return print_json(printed)
        sys.stdout.write(printed["shell"] + "\n")
        return
    process = None
    try:
        process, endpoint = stage.start(folder, settings)  # a server interrupted while starting is stopped there
        out.print(
            f"[green]ready[/]: {endpoint} (model name {settings.served_model_name!r}); Ctrl-C stops it\n"
            f"{stage.curl_example(endpoint, settings.served_model_name)}",
            highlight=False,
        )
        code = process.wait()
    except KeyboardInterrupt:
        if process is not None:
            stage.stop(process)
        err.print(f"{interrupted()}: the vLLM server is stopped, its processes ended and its port released")
        raise typer.Exit(stopped_code()) from None
    raise SkinvlmError(f"the vLLM server exited by itself with code {code}")


E = EvalSettings  # the defaults below are its fields'


@command(name="eval")
def eval_(
    ctx: typer.Context,
    workspace: WorkspaceOpt = None,
    rules: RulesOpt = None,
    config_file: ConfigOpt = None,
    name: Annotated[str | None, typer.Option(help="Run name: eval/<name>/ (default: a timestamp).")] = None,
    split: Annotated[str, typer.Option(help="Split of datasets/ingested.")] = E.split,
    limit: Annotated[
        int | None, typer.Option(min=1, help="A seeded sample of N images, stratified by label and view.")
    ] = None,
    seed: Annotated[int, typer.Option()] = E.seed,
    base_url: Annotated[
        str | None,
        typer.Option(
            envvar="OPENAI_BASE_URL",
            help="OpenAI-compatible server (default: http://127.0.0.1:8000/v1, i.e. skinvlm serve).",
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="Model name at the server.")] = E.model,
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: $OPENAI_API_KEY or <workspace>/.env).", show_default=False)
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at most.")] = E.concurrency,
    timeout: Annotated[float, typer.Option()] = E.timeout,
    max_tokens: Annotated[int, typer.Option()] = E.max_tokens,
    temperature: Annotated[float, typer.Option()] = E.temperature,
    detail: DetailOpt = Detail(E.detail),
    max_pixels: Annotated[
        int | None,
        typer.Option(
            help="Photos go to a server as PNG at this resolution (default: the workspace model's trained one; "
            "none known: the original size)."
        ),
    ] = None,
    backoff: Annotated[float, typer.Option(help="Base seconds of the retry backoff.")] = E.backoff,
    max_attempts: Annotated[int, typer.Option(min=1, help="Tries per request on 429/5xx/timeouts.")] = E.max_attempts,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for the server to answer /v1/models before the first image.")
    ] = E.wait,
    labels_only: Annotated[
        bool, flag("--labels-only", help="Stop each answer at </label>: accuracy in a fraction of the time.")
    ] = E.labels_only,
    probabilities: Annotated[
        bool,
        typer.Option(
            "--probabilities/--no-probabilities",
            metavar="",
            help="Class probabilities: every label scored (--model-dir) or logprobs asked of the server.",
        ),
    ] = E.probabilities,
    model_dir: Annotated[
        Path | None,
        typer.Option(help="Run this model folder in-process with transformers instead of asking a server (CPU ok)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per generate() call with --model-dir.")] = E.batch_size,
    gpu: GpuOpt = None,
    confusion_matrix: Annotated[
        bool, flag("--confusion-matrix", help="Also write confusion_matrix.png and print the matrix.")
    ] = False,
    compare: Annotated[
        list[str] | None,
        typer.Option(help="Runs side by side, each later one paired with the first (`--compare A B` or repeated)."),
    ] = None,
    more_runs: Annotated[
        list[str] | None, typer.Argument(metavar="RUN", help="More runs for --compare.", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate against a server or a model folder: accuracy, macro F1, per class and view, confusion matrix."""
    from skinvlm import evaluate as stage

    ws, loaded = open_workspace(workspace, rules)
    if more_runs and not compare:
        raise SkinvlmError(f"eval takes run names only after --compare: --compare {' '.join(more_runs)}")
    if compare:
        compared = stage.compare(ws, [*compare, *(more_runs or [])], loaded)
        return print_json(compared) if as_json else render.compare_runs(out, compared, loaded)
    settings = settings_of(ctx, EvalSettings, "eval", config_file)
    with counting("evaluating") as progress:
        result = stage.evaluate(ws, loaded, settings, api_key, progress=progress)
    return print_json(result) if as_json else render.eval_report(out, result, loaded)


@command()
def doctor(workspace: WorkspaceOpt = None, gpu: GpuOpt = None, as_json: JsonOpt = False) -> None:
    """Check this machine: Python, torch and CUDA, GPUs, package versions against the GPU pins, backends, disk, keys.

    Exits 1 when something needed is missing: the train extra always, the GPU stack when --gpu is given.
    """
    from skinvlm.doctor import doctor as run_doctor

    report = run_doctor(Workspace.open(workspace), gpu)
    print_json(report.as_json()) if as_json else render.doctor_report(out, report)
    if not report.ok:
        raise typer.Exit(1)


@command()
def demo(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Where the demo writes everything.")] = Path(
        "skinvlm-demo"
    ),
    per_folder: Annotated[int, typer.Option(help="Training images per class-and-view folder.")] = 5,
    steps: Annotated[int, typer.Option(help="Training steps of the tiny model.")] = 160,
) -> None:
    """Run every stage for real on a small synthetic set: offline, CPU only, a few minutes."""
    from skinvlm.demo.pipeline import run_demo
    from skinvlm.rules import load_rules

    rules_path = folder / "workspace" / "postprocess.toml"  # written by the demo before its first step
    out.rule("[bold]skinvlm demo")
    say = lambda line: out.print(f"\n[bold cyan]{line}[/]")  # noqa: E731
    show = lambda kind, result: render.demo_step(out, err, kind, result, load_rules(rules_path))  # noqa: E731
    live = render.TrainProgress(err, quiet=global_option("quiet"))
    try:
        result = run_demo(folder, say, show, per_folder=per_folder, steps=steps, progress=live)
    finally:
        live.close()
    render.demo_closing(out, result, load_rules(rules_path))


def show_our_warnings(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """skinvlm's own warnings as one `warning:` line; the libraries' keep Python's format (file and line)."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)
    else:
        PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


PYTHON_SHOWWARNING = warnings.showwarning


LIBRARIES = r"(transformers|peft|trl|accelerate|torch|datasets|huggingface_hub)(\.|$)"


def main() -> None:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.showwarning = show_our_warnings
    # The libraries' deprecation notices speak to their developers (a renamed argument skinvlm passes), not to
    # someone training a model: they stay out of the output (PYTHONWARNINGS=default brings them back).
    if not os.environ.get("PYTHONWARNINGS"):
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    app()
