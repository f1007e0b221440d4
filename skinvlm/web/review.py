"""The review page: a Starlette app over a `ReviewState`, served by uvicorn on 127.0.0.1 unless told otherwise.

Plain HTML and a little JavaScript; every string from the data (descriptions, labels, ids) reaches the page as
JSON and is put in with `textContent`, never as HTML, so a description holding `<script>` is shown as text.
Images are looked up by record id in the ingested dataset: no part of a request becomes a file path. Changes
need the session's CSRF token (a header a cross-site form cannot send); a host other than loopback needs the
access token, compared in constant time and never logged (uvicorn's access log is off: it would print it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from skinvlm.answer_review import CRITERIA, Answer, AnswerReview
from skinvlm.errors import SkinvlmError
from skinvlm.review import MAX_TEXT, Item, LabelDisagrees, ReviewState, report, undo_last
from skinvlm.rules import Rules
from skinvlm.web.assets import asset_route, template
from skinvlm.web.security import (
    BadRequest,
    PageGuard,
    Sessions,
    address,
    check_serving,
    guarded_app,
    json_body,
    refused,
    run_server,
)
from skinvlm.workspace import Workspace, secret_key

MAX_REASON = 500
SESSION_COOKIE = "skinvlm_review"
REVIEWER_COOKIE = "skinvlm_reviewer"
TOKEN_COOKIE = "skinvlm_review_token"
TOKEN_COOKIES = (TOKEN_COOKIE, "skinvlm_ui_token")  # its own, and the ui's (ui.TOKEN_COOKIE)


def review_key(ws: Workspace) -> bytes:
    """The workspace's secret for CSRF tokens (`workspace.secret_key`)."""
    return secret_key(ws.review_key)


def item_json(state: ReviewState, item: Item | None, rules: Rules, reviewer: str) -> dict[str, Any]:
    if item is None:
        return {"done": True, "progress": progress(state)}
    blind = state.blind_for(reviewer, item.id)
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
        "status": BLIND if blind else state.outcome(item.id).status,
        "same_patient": [other_photo_json(state, other, rules, reviewer) for other in state.same_patient(item.id)],
        "progress": progress(state),
    }


BLIND = "second read: earlier outcomes hidden / 두 번째 판독 (앞의 판정 가림)"


def other_photo_json(state: ReviewState, other: Item, rules: Rules, reviewer: str) -> dict[str, Any]:
    """A photo of the same patient, shown beside the one under review with its label and status as they stand (as
    the folder has them, on a blind read of that photo)."""
    standing = state.outcome(other.id)
    label, status = (other.label, BLIND) if state.blind_for(reviewer, other.id) else (standing.label, standing.status)
    return {"id": other.id, "view": other.view, "split": other.split, "label": label,
            "english": rules.english(label), "status": status}  # fmt: skip


def progress(state: ReviewState) -> dict[str, int]:
    reviewed = sum(1 for record_id in state.items if state.decisions.get(record_id))
    return {"reviewed": reviewed, "records": len(state.items), "skipped_lines": state.skipped}


def image_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    return "image/jpeg" if data.startswith(b"\xff\xd8") else "application/octet-stream"


def photo(images: dict[str, Any], split: str, index: int) -> Any:
    """A photo's stored bytes as they are, by its split and row (no part of a request becomes a path)."""
    from starlette.responses import Response

    data = images[split][index]["image"]["bytes"]
    return Response(data, media_type=image_type(data), headers={"Cache-Control": "private, max-age=3600"})


def next_json(state: ReviewState, reviewer: str, rules: Rules) -> dict[str, Any]:
    return item_json(state, state.next_for(reviewer), rules, reviewer)


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
    return record_id, version, decision, label, text if decision == "edit" else None, reason


def page_guard(sessions: Sessions, token: str | None) -> PageGuard:
    """The review pages' guard: as the ui's tab, the ui's token cookie is the one the browser holds, so it counts."""
    return PageGuard(sessions, token, SESSION_COOKIE, TOKEN_COOKIES, REVIEWER_COOKIE)


def reviewer_route(guard: PageGuard, shown_next: Callable[[dict[str, str]], Any]) -> Any:
    """POST /api/reviewer of either page: the session's reviewer renamed, and what that reviewer is offered next."""

    @guard.route
    async def set_reviewer(request: Any, session: dict[str, str]) -> Any:
        session["reviewer"] = reviewer_name(await json_body(request))
        return shown_next(session)

    return set_reviewer


def reviewer_name(body: dict[str, Any]) -> str:
    name = body.get("reviewer", "")
    name = name.strip() if isinstance(name, str) else ""
    if not 0 < len(name) <= 100:
        raise BadRequest(400, "a reviewer needs a name of 1-100 characters")
    return name


def create_app(state: ReviewState, images: Any, rules: Rules, sessions: Sessions, token: str | None, stage: str) -> Any:
    """`images`: split -> the ingested dataset with undecoded images (raw stored bytes by row). The app without
    its Host check and headers (`security.guarded_app`), which whoever serves it adds once."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    classes = [{"name": c.name, "english": c.english} for c in rules.classes]
    guard = page_guard(sessions, token)

    def boot(session: dict[str, str]) -> dict[str, Any]:
        first = next_json(state, session["reviewer"], rules)
        return {"item": first, "classes": classes, "reviewer": session["reviewer"], "stage": stage}

    async def page(request: Request) -> Response:
        state.refresh()
        return guard.page(request, template("review.html"), boot)

    def shown_next(session: dict[str, str]) -> Response:
        return JSONResponse(next_json(state, session["reviewer"], rules))

    @guard.route
    async def next_item(request: Request, session: dict[str, str]) -> Response:
        state.refresh()
        return shown_next(session)

    @guard.route
    async def decide(request: Request, session: dict[str, str]) -> Response:
        decision = checked_decision(await json_body(request), rules)
        try:
            state.decide(session["reviewer"], *decision)
        except LabelDisagrees as problem:
            return refused(422, str(problem))
        return shown_next(session)

    @guard.route
    async def undo(request: Request, session: dict[str, str]) -> Response:
        item = undo_last(state, session["reviewer"])
        return JSONResponse(item_json(state, item, rules, session["reviewer"]))

    set_reviewer = reviewer_route(guard, shown_next)

    @guard.route
    async def image(request: Request, _: dict[str, str]) -> Response:
        item = state.items.get(request.path_params["record_id"])
        if item is None:
            return refused(404, "no such record")
        return photo(images, item.split, item.index)

    @guard.route
    async def summary(request: Request, _: dict[str, str]) -> Response:
        state.refresh()
        return JSONResponse(report(state, resamples=200))

    return Starlette(
        routes=[
            Route("/", page),
            asset_route(),
            Route("/api/next", next_item),
            Route("/api/decide", decide, methods=["POST"]),
            Route("/api/undo", undo, methods=["POST"]),
            Route("/api/reviewer", set_reviewer, methods=["POST"]),
            Route("/api/report", summary),
            Route("/image/{record_id:str}", image),
        ]
    )


def review_app(ws: Workspace, rules: Rules, state: ReviewState, stage: str, reviewer: str, token: str | None) -> Any:
    """The review page over the workspace's photos: `review` serves it alone, `ui` under /review/ (the page's own
    requests are relative, so it works at either place)."""
    return create_app(state, undecoded_images(ws), rules, Sessions(reviewer, review_key(ws)), token, stage)


def undecoded_images(ws: Workspace) -> dict[str, Any]:
    """Split -> the ingested dataset with its images as stored bytes, looked up by row."""
    from datasets import Image, load_from_disk

    ingested = load_from_disk(str(ws.require("ingested")))
    return {split: ds.cast_column("image", Image(decode=False)) for split, ds in ingested.items()}


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
    check_serving("review", host, port, token)
    name = reviewer or os.environ.get("USER") or "reviewer"
    app = guarded_app(review_app(ws, rules, state, stage, name, token), host)
    shown = progress(state)
    say(f"review of {stage}: {address(host, port, token)} (reviewer {name}; {shown['reviewed']:,} of "
        f"{shown['records']:,} records reviewed; Ctrl-C stops)")  # fmt: skip
    run_server(app, host, port)


def answer_json(state: AnswerReview, answer: Answer | None, rules: Rules, reviewer: str) -> dict[str, Any]:
    """What the page shows of an answer: the photo's key, true label and view and the answer's text; never its
    run."""
    shown = {"scored": state.scored_by(reviewer), "answers": len(state.answers), "skipped_lines": state.skipped}
    if answer is None:
        return {"done": True, "progress": shown}
    return {"done": False, "key": answer.key, "label": answer.label, "english": rules.english(answer.label),
            "view": answer.view, "text": answer.text, "progress": shown}  # fmt: skip


def checked_score(body: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    key, scores, comment = body.get("key"), body.get("scores"), body.get("comment") or ""
    if not (isinstance(key, str) and isinstance(scores, dict) and isinstance(comment, str)):
        raise BadRequest(400, "a score is a JSON object with key, scores and an optional comment")
    return key, scores, comment


def create_answers_app(state: AnswerReview, images: Any, rules: Rules, sessions: Sessions, token: str | None) -> Any:
    """The blind scoring page of `review --model-answers` (answers.html), behind the review page's own guard."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    guard = page_guard(sessions, token)

    def shown_next(session: dict[str, str]) -> Response:
        return JSONResponse(answer_json(state, state.next_for(session["reviewer"]), rules, session["reviewer"]))

    def boot(session: dict[str, str]) -> dict[str, Any]:
        first = answer_json(state, state.next_for(session["reviewer"]), rules, session["reviewer"])
        return {"item": first, "criteria": list(CRITERIA), "reviewer": session["reviewer"]}

    async def page(request: Request) -> Response:
        state.refresh()
        return guard.page(request, template("answers.html"), boot)

    @guard.route
    async def fresh(request: Request, session: dict[str, str]) -> Response:
        state.refresh()
        return shown_next(session)

    @guard.route
    async def score(request: Request, session: dict[str, str]) -> Response:
        try:
            state.score(session["reviewer"], *checked_score(await json_body(request)))
        except SkinvlmError as problem:
            return refused(422, str(problem))
        return shown_next(session)

    set_reviewer = reviewer_route(guard, shown_next)

    @guard.route
    async def image(request: Request, _: dict[str, str]) -> Response:
        answer = state.by_key.get(request.path_params["key"])
        if answer is None:
            return refused(404, "no such answer")
        return photo(images, answer.split, answer.index)

    return Starlette(
        routes=[
            Route("/", page),
            asset_route(),
            Route("/api/next", fresh),
            Route("/api/score", score, methods=["POST"]),
            Route("/api/reviewer", set_reviewer, methods=["POST"]),
            Route("/image/{key:str}", image),
        ]
    )


def serve_answers(
    ws: Workspace, rules: Rules, state: AnswerReview, *, host: str, port: int, reviewer: str | None,
    token: str | None, say: Callable[[str], None],
) -> None:  # fmt: skip
    """Serve the blind scoring page until Ctrl-C or SIGTERM (every score is on disk when the page moves on)."""
    check_serving("review", host, port, token)
    name = reviewer or os.environ.get("USER") or "reviewer"
    app = create_answers_app(state, undecoded_images(ws), rules, Sessions(name, review_key(ws)), token)
    runs = len({a.run for a in state.answers})
    say(f"blind scoring of {len(state.answers):,} model answers from {runs} eval run(s): {address(host, port, token)} "
        f"(reviewer {name}; {state.scored_by(name):,} scored; Ctrl-C stops)")  # fmt: skip
    run_server(guarded_app(app, host), host, port)
