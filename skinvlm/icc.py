"""ICC colour profiles without their text: the colour data a photo's pixels need, nothing a person wrote.

A profile (ICC.1, v2 and v4) is a 128-byte header, a tag table and the tags' data. Most tags are numbers (white
point, curves, matrices, lookup tables); a few are free text: the description, the copyright, the device's maker
and model, a metadata dictionary, named colours. A camera's or an editing tool's profile may name a person or a
clinic there, and a stored photo travels to the Hub with its profile. So the colour data is kept, byte for byte,
and each text tag is emptied (the description and copyright stay, as the format wants them, holding no text) or
dropped (the optional ones). Converting the pixels to sRGB and dropping the profile was the other way: it changes
every pixel and re-encodes a JPEG, where this keeps the pixels exactly as the camera wrote them.
"""

from __future__ import annotations

import struct

HEADER = 128
PROFILE_ID = slice(84, 100)  # an MD5 of the profile: zero means "not computed", which an edited profile must say
# Text-bearing tag types, and what each becomes: an empty text of its own type, or None (the tag is dropped).
EMPTY_TEXT: dict[bytes, bytes | None] = {
    b"text": b"text\0\0\0\0\0",
    b"desc": b"desc\0\0\0\0" + struct.pack(">I", 1) + b"\0" + bytes(4 + 4 + 2 + 1 + 67),
    b"mluc": b"mluc\0\0\0\0" + struct.pack(">II", 0, 12),
    b"dict": None,
    b"ncl2": None,
    b"clrt": None,
    b"utf8": None,
    b"utf16": None,
    b"zut8": None,
}


def tags(profile: bytes) -> list[tuple[bytes, bytes]] | None:
    """(signature, data) of every tag, or None where the profile's structure is broken."""
    if len(profile) < HEADER + 4 or struct.unpack_from(">I", profile, 0)[0] > len(profile):
        return None
    (count,) = struct.unpack_from(">I", profile, HEADER)
    if HEADER + 4 + 12 * count > len(profile):
        return None
    found = []
    for i in range(count):
        signature, offset, size = struct.unpack_from(">4sII", profile, HEADER + 4 + 12 * i)
        if offset + size > len(profile) or size < 4:
            return None
        found.append((signature, profile[offset : offset + size]))
    return found


def has_text(profile: bytes) -> bool:
    found = tags(profile)
    return found is None or any(data[:4] in EMPTY_TEXT and data != EMPTY_TEXT[data[:4]] for _, data in found)


def without_text(profile: bytes) -> bytes | None:
    """`profile` with its text tags emptied or dropped (the very object when it holds none), or None where its
    structure is broken: such a profile is dropped whole (readers ignore one they cannot parse anyway)."""
    found = tags(profile)
    if found is None:
        return None
    if not has_text(profile):
        return profile
    kept = [(sig, EMPTY_TEXT.get(data[:4], data)) for sig, data in found]
    kept = [(sig, data) for sig, data in kept if data is not None]
    table, body = bytearray(), bytearray()
    start = HEADER + 4 + 12 * len(kept)
    for signature, data in kept:
        assert data is not None
        table += struct.pack(">4sII", signature, start + len(body), len(data))
        body += data + bytes(-len(data) % 4)  # tags start on 4-byte boundaries
    header = bytearray(profile[:HEADER])
    header[PROFILE_ID] = bytes(16)
    out = header + struct.pack(">I", len(kept)) + table + body
    out[0:4] = struct.pack(">I", len(out))
    return bytes(out)
