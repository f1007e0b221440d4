"""`skinvlm ui`: one local page over the workspace: what it holds (as `status`), jobs (the CLI's own commands run as
child processes, with Stop), training live (loss or reward and held-out macro F1 against steps), every eval
run's figures, and the review page as a tab. Served by uvicorn on 127.0.0.1 unless told otherwise, with the
review page's safety (security.py): the Host check, CSRF on every change, the token off loopback, and a
Content-Security-Policy that lets a page load nothing but skinvlm's own files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skinvlm import leakage
from skinvlm.errors import SkinvlmError
from skinvlm.web import jobs
from skinvlm.web.assets import asset_route, template
from skinvlm.web.security import (
    BadRequest,
    PageGuard,
    Sessions,
    address,
    check_serving,
    guarded_app,
    json_body,
    run_server,
)
from skinvlm.workspace import MANIFEST, TEXT_STAGES, Workspace, secret_key, stage_status

SESSION_COOKIE = "skinvlm_ui"
TOKEN_COOKIE = "skinvlm_ui_token"  # the review tab takes it too (review.TOKEN_COOKIES)
EVAL_FILES = ("confusion_matrix.png", "reliability.png", "report.html")
# The fields each job's form may set, as the command's flags; anything else is refused.
FIELDS: dict[str, tuple[str, ...]] = {
    "train": ("method", "from", "model", "backend", "max-steps", "learning-rate", "eval-steps", "config", "output"),
    "eval": ("model-dir", "base-url", "model", "name", "split", "limit", "config"),
    "describe": ("model", "base-url", "limit", "concurrency", "config"),
    "merge": ("adapter", "output"),
    "fix": (),
    "audit": (),
}
SWITCHES = {  # check boxes: a flag without a value, and whether the form starts with it ticked
    "describe": {"dry-run": True, "template": False}, "train": {"dry-run": False}, "fix": {"dry-run": False},
    "eval": {"confusion-matrix": True, "constrained": False},
}  # fmt: skip


def job_forms(cli: Any) -> dict[str, list[dict[str, Any]]]:
    """Each job's form from its command's own declaration in the Typer app `cli` (the command function's
    annotations: type, default, help), so a field can never drift from the flag it becomes; FIELDS and SWITCHES
    only choose which flags a form has. The app is handed in: the CLI imports the ui, never the other way."""
    options = cli_options(cli)
    return {
        command: [form_field(name, *options[command][name], SWITCHES.get(command, {}).get(name))
                  for name in (*FIELDS[command], *SWITCHES.get(command, {}))]
        for command in FIELDS
    }  # fmt: skip


def cli_options(cli: Any) -> dict[str, dict[str, tuple[Any, Any, str]]]:
    """Command -> flag (without its dashes) -> (type, default, help), read from each command function."""
    import inspect
    import typing

    found: dict[str, dict[str, tuple[Any, Any, str]]] = {}
    for registered in cli.registered_commands:
        function = registered.callback
        assert function is not None
        hints = typing.get_type_hints(function, include_extras=True)
        flags: dict[str, tuple[Any, Any, str]] = {}
        for name, parameter in inspect.signature(function).parameters.items():
            kind, *extras = typing.get_args(hints[name]) or (hints[name],)
            info = next((e for e in extras if hasattr(e, "param_decls")), None)
            if info is None:
                continue
            decls = [d for d in (info.default, *(info.param_decls or ())) if isinstance(d, str) and d.startswith("--")]
            for flag in decls or ["--" + name.replace("_", "-")]:
                flags[flag[2:]] = (kind, parameter.default, info.help or "")
        found[registered.name or function.__name__.rstrip("_")] = flags
    return found


def form_field(name: str, kind: Any, default: Any, help_text: str, checked: bool | None) -> dict[str, Any]:
    import enum
    import typing

    if checked is not None:
        return {"name": name, "kind": "switch", "checked": checked, "help": help_text}
    kind = next((k for k in typing.get_args(kind) if k is not type(None)), kind)  # X | None -> X
    field: dict[str, Any] = {"name": name, "kind": "text", "help": help_text, "default": None}
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        field |= {"kind": "choice", "choices": [member.value for member in kind]}
    elif kind in (int, float):
        field["kind"] = "number"
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, str | int | float | Path) and not isinstance(default, bool):
        field["default"] = str(default)
    return field


PATHS = ("from", "config", "output", "adapter", "model-dir")  # fields that name a file or folder


def job_argv(command: str, fields: dict[str, Any], root: Path) -> list[str]:
    """A form's fields as `skinvlm COMMAND` flags: only the fields the command's form has, each a short line of
    text; a path resolves inside the workspace `root` (relative to it, never to the ui's own working folder)."""
    if command not in FIELDS:
        raise BadRequest(400, f"a job is one of {', '.join(FIELDS)}")
    argv = [command]
    for name, value in fields.items():
        if name in SWITCHES.get(command, ()):
            argv += [f"--{name}"] if value is True else []
            continue
        if name not in FIELDS[command]:
            raise BadRequest(400, f"{command} takes no field {name!r}")
        if value in (None, ""):
            continue
        text = str(value)
        if not isinstance(value, str | int | float) or len(text) > 500 or text.startswith("-"):
            raise BadRequest(400, f"{name}: a value of up to 500 characters, not a flag")
        if not text.isprintable():
            raise BadRequest(400, f"{name}: one line of printable text")
        argv += [f"--{name}", inside_workspace(name, text, root) if name in PATHS else text]
    return argv


def inside_workspace(name: str, value: str, root: Path) -> str:
    root = root.resolve()
    path = (root / value).resolve()
    if not path.is_relative_to(root):
        raise BadRequest(400, f"{name}: a path inside the workspace {root}, not {value}")
    return str(path)


NEXT = {  # the command that makes each stage, in pipeline order
    "ingested": "skinvlm ingest SRC", "described": "describe", "fixed": "fix", "adapter": "train", "merged": "merge",
}  # fmt: skip


def next_step(stages: list[dict[str, Any]]) -> str:
    """What to run next: what a stale stage needs, else the first stage not made yet, else an evaluation."""
    for stage in stages:
        if stage["stale"]:
            return " then ".join(stage["rerun"])
    for stage in stages:
        if stage["name"] in NEXT and not stage["present"]:
            return NEXT[stage["name"]]
    return "eval"


def train_runs(ws: Workspace) -> list[dict[str, Any]]:
    """Every adapter folder under models/ with a training log: its settings, curve and headline figures."""
    models = ws.root / "models"
    found = []
    for folder in sorted(models.iterdir()) if models.is_dir() else []:
        log = folder / "train_log.jsonl"
        if folder.is_dir() and log.is_file():
            found.append(finite(train_run(folder)))
    return found


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity as None: a diverged run logs `NaN`, which JSON cannot carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def json_or_none(path: Path) -> dict[str, Any] | None:
    """A JSON object a run wrote, or None where it is missing or damaged (one damaged run leaves the others shown)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def train_run(folder: Path) -> dict[str, Any]:
    entries = []
    for line in (folder / "train_log.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    points = [
        {"step": e["step"], "loss": e.get("loss"), "reward": e.get("reward"), "eval_macro_f1": e.get("eval_macro_f1")}
        for e in entries
        if "loss" in e or "eval_macro_f1" in e
    ]
    timed = [e for e in entries if "loss" in e and isinstance(e.get("seconds"), int | float)]
    last = timed[-1] if timed else {}
    per_step = last["seconds"] / last["step"] if last.get("step") else None
    settings = json_or_none(folder / "train_settings.json") or {}
    total = settings.get("max_steps") if isinstance(settings.get("max_steps"), int) else None
    counts = (json_or_none(folder / MANIFEST) or {}).get("counts") or {}
    peaks = [e["peak_vram_mb"] for e in entries if isinstance(e.get("peak_vram_mb"), int | float)]
    return {
        "name": folder.name,
        "points": points,
        "step": last.get("step", 0),
        "max_steps": total,
        "s_per_step": round(per_step, 3) if per_step else None,
        "eta_s": round(per_step * (total - last["step"])) if per_step and total else None,
        "peak_vram_mb": max(peaks) if peaks else None,
        "finished": bool(counts),
        "best_step": counts.get("best_step") if isinstance(counts, dict) else None,
        "settings": {k: settings.get(k) for k in ("method", "from_adapter", "model", "backend", "learning_rate",
                                                  "max_steps", "eval_steps", "lora_r", "max_pixels")},
    }  # fmt: skip


def eval_runs(ws: Workspace) -> list[dict[str, Any]]:
    runs = []
    for name in ws.finished_evals():
        try:
            found = ws.read_eval(name)
        except SkinvlmError as damaged:  # one damaged run is said so; the others are still shown
            runs.append({"name": name, "damaged": f"{damaged}: run this eval again"})
            continue
        runs.append(finite({k: found.get(k) for k in ("name", "n", "accuracy", "macro_f1", "unparsed", "backend")}))
    return runs


def eval_run(ws: Workspace, name: str) -> dict[str, Any]:
    try:
        folder = ws.eval_run(name)
    except SkinvlmError:
        raise BadRequest(404, f"no eval run {name!r}") from None
    if not ws.eval_metrics(name).is_file():
        raise BadRequest(404, f"no eval run {name!r}")
    try:
        found = ws.read_eval(name)
    except SkinvlmError as damaged:
        raise BadRequest(409, f"{damaged}: run this eval again") from None
    keep = ("name", "n", "accuracy", "macro_f1", "unparsed", "intervals", "per_class", "per_view", "labels",
            "predicted_labels", "confusion_matrix", "selective", "patients", "ci_method")  # fmt: skip
    return finite({k: found.get(k) for k in keep}) | {"files": [f for f in EVAL_FILES if (folder / f).is_file()]}


def review_inputs(ws: Workspace) -> tuple[tuple[str, int], ...]:
    """What the review page is built from, as (file, modification time) pairs: the datasets' manifests and the eval
    runs' metrics (the queue's order comes from their answers), each written when its run is complete (an eval
    job's answers, written as they come, would rebuild the page at every poll), and the rule file."""
    from skinvlm.rules import resolve_rules_path

    files = [ws.dataset(stage) / MANIFEST for stage in ("ingested", *TEXT_STAGES)]
    files += sorted(ws.eval_root.glob("*/metrics.json")) if ws.eval_root.is_dir() else []
    files.append(resolve_rules_path(None, ws.root))
    return tuple((str(f.resolve()), f.stat().st_mtime_ns) for f in files if f.is_file())


class ReviewTab:
    """The review page under /review/, built on first use and again whenever what it shows changed on disk (a
    `describe` or `fix` run from the Jobs tab, a new eval run), so the tab never needs the ui restarted."""

    def __init__(self, ws: Workspace, token: str | None) -> None:
        self.ws, self.token = ws, token
        self.built_from: tuple[tuple[str, int], ...] | None = None
        self.app: Any = None
        self.missing = ""  # why there is no review page yet

    def current(self) -> tuple[Any, str]:
        inputs = review_inputs(self.ws)
        if inputs != self.built_from:
            self.built_from = inputs
            try:
                self.app, self.missing = self.build(), ""
            except SkinvlmError as problem:
                self.app, self.missing = None, str(problem)
        return self.app, self.missing

    def build(self) -> Any:
        import os

        from skinvlm.review import open_review
        from skinvlm.rules import load_rules, resolve_rules_path
        from skinvlm.web.review import review_app

        rules = load_rules(resolve_rules_path(None, self.ws.root))
        state, stage = open_review(self.ws, rules, None, 0.0)
        return review_app(self.ws, rules, state, stage, os.environ.get("USER") or "reviewer", self.token)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app, missing = self.current()
        if app is None:
            from starlette.responses import PlainTextResponse

            await PlainTextResponse(f"no review page yet: {missing}", 404)(scope, receive, send)
            return
        await app(scope, receive, send)


def report_policy() -> str:
    """An eval run's report.html as the ui serves it: the page's own policy (report_html.policy, also in its
    <meta>), and, as only a header can say, never inside a frame. (A report written by another skinvlm version
    shows its figures with its script off.)"""
    from skinvlm.report_html import policy

    return policy() + "; frame-ancestors 'none'"


def create_app(ws: Workspace, sessions: Sessions, token: str | None, bind: str, forms: dict[str, Any]) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route

    review = ReviewTab(ws, token)

    guard = PageGuard(sessions, token, SESSION_COOKIE, (TOKEN_COOKIE,))
    guarded = guard.route

    async def page(request: Request) -> Response:
        return guard.page(request, template("ui.html"))

    @guarded
    async def overview(request: Request, _: dict[str, str]) -> Response:
        from skinvlm.render import stage_json

        stages = [stage_json(s) for s in stage_status(ws)]
        found = {"workspace": str(ws.root), "stages": stages, "next": next_step(stages),
                 "review": review.current()[1] or None, "leakage": leakage.warning(leakage.last_check(ws))}  # fmt: skip
        return JSONResponse(found)

    @guarded
    async def job_forms_json(request: Request, _: dict[str, str]) -> Response:
        return JSONResponse(forms)

    @guarded
    async def job_list(request: Request, _: dict[str, str]) -> Response:
        return JSONResponse([job.as_json() for job in jobs.list_jobs(ws)])

    @guarded
    async def job_start(request: Request, _: dict[str, str]) -> Response:
        body = await json_body(request)
        fields = body.get("fields") or {}
        if not isinstance(fields, dict):
            raise BadRequest(400, "fields must be an object")
        return JSONResponse(jobs.start(ws, job_argv(str(body.get("command")), fields, ws.root)).as_json())

    @guarded
    async def job_stop(request: Request, _: dict[str, str]) -> Response:
        return JSONResponse(jobs.stop(ws, request.path_params["job_id"]).as_json())

    @guarded
    async def job_log(request: Request, _: dict[str, str]) -> Response:
        return PlainTextResponse(jobs.log_tail(ws, request.path_params["job_id"]))

    @guarded
    async def training(request: Request, _: dict[str, str]) -> Response:
        return JSONResponse(train_runs(ws))

    @guarded
    async def evaluations(request: Request, _: dict[str, str]) -> Response:
        return JSONResponse(eval_runs(ws))

    @guarded
    async def evaluation(request: Request, _: dict[str, str]) -> Response:
        return JSONResponse(eval_run(ws, request.path_params["name"]))

    @guarded
    async def compare(request: Request, _: dict[str, str]) -> Response:
        from skinvlm.evaluate import compare as compare_runs
        from skinvlm.rules import load_rules, resolve_rules_path

        names = [request.query_params.get("first", ""), request.query_params.get("second", "")]
        for name in names:
            eval_run(ws, name)
        compared = compare_runs(ws, names, load_rules(resolve_rules_path(None, ws.root)))
        return JSONResponse(compared["paired"][0])

    @guarded
    async def eval_file(request: Request, _: dict[str, str]) -> Response:
        name, file = request.path_params["name"], request.path_params["file"]
        eval_run(ws, name)  # exists, and is a run of this workspace
        if file not in EVAL_FILES or not (ws.eval_run(name) / file).is_file():
            raise BadRequest(404, f"no {file} in eval run {name!r}")
        if file == "report.html":
            html = (ws.eval_run(name) / file).read_text(encoding="utf-8")
            return HTMLResponse(html, headers={"Content-Security-Policy": report_policy()})
        return FileResponse(ws.eval_run(name) / file)

    app = Starlette(
        routes=[
            Route("/", page),
            asset_route(),
            Route("/api/overview", overview),
            Route("/api/forms", job_forms_json),
            Route("/api/jobs", job_list),
            Route("/api/jobs", job_start, methods=["POST"]),
            Route("/api/jobs/{job_id:str}/stop", job_stop, methods=["POST"]),
            Route("/api/jobs/{job_id:str}/log", job_log),
            Route("/api/train", training),
            Route("/api/eval", evaluations),
            Route("/api/eval/{name:str}", evaluation),
            Route("/api/compare", compare),
            Route("/eval/{name:str}/{file:str}", eval_file),
            Mount("/review", review),
        ]
    )
    return guarded_app(app, bind)


def serve(
    ws: Workspace, *, host: str, port: int, token: str | None, forms: dict[str, Any], say: Callable[[str], None]
) -> None:
    """Serve the page until Ctrl-C or SIGTERM; jobs started from it go on after it stops."""
    check_serving("ui", host, port, token)
    app = create_app(ws, Sessions("ui", secret_key(ws.review_key)), token, host, forms)
    say(f"skinvlm ui for {ws.root}: {address(host, port, token)} (Ctrl-C stops the page; running jobs go on)")
    run_server(app, host, port)
