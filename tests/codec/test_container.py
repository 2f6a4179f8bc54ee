"""Corrupted, truncated and foreign blobs must raise, never decode to wrong pixels."""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest

from medzip_scp.codec.api import (
    DatasetReference,
    FrameSet,
    PixelLayout,
    compress,
    decompress,
    describe,
)
from medzip_scp.codec.container import (
    MAGIC,
    ContainerHeader,
    DatasetMethod,
    FrameRecord,
    ModelRef,
    PayloadMode,
    Section,
    SectionType,
    dataset_reference_of,
    get_varint,
    pack_dataset,
    pack_frame_index,
    pack_layout_v3,
    put_varint,
    read_container,
    unpack_frame_index,
    unpack_layout_v3,
    write_container,
)
from medzip_scp.codec.errors import (
    CorruptStreamError,
    MissingReferenceError,
    UnknownModelError,
    UnsupportedFormatError,
)
from medzip_scp.codec.paths import PredictivePath, carried_models
from medzip_scp.codec.predictive import FRESH, FlushSlot, ModelState
from medzip_scp.codec.zoo import MODELS, default_store

from .golden import GOLDEN_V1, GOLDEN_V3, GOLDEN_V3_PAYLOAD, GOLDEN_V3_PIXELS


def _sample_blob(payload: bytes = b"cipher") -> bytes:
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
        payload=payload,
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


@pytest.mark.parametrize("section", ["header", "FRAME_INDEX", "STREAMS", "DATASET", "PAYLOAD"])
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
    """Re-serialise a blob with replaced (or added) section bodies and fresh, valid CRCs."""
    old_header, sections = read_container(blob)
    new = [Section(s.type, replace.get(s.type.name, s.data)) for s in sections]
    present = {s.type.name for s in sections}
    new += [
        Section(SectionType[name], data) for name, data in replace.items() if name not in present
    ]
    return write_container(header or old_header, new)


def test_unknown_model_names_the_missing_hash() -> None:
    digest = hashlib.sha256(b"weights that are not installed").digest()
    header = ContainerHeader(version=3, models=(ModelRef("bitplane-ct-v1", digest),))
    blob = _rewrite(_sample_blob(), header)
    with pytest.raises(UnknownModelError, match=digest.hex()) as err:
        decompress(blob)
    assert err.value.model_sha256 == digest.hex()
    assert "bitplane-ct-v1" in str(err.value)


def test_newer_format_version_is_unsupported_not_corrupt() -> None:
    blob = bytearray(_sample_blob())
    struct.pack_into("<H", blob, 4, 4)
    hlen = struct.unpack_from("<I", blob, 8)[0]
    head = bytes(blob[: 12 + hlen])
    struct.pack_into("<I", blob, 12 + hlen, zlib.crc32(head))
    with pytest.raises(UnsupportedFormatError, match="version 4"):
        decompress(bytes(blob))
    assert blob[:4] == MAGIC


def _records(blob: bytes) -> tuple[bytes, list[FrameRecord]]:
    """The version-3 frame index of a blob: its layout bytes and its records."""
    _, sections = read_container(blob)
    index = next(s.data for s in sections if s.type == SectionType.FRAME_INDEX)
    layout, n, pos = unpack_layout_v3(index)
    assert index[:pos] == pack_layout_v3(layout, n)
    return index[:pos], unpack_frame_index(index[pos:], n, layout.samples_per_pixel, 2)


def test_pixel_crc_catches_wrong_pixels_behind_valid_section_crcs() -> None:
    """A decoder drift / forged record with valid section CRCs must still be caught."""
    blob = _sample_blob()
    layout, records = _records(blob)
    forged = [
        records[0].__class__(**{**records[0].__dict__, "offsets": (records[0].offsets[0] + 1,)})
    ]
    forged += records[1:]
    bad = _rewrite(blob, FRAME_INDEX=layout + pack_frame_index(forged, 3))
    with pytest.raises(CorruptStreamError, match="pixel CRC-32"):
        decompress(bad)


def test_unavailable_path_is_unsupported() -> None:
    # the payload rides in the pred frames' flushes: a newer path is named as such, not
    # reported as a payload its frames cannot carry
    blob = _sample_blob()
    layout, records = _records(blob)
    forged = [records[0].__class__(**{**records[0].__dict__, "path": "learned-v9"}), *records[1:]]
    with pytest.raises(UnsupportedFormatError, match="learned-v9"):
        decompress(_rewrite(blob, FRAME_INDEX=layout + pack_frame_index(forged, 3)))


def test_bits_back_payload_needs_version_2_and_a_carrier() -> None:
    v1 = _rewrite(GOLDEN_V1, PAYLOAD=b"\x02" + struct.pack("<II", 0, 6))
    with pytest.raises(UnsupportedFormatError, match="BITS_BACK"):
        decompress(v1)
    # frame 0 of the sample is classical: it cannot carry the payload
    no_carrier = _rewrite(_sample_blob(b""), PAYLOAD=b"\x02" + struct.pack("<II", 0, 6))
    with pytest.raises(CorruptStreamError, match="should carry 6 payload bytes"):
        decompress(no_carrier)


def test_section_rules_of_version_3() -> None:
    header, sections = read_container(_sample_blob())
    by_type = {s.type: s for s in sections}
    cases = {
        "STREAMS must both be present or both absent": [
            s for s in sections if s.type != SectionType.FRAME_INDEX
        ],
        "LAYOUT must occur 0 to 0 times": [Section(SectionType.LAYOUT, bytes(12)), *sections],
        "DATASET must occur 0 to 1 times": [*sections, by_type[SectionType.DATASET]],
    }
    for message, body in cases.items():
        with pytest.raises(CorruptStreamError, match=message):
            decompress(write_container(header, body))


def test_empty_sections_are_left_out_and_read_as_empty() -> None:
    px = np.arange(12, dtype=np.uint16).reshape(1, 3, 4, 1)
    blob = compress(FrameSet(PixelLayout(3, 4, 1, 16, 12, False), px), learned=None)
    _, sections = read_container(blob)
    assert [s.type for s in sections] == [SectionType.FRAME_INDEX, SectionType.STREAMS]
    out = decompress(blob)
    assert out.dataset_rest == b"" and out.payload == b""
    no_pixels = compress(None, b"only a header")
    assert [s.type for s in read_container(no_pixels)[1]] == [SectionType.DATASET]
    back = decompress(no_pixels)
    assert back.frames is None and back.dataset_rest == b"only a header"


# -- payload mode 3 (free bits, SPREAD) ------------------------------------------------------

SPREAD_LENGTHS = [1, 3, 4, 5, 600, 5000]  # 1, n - 1, n, n + 1 of 4 frames; a remainder


def _payload(length: int) -> bytes:
    return np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()


def _bodies(blob: bytes) -> dict[str, bytes]:
    return {s.type.name: s.data for s in read_container(blob)[1]}


def _pred_start(blob: bytes) -> ModelState:
    """The model the blob's first pred frame starts from: the prior its model table names,
    else fresh."""
    header, _ = read_container(blob)
    for ref in header.model_refs():
        if MODELS[ref.model_id].kind == "prior":
            return default_store().load(ref).state
    return FRESH


def _flush_slots(blob: bytes, layout: PixelLayout) -> list[FlushSlot]:
    """The carriers' flush slots in the STREAMS of ``blob`` (offsets into it): frames coded
    whole by ``pred``, each sample stream with an arithmetic coder."""
    plain_streams, (_, records) = _bodies(blob)["STREAMS"], _records(blob)
    shape = (layout.rows, layout.columns, layout.samples_per_pixel)
    pred = PredictivePath()
    slots = []
    pos = 0
    # the frames of one object, in order, from the prior the blob names
    with carried_models(decoding=True, start=_pred_start(blob)):
        for r in records:
            if r.path == "pred" and r.split_planes == 0:
                _, found = pred.decode_carrying(
                    plain_streams[pos : pos + r.stream_bytes], shape, r.nbits
                )
                slots += [replace(s, offset=pos + s.offset) for s in found]
            pos += r.total_bytes
    return slots


def _free_capacity(frames: FrameSet) -> int:
    """Whole payload bytes the free bits of ``frames``' coder flushes hold."""
    plain = compress(frames, learned=None)
    slots = _flush_slots(plain, frames.layout)
    return sum(s.capacity for s in slots) // 8


def _mode3_reference(
    plain_blob: bytes, layout: PixelLayout, payload: bytes
) -> tuple[bytes, bytes, int, list[tuple[int, int]]]:
    """The STREAMS and PAYLOAD bodies of mode 3 as the container's docstring specifies them,
    made from the blob of the same frames coded without a payload; the free bytes; and where
    each frame's segment sits in that STREAMS (start, length)."""
    plain_streams, (_, records) = _bodies(plain_blob)["STREAMS"], _records(plain_blob)
    slots = _flush_slots(plain_blob, layout)
    free = min(len(payload), sum(s.capacity for s in slots) // 8)
    bits = "".join(f"{b:08b}" for b in payload[:free])
    plain = bytearray(plain_streams)
    for slot in slots:
        take, bits = bits[: slot.capacity], bits[slot.capacity :]
        plain[slot.offset : slot.offset + 4] = (slot.low + int(take or "0", 2)).to_bytes(4, "big")
    rest = payload[free:]
    share = -(-len(rest) // len(records))
    streams = bytearray()
    segments = []
    pos = carried = 0
    for r in records:
        n = min(share, r.stream_bytes, len(rest) - carried)
        at = r.crc32 % (r.stream_bytes + 1)
        streams += plain[pos : pos + at]
        segments.append((len(streams), n))
        streams += rest[carried : carried + n]
        streams += plain[pos + at : pos + r.total_bytes]
        pos += r.total_bytes
        carried += n
    body = bytearray([PayloadMode.SPREAD])
    put_varint(body, free)
    put_varint(body, carried)
    return bytes(streams), bytes(body + rest[carried:]), free, segments


def _check_mode3(frames: FrameSet, length: int) -> tuple[int, list[tuple[int, int]]]:
    """Code ``frames`` with a payload of ``length`` bytes and check every section against
    :func:`_mode3_reference`; return the free bytes and the segments."""
    payload = _payload(length)
    plain = compress(frames, b"rest", learned=None)
    blob = compress(frames, b"rest", payload=payload, learned=None)
    _, records = _records(plain)
    assert _records(blob)[1] == records  # the frames are coded the same, payload or not
    streams, body, free, segments = _mode3_reference(plain, frames.layout, payload)
    sections = _bodies(blob)
    assert sections["STREAMS"] == streams
    assert sections["PAYLOAD"] == body
    assert sections["DATASET"] == _bodies(plain)["DATASET"]
    carried = sum(n for _, n in segments)
    info = describe(blob)  # where the payload rides, as the reference places it
    assert (
        info["payload_free_bytes"],
        info["payload_stream_bytes"],
        info["payload_section_bytes"],
    ) == (free, carried, length - free - carried)
    if carried >= 5:  # segments in more than one frame: no contiguous run of the payload
        assert sum(n > 0 for _, n in segments) > 1
        assert payload[free : free + carried] not in sections["STREAMS"]
        assert payload[free : free + carried] not in sections["PAYLOAD"]
    return free, segments


@pytest.mark.parametrize("length", SPREAD_LENGTHS)
def test_spread_payload_sits_in_the_coded_streams_as_specified(
    carrier_frames: FrameSet, length: int
) -> None:
    free, segments = _check_mode3(carrier_frames, length)
    assert free == 0  # pred stores the noise raw: no coder flush to carry free bits
    carried = sum(n for _, n in segments)
    assert [n for _, n in segments][3] == 0  # the constant frame has no stream to hide in
    _, records = _records(compress(carrier_frames, learned=None))
    assert segments[2][1] <= records[2].stream_bytes  # a frame at most doubles
    if length == 5000:  # more than the frames can carry: the rest stays in the section
        assert carried == sum(r.stream_bytes for r in records)


def test_free_bits_sit_in_the_coder_flushes_as_specified(free_bits_frames: FrameSet) -> None:
    capacity = _free_capacity(free_bits_frames)
    assert capacity >= 6  # three flushes of 20-32 bits
    n = free_bits_frames.n_frames
    for length in [1, capacity - 1, capacity, capacity + 1, capacity + n, capacity + n + 1, 600]:
        free, segments = _check_mode3(free_bits_frames, length)
        assert free == min(length, capacity)
        assert (sum(n for _, n in segments) == 0) == (length <= capacity)
    free, segments = _check_mode3(free_bits_frames, 30000)  # free bits, segments, remainder
    assert free == capacity


def test_a_payload_in_the_free_bits_changes_only_the_flushes(free_bits_frames: FrameSet) -> None:
    plain = compress(free_bits_frames, learned=None)
    _, records = _records(plain)
    slots = _flush_slots(plain, free_bits_frames.layout)
    assert len(slots) == 3
    capacity = sum(s.capacity for s in slots) // 8
    blob = compress(free_bits_frames, payload=_payload(capacity), learned=None)
    streams, plain_streams = _bodies(blob)["STREAMS"], _bodies(plain)["STREAMS"]
    changed = {i for i, (a, b) in enumerate(zip(streams, plain_streams, strict=True)) if a != b}
    assert changed and changed <= {s.offset + j for s in slots for j in range(4)}
    assert _bodies(blob)["PAYLOAD"] == bytes([PayloadMode.SPREAD, capacity, 0])


def test_pixels_never_depend_on_the_spread_payload(carrier_frames: FrameSet) -> None:
    payload = _payload(600)
    blob = compress(carrier_frames, payload=payload, learned=None)
    plain = compress(carrier_frames, learned=None)
    assert _records(plain)[1] == _records(blob)[1]
    *_, segments = _mode3_reference(plain, carrier_frames.layout, payload)
    streams = bytearray(_bodies(blob)["STREAMS"])
    for start, n in segments:
        if n:  # the last payload byte of each segment, behind a valid STREAMS CRC
            streams[start + n - 1] ^= 0xFF
    out = decompress(_rewrite(blob, STREAMS=bytes(streams)))
    assert out.frames is not None
    np.testing.assert_array_equal(out.frames.pixels, carrier_frames.pixels)
    changed = [i for i, (a, b) in enumerate(zip(out.payload, payload, strict=True)) if a != b]
    ends = list(np.cumsum([n for _, n in segments if n]) - 1)
    assert changed == ends


def _set_flush(blob: bytes, slot: FlushSlot, carried: int) -> bytes:
    """``blob`` (a payload in the free bits only: STREAMS as without one) with the flush of
    ``slot`` carrying ``carried``, behind a valid STREAMS CRC."""
    streams = bytearray(_bodies(blob)["STREAMS"])
    streams[slot.offset : slot.offset + 4] = (slot.low + carried).to_bytes(4, "big")
    return _rewrite(blob, STREAMS=bytes(streams))


def test_pixels_never_depend_on_the_free_bits(free_bits_frames: FrameSet) -> None:
    capacity = _free_capacity(free_bits_frames)
    payload = _payload(capacity)
    blob = compress(free_bits_frames, payload=payload, learned=None)
    _, records = _records(blob)
    slots = _flush_slots(blob, free_bits_frames.layout)
    assert all(s.carried for s in slots[:-1])  # the bits did go into the flushes
    taken = 0
    for slot in slots:
        take = min(slot.capacity, 8 * capacity - taken)
        taken += take
        if not take:
            continue
        out = decompress(_set_flush(blob, slot, slot.carried ^ 1))  # its last bit flipped
        assert out.frames is not None
        np.testing.assert_array_equal(out.frames.pixels, free_bits_frames.pixels)
        flipped = int.from_bytes(out.payload, "big") ^ int.from_bytes(payload, "big")
        assert flipped == 1 << (8 * capacity - taken)


def test_a_flush_carrying_more_than_its_bits_is_corrupt(free_bits_frames: FrameSet) -> None:
    blob = compress(free_bits_frames, payload=b"\xa5", learned=None)
    _, records = _records(blob)
    first, second, *_ = _flush_slots(blob, free_bits_frames.layout)
    assert first.carried == 0xA5 and second.carried == 0 and first.capacity > 8
    assert decompress(_set_flush(blob, first, 0xA4)).payload == b"\xa4"
    for slot, carried, bits in [(first, 0x1A5, 8), (second, 1, 0)]:
        with pytest.raises(
            CorruptStreamError,
            match=rf"section PAYLOAD: frame \d's coder flush carries {carried}, .* {bits} free",
        ):
            decompress(_set_flush(blob, slot, carried))


def test_spread_payload_without_frames_is_all_in_the_section() -> None:
    blob = compress(None, b"rest", payload=b"ciphertext")
    sections = _bodies(blob)
    assert "STREAMS" not in sections
    assert sections["PAYLOAD"] == bytes([PayloadMode.SPREAD, 0, 0]) + b"ciphertext"
    assert decompress(blob).payload == b"ciphertext"


def _mode3_body(free: int, spread: int, remainder: bytes) -> bytes:
    body = bytearray([PayloadMode.SPREAD])
    put_varint(body, free)
    put_varint(body, spread)
    return bytes(body) + remainder


def _free_and_spread(blob: bytes) -> tuple[int, int, bytes]:
    body = _bodies(blob)["PAYLOAD"]
    free, at = get_varint(body, 1)
    spread, at = get_varint(body, at)
    return free, spread, body[at:]


def test_spread_length_the_frames_cannot_carry_is_corrupt(carrier_frames: FrameSet) -> None:
    payload = _payload(600)
    blob = compress(carrier_frames, payload=payload, learned=None)
    free, spread, remainder = _free_and_spread(blob)
    for claimed, rest in [
        (spread + 1, remainder[1:]),  # one byte more in the frames than they take
        (spread - 1, payload[spread - 1 : spread] + remainder),  # one byte fewer
        (spread + 10**6, b""),  # more than all their streams
    ]:
        bad = _rewrite(blob, PAYLOAD=_mode3_body(free, claimed, rest))
        with pytest.raises(CorruptStreamError, match=r"section PAYLOAD: frames can carry"):
            decompress(bad)
    no_frames = _rewrite(compress(None, b"rest"), PAYLOAD=_mode3_body(0, 1, b""))
    with pytest.raises(CorruptStreamError, match="section PAYLOAD: frames can carry 0"):
        decompress(no_frames)


def test_free_bytes_the_flushes_cannot_carry_are_corrupt(
    free_bits_frames: FrameSet, carrier_frames: FrameSet
) -> None:
    capacity = _free_capacity(free_bits_frames)
    blob = compress(free_bits_frames, payload=_payload(capacity), learned=None)
    assert _free_and_spread(blob) == (capacity, 0, b"")
    one_more = _rewrite(blob, PAYLOAD=_mode3_body(capacity + 1, 0, b""))
    describe(one_more)  # within what three flushes could hold: known once they decode
    with pytest.raises(
        CorruptStreamError,
        match=rf"section PAYLOAD: the frames' coder flushes carry \d+ free bits, the section "
        rf"says {capacity + 1} free bytes",
    ):
        decompress(one_more)
    no_flush = _rewrite(compress(carrier_frames, learned=None), PAYLOAD=_mode3_body(1, 0, b""))
    with pytest.raises(CorruptStreamError, match="coder flushes carry 0 free bits"):
        decompress(no_flush)  # its two pred frames are stored raw
    cases = [
        (blob, 17, 4),  # four pred streams hold at most 16 bytes
        (compress(carrier_frames, learned=None), 9, 2),
        (compress(None, b"rest"), 1, 0),
    ]
    for base, free, streams in cases:
        bad = _rewrite(base, PAYLOAD=_mode3_body(free, 0, b""))
        message = rf"section PAYLOAD: {free} free bytes, but the frames have {streams} streams"
        for read in (decompress, describe):
            with pytest.raises(CorruptStreamError, match=message):
                read(bad)


def test_streams_that_do_not_hold_the_spread_payload_are_corrupt(
    carrier_frames: FrameSet,
) -> None:
    blob = compress(carrier_frames, payload=_payload(600), learned=None)
    streams = _bodies(blob)["STREAMS"]
    plain = _bodies(compress(carrier_frames, learned=None))["STREAMS"]
    for wrong in (streams[:-1], streams + b"\x00", plain):
        with pytest.raises(CorruptStreamError, match="section STREAMS: frame index accounts"):
            decompress(_rewrite(blob, STREAMS=wrong))


@pytest.mark.parametrize(
    "body", [b"\x03", b"\x03\x80", b"\x03" + b"\xff" * 10 + b"\x00", b"\x03\x00", b"\x03\x00\x80"]
)
def test_cut_short_spread_length_is_corrupt(carrier_frames: FrameSet, body: bytes) -> None:
    blob = compress(carrier_frames, payload=b"cipher", learned=None)
    with pytest.raises(CorruptStreamError, match="section PAYLOAD: mode SPREAD length"):
        decompress(_rewrite(blob, PAYLOAD=body))


def test_spread_payload_needs_version_3() -> None:
    v1 = _rewrite(GOLDEN_V1, PAYLOAD=_mode3_body(0, 0, b"cipher"))
    with pytest.raises(UnsupportedFormatError, match="SPREAD needs format version 3"):
        decompress(v1)


def test_mode_3_blobs_with_free_bits_still_decode() -> None:
    out = decompress(GOLDEN_V3)
    assert out.frames is not None
    np.testing.assert_array_equal(out.frames.pixels, GOLDEN_V3_PIXELS)
    assert out.payload == GOLDEN_V3_PAYLOAD and out.dataset_rest == b"rest"
    assert _free_and_spread(GOLDEN_V3) == (7, 157, GOLDEN_V3_PAYLOAD[-16:])
    assert GOLDEN_V3_PAYLOAD[:7] not in GOLDEN_V3  # the free bytes are in the flushes only


# -- DATASET method 2: coded against a reference ---------------------------------------------

_SERIES_HEADER = b"".join(b"(0020,0013) IS %d; (0018,0050) DS 1.25; " % i for i in range(400))


def test_a_data_set_coded_against_a_reference_needs_exactly_it() -> None:
    reference = DatasetReference(_SERIES_HEADER)
    rest = _SERIES_HEADER.replace(b"IS 7;", b"IS 8;")
    frames = FrameSet(
        PixelLayout(4, 4, 1, 16, 12, False), np.arange(16, dtype="<u2").reshape(1, 4, 4, 1)
    )
    blob = compress(frames, rest, reference=reference)
    alone = compress(frames, rest)
    assert describe(blob)["dataset_bytes"] < describe(alone)["dataset_bytes"] / 4
    assert describe(blob)["dataset_reference"] == reference.sha256.hex()
    decoded = decompress(blob, references={reference.sha256: reference.data}.get)
    assert decoded.dataset_rest == rest
    with pytest.raises(MissingReferenceError, match=reference.sha256.hex()) as missing:
        decompress(blob)
    assert missing.value.sha256 == reference.sha256
    assert isinstance(missing.value, UnsupportedFormatError)  # well-formed, needs more
    with pytest.raises(MissingReferenceError):
        decompress(blob, references=lambda sha: None)
    with pytest.raises(CorruptStreamError, match="was given bytes with sha256"):
        decompress(blob, references=lambda sha: _SERIES_HEADER + b" ")
    body = pack_dataset(rest, reference)
    assert (
        body[0] == DatasetMethod.ZSTD_REFERENCE and dataset_reference_of(body) == reference.sha256
    )
    with pytest.raises(CorruptStreamError, match="reference sha256"):
        dataset_reference_of(body[:20])
    # a reference that does not help is not used: the section is what it is without one
    assert pack_dataset(b"x" * 5, reference)[0] == DatasetMethod.STORED
