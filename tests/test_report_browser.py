"""report.html in a real headless browser (Chromium through Playwright): it loads without console errors, shows
the figures of metrics.json, and a confusion-matrix cell filters the gallery to its photos."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from conftest import CHROMIUM
from test_eval_serve import run_eval, scripted_answers
from test_ui import serving

from skinvlm.testing.openai_server import FakeOpenAI

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here: apt-get install chromium (or set SKINVLM_CHROMIUM to its path)"
)


def likely(label: str) -> dict[str, float]:
    return {c: 0.5 if c == label else 0.1 for c in ("건선", "아토피", "여드름", "주사", "지루", "정상")}


@pytest.fixture
def report(cli, ingested: Path) -> tuple[Path, dict]:
    with FakeOpenAI(answer=scripted_answers(), label_probabilities=likely) as server:
        run_eval(cli, server, "--name", "scripted", "--concurrency", "1")
    run = ingested / "eval" / "scripted"
    return run / "report.html", json.loads((run / "metrics.json").read_text(encoding="utf-8"))


def scored_probabilities(run: Path) -> list[dict[str, float]]:
    lines = (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [record["probabilities"] for record in map(json.loads, lines) if record.get("probabilities")]


@pytest.mark.parametrize("opened", ["from disk", "from skinvlm ui"])
def test_the_report_shows_the_metrics_and_a_cell_shows_its_photos(report: tuple[Path, dict], opened: str) -> None:
    """Opened as a file, and through `skinvlm ui`, whose policy for it lets its own script run (by its hash) and
    nothing else: a policy that refused it would show up as console errors and a dead confusion matrix."""
    path, metrics = report
    problems: list[str] = []
    workspace = path.parents[2]
    with contextlib.ExitStack() as stack, sync_api.sync_playwright() as playwright:
        address = path.as_uri()
        if opened == "from skinvlm ui":
            address = stack.enter_context(serving(workspace)) + "/eval/scripted/report.html"
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: request.url not in (address, "data:,") and request.url.startswith("http")
                and problems.append(request.url))  # fmt: skip
        page.goto(address)
        # Hangul from the font embedded in the page (a machine without Korean fonts would show empty boxes).
        faces = page.evaluate("document.fonts.load('16px SkinvlmHangul', '건선 아토피').then(f => f.length)")
        assert faces == 1 and path.stat().st_size < 400_000, "one subset face, a few tens of KB"
        assert page.text_content("#n") == str(metrics["n"])
        assert page.text_content("#accuracy") == f"{metrics['accuracy']:.4f}"
        assert page.text_content("#macro-auc") == f"{metrics['probabilities']['macro_auc']:.3f}", "3 decimals"
        assert page.query_selector("#risk-coverage polyline") is not None, "the risk-coverage curve is drawn"
        referred = [p for p in page.query_selector_all(".referred")]
        if metrics["selective"]["threshold"] is not None:
            assert page.text_content("#referral-threshold") == f"{metrics['selective']['threshold']:.3f}"
            sure = [max(r.values()) for r in scored_probabilities(path.parent)]
            assert len(referred) == sum(s < metrics["selective"]["threshold"] for s in sure)
        labels, columns = metrics["labels"], metrics["predicted_labels"]
        for cell in page.query_selector_all(".cell"):
            truth, predicted = cell.get_attribute("data-true"), cell.get_attribute("data-pred")
            counts = metrics["confusion_matrix"][labels.index(truth)]
            assert int(cell.text_content()) == counts[columns.index(predicted)]
        right = sum(metrics["confusion_matrix"][i][i] for i in range(len(labels)))
        assert page.text_content("#shown-count") == str(metrics["n"] - right), "errors only at first"

        page.click('.cell[data-true="주사"][data-pred="지루"]')
        visible = page.query_selector_all(".photo:not([hidden])")
        assert len(visible) == 2 and page.text_content("#shown-count") == "2"
        assert {(p.get_attribute("data-true"), p.get_attribute("data-pred")) for p in visible} == {("주사", "지루")}
        assert all(p.query_selector("img").evaluate("img => img.naturalWidth > 0") for p in visible), "thumbnails"

        page.click('.cell[data-true="건선"][data-pred="건선"]')
        assert len(page.query_selector_all(".photo:not([hidden])")) == 2, "a diagonal cell shows the right answers"
        for element in ("pre", "#filter-true", "#filter-true option", "figcaption"):
            family = page.eval_on_selector(element, "e => getComputedStyle(e).fontFamily")
            assert family.startswith("SkinvlmHangul"), f"{element} draws Hangul in {family}"
        page.select_option("#filter-true", "")
        page.select_option("#filter-pred", "unparsed")
        assert len(page.query_selector_all(".photo:not([hidden])")) == metrics["unparsed"]
        browser.close()
    assert problems == [], problems
    assert every_hangul_in_the_embedded_font(path.read_text(encoding="utf-8"))


def every_hangul_in_the_embedded_font(html: str) -> bool:
    """Each Hangul character of the page (the answers too) has a glyph in the font embedded in it."""
    import base64
    import io
    import re

    from fontTools.ttLib import TTFont

    data = re.search(r"url\(data:font/woff;base64,([A-Za-z0-9+/=]+)\)", html)
    assert data, "a font is embedded"
    font = TTFont(io.BytesIO(base64.b64decode(data.group(1))))
    covered = set(font.getBestCmap())
    missing = {c for c in re.findall(r"[\uac00-\ud7a3]", html) if ord(c) not in covered}
    assert not missing, f"no glyph for {''.join(sorted(missing))}"
    return True


def test_opened_from_disk_only_skinvlms_own_script_runs(report: tuple[Path, dict]) -> None:
    """The page's own <meta> policy allows the hash of skinvlm's script alone: a script that slipped into the file
    (a description past an escape) does not run, while the page's own does (it fills the gallery's count)."""
    path, metrics = report
    html = path.read_text(encoding="utf-8")
    planted = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2">'
    path.write_text(html.replace("<h1>", planted + "<h1>", 1), encoding="utf-8")
    problems: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(path.as_uri())
        assert page.evaluate("window.pwned") is None, "the planted script and handler stayed inert"
        right = sum(metrics["confusion_matrix"][i][i] for i in range(len(metrics["labels"])))
        assert page.text_content("#shown-count") == str(metrics["n"] - right), "skinvlm's own script ran"
        browser.close()
    assert not problems, problems
