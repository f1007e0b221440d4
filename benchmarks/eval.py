"""Benchmark: `skinvlm eval` one request at a time (the seeds' loop) vs --concurrency 32, and full answers vs
--labels-only.

    python benchmarks/eval.py --n 96 --latency 0.25

(a) both evaluate the same N images against the same local OpenAI-protocol server with a fixed latency, in one
    run; prints both throughputs and the ratio.
(b) the tiny Qwen2.5-VL, trained for 160 steps on the CPU on the shipped templates (a label and a three-sentence
    summary), answers 24 held-out images in-process (`eval --model-dir`): full answers (--max-tokens 256)
    against --labels-only (generation stops at </label>), both without class probabilities; then once with
    them, for the trust figures (intervals, AUC, calibration).
(c) the same model trained only 12 steps (its free answers mostly out of format) on the same 24 images: free
    answers (baseline) against --constrained (the label the class scores rank first), both --labels-only:
    accuracy, macro F1, unparsed, time per image, and the referral threshold its probabilities give.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import ingested_workspace  # noqa: E402
from train_cpu import FAST, prepare, skinvlm  # noqa: E402

from skinvlm.testing.openai_server import FakeOpenAI  # noqa: E402


def run_eval(workspace: Path, url: str, name: str, concurrency: int, env: dict[str, str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "skinvlm",
        "eval",
        "-w",
        str(workspace),
        "--base-url",
        url,
        "--name",
        name,
        "--concurrency",
        str(concurrency),
        "--json",
    ]
    return json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=96, help="test images (rounded down to a multiple of 12)")
    parser.add_argument("--latency", type=float, default=0.25, help="seconds the server takes per answer")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    per_folder = max(1, args.n // 12)
    ws, env = ingested_workspace("skinvlm-bench-eval-", {"train": 1, "test": per_folder}, size=128)
    with FakeOpenAI(latency=args.latency) as server:
        one = run_eval(ws, server.url, "one-at-a-time", 1, env)
    with FakeOpenAI(latency=args.latency) as server:
        many = run_eval(ws, server.url, "concurrent", args.concurrency, env)
    n = one["n"]
    print(f"(a) images: {n}, server latency {args.latency}s")
    print(f"one at a time (seeds' loop): {one['throughput']:7.2f} images/s")
    print(f"--concurrency {args.concurrency:<14}: {many['throughput']:7.2f} images/s")
    print(
        f"speed-up: {many['throughput'] / one['throughput']:.1f}x "
        f"(ideal {min(args.concurrency, n)}x; latency p50 {many['latency_p50']}s)"
    )
    labels_only_speedup()


def labels_only_speedup() -> None:
    import os
    import tempfile

    from skinvlm.demo.tiny import build

    tmp = Path(tempfile.mkdtemp(prefix="skinvlm-bench-labels-"))
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    ws = prepare(tmp / "proof", 112, env, full_answers=True)
    tiny = build(tmp / "tiny")
    train = skinvlm("train", "-w", str(ws), "--model", str(tiny), *FAST, "--max-steps", "160", "--max-pixels", "12544")
    subprocess.run(train, env=env, check=True, capture_output=True)
    subprocess.run(skinvlm("merge", "-w", str(ws)), env=env, check=True, capture_output=True)

    def evaluate(name: str, *flags: str) -> dict:
        command = skinvlm("eval", "-w", str(ws), "--model-dir", str(ws / "models/merged"), "--name", name, "--json")
        return json.loads(
            subprocess.run([*command, *flags], env=env, check=True, capture_output=True, text=True).stdout
        )

    full = evaluate("full", "--no-probabilities", "--batch-size", "1")
    quick = evaluate("labels-only", "--no-probabilities", "--batch-size", "1", "--labels-only")
    print(
        f"(b) tiny model in-process, {full['n']} images one at a time, answer time per image (p50): full answers "
        f"{full['latency_p50'] * 1000:.0f} ms (accuracy {full['accuracy']:.3f}); --labels-only "
        f"{quick['latency_p50'] * 1000:.0f} ms (accuracy {quick['accuracy']:.3f}): "
        f"{full['latency_p50'] / quick['latency_p50']:.1f}x faster; whole runs with model loading "
        f"{full['throughput']:.2f} vs {quick['throughput']:.2f} images/s"
    )
    trust = evaluate("probabilities", "--labels-only")
    p = trust["probabilities"]
    print(
        f"    with class probabilities: accuracy {trust['accuracy']:.3f} {trust['intervals']['accuracy']}, "
        f"macro F1 {trust['macro_f1']:.3f} {trust['intervals']['macro_f1']}, macro AUC {p['macro_auc']}, "
        f"top-2 {p['top2_accuracy']}, ECE {p['ece']}; {trust['throughput']:.2f} images/s"
    )
    adapter, merged = ws / "models" / "undertrained", ws / "models" / "undertrained-merged"
    short = [
        *skinvlm("train", "-w", str(ws), "--model", str(tiny), *FAST),
        "--max-steps",
        "12",
        "--output",
        str(adapter),
    ]
    subprocess.run(short, env=env, check=True, capture_output=True)
    merge = skinvlm("merge", "-w", str(ws), "--adapter", str(adapter), "--output", str(merged))
    subprocess.run(merge, env=env, check=True, capture_output=True)

    def undertrained(name: str, *flags: str) -> dict:
        command = skinvlm("eval", "-w", str(ws), "--model-dir", str(merged), "--name", name, "--json", *flags)
        return json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)

    free = undertrained("undertrained-free", "--labels-only", "--batch-size", "1")
    forced = undertrained("undertrained-constrained", "--labels-only", "--batch-size", "1", "--constrained")
    chosen = forced["selective"] or {}
    print(
        f"(c) trained 12 steps, {free['n']} images: free answers accuracy {free['accuracy']:.3f}, macro F1 "
        f"{free['macro_f1']:.3f}, {free['unparsed']} unparsed, {free['latency_p50'] * 1000:.0f} ms/image; "
        f"--constrained accuracy {forced['accuracy']:.3f}, macro F1 {forced['macro_f1']:.3f}, "
        f"{forced['unparsed']} unparsed, {forced['latency_p50'] * 1000:.0f} ms/image; referral for "
        f"{chosen.get('target_accuracy')}: threshold {chosen.get('threshold')}, coverage {chosen.get('coverage')}, "
        f"accuracy {chosen.get('accuracy')}, AURC {chosen.get('aurc')}"
    )


if __name__ == "__main__":
    main()
