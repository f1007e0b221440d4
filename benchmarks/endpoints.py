"""Benchmark: describe and eval over 1, 2 and 4 endpoints, and with one endpoint killed halfway.

    python benchmarks/endpoints.py --n 192 --latency 0.5 --concurrency 3

Each endpoint is the project's OpenAI-protocol test server (skinvlm/testing/openai_server.py) answering after a fixed
latency, so an endpoint's capacity is concurrency / latency. The baseline is one endpoint at the same per-endpoint
--concurrency, measured in the same run; N endpoints should reach at least 0.9 x N its throughput. Throughput is
counted over the requests (first request sent to last answer), apart from the stage's loading and saving, which
do not grow with endpoints. The servers share this machine's CPUs with the client: keep 4 x concurrency / latency
well below what they can encode and answer (on 2 cores: 0.97 x N at 24 images/s in all, 0.90-0.93 x N at 48,
0.74-0.82 x N at 128), or the CPUs are what is measured. In the
killed runs one endpoint dies (port closed, connections reset) after half its
share: every image must still get its answer, and the requests sent beyond one per image are what was in flight.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import ingested_workspace  # noqa: E402

from skinvlm.testing.openai_server import FakeOpenAI  # noqa: E402

MODEL = "skinvlm"


def run(kind: str, ws: Path, env: dict[str, str], servers: list[FakeOpenAI], concurrency: int, tag: str) -> dict:
    command = [sys.executable, "-m", "skinvlm", kind, "-w", str(ws), "--model", MODEL, "--json"]
    command += [arg for server in servers for arg in ("--base-url", server.url)]
    command += ["--concurrency", str(concurrency)]
    if kind == "describe":
        command += ["--split", "train", "--redo", "all"]
    else:
        command += ["--split", "test", "--name", tag, "--no-probabilities"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{kind} over {len(servers)} endpoint(s) failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(done.stdout)


def measure(kind: str, ws: Path, env: dict[str, str], count: int, args: argparse.Namespace, kill: bool) -> dict:
    share = args.n // count
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                FakeOpenAI(latency=args.latency, models=(MODEL,), die_after=share // 2 if kill and i == 0 else None)
            )
            for i in range(count)
        ]
        result = run(kind, ws, env, servers, args.concurrency, f"{count}-{'killed' if kill else 'all'}")
    times = sorted(t for server in servers for t in server.times)
    seconds = times[-1] - times[0] + args.latency
    answered = result["statuses"].get("ok", 0) if kind == "describe" else result["n"] - result["failed"]
    return {
        "endpoints": count,
        "answered": answered,
        "sent": sum(server.requests for server in servers),
        "per_second": args.n / seconds,
        "carried": [server.requests for server in servers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=192, help="images per command (rounded down to a multiple of 12)")
    parser.add_argument("--latency", type=float, default=0.5, help="seconds each endpoint takes per answer")
    parser.add_argument("--concurrency", type=int, default=3, help="requests in flight per endpoint")
    args = parser.parse_args()
    per_folder = max(1, args.n // 12)
    args.n = per_folder * 12
    ws, env = ingested_workspace("skinvlm-bench-endpoints-", {"train": per_folder, "test": per_folder}, size=128)
    capacity = args.concurrency / args.latency
    print(f"{args.n} images per command; each endpoint: latency {args.latency}s, concurrency {args.concurrency} "
          f"(at most {capacity:.0f} images/s); {os.cpu_count()} CPUs for client and servers")  # fmt: skip
    for kind in ("describe", "eval"):
        base = measure(kind, ws, env, 1, args, kill=False)
        print(f"\n{kind}: 1 endpoint {base['per_second']:6.1f} images/s (the baseline)")
        for count in (2, 4):
            many = measure(kind, ws, env, count, args, kill=False)
            ratio = many["per_second"] / base["per_second"]
            verdict = "ok" if ratio >= 0.9 * count else f"below the goal {0.9 * count:.1f}"
            print(f"{kind}: {count} endpoints {many['per_second']:6.1f} images/s  {ratio:4.2f}x the baseline  "
                  f"({ratio / count:.2f} x N, {verdict}); requests per endpoint {many['carried']}")  # fmt: skip
        for count in (2, 4):
            killed = measure(kind, ws, env, count, args, kill=True)
            lost = args.n - killed["answered"]
            print(f"{kind}: {count} endpoints, one killed halfway: {killed['per_second']:6.1f} images/s, "
                  f"{killed['answered']}/{args.n} answered ({lost} lost), {killed['sent']} requests sent "
                  f"({killed['sent'] - args.n} beyond one per image), per endpoint {killed['carried']}")  # fmt: skip


if __name__ == "__main__":
    main()
