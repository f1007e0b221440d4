"""describe and eval over several endpoints (real HTTP servers on 127.0.0.1): the load shared, an endpoint that
dies mid-run or only throttles, endpoints serving other models, and the one-line refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from conftest import error_line, fake_secret, free_port

from skinvlm.demo.synthetic import colour_label
from skinvlm.testing.openai_server import FakeOpenAI, image_of

KEY = fake_secret("sk-", "endpoints")
SERVED = ("skinvlm",)


def journal(workspace: Path) -> list[dict]:
    return [json.loads(line) for line in (workspace / "journal" / "describe.jsonl").read_text().splitlines()]


def urls(*servers: FakeOpenAI) -> list[str]:
    return [arg for server in servers for arg in ("--base-url", server.url)]


def describe(cli, *args: str, ok: bool = True):
    return cli("describe", "--api-key", KEY, "--model", "skinvlm", "--backoff", "0.01", *args, ok=ok)


def test_two_endpoints_share_the_load_and_one_dying_mid_run_loses_no_image(cli, ingested: Path) -> None:
    with (
        FakeOpenAI(latency=0.05, models=SERVED) as a,
        FakeOpenAI(latency=0.05, models=SERVED, die_after=12) as b,
    ):
        ran = describe(cli, *urls(a, b), "--concurrency", "4", "--json")
    result = json.loads(ran.stdout)
    assert result["statuses"] == {"ok": 48}, "every image described on the endpoint left"
    records = journal(ingested)
    by_endpoint = Counter(r["endpoint"] for r in records)
    assert set(by_endpoint) == {a.url, b.url} and 8 <= by_endpoint[b.url] <= 12, by_endpoint
    assert len({r["id"] for r in records}) == 48 and all(r["status"] == "ok" for r in records)
    # B died as its 13th request arrived: what it had in flight (and any request reaching it while its port
    # closed) was sent again to A, nothing else.
    sent_twice = sum(n - 1 for n in Counter(a.images + b.images).values() if n > 1)
    assert 1 <= sent_twice == b.requests - by_endpoint[b.url] <= 5, (b.requests, sent_twice)
    summary = {e["endpoint"]: e for e in result["endpoints"]}
    assert summary[b.url]["answered"] == by_endpoint[b.url] and not summary[b.url]["up"]
    assert summary[b.url]["events"][0].startswith("dropped at ") and "failures in a row" in summary[b.url]["events"][0]
    assert summary[a.url]["answered"] == by_endpoint[a.url] and summary[a.url]["events"] == []
    assert a.max_in_flight <= 4, "each endpoint keeps its own --concurrency"
    last = [line for line in ran.stderr.splitlines() if line.startswith("describing: 48/48")][-1]
    port_b = b.url.split(":")[2].split("/")[0]
    assert f"127.0.0.1:{port_b} out since" in last and "/s" in last, "progress names each endpoint's rate or fall"
    manifest = json.loads((ingested / "datasets" / "described" / "manifest.json").read_text())
    assert {m["endpoint"] for m in manifest["counts"]["made_by"]} == {a.url, b.url}


def test_an_endpoint_that_comes_back_is_taken_back(cli, ingested: Path) -> None:
    with (
        FakeOpenAI(latency=0.05, models=SERVED) as a,
        FakeOpenAI(latency=0.05, models=SERVED, plan=["reset"] * 3) as b,
    ):
        result = json.loads(describe(cli, *urls(a, b), "--concurrency", "1", "--json").stdout)
    assert result["statuses"] == {"ok": 48}
    summary = {e["endpoint"]: e for e in result["endpoints"]}
    dropped, back = summary[b.url]["events"]
    assert dropped.startswith("dropped at ") and dropped.endswith("after 3 failures in a row (APIConnectionError)")
    assert back.startswith("back at ") and summary[b.url]["up"] and summary[b.url]["answered"] >= 5
    attempts = {r["id"]: r["attempts"] for r in journal(ingested)}
    assert max(attempts.values()) <= 2, "a reset on B costs the request one more try, on A"


def test_an_answer_cut_short_is_asked_again(cli, ingested: Path) -> None:
    with FakeOpenAI(plan=["cut", "cut"]) as server:
        result = json.loads(describe(cli, "--base-url", server.url, "--limit", "1", "--json").stdout)
    assert result["statuses"]["ok"] == 1 and server.requests == 3
    assert journal(ingested)[0]["attempts"] == 3, "a body the connection cut is retried like a reset"


def perfect(body: dict) -> str:
    label = colour_label(tuple(np.asarray(image_of(body)).reshape(-1, 3).mean(axis=0)))
    return f"<label>{label}</label>\n<summary>테스트 소견입니다.</summary>"


def test_eval_finishes_on_the_endpoint_left_and_records_who_answered(cli, ingested: Path) -> None:
    with (
        FakeOpenAI(latency=0.05, models=SERVED, answer=perfect) as a,
        FakeOpenAI(latency=0.05, models=SERVED, answer=perfect, die_after=3) as b,
    ):
        result = cli.json("eval", *urls(a, b), "--model", "skinvlm", "--concurrency", "2", "--name", "two")
    assert result["n"] == 12 and result["failed"] == 0 and result["accuracy"] == 1.0
    lines = [json.loads(line) for line in (ingested / "eval" / "two" / "predictions.jsonl").read_text().splitlines()]
    carried = Counter(line["endpoint"] for line in lines)
    assert set(carried) == {a.url, b.url} and carried[b.url] <= 3 and b.requests == 4, (carried, b.requests)
    assert {e["endpoint"]: e["answered"] for e in result["endpoints"]} == carried
    assert result["backend"] == f"{', '.join(sorted([a.url, b.url]))} (skinvlm)"


def test_an_endpoint_that_only_throttles_slows_itself_only(cli, ingested: Path) -> None:
    with (
        FakeOpenAI(latency=0.02, models=SERVED) as a,
        FakeOpenAI(models=SERVED, default="429", retry_after="") as b,
    ):
        result = json.loads(describe(cli, *urls(a, b), "--concurrency", "2", "--json").stdout)
    assert result["statuses"] == {"ok": 48} and a.requests == 48
    assert 1 <= b.requests <= 12, f"its pause grows with each 429: {b.requests} requests"
    assert {r["endpoint"] for r in journal(ingested)} == {a.url}


def test_endpoints_serving_other_models_are_refused_before_any_request(cli, ingested: Path) -> None:
    with FakeOpenAI(models=SERVED) as a, FakeOpenAI(models=("other-model", "base")) as b:
        ran = describe(cli, *urls(a, b), ok=False)
        assert a.requests == b.requests == 0
    assert ran.exit_code == 1 and error_line(ran.stderr) == (
        f"error: the endpoints do not all serve model 'skinvlm' ({b.url} serves 'other-model', 'base'): give every "
        "--base-url the same model, or pass --model with the name they share"
    )


def test_the_endpoint_list_may_come_from_openai_base_url_and_batch_refuses_it(cli, ingested: Path) -> None:
    with FakeOpenAI(models=SERVED) as a, FakeOpenAI(models=SERVED) as b:
        listed = {"OPENAI_BASE_URL": f"{a.url}, {b.url}"}
        refused = cli("describe", "--api-key", KEY, "--batch", env=listed, ok=False)
        assert error_line(refused.stderr) == (
            "error: --batch goes through one provider's Batch API, not 2 endpoints: give one --base-url"
        )
        twice = describe(cli, *urls(a, a), ok=False)
        assert error_line(twice.stderr) == f"error: --base-url {a.url} is given twice: name each endpoint once"
        other_spelling = a.url.replace("127.0.0.1", "LocalHost").rstrip("/") + "/"
        alike = describe(cli, "--base-url", a.url, "--base-url", other_spelling, ok=False)
        assert error_line(alike.stderr) == (
            f"error: --base-url {a.url} and {other_spelling} name one server: name each endpoint once"
        ), "one server, however it is spelled"
        cli("describe", "--api-key", KEY, "--model", "skinvlm", "--concurrency", "2", env=listed)
    assert a.requests and b.requests and a.requests + b.requests == 48


def test_the_endpoint_table_folds_long_urls_and_events_at_80_columns() -> None:
    from rich.console import Console

    from skinvlm.render import endpoint_table

    urls = [f"https://gpu-node-{n}.dermatology.clinic.internal:8000/v1" for n in (17, 18)]
    summary = [
        {"endpoint": urls[0], "sent": 48, "answered": 48, "per_second": 80.12, "events": []},
        {"endpoint": urls[1], "sent": 16, "answered": 0, "per_second": 0.0,
         "events": ["dropped at 05:20:46 after 3 failures in a row (APIConnectionError)"]},
    ]  # fmt: skip
    console = Console(width=80, record=True, soft_wrap=True)  # as the command line's
    endpoint_table(console, summary)
    shown = console.export_text()
    first_column = "".join(line.split("│")[1].strip() for line in shown.splitlines() if line.count("│") > 2)
    assert "…" not in shown and first_column == "".join(urls), "every URL whole, folded"


def test_an_endpoint_down_at_the_start_is_left_out_and_all_down_stops_in_one_line(cli, ingested: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    with FakeOpenAI(models=SERVED) as a:
        result = json.loads(describe(cli, "--base-url", a.url, "--base-url", nobody, "--json").stdout)
    assert result["statuses"] == {"ok": 48}
    events = {e["endpoint"]: e["events"] for e in result["endpoints"]}
    assert events[nobody][0].endswith("not answering at the start") and events[a.url] == []

    with FakeOpenAI(models=SERVED, die_after=5) as a, FakeOpenAI(models=SERVED, die_after=5) as b:
        ran = describe(cli, *urls(a, b), "--redo", "all", "--concurrency", "1", "--timeout", "1", ok=False)
    line = error_line(ran.stderr)
    assert line.startswith("error: every endpoint stopped answering (") and line.endswith(
        "what finished is saved; run the same command again once one answers"
    )
    assert a.url in line and b.url in line
    redone = [r for r in journal(ingested)[48:] if r["status"] == "ok"]
    assert len(redone) == 10, "the ten answered before both died are on disk"
