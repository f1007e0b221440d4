"""`skinvlm ui` served for real (a child process on 127.0.0.1) over a described workspace and the tiny model: the
Host check and CSRF over HTTP; then in Chromium, a training job started from the form whose step counter and chart
advance without a reload, stopped with a checkpoint kept; an eval run's macro F1 and confusion matrix; and every
request the page makes stays on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from conftest import CHROMIUM, error_line, free_port, run_cli

from skinvlm.demo.pipeline import TINY_RECIPE
from skinvlm.web.security import BadRequest
from skinvlm.web.ui import FIELDS, SWITCHES, job_argv, job_forms


@contextlib.contextmanager
def serving(workspace: Path) -> Iterator[str]:
    """`skinvlm ui` on a free port of 127.0.0.1 until the block ends; its address."""
    port = free_port()
    command = [sys.executable, "-m", "skinvlm", "ui", "-w", str(workspace), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not answers(url):
        assert time.time() < deadline and server.poll() is None, server.stderr.read() if server.poll() else ""
        time.sleep(0.2)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def answers(url: str) -> bool:
    try:
        return status_of(url, "/api/jobs") == 200
    except OSError:  # not listening yet
        return False


@pytest.fixture
def ui(described: Path) -> Iterator[str]:
    with serving(described) as url:
        yield url
    from skinvlm.web import jobs
    from skinvlm.workspace import Workspace

    for job in jobs.list_jobs(Workspace.open(described)):  # a test that failed midway leaves no job running
        if job.status == "running":
            jobs.stop(Workspace.open(described), job.id)


class Browser:
    """A page's session over HTTP: its cookie and CSRF token, as the page's script sends them."""

    def __init__(self, url: str) -> None:
        self.url, self.opener = url, urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        page = self.opener.open(url + "/").read().decode()
        self.csrf = page.split('<meta name="csrf" content="')[1].split('"')[0]

    def get(self, path: str) -> object:
        return json.loads(self.opener.open(self.url + path).read())

    def post(self, path: str, body: dict) -> object:
        headers = {"Content-Type": "application/json", "X-CSRF-Token": self.csrf}
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), headers=headers)
        return json.loads(self.opener.open(request).read())


def wait_until(condition, seconds: float) -> None:  # the page's CSP refuses the string-evaluated waits of Playwright
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.3)


def status_of(url: str, path: str = "/", host: str | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url + path, data=data, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_ui_answers_only_this_machine_and_changes_nothing_without_its_csrf_token(ui: str) -> None:
    port = ui.rsplit(":", 1)[1]
    for path in ("/", "/api/overview", "/api/jobs"):
        assert status_of(ui, path, host=f"evil.example:{port}") == 421
        assert status_of(ui, path, host=f"127.0.0.1.evil.example:{port}") == 421
        assert status_of(ui, path) == 200
    assert status_of(ui, "/api/jobs", host="evil.example", data=b'{"command": "fix"}') == 421
    assert status_of(ui, "/api/jobs", data=b'{"command": "fix"}') == 403, "no CSRF token: nothing starts"
    with urllib.request.urlopen(ui + "/", timeout=10) as response:
        csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    # The review tab: the clinicians' page under /review/, its requests relative to it.
    assert status_of(ui, "/review/", host=f"evil.example:{port}") == 421
    review = Browser(ui + "/review")
    first = review.get("/api/next")
    assert isinstance(first, dict) and first["id"], first
    assert status_of(ui, f"/review/image/{first['id']}") == 200


def test_the_review_tab_comes_once_the_photos_are_described_and_shares_the_pages_policy(cli, ingested: Path) -> None:
    with serving(ingested) as url:
        assert status_of(url, "/review/") == 404
        overview = Browser(url).get("/api/overview")
        assert isinstance(overview, dict) and "describe" in overview["review"], overview
        cli("describe", "--template")  # as a job from the page would: no restart of the ui
        assert status_of(url, "/review/") == 200
        first = Browser(url + "/review").get("/api/next")
        assert isinstance(first, dict) and first["id"] and first["same_patient"] == [], "patients unknown here"
        policies = set()
        for path in ("/", "/review/", "/static/skinvlm.css", "/review/static/review.js"):
            with urllib.request.urlopen(url + path, timeout=10) as response:
                policies.add(response.headers["Content-Security-Policy"])
        assert len(policies) == 1 and "'unsafe-inline'" not in policies.pop(), "one policy, no inline code"
        assert status_of(url, "/static/review.html") == 404, "only the listed files are served"


def test_a_job_is_the_cli_command_one_at_a_time_and_outlives_the_ui(described: Path) -> None:
    with serving(described) as url:
        browser = Browser(url)
        job = browser.post("/api/jobs", {"command": "audit", "fields": {}})
        assert isinstance(job, dict) and job["command"].startswith("skinvlm audit") and job["status"] == "running"
        with pytest.raises(urllib.error.HTTPError) as second:
            browser.post("/api/jobs", {"command": "fix", "fields": {}})
        assert second.value.code == 409 and "one job at a time" in json.loads(second.value.read())["error"]
        wait_until(lambda: browser.get("/api/jobs")[0]["status"] != "running", 120)  # type: ignore[index]
    with serving(described) as again:  # a new ui: the job and how it ended are still there
        shown = Browser(again).get("/api/jobs")
        assert isinstance(shown, list) and [j["status"] for j in shown] == ["finished"] and shown[0]["returncode"] == 0
        log = Browser(again).opener.open(f"{again}/api/jobs/{shown[0]['id']}/log").read().decode()
        assert "audit" in log.lower()
        overview = Browser(again).get("/api/overview")
        assert isinstance(overview, dict) and overview["next"] == "train", "described and fixed: training is next"


def test_every_job_form_is_built_from_its_commands_own_flags() -> None:
    """One source: the page's fields are what `skinvlm COMMAND --help` declares (a second copy in ui.js once
    dropped train's --backend and eval's --model)."""
    from typer.testing import CliRunner

    from skinvlm.cli import app

    for command, fields in job_forms(app).items():
        shown = " ".join(CliRunner().invoke(app, [command, "--help"], terminal_width=200).stdout.split())
        assert [f["name"] for f in fields] == [*FIELDS[command], *SWITCHES.get(command, {})]
        for field in fields:
            assert f"--{field['name']}" in shown, (command, field)
            if field["kind"] == "choice":
                assert f"--{field['name']} <{'|'.join(field['choices'])}>" in shown
            if field.get("default") is not None:
                assert re.search(rf"\[default: {re.escape(field['default'])}[];]", shown), (command, field)
    assert {f["name"] for f in job_forms(app)["train"]} >= {"backend", "model"}


def test_a_form_becomes_the_cli_command_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    assert job_argv("train", {"max-steps": "20", "method": "grpo", "from": "models/adapter"}, root) == [
        "train", "--max-steps", "20", "--method", "grpo", "--from", str(root / "models" / "adapter"),
    ]  # fmt: skip
    assert job_argv("eval", {"confusion-matrix": True, "name": "a"}, root) == [
        "eval", "--confusion-matrix", "--name", "a",
    ]  # fmt: skip
    for command, fields, message in (
        ("rm", {}, "a job is one of"),
        ("train", {"resume": "1"}, "takes no field 'resume'"),
        ("train", {"output": "--gpu"}, "not a flag"),
    ):
        with pytest.raises(BadRequest, match=message):
            job_argv(command, fields, root)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium (or set SKINVLM_CHROMIUM)")
def test_train_from_the_page_watch_it_live_stop_it_and_read_an_eval_run(ui: str, described: Path, tiny: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    recipe = TINY_RECIPE | {"max_steps": 3000, "save_steps": 1000, "eval_rows": 8, "eval_steps": 5}
    (described / "run.toml").write_text("[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in recipe.items()))
    scored = run_cli("eval", "-w", described, "--model-dir", tiny, "--name", "base", "--limit", "12",
                     "--labels-only", "--confusion-matrix")  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    again = run_cli("eval", "-w", described, "--model-dir", tiny, "--name", "again", "--limit", "12", "--labels-only")
    assert again.returncode == 0, again.stderr
    metrics = json.loads((described / "eval" / "base" / "metrics.json").read_text())
    requests: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("request", lambda request: requests.append(request.url))
        page.goto(ui + "/")
        page.click('button[data-tab="jobs"]')
        page.select_option('#job-form select[name="command"]', "train")
        page.fill('#job-fields input[name="model"]', str(tiny))
        page.fill('#job-fields input[name="config"]', str(described / "run.toml"))
        page.click("#start")
        page.wait_for_selector("#job-list button.stop", timeout=30_000)
        page.click('button[data-tab="training"]')
        wait_until(lambda: (page.text_content("#step") or "").startswith("step "), 120)
        seen = []
        deadline = time.time() + 180
        while len(set(seen)) < 3:  # the counter moves on by itself: no reload
            assert time.time() < deadline, seen
            seen.append(page.text_content("#step"))
            time.sleep(1)
        points = page.eval_on_selector("#chart polyline.curve", "line => line.points.numberOfItems")
        page.wait_for_selector("#chart circle.f1", timeout=120_000)  # held-out macro F1 at an evaluation
        assert points > 1 and page.evaluate("() => performance.getEntriesByType('navigation').length") == 1
        page.click('button[data-tab="jobs"]')
        page.click("#job-list button.stop")
        wait_until(
            lambda: any(td.text_content().startswith("stopped") for td in page.query_selector_all("#job-list td")), 120
        )
        page.click('button[data-tab="overview"]')
        page.click('button[data-stage="eval/again"]')  # a stage of the overview opens its page
        wait_until(lambda: page.is_visible("#eval-detail h3") and page.text_content("#eval-detail h3") == "again", 30)
        page.click('#eval-list button[data-run="base"]')
        wait_until(lambda: page.text_content("#eval-detail h3") == "base", 30)
        assert page.text_content("#detail-macro-f1") == f"{metrics['macro_f1']:.4f}", "as metrics.json has it"
        assert page.eval_on_selector("img.confusion_matrix", "img => img.complete && img.naturalWidth") > 0
        page.select_option("#first", "base")
        page.select_option("#second", "again")
        page.click("#compare")
        wait_until(lambda: "McNemar" in (page.text_content("#compared") or ""), 60)  # the paired test
        browser.close()
    assert list((described / "models" / "adapter" / "checkpoints").glob("checkpoint-*")), "Stop kept a checkpoint"
    jobs = [json.loads(p.read_text()) for p in (described / "jobs").glob("*.json")]
    assert [job["status"] for job in jobs] == ["stopped"] and jobs[0]["argv"][0] == "train"
    outside = [url for url in requests if not url.startswith(ui + "/")]
    assert not outside, f"the page fetched from elsewhere: {outside}"


def test_a_damaged_eval_run_is_one_line_everywhere_it_is_read(cli, ingested: Path) -> None:
    """One policy (Workspace.read_eval): the ui lists it as damaged beside the others, a command names it."""
    from skinvlm.web.ui import eval_run, eval_runs
    from skinvlm.workspace import Workspace

    (ingested / "eval" / "broken").mkdir(parents=True)
    (ingested / "eval" / "broken" / "metrics.json").write_text('{"accuracy": 0.9', encoding="utf-8")
    ws = Workspace.open(ingested)
    listed = eval_runs(ws)
    assert [r["name"] for r in listed] == ["broken"] and "metrics.json is damaged (not valid JSON" in listed[0][
        "damaged"
    ]
    with pytest.raises(BadRequest) as refused:
        eval_run(ws, "broken")
    assert refused.value.status == 409 and "metrics.json is damaged" in str(refused.value)
    for command in (("review", "--model-answers", "eval/broken"), ("eval", "--compare", "broken", "broken")):
        done = cli(*command, ok=False)
        assert done.exit_code == 1 and "metrics.json is damaged (not valid JSON" in error_line(done.stderr), command
