"""train and merge on a real tiny Qwen2.5-VL built offline: the batches training sees (both backends'
real collators), learning, two DDP processes, merge in --dtype, vision-token parity, refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, error_line, fake_secret, run_cli
from test_audit_fix_publish import HubDouble

from skinvlm.demo.synthetic import write_tree
from skinvlm.train_settings import DEFAULT_MAX_PIXELS
from skinvlm.workspace import Workspace

needs_unsloth_zoo = pytest.mark.skipif(
    importlib.util.find_spec("unsloth_zoo") is None,
    reason="unsloth_zoo is not installed here; .ci/run installs it in its pinned GPU-stack environment",
)


def answers(workspace: Path) -> list[str]:
    return Workspace.open(workspace).load("fixed")["train"]["output"]


def answer_tokens(tiny: Path, answer: str) -> int:
    from skinvlm.vlm import load_processor

    return len(load_processor(tiny).tokenizer(answer, add_special_tokens=False).input_ids)


DRY = ("--dry-run", "--eval-rows", "0")  # no development share: the batch checked is the first training rows


def check_batch(summary: dict, backend: str, photos: Path, tiny: Path, image_tokens: int) -> None:
    """What both backends must collate from our rows."""
    assert summary["backend"] == backend and summary["rows"] == 12 and summary["dev_rows"] == 0
    assert summary["pixel_values"] is True
    assert summary["image_tokens_per_row"] == [image_tokens, image_tokens]
    first_two = answers(photos)[:2]
    assert summary["supervised_tokens_per_row"] == [answer_tokens(tiny, a) + 1 for a in first_two], (
        "answer + <|im_end|>"
    )
    assert summary["example_supervised"] == first_two[0] + "<|im_end|>"
    assert "<|image_pad|>×" in summary["example"] and summary["example"].index("<|image_pad|>") < summary[
        "example"
    ].index("이 얼굴 피부 사진을"), "the image comes before the instruction"


def test_tiny_model_reloads(tiny: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from skinvlm.vlm import load_processor

    model = AutoModelForImageTextToText.from_pretrained(tiny)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    processor = load_processor(tiny)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert "<|im_start|>" in processor.tokenizer.chat_template
    assert processor.tokenizer.decode(processor.tokenizer("여드름 구진").input_ids) == "여드름 구진"


def test_dry_run_hf_batches_carry_the_image_and_supervise_only_the_answer(cli, photos: Path, tiny: Path) -> None:
    summary = cli.json("train", *DRY, "--model", tiny, "--backend", "hf")
    check_batch(summary, "hf", photos, tiny, 1024)  # 1024x1024 at the default 1024*28*28 pixels
    assert summary["max_length"] == 4096 and summary["truncated_rows"] == 0
    assert summary["world_size"] == 1 and summary["effective_batch_size"] == 8
    check_batch(
        cli.json("train", *DRY, "--model", tiny, "--backend", "hf", "--max-pixels", "200704"),
        "hf",
        photos,
        tiny,
        256,
    )
    cut = cli.json("train", *DRY, "--model", tiny, "--backend", "hf", "--max-length", "1340")
    assert (
        cut["truncated_rows"] == 12
        and 0 < cut["supervised_tokens_per_row"][0] < summary["supervised_tokens_per_row"][0]
    )
    table = cli("train", *DRY, "--model", tiny, "--backend", "hf").stdout
    assert "image tokens per row" in table and "<|image_pad|>×1024" in table
    assert re.search(r"│ backend +│ 'hf'", table) and "Backend." not in table, "the settings as the flags take them"


@needs_unsloth_zoo
def test_dry_run_unsloth_runs_unsloths_own_collator_over_our_rows(photos: Path, tiny: Path) -> None:
    # A fresh process: Unsloth must be imported before transformers, which this one already holds.
    done = run_cli("train", "-w", photos, *DRY, "--model", tiny, "--backend", "unsloth", "--json")
    assert done.returncode == 0, done.stderr
    check_batch(json.loads(done.stdout), "unsloth", photos, tiny, 1024)
    smaller = run_cli("train", "-w", photos, *DRY, "--model", tiny, "--backend", "unsloth", "--json",
                      "--max-pixels", "200704")  # fmt: skip
    check_batch(json.loads(smaller.stdout), "unsloth", photos, tiny, 256)
    cut = run_cli("train", "-w", photos, *DRY, "--model", tiny, "--backend", "unsloth", "--json",
                  "--max-length", "1340")  # fmt: skip
    truncated = json.loads(cut.stdout)
    assert truncated["truncated_rows"] == 12, "Unsloth's collator cuts at --max-length, not at its own 2048"
    assert 0 < truncated["supervised_tokens_per_row"][0] < answer_tokens(tiny, answers(photos)[0]) + 1


def test_the_cli_loads_no_training_library_before_the_backend_is_chosen() -> None:
    """Unsloth must come before transformers, trl and peft; importing skinvlm must not pull them in."""
    import subprocess
    import sys

    code = "import sys, skinvlm.cli; print([m for m in ('transformers', 'trl', 'peft') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.slow
def test_tiny_model_learns_merges_in_dtype_and_names_held_out_images(
    cli, described: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = cli.json("train", "--model", tiny, "--max-steps", "160", *FAST)
    assert trained["world_size"] == 1 and trained["steps"] == 160 and trained["summary"]["pixel_values"]
    adapter = described / "models" / "adapter"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "skinvlm.json",
        "loss.png",
        "train_log.jsonl",
        "manifest.json",
        "chat_template.jinja",
    } <= {p.name for p in adapter.iterdir()}
    assert json.loads((adapter / "skinvlm.json").read_text())["max_pixels"] == 12544
    assert json.loads((adapter / "tokenizer.json").read_text())["truncation"] is None, (
        "no --max-length cut when serving"
    )
    log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] / 2
    merged = cli.json("merge", "--dtype", "float16")
    assert merged["dtype"] == "float16" and merged["changed_weights"] == merged["lora_targets"] == 26
    assert merged["merge_error"] < 0.1 * merged["adapter_effect"], "16-bit rounding only, the adapter is all there"
    folder = described / "models" / "merged"
    assert safetensors_dtypes(folder) == {"F16"}, "--dtype float16 is what the merged weights hold"
    generation = json.loads((folder / "generation_config.json").read_text())
    from skinvlm.vlm import load_processor

    assert load_processor(folder).tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    result = cli.json("eval", "--model-dir", str(folder), "--name", "tiny", "--max-tokens", "24")
    assert result["n"] == 24 and result["accuracy"] >= 0.9 and result["unparsed"] == 0
    low, high = result["intervals"]["accuracy"]
    assert low <= result["accuracy"] <= high and result["intervals"]["resamples"] >= 1000
    predictions = [json.loads(line) for line in (described / "eval/tiny/predictions.jsonl").read_text().splitlines()]
    for record in predictions:
        assert sum(record["probabilities"].values()) == pytest.approx(1, abs=1e-4), "six labels scored, normalised"
    probabilities = json.loads((described / "eval/tiny/metrics.json").read_text())["probabilities"]
    assert probabilities["n"] == 24 and probabilities["macro_auc"] >= 0.9 and 0 <= probabilities["ece"] <= 1
    assert set(probabilities["auc"]) == {"건선", "아토피", "여드름", "주사", "지루", "정상"}
    referral = json.loads((described / "eval/tiny/metrics.json").read_text())["selective"]
    assert referral["target_accuracy"] == 0.95 and referral["chosen_on"] + referral["measured_on"] == 24
    if result["accuracy"] == 1.0:  # every answer right: some threshold reaches 95%, and it holds on the other half
        assert referral["threshold"] is not None and referral["accuracy"] == 1.0
    quick = cli.json("eval", "--model-dir", str(folder), "--name", "quick", "--labels-only", "--no-probabilities")
    assert quick["accuracy"] == result["accuracy"] and quick["probabilities"] is None
    answers = [
        json.loads(line)["raw"] for line in (described / "eval/quick/predictions.jsonl").read_text().splitlines()
    ]
    assert all(answer.rstrip().endswith("</label>") for answer in answers), "generation stopped at </label>"
    model_card_states_the_evaluated_figures(cli, described, folder, result)
    hub = HubDouble().install(monkeypatch)
    cli(
        "publish",
        "clinic/skin-model",
        "--model-dir",
        folder,
        "--yes",
        env={"HF_TOKEN": fake_secret("hf_", "model-upload")},
    )
    uploaded = {p.name: p.read_bytes() for p in (described / "publish" / "model").iterdir()}
    assert hub.repos["clinic/skin-model"] == uploaded and hub.made["clinic/skin-model"]["repo_type"] == "model"
    assert hub.made["clinic/skin-model"]["private"] is True


def model_card_states_the_evaluated_figures(cli, workspace: Path, folder: Path, evaluated: dict) -> None:
    """`publish --model-dir --dry-run`: the folder to upload, and a card with the figures of the eval runs."""
    cli("publish", "me/skin-model", "--model-dir", folder, "--dry-run", "--eval-run", "tiny", "--license", "mit")
    out = workspace / "publish" / "model"
    card = (out / "README.md").read_text(encoding="utf-8")
    for needed in (
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "language:\n- ko",
        "license: mit",
        f"value: {evaluated['accuracy']}",
        f"accuracy: {evaluated['accuracy']:.4f} (95% CI",
        f"macro F1: {evaluated['macro_f1']:.4f} (95% CI",
        "expected calibration error",
        "| 정면 |",
        "## Intended use",
        "not a diagnosis",
        "## Out of scope",
        "## Limitations",
        "vllm serve me/skin-model",
        "--mm-processor-kwargs",
        "| 건선 | psoriasis | 5 | 5 | 10 |",  # the training split, per class and view
    ):
        assert needed in card, needed
    assert "base_model" not in card, "a local base is not a Hub model"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "skinvlm.json", "README.md", "chat_template.jinja"} <= names and "manifest.json" not in names
    weights = next(out.glob("*.safetensors"))
    assert weights.stat().st_ino == (folder / weights.name).stat().st_ino, "linked, not copied"
    for text in ("README.md", "skinvlm.json"):
        assert str(workspace) not in (out / text).read_text(encoding="utf-8"), "no path of this machine"
    same_second(workspace / "eval" / "tiny", workspace / "eval" / "quick")  # as on a fast machine
    from test_leakage import external_folder

    external_folder(workspace.parent / "clinic-b")
    outside = cli.json("eval", "--model-dir", folder, "--name", "outside", "--dataset", workspace.parent / "clinic-b",
                       "--labels-only", "--no-probabilities")  # fmt: skip
    assert outside["external"]["scored"] == 9 and outside["external"]["out_of_scope"]["n"] == 3, "by English names"
    default = cli("publish", "me/skin-model", "--model-dir", folder, "--dry-run")
    assert default.exit_code == 0 and "Eval run `quick`" in (out / "README.md").read_text(encoding="utf-8")
    assert "## External validation\n\n- `outside`: accuracy" in (out / "README.md").read_text(encoding="utf-8")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "license: unknown" in card and "see-base-model" not in card, "a local base: no card to point to"
    for honest in (
        "## Consent and ethics approval",
        "## Population",
        "## Regulatory status",
        "To be written by the team",
    ):
        assert honest in card, honest
    assert "Korean patients" not in card and "AI Hub" not in card, "nothing the manifests do not say"
    assert "photos not described at ingest" in card and "offline class templates, no model" in card
    decision = {"reviewer": "kim", "id": "x", "decision": "accept", "label": "건선", "time": 1.0}
    (workspace / "journal").mkdir(exist_ok=True)
    (workspace / "journal" / "review.jsonl").write_text(json.dumps(decision) + "\n", encoding="utf-8")
    stale = cli("publish", "me/skin-model", "--model-dir", folder, "--dry-run", ok=False)
    assert "`skinvlm status` calls it stale): run `skinvlm fix` then" in error_line(stale.stderr)
    (workspace / "journal" / "review.jsonl").unlink()


def manifest_splits(workspace: Path) -> dict[str, int]:
    return json.loads((workspace / "models" / "adapter" / "manifest.json").read_text(encoding="utf-8"))["counts"][
        "splits"
    ]


def same_second(first: Path, second: Path) -> None:
    """Makes two eval runs' manifests say they finished in the same second; `second`'s metrics stay the newer."""
    kept = json.loads((first / "manifest.json").read_text(encoding="utf-8"))["finished"]
    manifest = json.loads((second / "manifest.json").read_text(encoding="utf-8"))
    (second / "manifest.json").write_text(json.dumps({**manifest, "finished": kept}), encoding="utf-8")


def safetensors_dtypes(folder: Path) -> set[str]:
    import struct

    found = set()
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


@pytest.mark.slow
def test_a_piped_run_prints_its_steps_and_losses_as_it_goes(described: Path, tiny: Path) -> None:
    flags = [*FAST, "--max-steps", "30", "--eval-steps", "10", "--eval-rows", "8"]
    done = run_cli("train", "-w", described, "--model", tiny, *flags)
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^step (\d+)/30  loss (\d+\.\d{4}) .*lr .*s/step.*ETA", done.stderr, flags=re.MULTILINE)
    assert [int(step) for step, _ in steps] == [1, 10, 20, 30], done.stderr
    assert re.search(r"^step 20/30 .* eval \d+\.\d{4}", done.stderr, flags=re.MULTILINE), "eval loss once measured"
    assert "\x1b[" not in done.stderr, "no terminal codes in a log"


@pytest.mark.slow
def test_resume_continues_from_the_newest_checkpoint(cli, described: Path, tiny: Path) -> None:
    cli("train", "--model", tiny, *FAST, "--max-steps", "6", "--save-steps", "3")
    adapter = described / "models" / "adapter"
    assert {p.name for p in (adapter / "checkpoints").glob("checkpoint-*")} == {"checkpoint-3", "checkpoint-6"}
    again = cli("train", "--model", tiny, *FAST, "--max-steps", "10", ok=False)
    assert again.exit_code == 1 and "--resume" in again.stderr, "a finished adapter is never overwritten"
    resumed = cli.json("train", "--model", tiny, *FAST, "--max-steps", "10", "--save-steps", "3", "--resume")
    assert resumed["steps"] == 10
    log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == list(range(1, 11)), "7-10 follow 1-6, none repeated"


OUT_OF_MEMORY_SHIM = """
# A test double at the GPU boundary: CUDA's allocator running out of memory, which a CPU cannot do. The backward
# pass after the first N raises torch.OutOfMemoryError as CUDA's caching allocator does.
import os
import torch

calls, backward = [0], torch.Tensor.backward


def running_out(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] > int(os.environ["OUT_OF_MEMORY_AFTER"]):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 79.10 GiB in all")
    return backward(self, *args, **kwargs)


torch.Tensor.backward = running_out
"""


@pytest.mark.slow
def test_running_out_of_gpu_memory_is_one_line_that_says_what_to_lower_and_resume_takes_it(
    cli, described: Path, tiny: Path, tmp_path: Path
) -> None:
    (tmp_path / "out_of_memory_shim.py").write_text(OUT_OF_MEMORY_SHIM)
    start = "import out_of_memory_shim, runpy; runpy.run_module('skinvlm', run_name='__main__')"
    command = [sys.executable, "-c", start]
    flags = ["train", "-w", str(described), "--model", str(tiny), *FAST, "--max-steps", "8", "--save-steps", "3"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OUT_OF_MEMORY_AFTER": "4"}
    failed = subprocess.run([*command, *flags], capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    line = failed.stderr.strip().splitlines()[-1]  # after the run's summary and progress
    assert line.startswith("error: the GPU ran out of memory at step 5: try --batch-size 1 --grad-accum 8"), line
    assert "--max-pixels 6272" in line and line.endswith("checkpoint-3 is kept: add --resume to go on from it"), line
    resumed = cli.json("train", "--model", tiny, *FAST, "--max-steps", "8", "--batch-size", "1", "--grad-accum", "8",
                       "--resume")  # fmt: skip
    assert resumed["steps"] == 8 and resumed["effective_batch_size"] == 8, "the advice taken, the run goes on"


@pytest.mark.slow
def test_two_processes_train_one_adapter(described: Path, tiny: Path) -> None:
    """`--processes 2` on a CPU: torchrun, DDP over gloo; rank 0 alone writes and prints."""
    done = run_cli(
        "train", "-w", described, "--model", tiny, *FAST, "--batch-size", "4", "--max-steps", "40",
        "--processes", "2", "--json", "--eval-rows", "8", "--eval-steps", "10",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one JSON object: the second rank printed nothing
    assert result["world_size"] == 2 and result["effective_batch_size"] == 8 and result["steps"] == 40
    # rank 0 scored each evaluation and both ranks went on together (the decision is broadcast)
    assert [e["step"] for e in result["evals"]] == [10, 20, 30, 40] and result["best_step"] in (10, 20, 30, 40)
    assert all("macro_f1" in e for e in result["evals"])
    assert done.stderr.count("training batch") == 1
    adapter = described / "models" / "adapter"
    assert len(list(adapter.glob("adapter_model.safetensors"))) == 1
    losses = [e["loss"] for e in map(json.loads, (adapter / "train_log.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 40 and losses[-1] < losses[0] / 2


@pytest.mark.slow
def test_training_eval_and_vllm_see_a_1024px_photo_as_the_same_vision_tokens(cli, photos: Path, tiny: Path) -> None:
    from PIL import Image

    from skinvlm.vlm import load_processor

    training = cli.json("train", "--dry-run", "--model", tiny, "--backend", "hf")["image_tokens_per_row"]
    at_default = ["--max-pixels", str(DEFAULT_MAX_PIXELS), "--batch-size", "2"]
    cli("train", "--model", tiny, *FAST, *at_default, "--max-steps", "2")
    cli("merge")
    folder = photos / "models" / "merged"
    evaluated = cli.json("eval", "--model-dir", folder, "--name", "parity", "--limit", "2", "--max-tokens", "2")
    command = shlex.split(cli("serve", "--print-command").stdout)
    vllm_kwargs = json.loads(command[command.index("--mm-processor-kwargs") + 1])
    # vLLM builds the HF processor of the folder with these kwargs and counts grid_thw / merge_size**2.
    served = load_processor(folder, **vllm_kwargs).image_processor
    grid = served(images=[Image.new("RGB", (1024, 1024))], return_tensors="pt")["image_grid_thw"]
    serving = int(grid.prod()) // served.merge_size**2
    assert training == [1024, 1024] and evaluated["image_tokens"] == {"min": 1024, "max": 1024} and serving == 1024


def test_image_resolution_goes_through_size_and_survives_saving(tiny: Path, tmp_path: Path) -> None:
    import warnings

    from PIL import Image

    from skinvlm.vlm import load_processor, set_image_resolution, vision_tokens

    processor = load_processor(tiny)
    set_image_resolution(processor, 200704)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # newer transformers warns on every call when min/max_pixels are set
        grid = processor.image_processor(images=[Image.new("RGB", (1024, 1024))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // 4 == 256 == vision_tokens(processor, 1024, 1024)
    processor.save_pretrained(tmp_path)
    assert vision_tokens(load_processor(tmp_path), 1024, 1024) == 256


def test_train_refuses_what_it_cannot_use(cli, described: Path, tiny: Path) -> None:
    gpu = cli("train", "--model", str(tiny), "--gpu", "0", "--backend", "hf", ok=False)
    assert gpu.exit_code == 1 and "CUDA sees 0" in gpu.stderr
    unsloth = cli("train", "--model", str(tiny), "--backend", "unsloth", ok=False)
    assert "Unsloth cannot load vision models on the CPU" in unsloth.stderr and "--dry-run" in unsloth.stderr
    resume = cli("train", "--model", str(tiny), "--resume", *FAST, ok=False)
    assert "no checkpoint" in resume.stderr
    bad = cli("train", "--gpu", "x", ok=False)
    assert "--gpu takes GPU numbers" in bad.stderr
    short = cli("train", "--model", str(tiny), "--dry-run", "--max-length", "100", ok=False)
    assert short.exit_code == 1 and "leaves no room for answers" in short.stderr
    processes = cli("train", "--model", str(tiny), "--processes", "0", ok=False)
    assert "--processes must be at least 1" in processes.stderr
    no_adapter = cli("merge", ok=False)
    assert no_adapter.exit_code == 1 and "run `skinvlm train` first" in no_adapter.stderr


def test_train_skips_unusable_rows_and_refuses_when_none_are_left(
    cli, tmp_path: Path, workspace: Path, tiny: Path
) -> None:
    write_tree(tmp_path / "src", {"train": 1, "test": 1}, size=32)
    cli("ingest", tmp_path / "src")
    cli("describe", "--template", "--split", "test")  # the train split stays pending: no usable answer
    with pytest.warns(UserWarning, match="datasets/fixed is missing: training on datasets/described"):
        result = cli("train", "--model", str(tiny), *FAST, ok=False)
    assert result.exit_code == 1 and "no usable rows" in result.stderr


@pytest.mark.slow
def test_training_keeps_the_best_evaluation_and_stops_without_improvement(cli, described: Path, tiny: Path) -> None:
    """Held-out rows scored by class at each evaluation; the adapter of the best one is kept, not the last."""
    result = cli.json(
        "train", "--model", tiny, *FAST, "--max-steps", "120", "--eval-rows", "12", "--eval-steps", "10",
        "--patience", "3", "--keep-checkpoints",
    )  # fmt: skip
    evals = result["evals"]
    assert evals and all({"step", "loss", "accuracy", "macro_f1"} <= set(e) for e in evals)
    best = evals[0]
    for entry in evals[1:]:  # a higher F1 wins; an equal one too, unless its eval loss is worse
        tie = entry["macro_f1"] == best["macro_f1"] and entry["loss"] <= best["loss"]
        best = entry if entry["macro_f1"] > best["macro_f1"] or tie else best
    assert result["best_step"] == best["step"]
    later = [e for e in evals if e["step"] > best["step"]]
    assert all(e["macro_f1"] <= best["macro_f1"] for e in later)
    assert manifest_splits(described)["dev"] > 0, "chosen on development rows held out of the training split"
    assert result["steps"] == 120 or len(later) == 3, "stopped after --patience evaluations without improvement"
    adapter = described / "models" / "adapter"
    kept = (adapter / "adapter_model.safetensors").read_bytes()
    assert kept == (adapter / "best" / "adapter_model.safetensors").read_bytes(), "the best evaluation's adapter"
    manifest = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["counts"]["best_step"] == best["step"] and manifest["counts"]["evals"] == evals
    wrong = cli("train", "--model", tiny, *FAST, "--select-by", "accuracy", "--output", "elsewhere", ok=False)
    assert "--select-by is one of macro_f1, loss, last" in wrong.stderr
