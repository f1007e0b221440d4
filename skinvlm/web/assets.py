"""The files both local pages load: one stylesheet, one script helper, each page's own script, and the Hangul font,
served by skinvlm itself (nothing from a CDN), so one Content-Security-Policy (`security.CSP`) covers every page.

Each app serves them at `static/NAME` beside its own page; its HTML links them relatively, so the review page
works alone (`skinvlm review`, at /) and as the ui's tab (/review/)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

STATIC = Path(__file__).parent / "static"
FILES = {  # the files a page may load, and their types; anything else under static/ is never served
    "skinvlm.css": "text/css; charset=utf-8",
    "skinvlm.js": "text/javascript; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
    "review.js": "text/javascript; charset=utf-8",
    "answers.js": "text/javascript; charset=utf-8",
}
FONT = "hangul.woff"


@functools.cache
def template(name: str) -> str:
    """A page's HTML (static/NAME), with its __PLACEHOLDERS__ to fill."""
    return (STATIC / name).read_text(encoding="utf-8")


@functools.cache
def every_hangul_woff() -> bytes | None:
    """Every Hangul syllable and jamo of NanumGothic, cut once per server (a second or two, on first use); None
    where the font is not installed (the stylesheet then falls back on the machine's own fonts)."""
    from skinvlm.report_html import hangul_woff

    characters = [*range(0x1100, 0x1200), *range(0x3130, 0x3190), *range(0xAC00, 0xD7A4)]
    return hangul_woff("".join(map(chr, characters)))


def asset_route() -> Any:
    """`static/{name}`: the files above and the Hangul font. They hold nothing of the workspace, so no token is
    asked (the Host check still runs first)."""
    from starlette.responses import FileResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def asset(request: Any) -> Response:
        name = request.path_params["name"]
        if name == FONT:
            woff = every_hangul_woff()
            if woff is None:
                return PlainTextResponse("no Hangul font installed here", 404)
            return Response(woff, media_type="font/woff", headers={"Cache-Control": "max-age=86400"})
        if name not in FILES:
            return PlainTextResponse("not found", 404)
        return FileResponse(STATIC / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})

    return Route("/static/{name:str}", asset)
