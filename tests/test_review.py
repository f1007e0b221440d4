"""`skinvlm review`: the real server in its own process, driven over HTTP and in Chromium (Playwright); its
decisions in the journal, the report's agreement figures, and fix and train honouring them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from conftest import CHROMIUM, error_line, free_port

pytest.importorskip("starlette", reason="the review extra is not installed (pip install -e '.[review]')")
pytest.importorskip("uvicorn", reason="the review extra is not installed (pip install -e '.[review]')")


class Server:
    """`skinvlm review` in its own process group, on a free port; `url` once it answers."""

    def __init__(self, workspace: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "skinvlm", "review", "-w", str(workspace), "--port", str(self.port), *args]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
            start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"review did not start: {self.process.communicate()[1].decode()}") from None
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        os.killpg(self.process.pid, sig)
        _, err = self.process.communicate(timeout=30)
        return self.process.returncode, err.decode()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.stop(signal.SIGKILL)


class Browserless:
    """A reviewer's session over plain HTTP: the page's cookie and CSRF token, then the JSON API."""

    def __init__(self, url: str, query: str = "") -> None:
        self.url = url
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        page = self.opener.open(f"{url}/{query}").read().decode()
        self.csrf = page.split('<meta name="csrf" content="')[1].split('"')[0]
        self.item = json.loads(page.split('<script id="boot" type="application/json">')[1].split("</script>")[0])[
            "item"
        ]

    def post(self, path: str, body: dict, csrf: str | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-CSRF-Token": self.csrf if csrf is None else csrf},
        )
        try:
            with self.opener.open(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def decide(self, decision: str, label: str | None = None, text: str | None = None, reason: str = "") -> dict:
        body = {"id": self.item["id"], "version": self.item["version"], "decision": decision,
                "label": label or self.item["label"], "text": text, "reason": reason}  # fmt: skip
        status, answer = self.post("/api/decide", body)
        assert status == 200, answer
        self.item = answer
        return answer

    def fresh(self) -> None:
        with self.opener.open(f"{self.url}/api/next") as response:
            self.item = json.loads(response.read())

    def name(self, reviewer: str) -> None:
        status, answer = self.post("/api/reviewer", {"reviewer": reviewer})
        assert status == 200, answer
        self.item = answer


def journal(workspace: Path) -> list[dict]:
    path = workspace / "journal" / "review.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


@pytest.fixture
def reviewable(cli, ingested: Path) -> Path:
    cli("describe", "--template")
    cli("fix")
    return ingested


def test_decisions_are_journalled_survive_kill_9_and_conflicts_are_refused(cli, reviewable: Path) -> None:
    with Server(reviewable, "--reviewer", "kim") as server:
        first, second = Browserless(server.url), Browserless(server.url)
        assert first.item["id"] == second.item["id"], "both are shown the same record"
        first.decide("accept")
        status, answer = second.post(
            "/api/decide",
            {
                "id": second.item["id"],
                "version": second.item["version"],
                "decision": "reject",
                "label": second.item["label"],
                "reason": "blurred",
            },  # fmt: skip
        )
        assert status == 409 and "decided by kim since it was shown" in answer["error"], "never overwritten"
        edited = "<label>건선</label>\n<summary>수정한 소견입니다. 경계가 분명한 판.</summary>"
        first.decide("edit", "건선", text=edited)
        first.decide("reject", reason="사진이 흐림")
        first.name("이수진")
        code, err = server.stop(signal.SIGKILL)
    assert [d["decision"] for d in journal(reviewable)] == ["accept", "edit", "reject"]
    assert journal(reviewable)[2]["reason"] == "사진이 흐림" and journal(reviewable)[0]["sha256"]
    with Server(reviewable, "--reviewer", "kim") as server:
        again = Browserless(server.url)
        decided = {d["id"] for d in journal(reviewable)}
        assert again.item["id"] not in decided and again.item["progress"]["reviewed"] == 3, "nothing lost"
        first.url = server.url  # the page opened before the kill -9: its cookies and CSRF token as they were
        first.fresh()
        first.decide("accept")
        assert journal(reviewable)[-1]["reviewer"] == "이수진", "the page outlives the restart, its name too"
        assert (reviewable / "journal" / "review.key").stat().st_mode & 0o077 == 0, "the owner's only"
        assert Browserless(server.url).post("/api/decide", {"id": "x"}, csrf="forged")[0] == 403
        code, err = server.stop(signal.SIGTERM)
    assert code == 143 and err.strip().splitlines()[-1].startswith("interrupted by SIGTERM"), err
    (reviewable / "journal" / "review.key").write_bytes(b"cut short")
    damaged = cli("review", ok=False)
    assert damaged.exit_code == 1 and "journal/review.key is damaged: delete it" in damaged.stderr


def test_the_network_needs_a_token_and_nothing_leads_outside_the_records(cli, reviewable: Path) -> None:
    refused = cli("review", "--host", "0.0.0.0", ok=False)
    assert refused.exit_code == 1 and "--token" in refused.stderr
    token = "review-token-0123456789"
    with Server(reviewable, env={"SKINVLM_REVIEW_TOKEN": token}) as server:
        for path in ("/", "/api/next", f"/image/{'x'}"):
            try:
                urllib.request.urlopen(server.url + path)
                raise AssertionError(f"{path} answered without the token")
            except urllib.error.HTTPError as err:
                assert err.code == 401
        session = Browserless(server.url, f"?token={token}")
        for probe in ("/image/..%2F..%2Fmanifest.json", "/image/../../etc/passwd", "/image/%2Fetc%2Fpasswd"):
            try:
                session.opener.open(server.url + probe)
                raise AssertionError(f"{probe} answered")
            except urllib.error.HTTPError as err:
                assert err.code == 404, probe
        photo = session.opener.open(f"{server.url}/image/{session.item['id']}")
        assert photo.headers["Content-Type"] in ("image/png", "image/jpeg")
        _, err = server.stop()
    assert token not in err
    with Server(reviewable, "--host", "0.0.0.0", env={"SKINVLM_REVIEW_TOKEN": token}) as lan:
        assert raw_request(lan.url, "GET", "/", f"192.168.7.31:{lan.port}")[0] == 401, "an address: the token decides"
        assert raw_request(lan.url, "GET", "/", f"rebind.example:{lan.port}")[0] == 421, "a foreign name: refused"
        lan.stop()


def test_two_reviewers_with_overlap_give_the_expected_kappa(cli, reviewable: Path) -> None:
    empty = cli("review", "--report").stdout
    assert empty == "review: 48 records, no decision yet (`skinvlm review` opens the page)\n"
    with Server(reviewable, "--overlap", "1", "--reviewer", "kim") as server:
        kim, lee = Browserless(server.url), Browserless(server.url)
        lee.name("lee")
        # kim decides 8 records; lee then reviews the same 8 (offered before new ones): disagreeing on 2.
        for n in range(8):
            kim.decide("reject" if n in (0, 1, 2) else "accept")
        lee_ids = []
        lee.fresh()  # what lee was shown before kim decided is out of date
        for n in range(8):
            lee_ids.append(lee.item["id"])
            lee.decide("reject" if n in (0, 3) else "accept")
        server.stop()
    assert set(lee_ids) == {d["id"] for d in journal(reviewable) if d["reviewer"] == "kim"}, "seconds first"
    report = cli.json("review", "--report")
    assert report["reviewers"]["kim"]["rejected"] == 3 and report["reviewers"]["lee"]["accepted"] == 6
    agreement = report["agreement"]
    # kim: R R R A A A A A; lee: R A A R A A A A -> agree on 5 of 8; chance (3*2 + 5*6) / 64
    assert agreement["items"] == 8 and agreement["method"] == "cohen"
    assert agreement["keep_or_reject"]["kappa"] == pytest.approx((5 / 8 - 36 / 64) / (1 - 36 / 64), abs=1e-4)
    low, high = agreement["keep_or_reject"]["interval"]
    assert low <= agreement["keep_or_reject"]["kappa"] <= high
    assert agreement["label"]["kappa"] == 1.0 and len(agreement["disagreements"]) == 3
    assert report["decisions"]["disputed"] == 3 and report["decisions"]["rejected"] == 1
    table = cli("review", "--report")
    assert "kim" in table.stdout and "kappa" in table.stdout


def test_fix_and_train_honour_the_decisions(cli, reviewable: Path, tiny: Path) -> None:
    with Server(reviewable, "--reviewer", "kim") as server:
        kim = Browserless(server.url)
        edited_id = kim.item["id"]
        edited = (
            "<label>여드름</label>\n<summary>구진과 면포가 양쪽 뺨에 흩어져 있고, 붉은 염증성 병변이 이마와 턱에도 "
            "보입니다.</summary>"
        )
        kim.decide("edit", label="여드름", text=edited)
        rejected_id = kim.item["id"]
        kim.decide("reject", reason="얼굴이 아님")
        accepted_id = kim.item["id"]
        kim.decide("accept")
        server.stop()
    stale = {s["name"]: s for s in cli.json("status")["stages"]}
    assert stale["fixed"]["rerun"] == ["skinvlm fix"], "decisions made after the fix"
    for command in (("train", "--dry-run", "--model", tiny, "--backend", "hf"), ("publish", "me/x", "--dry-run")):
        refused = cli(*command, ok=False)
        line = "error: clinicians made review decisions after datasets/fixed was made: run `skinvlm fix`\n"
        assert refused.exit_code == 1 and refused.stderr == line, command
    assert cli("audit", "--stage", "fixed").exit_code == 0, "audit and review itself read on"
    said = cli("fix").stdout
    assert "clinicians' review applied: accepted 1, edited 1, rejected 1;" in said and "1 texts replaced" in said
    from datasets import load_from_disk

    data = load_from_disk(str(reviewable / "datasets" / "fixed"))
    fixed = {row["id"]: row for split in data for row in data[split]}
    assert fixed[edited_id]["review"] == "edited" and fixed[edited_id]["output"] == edited
    assert fixed[edited_id]["label"] == "여드름", "a clinician's label correction wins over the folder"
    assert fixed[rejected_id]["review"] == "rejected" and fixed[accepted_id]["review"] == "accepted"
    assert sum(r["review"] == "unreviewed" for r in fixed.values()) == len(fixed) - 3
    audit = cli.json("audit", "--stage", "fixed")
    assert audit["review"] == {"unreviewed": len(fixed) - 3, "accepted": 1, "edited": 1, "rejected": 1}
    listed = {s["name"]: s for s in cli.json("status")["stages"]}
    assert listed["fixed"]["figures"].startswith("review: unreviewed") and listed["fixed"]["rerun"] == []
    cli("publish", "me/reviewed", "--dry-run")
    card = (reviewable / "publish" / "dataset" / "README.md").read_text(encoding="utf-8")
    assert f"Reviewed by clinicians in `skinvlm review`: 3 of {len(fixed)} records" in card
    summary = cli.json("train", "--dry-run", "--model", tiny, "--backend", "hf", "--max-pixels", "12544")
    assert summary["review_left_out"] == 1, "the rejected record does not teach"
    only = cli.json(
        "train", "--dry-run", "--model", tiny, "--backend", "hf", "--max-pixels", "12544", "--reviewed-only"
    )
    assert only["review_left_out"] == len(fixed) - 2 and only["rows"] == 2, "accepted and edited only"


def test_eval_scores_a_photo_against_the_label_a_clinician_corrected(cli, reviewable: Path) -> None:
    import numpy as np

    from skinvlm.demo.synthetic import colour_label
    from skinvlm.testing.openai_server import FakeOpenAI, image_of

    def by_colour(body: dict) -> str:  # every photo's folder label, read from its colour
        mean = np.asarray(image_of(body), dtype=float).reshape(-1, 3).mean(axis=0)
        return f"<label>{colour_label(tuple(mean))}</label>\n<summary>테스트 소견입니다.</summary>"

    def run_eval(api: FakeOpenAI, name: str = "held-out") -> dict:
        return cli.json("eval", "--base-url", api.url, "--api-key", "sk-x", "--name", name, "--no-probabilities")

    with FakeOpenAI(answer=by_colour) as api:  # one server: the same endpoint, so the answers are kept
        before = run_eval(api)
        run_eval(api, "earlier")  # its stored answers say the folder's labels
        assert before["accuracy"] == 1.0 and before["label_corrections"] == 0 and before["notes"] == []
        with Server(reviewable, "--reviewer", "kim") as server:
            kim = Browserless(server.url)
            while kim.item["split"] != "test":
                kim.decide("accept")
            folder = kim.item["label"]
            clinician = "주사" if folder != "주사" else "지루"
            corrected = kim.item["text"].replace(f"<label>{folder}</label>", f"<label>{clinician}</label>")
            kim.decide("edit", label=clinician, text=corrected)  # a new diagnosis: in the label and the text
            server.stop()
        after = run_eval(api)
    n = after["n"]
    assert after["from_cache"] == n and after["asked"] == 0, "the answers stand; only the truth changed"
    assert after["label_corrections"] == 1 and after["accuracy"] == pytest.approx((n - 1) / n, abs=1e-4)
    assert after["notes"] == [
        f"1 of the {n} photos are scored against the label a clinician gave in `skinvlm review`, not their folder's"
    ]
    support = {c: after["per_class"][c]["support"] - before["per_class"][c]["support"] for c in (folder, clinician)}
    assert support == {folder: -1, clinician: 1}, "the photo counts under the clinician's label"
    (pair,) = cli.json("eval", "--compare", "earlier", "--compare", "held-out")["paired"]
    assert pair["test"]["both_wrong"] == 1, "runs are paired on the true labels as they stand"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium")
def test_a_keyboard_only_session_in_chromium_with_korean_a_reject_and_a_reload(cli, reviewable: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    described = load_outputs(reviewable)
    xss_id = next(iter(described))
    plant_text(
        cli,
        reviewable,
        xss_id,
        '<label>건선</label><summary><script>window.pwned=1</script><img src=x onerror="window.pwned=2">판</summary>',
    )
    problems: list[str] = []
    with Server(reviewable, "--reviewer", "park") as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(server.url)
        for name in ("Accept", "Edit", "Reject"):
            assert page.get_by_role("button", name=name, exact=True).is_visible()
        # The planted record has an audit finding (English words): it is shown first, as text.
        assert page.evaluate("window.pwned") is None and "<script>" in page.text_content("#text")
        first = page.evaluate("item.id")
        page.keyboard.press("a")
        page.wait_for_function(f"() => item.id !== {json.dumps(first)}")
        # An edit in Korean: while a syllable is composed, Ctrl+Enter belongs to the input method.
        second = page.evaluate("item.id")
        folder = page.evaluate("item.label")
        page.keyboard.press("e")
        page.fill("#edit", "")
        page.keyboard.insert_text("<label>건선</label><summary>은백색 인설이 두껍게 덮인 판입니다</summary>")
        assert page.input_value("#label") == folder, "typing never moves the label: only the clinician does"
        page.evaluate(
            "document.getElementById('edit').dispatchEvent(new KeyboardEvent('keydown',"
            " {key: 'Enter', ctrlKey: true, isComposing: true, bubbles: true}))"
        )
        page.wait_for_timeout(200)
        assert page.evaluate("item.id") == second, "nothing saved mid-composition"
        assert page.get_by_role("button", name="Save", exact=True).is_visible()
        page.keyboard.press("Control+Enter")
        if folder != "건선":  # the text names another class: nothing is saved until the clinician picks one
            assert page.is_visible("#mismatch") and "건선" in page.text_content("#mismatch-says")
            assert page.evaluate("item.id") == second
            page.click("#take-text")  # a change of diagnosis, by this click alone
        page.wait_for_function(f"() => item.id !== {json.dumps(second)}")
        third = page.evaluate("item.id")
        page.keyboard.press("r")
        page.keyboard.insert_text("초점이 맞지 않음")
        page.keyboard.press("Enter")
        page.wait_for_function(f"() => item.id !== {json.dumps(third)}")
        page.keyboard.press("u")  # the reject taken back: the record is shown again, and accepted this time
        page.wait_for_function(f"() => item.id === {json.dumps(third)}")
        page.keyboard.press("a")
        page.wait_for_function(f"() => item.id !== {json.dumps(third)}")
        fitted = page.eval_on_selector("#image", "i => [i.clientWidth, i.parentElement.clientWidth]")
        assert fitted[0] == fitted[1], "the photo fills its pane"
        shown = page.text_content("#progress")
        page.reload()
        assert page.text_content("#progress") == shown == f"3 / {len(described)} reviewed"
        assert page.evaluate("item.id") not in (first, second, third)
        browser.close()
        server.stop()
    decisions = journal(reviewable)
    assert [(d["id"], d["decision"]) for d in decisions] == [
        (first, "accept"), (second, "edit"), (third, "reject"), (third, "undo"), (third, "accept")
    ]  # fmt: skip
    assert decisions[1]["text"] == "<label>건선</label><summary>은백색 인설이 두껍게 덮인 판입니다</summary>"
    assert decisions[1]["label"] == "건선", "the clinician chose the text's class"
    assert decisions[2]["reason"] == "초점이 맞지 않음" and all(d["reviewer"] == "park" for d in decisions)
    assert problems == [] and first == xss_id


def load_outputs(workspace: Path) -> dict[str, str]:
    from datasets import load_from_disk

    data = load_from_disk(str(workspace / "datasets" / "fixed"))
    return {row["id"]: row["output"] for split in data for row in data[split]}


def plant_text(cli, workspace: Path, record_id: str, text: str) -> None:
    """One description replaced through the describe journal (as a labeller's answer), then `describe --template`
    keeps it and `fix` carries it on: the page shows what the stages hold."""
    path = workspace / "journal" / "describe.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    planted = next(line for line in lines if line["id"] == record_id) | {"output": text, "model": "planted"}
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(planted, ensure_ascii=False) + "\n")
    cli("describe", "--template")
    cli("fix")


def test_low_label_probabilities_come_first_and_fleiss_kappa_matches_the_textbook(cli, reviewable: Path) -> None:
    from test_eval_serve import run_eval

    from skinvlm.demo.synthetic import colour_label
    from skinvlm.review import kappa
    from skinvlm.testing.openai_server import FakeOpenAI, mean_colour

    def by_colour(body: dict) -> str:
        label = colour_label(mean_colour(body))
        return f"<label>{label}</label>\n<summary>색으로 본 소견입니다.</summary>"

    def unsure_of_rosacea(label: str) -> dict[str, float]:
        sure = 0.1 if label == "주사" else 0.9
        return {c: sure if c == label else (1 - sure) / 5 for c in ("건선", "아토피", "여드름", "주사", "지루", "정상")}

    with FakeOpenAI(answer=by_colour, label_probabilities=unsure_of_rosacea) as server:
        run_eval(cli, server, "--name", "scored")
    with Server(reviewable) as server:
        kim = Browserless(server.url)
        first = kim.item
        kim.decide("accept")
        assert {first["label"], kim.item["label"]} == {"주사"} and first["probability"] == pytest.approx(0.1)
        assert first["split"] == "test", "the eval scored the held-out photos"
        server.stop()
    # Fleiss (1971) as Wikipedia works it: 10 subjects, 14 raters each, 5 categories -> kappa 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]  # fmt: skip
    ratings = [[category for category, n in enumerate(row) for _ in range(n)] for row in table]
    assert kappa(ratings) == pytest.approx(0.210, abs=0.001)


def raw_request(url: str, method: str, path: str, host: str | None, body: bytes = b"",
                **headers: str) -> tuple[int, str]:  # fmt: skip
    """One request with the Host header we choose (as a DNS-rebinding page's browser would send its own name)."""
    import http.client

    where = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    connection.putrequest(method, path, skip_host=True)
    if host is not None:
        connection.putheader("Host", host)
    for name, value in {**headers, "Content-Length": str(len(body))}.items():
        connection.putheader(name, value)
    connection.endheaders(body)
    answer = connection.getresponse()
    status, text = answer.status, answer.read().decode(errors="replace")
    connection.close()
    return status, text


def test_a_foreign_host_is_refused_before_any_route_and_bad_input_is_a_clear_4xx(cli, reviewable: Path) -> None:
    with Server(reviewable, "--reviewer", "kim") as server:
        port = server.port
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "", "[::1"):
            for method, path in (("GET", "/"), ("GET", "/api/next"), ("GET", "/api/report"), ("POST", "/api/decide")):
                status, _ = raw_request(server.url, method, path, host)
                assert status == 421, (host, path, status)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}", "127.0.0.1"):
            assert raw_request(server.url, "GET", "/api/next", host)[0] == 200, host
        page = Browserless(server.url)
        sent = {"Content-Type": "application/json", "X-CSRF-Token": page.csrf, "Cookie": cookie_header(page)}
        local = f"127.0.0.1:{port}"

        def post(body: bytes) -> tuple[int, str]:
            return raw_request(server.url, "POST", "/api/decide", local, body, **sent)

        item = page.item
        good = {"id": item["id"], "version": item["version"], "decision": "reject", "label": item["label"]}
        assert post(b"x" * (65 * 1024))[0] == 413
        assert post(json.dumps({**good, "reason": "r" * 501}).encode())[0] == 422
        assert post(json.dumps({**good, "decision": "edit", "text": "가" * 5000}).encode())[0] == 422
        assert post(json.dumps({**good, "version": "V"}).replace('"V"', "NaN").encode())[0] == 400
        assert post(json.dumps({**good, "version": 1e400}).encode())[0] == 400
        assert post(b"[" * 100_000 + b"]" * 100_000)[0] in (400, 413)
        assert post(b"[" * 20_000 + b"]" * 20_000)[0] == 400, "deep nesting under the size cap"
        assert post(b"5")[0] == 400 and post(json.dumps({**good, "id": ["x"]}).encode())[0] == 400
        other = next(c for c in ("건선", "아토피") if c != item["label"])
        edited = {**good, "decision": "edit", "text": f"<label>{other}</label>\n<summary>소견입니다.</summary>"}
        status, answer = post(json.dumps(edited).encode())
        assert status == 422 and f"the text says {other}" in answer, "never a silent label mismatch"
        assert raw_request(server.url, "POST", "/api/reviewer", local, b"[1]", **sent)[0] == 400
        _, err = server.stop()
    assert "Traceback" not in err and "Exception" not in err, err
    assert journal(reviewable) == [], "nothing malformed was written"


def cookie_header(page: Browserless) -> str:
    jar = next(h for h in page.opener.handlers if isinstance(h, urllib.request.HTTPCookieProcessor)).cookiejar
    return "; ".join(f"{c.name}={c.value}" for c in jar)


def test_a_damaged_journal_is_read_in_one_line_and_names_are_printed_as_text(cli, reviewable: Path) -> None:
    with Server(reviewable, "--reviewer", "kim") as server:
        page = Browserless(server.url)
        first = page.item["id"]
        page.name("\x1b]8;;http://evil.example\x07[bold red]kim[/]\nfake line")
        page.decide("reject", reason="\x1b[2Jblurred [link=http://x]here[/link]")
        server.stop()
    lines = journal(reviewable)
    damaged = [b"[1,2]", b"5", b'{"decision": "bogus", "id": "x", "label": "a", "reviewer": "r"}',
               json.dumps({**lines[0], "id": [first]}).encode(), json.dumps({**lines[0], "label": 3}).encode(),
               json.dumps({k: v for k, v in lines[0].items() if k != "reviewer"}).encode(), b"null", b"{}"]  # fmt: skip
    with (reviewable / "journal" / "review.jsonl").open("ab") as handle:
        handle.write(b"\n".join(damaged) + b"\n")
    report = cli("review", "--report")
    assert "\x1b" not in report.stdout and "evil.example" in report.stdout, "shown as text, not obeyed"
    assert "[bold red]kim[/]" in report.stdout and "\\x1b]8;;" in report.stdout
    assert "8 lines are not decisions" in report.stdout and "rejected" in report.stdout
    assert "[link=http://x]here[/link]" in report.stdout, "the reason is shown, as text"
    assert cli.json("review", "--report")["skipped_lines"] == 8
    fixed = cli.json("fix")
    assert fixed["review_lines_skipped"] == 8 and cli.json("audit", "--stage", "fixed")["review"]["rejected"] == 1
    with Server(reviewable) as server:
        assert Browserless(server.url).item["progress"]["skipped_lines"] == 8
        server.stop()
    key = reviewable / "journal" / "review.key"
    key.unlink()
    key.mkdir()
    assert "is not a file (a folder or a broken link)" in error_line(cli("review", ok=False).stderr)
    key.rmdir()
    key.symlink_to(reviewable / "nowhere")
    assert "is not a file (a folder or a broken link)" in error_line(cli("review", ok=False).stderr)


def test_undo_takes_back_the_last_decision_and_never_anothers(cli, reviewable: Path) -> None:
    with Server(reviewable, "--reviewer", "kim", "--overlap", "1") as server:
        kim, lee = Browserless(server.url), Browserless(server.url)
        lee.name("lee")
        assert kim.post("/api/undo", {})[0] == 409, "nothing to undo yet"
        first = kim.item["id"]
        kim.decide("reject", reason="흐림")
        second = kim.item["id"]
        kim.decide("accept")
        status, again = kim.post("/api/undo", {})
        assert status == 200 and again["id"] == second and again["version"] == 0, "the newest decision, shown again"
        kim.item = again
        kim.decide("edit", again["label"], text=f"<label>{again['label']}</label>\n<summary>고친 소견입니다.</summary>")
        lee.fresh()
        while lee.item["id"] != second:
            lee.decide("accept")
        lee.decide("reject", reason="다른 의견")
        status, refused = kim.post("/api/undo", {})
        assert status == 409 and "lee decided your last record since" in refused["error"]
        server.stop()
    report = cli.json("review", "--report")
    assert report["reviewers"]["kim"] == report["reviewers"]["kim"] | {"accepted": 0, "edited": 1, "rejected": 1}
    assert [r["id"] for r in report["rejections"] if r["reviewer"] == "kim"] == [first]
    assert [d["decision"] for d in journal(reviewable) if d["reviewer"] == "kim"] == [
        "reject",
        "accept",
        "undo",
        "edit",
    ]


def test_the_queue_puts_broken_answers_then_the_labels_the_model_doubts_most_first(tmp_path: Path) -> None:
    from skinvlm.review import Finding, Item, ReviewState

    def item(name: str, probability: float | None, *kinds: str) -> Item:
        found = tuple(Finding(kind) for kind in kinds)
        return Item(name, "train", 0, "건선", "정면", name, "text", found, probability)

    records = [
        item("sure", 0.99), item("unscored", None), item("doubted", 0.05), item("mismatch", 0.9, "mismatch"),
        item("english", 0.7, "english"), item("half", 0.4), item("fairly sure", 0.8),
    ]  # fmt: skip
    state = ReviewState(records, tmp_path / "review.jsonl")
    assert state.order == ["mismatch", "doubted", "half", "english", "fairly sure", "sure", "unscored"]


def patients_tree(root: Path, per_class: int = 2) -> int:
    """Per class and split, `per_class` patients photographed from both views (P001_정면.png, P001_측면.png in the
    view's folder); how many photos in all."""
    from skinvlm.demo.synthetic import CLASS_COLOURS, SPLIT_FOLDERS, VIEWS, image_bytes

    patient = 0
    for top, prefix in SPLIT_FOLDERS.values():
        for label in CLASS_COLOURS:
            for _ in range(per_class):
                patient += 1
                for view in VIEWS:
                    folder = root / top / "images" / f"{prefix}_{label}_{view}"
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"P{patient:03d}_{view}.png").write_bytes(image_bytes(label, patient * 2 + len(view), 32))
    return patient * len(VIEWS)


@pytest.fixture
def with_patients(cli, tmp_path: Path, workspace: Path) -> tuple[Path, int]:
    photos = patients_tree(tmp_path / "src")
    cli("ingest", tmp_path / "src", "--patient-pattern", r"(?P<patient>P\d{3})_")
    cli("describe", "--template")
    return workspace, photos


def test_a_patients_photos_come_one_after_the_other_each_showing_the_other(with_patients: tuple[Path, int]) -> None:
    workspace, photos = with_patients
    with Server(workspace, "--reviewer", "kim") as server:
        kim, order = Browserless(server.url), []
        while not kim.item["done"]:
            others = kim.item["same_patient"]
            assert len(others) == 1 and others[0]["view"] != kim.item["view"], "the patient's other view beside it"
            order.append((kim.item["id"], others[0]["id"], others[0]["status"]))
            kim.decide("accept")
    assert len(order) == photos
    for (first, its_other, status), (second, its_first, status_then) in zip(order[::2], order[1::2], strict=True):
        assert (its_other, its_first) == (second, first), "the patient's second photo comes straight after the first"
        assert (status, status_then) == ("unreviewed", "accepted"), "each shown with its status as it stands"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium")
def test_both_views_of_a_patient_on_one_screen_with_nothing_inline(with_patients: tuple[Path, int]) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    workspace, _ = with_patients
    problems: list[str] = []
    requests: list[str] = []
    with Server(workspace, "--reviewer", "park") as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))
        answer = page.goto(server.url)
        assert answer is not None and "'unsafe-inline'" not in answer.headers["content-security-policy"]
        assert page.evaluate("getComputedStyle(document.body).display") == "grid", "the shared stylesheet applies"
        page.wait_for_function("() => [...document.images].every((i) => i.complete && i.naturalWidth > 0)")
        assert page.locator("#photos img").count() == 2, "the photo under review and the patient's other view"
        first = page.evaluate("item")
        other = first["same_patient"][0]
        assert other["view"] in page.text_content("#others figcaption") and "unreviewed" in page.text_content(
            "#others figcaption"
        )
        page.keyboard.press("a")
        page.wait_for_function(f"() => item.id !== {json.dumps(first['id'])}")
        assert page.evaluate("item.id") == other["id"], "the same patient's other view is next"
        assert "accepted" in page.text_content("#others figcaption"), "the first, beside it, as decided"
        browser.close()
    assert problems == [], problems
    assert all(url.startswith(server.url + "/") for url in requests), requests


def test_a_wording_edit_never_changes_the_diagnosis_and_a_mismatch_is_chosen_not_accepted(
    cli, reviewable: Path
) -> None:
    """The page's decision logic over every combination (property-style, in the browser), then a clinician's
    session: a word changed in a text that names another class leaves the folder's label; Esc saves nothing;
    Accept asks the same question; keeping the label writes it into the text."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("no Chromium here: apt-get install chromium (or set SKINVLM_CHROMIUM)")
    described = load_outputs(reviewable)
    planted = next(iter(described))
    plant_text(cli, reviewable, planted, "<label>지루</label><summary>코 옆에 기름진 인설이 보입니다.</summary>")
    with Server(reviewable, "--reviewer", "park") as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url)
        classes = page.evaluate("boot.classes.map((c) => c.name)")
        broken = "<label>없음</label><summary>x</summary>"
        for decision in ("accept", "edit", "reject"):
            for chosen in classes:
                for says in [*classes, None]:
                    text = f"<label>{says}</label><summary>소견</summary>" if says else broken
                    plan = page.evaluate("([d, c, t]) => planDecision(d, c, t, t)", [decision, chosen, text])
                    if "send" in plan:
                        assert plan["send"]["label"] == chosen, (decision, chosen, says)
                        assert decision == "reject" or says in (None, chosen), (decision, chosen, says)
                    else:
                        assert decision != "reject" and says not in (None, chosen) and plan["ask"]["label"] == chosen
        assert page.evaluate("item.id") == planted and page.evaluate("item.label") != "지루"
        folder = page.evaluate("item.label")
        page.keyboard.press("e")
        page.focus("#edit")
        page.keyboard.press("End")
        page.keyboard.insert_text(" 추가")
        assert page.input_value("#label") == folder, "a wording edit leaves the diagnosis"
        page.keyboard.press("Control+Enter")
        assert page.is_visible("#mismatch") and f"the label is {folder}" in page.text_content("#mismatch-says")
        page.keyboard.press("Escape")
        assert not page.is_visible("#mismatch") and page.input_value("#label") == folder
        assert journal(reviewable) == [], "Esc saved nothing"
        page.keyboard.press("Escape")
        page.keyboard.press("a")  # accepting the text as it is asks the same
        assert page.is_visible("#mismatch")
        page.click("#keep-label")
        page.wait_for_function(f"() => item.id !== {json.dumps(planted)}")
        browser.close()
        server.stop()
    (decision,) = journal(reviewable)
    assert decision["label"] == folder and decision["decision"] == "edit"
    assert decision["text"].startswith(f"<label>{folder}</label>"), "the label written into the text"


def test_the_server_refuses_a_decision_whose_text_names_another_class(cli, reviewable: Path) -> None:
    described = load_outputs(reviewable)
    planted = next(iter(described))
    plant_text(cli, reviewable, planted, "<label>지루</label><summary>코 옆에 기름진 인설이 보입니다.</summary>")
    with Server(reviewable, "--overlap", "1", "--reviewer", "kim") as server:
        kim = Browserless(server.url)
        assert kim.item["id"] == planted and kim.item["label"] != "지루"
        body = {"id": planted, "version": 0, "label": kim.item["label"], "reason": ""}
        for decision, text in (("accept", None), ("edit", kim.item["text"] + " 추가")):
            status, answer = kim.post("/api/decide", body | {"decision": decision, "text": text})
            assert status == 422 and "the text says 지루" in answer["error"], answer
        assert journal(reviewable) == []
        kim.decide("accept", label="지루")  # the clinician's own choice of the text's class
        lee = Browserless(server.url)
        lee.name("lee")
        assert lee.item["id"] == planted and "earlier outcomes hidden" in lee.item["status"], "a blind second read"
        assert lee.item["label"] != "지루", "the folder's label, not kim's"
        server.stop()
    assert journal(reviewable)[0]["blind"] is False
