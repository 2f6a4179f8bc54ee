"""Encapsulated pixel data: do the frames' own headers agree with the image attributes?

A decoder sizes its output from the codestream's header (JPEG 2000 SIZ, JPEG SOF, JPEG-LS
SOF55), not from Rows and Columns: a stored object whose codestream claims 640 x 8,389,088
pixels makes a retrieval that decompresses it allocate gigabytes. These checks read only
the headers (a few hundred bytes per frame, nothing decoded), at store time and again
before every decode, so a decoder never produces more than the attributes declare.
"""

from __future__ import annotations

import itertools
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

_JPEG_2000 = frozenset({JPEG2000, JPEG2000Lossless, HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL})
_JPEG = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
_JPEG_LS = frozenset({JPEGLSLossless, JPEGLSNearLossless})
CHECKED_SYNTAXES = _JPEG_2000 | _JPEG | _JPEG_LS | {RLELossless}

_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_TAG_LENGTH = struct.Struct("<HHI")
_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: the start of every J2K codestream
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JPEG_SOI = b"\xff\xd8"
# SOF markers of every JPEG process (C4 DHT, C8 JPG and CC DAC are not frames), and SOF55
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_LS_SOF = frozenset({0xF7})
Buffer = bytes | mmap.mmap  # both have find() and work with struct.unpack_from in place


class FrameHeaderError(ValueError):
    """A frame's header disagrees with the image attributes (no PHI in the message)."""


@dataclass(frozen=True)
class FrameHeader:
    rows: int  # 0: a JPEG frame whose height follows in a DNL marker
    columns: int
    samples: int
    precision: int  # bits per sample; RLE: bytes per sample x 8


@dataclass(frozen=True)
class ImageAttributes:
    rows: int
    columns: int
    samples: int
    frames: int
    bits_allocated: int

    @classmethod
    def of(cls, header: Any) -> ImageAttributes:
        """The attributes of a data set (``get`` by keyword); FrameHeaderError if any is
        missing or not a positive integer."""
        values = {}
        for keyword, default in (
            ("Rows", None),
            ("Columns", None),
            ("SamplesPerPixel", 1),
            ("NumberOfFrames", 1),
            ("BitsAllocated", None),
        ):
            value = header.get(keyword, default)
            if value in (None, ""):
                value = default
            try:
                values[keyword] = int(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise FrameHeaderError(f"{keyword} is missing or not an integer") from None
            if values[keyword] <= 0:
                raise FrameHeaderError(f"{keyword} is {values[keyword]}, not positive")
        return cls(
            values["Rows"],
            values["Columns"],
            values["SamplesPerPixel"],
            values["NumberOfFrames"],
            values["BitsAllocated"],
        )


MAX_FRAGMENTS = 1 << 18
"""Fragments accepted in encapsulated Pixel Data (at least four per frame): one 4 GiB frame
cut into 16 KiB fragments is as many."""


def fragments(buf: Buffer, pos: int, delimited: bool = True) -> Iterator[tuple[int, int]]:
    """(offset, length) of each item of encapsulated pixel data whose first item (the
    Basic Offset Table) starts at ``pos``, through the Sequence Delimitation Item (or,
    not ``delimited``, to the end of ``buf``: pydicom's value of Pixel Data)."""
    while pos + 8 <= len(buf):
        group, element, length = _TAG_LENGTH.unpack_from(buf, pos)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM or pos + 8 + length > len(buf):
            raise FrameHeaderError("encapsulated pixel data items are malformed")
        yield pos + 8, length
        pos += 8 + length
    if delimited or pos != len(buf):
        raise FrameHeaderError("encapsulated pixel data has no sequence delimiter")


def check_frames(
    buf: Buffer,
    pos: int,
    syntax: UID,
    image: ImageAttributes,
    delimited: bool = True,
    strict: bool = False,
) -> None:
    """Check the encapsulated pixel data at ``pos`` (its Basic Offset Table item) against
    the image attributes: frame count, and each frame header's size, samples and precision.
    ``delimited``: as for :func:`fragments`.

    A frame without a header these readers find is let through unless ``strict``: at store
    time it is kept as received (``966.dcm`` of the conformance set holds a J2K stream that
    no decoder reads; its bytes still go back intact to a peer that accepts JPEG 2000), as
    a decoder finds no header there either and fails before it allocates anything. Before a
    decode (``strict``) it is refused, so no decoder ever sizes its output unchecked.

    Raises
    ------
    FrameHeaderError
        A frame is missing, or a header claims other dimensions, more samples, or more
        bits per sample than BitsAllocated holds (or, ``strict``, cannot be read).
    """
    if syntax not in CHECKED_SYNTAXES:
        if strict:
            raise FrameHeaderError(f"frame headers of {syntax.name} cannot be checked")
        return
    # Each fragment item costs 8 bytes on the wire but a hundred in the list: bound them
    # (a 32 MB object of 4 million empty fragments took 428 MB to check).
    limit = max(MAX_FRAGMENTS, 4 * image.frames)
    items = list(itertools.islice(fragments(buf, pos, delimited), limit + 1))
    if len(items) > limit:
        raise FrameHeaderError(f"encapsulated pixel data has more than {limit} fragments")
    if not items:
        raise FrameHeaderError("encapsulated pixel data has no Basic Offset Table item")
    (table_at, table_length), data = items[0], items[1:]
    if len(data) < image.frames:
        raise FrameHeaderError(
            f"NumberOfFrames is {image.frames} but the pixel data has {len(data)} fragments"
        )
    for at, length in _frame_starts(buf, table_at, table_length, data, syntax, image.frames):
        header = _read_header(buf, at, at + length, syntax)
        if header is not None:
            _compare(header, image, syntax)
            if strict and header.rows == 0 and syntax != RLELossless:
                # the height follows the first scan (DNL): a decoder learns it too late
                raise FrameHeaderError("a JPEG frame header leaves its height to a DNL marker")
        elif strict:
            raise FrameHeaderError(f"a frame has no {syntax.name} header that can be read")


def _frame_starts(
    buf: Buffer,
    table_at: int,
    table_length: int,
    data: list[tuple[int, int]],
    syntax: UID,
    frames: int,
) -> list[tuple[int, int]]:
    """The fragments that begin a frame."""
    if table_length:
        if table_length % 4 or table_length // 4 != frames:
            raise FrameHeaderError(
                f"the Basic Offset Table has {table_length // 4} entries for "
                f"NumberOfFrames {frames}"
            )
        offsets = struct.unpack_from(f"<{frames}I", buf, table_at)
        by_offset = {}
        position = 0
        for at, length in data:
            by_offset[position] = (at, length)
            position += 8 + length
        if any(offset not in by_offset for offset in offsets):
            raise FrameHeaderError("a Basic Offset Table entry is not at a fragment")
        return [by_offset[offset] for offset in offsets]
    if len(data) == frames or frames == 1:
        return data[:frames]
    # Frames split over fragments, no table: a frame begins where a codestream begins.
    return [item for item in data if _starts_codestream(buf, item[0], item[0] + item[1], syntax)]


def _starts_codestream(buf: Buffer, at: int, end: int, syntax: UID) -> bool:
    if syntax in _JPEG_2000:
        return _startswith(buf, at, end, _J2K_SIZ) or _startswith(buf, at, end, _JP2_SIGNATURE)
    if syntax == RLELossless:
        return True
    return _startswith(buf, at, end, _JPEG_SOI)


def _startswith(buf: Buffer, at: int, end: int, prefix: bytes) -> bool:
    return end - at >= len(prefix) and buf[at : at + len(prefix)] == prefix


def _read_header(buf: Buffer, at: int, end: int, syntax: UID) -> FrameHeader | None:
    """The header of the frame in ``buf[at:end]``, read in place (nothing copied)."""
    if syntax in _JPEG_2000:
        return _j2k_header(buf, at, end)
    if syntax == RLELossless:
        return _rle_header(buf, at, end)
    return _jpeg_header(buf, at, end, _JPEG_LS_SOF if syntax in _JPEG_LS else _JPEG_SOF)


def _j2k_header(buf: Buffer, at: int, end: int) -> FrameHeader | None:
    """The SIZ marker segment (ISO/IEC 15444-1 A.5.1) that follows SOC, of a bare
    codestream or of the codestream box of a JP2 file (decoders accept both)."""
    if _startswith(buf, at, end, _JP2_SIGNATURE):
        at = _jp2_codestream(buf, at, end)
    if not _startswith(buf, at, end, _J2K_SIZ) or at + 42 > end:
        return None
    # after SOC and the SIZ marker: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, 4 tile sizes, Csiz
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4I", buf, at + 8)
    (components,) = struct.unpack_from(">H", buf, at + 40)
    if components == 0 or at + 42 + 3 * components > end:
        return None
    precision = max((buf[at + 42 + 3 * c] & 0x7F) + 1 for c in range(components))
    return FrameHeader(ysiz - yosiz, xsiz - xosiz, components, precision)


def _jp2_codestream(buf: Buffer, at: int, end: int) -> int:
    """Where the contiguous codestream box's content starts (ISO/IEC 15444-1 I.4); ``end``
    when there is none."""
    while at + 8 <= end:
        length, kind = struct.unpack_from(">I4s", buf, at)
        header = 8
        if length == 1 and at + 16 <= end:
            (length,) = struct.unpack_from(">Q", buf, at + 8)
            header = 16
        if kind == b"jp2c":
            return at + header
        if length == 0 or length < header:  # to the end of the file, or malformed
            return end
        at += length
    return end


def _jpeg_header(
    buf: Buffer, at: int, end: int, frame_markers: frozenset[int]
) -> FrameHeader | None:
    """The frame header (ITU T.81 B.2.2; T.87 for SOF55): the first SOF marker segment
    after SOI, found by walking the marker segments before it."""
    if not _startswith(buf, at, end, _JPEG_SOI):
        return None
    pos = at + 2
    while pos + 4 <= end:
        if buf[pos] != 0xFF:
            # libjpeg skips bytes that are not a marker (with a warning): so must we
            pos = buf.find(b"\xff", pos, end)
            if pos < 0:
                return None
            continue
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", buf, pos + 2)
        if marker in frame_markers:
            if pos + 10 > end:
                return None
            precision, rows, columns, components = struct.unpack_from(">BHHB", buf, pos + 4)
            return FrameHeader(rows, columns, components, precision)
        if marker == 0xDA:  # a scan before any frame header
            return None
        pos += 2 + length
    return None


def _rle_header(buf: Buffer, at: int, end: int) -> FrameHeader | None:
    """The RLE header (PS3.5 G.5): its segment count is samples x bytes per sample."""
    if end - at < 64:
        return None
    (segments,) = struct.unpack_from("<I", buf, at)
    return FrameHeader(rows=0, columns=0, samples=0, precision=segments * 8)


def _compare(header: FrameHeader, image: ImageAttributes, syntax: UID) -> None:
    if syntax == RLELossless:
        segments = header.precision // 8
        expected = image.samples * ((image.bits_allocated + 7) // 8)
        if segments != expected:
            raise FrameHeaderError(
                f"an RLE frame has {segments} segments, SamplesPerPixel x BitsAllocated "
                f"calls for {expected}"
            )
        return
    if (header.rows not in (0, image.rows)) or header.columns != image.columns:
        raise FrameHeaderError(
            f"a frame header claims {header.columns} x {header.rows} pixels, Columns x Rows "
            f"are {image.columns} x {image.rows}"
        )
    if header.samples != image.samples:
        raise FrameHeaderError(
            f"a frame header claims {header.samples} components, SamplesPerPixel is {image.samples}"
        )
    if header.precision > image.bits_allocated:
        raise FrameHeaderError(
            f"a frame header claims {header.precision} bits per sample, BitsAllocated is "
            f"{image.bits_allocated}"
        )
