"""Corrupted, truncated and foreign blobs must raise, never decode to wrong pixels."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest

from medzip_scp.codec.api import FrameSet, PixelLayout, compress, decompress, describe
from medzip_scp.codec.container import (
    MAGIC,
    ContainerHeader,
    Section,
    SectionType,
    pack_frame_index,
    read_container,
    unpack_frame_index,
    unpack_layout,
    write_container,
)
from medzip_scp.codec.errors import CorruptStreamError, UnknownModelError, UnsupportedFormatError


def _sample_blob() -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:24, :20]
    a = (1000 + 300 * np.sin(x / 3) + rng.normal(0, 5, (24, 20))).astype(np.uint16)
    b = a.copy()
    b[rng.random((24, 20)) < 0.2] |= 0x8000  # frame with an overlay bit: residual stream
    c = np.full((24, 20), 5, np.uint16)
    px = np.stack([a, b, c])[..., None]
    return compress(
        FrameSet(PixelLayout(24, 20, 1, 16, 12, False), px),
        b"dataset bytes " * 20,
        payload=b"cipher",
    )


def _section_spans(blob: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of the header and of each section body."""
    hlen = struct.unpack_from("<I", blob, 8)[0]
    header_end = 12 + hlen + 4
    spans = [("header", 0, header_end)]
    _, sections = read_container(blob)
    pos = header_end
    for s in sections:
        spans.append((s.type.name, pos, pos + len(s.data)))
        pos += len(s.data)
    assert pos == len(blob)
    return spans


def test_sample_blob_is_sound() -> None:
    blob = _sample_blob()
    out = decompress(blob)
    assert out.payload == b"cipher"
    info = describe(blob)
    assert info["frames"][1]["residual_bytes"] > 0
    assert info["frames"][2]["path"] == "constant"


@pytest.mark.parametrize(
    "section", ["header", "LAYOUT", "FRAME_INDEX", "STREAMS", "DATASET", "PAYLOAD"]
)
def test_flipped_byte_in_each_section_raises(section: str) -> None:
    blob = _sample_blob()
    spans = {name: (a, b) for name, a, b in _section_spans(blob)}
    start, end = spans[section]
    assert end > start
    for pos in range(start, end, max(1, (end - start) // 64)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[pos] ^= bit
            with pytest.raises(CorruptStreamError) as err:
                decompress(bytes(bad))
            msg = str(err.value)
            if section != "header" and pos >= 12 + 4:
                assert section in msg or "header" in msg


def test_every_single_byte_flip_raises() -> None:
    blob = _sample_blob()
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptStreamError):
            decompress(bytes(bad))


def test_crc_message_states_expected_and_actual() -> None:
    blob = _sample_blob()
    name, start, end = next(s for s in _section_spans(blob) if s[0] == "STREAMS")
    bad = bytearray(blob)
    bad[(start + end) // 2] ^= 0xFF
    with pytest.raises(
        CorruptStreamError, match=r"STREAMS\): CRC-32 mismatch, expected \w+, actual"
    ):
        decompress(bytes(bad))


def test_truncation_and_trailing_bytes_raise() -> None:
    blob = _sample_blob()
    for n in range(len(blob)):
        with pytest.raises(CorruptStreamError):
            decompress(blob[:n])
    with pytest.raises(CorruptStreamError, match="trailing"):
        decompress(blob + b"\x00")


def test_not_a_blob() -> None:
    with pytest.raises(CorruptStreamError, match="magic"):
        decompress(b"DICM" + bytes(100))


def _rewrite(blob: bytes, header: ContainerHeader | None = None, **replace: bytes) -> bytes:
    """Re-serialise a blob with replaced section bodies and fresh, valid CRCs."""
    old_header, sections = read_container(blob)
    new = [Section(s.type, replace.get(s.type.name, s.data)) for s in sections]
    return write_container(header or old_header, new)


def test_unknown_model_names_the_missing_hash() -> None:
    digest = hashlib.sha256(b"weights that are not installed").digest()
    blob = _rewrite(_sample_blob(), ContainerHeader("bitplane-ct-v1", digest))
    with pytest.raises(UnknownModelError, match=digest.hex()) as err:
        decompress(blob)
    assert err.value.model_sha256 == digest.hex()
    assert "bitplane-ct-v1" in str(err.value)


def test_newer_format_version_is_unsupported_not_corrupt() -> None:
    blob = bytearray(_sample_blob())
    struct.pack_into("<H", blob, 4, 3)
    hlen = struct.unpack_from("<I", blob, 8)[0]
    head = bytes(blob[: 12 + hlen])
    struct.pack_into("<I", blob, 12 + hlen, zlib.crc32(head))
    with pytest.raises(UnsupportedFormatError, match="version 3"):
        decompress(bytes(blob))
    assert blob[:4] == MAGIC


def test_pixel_crc_catches_wrong_pixels_behind_valid_section_crcs() -> None:
    """A decoder drift / forged record with valid section CRCs must still be caught."""
    blob = _sample_blob()
    _, sections = read_container(blob)
    layout, n = unpack_layout(next(s.data for s in sections if s.type == SectionType.LAYOUT))
    index = next(s.data for s in sections if s.type == SectionType.FRAME_INDEX)
    records = unpack_frame_index(index, n, layout.samples_per_pixel)
    forged = [
        records[0].__class__(**{**records[0].__dict__, "offsets": (records[0].offsets[0] + 1,)})
    ]
    forged += records[1:]
    bad = _rewrite(blob, FRAME_INDEX=pack_frame_index(forged))
    with pytest.raises(CorruptStreamError, match="pixel CRC-32"):
        decompress(bad)


def test_unavailable_path_is_unsupported() -> None:
    blob = _sample_blob()
    _, sections = read_container(blob)
    layout, n = unpack_layout(next(s.data for s in sections if s.type == SectionType.LAYOUT))
    index = next(s.data for s in sections if s.type == SectionType.FRAME_INDEX)
    records = unpack_frame_index(index, n, layout.samples_per_pixel)
    forged = [records[0].__class__(**{**records[0].__dict__, "path": "learned-v9"}), *records[1:]]
    with pytest.raises(UnsupportedFormatError, match="learned-v9"):
        decompress(_rewrite(blob, FRAME_INDEX=pack_frame_index(forged)))


def test_bits_back_payload_mode_is_reserved() -> None:
    bad = _rewrite(_sample_blob(), PAYLOAD=b"\x02" + struct.pack("<I", 6))
    with pytest.raises(UnsupportedFormatError, match="BITS_BACK"):
        decompress(bad)


def test_missing_mandatory_section() -> None:
    header, sections = read_container(_sample_blob())
    blob = write_container(header, [s for s in sections if s.type != SectionType.DATASET])
    with pytest.raises(CorruptStreamError, match="DATASET must occur exactly once"):
        decompress(blob)
