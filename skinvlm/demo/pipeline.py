"""`skinvlm demo [DIR]`: every stage for real on a small synthetic set, offline, on a CPU, in minutes.

It writes an AI-Hub-shaped tree of clearly synthetic images (one colour per class, both views,
a few broken files), describes them from rule-file templates that contain English terms and
label variants, audits and fixes them, builds the tiny model, trains it with the hf backend,
merges it and evaluates it with a confusion matrix.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinvlm.eval_result import EvalResult
from skinvlm.rules import default_rules_path, load_rules
from skinvlm.workspace import Workspace

# Short demo answers (short sequences train fast on a CPU), with English terms and two label
# variants for audit and fix to find and repair.
DEMO_TEMPLATES = {
    "건선": ("경계가 뚜렷한 붉은 plaque 위에 은백색 scale이 덮여 있습니다.", ""),
    "아토피": ("경계가 흐린 erythema와 건조한 각질, 태선화가 보입니다.", "아토피성 피부염"),
    "여드름": ("모낭을 따라 면포와 붉은 papules이 흩어져 있습니다.", ""),
    "주사": ("얼굴 중앙부에 flushing과 모세혈관 확장이 보입니다.", ""),
    "지루": ("코 옆 주름에 기름진 노란 scale과 옅은 홍반이 있습니다.", "지루성 피부염"),
    "정상": ("홍반이나 구진 같은 병변 없이 피부결이 고릅니다.", ""),
}


@dataclass
class DemoResult:
    root: Path
    workspace: Path
    metrics: EvalResult
    seconds: float
    audit_before: int
    audit_after: int


# Small LoRA, high learning rate, 112px images: the tiny model learns the colours in ~2 CPU minutes.
# The demo, the tests and benchmarks/train_cpu.py all train with it.
TINY_RECIPE: dict[str, Any] = {
    "backend": "hf",
    "lora_r": 32,
    "lora_alpha": 64,
    "batch_size": 8,
    "grad_accum": 1,
    "learning_rate": 5e-3,
    "max_pixels": 112 * 112,
    "eval_rows": 0,
    "save_steps": 10_000,
    # 112 px images decode in microseconds: loader processes would only compete with the step for the cores.
    "dataloader_workers": 0,
}


DEMO_ABOUT = "synthetic images drawn by `skinvlm demo` (one flat colour per class, two views): not photos of skin"


def tiny_train_flags() -> list[str]:
    """TINY_RECIPE as `skinvlm train` flags."""
    return [part for key, value in TINY_RECIPE.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def demo_train_settings(model: Path, steps: int) -> Any:
    from skinvlm.train_settings import TrainSettings

    return TrainSettings(model=str(model), max_steps=steps, **TINY_RECIPE)


def demo_rules(path: Path) -> Path:
    """The shipped rule file with one-line features, the demo templates and a lower length bar."""
    text = default_rules_path().read_text(encoding="utf-8")
    text = re.sub(r'features = ".*"', 'features = "색과 분포로 구분"', text)
    for name, (template, tag) in DEMO_TEMPLATES.items():
        block = re.compile(rf'(\[labels\.classes\."{name}"\][^\[]*?)template = "[^"\n]*"')
        line = f'template = "{template}"' + (f'\ntemplate_label = "{tag}"' if tag else "")
        text = block.sub(r"\g<1>" + line, text, count=1)
    text = text.replace("min_summary_chars = 40", "min_summary_chars = 15")
    path.write_text(text, encoding="utf-8")
    return path


def short_rules(path: Path) -> Path:
    """The shipped rule file with one-line features and templates: short sequences train fast on a CPU."""
    text = default_rules_path().read_text(encoding="utf-8")
    text = re.sub(r'features = ".*"', 'features = "색으로 구분"', text)
    text = re.sub(r'template = ".*"', 'template = "사진에서 해당 소견이 보입니다."', text)
    path.write_text(text, encoding="utf-8")
    return path


def write_broken_files(images: Path) -> None:
    from skinvlm.demo.synthetic import image_bytes

    good = image_bytes("건선", 999, 112)
    (images / "TS_건선_정면" / "broken-truncated.png").write_bytes(good[: len(good) // 3])
    (images / "TS_여드름_측면" / "broken-empty.png").write_bytes(b"")
    (images / "TS_정상_정면" / "Thumbs.db").write_bytes(b"\0" * 32)


def run_demo(
    root: Path,
    say: Callable[[str], None],
    show: Callable[[str, Any], None],
    per_folder: int = 5,
    steps: int = 160,
    progress: Any = None,
) -> DemoResult:
    """`progress`: a render.TrainProgress for the training steps (a bar on a terminal, a line every 10 steps in a
    log), or None."""
    from skinvlm import audit, describe, evaluate, fix, ingest, merge, train
    from skinvlm.demo import tiny
    from skinvlm.demo.synthetic import write_tree
    from skinvlm.describe_settings import DescribeSettings
    from skinvlm.prompts import default_describe_prompt

    clock = time.perf_counter()
    ws = Workspace.open(root / "workspace")
    ws.root.mkdir(parents=True, exist_ok=True)
    rules = load_rules(demo_rules(ws.rules_file))
    say(f"1/5 writing a synthetic AI-Hub-shaped tree to {root / 'extracted_data'} (one colour per class)")
    write_tree(root / "extracted_data", {"train": per_folder, "test": 2}, size=112)
    write_broken_files(root / "extracted_data" / "Training" / "images")
    ingested = ingest.ingest(ws, root / "extracted_data", rules, force=True, about=DEMO_ABOUT)
    show("ingest", ingested)
    say("2/5 describing every image offline from the rule file's templates (describe --template)")
    describe.describe(ws, rules, DescribeSettings(template=True, redo=("all",)), default_describe_prompt(rules))
    say("3/5 audit -> fix -> audit")
    before = audit.audit(ws, rules, "described")
    show("audit", before)
    fixed = fix.fix(ws, rules)
    show("fix", fixed)
    say(f"4/5 building the tiny model, training it on the CPU ({steps} steps, hf backend) and merging it")
    model_dir = tiny.build(root / "tiny-model", rules)
    for folder in (ws.adapter, ws.merged):
        shutil.rmtree(folder, ignore_errors=True)  # a demo re-run starts its model afresh

    def summary(batch: Any, _: Any) -> None:
        show("batch", batch)
        if progress is not None:
            progress.begin()

    trained = train.train(
        ws, rules, demo_train_settings(model_dir, steps), summary, progress.step if progress is not None else None
    )
    if progress is not None:
        progress.close()
    show("train", trained)
    merged = merge.merge(ws, dtype="bfloat16")
    show("merge", merged)
    say("5/5 evaluating the merged model in-process on the held-out images")
    settings = evaluate.EvalSettings(name="demo", model_dir=str(ws.merged), confusion_matrix=True, max_tokens=32)
    metrics = evaluate.evaluate(ws, rules, settings)
    return DemoResult(
        root, ws.root, metrics, round(time.perf_counter() - clock, 1), before.problems, fixed.report.problems
    )
