"""File metadata out of stored photos, losslessly: what a clinic camera or chart tool wrote stays in the clinic.

A PNG keeps only the chunks that make its pixels and colours: the critical ones (IHDR, PLTE, IDAT, IEND),
transparency, colour (iCCP under a neutral name, sRGB, gAMA, cHRM, sBIT, cICP, mDCV, cLLI), bKGD, pHYs, hIST and
the APNG frames. Text (tEXt, zTXt, iTXt), EXIF (eXIf), the time (tIME), the named palette (sPLT) and every private
chunk go. A JPEG keeps its JFIF header (APP0 without a thumbnail: that is a second photo), its ICC profile (APP2
ICC_PROFILE) and the fields of Adobe's APP14 (how to read CMYK and YCCK colour); JFXX, EXIF and XMP (APP1), IPTC
(APP13), the other APPn, comments (COM) and anything after the end marker (MPF's extra images, makers' trailers)
go. Either's ICC profile keeps its colour data and loses its text (icc.py). Neither is re-encoded: the
compressed pixel data is copied as is, so decoded pixels equal the source's
exactly. A JPEG whose markers are not in a plain order (a second start of image, a reserved marker) is not
copied at all: ingest decodes it and stores the pixels as PNG, or refuses it when it does not decode.

EXIF orientation is honoured by turning the pixels (ingest decodes such a photo and stores it as PNG): the
Orientation tag goes with the rest of EXIF, so a photo taken on its side is stored and shown upright
everywhere, not only where viewers read EXIF. `leftover` is the same rule as a check, run by publish on every
stored photo before a shard is written.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Any

from skinvlm import icc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEPT = frozenset(
    b"IHDR PLTE IDAT IEND tRNS iCCP sRGB gAMA cHRM sBIT cICP mDCV mDCv cLLI cLLi bKGD pHYs hIST".split()
    + [b"acTL", b"fcTL", b"fdAT"]  # APNG frames
)
JPEG_CLEANED = ("JPEG", "MPO")  # MPO: a JPEG with MPF's extra images after its end marker
ORIENTATION_TAG = 0x0112
SWAPS_SIDES = {5, 6, 7, 8}  # orientations that turn the photo a quarter: shown width is stored height


# -- PNG -------------------------------------------------------------------------------------
def png_chunks(data: bytes) -> tuple[list[tuple[bytes, int, int]], str | None]:
    """(chunks as (type, start, end) through IEND, problem): every chunk's length and CRC checked, over views
    of `data`. Our own walk rather than Pillow's verify(): that copies every chunk through a file object and
    needs an image opened for nothing else (1.2 ms a 2.5 MB photo against 0.7 ms here, which is crc32 itself)."""
    view, pos = memoryview(data), len(PNG_SIGNATURE)
    chunks: list[tuple[bytes, int, int]] = []
    if data[:pos] != PNG_SIGNATURE:
        return chunks, "cannot decode: no PNG signature"
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind, end = bytes(view[pos + 4 : pos + 8]), pos + 12 + length
        if end > len(data):
            break
        if zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return chunks, f"cannot decode: broken PNG file (bad checksum in {kind.decode('latin-1')} chunk)"
        chunks.append((kind, pos, end))
        if kind == b"IEND":
            return chunks, None
        pos = end
    return chunks, "cannot decode: truncated PNG file (no IEND chunk)"


ICC_NAME = b"ICC Profile"  # iCCP's name is free text (a camera's or a person's): stored under the one Pillow writes


def clean_png(data: bytes, chunks: list[tuple[bytes, int, int]]) -> bytes:
    """`data` with only the kept chunks, iCCP under a neutral name and without text (the very object when nothing
    changes, so the common case copies nothing)."""
    view = memoryview(data)
    whole = [(kind, view[s:e]) for kind, s, e in chunks]
    kept = [kept_chunk(kind, chunk) if kind in PNG_KEPT else None for kind, chunk in whole]
    unchanged = all(k is chunk for k, (_, chunk) in zip(kept, whole, strict=True))
    if unchanged and chunks and chunks[-1][2] == len(data):
        return data
    return b"".join([view[: len(PNG_SIGNATURE)], *(k for k in kept if k is not None)])


def kept_chunk(kind: bytes, chunk: memoryview) -> bytes | memoryview | None:
    """The chunk as stored (itself, or iCCP rewritten), or None to drop it (an iCCP whose profile is broken)."""
    if kind != b"iCCP":
        return chunk
    name, _, compressed = bytes(chunk[8:-4]).partition(b"\0")
    try:
        profile = zlib.decompress(compressed[1:])  # after the compression method byte
    except zlib.error:
        return None
    clean = icc.without_text(profile)
    if clean is None:
        return None
    if name == ICC_NAME and clean is profile:
        return chunk
    body = b"iCCP" + ICC_NAME + b"\0\0" + (zlib.compress(clean) if clean is not profile else compressed[1:])
    return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))


def png_orientation(data: bytes, chunks: list[tuple[bytes, int, int]]) -> int:
    exif = next((data[start + 8 : end - 4] for kind, start, end in chunks if kind == b"eXIf"), None)
    return orientation_of(exif) if exif else 1


# -- JPEG ------------------------------------------------------------------------------------
def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of every segment from SOI through EOI, entropy-coded data included in the
    segment before it; stops at EOI, so what trails the image is never yielded."""
    pos, size = 2, len(data)
    yield 0xD8, 0, 2
    while pos < size:
        if data[pos] != 0xFF:  # entropy-coded data after SOS: runs to the next real marker
            pos = next_marker(data, pos)
            continue
        while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= size:
            return
        marker = data[pos + 1]
        if marker == 0xD9:
            yield marker, pos, pos + 2
            return
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # restart markers and TEM have no length
            yield marker, pos, pos + 2
            pos += 2
            continue
        if pos + 4 > size:
            return
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if marker == 0xDA:  # SOS: its header, then the scan's data up to the next marker
            end = next_marker(data, end)
        yield marker, pos, min(end, size)
        pos = end


MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")  # in entropy-coded data: not a stuffed 0x00, not a restart


def next_marker(data: bytes, pos: int) -> int:
    """Where the next marker starts after entropy-coded data (a regex, so the scan runs at C speed)."""
    found = MARKER.search(data, pos)
    return found.start() if found else len(data)


def jpeg_ends(data: bytes) -> bool:
    """Whether the JPEG reaches its end marker: at the end of the file, or before a trailer (phone makers and
    MPF append data after it)."""
    return data.rstrip(b"\0").endswith(b"\xff\xd9") or any(m == 0xD9 for m, _, _ in jpeg_segments(data))


JFIF_HEADER = 14  # "JFIF\0", version, units, densities and the thumbnail's size: what follows is its pixels
ADOBE_FIELDS = 12  # "Adobe", version, two flag words and the colour transform
FRAME_AND_TABLES = frozenset({*range(0xC0, 0xD0)} - {0xC8} | {0xDB, 0xDC, 0xDD})  # SOFn, DHT, DAC, DQT, DNL, DRI
RESTARTS = frozenset(range(0xD0, 0xD8))


class UnsafeJpeg(ValueError):
    """A JPEG whose structure is not the plain one the cleaner understands: a marker out of place (a second SOI,
    TEM, a reserved or JPGn marker, a scan before its frame, a restart outside a scan) or a segment whose length
    runs past the file. What such a file hides cannot be told from the segments, so it is not copied."""


def kept_segment(marker: int, segment: memoryview) -> bytes | memoryview | None:
    """The segment as stored (itself, or cut to its fields), or None to drop it; raises UnsafeJpeg for a marker
    that has no place in a plain JPEG."""
    if marker in FRAME_AND_TABLES or marker == 0xDA:
        return segment
    payload = bytes(segment[4:])  # an APPn or COM: 64 KiB at most
    if marker == 0xE0:  # only JFIF's header, thumbnail cut (its pixels are a second photo); JFXX goes whole
        if not payload.startswith(b"JFIF\0") or len(payload) < JFIF_HEADER:
            return None
        header = payload[: JFIF_HEADER - 2] + b"\0\0"
        return segment if payload == header else b"\xff\xe0" + struct.pack(">H", JFIF_HEADER + 2) + header
    if marker == 0xE2 and payload.startswith(b"ICC_PROFILE\0"):
        return segment
    if marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= ADOBE_FIELDS:
        if len(payload) == ADOBE_FIELDS:
            return segment
        return b"\xff\xee" + struct.pack(">H", ADOBE_FIELDS + 2) + payload[:ADOBE_FIELDS]
    if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # other APPn and comments: metadata
        return None
    raise UnsafeJpeg(f"marker FF{marker:02X} out of place")


def clean_jpeg(data: bytes) -> bytes | None:
    """`data` with only what makes its pixels (the very object when nothing changes), or None when its structure
    is not plain (`UnsafeJpeg`): such a file is decoded and stored as PNG pixels, or refused if it cannot be."""
    try:
        kept, same = jpeg_kept_segments(data)
    except UnsafeJpeg:
        return None
    if same:
        return data
    return b"".join(kept)


ICC_MARK = b"ICC_PROFILE\0"
ICC_CHUNK = 65535 - 2 - len(ICC_MARK) - 2  # profile bytes one APP2 segment holds, after its sequence number


def icc_segments(kept: list[bytes | memoryview]) -> tuple[list[bytes | memoryview], bool]:
    """The kept segments with the ICC profile (split over APP2 segments in sequence) without its text, and whether
    that changed nothing; a profile that cannot be put together or parsed is dropped."""
    where = [i for i, seg in enumerate(kept) if seg[1] == 0xE2 and bytes(seg[4 : 4 + len(ICC_MARK)]) == ICC_MARK]
    if not where:
        return kept, True
    parts = sorted((bytes(kept[i][4 + len(ICC_MARK) : 6 + len(ICC_MARK)]), bytes(kept[i][6 + len(ICC_MARK) :]))
                   for i in where)  # fmt: skip
    profile = b"".join(part for _, part in parts)
    clean = icc.without_text(profile) if [n[0] for n, _ in parts] == list(range(1, len(parts) + 1)) else None
    if clean is profile:
        return kept, True
    chunks = [clean[i : i + ICC_CHUNK] for i in range(0, len(clean), ICC_CHUNK)] if clean else []
    made = [b"\xff\xe2" + struct.pack(">H", 2 + len(ICC_MARK) + 2 + len(c)) + ICC_MARK + bytes([n + 1, len(chunks)]) + c
            for n, c in enumerate(chunks)]  # fmt: skip
    rest = [seg for i, seg in enumerate(kept) if i not in set(where)]
    return rest[: where[0]] + made + rest[where[0] :], False


def jpeg_kept_segments(data: bytes) -> tuple[list[bytes | memoryview], bool]:
    """(what to store, whether that is `data` unchanged); the walk by markers, strict about their order."""
    kept, same = jpeg_walk(data)
    kept, icc_same = icc_segments(kept)
    return kept, same and icc_same


def jpeg_walk(data: bytes) -> tuple[list[bytes | memoryview], bool]:
    view, kept, same = memoryview(data), [], True
    framed = scanned = ended = False
    for marker, start, end in strict_jpeg_segments(data):
        if marker == 0xD8:
            if start != 0:
                raise UnsafeJpeg("a second start of image")
        elif marker in RESTARTS:
            if not scanned:
                raise UnsafeJpeg("a restart marker outside a scan")
        elif marker == 0xD9:
            ended = True
        elif marker == 0xDA and not framed:
            raise UnsafeJpeg("a scan before its frame header")
        framed |= 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)
        scanned |= marker == 0xDA
        whole = view[start:end]
        segment = whole if marker in (0xD8, 0xD9) or marker in RESTARTS else kept_segment(marker, whole)
        same &= segment is whole
        if segment is not None:
            kept.append(segment)
        if ended:
            return kept, same and end == len(data)
    raise UnsafeJpeg("no end of image")


def strict_jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) from SOI through EOI, a scan's entropy-coded data in its SOS segment; raises
    UnsafeJpeg where a byte that should start a marker does not, or a length runs past the file."""
    if not data.startswith(b"\xff\xd8"):
        raise UnsafeJpeg("no start of image")
    yield 0xD8, 0, 2
    pos, size = 2, len(data)
    while pos + 1 < size:
        if data[pos] != 0xFF:
            raise UnsafeJpeg(f"no marker at byte {pos}")
        while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        marker = data[pos + 1] if pos + 1 < size else 0
        if marker in (0xD8, 0xD9) or marker in RESTARTS or marker == 0x01:
            yield marker, pos, pos + 2
            if marker == 0xD9:
                return
            pos = pos + 2 if marker not in RESTARTS else next_marker(data, pos + 2)
            continue
        if pos + 4 > size:
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > size:
            raise UnsafeJpeg(f"segment FF{marker:02X} runs past the file")
        if marker == 0xDA:
            end = next_marker(data, end)
        yield marker, pos, end
        pos = end
    raise UnsafeJpeg("no end of image")


# -- both --------------------------------------------------------------------------------------
def orientation_of(exif: bytes) -> int:
    """The EXIF Orientation (1-8) in an EXIF block (TIFF header, with or without the 'Exif\\0\\0' prefix)."""
    from PIL import Image

    parsed = Image.Exif()
    try:
        parsed.load(exif)
        value = int(parsed.get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block is metadata we drop anyway: no orientation
        return 1
    return value if 1 <= value <= 8 else 1


def orientation(image: Any, data: bytes, png: list[tuple[bytes, int, int]] | None = None) -> int:
    """The photo's EXIF orientation, read without decoding pixels (a PNG's from its eXIf chunk)."""
    if image.format == "PNG":
        return png_orientation(data, png if png is not None else png_chunks(data)[0])
    exif = image.info.get("exif")
    return orientation_of(exif) if isinstance(exif, bytes) and exif else 1


def shown_size(size: tuple[int, int], turn: int) -> tuple[int, int]:
    return (size[1], size[0]) if turn in SWAPS_SIDES else size


def cleaned(data: bytes, image_format: str | None, png: list[tuple[bytes, int, int]] | None = None) -> bytes | None:
    """`data` without its metadata, losslessly, or None for a format that cannot be cleaned without decoding."""
    if image_format == "PNG":
        return clean_png(data, png if png is not None else png_chunks(data)[0])
    if image_format in JPEG_CLEANED:
        return clean_jpeg(data)
    return None


def png_bytes(image: Any) -> bytes:
    """Decoded pixels as a PNG that holds nothing but them and their colour profile without its text (Pillow
    writes no other metadata it is not handed, but the source's ICC profile it does, text and all)."""
    profile = image.info.get("icc_profile")
    clean = icc.without_text(profile) if isinstance(profile, bytes) and profile else None
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    image.info.pop("icc_profile", None)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=3, **({"icc_profile": clean} if clean else {}))
    return out.getvalue()


def leftover(data: bytes) -> str | None:
    """What a stored photo holds beyond the kept set, or None: the cleaners' rule as a check (cleaning it again
    would change nothing)."""
    if data.startswith(PNG_SIGNATURE):
        chunks, problem = png_chunks(data)
        extra = sorted({kind.decode("latin-1") for kind, _, _ in chunks if kind not in PNG_KEPT})
        if problem or extra:
            return problem or f"PNG chunks {', '.join(extra)}"
        return None if clean_png(data, chunks) is data else "a named ICC profile, text in it, or data after IEND"
    if data.startswith(b"\xff\xd8"):
        clean = clean_jpeg(data)
        if clean is None:
            return "a JPEG whose markers are out of place"
        return None if clean is data else "JPEG metadata (APPn, COM, a thumbnail or data after the end)"
    return "neither PNG nor JPEG"
