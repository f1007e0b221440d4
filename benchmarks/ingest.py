"""Benchmark: `skinvlm ingest` (full decode of every image) vs the seeds' way (no validation).

    python benchmarks/ingest.py --n 240

Generates N 1024x1024 RGBA PNGs in an AI-Hub-shaped tree, then, in the same run, times
(a) pandas -> Dataset.from_pandas -> cast_column("image", Image()) -> save_to_disk, and
(b) the `skinvlm ingest` command. Prints images/s of both, their ratio, and peak RSS of each
process tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _measure import line, run_measured  # noqa: E402

CLASSES = ["건선", "아토피", "여드름", "주사", "지루", "정상"]

SEEDS_WAY = """
import sys, pandas as pd
from pathlib import Path
from datasets import Dataset, DatasetDict, Image
rows = {"train": [], "test": []}
for split, top in (("train", "Training"), ("test", "Validation")):
    for path in sorted((Path(sys.argv[1]) / top / "images").rglob("*.png")):
        label = path.parent.name.split("_")[1]
        rows[split].append({"image": str(path), "label": label})
parts = {s: Dataset.from_pandas(pd.DataFrame(r)).cast_column("image", Image()) for s, r in rows.items()}
DatasetDict(parts).save_to_disk(sys.argv[2])
"""


def photo_like(args: tuple[Path, int]) -> None:
    """A 1024x1024 RGBA PNG with smooth shading and sensor-like noise (compresses like a photo)."""
    import numpy as np
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:1024, 0:1024]
    base = np.stack([(xx / 5 + seed) % 256, (yy / 5) % 256, ((xx + yy) / 9) % 256], -1)
    rgb = (base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)
    rgba = np.dstack([rgb, np.full((1024, 1024), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)


def make_tree(root: Path, n: int) -> None:
    jobs = []
    for i in range(n):
        split, top, prefix = ("test", "Validation", "VS") if i % 9 == 0 else ("train", "Training", "TS")
        folder = root / top / "images" / f"{prefix}_{CLASSES[i % 6]}_{'정면' if i % 2 else '측면'}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:05d}.png", i))
    with ProcessPoolExecutor() as pool:
        list(pool.map(photo_like, jobs, chunksize=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=240, help="images to generate")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skinvlm-bench-ingest-"))
    try:
        src = tmp / "extracted_data"
        print(f"generating {args.n} 1024x1024 RGBA PNGs in {src} ...", flush=True)
        make_tree(src, args.n)
        size_mb = sum(p.stat().st_size for p in src.rglob("*.png")) / 2**20
        env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_CACHE": str(tmp / "cache")}
        seeds_s, seeds_mb = run_measured([sys.executable, "-c", SEEDS_WAY, str(src), str(tmp / "seeds")], env)
        ours_s, ours_mb = run_measured(
            [sys.executable, "-m", "skinvlm", "ingest", str(src), "-w", str(tmp / "ws"), "--json"], env
        )
        print(f"images: {args.n} ({size_mb:.0f} MiB of PNG), cores: {os.cpu_count()}")
        print(line("seeds' way (no validation)", args.n, seeds_s, seeds_mb))
        print(line("skinvlm ingest (full decode)", args.n, ours_s, ours_mb))
        print(f"speed ratio skinvlm/seeds: {seeds_s / ours_s:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
