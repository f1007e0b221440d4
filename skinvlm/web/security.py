"""What every local page of skinvlm needs to be safe on a clinic's machine, which every site its browser visits can
reach: the Host check (421 for a name that is not this machine's: DNS rebinding), per-browser sessions with a CSRF
token derived from a workspace secret, bounded JSON bodies, the access token off loopback, and JSON that is safe
inside a <script> element."""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from skinvlm.errors import SkinvlmError, install_hint

MAX_BODY = 64 * 1024  # a decision with the longest edited text is a few KiB; anything larger is refused unread
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
# Every page loads only skinvlm's own files (assets.py): no inline script or style, nothing from elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


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


class SecurityHeaders:
    """ASGI middleware: every response says load nothing from elsewhere (CSP, unless the route set its own),
    sniff no types, send no referrer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"content-security-policy" for name, _ in headers):
                    headers.append((b"content-security-policy", CSP.encode()))
                message["headers"] = [*headers, (b"x-content-type-options", b"nosniff"),
                                      (b"referrer-policy", b"no-referrer")]  # fmt: skip
            await send(message)

        await self.app(scope, receive, with_headers)


def guarded_app(app: Any, bind: str) -> Any:
    """A page's app as it is served: the Host check first, then the security headers on every answer."""
    return HostCheck(SecurityHeaders(app), local_names(bind), any_address=bind in WILDCARDS)


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


def refused(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


@dataclass(frozen=True)
class PageGuard:
    """What every route of every local page (the ui, the review page, the blind scoring page) passes first: the
    access token off loopback (the query's, or a cookie in `token_cookies`, the page's own first), then for a change
    the session's CSRF token, a header a cross-site form cannot send. Every answer carries the session's cookies
    and, unless the route chose its own, `Cache-Control: no-store` (a shared machine's cache keeps no patient's
    record). Bad input raised in a route (BadRequest, SkinvlmError) is a 4xx with its one line."""

    sessions: Sessions
    token: str | None
    session_cookie: str
    token_cookies: tuple[str, ...]
    reviewer_cookie: str | None = None

    def authorised(self, request: Any) -> bool:
        if self.token is None:
            return True
        given = [request.query_params.get("token")] + [request.cookies.get(name) for name in self.token_cookies]
        return any(hmac.compare_digest(found.encode(), self.token.encode()) for found in given if found)

    def checked(self, request: Any) -> tuple[str, dict[str, str]] | Any:
        """(session id, session), or the refusal to send."""
        if not self.authorised(request):
            return refused(401, "this page needs its access token: open it with ?token=...")
        reviewer = request.cookies.get(self.reviewer_cookie) if self.reviewer_cookie else None
        session_id, session = self.sessions.get(request.cookies.get(self.session_cookie), reviewer)
        if request.method == "POST" and not hmac.compare_digest(
            request.headers.get("x-csrf-token", "").encode(), session["csrf"].encode()
        ):
            return refused(403, "this page is out of date: reload it")
        return session_id, session

    def with_cookies(self, response: Any, request: Any, session_id: str, session: dict[str, str]) -> Any:
        response.set_cookie(self.session_cookie, session_id, httponly=True, samesite="strict")
        if self.reviewer_cookie:
            response.set_cookie(self.reviewer_cookie, quote(session["reviewer"]), httponly=True, samesite="strict")
        if self.token is not None and request.query_params.get("token"):
            response.set_cookie(self.token_cookies[0], self.token, httponly=True, samesite="strict")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def page(self, request: Any, html: str, boot: Callable[[dict[str, str]], Any] | None = None) -> Any:
        """A page's HTML with the session's CSRF token (and `boot(session)`, its data) filled in."""
        from starlette.responses import HTMLResponse

        found = self.checked(request)
        if not isinstance(found, tuple):
            return HTMLResponse("<p>This page needs its access token: open the address with ?token=...</p>", 401)
        session_id, session = found
        html = html.replace("__CSRF__", session["csrf"])
        if boot is not None:
            html = html.replace("__BOOT__", script_json(boot(session)))
        return self.with_cookies(HTMLResponse(html), request, session_id, session)

    def route(self, handler: Callable[..., Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """`handler(request, session)` behind the checks."""

        async def endpoint(request: Any) -> Any:
            found = self.checked(request)
            if not isinstance(found, tuple):
                return found
            try:
                response = await handler(request, found[1])
            except BadRequest as problem:
                response = refused(problem.status, str(problem))
            except SkinvlmError as problem:
                response = refused(409, str(problem))
            return self.with_cookies(response, request, *found)

        return endpoint


def script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no '</script>' or '<!--' can end it early."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def check_serving(command: str, host: str, port: int, token: str | None) -> None:
    """What a page's server needs before it starts: the token off loopback, uvicorn, a port that can be one."""
    if host not in LOOPBACK and not token:
        variable = f"SKINVLM_{command.upper()}_TOKEN"
        raise SkinvlmError(f"--host {host} opens skinvlm {command} to the network: set --token (or {variable}) too")
    if importlib.util.find_spec("uvicorn") is None:
        raise SkinvlmError(f"skinvlm {command} needs the review extra: {install_hint('review')}")
    if not 0 < port < 65536:
        raise SkinvlmError(f"--port must be 1-65535, not {port}")


def address(host: str, port: int, token: str | None) -> str:
    """The page's address as the user opens it (an IPv6 host in brackets; the token left for them to fill)."""
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}/" + ("?token=<your token>" if token else "")


def run_server(app: Any, host: str, port: int) -> None:
    """uvicorn until Ctrl-C or SIGTERM; no access log (it would print the token of a ?token= address)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning", lifespan="off")
    try:
        uvicorn.Server(config).run()
    except SystemExit:  # uvicorn's way of saying it could not bind
        raise SkinvlmError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)") from None
