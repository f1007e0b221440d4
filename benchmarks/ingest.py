"""Benchmark: `skinvlm ingest` (structural check and metadata removal, `--keep-metadata`, `--deep`) vs the
seeds' way.

    python benchmarks/ingest.py --n 240

Generates N 1024x1024 RGBA PNGs in an AI-Hub-shaped tree, every other one carrying what a clinic's camera
or chart tool writes (tEXt and iTXt with a name and chart number, EXIF with a serial number, after the
pixels as well as before), then, in the same run, times
(a) pandas -> Dataset.from_pandas -> cast_column("image", Image()) -> save_to_disk (no check),
(b) `skinvlm ingest` (default: every PNG's chunk CRCs through IEND, every JPEG's end marker, metadata
    chunks removed without re-encoding),
(c) `skinvlm ingest --keep-metadata` (the same check, files stored as they are: the cost of (b)'s removal),
(d) `skinvlm ingest --deep` (every image fully decoded), taking turns over --repeat rounds.
Prints the median images/s of each, the ratios against (a), and peak RSS of each process tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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
    """A 1024x1024 RGBA PNG with smooth shading and sensor-like noise (compresses like a photo); every other one
    with a camera's and a chart tool's metadata."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    path, seed = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:1024, 0:1024]
    base = np.stack([(xx / 5 + seed) % 256, (yy / 5) % 256, ((xx + yy) / 9) % 256], -1)
    rgb = (base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)
    rgba = np.dstack([rgb, np.full((1024, 1024), 255, np.uint8)])
    image = Image.fromarray(rgba, "RGBA")
    if seed % 2:
        image.save(path)
        return
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "HONG-GILDONG")
    info.add_itxt("Description", "환자 홍길동 차트번호 A-778899", lang="ko")
    exif = Image.Exif()
    exif[0x0110], exif[0x0112] = "ClinicCam 3000", 1
    exif.get_ifd(0x8769)[0xA431] = "SN-CAM-0042"
    image.save(path, pnginfo=info, exif=exif)


def make_tree(root: Path, n: int) -> None:
    jobs = []
    for i in range(n):
        split, top, prefix = ("test", "Validation", "VS") if i % 9 == 0 else ("train", "Training", "TS")
        folder = root / top / "images" / f"{prefix}_{CLASSES[i % 6]}_{'정면' if i % 2 else '측면'}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{i:05d}.png", i))
    with ProcessPoolExecutor() as pool:
        list(pool.map(photo_like, jobs, chunksize=8))


Ways = dict[str, list[str]]


def timed_rounds(ways: Ways, tmp: Path, env: dict[str, str], repeat: int) -> dict[str, tuple[float, float]]:
    """Per way: median seconds and highest peak RSS over `repeat` rounds.

    The ways take turns within each round, so a disk that speeds up or slows down over the run weighs on
    all of them alike, and every run starts after os.sync(), so none pays for the writeback of another."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(repeat):
        for name, cmd in ways.items():
            out = tmp / "out"
            os.sync()
            runs[name].append(run_measured([*cmd, str(out)], env))
            shutil.rmtree(out, ignore_errors=True)
    return {name: (statistics.median(s for s, _ in r), max(mb for _, mb in r)) for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=240, help="images to generate")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of runs; medians are reported")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="skinvlm-bench-ingest-"))
    try:
        src = tmp / "extracted_data"
        print(f"generating {args.n} 1024x1024 RGBA PNGs in {src} ...", flush=True)
        make_tree(src, args.n)
        size_mb = sum(p.stat().st_size for p in src.rglob("*.png")) / 2**20
        env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_CACHE": str(tmp / "cache")}
        ingest = [sys.executable, "-m", "skinvlm", "ingest", str(src), "--json"]
        ways = {
            "seeds' way (no check, not fsynced)": [sys.executable, "-c", SEEDS_WAY, str(src)],
            "skinvlm ingest (structural check, metadata removed)": [*ingest, "-w"],
            "skinvlm ingest --keep-metadata": [*ingest, "--keep-metadata", "-w"],
            "skinvlm ingest --deep (full decode)": [*ingest, "--deep", "-w"],
        }
        measured = timed_rounds(ways, tmp, env, args.repeat)
        print(f"images: {args.n} ({size_mb:.0f} MiB of PNG), cores: {os.cpu_count()}, median of {args.repeat} rounds")
        for name, (seconds, peak_mb) in measured.items():
            print(line(name, args.n, seconds, peak_mb))
        seeds_s, ours_s, kept_s, deep_s = (seconds for seconds, _ in measured.values())
        print(
            f"speed ratio skinvlm/seeds: {seeds_s / ours_s:.2f}x (structural, metadata removed), "
            f"{seeds_s / kept_s:.2f}x (--keep-metadata), {seeds_s / deep_s:.2f}x (--deep); "
            f"removing metadata costs {ours_s / kept_s - 1:+.1%} of ingest time"
        )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
