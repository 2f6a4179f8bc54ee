"""The medzip blob format (version 1): a versioned, self-describing, checksummed container.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"MZP1"
    4       2     format version (u16), 1
    6       2     header flags (u16), 0 in version 1
    8       4     H: length of the header body (u32)
    12      H     header body:
                    u8   length of the model id, then the model id (ASCII); empty = classical
                    32   sha256 of the model weights   } only when the model id is not
                    32   sha256 of the adapter weights } empty (zeros for no adapter)
                    u8   number of sections N
                    N x  section entry: u8 type, LEB128 varint length, u32 CRC-32
    12+H    4     CRC-32 of bytes [0, 12+H)
    ...           section bodies, in table order, back to back; the blob ends with the last

The magic, version, flags and header length (the first 12 bytes) keep this meaning in every
future version, so a decoder can always tell "newer format" from "corrupted".

Section types (:class:`SectionType`):

``LAYOUT`` (exactly one)
    rows u16, columns u16, samples u8, bits allocated u8, bits stored u8, signed u8,
    planar configuration u8, frame count u32.
``FRAME_INDEX`` (exactly one)
    A table of path names, then one :class:`FrameRecord` per frame, see
    :func:`pack_frame_index`.
``STREAMS`` (exactly one)
    The coded bytes of all frames back to back, in frame order; the frame index holds the
    lengths.
``DATASET`` (exactly one)
    The caller's opaque non-pixel bytes: u8 method (0 stored, 1 zstd), u64 raw length, data.
``PAYLOAD`` (exactly one)
    The reserved slot for the encrypted metadata payload: u8 mode, then the payload bytes.
    Mode 0: none. Mode 1: the (already encrypted) payload is stored in this section.
    Mode 2 (reserved, rejected by version-1 decoders): the payload rides in the initial bits
    of a bits-back ANS stream of a learned path; this section then holds only its length (u32)
    and the learned path's decoder returns the bits when it has decoded the latents. The
    pixels never depend on the payload, so they decode without the key.

Every section is covered by its CRC-32, the header by its own; any mismatch, an unknown
section type, a missing or repeated mandatory section, or a length that disagrees with the
blob raises :class:`~medzip_scp.codec.errors.CorruptStreamError` naming the section and the
expected and actual values. In addition, each frame record carries the CRC-32 of the frame's
original values, checked after decoding (see :mod:`medzip_scp.codec.api`).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

from medzip_scp.codec.errors import CorruptStreamError, UnsupportedFormatError
from medzip_scp.codec.frames import PixelLayout

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "ZERO_SHA256",
    "ContainerHeader",
    "FrameRecord",
    "PayloadMode",
    "Section",
    "SectionType",
    "pack_frame_index",
    "pack_layout",
    "read_container",
    "unpack_frame_index",
    "unpack_layout",
    "write_container",
]

MAGIC = b"MZP1"
FORMAT_VERSION = 1
ZERO_SHA256 = bytes(32)

_PREFIX = struct.Struct("<4sHHI")
_LAYOUT = struct.Struct("<HHBBBBBI")
_MAX_HEADER = 64 * 1024 * 1024


class SectionType(IntEnum):
    """Type tag of a section. Values are part of the format: never renumber, only append."""

    LAYOUT = 1
    FRAME_INDEX = 2
    STREAMS = 3
    DATASET = 4
    PAYLOAD = 5


class PayloadMode(IntEnum):
    """How the encrypted metadata payload is carried (see module docstring)."""

    NONE = 0
    SECTION = 1
    BITS_BACK = 2


@dataclass(frozen=True)
class Section:
    """One section: its type and body."""

    type: SectionType
    data: bytes


@dataclass(frozen=True)
class ContainerHeader:
    """Model identification recorded in the header.

    Attributes
    ----------
    model_id
        Registry id of the learned model; empty for classical-only blobs.
    model_sha256, adapter_sha256
        Raw 32-byte digests of the weights; zeros when unused.
    version
        Format version read from (or written to) the blob.
    """

    model_id: str = ""
    model_sha256: bytes = ZERO_SHA256
    adapter_sha256: bytes = ZERO_SHA256
    version: int = FORMAT_VERSION


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def write_container(header: ContainerHeader, sections: list[Section]) -> bytes:
    """Serialise a header and sections into a blob.

    Parameters
    ----------
    header
        Model identification.
    sections
        Sections in the order they are stored.

    Returns
    -------
    bytes
        The blob.

    Raises
    ------
    ValueError
        If the model id is not ASCII or longer than 255 bytes, or a digest is not 32 bytes.
    """
    model_id = header.model_id.encode("ascii")
    if len(model_id) > 255:
        raise ValueError(f"model id must be at most 255 bytes, got {len(model_id)}")
    for name, digest in (("model", header.model_sha256), ("adapter", header.adapter_sha256)):
        if len(digest) != 32:
            raise ValueError(f"{name} sha256 must be 32 bytes, got {len(digest)}")
    if not model_id and (
        header.model_sha256 != ZERO_SHA256 or header.adapter_sha256 != ZERO_SHA256
    ):
        raise ValueError("model/adapter sha256 given without a model id")
    if len(sections) > 255:
        raise ValueError(f"at most 255 sections, got {len(sections)}")
    body = bytearray()
    body += bytes([len(model_id)]) + model_id
    if model_id:
        body += header.model_sha256 + header.adapter_sha256
    body.append(len(sections))
    for s in sections:
        body.append(int(s.type))
        _put_varint(body, len(s.data))
        body += struct.pack("<I", _crc(s.data))
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(body)) + bytes(body)
    out = bytearray(head)
    out += struct.pack("<I", _crc(head))
    for s in sections:
        out += s.data
    return bytes(out)


def read_container(blob: bytes) -> tuple[ContainerHeader, list[Section]]:
    """Parse and validate a blob's header, section table and section checksums.

    Parameters
    ----------
    blob
        The complete blob.

    Returns
    -------
    tuple of ContainerHeader and list of Section
        The header and every section, in stored order.

    Raises
    ------
    CorruptStreamError
        On a bad magic, truncation, trailing bytes, a CRC mismatch, an unknown section type
        or a missing/repeated mandatory section.
    UnsupportedFormatError
        On a valid header of a newer format version or with unknown header flags.
    """
    view = memoryview(blob)
    if len(view) < _PREFIX.size + 4:
        raise CorruptStreamError(
            f"blob header: need at least {_PREFIX.size + 4} bytes, got {len(view)}"
        )
    magic, version, flags, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptStreamError(f"blob header: magic must be {MAGIC!r}, got {bytes(magic)!r}")
    hend = _PREFIX.size + hlen
    if hlen > _MAX_HEADER or hend + 4 > len(view):
        raise CorruptStreamError(
            f"blob header: header length {hlen} runs past the end of the {len(view)}-byte blob"
        )
    (stored_crc,) = struct.unpack_from("<I", view, hend)
    actual_crc = _crc(view[:hend])
    if stored_crc != actual_crc:
        raise CorruptStreamError(
            f"blob header: CRC-32 mismatch, expected {stored_crc:08x}, actual {actual_crc:08x}"
        )
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"blob format version {version} is not supported by this decoder "
            f"(supports {FORMAT_VERSION}); upgrade medzip"
        )
    if flags != 0:
        raise UnsupportedFormatError(
            f"blob header flags must be 0 in format version {FORMAT_VERSION}, got {flags:#06x}"
        )
    pos = _PREFIX.size
    body = bytes(view[:hend])
    entries: list[tuple[int, int, int]] = []
    try:
        n = body[pos]
        model_id = body[pos + 1 : pos + 1 + n].decode("ascii")
        pos += 1 + n
        model_sha, adapter_sha = ZERO_SHA256, ZERO_SHA256
        if n:
            model_sha, adapter_sha = body[pos : pos + 32], body[pos + 32 : pos + 64]
            pos += 64
        n_sections = body[pos]
        pos += 1
        for _ in range(n_sections):
            stype = body[pos]
            length, pos = _get_varint(body, pos + 1)
            (crc,) = struct.unpack_from("<I", body, pos)
            pos += 4
            entries.append((stype, length, crc))
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise CorruptStreamError(f"blob header: malformed header body ({exc})") from None
    if pos != hend or len(model_sha) != 32 or len(adapter_sha) != 32:
        raise CorruptStreamError(
            f"blob header: {len(entries)} section entries end at byte {pos}, header ends at {hend}"
        )

    offset = hend + 4
    sections: list[Section] = []
    for i, (stype, length, crc) in enumerate(entries):
        try:
            st = SectionType(stype)
        except ValueError:
            raise CorruptStreamError(
                f"section {i}: unknown section type {stype}, expected one of "
                f"{[int(t) for t in SectionType]}"
            ) from None
        end = offset + length
        if end > len(view):
            raise CorruptStreamError(
                f"section {i} ({st.name}): length {length} at offset {offset} runs past the "
                f"end of the {len(view)}-byte blob (truncated?)"
            )
        data = view[offset:end]
        actual = _crc(data)
        if actual != crc:
            raise CorruptStreamError(
                f"section {i} ({st.name}): CRC-32 mismatch, expected {crc:08x}, actual {actual:08x}"
            )
        sections.append(Section(st, bytes(data)))
        offset = end
    if offset != len(view):
        raise CorruptStreamError(
            f"blob: sections end at byte {offset}, but the blob has {len(view)} bytes "
            "(trailing data)"
        )
    for mandatory in (
        SectionType.LAYOUT,
        SectionType.FRAME_INDEX,
        SectionType.STREAMS,
        SectionType.DATASET,
        SectionType.PAYLOAD,
    ):
        count = sum(1 for s in sections if s.type == mandatory)
        if count != 1:
            raise CorruptStreamError(
                f"blob: section {mandatory.name} must occur exactly once, found {count}"
            )
    return ContainerHeader(model_id, model_sha, adapter_sha, version), sections


def pack_layout(layout: PixelLayout, n_frames: int) -> bytes:
    """Serialise a layout and frame count into a ``LAYOUT`` section body."""
    return _LAYOUT.pack(
        layout.rows,
        layout.columns,
        layout.samples_per_pixel,
        layout.bits_allocated,
        layout.bits_stored,
        int(layout.signed),
        layout.planar_configuration,
        n_frames,
    )


def unpack_layout(data: bytes) -> tuple[PixelLayout, int]:
    """Parse a ``LAYOUT`` section body.

    Raises
    ------
    CorruptStreamError
        On a wrong length or values that break the DICOM rules.
    """
    if len(data) != _LAYOUT.size:
        raise CorruptStreamError(f"section LAYOUT: length must be {_LAYOUT.size}, got {len(data)}")
    rows, cols, spp, ba, bs, signed, planar, n = _LAYOUT.unpack(data)
    if signed > 1:
        raise CorruptStreamError(f"section LAYOUT: signed flag must be 0 or 1, got {signed}")
    layout = PixelLayout(rows, cols, spp, ba, bs, bool(signed), planar)
    try:
        layout.validate()
    except Exception as exc:
        raise CorruptStreamError(f"section LAYOUT: {exc}") from None
    return layout, n


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError(f"varint must be non-negative, got {value}")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _get_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


@dataclass(frozen=True)
class FrameRecord:
    """How one frame was coded.

    Attributes
    ----------
    path
        Path id (``"jpegxl"``, ``"jpegls"``, ``"zstd"``, ``"verbatim"``, ``"constant"``,
        later ``"learned"`` ...). Stored by name (in the index's name table) so ids never
        get renumbered.
    value_bits
        Number of low bits of each stored value coded as the pixel value (Bits Stored, or
        Bits Allocated when the whole container word is coded as the value).
    split_planes
        Number of low bit planes split off the value for a learned global/local split;
        0 for the classical paths.
    nbits
        Bit depth of the shifted values handed to the path (0: constant frame).
    offsets
        Per-sample minimum subtracted before coding (offset-binary domain).
    stream_bytes
        Length of the path's bytes in the ``STREAMS`` section.
    residual_bytes
        Length of the zstd-coded bits above ``value_bits`` (XOR the sign extension for
        signed data), which follow the path's bytes; ``None`` when there is no residual.
    crc32
        CRC-32 of the frame's original values (container dtype, little-endian bytes).

    Notes
    -----
    Frames' streams lie back to back in the ``STREAMS`` section, in frame order, each frame's
    path bytes followed by its residual bytes, so offsets follow from the lengths.
    """

    path: str
    value_bits: int
    split_planes: int
    nbits: int
    offsets: tuple[int, ...]
    stream_bytes: int
    residual_bytes: int | None = None
    crc32: int = 0


def pack_frame_index(records: list[FrameRecord]) -> bytes:
    """Serialise frame records into a ``FRAME_INDEX`` section body.

    Body: u8 number of path names, then each name (u8 length, ASCII); then per frame:
    u8 path name index, u8 value bits, u8 split planes, u8 nbits, u8 flags (bit 0: residual
    present), one LEB128 varint offset per sample, varint stream length, varint residual
    length (only when flagged), u32 CRC-32 of the frame's values.
    """
    names: list[str] = []
    for r in records:
        if r.path not in names:
            names.append(r.path)
    if len(names) > 255:
        raise ValueError(f"at most 255 distinct paths per blob, got {len(names)}")
    out = bytearray([len(names)])
    for name in names:
        raw = name.encode("ascii")
        out.append(len(raw))
        out += raw
    for r in records:
        flags = 1 if r.residual_bytes is not None else 0
        out += bytes([names.index(r.path), r.value_bits, r.split_planes, r.nbits, flags])
        for o in r.offsets:
            _put_varint(out, o)
        _put_varint(out, r.stream_bytes)
        if r.residual_bytes is not None:
            _put_varint(out, r.residual_bytes)
        out += struct.pack("<I", r.crc32)
    return bytes(out)


def unpack_frame_index(data: bytes, n_frames: int, samples: int) -> list[FrameRecord]:
    """Parse a ``FRAME_INDEX`` section body holding ``n_frames`` records.

    Raises
    ------
    CorruptStreamError
        On truncation, trailing bytes, bad flags, a path index outside the name table or a
        non-ASCII path name.
    """
    out: list[FrameRecord] = []
    pos = 0
    try:
        n_names = data[0]
        pos = 1
        names = []
        for _ in range(n_names):
            n = data[pos]
            names.append(data[pos + 1 : pos + 1 + n].decode("ascii"))
            pos += 1 + n
        for i in range(n_frames):
            ix, vb, sp, nb, flags = data[pos : pos + 5]
            pos += 5
            if ix >= len(names):
                raise CorruptStreamError(
                    f"section FRAME_INDEX: frame {i} path index must be < {len(names)}, got {ix}"
                )
            if flags > 1:
                raise CorruptStreamError(
                    f"section FRAME_INDEX: frame {i} flags must be 0 or 1, got {flags}"
                )
            offsets = []
            for _ in range(samples):
                o, pos = _get_varint(data, pos)
                offsets.append(o)
            stream_len, pos = _get_varint(data, pos)
            residual_len = None
            if flags & 1:
                residual_len, pos = _get_varint(data, pos)
            (crc,) = struct.unpack_from("<I", data, pos)
            pos += 4
            out.append(
                FrameRecord(names[ix], vb, sp, nb, tuple(offsets), stream_len, residual_len, crc)
            )
    except CorruptStreamError:
        raise
    except (IndexError, ValueError, struct.error) as exc:
        raise CorruptStreamError(
            f"section FRAME_INDEX: malformed or truncated record ({exc})"
        ) from None
    if pos != len(data):
        raise CorruptStreamError(
            f"section FRAME_INDEX: {n_frames} records end at byte {pos}, "
            f"section has {len(data)} bytes"
        )
    return out
