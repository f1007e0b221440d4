"""Benchmark: does the review queue put the photos that need a clinician first?

    python benchmarks/review_order.py [--per-folder 10] [--wrong 12]

A synthetic set (one colour per class, both views) with `--wrong` training photos moved into another class's
folder: their folder label is wrong, and the description, written for that label, agrees with it, so only the
photo tells. The tiny model is trained on the set as it is, merged, and `eval --split train` scores every training
photo's class probabilities (what a clinic runs before its review). Then the queue `skinvlm review` serves is
compared with the baseline, a random order (the mean of 200 seeded shuffles): how many of the wrong labels the
first 20% of decisions meet in each, and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_cpu import FAST, skinvlm  # noqa: E402

SHARE = 0.2  # the first fifth of the decisions


def run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:4])} failed:\n{done.stderr[-2000:]}")


def plant_wrong_labels(src: Path, count: int, seed: int) -> set[str]:
    """Move `count` training photos into another class's folder of the same view; their sha256s."""
    folders = sorted((src / "Training" / "images").iterdir())
    photos = sorted(p for folder in folders for p in folder.glob("*.png"))
    rng, moved = random.Random(seed), set()
    for photo in rng.sample(photos, count):
        label, view = photo.parent.name.split("_")[1:]
        others = [f for f in folders if f.name.endswith(f"_{view}") and f.name.split("_")[1] != label]
        moved.add(hashlib.sha256(photo.read_bytes()).hexdigest())
        shutil.move(photo, rng.choice(others) / f"moved_{photo.name}")
    return moved


def found_first(order: list[str], wrong: set[str]) -> int:
    return sum(sha in wrong for sha in order[: round(SHARE * len(order))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-folder", type=int, default=10, help="training photos per class and view")
    parser.add_argument("--wrong", type=int, default=12, help="training photos given a wrong folder label")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    from skinvlm.demo.pipeline import demo_rules
    from skinvlm.demo.synthetic import write_tree
    from skinvlm.demo.tiny import build
    from skinvlm.review import load_items, open_review
    from skinvlm.rules import load_rules
    from skinvlm.workspace import Workspace

    tmp = Path(tempfile.mkdtemp(prefix="skinvlm-bench-review-order-"))
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    tiny, ws = build(tmp / "tiny"), tmp / "ws"
    ws.mkdir()
    demo_rules(ws / "postprocess.toml")
    write_tree(tmp / "src", {"train": args.per_folder, "test": 2}, size=112)
    wrong = plant_wrong_labels(tmp / "src", args.wrong, args.seed)
    for command in (("ingest", str(tmp / "src")), ("describe", "--template"), ("fix",)):
        run(skinvlm(*command, "-w", str(ws)), env)
    run(skinvlm("train", "-w", str(ws), "--model", str(tiny), *FAST, "--max-steps", "160"), env)
    run(skinvlm("merge", "-w", str(ws)), env)
    merged = str(ws / "models" / "merged")
    run(
        skinvlm("eval", "-w", str(ws), "--model-dir", merged, "--split", "train", "--labels-only", "--name", "scan"),
        env,
    )
    workspace = Workspace.open(ws)
    rules = load_rules(ws / "postprocess.toml")
    state, _ = open_review(workspace, rules, None, 0.0)
    train = [i for i in state.order if state.items[i].split == "train"]
    queue = [state.items[i].sha256 for i in train]
    baseline = []
    for seed in range(200):
        shuffled = queue[:]
        random.Random(seed).shuffle(shuffled)
        baseline.append(found_first(shuffled, wrong))
    mean = sum(baseline) / len(baseline)
    ours = found_first(queue, wrong)
    flagged = sum(state.items[i].flagged for i in train)
    items = len(load_items(workspace, rules)[1])
    print(
        f"{len(queue)} training photos ({items} records in review), {len(wrong)} with a wrong folder label; "
        f"{flagged} flagged by the scan. In the first {SHARE:.0%} of decisions ({round(SHARE * len(queue))}): "
        f"skinvlm's queue meets {ours} of {len(wrong)}, a random order {mean:.1f} (mean of {len(baseline)} "
        f"shuffles): {ours / mean:.1f}x"
    )


if __name__ == "__main__":
    main()
