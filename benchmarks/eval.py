"""Benchmark: `skinvlm eval` one request at a time (the seeds' loop) vs --concurrency 32.

    python benchmarks/eval.py --n 96 --latency 0.25

Both evaluate the same N images against the same local OpenAI-protocol server with a fixed
latency, in one run; prints both throughputs and the ratio.
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

from skinvlm.demo.openai_server import FakeOpenAI  # noqa: E402


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
    print(f"images: {n}, server latency {args.latency}s")
    print(f"one at a time (seeds' loop): {one['throughput']:7.2f} images/s")
    print(f"--concurrency {args.concurrency:<14}: {many['throughput']:7.2f} images/s")
    print(
        f"speed-up: {many['throughput'] / one['throughput']:.1f}x "
        f"(ideal {min(args.concurrency, n)}x; latency p50 {many['latency_p50']}s)"
    )


if __name__ == "__main__":
    main()
