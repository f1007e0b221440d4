"""Patients' privacy: file metadata out of ingested and published photos, personal data in text found, redacted and
refused, publish honest and early. Photos carry metadata planted the way cameras and chart tools write it."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, fake_secret
from datasets import Image as ImageFeature
from datasets import load_from_disk
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

from skinvlm.testing.openai_server import FakeOpenAI, label_conditioned

NAME, CHART, SERIAL, GPS_TEXT = "홍길동", "CHART-778899", "SN-CAM-0042", "GPS-37.5665N"
LOCAL_KEY = fake_secret("sk-", "local-server")  # the test server takes any key
PLANTED = (NAME.encode(), CHART.encode(), SERIAL.encode(), GPS_TEXT.encode(), b"HONG-GILDONG")


def pixels(seed: int, mode: str = "RGB", size: tuple[int, int] = (48, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array if channels > 1 else array[..., 0], mode)


def camera_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010E] = f"patient HONG-GILDONG {CHART}"  # ImageDescription
    exif[0x0110] = "ClinicCam 3000"  # Model
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0xA431] = SERIAL  # BodySerialNumber
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[0x1B] = "N", (37.0, 33.0, 59.0), b"ASCII\0\0\0" + GPS_TEXT.encode()  # + GPSProcessingMethod
    return exif


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_everything(image: Image.Image, orientation: int = 1) -> bytes:
    """Text in tEXt, zTXt and iTXt (Korean), EXIF in eXIf, a tIME and a private chunk after the pixels, an ICC
    profile and gamma that must stay."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "HONG-GILDONG")
    info.add_text("Comment", f"chart {CHART}", zip=True)
    info.add_itxt("Description", f"환자 {NAME} 010-2345-6789", lang="ko")
    out = io.BytesIO()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image.save(out, "PNG", pnginfo=info, exif=camera_exif(orientation), icc_profile=icc)
    data = out.getvalue()
    extra = chunk(b"tIME", struct.pack(">HBBBBB", 2026, 11, 28, 9, 30, 0)) + chunk(b"prVt", SERIAL.encode())
    return data[:-12] + extra + data[-12:]  # before IEND


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_with_everything(image: Image.Image, orientation: int = 1) -> bytes:
    """EXIF (APP1), XMP (APP1), IPTC (APP13), a comment, an ICC profile that must stay, and an MPF-style trailer."""
    out = io.BytesIO()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image.save(out, "JPEG", quality=90, exif=camera_exif(orientation), icc_profile=icc, comment=f"{CHART}".encode())
    data = out.getvalue()
    xmp = segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta>" + f"<dc:creator>{NAME}</dc:creator>".encode())
    iptc = segment(0xED, b"Photoshop 3.0\08BIM\x04\x04\0\0\0\0\0\x10\x1c\x02\x05\0\x0bHONG-GILDONG")
    return data[:2] + xmp + iptc + data[2:] + b"SAMSUNG-TRAILER " + SERIAL.encode()


def tree(root: Path) -> dict[str, bytes]:
    """One class folder per way metadata arrives; the file names hold a name too (they are never published)."""
    files = {
        "건선/홍길동_chart778899.png": png_with_everything(pixels(1, "RGBA")),
        "아토피/side.jpg": jpeg_with_everything(pixels(2), orientation=6),
        "여드름/p.png": png_with_everything(pixels(3), orientation=8),
        "주사/plain.jpg": jpeg_with_everything(pixels(4)),
    }
    tiff = io.BytesIO()  # a TIFF saved as .png: no lossless way to clean it, so its pixels are stored as PNG
    pixels(5).save(tiff, "TIFF", tiffinfo={270: f"HONG-GILDONG {CHART}", 0x010F: SERIAL})
    files["지루/scanner.png"] = tiff.getvalue()
    files["정상/clean.png"] = png_bytes(pixels(6))
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def stored(workspace: Path) -> dict[str, dict]:
    """Per source file: the stored bytes and the recorded size, read without the datasets decoder (which would
    turn an image by its EXIF itself)."""
    data = load_from_disk(str(workspace / "datasets" / "ingested"))
    rows = {}
    for split in data:
        for row in data[split].cast_column("image", ImageFeature(decode=False)):
            rows[row["source"]] = row
    return rows


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_ingest_removes_planted_metadata_keeps_pixels_and_turns_photos_upright(cli, tmp_path: Path) -> None:
    sources = tree(tmp_path / "src")
    report = cli.json("ingest", tmp_path / "src")
    assert report["metadata"] == {"kept": False, "cleaned": 5, "turned": 2}, "the clean PNG needed nothing"
    rows = stored(cli.workspace)
    assert len(rows) == 6
    for source, row in rows.items():
        data, original = row["image"]["bytes"], sources[source]
        for planted in PLANTED:
            assert planted not in data, f"{planted!r} survived in {source}"
        image = Image.open(io.BytesIO(data))
        assert not image.getexif(), source
        assert not {"Author", "Comment", "Description", "exif", "comment", "xmp"} & set(image.info), source
        assert (row["width"], row["height"]) == image.size, "width and height as shown"
        source_image = ImageOps.exif_transpose(Image.open(io.BytesIO(original)))
        assert np.array_equal(decoded(data), np.asarray(source_image)), f"pixels of {source} changed"
    assert rows["아토피/side.jpg"]["width"] == 32 and rows["아토피/side.jpg"]["height"] == 48, "shown on its side"
    assert rows["여드름/p.png"]["image"]["bytes"].startswith(b"\x89PNG"), "a turned photo is stored as PNG"
    assert rows["주사/plain.jpg"]["image"]["bytes"].startswith(b"\xff\xd8"), "a JPEG is cleaned, not re-encoded"
    assert Image.open(io.BytesIO(rows["주사/plain.jpg"]["image"]["bytes"])).info.get("icc_profile"), "colour kept"
    assert Image.open(io.BytesIO(rows["건선/홍길동_chart778899.png"]["image"]["bytes"])).info.get("icc_profile")
    assert rows["정상/clean.png"]["image"]["bytes"] == sources["정상/clean.png"], "nothing to remove: same bytes"


def test_keep_metadata_stores_each_file_as_it_is(cli, tmp_path: Path) -> None:
    sources = tree(tmp_path / "src")
    result = cli("ingest", tmp_path / "src", "--keep-metadata")
    assert "file metadata kept" in result.stdout
    rows = stored(cli.workspace)
    assert rows["건선/홍길동_chart778899.png"]["image"]["bytes"] == sources["건선/홍길동_chart778899.png"]
    assert (rows["아토피/side.jpg"]["width"], rows["아토피/side.jpg"]["height"]) == (32, 48), "as shown, still"


def test_publish_dry_run_carries_no_planted_metadata_or_file_name(cli, tmp_path: Path) -> None:
    tree(tmp_path / "src")
    cli("ingest", tmp_path / "src")
    cli("describe", "--template")
    cli("fix")
    cli("publish", "me/skin", "--dry-run")
    folder = cli.workspace / "publish" / "dataset"
    every_byte = b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())
    for planted in (*PLANTED, b"chart778899"):
        assert planted not in every_byte, planted
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "metadata" in card and "removed" in card


# -- personal data in text ---------------------------------------------------------------------
# Each planted text, and what must stay of it after `fix` with the shipped rules; together they reach every pattern.
PERSONAL = [
    "환자 홍길동(010-2345-6789)의 양 볼에 구진이 보입니다.",
    "성명: 김민수, 주민번호 900101-1234567, 문의 hong.gd@clinic.co.kr",
    "차트번호: A-00123, 등록번호 12345678. 보호자 이영희 님 연락처 02-123-4567, +82 10 2345 6789.",
    "Patient: John Smith, MRN: 99887766, chart no. 445566.",
    # what converters and keyboards make: an en dash, full-width digits, spaces around dashes, no space before 환자
    "주민번호 900101–1234567, 연락처 ０１０－２３４５－６７８９ 또는 02 - 123 - 4567, 김철수환자의 뺨.",
    "김철수 환자분의 연락처 (02) 123-4567, 주민번호 900101 - 1234567.",
]
NOT_PERSONAL = (
    "환자의 피부에 홍반이 보입니다. 환자 얼굴(정면)에 0.5cm 크기 구진 3개, 2023년 11월부터 이마에 분포합니다."
)


def test_every_personal_pattern_is_found_and_the_shipped_rules_redact_it() -> None:
    from collections import Counter

    from skinvlm import personal
    from skinvlm.fix import fix_text, term_pattern
    from skinvlm.rules import default_rules_path, load_rules

    rules = load_rules(default_rules_path())
    hit = {pattern: False for pattern in (p for ps in personal.PATTERNS.values() for p in ps)}
    for text in PERSONAL:
        assert personal.find(text), text
        for patterns in personal.PATTERNS.values():
            for pattern in patterns:
                hit[pattern] |= bool(personal.linear_regex(pattern).search(text))
        fixed = fix_text(text, rules, term_pattern(rules), Counter())
        assert personal.find(fixed) == [], f"{text} -> {fixed}"
        assert "[이름]" in fixed or "[전화번호]" in fixed or "[등록번호]" in fixed
    assert all(hit.values()), [p for p, seen in hit.items() if not seen]
    assert personal.find(NOT_PERSONAL) == [], "clinical wording is not personal data"
    for placeholder in (
        "환자명: 미상",
        "이름: 아토피 피부염",
        "Patient: The lesion is red",
        "여드름 환자분의 뺨",
        "Patient: Redness on both cheeks",
        "소아환자의 이마",
        "여드름환자의 볼",
        "정상환자",
    ):
        assert personal.find(placeholder) == [], f"{placeholder}: a class, a placeholder or a word is not a name"
    kinds = [f.kind for f in personal.find(PERSONAL[-1])]
    assert kinds == ["name", "phone", "resident_number"], kinds
    assert personal.mask("010-2345-6789") == "0**-2***-6***"
    bracketed = fix_text("환자 홍길동(010-2345-6789)의 볼", rules, term_pattern(rules), Counter())
    assert bracketed == "환자 [이름]([전화번호])의 볼", "the bracket around the number stays whole"


def personal_answers(body: dict) -> str:
    """The label-conditioned answer, long enough for audit, with personal data in every 건선 and 주사 one."""
    answer = label_conditioned(body).replace("</summary>", " 병변의 분포와 색조가 진단과 일치합니다.</summary>")
    korean = PERSONAL[:3]  # the English one would leave English words for audit to flag after fix
    planted = korean[zlib.crc32(json.dumps(body["messages"][-1], sort_keys=True).encode()) % len(korean)]
    return answer.replace("</summary>", f" {planted}</summary>") if "건선" in answer or "주사" in answer else answer


def test_audit_counts_personal_data_masked_fix_redacts_and_publish_refuses(cli, ingested: Path) -> None:
    with FakeOpenAI(answer=personal_answers) as server:
        cli("describe", "--base-url", server.url, "--api-key", LOCAL_KEY, "--backoff", "0.01")
    report = cli.json("audit", "--stage", "described")
    assert report["personal_data"] == 16, "건선 and 주사: 8 photos each"
    assert set(report["personal_data_by_kind"]) <= {"name", "phone", "resident_number", "email", "chart_number"}
    shown = json.dumps(report, ensure_ascii=False)
    for secret in ("홍길동", "2345-6789", "1234567", "hong.gd@", "John Smith", "99887766"):
        assert secret not in shown, f"{secret} printed by audit --json"
    assert all(e["id"] and "*" in e["value"] for e in report["personal_data_examples"])
    table = cli("audit", "--stage", "described", ok=False)
    assert "personal data" in table.stdout and "홍길동" not in table.stdout + table.stderr
    assert cli("audit", "--stage", "described", "--strict", ok=False).exit_code == 1
    refused = cli("publish", "me/x", "--dry-run", "--stage", "described", ok=False)
    assert refused.exit_code == 1 and "personal data" in refused.stderr
    cli("fix")
    after = cli.json("audit", "--stage", "fixed")
    assert after["personal_data"] == 0 and after["problems"] == 0
    assert cli("publish", "me/x", "--dry-run").exit_code == 0
    forced = cli("publish", "me/x", "--dry-run", "--stage", "described", "--ignore-audit")
    assert forced.exit_code == 0
    card = (cli.workspace / "publish" / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "personal data (records; values not shown): 16" in card and "홍길동" not in card


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_cleaning_never_changes_a_file_with_nothing_to_remove(kind: str) -> None:
    from skinvlm import metadata

    out = io.BytesIO()
    pixels(9).save(out, "JPEG" if kind == "jpeg" else "PNG")
    data = out.getvalue()
    assert metadata.cleaned(data, kind.upper()) is data


# -- publish: honest and early -------------------------------------------------------------------
class Whoami:
    """The Hub's whoami, which cannot be reached here: a double at that boundary that records every call."""

    def __init__(self, name: str = "me", role: str = "write") -> None:
        self.answer = {"name": name, "orgs": [{"name": "clinic"}], "auth": {"accessToken": {"role": role}}}
        self.calls = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> Whoami:
        import huggingface_hub

        monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda api: self.called())
        return self

    def called(self) -> dict:
        self.calls += 1
        return self.answer


def test_publish_checks_token_and_owner_before_writing_a_shard(
    cli, ingested: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("describe", "--template")
    cli("fix")
    folder = cli.workspace / "publish" / "dataset"
    no_token = cli("publish", "me/x", "--yes", ok=False)
    assert "HF_TOKEN" in no_token.stderr and not folder.exists()
    whoami = Whoami(name="someone-else").install(monkeypatch)
    env = {"HF_TOKEN": fake_secret("hf_", "privacy")}
    other = cli("publish", "me/x", "--yes", ok=False, env=env)
    assert "may not write under 'me'" in other.stderr and whoami.calls == 1 and not folder.exists()
    Whoami(role="read").install(monkeypatch)
    assert "read-only" in cli("publish", "me/x", "--yes", ok=False, env=env).stderr and not folder.exists()
    Whoami().install(monkeypatch)
    unconfirmed = cli("publish", "clinic/x", ok=False, env=env)
    assert "--yes" in unconfirmed.stderr and not folder.exists(), "no terminal to confirm on: refused first"


def test_the_card_counts_what_the_shards_hold_and_says_what_was_left_out(cli, ugly_tree: Path) -> None:
    cli("ingest", ugly_tree)
    with FakeOpenAI(answer=personal_answers, plan=["garbage", "garbage", "garbage"]) as server:
        key = LOCAL_KEY
        cli("describe", "--base-url", server.url, "--api-key", key, "--backoff", "0.01", "--concurrency", "1")
    cli("fix", "--drop-invalid")
    refused = cli("publish", "me/x", "--dry-run", ok=False)  # the ugly tree's leaked.png is in both splits
    assert "1 near-duplicate photos across the splits" in error_line(refused.stderr)
    cli("publish", "me/x", "--dry-run", "--ignore-audit")
    folder = cli.workspace / "publish" / "dataset"
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "`skinvlm audit --strict` fails: 1 near-duplicate photos across the splits" in card
    from datasets import Dataset

    shards = {p.name.split("-")[0]: Dataset.from_parquet(str(p)) for p in (folder / "data").glob("*.parquet")}
    total = sum(ds.num_rows for ds in shards.values())
    assert f"{total:,} records" in card and f"train ({shards['train'].num_rows:,})" in card
    assert "source" not in shards["train"].column_names and "sha256" not in shards["train"].column_names
    assert "Files not ingested: 3 (" in card and "empty file: 1" in card
    assert total == 52 and re.search(
        r"`(train|test)`: 1 of (41|12) ingested photos left out by `skinvlm fix` \(invalid: 1\)", card
    )
    assert f"at `{server.url}`" in card and "prompt `" in card and f": {total:,} records" in card
    assert "removed at ingest" in card


def test_publish_refuses_images_that_kept_their_metadata(cli, tmp_path: Path) -> None:
    tree(tmp_path / "src")
    cli("ingest", tmp_path / "src", "--keep-metadata")
    cli("describe", "--template")
    cli("fix")
    refused = cli("publish", "me/x", "--dry-run", ok=False)
    assert "--keep-metadata" in refused.stderr and "ingest SRC --force" in refused.stderr


# -- JPEG and PNG tricks: metadata where a lenient cleaner keeps it ------------------------------
def jpeg(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def tricks() -> dict[str, bytes]:
    """Each file hides the serial, a chart number or a second photo's EXIF where the segment walk used to keep it."""
    plain = jpeg(pixels(11))
    head, body = plain[:2], plain[20:]  # SOI, then (after the JFIF APP0) the tables, frame and scan
    exif_thumbnail = jpeg(pixels(12, size=(16, 16)), exif=camera_exif())
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    named_icc = chunk(b"iCCP", CHART.encode() + b"\0\0" + zlib.compress(icc))
    palette = chunk(b"sPLT", SERIAL.encode() + b"\0\x08" + bytes([1, 2, 3, 4, 0, 9]))
    clean_png = png_bytes(pixels(13))
    thumbnail = b"JFIF\0\x01\x01\0\0\x01\0\x01\x02\x02" + SERIAL.encode() + b"!"  # 2x2 RGB pixels: the serial
    return {
        "건선/double-soi.jpg": b"\xff\xd8" + jpeg(pixels(14), exif=camera_exif()),
        "건선/soi-app1-soi.jpg": head + segment(0xE1, b"Exif\0\0" + SERIAL.encode()) + plain,
        "아토피/jfxx.jpg": plain[:20] + segment(0xE0, b"JFXX\0\x10" + exif_thumbnail) + body,
        "여드름/jfif-thumbnail.jpg": head + segment(0xE0, thumbnail) + body,
        "주사/adobe.jpg": plain[:20] + segment(0xEE, b"Adobe\0\x64\0\0\0\0\x01" + SERIAL.encode()) + body,
        "지루/named-icc.png": clean_png[:33] + named_icc + palette + clean_png[33:],
        "정상/plain.jpg": plain,
    }


def test_jpeg_and_png_tricks_carry_no_metadata_into_stored_photos_or_shards(cli, tmp_path: Path) -> None:
    from skinvlm import metadata

    for name, data in tricks().items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(data)
    report = cli.json("ingest", tmp_path / "src")
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"건선/double-soi.jpg", "건선/soi-app1-soi.jpg"}, "cannot be decoded: not stored"
    rows = stored(cli.workspace)
    assert rows["정상/plain.jpg"]["image"]["bytes"] == tricks()["정상/plain.jpg"], "a plain JPEG is stored as it is"
    for source, row in rows.items():
        data = row["image"]["bytes"]
        assert SERIAL.encode() not in data and CHART.encode() not in data, source
        assert data.count(b"\xff\xd8") == 1 or data.startswith(b"\x89PNG"), f"a second JPEG survived in {source}"
        assert metadata.leftover(data) is None, source
        assert np.array_equal(decoded(data), decoded(tricks()[source])), f"pixels of {source} changed"
    assert Image.open(io.BytesIO(rows["지루/named-icc.png"]["image"]["bytes"])).info.get("icc_profile"), "colour kept"
    cli("describe", "--template")
    cli("fix")
    cli("publish", "me/skin", "--dry-run")
    every_byte = b"".join(p.read_bytes() for p in (cli.workspace / "publish" / "dataset").rglob("*") if p.is_file())
    assert SERIAL.encode() not in every_byte and CHART.encode() not in every_byte


def test_publish_checks_every_stored_photo_again_before_a_shard(cli, tmp_path: Path) -> None:
    tree(tmp_path / "src")
    cli("ingest", tmp_path / "src", "--keep-metadata")
    manifest = cli.workspace / "datasets" / "ingested" / "manifest.json"
    settings = json.loads(manifest.read_text(encoding="utf-8"))
    settings["settings"]["keep_metadata"] = False  # as a hand edit or an older skinvlm could leave it
    manifest.write_text(json.dumps(settings), encoding="utf-8")
    cli("describe", "--template")
    cli("fix")
    refused = cli("publish", "me/x", "--dry-run", ok=False)
    line = error_line(refused.stderr)
    assert "5 stored photos hold file metadata" in line and "PNG chunks" in line and "train/" in line, line
    assert not (cli.workspace / "publish" / "dataset").exists(), "no shard written"


def test_about_says_what_the_photos_are_and_never_holds_a_name(cli, clean_tree: Path) -> None:
    refused = cli("ingest", clean_tree, "--about", "김철수 환자분 사진, 연락처 010-2345-6789", ok=False)
    assert "--about holds what looks like personal data" in error_line(refused.stderr)
    assert not (cli.workspace / "datasets" / "ingested").exists()
    cli("ingest", clean_tree, "--about", "  synthetic   test photos  ")
    cli("describe", "--template")
    cli("fix")
    cli("publish", "me/x", "--dry-run")
    card = (cli.workspace / "publish" / "dataset" / "README.md").read_text(encoding="utf-8")
    assert "Built with skinvlm from: synthetic test photos." in card and "AI Hub" not in card
    assert "Terms of use of the photos: to be written by the team." in card
