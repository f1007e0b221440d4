"""`skinvlm ingest` and `skinvlm status` on generated trees, driven through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from PIL import Image

from skinvlm.demo.synthetic import image_bytes, write_tree
from skinvlm.images import as_rgb

CLASSES = ["건선", "아토피", "여드름", "주사", "지루", "정상"]


def test_clean_tree_counts_and_columns(cli, clean_tree: Path, workspace: Path) -> None:
    report = cli.json("ingest", clean_tree)
    assert report["splits"] == {"train": 36, "test": 12}
    assert report["counts"]["train"]["건선"] == {"정면": 3, "측면": 3}
    assert report["counts"]["test"]["정상"] == {"정면": 1, "측면": 1}
    assert report["skipped"] == [] and report["cross_split_duplicates"] == []
    data = load_from_disk(str(workspace / "datasets" / "ingested"))
    row = data["train"][0]
    assert set(row) >= {"id", "image", "label", "view", "source", "width", "height", "sha256"}
    assert as_rgb(row["image"]).mode == "RGB", "what every consumer sees"
    assert row["source"].startswith("Training/images/TS_")
    manifest = json.loads((workspace / "datasets" / "ingested" / "manifest.json").read_text())
    assert manifest["counts"]["splits"] == {"train": 36, "test": 12}
    assert {"settings", "inputs", "versions", "started", "finished"} <= set(manifest)


def test_every_defect_is_listed_and_nothing_crashes(cli, ugly_tree: Path, workspace: Path) -> None:
    report = cli.json("ingest", ugly_tree, "--workers", "2")
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"truncated.png", "empty.png", "fake.png"}
    assert reasons["empty.png"] == "empty file"
    assert "not an image" in reasons["fake.png"]
    assert "decode" in reasons["truncated.png"]
    # 36 clean + UPPER.JPG + nested jpeg + NFD folder image + duplicate copy + leaked copy
    assert report["splits"] == {"train": 41, "test": 12}
    assert report["counts"]["train"]["여드름"]["측면"] == 4, "NFD folder names must join their NFC class"
    assert report["ignored"] == 3  # Thumbs.db, notes.txt, .DS_Store
    assert len(report["duplicates"]) == 1 and "copy-of-first.png" in " ".join(report["duplicates"][0])
    assert len(report["cross_split_duplicates"]) == 1
    assert any("leaked.png" in p for p in report["cross_split_duplicates"][0])
    sources = load_from_disk(str(workspace / "datasets" / "ingested"))["train"]["source"]
    assert not any(name in s for s in sources for name in reasons)


def test_table_output_lists_skips_and_leakage(cli, ugly_tree: Path) -> None:
    result = cli("ingest", ugly_tree)
    assert "건선" in result.stdout and "정면" in result.stdout
    assert "truncated.png" in result.stderr and "LEAKAGE" in result.stderr


def test_ids_are_stable_across_reruns(cli, clean_tree: Path, workspace: Path) -> None:
    cli("ingest", clean_tree)
    first = load_from_disk(str(workspace / "datasets" / "ingested"))["train"]["id"]
    again = cli("ingest", clean_tree, ok=False)
    assert again.exit_code == 1 and "--force" in again.stderr
    cli("ingest", clean_tree, "--force", "--workers", "2")
    assert list(load_from_disk(str(workspace / "datasets" / "ingested"))["train"]["id"]) == list(first)


def test_flat_tree_gets_a_seeded_stratified_split(cli, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for label in CLASSES:
        (flat / label).mkdir(parents=True)
        for i in range(10):
            (flat / label / f"{i}.png").write_bytes(image_bytes(label, i, 16))
    report = cli.json("ingest", flat, "--test-size", "0.2", "--seed", "7")
    assert report["splits"] == {"train": 48, "test": 12}
    assert all(sum(v.values()) == 2 for v in report["counts"]["test"].values())


def test_max_side_downscales_and_transparency_is_flattened(cli, tmp_path: Path, workspace: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"train": 1, "test": 1}, size=80)
    see_through = Image.new("RGBA", (80, 80), (255, 0, 0, 0))
    see_through.save(src / "Training" / "images" / "TS_건선_정면" / "clear.png")
    cli("ingest", src, "--max-side", "40")
    train = load_from_disk(str(workspace / "datasets" / "ingested"))["train"]
    assert set(train["width"]) == {40}
    clear = train[list(train["source"]).index("Training/images/TS_건선_정면/clear.png")]["image"]
    assert as_rgb(clear).getpixel((5, 5)) == (255, 255, 255), "fully transparent pixels become white, not hidden red"


def test_user_mistakes_are_one_line_errors(cli, tmp_path: Path) -> None:
    missing = cli("ingest", tmp_path / "nope", ok=False)
    assert missing.exit_code == 1 and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    empty = tmp_path / "empty" / "Training" / "images"
    empty.mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    none = cli("ingest", tmp_path / "empty", ok=False)
    assert none.exit_code == 1 and "no .png/.jpg/.jpeg images" in none.stderr
    odd = tmp_path / "odd" / "Training" / "images"
    (odd / "TS_무좀_정면").mkdir(parents=True)
    (odd / "TS_무좀_정면" / "a.png").write_bytes(image_bytes("건선", 1, 16))
    (odd / "misc").mkdir()
    (odd / "misc" / "b.png").write_bytes(image_bytes("건선", 2, 16))
    unknown = cli("ingest", tmp_path / "odd", ok=False)
    assert unknown.exit_code == 1
    assert "TS_무좀_정면" in unknown.stderr and "misc" in unknown.stderr


def test_status_reports_the_stages(cli, clean_tree: Path) -> None:
    assert not cli.json("status")["stages"][0]["present"]
    cli("ingest", clean_tree)
    stages = {s["name"]: s for s in cli.json("status")["stages"]}
    assert stages["ingested"]["present"] and stages["ingested"]["rows"] == {"train": 36, "test": 12}
    assert not stages["described"]["present"]
    shown = cli("status", env={"COLUMNS": "80"}).stdout
    lines = shown.splitlines()
    assert "…" not in shown and all(len(line) <= 80 for line in lines if "/" not in line), shown
    assert lines[1].startswith("ingested  current  ") and lines[2] == "  rows: train 36, test 12", shown
    assert f"  from: {clean_tree}" in lines, "a path in one piece: never cut, never in 7-character pieces"
    assert "described  not made yet" in shown
    wide = cli("status", env={"COLUMNS": "160"}).stdout
    assert "┃ stage" in wide and "figures" in wide, "a wide terminal keeps the table"


@pytest.mark.parametrize("mode", [(), ("--deep",)], ids=["structural", "deep"])
def test_broken_files_are_caught_with_and_without_a_full_decode(cli, ugly_tree: Path, mode: tuple[str, ...]) -> None:
    folder = ugly_tree / "Training" / "images" / "TS_주사_정면"
    good = image_bytes("주사", 950, 32, "RGB", "JPEG")
    (folder / "cut.jpg").write_bytes(good[: len(good) // 2])
    png = bytearray(image_bytes("주사", 951, 32))
    png[-20] ^= 0xFF  # one flipped bit pattern inside the image data: its chunk's CRC no longer matches
    (folder / "bitflip.png").write_bytes(bytes(png))
    report = cli.json("ingest", ugly_tree, *mode)
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"truncated.png", "empty.png", "fake.png", "cut.jpg", "bitflip.png"}
    assert report["splits"] == {"train": 41, "test": 12}
