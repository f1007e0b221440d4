"""train and merge on a real tiny Qwen2.5-VL built offline: masking, learning, merge, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from skinvlm.demo import tiny_train_flags
from skinvlm.rules import default_rules_path, load_rules
from skinvlm.synthetic import write_tree
from skinvlm.tiny import build
from skinvlm.workspace import Workspace

FAST = tiny_train_flags()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny") / "model")


def short_rules(path: Path) -> Path:
    """The shipped rule file with one-line features and templates: short sequences train fast on a CPU."""
    text = default_rules_path().read_text(encoding="utf-8")
    text = re.sub(r'features = ".*"', 'features = "색으로 구분"', text)
    text = re.sub(r'template = ".*"', 'template = "사진에서 해당 소견이 보입니다."', text)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def described(cli, tmp_path: Path, workspace: Path) -> Path:
    """~60 train and 24 held-out class-coloured 112px images, described offline from templates."""
    short_rules(workspace / "postprocess.toml")
    write_tree(tmp_path / "src", {"train": 5, "test": 2}, size=112)
    cli("ingest", tmp_path / "src")
    cli("describe", "--template")
    cli("fix")
    return workspace


def test_tiny_model_reloads(tiny: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from skinvlm.vlm import load_processor

    model = AutoModelForImageTextToText.from_pretrained(tiny)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    processor = load_processor(tiny)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert "<|im_start|>" in processor.tokenizer.chat_template
    assert processor.tokenizer.decode(processor.tokenizer("여드름 구진").input_ids) == "여드름 구진"


def test_loss_covers_only_the_assistant_answer(described: Path, tiny: Path) -> None:
    from skinvlm.train import TrainSettings, build_trainer, training_rows

    ws = Workspace.open(described)
    rules = load_rules(described / "postprocess.toml")
    data, stage, skipped = training_rows(ws)
    assert stage == "fixed" and skipped == 0
    settings = TrainSettings(model=str(tiny), backend="hf", max_pixels=12544, eval_rows=0)
    trainer = build_trainer(settings, rules, data, "hf", False, described / "models" / "adapter")
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    tokenizer = trainer.processing_class.tokenizer
    for row, labels in enumerate(batch["labels"]):
        trained = tokenizer.decode([t for t in labels.tolist() if t != -100])
        assert trained == data["train"][row]["output"] + "<|im_end|>\n"
    assert (batch["input_ids"] == trainer.model.config.image_token_id).any(), "image tokens are in the input"


@pytest.mark.slow
def test_tiny_model_learns_merges_and_names_held_out_images(cli, described: Path, tiny: Path) -> None:
    cli("train", "--model", str(tiny), "--max-steps", "160", *FAST)
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
    log = [json.loads(line) for line in (adapter / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0] / 2
    merged = cli("merge").stdout
    assert "verified" in merged and "26/26 LoRA-targeted weights changed" in merged
    folder = described / "models" / "merged"
    generation = json.loads((folder / "generation_config.json").read_text())
    from skinvlm.vlm import load_processor

    assert load_processor(folder).tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    result = cli.json("eval", "--model-dir", str(folder), "--name", "tiny", "--max-tokens", "24")
    assert result["n"] == 24 and result["accuracy"] >= 0.9 and result["unparsed"] == 0


def test_train_refuses_what_it_cannot_use(cli, described: Path, tiny: Path) -> None:
    gpu = cli("train", "--model", str(tiny), "--gpu", "0", "--backend", "hf", ok=False)
    assert gpu.exit_code == 1 and "CUDA sees 0" in gpu.stderr
    unsloth = cli("train", "--model", str(tiny), "--backend", "unsloth", ok=False)
    assert "Unsloth cannot load vision models on the CPU" in unsloth.stderr
    resume = cli("train", "--model", str(tiny), "--resume", *FAST, ok=False)
    assert "no checkpoint" in resume.stderr
    bad = cli("train", "--gpu", "x", ok=False)
    assert "--gpu takes GPU numbers" in bad.stderr
    no_adapter = cli("merge", ok=False)
    assert no_adapter.exit_code == 1 and "run `skinvlm train` first" in no_adapter.stderr


def test_train_skips_unusable_rows_and_refuses_when_none_are_left(
    cli, tmp_path: Path, workspace: Path, tiny: Path
) -> None:
    write_tree(tmp_path / "src", {"train": 1, "test": 1}, size=32)
    cli("ingest", tmp_path / "src")
    cli("describe", "--template", "--limit", "0")  # everything pending: no usable answer
    result = cli("train", "--model", str(tiny), *FAST, ok=False)
    assert result.exit_code == 1 and "no usable rows" in result.stderr
