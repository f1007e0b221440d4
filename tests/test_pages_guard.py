"""Every local page passes one guard (`security.PageGuard` behind `security.guarded_app`): the ui, the review page
and the blind scoring page, each its real server in its own process, refuse a foreign Host before any route,
refuse a change without the session's CSRF token, and answer with the same policy and no-store headers."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_review import Server
from test_ui import serving, status_of

from skinvlm.report_html import SCRIPT
from skinvlm.testing.openai_server import FakeOpenAI

pytest.importorskip("uvicorn", reason="the review extra is not installed (pip install -e '.[review]')")

PAGES = {  # the page, how it is started, a JSON route it answers and a change it accepts only with the token
    "ui": ((), "/api/overview", "/api/jobs"),
    "review": ((), "/api/next", "/api/decide"),
    "model answers": (("--model-answers", "eval/first"), "/api/next", "/api/score"),
}


@contextlib.contextmanager
def page(name: str, workspace: Path) -> Iterator[str]:
    if name == "ui":
        with serving(workspace) as url:
            yield url
        return
    with Server(workspace, *PAGES[name][0]) as server:
        yield server.url


@pytest.mark.parametrize("name", list(PAGES))
def test_every_page_passes_one_guard(name: str, cli, described: Path) -> None:
    with FakeOpenAI(answer=lambda body: "<label>정상</label>\n<summary>특이 소견이 없습니다.</summary>") as api:
        cli("eval", "--base-url", api.url, "--api-key", "sk-x", "--no-probabilities", "--name", "first")
    _, read, change = PAGES[name]
    with page(name, described) as url:
        port = url.rsplit(":", 1)[1]
        for path in ("/", read):
            assert status_of(url, path, host=f"evil.example:{port}") == 421, path
            assert status_of(url, path, host=f"127.0.0.1.evil.example:{port}") == 421, path
        assert status_of(url, change, host="evil.example", data=b"{}") == 421
        assert status_of(url, change, data=b"{}") == 403, "no CSRF token: no change"
        for path in ("/", read):
            with urllib.request.urlopen(url + path, timeout=10) as response:
                headers = response.headers
            assert headers["Cache-Control"] == "no-store", (path, headers["Cache-Control"])
            assert (
                "default-src 'none'" in headers["Content-Security-Policy"]
                and "frame-ancestors 'none'" in (headers["Content-Security-Policy"])
            )
            assert headers["X-Content-Type-Options"] == "nosniff" and headers["Referrer-Policy"] == "no-referrer"
            assert (
                "httponly" in (headers["Set-Cookie"] or "").lower()
                and "samesite=strict" in headers["Set-Cookie"].lower()
            )


def test_report_html_through_the_ui_runs_skinvlms_script_only(cli, described: Path) -> None:
    """A script in a report.html that is not skinvlm's own (a description that slipped past an escape) gets no
    hash in the policy, so the browser would not run it; skinvlm's own script's hash is the only one."""
    with FakeOpenAI(answer=lambda body: "<label>정상</label>\n<summary>특이 소견이 없습니다.</summary>") as api:
        cli("eval", "--base-url", api.url, "--api-key", "sk-x", "--no-probabilities", "--name", "first")
    report = described / "eval" / "first" / "report.html"
    planted = "<script>window.pwned = 1</script>"
    report.write_text(report.read_text(encoding="utf-8").replace("<body>", "<body>" + planted, 1), encoding="utf-8")
    own = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    with serving(described) as url, urllib.request.urlopen(url + "/eval/first/report.html", timeout=10) as response:
        assert planted in response.read().decode()
        policy = response.headers["Content-Security-Policy"]
    assert re.findall(r"'sha256-([^']+)'", policy) == [own] and "unsafe-inline'; img" in policy
    assert "script-src 'sha256-" in policy and "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
