"""`skinvlm eval` against a real OpenAI-protocol server (known answers, hand-computed metrics) and
`skinvlm serve`'s command line and process handling with a stand-in server."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import alive, error_line, free_port

from skinvlm import stats
from skinvlm.demo.synthetic import colour_label
from skinvlm.evaluate import label_distribution, plot_confusion
from skinvlm.rules import default_rules_path, load_rules
from skinvlm.testing.openai_server import FakeOpenAI, label_conditioned, mean_colour


def scripted_answers():
    """Reads the class from the image colour, then answers per class as the expected values assume."""
    seen = {"정상": 0}

    def answer(body: dict) -> str:
        mean = mean_colour(body)
        label = colour_label(mean)
        if label == "정상":
            seen["정상"] += 1
            if seen["정상"] > 1:  # the second 정상 image (측면) fails on every attempt
                return "!500"
        text = {
            "건선": "<label>판상 건선</label>",
            "아토피": "<label>아토피성 피부염</label>",
            "여드름": "Sorry, I can't tell.",
            "주사": "<label>지루</label>",
        }.get(label, f"<label>{label}</label>")
        return text + "\n<summary>테스트 소견입니다.</summary>" if text.startswith("<label>") else text

    return answer


def run_eval(cli, server: FakeOpenAI, *args: str) -> dict:
    """The run's figures; a run where some photo got no answer prints them and then fails in one line."""
    ran = cli("eval", "--base-url", server.url, "--api-key", "sk-x", "--backoff", "0.01", *args, "--json", ok=False)
    result = json.loads(ran.stdout)
    if result["failed"]:
        line = error_line(ran.stderr)
        assert ran.exit_code == 1 and line.startswith(f"error: {result['failed']} of the "), line
    else:
        assert ran.exit_code == 0, ran.stderr
    return result


def test_metrics_equal_hand_computed_values(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=scripted_answers()) as server:
        ran = cli("eval", "--base-url", server.url, "--api-key", "sk-x", "--backoff", "0.01", "--name", "scripted",
                  "--concurrency", "1", "--confusion-matrix", "--json", ok=False)  # fmt: skip
    result = json.loads(ran.stdout)
    assert ran.exit_code == 1 and error_line(ran.stderr) == (
        "error: 1 of the 12 photos got no answer (InternalServerError: Error code: 500 - injected (1x)) and count as "
        "wrong in these figures; the answers are saved: "
        "`skinvlm eval --name scripted` again asks only those"
    ), "figures printed, then a non-zero exit naming the photos without an answer"
    # 12 test images, 2 per class: 건선 2/2 (alias), 아토피 2/2 (alias), 여드름 0/2 (garbage: unparsed),
    # 주사 0/2 (answered 지루), 지루 2/2, 정상 1/2 (one request fails: unparsed).
    assert result["n"] == 12 and result["unparsed"] == 3 and result["failed"] == 1
    assert result["accuracy"] == pytest.approx(7 / 12, abs=1e-4)
    per_class = result["per_class"]
    assert per_class["건선"]["f1"] == 1.0 and per_class["아토피"]["f1"] == 1.0
    assert per_class["여드름"]["f1"] == 0.0 and per_class["주사"]["recall"] == 0.0
    assert per_class["지루"]["precision"] == 0.5 and per_class["지루"]["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert per_class["정상"]["recall"] == 0.5 and per_class["정상"]["f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["macro_f1"] == pytest.approx((1 + 1 + 0 + 0 + 2 / 3 + 2 / 3) / 6, abs=1e-4)
    assert result["per_view"] == {"정면": pytest.approx(4 / 6, abs=1e-4), "측면": pytest.approx(3 / 6, abs=1e-4)}
    labels, columns = result["labels"], result["predicted_labels"]
    assert labels == ["건선", "아토피", "여드름", "주사", "지루", "정상"] and columns == [*labels, "unparsed"]
    assert len(result["confusion_matrix"]) == len(labels), "a row per class, none for unparsed"
    row = result["confusion_matrix"][labels.index("주사")]
    assert row[columns.index("지루")] == 2
    from sklearn.metrics import f1_score

    answers = [json.loads(line) for line in (Path(result["output_dir"]) / "predictions.jsonl").read_text().splitlines()]
    sklearn_f1 = f1_score([a["label"] for a in answers], [a["predicted"] for a in answers], labels=labels,
                          average="macro", zero_division=0)  # fmt: skip
    assert sklearn_f1 == pytest.approx(result["macro_f1"], abs=1e-4), "scikit-learn takes `labels` as it is"
    run = Path(result["output_dir"])
    assert {p.name for p in run.iterdir()} >= {
        "metrics.json",
        "predictions.jsonl",
        "report.md",
        "confusion_matrix.png",
        "manifest.json",
    }
    lines = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert set(lines[0]) >= {"id", "label", "view", "predicted", "raw", "latency"}
    for view, accuracy in result["per_view"].items():
        low, high = result["intervals"]["per_view"][view]
        assert low <= accuracy <= high and high - low > 0, "six photos a view: a wide interval"
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "accuracy (95% CI)" in page and "no class probabilities in this run" in page, "empty AUC cells say why"


def test_the_server_gets_the_chat_layout_of_training(cli, ingested: Path) -> None:
    from skinvlm.prompts import conversation, instruction
    from skinvlm.rules import default_rules_path, load_rules

    with FakeOpenAI() as server:
        run_eval(cli, server, "--name", "layout", "--limit", "1")
    sent = server.bodies[0]["messages"]
    image = sent[0]["content"][0]
    assert sent == conversation(instruction(load_rules(default_rules_path())), image=image)
    assert image["type"] == "image_url", "the image first, then the instruction, as in training"


def test_rerun_asks_only_what_failed(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=scripted_answers()) as server:
        run_eval(cli, server, "--name", "again", "--concurrency", "1")
        asked = server.requests
        server.answer = label_conditioned  # the failing image gets an answer now
        result = run_eval(cli, server, "--name", "again")
        assert server.requests == asked + 1, "only the failed image is asked again"
    assert result["failed"] == 0 and result["n"] == 12 and result["from_cache"] == 11 and result["asked"] == 1


def test_another_model_under_the_same_name_is_asked_everything(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=scripted_answers()) as server:

        def images_asked(*args: str) -> tuple[dict, int]:
            before = len(server.images)
            result = run_eval(cli, server, "--name", "shared", *args)
            return result, len(set(server.images[before:]))

        first, asked = images_asked("--model", "model-a")
        again, asked_again = images_asked("--model", "model-a")
        other, asked_other = images_asked("--model", "model-b")
        longer, asked_longer = images_asked("--model", "model-b", "--max-tokens", "64")
    assert asked == 12 and first["from_cache"] == 0
    assert asked_again == 1 and again["from_cache"] == 11, "the same model: only the failed image again"
    assert asked_other == 12 and other["from_cache"] == 0 and "model-b" in other["backend"], "model B: every image"
    assert asked_longer == 12 and longer["from_cache"] == 0, "other generation settings are other answers"


def perfect_answers(body: dict) -> str:
    label = colour_label(mean_colour(body))
    return f"<label>{label}</label>\n<summary>테스트 소견입니다.</summary>"


def test_limit_takes_a_stratified_sample_and_compare_pairs_runs_on_the_same_photos(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=scripted_answers()) as server:
        small = run_eval(cli, server, "--name", "six", "--limit", "6")
    assert small["n"] == 6 and all(m["support"] == 1 for m in small["per_class"].values())
    with FakeOpenAI(answer=scripted_answers()) as server:
        run_eval(cli, server, "--name", "twelve")
    with FakeOpenAI(answer=perfect_answers) as server:
        run_eval(cli, server, "--name", "perfect")
    table = cli("eval", "--compare", "twelve", "perfect").stdout
    assert "twelve" in table and "perfect - twelve" in table and "mid-p McNemar" in table and "p = 0.0625" in table
    assert "no difference shown" in table, "4 of 11, one way: mid-p 0.0625, and the verdict says what the test says"
    both = cli.json("eval", "--compare", "twelve", "--compare", "perfect")
    (pair,) = both["paired"]
    # 11 photos both answered (one request of "twelve" failed): 7 right in both, 4 only in "perfect".
    assert pair["n"] == 11 and pair["test"] == {
        "both_right": 7, "only_first_right": 0, "only_second_right": 4, "both_wrong": 0, "p_value": 0.0625,
        "method": stats.TEST_METHODS["photo"], "verdict": "no difference shown",
    }  # fmt: skip
    assert pair["difference"]["accuracy"]["value"] == pytest.approx(4 / 11, abs=1e-4)
    low, high = pair["difference"]["accuracy"]["interval"]
    assert 0 < low <= pair["difference"]["accuracy"]["value"] <= high <= 1
    other = cli("eval", "--compare", "six", "twelve", ok=False)
    assert other.exit_code == 1 and "different photos (6 and 12, 6 in common)" in error_line(other.stderr)
    missing = cli("eval", "--compare", "nope", ok=False)
    assert missing.exit_code == 1 and "no eval run 'nope'" in missing.stderr


def test_intervals_and_probabilities_from_a_server_that_gives_logprobs(cli, ingested: Path) -> None:
    def likely(label: str) -> dict[str, float]:
        return {c: 0.75 if c == label else 0.05 for c in ("건선", "아토피", "여드름", "주사", "지루", "정상")}

    with FakeOpenAI(answer=perfect_answers, label_probabilities=likely) as server:
        result = run_eval(cli, server, "--name", "probs")
        assert all(body["logprobs"] and body["top_logprobs"] == 20 for body in server.bodies)
    predictions = [json.loads(line) for line in (ingested / "eval/probs/predictions.jsonl").read_text().splitlines()]
    for record in predictions:
        assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert max(record["probabilities"], key=record["probabilities"].get) == record["label"]
    probabilities = json.loads((ingested / "eval/probs/metrics.json").read_text())["probabilities"]
    assert probabilities["macro_auc"] == 1.0 and probabilities["top2_accuracy"] == 1.0
    assert probabilities["ece"] == pytest.approx(0.25, abs=1e-3), "confident at 0.75, right every time"
    low, high = result["intervals"]["accuracy"]
    assert low < 0.8 and high == 1.0, "12 of 12 right: Wilson's interval moves off 1.000 (never 1.000-1.000)"
    assert (ingested / "eval/probs/reliability.png").stat().st_size > 10_000
    with FakeOpenAI(answer=perfect_answers) as server:
        without = run_eval(cli, server, "--name", "nologprobs")
    assert without["probabilities"] is None and "no logprobs" in without["notes"][0]


def test_labels_only_stops_at_the_label(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=perfect_answers, token_seconds=0.001) as server:
        result = run_eval(cli, server, "--name", "quick", "--labels-only", "--no-probabilities")
        assert all(b["stop"] == ["</label>"] and b["max_tokens"] == 24 and "logprobs" not in b for b in server.bodies)
    assert result["accuracy"] == 1.0 and result["unparsed"] == 0


def test_a_refused_key_is_one_line(cli, ingested: Path) -> None:
    with FakeOpenAI(key="right") as server:
        result = cli("eval", "--base-url", server.url, "--api-key", "wrong-key", ok=False)
    assert result.exit_code == 1 and "401" in result.stderr and "wrong-key" not in result.stderr


# -- serve -----------------------------------------------------------------------------------
@pytest.fixture
def merged_folder(workspace: Path) -> Path:
    folder = workspace / "models" / "merged"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "skinvlm.json").write_text(json.dumps({"max_pixels": 802816}))
    return folder


def test_print_command_carries_resolution_and_limits(cli, merged_folder: Path) -> None:
    line = cli("serve", "--print-command", "--port", "8123", "--gpu", "0").stdout.strip()
    assert line.startswith(f"CUDA_VISIBLE_DEVICES=0 vllm serve {merged_folder} ")
    for part in (
        "--port 8123",
        "--max-model-len 4096",
        "--served-model-name skinvlm",
        "--host 127.0.0.1",
        "--limit-mm-per-prompt '{\"image\":1}'",
        '--mm-processor-kwargs \'{"min_pixels":3136,"max_pixels":802816}\'',
        "--tensor-parallel-size 1",
    ):
        assert part in line
    assert "--generation-config" not in line
    assert "--generation-config vllm" in cli("serve", "--print-command", "--generation-config-vllm").stdout
    two = cli("serve", "--print-command", "--gpu", "0,1").stdout
    assert "--tensor-parallel-size 1 --data-parallel-size 2" in two, "two GPUs: two replicas"


QWEN_7B = {  # Qwen2.5-VL-7B-Instruct's sizes: 8.29 B parameters
    "model_type": "qwen2_5_vl",
    "torch_dtype": "bfloat16",
    "hidden_size": 3584,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "vision_config": {"hidden_size": 1280, "depth": 32, "intermediate_size": 3420},
}


def test_serve_lays_gpus_out_for_throughput(cli, merged_folder: Path) -> None:
    (merged_folder / "config.json").write_text(json.dumps(QWEN_7B))

    def shown(*args: str) -> dict:
        return cli.json("serve", "--print-command", *args)

    four = shown("--gpu", "0,1,2,3", "--gpu-memory", "80")
    assert four["command"][four["command"].index("--tensor-parallel-size") :][:4] == [
        "--tensor-parallel-size", "1", "--data-parallel-size", "4"
    ], "a 7B model fits one 80 GiB GPU: four replicas"  # fmt: skip
    plan = four["layout"]
    assert (plan["tensor_parallel"], plan["data_parallel"]) == (1, 4)
    assert abs(plan["weights_gib"] - 8.29e9 * 2 / 2**30) < 0.3, "weights from the config: 8.29 B parameters in bf16"
    assert plan["kv_cache_gib"] == round(2 * 28 * 4 * 128 * 2 * 4096 / 2**30, 3)
    assert plan["summary"].startswith("4 GPU(s): tensor 1 x data 4; one replica needs ~17.6 GiB") and plan[
        "summary"
    ].endswith("a GPU offers 80.0 GiB x 0.9: fits one GPU")
    asked = shown("--gpu", "0,1,2,3", "--tensor-parallel-size", "2")["shell"]
    assert "--tensor-parallel-size 2 --data-parallel-size 2" in asked, "tensor 2 x data 2"
    small = shown("--gpu", "0,1,2,3", "--gpu-memory", "16")
    assert "--tensor-parallel-size 2 --data-parallel-size 2" in small["shell"]
    assert small["layout"]["summary"].endswith("a GPU offers 16.0 GiB x 0.9: does not fit one GPU: split over 2")
    one = shown("--gpu", "0", "--gpu-memory", "80")["shell"]
    assert "--tensor-parallel-size 1 " in one and "--data-parallel" not in one
    unknown = shown("--gpu", "0,1")
    assert "GPU memory unknown here" in unknown["layout"]["summary"] and unknown["layout"]["data_parallel"] == 2
    for args, message in (
        (("--gpu", "0,1,2", "--tensor-parallel-size", "2"), "--tensor-parallel-size 2 does not divide the 3 GPU(s)"),
        (("--gpu", "0,1", "--gpu-memory", "8"), "does not fit even split over all 2 GPU(s) of 7.2 GiB usable each"),
        (("--nodes", "2"), "--nodes 2 needs --master HOST:PORT"),
        (("--nodes", "2", "--master", "10.0.0.5"), "--nodes 2 needs --master HOST:PORT"),
        (("--nodes", "2", "--node-rank", "2", "--master", "h:1"), "--node-rank must be 0 to 1 with --nodes 2"),
    ):
        refused = cli("serve", "--print-command", *args, ok=False)
        assert refused.exit_code == 1 and message in error_line(refused.stderr), (args, refused.stderr)
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((1024, 1024), np.float16)}, str(merged_folder / "model.safetensors"))
    exact = shown("--gpu-memory", "80")["layout"]
    assert exact["weights_gib"] == round(1024 * 1024 * 2 / 2**30, 3), "the safetensors headers' count, served in bf16"


def test_serve_gives_every_node_its_data_parallel_command(cli, merged_folder: Path) -> None:
    (merged_folder / "config.json").write_text(json.dumps(QWEN_7B))
    args = ("serve", "--print-command", "--gpu", "0,1", "--nodes", "2", "--master", "10.0.0.5:13345", "--host")
    shown = cli.json(*args, "0.0.0.0", "--node-rank", "1")
    head, other = (node["command"] for node in shown["nodes"])
    assert shown["command"] == other and shown["endpoint"] == "http://10.0.0.5:8000/v1"
    shared = ["--data-parallel-size", "4", "--data-parallel-size-local", "2"]
    address = ["--data-parallel-address", "10.0.0.5", "--data-parallel-rpc-port", "13345"]
    assert "--headless" not in head and all(part in head for part in shared + address)
    assert head[head.index("--data-parallel-size") :][:8] == shared + address
    start = other.index("--headless")
    assert other[start : start + 7] == ["--headless", *shared, "--data-parallel-start-rank", "2"]
    assert other[start + 7 : start + 11] == address
    text = cli(*args, "0.0.0.0")
    assert text.stdout.splitlines()[0] == "# node 0" and text.stdout.splitlines()[2] == "# node 1"
    assert "layout: 2 GPU(s) on each of 2 nodes: tensor 1 x data 2" in text.stderr


def test_serve_without_vllm_or_model_says_what_to_do(cli, merged_folder: Path, workspace: Path) -> None:
    result = cli("serve", ok=False)
    assert result.exit_code == 1 and "vllm" in result.stderr and "eval --model-dir" in result.stderr
    empty = cli("serve", "--model-dir", str(workspace / "nothing"), ok=False)
    assert "config.json missing" in empty.stderr


STAND_IN = """
import http.server, os, pathlib, sys
if os.environ.get("STAND_IN_PID"):
    pathlib.Path(os.environ["STAND_IN_PID"]).write_text(str(os.getpid()))
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_serve_waits_for_health_and_stops_on_ctrl_c(merged_folder: Path, workspace: Path, tmp_path: Path) -> None:
    """A stand-in for vllm (no GPU here) that answers /health: the process handling is real."""
    script = tmp_path / "standin.py"
    script.write_text(STAND_IN)
    pid_file, port = tmp_path / "standin.pid", free_port()
    env = {**os.environ, "SKINVLM_VLLM_BIN": f"{sys.executable} {script}", "STAND_IN_PID": str(pid_file)}
    command = [sys.executable, "-m", "skinvlm", "serve", "-w", str(workspace), "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = proc.stdout.readline()
        assert "ready" in ready and f"http://127.0.0.1:{port}/v1" in ready
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        deadline = time.time() + 10
        while alive(int(pid_file.read_text())):
            assert time.time() < deadline, "the stand-in server outlived skinvlm serve"
            time.sleep(0.1)
    finally:
        proc.kill()
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_the_confusion_matrix_draws_the_unparsed_column_only_when_some_answer_was_unparsed(tmp_path: Path) -> None:
    rules = load_rules(default_rules_path())
    n = len(rules.class_names)
    clean = [[3 if i == j else 0 for j in range(n + 1)] for i in range(n)]
    result = {"name": "t", "accuracy": 1.0, "macro_f1": 1.0, "n": 3 * n, "backend": "server", "confusion_matrix": clean}
    drawn = plot_confusion(result, rules, tmp_path / "clean.png")
    assert len(drawn) == n and "unparsed" not in drawn and (tmp_path / "clean.png").stat().st_size > 10_000
    clean[0][n] = 1
    assert plot_confusion(result, rules, tmp_path / "one.png")[-1] == "unparsed"


def test_label_probabilities_are_read_from_token_bytes() -> None:
    """A tokenizer may join `>` to the label and end a token inside a Hangul syllable (vLLM and OpenAI give each
    token's bytes): the label is found inside the token, and a byte that could begin several classes counts for
    none of them."""
    classes = ["건선", "아토피", "여드름", "주사", "지루", "정상"]
    alternatives = [(">건".encode(), math.log(0.6)), (">아".encode(), math.log(0.3)), (b">\xec", math.log(0.1))]
    tokens = [(b"<label", []), (">건".encode(), alternatives), ("선</label>".encode(), [])]
    found = label_distribution(tokens, classes)
    assert found is not None and found["건선"] == pytest.approx(2 / 3) and found["아토피"] == pytest.approx(1 / 3)
    assert found["주사"] == found["지루"] == found["정상"] == 0
    assert label_distribution([(b"no label here", [])], classes) is None
    assert label_distribution(None, classes) is None


def test_a_wild_logprob_loses_that_photos_probabilities_only() -> None:
    """A server once sent a log-probability of 1e308 (math.exp overflowed and the whole eval stopped)."""
    classes = ["건선", "아토피", "여드름", "주사", "지루", "정상"]

    def tokens(*alternatives: tuple[str, float]) -> list:
        return [(b"<label>", []), ("건".encode(), [(a.encode(), lp) for a, lp in alternatives]), (b"</label>", [])]

    for wild in (1e308, float("nan"), float("inf"), 5.0):
        assert label_distribution(tokens(("건", -0.1), ("아", wild)), classes) is None
    tiny = label_distribution(tokens(("건", -1e4), ("아", -1e4 - math.log(3))), classes)
    assert tiny is not None and tiny["건선"] == pytest.approx(0.75) and tiny["아토피"] == pytest.approx(0.25)


def test_an_eval_of_mostly_unparsed_answers_says_so_and_its_manifest_names_the_run(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=lambda body: "피부가 붉어 보입니다. 아마도 염증 같습니다.") as server:
        result = run_eval(cli, server, "--limit", "6")
    assert result["accuracy"] == 0 and result["unparsed"] == 6
    assert any(note.startswith("6 of 6 answers have no <label>") and "피부가 붉어" in note for note in result["notes"])
    manifest = json.loads((Path(result["output_dir"]) / "manifest.json").read_text())
    assert manifest["settings"]["name"] == result["name"] and manifest["settings"]["base_url"] == server.url
    assert "6 of 6 answers have no <label>" in cli("eval", "--compare", result["name"]).stdout + json.dumps(result)


def test_the_report_font_is_cut_to_its_syllables_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    from skinvlm.report_html import hangul_woff

    with caplog.at_level(logging.WARNING):
        woff = hangul_woff("건선아토피여드름")
    if woff is None:
        pytest.skip("NanumGothic (koreanize-matplotlib) or fontTools is not installed here")
    assert woff.startswith(b"wOFF") and len(woff) < 100_000, "tens of KB, not the 4 MB font"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [], "a quiet stderr"
