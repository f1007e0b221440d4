"""Benchmark: peak memory of `ingest` and `describe` on big photos stays flat in workers, concurrency and count.

    python benchmarks/memory.py --side 7000 --n 12

Writes N photos of SIDE x SIDE pixels (49 MP at 7000: under the 64 MP --max-pixels-in; a few
hundred KB each on disk, ~150 MB each once decoded) in an AI-Hub-shaped tree, then measures the
peak RSS of the whole process tree of:
(a) `skinvlm ingest` with --workers 1 (the baseline) and --workers 8, on N/2 and on N photos;
(b) `skinvlm describe` against a local OpenAI-protocol server with --concurrency 1 (the baseline)
    and --concurrency 16.
Prints each peak and its ratio to the baseline: ~1.0 is flat.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _measure import run_measured  # noqa: E402

from skinvlm.testing.openai_server import FakeOpenAI  # noqa: E402

CLASSES = ["건선", "아토피", "여드름", "주사", "지루", "정상"]


def big_tree(root: Path, n: int, side: int) -> Path:
    from PIL import Image

    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        folder = root / "Training" / "images" / f"TS_{label}_정면"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (side, side), (40 * (i % 6), 120, 200)).save(folder / f"{i:03d}.png", compress_level=9)
    return root


def skinvlm(*args: object) -> list[str]:
    return [sys.executable, "-m", "skinvlm", *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=7000, help="photo side in pixels")
    parser.add_argument("--n", type=int, default=12, help="photos")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skinvlm-bench-memory-"))
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OPENAI_API_KEY": "sk-bench"}
    half = big_tree(tmp / "half", args.n // 2, args.side)
    full = big_tree(tmp / "full", args.n, args.side)
    print(f"{args.n} photos of {args.side}x{args.side} ({args.side**2 / 1e6:.0f} MP each)")
    rows = []
    for name, src, workers in (("baseline: 1 worker", full, 1), ("8 workers", full, 8), ("8 workers, half", half, 8)):
        ws = tmp / f"ws-{workers}-{src.name}"
        seconds, peak = run_measured(skinvlm("ingest", src, "-w", ws, "--workers", workers), env)
        rows.append(("ingest", name, seconds, peak))
    ws = tmp / "ws-1-full"
    with FakeOpenAI(latency=0.05) as server:
        for name, concurrency in (("baseline: concurrency 1", 1), ("concurrency 16", 16)):
            command = skinvlm("describe", "-w", ws, "--base-url", server.url, "--concurrency", concurrency)
            seconds, peak = run_measured([*command, "--redo", "all"], env)
            rows.append(("describe", name, seconds, peak))
    for stage in ("ingest", "describe"):
        base = next(peak for s, name, _, peak in rows if s == stage and name.startswith("baseline"))
        for s, name, seconds, peak in rows:
            if s == stage:
                print(f"{stage:<9} {name:<24} {seconds:6.1f}s  peak RSS {peak:6.0f} MiB  {peak / base:4.2f}x baseline")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
