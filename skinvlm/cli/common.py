"""What every command shares: the Typer app, global options, the option types with one meaning each, the
`command` decorator that makes every error one line (and SIGTERM a Ctrl-C, and stdout the JSON's), output helpers.

Each flag's default is its settings dataclass's field (`= TrainSettings.max_steps`), so a default lives in
one place; `--config FILE.toml` fills what the command line left at its default (`config.resolve`).
"""

from __future__ import annotations

import functools
import os
import re
import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from skinvlm import config, render, signals, stdout
from skinvlm.errors import SkinvlmError, machine_problem
from skinvlm.openai_api import Detail
from skinvlm.redaction import redact_text
from skinvlm.rules import Rules, load_rules, resolve_rules_path
from skinvlm.workspace import Workspace


class TypelessHelp:
    """typer gives its own -h/--help a <bool> type column; like every other flag it shows none here."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Group(TypelessHelp, TyperGroup):
    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """Each command's first sentence whole, wrapped: click cuts it with '...' to fit one 80-column line."""
        commands = [(name, self.get_command(ctx, name)) for name in self.list_commands(ctx)]
        rows = [(name, command.get_short_help_str(limit=10_000)) for name, command in commands
                if command is not None and not command.hidden]  # fmt: skip
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class Command(TypelessHelp, TyperCommand):
    def format_options(self, ctx: Any, formatter: Any) -> None:
        """Options with their ranges in words ('at least 1', not click's 'x>=1')."""
        options = [param for param in self.get_params(ctx) if param.param_type_name == "option"]
        records = [record for param in options if (record := param.get_help_record(ctx)) is not None]
        if records:
            with formatter.section("Options"):
                formatter.write_dl([(names, readable_range(text)) for names, text in records])


NUMBER = r"(-?[0-9][0-9.e+-]*)"
RANGES = (
    (re.compile(rf"{NUMBER}<=x<={NUMBER}"), r"\1 to \2"),
    (re.compile(rf"\bx>={NUMBER}"), r"at least \1"),
    (re.compile(rf"\bx<={NUMBER}"), r"at most \1"),
    (re.compile(rf"\bx>{NUMBER}"), r"more than \1"),
    (re.compile(rf"\bx<{NUMBER}"), r"less than \1"),
)


def readable_range(text: str) -> str:
    for pattern, words in RANGES:
        text = pattern.sub(words, text)
    return text


app = typer.Typer(
    cls=Group,
    help="Facial skin photo folders -> a served, evaluated Korean vision-language model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    # click's plain help wraps long words; typer's rich table cuts them with "…" in an 80-column terminal
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


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
        help="TOML file with a table for this command ([train], [describe], [eval], [serve]); flags win.",
    ),
]
JsonOpt = Annotated[bool, flag("--json", help="Print one JSON object instead of tables.")]
# A local page (review, ui): where it listens, and the token it then needs.
PageHostOpt = Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs --token.")]


def page_token_option(envvar: str) -> Any:
    return typer.Option(
        envvar=envvar,
        show_envvar=True,
        metavar="<token>",
        help="Access token the page needs (open it with ?token=...); required off loopback.",
    )


GpuOpt = Annotated[str | None, typer.Option(help="GPU number(s), e.g. 0 or 0,1 (sets CUDA_VISIBLE_DEVICES).")]
DetailOpt = Annotated[Detail, typer.Option(help="Image detail the API is asked for.")]


def base_url_option(default: str) -> Any:
    return typer.Option(
        metavar="URL",
        help="OpenAI-compatible endpoint; repeat it (or list them comma-separated) to spread the requests over "
        f"several serving the same model (default: $OPENAI_BASE_URL, which may hold such a list, else {default}).",
        show_default=False,
    )


BaseUrlOpt = Annotated[list[str] | None, base_url_option("api.openai.com")]
ConcurrencyOpt = Annotated[int, typer.Option(min=1, help="Requests in flight at most, per endpoint.")]
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
        # every registered command, from the group itself: a hand-kept list once left out `ui`
        names = ctx.command.list_commands(ctx) if isinstance(ctx.command, TyperGroup) else []
        ctx.default_map = {command: {"workspace": str(workspace)} for command in names}
        ctx.default_map["demo"] = {"folder": str(workspace)}  # the demo's own folder: `skinvlm -w DIR demo`


GLOBAL = {"debug": False, "quiet": False}  # the options before the command, set by `main_options` each run


def global_option(name: str) -> bool:
    return GLOBAL[name]


def user_errors(fn: F) -> F:
    """Every error a user can meet is one line on stderr, exit 1 (a usage error is click's, exit 2); Ctrl-C exits
    130 after the stage saved. Anything else is a bug: one line too, and its traceback with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with (
                signals.stopping_like_ctrl_c(),
                stdout.reserved_for_json(bool(kwargs.get("as_json"))),
                library_notices_hidden(),
            ):
                return fn(*args, **kwargs)
        except SkinvlmError as problem:
            fail(str(problem))
        except KeyboardInterrupt:
            err.print(f"{interrupted()}: {STOPPED_SAYS.get(fn.__name__, GO_ON)}")
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


LIBRARIES = r"(transformers|peft|trl|accelerate|torch|datasets|huggingface_hub)(\.|$)"


@contextmanager
def library_notices_hidden() -> Iterator[None]:
    """The libraries' deprecation notices speak to their developers (trl reading a property transformers renamed),
    not to someone training a model: hidden while a command runs, from the terminal and from CliRunner alike
    (PYTHONWARNINGS=default brings them back)."""
    with warnings.catch_warnings():
        if not os.environ.get("PYTHONWARNINGS"):
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
        yield


GO_ON = "finished work is saved; run the same command again to go on"
# What a stopped command that serves (rather than works through its input) has to say: there is nothing to go on with.
STOPPED_SAYS = {
    "ui": "the page is stopped; jobs started from it go on",
    "review": "the review page is stopped; every decision made is saved",
    "serve": "the server is stopped",
}


def interrupted() -> str:
    """How a stopped command's line begins: Ctrl-C, or the signal a service manager sent."""
    by = "" if signals.received() == signal.SIGINT else f" by {signals.name()}"
    return f"[yellow]interrupted{by}[/]"


def stopped_code() -> int:
    signals.handled()  # else a stop that landed in an exec() would exit by SIGINT, not with this status
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
