"""Benchmark: `skinvlm describe` vs the seeds' sequential loop, against a server with fixed latency.

    python benchmarks/describe.py --n 240 --latency 0.5 --concurrency 16

Both send the same N images to the same local OpenAI-protocol server (skinvlm/testing/openai_server.py)
in one run. Prints both throughputs, their ratio, and skinvlm's time against the ideal
N x latency / concurrency.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import ingested_workspace  # noqa: E402

from skinvlm.testing.openai_server import FakeOpenAI  # noqa: E402


def seeds_loop(url: str, workspace: Path) -> float:
    """One request at a time with the sync client, as the seeds' step 2 did."""
    from datasets import load_from_disk
    from openai import OpenAI

    client = OpenAI(api_key="sk-bench", base_url=url, max_retries=0)
    data = load_from_disk(str(workspace / "datasets" / "ingested"))
    start = time.perf_counter()
    for split in data:
        for row in data[split]:
            buffer = io.BytesIO()
            row["image"].save(buffer, format="PNG")
            data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            content = [
                {"type": "text", "text": f"이 사진의 진단은 '{row['label']}'입니다."},
                {"type": "image_url", "image_url": {"url": data_url}},
            ]
            client.chat.completions.create(
                model="gpt-4o-mini", max_tokens=512, messages=[{"role": "user", "content": content}]
            )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=240, help="images (rounded down to a multiple of 12)")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per answer")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    per_folder = max(1, args.n // 12)
    n = per_folder * 12
    ws, env = ingested_workspace("skinvlm-bench-describe-", {"train": per_folder}, size=256)
    with FakeOpenAI(latency=args.latency) as server:
        sequential = seeds_loop(server.url, ws)
    with FakeOpenAI(latency=args.latency) as server:
        describe = [sys.executable, "-m", "skinvlm", "describe", "-w", str(ws), "--base-url", server.url]
        describe += ["--concurrency", str(args.concurrency), "--json"]
        run = subprocess.run(describe, env=env, check=True, capture_output=True, text=True)
        peak = server.max_in_flight
    ours = json.loads(run.stdout)["seconds"]
    ideal = n * args.latency / args.concurrency
    print(f"images: {n}, server latency {args.latency}s, concurrency {args.concurrency} (peak in flight {peak})")
    print(f"seeds' sequential loop : {n / sequential:7.1f} images/s  {sequential:6.1f}s")
    print(f"skinvlm describe       : {n / ours:7.1f} images/s  {ours:6.1f}s  (stage time incl. loading and saving)")
    print(f"speed-up vs sequential : {sequential / ours:.1f}x")
    print(f"vs ideal N x latency / concurrency = {ideal:.2f}s: {ours / ideal:.2f}x")


if __name__ == "__main__":
    main()
