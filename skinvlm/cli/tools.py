"""The helpers: doctor (what this machine can run), demo (every stage on a synthetic set) and ui (one local page)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from skinvlm import render
from skinvlm.cli.common import (
    GpuOpt,
    JsonOpt,
    PageHostOpt,
    WorkspaceOpt,
    app,
    command,
    err,
    existing_workspace,
    global_option,
    out,
    page_token_option,
    print_json,
)
from skinvlm.rules import load_rules
from skinvlm.workspace import Workspace


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
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Where the demo writes everything (or -w DIR).")] = Path(
        "skinvlm-demo"
    ),
    per_folder: Annotated[int, typer.Option(help="Training images per class-and-view folder.")] = 5,
    steps: Annotated[int, typer.Option(help="Training steps of the tiny model.")] = 160,
) -> None:
    """Run every stage for real on a small synthetic set: offline, CPU only, a few minutes."""
    from skinvlm.demo.pipeline import run_demo

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


@command()
def ui(
    workspace: WorkspaceOpt = None,
    port: Annotated[int, typer.Option(help="Port of the page.")] = 8770,
    host: PageHostOpt = "127.0.0.1",
    token: Annotated[str | None, page_token_option("SKINVLM_UI_TOKEN")] = None,
) -> None:
    """One local page for the whole cycle: the workspace, jobs (with Stop), training live, every eval run."""
    from skinvlm.web.ui import job_forms, serve

    forms = job_forms(app)  # the page's job forms from these very commands
    serve(existing_workspace(workspace), host=host, port=port, token=token, forms=forms, say=err.print)
