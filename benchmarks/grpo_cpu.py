"""Benchmark: GRPO after SFT on the tiny model, on a laptop CPU: does it answer better than where it started?

    python benchmarks/grpo_cpu.py [--sft-steps 40] [--grpo-steps 60] [--seeds 1] [--eval-rows 0]

With --eval-rows K (and --eval-steps), GRPO keeps the best of its evaluations on K development rows, the start
scored first (free answers parsed as eval parses them): the guard against a GRPO that hands back a worse model.
With --seeds N, GRPO runs N times from the same SFT start with seeds 1..N, each line its own.

An undertrained SFT adapter (the tiny recipe, --sft-steps steps on ~60 class-coloured images), then
`train --method grpo --from` it; each merged and evaluated by free generation (not --constrained) on the same 24
held-out images; then `eval --compare` pairs them (mid-p McNemar, bootstrap interval of the difference).
The baseline is the SFT adapter GRPO starts from, measured in the same run. Everything is seeded, but 40 steps
leave the SFT start at the edge of parsing, where CPU thread scheduling moves it between runs (8 to 18 of the 24
answers unparsed): compare the two lines of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_cpu import FAST, skinvlm  # noqa: E402

from skinvlm.render import kept_line  # noqa: E402

# GRPO on the tiny model: 8 answers sampled per photo, 2 photos per step, at the default temperature (0.3); a
# learning rate a tenth of the tiny SFT recipe's.
GRPO_FLAGS = [
    "--num-generations", "8", "--batch-size", "16", "--grad-accum", "1", "--learning-rate", "5e-4",
    "--max-completion-tokens", "48", "--dataloader-workers", "0",
]  # fmt: skip
EVAL_FLAGS = ["--json", "--max-tokens", "48"]


def run(command: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:])} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def evaluate(ws: Path, adapter: Path, name: str, env: dict[str, str]) -> dict:
    merged = ws / "models" / f"merged-{name}"
    run(skinvlm("merge", "-w", str(ws), "--adapter", str(adapter), "--output", str(merged)), env)
    return json.loads(run(skinvlm("eval", "-w", str(ws), "--model-dir", str(merged), "--name", name, *EVAL_FLAGS), env))


def figures(metrics: dict) -> str:
    return f"accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}, unparsed {metrics['unparsed']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--eval-rows", type=int, default=0, help="development rows GRPO selects on (0: none)")
    parser.add_argument("--eval-steps", type=int, default=10)
    args = parser.parse_args()
    from skinvlm.demo.pipeline import short_rules
    from skinvlm.demo.synthetic import write_tree
    from skinvlm.demo.tiny import build

    tmp = Path(tempfile.mkdtemp(prefix="skinvlm-bench-grpo-"))
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    tiny = build(tmp / "tiny")
    ws = tmp / "grpo" / "ws"
    ws.mkdir(parents=True)
    short_rules(ws / "postprocess.toml")  # one-line features and answers, as the tests train on
    write_tree(tmp / "grpo" / "src", {"train": 5, "test": 2}, size=112)
    for command in (("ingest", str(tmp / "grpo" / "src")), ("describe", "--template"), ("fix",)):
        run(skinvlm(*command, "-w", str(ws)), env)
    sft = ws / "models" / "adapter"
    run(skinvlm("train", "-w", str(ws), "--model", str(tiny), *FAST, "--max-steps", str(args.sft_steps)), env)
    before = evaluate(ws, sft, "sft", env)
    print(f"SFT, {args.sft_steps} steps (baseline): {figures(before)} of {before['n']} held-out images")
    for seed in range(1, args.seeds + 1):
        grpo(ws, sft, before, seed, args, env)


def grpo(ws: Path, sft: Path, before: dict, seed: int, args: argparse.Namespace, env: dict[str, str]) -> None:
    flags = [*GRPO_FLAGS, "--eval-rows", str(args.eval_rows), "--eval-steps", str(args.eval_steps)]
    output = ws / "models" / f"adapter-grpo-{seed}"
    clock = time.perf_counter()
    command = ["train", "-w", str(ws), "--method", "grpo", "--from", str(sft), *flags, "--seed", str(seed),
               "--max-steps", str(args.grpo_steps), "--output", str(output), "--json"]  # fmt: skip
    trained = json.loads(run(skinvlm(*command), env))
    grpo_seconds = time.perf_counter() - clock
    name = f"grpo-{seed}"
    after = evaluate(ws, Path(trained["output"]), name, env)
    compared = json.loads(run(skinvlm("eval", "-w", str(ws), "--compare", "sft", name, "--json"), env))
    pair = compared["paired"][0]
    rewards = [r["mean"] for r in trained["rewards"]]
    tenth = max(1, len(rewards) // 10)
    first, last = sum(rewards[:tenth]) / tenth, sum(rewards[-tenth:]) / tenth
    difference = pair["difference"]
    kept = trained.get("kept")
    no_worse = after["accuracy"] >= before["accuracy"] and after["unparsed"] <= before["unparsed"]
    chosen = f"; {kept_line(kept)}" if kept else ""
    print(f"SFT + GRPO seed {seed}, {args.grpo_steps} steps ({grpo_seconds:.0f}s){chosen}: {figures(after)}")
    print(
        f"  mean reward of the first and last {tenth} steps: {first:.3f} -> {last:.3f}; "
        f"accuracy {difference['accuracy']['value']:+.3f} {difference['accuracy']['interval']}, "
        f"macro F1 {difference['macro_f1']['value']:+.3f} {difference['macro_f1']['interval']} "
        f"({pair['resampled']}); {pair['test']['only_second_right']} right only after GRPO, "
        f"{pair['test']['only_first_right']} only before, p = {pair['test']['p_value']:.3g} "
        f"({pair['test']['verdict']}); "
        f"unparsed {before['unparsed']} -> {after['unparsed']}; "
        f"no worse than the start: {no_worse}"
    )


if __name__ == "__main__":
    main()
