"""GRPO after SFT (`train --method grpo --from ADAPTER`) on the real tiny Qwen2.5-VL: the rewards, the refusals,
few-shot sampling, a run whose reward rises and whose merged model answers better than its start, the dry run's
sampled answers, SIGTERM; and the GPU kit's part order over a results file."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, error_line, run_cli, short_rules

from skinvlm.demo.synthetic import write_tree
from skinvlm.prompts import format_answer
from skinvlm.rules import default_rules_path, load_rules
from skinvlm.train.rewards import format_reward, label_reward, length_reward, reward_functions, scores
from skinvlm.train_settings import TrainSettings

LONG = "코 옆 주름과 눈썹 주변에 옅은 홍반이 있고 그 위에 기름기 있는 노란빛 인설이 붙어 있습니다."
# GRPO on the tiny model: 8 answers per photo, 2 photos per step, at the default temperature (0.3).
GRPO = [
    "--method", "grpo", "--num-generations", "8", "--batch-size", "16", "--grad-accum", "1", "--learning-rate", "5e-4",
    "--max-completion-tokens", "48", "--eval-rows", "0", "--dataloader-workers", "0",
]  # fmt: skip


def test_rewards_score_the_class_its_family_and_the_answer_form() -> None:
    rules = load_rules(default_rules_path())
    assert label_reward(format_answer("지루", LONG), "지루", rules, 0.5) == 1.0
    assert label_reward(format_answer("지루성 피부염", LONG), "지루", rules, 0.5) == 1.0, "through the aliases"
    assert label_reward(format_answer("아토피", LONG), "지루", rules, 0.5) == 0.5, "the dermatitis family"
    assert label_reward(format_answer("건선", LONG), "지루", rules, 0.5) == 0.0
    assert label_reward("지루", "지루", rules, 0.5) == 0.0, "no <label>: no credit"
    assert format_reward(format_answer("지루", LONG), rules) == 1.0
    assert format_reward(format_answer("지루", LONG + " The scale is greasy."), rules) == 0.5, "English words"
    assert format_reward(format_answer("지루", "홍반."), rules) == 0.5, "shorter than [audit] min_summary_chars"
    assert format_reward("<label>지루</label> 홍반", rules) == 0.0
    assert format_reward(format_answer("피부결과", LONG), rules) == 0.0, "a label that is no class does not parse"
    assert length_reward(format_answer("지루", LONG), truncated=False) == 1.0
    assert length_reward(format_answer("지루", LONG) + " 그리고", truncated=False) == 0.0, "words past the answer"
    assert length_reward(format_answer("지루", LONG), truncated=True) == 0.0
    settings = TrainSettings(method="grpo", from_adapter="x")
    assert scores(format_answer("아토피", LONG), "지루", rules, settings) == {"label": 0.5, "format": 1.0, "total": 1.0}
    functions, weights = reward_functions(rules, settings)
    assert [f.__name__ for f in functions] == ["label", "format"] and weights == [1.0, 0.5], "length is off by default"
    completions = [
        [{"role": "assistant", "content": format_answer("지루", LONG)}],
        [{"role": "assistant", "content": "?"}],
    ]
    assert functions[0](completions=completions, label=["지루", "지루"], completion_ids=[[1], [2]]) == [1.0, 0.0]


def test_the_rule_file_checks_its_groups(tmp_path: Path) -> None:
    from skinvlm.errors import SkinvlmError

    shipped = default_rules_path().read_text(encoding="utf-8")
    for groups, message in (('x = ["아토피", "두드러기"]', "names 두드러기, which is not a class"),
                            ('x = ["아토피"]', "must list two classes at least")):  # fmt: skip
        path = tmp_path / "rules.toml"
        path.write_text(shipped.replace('dermatitis = ["아토피", "지루"]', groups), encoding="utf-8")
        with pytest.raises(SkinvlmError, match=message):
            load_rules(path)
    assert load_rules(default_rules_path()).same_group("지루", "아토피")


def fake_adapter(folder: Path, base: Path, classes: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "skinvlm.json").write_text(json.dumps({"base_model": str(base), "max_pixels": 12544, "classes": classes}))
    return folder


def test_grpo_refuses_what_it_cannot_start_from(cli, described: Path, tiny: Path, tmp_path: Path) -> None:
    classes = load_rules(described / "postprocess.toml").class_names
    start = fake_adapter(tmp_path / "sft", tiny, classes)
    cases = [
        ([], "--method grpo starts from a trained SFT adapter: pass --from"),
        (["--from", tmp_path], "holds no adapter (adapter_config.json missing)"),
        (["--from", start, "--select-by", "loss"], "--select-by loss means nothing for GRPO"),
        (["--from", start, "--num-generations", "3"], "(2 x 4) must be a multiple of it"),
        (["--from", start, "--backend", "unsloth"], "--method grpo runs on --backend hf"),
        (["--from", start, "--model", tmp_path], "was trained on"),
        (["--from", fake_adapter(tmp_path / "other", tiny, ["a", "b"])], "names the classes a, b"),
    ]
    from skinvlm.train.preflight import grpo_needs_triton

    if grpo_needs_triton():  # the pinned GPU stack without a GPU (.ci/run's second environment): it says so first
        cases = [(["--from", start], "trl 1.15 (the Unsloth pins) runs GRPO only with Triton")]
    for flags, message in cases:
        result = cli("train", "--method", "grpo", *flags, ok=False)
        assert result.exit_code == 1 and message in error_line(result.stderr), (flags, result.stderr)


def test_per_class_takes_a_seeded_sample_of_each_class(cli, described: Path, tiny: Path) -> None:
    dry = ("train", "--model", str(tiny), *FAST, "--dry-run", "--eval-rows", "0", "--json")
    two = json.loads(cli(*dry, "--per-class", "2").stdout)
    assert two["rows"] == 12, "2 photos of each of the 6 classes"
    with pytest.warns(UserWarning, match="--per-class 50: fewer training photos in 건선 10"):
        every = json.loads(cli(*dry, "--per-class", "50").stdout)
    assert every["rows"] == 60


# -- a real SFT adapter, then GRPO from it ------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_start(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Path:
    """A workspace (60 train, 24 held-out class-coloured images) and an undertrained SFT adapter (40 steps)."""
    root = tmp_path_factory.mktemp("grpo")
    ws = root / "ws"
    ws.mkdir()
    short_rules(ws / "postprocess.toml")
    write_tree(root / "src", {"train": 5, "test": 2}, size=112)
    for command in (("ingest", root / "src"), ("describe", "--template"), ("fix",)):
        assert run_cli(*command, "-w", ws).returncode == 0
    trained = run_cli("train", "-w", ws, "--model", tiny, *FAST, "--max-steps", "40")
    assert trained.returncode == 0, trained.stderr
    return ws


@pytest.fixture
def started(sft_start: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sft_start, tmp_path / "ws"))


def held_out(ws: Path, adapter: Path, name: str) -> dict:
    merged = ws / "models" / f"merged-{name}"
    assert run_cli("merge", "-w", ws, "--adapter", adapter, "--output", merged).returncode == 0
    result = run_cli("eval", "-w", ws, "--model-dir", merged, "--name", name, "--max-tokens", "48", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_grpo_raises_the_reward_and_its_merged_model_leaves_fewer_answers_unparsed(started: Path) -> None:
    sft = started / "models" / "adapter"
    result = run_cli("train", "-w", started, *GRPO, "--from", sft, "--max-steps", "60", "--json")
    assert result.returncode == 0, result.stderr
    trained = json.loads(result.stdout)
    assert trained["method"] == "grpo" and trained["from_adapter"] == str(sft)
    grpo = started / "models" / "adapter-grpo"
    assert trained["output"] == str(grpo) and trained["steps"] == 60
    rewards = trained["rewards"]
    assert [r["step"] for r in rewards] == list(range(1, 61)) and {"mean", "label", "format"} <= set(rewards[0])
    # Each step samples 2 photos: its label reward swings with which 2 (this start knows a few classes), so the
    # test reads the reward this start can raise for sure, the answers' form, over a third of the run at a time;
    # benchmarks/grpo_cpu.py reports the total.
    # Training is seeded and the CPU deterministic (two runs give the same rewards to the last digit): the figures
    # are pinned, with room for a library release to move them a little.
    first, last = (sum(r["format"] for r in part) / 20 for part in (rewards[:20], rewards[-20:]))
    assert last > first and last == pytest.approx(0.48, abs=0.2), (first, last)
    snapshot = json.loads((grpo / "train_settings.json").read_text())
    assert snapshot["method"] == "grpo" and snapshot["from_adapter"] == str(sft)
    assert json.loads((grpo / "skinvlm.json").read_text())["from_adapter"] == str(sft)
    before, after = held_out(started, sft, "sft"), held_out(started, grpo, "grpo")
    # What the form reward moves: 40 SFT steps leave the start at the edge of parsing (20 of 24 held-out answers
    # unparsed in most runs of the suite, fewer in some: the start is not pinned), and GRPO's form reward brings
    # them to (nearly) none, never more than the start had. Which class the answers name is not pinned: with
    # --eval-rows 0 nothing guards it; in use, selection on the development rows scores the start before step 1
    # and keeps it when no step beats it (the test below); benchmarks/grpo_cpu.py reports accuracy and macro F1.
    assert before["n"] == after["n"] == 24 and after["unparsed"] <= min(before["unparsed"], 4), (before, after)
    status = run_cli("status", "-w", started)
    assert "GRPO" in status.stdout, status.stdout


@pytest.mark.slow
def test_grpo_dry_run_scores_sampled_answers_before_any_step(started: Path) -> None:
    sft = started / "models" / "adapter"
    dry = run_cli("train", "-w", started, *GRPO, "--from", sft, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    sampled = json.loads(dry.stdout)["sampled"]
    assert json.loads(dry.stdout)["method"] == "grpo"
    assert len(sampled) == 2 * 8 and {"class", "answer", "label", "format", "total"} <= set(sampled[0])
    assert all(row["total"] == row["label"] + 0.5 * row["format"] for row in sampled)
    shown = run_cli("train", "-w", started, *GRPO, "--from", sft, "--dry-run")
    assert "sampled answers and their rewards" in shown.stdout and "mean reward" in shown.stdout
    assert not (started / "models" / "adapter-grpo").exists(), "a dry run trains nothing"


@pytest.mark.slow
def test_grpo_scores_its_start_before_step_one_and_keeps_it_when_no_step_does_better(started: Path) -> None:
    sft = started / "models" / "adapter"
    flags = ["--from", sft, "--eval-rows", "8", "--eval-steps", "2", "--max-steps", "4", "--learning-rate", "0.5"]
    result = run_cli("train", "-w", started, *GRPO, *flags, "--json")
    assert result.returncode == 0, result.stderr
    trained = json.loads(result.stdout)
    steps = [e["step"] for e in trained["evals"]]
    assert steps[0] == 0 and steps in ([0, 2, 4], [0, 2]), "the start is a candidate too (a collapse stops early)"
    first = trained["evals"][0]
    assert {"unparsed", "classes_answered", "samples"} <= set(first), "free answers scored, as eval scores them"
    assert first["samples"] and {"id", "label", "answer"} <= set(first["samples"][0]), "what the answers say"
    better = [e for e in trained["evals"][1:] if e["macro_f1"] > first["macro_f1"]
              or (e["macro_f1"] == first["macro_f1"] and e["unparsed"] < first["unparsed"])]  # fmt: skip
    assert trained["best_step"] == (max(better, key=lambda e: (e["macro_f1"], -e["unparsed"]))["step"] if better else 0)
    kept = trained["kept"]
    assert kept["first"]["step"] == 0 and kept["kept"]["step"] == trained["best_step"]
    shown = run_cli("status", "-w", started)
    assert shown.returncode == 0
    # A learning rate this high wrecks the adapter (seeded, so every run: macro F1 0.17 at the start, 0 after
    # steps 2 and 4): no step beats the start, which is handed back unchanged.
    assert trained["best_step"] == 0 and not better, trained["evals"]
    from safetensors.torch import load_file

    kept = load_file(started / "models" / "adapter-grpo" / "adapter_model.safetensors")
    start = load_file(sft / "adapter_model.safetensors")
    assert kept.keys() == start.keys() and all(kept[k].equal(start[k]) for k in kept)


@pytest.mark.slow
def test_sigterm_in_grpo_saves_a_checkpoint_to_resume_from(started: Path) -> None:
    sft = started / "models" / "adapter"
    command = [sys.executable, "-m", "skinvlm", "train", "-w", str(started), *GRPO, "--from", str(sft)]
    proc = subprocess.Popen(
        [*command, "--max-steps", "2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = started / "models" / "adapter-grpo" / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = proc.stderr.read()
    assert "a checkpoint was saved at step" in stderr and "--resume" in stderr, stderr
    checkpoint = max(int(p.name.split("-")[1]) for p in (log.parent / "checkpoints").glob("checkpoint-*"))
    resumed = subprocess.run([*command, "--max-steps", str(checkpoint + 2), "--resume", "--json"],
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == checkpoint + 2


# -- the GPU kit spends a lent GPU's minutes on what was never measured first ---------------------------
def test_gpu_smoke_runs_the_parts_never_measured_on_this_gpu_first(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import gpu_smoke

    machine = gpu_smoke.Machine(False, 1, "NVIDIA H200", True, True, True)
    versions = {"torch": "2.11.0", "transformers": "5.17.0", "trl": "1.15.0"}
    listed = [p.name for p in gpu_smoke.parts(machine)]
    ran = ["prepare", "tiny-hf-bf16", "tiny-hf-4bit", "7b-model"]
    results = [{"part": name, "gpu": "NVIDIA H200", "versions": versions, "status": "ran"} for name in ran]
    results.append({"part": "tiny-unsloth-4bit", "gpu": "NVIDIA H200", "versions": versions, "status": "failed"})
    results.append({"part": "serve", "gpu": "NVIDIA H100", "versions": versions, "status": "ran"})
    order = [p.name for p in gpu_smoke.ordered(gpu_smoke.parts(machine), results, "NVIDIA H200", versions)]
    assert sorted(order) == sorted(listed)
    first_measured = min(order.index(name) for name in ("tiny-hf-4bit",))
    unmeasured = [name for name in listed if name not in ran]
    assert all(order.index(name) < first_measured for name in unmeasured), order
    assert order.index("prepare") < order.index("tiny-unsloth-bf16") and order.index("7b-model") < order.index(
        "7b-unsloth-4bit"
    ), "a need runs before its part, measured or not"
    assert order.index("tiny-hf-bf16") < order.index("tiny-grpo"), "GRPO starts from the SFT part's adapter"
    newer = versions | {"transformers": "5.18.0"}
    assert [p.name for p in gpu_smoke.ordered(gpu_smoke.parts(machine), results, "NVIDIA H200", newer)] == listed
    recorded = tmp_path / "results.json"
    gpu_smoke.record(
        recorded, [{"part": "tiny-grpo", "status": "ran", "s_per_step": 0.3}], "NVIDIA H200", versions, "d"
    )
    assert gpu_smoke.measured(gpu_smoke.read_results(recorded), "tiny-grpo", "NVIDIA H200", versions)


def test_selection_keeps_the_start_unless_a_step_beats_it_and_names_a_collapse() -> None:
    from skinvlm.selection import better, collapse

    start = {"step": 0, "loss": None, "macro_f1": 0.4, "unparsed": 3, "classes_answered": 4}
    assert not better({"step": 10, "loss": None, "macro_f1": 0.4, "unparsed": 3}, start, "macro_f1"), "a tie: start"
    assert better({"step": 10, "loss": None, "macro_f1": 0.4, "unparsed": 2}, start, "macro_f1"), "parses more"
    assert not better({"step": 10, "loss": None, "macro_f1": 0.3, "unparsed": 0}, start, "macro_f1")
    assert better({"step": 10, "loss": None, "macro_f1": 0.5, "unparsed": 9}, start, "macro_f1")
    lost_form = collapse({"unparsed": 8, "classes_answered": 3}, start, 16)
    assert lost_form is not None and "lose their form: unparsed 3 -> 8 of 16" in lost_form
    one_class = collapse({"unparsed": 0, "classes_answered": 1}, start, 16)
    assert one_class is not None and "one class (the start named 4)" in one_class
    assert collapse({"unparsed": 4, "classes_answered": 3}, start, 16) is None
