"""Benchmark: the tiny model learns on a laptop CPU, and what image resolution costs.

    python benchmarks/train_cpu.py

(a) the proof run: ~60 class-coloured images, the tiny Qwen2.5-VL, `skinvlm train --backend hf`
    (160 steps), `merge`, `eval --model-dir` on 24 held-out images: wall time, peak RSS, accuracy;
(b) in the same run, 30 training steps at --max-pixels 12544 (112x112) against the baseline of
    50176 (224x224, 4x the vision tokens) on the same 224px images: seconds per step and peak RSS;
(c) 30 steps on 1024px photos (the AI Hub size: decoding and resizing each is real work) with
    --dataloader-workers 2 against the baseline of 0 (everything in the training process):
    steady-state seconds per step (the steps after the first quarter) and peak RSS of the process tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import run_measured  # noqa: E402

from skinvlm.demo.pipeline import tiny_train_flags  # noqa: E402

FAST = tiny_train_flags()


def skinvlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "skinvlm", *args]


def prepare(root: Path, size: int, env: dict[str, str], full_answers: bool = False) -> Path:
    """An ingested, described and fixed workspace; answers are the demo's one-liners, or with full_answers the
    shipped rule file's templates (a label and a three-sentence summary, as a real answer)."""
    import shutil

    from skinvlm.demo.pipeline import demo_rules
    from skinvlm.demo.synthetic import write_tree
    from skinvlm.rules import default_rules_path

    ws = root / "ws"
    ws.mkdir(parents=True)
    if full_answers:
        shutil.copy(default_rules_path(), ws / "postprocess.toml")
    else:
        demo_rules(ws / "postprocess.toml")
    write_tree(root / "src", {"train": 5, "test": 2}, size=size)
    for command in (("ingest", str(root / "src")), ("describe", "--template"), ("fix",)):
        subprocess.run(skinvlm(*command, "-w", str(ws)), env=env, check=True, capture_output=True)
    return ws


def seconds_per_step(ws: Path, tiny: Path, pixels: int, env: dict[str, str], workers: int = 0) -> tuple[float, float]:
    """Steady-state seconds per step of 30 steps (the first quarter left out: start-up and warm-up), peak MiB."""
    out = ws / f"adapter-{pixels}-{workers}"
    flags = ["--max-steps", "30", "--max-pixels", str(pixels), "--dataloader-workers", str(workers)]
    _, peak = run_measured(
        skinvlm("train", "-w", str(ws), "--model", str(tiny), *FAST, *flags, "--output", str(out)), env
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    timed = [(e["step"], e["seconds"]) for e in log if "loss" in e]
    (first, began), (last, ended) = timed[len(timed) // 4], timed[-1]
    return (ended - began) / (last - first), peak


def main() -> None:
    from skinvlm.demo.tiny import build

    tmp = Path(tempfile.mkdtemp(prefix="skinvlm-bench-train-"))
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    tiny = build(tmp / "tiny")
    ws = prepare(tmp / "proof", 112, env)
    train_s, train_mb = run_measured(
        skinvlm("train", "-w", str(ws), "--model", str(tiny), *FAST, "--max-steps", "160", "--max-pixels", "12544"), env
    )
    merge_s, merge_mb = run_measured(skinvlm("merge", "-w", str(ws)), env)
    result = subprocess.run(
        skinvlm("eval", "-w", str(ws), "--model-dir", str(ws / "models" / "merged"), "--json", "--max-tokens", "32"),
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    metrics = json.loads(result.stdout)
    print(
        f"(a) train 160 steps: {train_s:.0f}s, peak RSS {train_mb:.0f} MiB; merge {merge_s:.0f}s, "
        f"{merge_mb:.0f} MiB; held-out accuracy {metrics['accuracy']:.3f} on {metrics['n']} images"
    )
    big = prepare(tmp / "res", 224, env)
    small_step, small_mb = seconds_per_step(big, tiny, 12544, env)
    large_step, large_mb = seconds_per_step(big, tiny, 50176, env)
    print(
        f"(b) 224px images: --max-pixels 12544 {small_step:.3f} s/step, {small_mb:.0f} MiB; "
        f"baseline 50176 {large_step:.3f} s/step, {large_mb:.0f} MiB; speed ratio {large_step / small_step:.2f}x"
    )
    photos = prepare(tmp / "workers", 1024, env)
    inline_step, inline_mb = seconds_per_step(photos, tiny, 12544, env, workers=0)
    worker_step, worker_mb = seconds_per_step(photos, tiny, 12544, env, workers=2)
    print(
        f"(c) 1024px photos: --dataloader-workers 2 {worker_step:.3f} s/step, {worker_mb:.0f} MiB; "
        f"baseline 0 {inline_step:.3f} s/step, {inline_mb:.0f} MiB; speed ratio {inline_step / worker_step:.2f}x"
    )


if __name__ == "__main__":
    main()
