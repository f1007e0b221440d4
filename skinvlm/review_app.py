"""The review page: a Starlette app over a `ReviewState`, served by uvicorn on 127.0.0.1 unless told otherwise.

Plain HTML and a little JavaScript; every string from the data (descriptions, labels, ids) reaches the page as
JSON and is put in with `textContent`, never as HTML, so a description holding `<script>` is shown as text.
Images are looked up by record id in the ingested dataset: no part of a request becomes a file path. Changes
need the session's CSRF token (a header a cross-site form cannot send); a host other than loopback needs the
access token, compared in constant time and never logged (uvicorn's access log is off: it would print it).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from skinvlm.errors import SkinvlmError, install_hint
from skinvlm.prompts import parse_answer
from skinvlm.review import MAX_TEXT, Item, ReviewState, report, undo_last
from skinvlm.rules import Rules
from skinvlm.workspace import Workspace, secret_key

MAX_BODY = 64 * 1024  # a decision with the longest edited text is a few KiB; anything larger is refused unread
MAX_REASON = 500
SESSION_COOKIE = "skinvlm_review"
REVIEWER_COOKIE = "skinvlm_reviewer"
TOKEN_COOKIE = "skinvlm_review_token"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


def local_names(bind: str) -> frozenset[str]:
    """The names a request's Host may give: this machine's loopback names and the address the server was told to
    listen on; for a wildcard address, also this machine's own name and addresses. A page on another site whose
    name its DNS re-points at 127.0.0.1 (DNS rebinding) sends its own name, and is refused."""
    import socket

    names = {"127.0.0.1", "localhost", "::1", bind.lower().strip("[]")}
    if bind in WILDCARDS:
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        with contextlib.suppress(OSError):  # a name this machine cannot resolve: its loopback names still stand
            names |= {str(info[4][0]).lower() for info in socket.getaddrinfo(hostname, None)}
    return frozenset(names - {""})


def host_of(header: str) -> str | None:
    """The host of a Host header without its port ('[::1]:8000' -> '::1'), lowercased; None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        host, bracket, rest = header[1:].partition("]")
        return host if bracket and (not rest or rest[1:].isdigit() and rest[0] == ":") else None
    host, colon, port = header.partition(":")
    return host.rstrip(".") if host and (not colon or port.isdigit()) else None


def is_address(host: str | None) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


class HostCheck:
    """ASGI middleware: a request whose Host is not one of `names` gets 421 before any route runs. Our own few
    lines rather than Starlette's TrustedHostMiddleware: that one answers 400 and, before Starlette 1.0 (our
    extra allows 0.37), cut a Host of '[::1]:8000' at its first colon, refusing the IPv6 loopback.
    `any_address`: on a wildcard bind, a Host that is an IP address is taken too (a clinic's machine reached as
    192.168.x.y); DNS rebinding needs a name, so an address literal cannot be one."""

    def __init__(self, app: Any, names: frozenset[str], any_address: bool = False) -> None:
        self.app, self.names, self.any_address = app, names, any_address

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = host_of(dict(scope["headers"]).get(b"host", b"").decode("latin-1"))
            if host not in self.names and not (self.any_address and is_address(host)):
                from starlette.responses import PlainTextResponse

                answer = "this page answers only to this machine's own names (127.0.0.1, localhost)"
                await PlainTextResponse(answer, status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def json_body(request: Any) -> dict[str, Any]:
    """The request's JSON object, read to MAX_BODY bytes at most (413 past it); NaN, Infinity, deep nesting and
    anything but an object are a 400, never an error inside a route."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise BadRequest(413, f"a request body is {MAX_BODY // 1024} KiB at most")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY:
            raise BadRequest(413, f"a request body is {MAX_BODY // 1024} KiB at most")
    try:
        value = json.loads(bytes(body), parse_constant=refuse_constant)
    except (ValueError, RecursionError):
        raise BadRequest(400, "the request body is not a JSON object") from None
    if not isinstance(value, dict):
        raise BadRequest(400, "the request body is not a JSON object")
    return value


def refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


@dataclass(frozen=True)
class Sessions:
    """Per browser: a session id, a CSRF token derived from it with the workspace's review key, and the reviewer's
    name in a cookie. Nothing is kept in memory, so an open page outlives a restart of `review`: a decision (or a
    long edit) sent after it still lands."""

    default_reviewer: str
    key: bytes

    def get(self, session_id: str | None, reviewer: str | None) -> tuple[str, dict[str, str]]:
        if not session_id or len(session_id) > 64:
            session_id = secrets.token_urlsafe(24)
        name = unquote(reviewer or "").strip()
        csrf = hmac.new(self.key, session_id.encode(), "sha256").hexdigest()
        return session_id, {"reviewer": name if 0 < len(name) <= 100 else self.default_reviewer, "csrf": csrf}


def review_key(ws: Workspace) -> bytes:
    """The workspace's secret for CSRF tokens (`workspace.secret_key`)."""
    return secret_key(ws.review_key)


def item_json(state: ReviewState, item: Item | None, rules: Rules) -> dict[str, Any]:
    if item is None:
        return {"done": True, "progress": progress(state)}
    result = state.outcome(item.id)
    return {
        "done": False,
        "id": item.id,
        "split": item.split,
        "label": item.label,
        "english": rules.english(item.label),
        "view": item.view,
        "text": item.text,
        "findings": [{"kind": f.kind, "start": f.start, "end": f.end} for f in item.findings],
        "version": state.version(item.id),
        "probability": item.label_probability,
        "status": result.status,
        "progress": progress(state),
    }


def progress(state: ReviewState) -> dict[str, int]:
    reviewed = sum(1 for record_id in state.items if state.decisions.get(record_id))
    return {"reviewed": reviewed, "records": len(state.items), "skipped_lines": state.skipped}


def image_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    return "image/jpeg" if data.startswith(b"\xff\xd8") else "application/octet-stream"


@functools.cache
def page_template() -> str:
    """The page (review.html beside this module): HTML, CSS and the script, with __CSRF__ and __BOOT__ to fill."""
    return Path(__file__).with_name("review.html").read_text(encoding="utf-8")


@functools.cache
def every_hangul_woff() -> bytes | None:
    """Every Hangul syllable and jamo of NanumGothic, cut once per server (a second or two, on first use)."""
    from skinvlm.report_html import hangul_woff

    characters = [*range(0x1100, 0x1200), *range(0x3130, 0x3190), *range(0xAC00, 0xD7A4)]
    return hangul_woff("".join(map(chr, characters)))


def next_json(state: ReviewState, reviewer: str, rules: Rules) -> dict[str, Any]:
    return item_json(state, state.next_for(reviewer), rules)


def checked_decision(body: dict[str, Any], rules: Rules) -> tuple[str, int, str, str, str | None, str]:
    """(id, version, decision, label, text, reason) of a decision's JSON, every field's type and size checked:
    a malformed one is a 400 or 422 that says what is wrong."""
    record_id, version, decision = body.get("id"), body.get("version"), body.get("decision")
    label, text, reason = body.get("label"), body.get("text"), body.get("reason") or ""
    if not (isinstance(record_id, str) and isinstance(decision, str) and isinstance(reason, str)):
        raise BadRequest(400, "a decision is a JSON object with id, version, decision and label")
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**31:
        raise BadRequest(400, "a decision's version is the whole number the page was given")
    if label not in rules.class_names:
        raise BadRequest(400, f"the label must be one of {', '.join(rules.class_names)}")
    if text is not None and not isinstance(text, str):
        raise BadRequest(400, "an edited text is a string")
    if text is not None and len(text) > MAX_TEXT:
        raise BadRequest(422, f"the edited text is longer than {MAX_TEXT:,} characters")
    if len(reason) > MAX_REASON:
        raise BadRequest(422, f"a reason is {MAX_REASON} characters at most")
    if decision == "edit" and text is not None:
        named = rules.canonical(parse_answer(text).tag) if parse_answer(text).well_formed else None
        if named is not None and named != label:
            raise BadRequest(422, f"the edited text says <label>{named}</label> but the label chosen is {label}: "
                                  "make them agree")  # fmt: skip
    return record_id, version, decision, label, text if decision == "edit" else None, reason


def create_app(
    state: ReviewState, images: Any, rules: Rules, sessions: Sessions, token: str | None, stage: str, bind: str
) -> Any:
    """`images`: split -> the ingested dataset with undecoded images (raw stored bytes by row)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    classes = [{"name": c.name, "english": c.english} for c in rules.classes]

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        return hmac.compare_digest(given.encode(), token.encode())

    def session_of(request: Request) -> tuple[str, dict[str, str]]:
        return sessions.get(request.cookies.get(SESSION_COOKIE), request.cookies.get(REVIEWER_COOKIE))

    def with_cookies(response: Response, request: Request, session_id: str, session: dict[str, str]) -> Response:
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="strict")
        response.set_cookie(REVIEWER_COOKIE, quote(session["reviewer"]), httponly=True, samesite="strict")
        if token is not None and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self'; font-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def refused(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def checked(request: Request) -> tuple[str, dict[str, str]] | JSONResponse:
        if not authorised(request):
            return refused(401, "this review needs its access token (?token=...)")
        session_id, session = session_of(request)
        if request.method == "POST" and not hmac.compare_digest(
            request.headers.get("x-csrf-token", "").encode(), session["csrf"].encode()
        ):
            return refused(403, "this page is out of date: reload it")
        return session_id, session

    async def page(request: Request) -> Response:
        found = checked(request)
        if isinstance(found, JSONResponse):
            return HTMLResponse("<p>This review needs its access token: open the address with ?token=...</p>", 401)
        session_id, session = found
        state.refresh()
        first = next_json(state, session["reviewer"], rules)
        boot = {"item": first, "classes": classes, "reviewer": session["reviewer"], "stage": stage}
        html = page_template().replace("__CSRF__", session["csrf"]).replace("__BOOT__", script_json(boot))
        return with_cookies(HTMLResponse(html), request, session_id, session)

    def guarded(handler: Callable[..., Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        """The access token (and, for changes, the CSRF token) checked; the handler gets the session."""

        async def endpoint(request: Request) -> Response:
            found = checked(request)
            if isinstance(found, JSONResponse):
                return found
            return await handler(request, *found)

        return endpoint

    def answer_next(request: Request, session_id: str, session: dict[str, str]) -> Response:
        return with_cookies(JSONResponse(next_json(state, session["reviewer"], rules)), request, session_id, session)

    @guarded
    async def next_item(request: Request, session_id: str, session: dict[str, str]) -> Response:
        state.refresh()
        return answer_next(request, session_id, session)

    @guarded
    async def decide(request: Request, session_id: str, session: dict[str, str]) -> Response:
        try:
            body = await json_body(request)
            decision = checked_decision(body, rules)
        except BadRequest as problem:
            return refused(problem.status, str(problem))
        try:
            state.decide(session["reviewer"], *decision)
        except SkinvlmError as problem:
            return refused(409, str(problem))
        return answer_next(request, session_id, session)

    @guarded
    async def undo(request: Request, session_id: str, session: dict[str, str]) -> Response:
        try:
            item = undo_last(state, session["reviewer"])
        except SkinvlmError as problem:
            return refused(409, str(problem))
        shown = JSONResponse(item_json(state, item, rules))
        return with_cookies(shown, request, session_id, session)

    @guarded
    async def set_reviewer(request: Request, session_id: str, session: dict[str, str]) -> Response:
        try:
            name = (await json_body(request)).get("reviewer", "")
        except BadRequest as problem:
            return refused(problem.status, str(problem))
        name = name.strip() if isinstance(name, str) else ""
        if not 0 < len(name) <= 100:
            return refused(400, "a reviewer needs a name of 1-100 characters")
        session["reviewer"] = name
        return answer_next(request, session_id, session)

    @guarded
    async def image(request: Request, *_: Any) -> Response:
        item = state.items.get(request.path_params["record_id"])
        if item is None:
            return refused(404, "no such record")
        data = images[item.split][item.index]["image"]["bytes"]
        return Response(data, media_type=image_type(data), headers={"Cache-Control": "private, max-age=3600"})

    @guarded
    async def font(request: Request, *_: Any) -> Response:
        woff = every_hangul_woff()
        if woff is None:
            return refused(404, "no Hangul font installed here")
        return Response(woff, media_type="font/woff", headers={"Cache-Control": "max-age=86400"})

    @guarded
    async def summary(request: Request, *_: Any) -> Response:
        state.refresh()
        return JSONResponse(report(state, resamples=200))

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/api/next", next_item),
            Route("/api/decide", decide, methods=["POST"]),
            Route("/api/undo", undo, methods=["POST"]),
            Route("/api/reviewer", set_reviewer, methods=["POST"]),
            Route("/api/report", summary),
            Route("/image/{record_id:str}", image),
            Route("/font/hangul.woff", font),
        ]
    )
    return HostCheck(app, local_names(bind), any_address=bind in WILDCARDS)


def script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no '</script>' or '<!--' can end it early."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def serve(
    ws: Workspace,
    rules: Rules,
    state: ReviewState,
    stage: str,
    *,
    host: str,
    port: int,
    reviewer: str | None,
    token: str | None,
    say: Callable[[str], None],
) -> None:
    """Serve the page until Ctrl-C or SIGTERM (every decision is on disk already when the page moves on)."""
    check_host(host, token)
    try:
        import uvicorn
    except ImportError:
        raise SkinvlmError(f"skinvlm review needs the review extra: {install_hint('review')}") from None
    if not 0 < port < 65536:
        raise SkinvlmError(f"--port must be 1-65535, not {port}")
    from datasets import Image, load_from_disk

    ingested = load_from_disk(str(ws.require("ingested")))
    images = {split: ds.cast_column("image", Image(decode=False)) for split, ds in ingested.items()}
    name = reviewer or os.environ.get("USER") or "reviewer"
    app = create_app(state, images, rules, Sessions(name, review_key(ws)), token, stage, host)
    shown = progress(state)
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}/" + ("?token=<your token>" if token else "")
    say(f"review of {stage}: {where} (reviewer {name}; {shown['reviewed']:,} of {shown['records']:,} records "
        "reviewed; Ctrl-C stops)")  # fmt: skip
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn's way of saying it could not bind
        raise SkinvlmError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)") from None


def check_host(host: str, token: str | None) -> None:
    if host not in LOOPBACK and not token:
        raise SkinvlmError(f"--host {host} opens the review to the network: set --token (or SKINVLM_REVIEW_TOKEN) too")
