"""Encapsulated lossless objects stored as pixels, their original bytes regenerated.

An object that arrives JPEG Lossless (process 14, PS3.5 A.4.1; the usual lossless syntax of
CR/DX/MR forwarded by PACS), JPEG-LS lossless (A.4.3) or RLE Lossless (A.4.2) would otherwise
be kept as it came: no smaller than its JPEG or RLE. :func:`recode` decodes each frame, lets
the codec store the pixels, and keeps everything else of the file *except* the bytes the
pixels determine (the "holes"): for JPEG Lossless and JPEG-LS each frame's entropy-coded
data, which :func:`restore` codes back from the pixels (:mod:`medzip_scp.codec.jpeg_lossless`,
:mod:`medzip_scp.codec.jpegls_lossless`); for RLE each frame's run data, put back between the
run headers the record keeps (:mod:`medzip_scp.codec.rle_lossless`). JPEG 2000 is not
recoded: its coders have too many freedoms (code-block passes, termination, layers) for
OpenJPEG to reproduce another encoder's codestream (measured: none of the shared data's
Kakadu, JasPer or GDCM codestreams came back). Item
tags, the offset table, fragment boundaries, JPEG marker segments, padding and whatever
follows stay verbatim, so the original file comes back byte for byte. Before any of this is
used, every frame is rebuilt and compared with the original: one byte off and the file is
kept whole.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import imagecodecs
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from medzip_scp.codec import jpeg_lossless, jpegls_lossless
from medzip_scp.codec.api import FrameSet, PixelLayout
from medzip_scp.codec.container import get_varint, put_varint
from medzip_scp.codec.errors import CorruptStreamError
from medzip_scp.codec.rle_lossless import (
    NotSplittable,
    join,
    planes_to_samples,
    samples_to_planes,
    split,
)
from medzip_scp.dicom.frames import FrameHeaderError, fragments

JPEG_LOSSLESS_SYNTAXES = frozenset({JPEGLossless, JPEGLosslessSV1})
RECODED_SYNTAXES = JPEG_LOSSLESS_SYNTAXES | {JPEGLSLossless, RLELossless}
_JPEG, _RLE, _JPEGLS = 0, 1, 2  # the record's kind byte: part of the format
_MAX_EXPANSION = 64  # decoded bytes per encapsulated byte, at most
_PIXEL_DATA = 0x7FE00010
_COUNT = struct.Struct("<I")


class NotRecoded(Exception):
    """The object is kept as it came; the reason names why (no data values)."""


@dataclass(frozen=True)
class Recoded:
    """The frames' pixels, what each frame needs besides them, and where its bytes were."""

    frames: FrameSet
    kind: int  # _JPEG, _JPEGLS: each frame's scan; _RLE: each frame's skeleton
    frame_records: list[bytes]
    holes: list[tuple[int, int]]  # (offset in the file, length), in file order
    value_offset: int  # where the Pixel Data value starts in the file

    def pack(self) -> bytes:
        """The kind, frame records and holes (:func:`restore` reads them back)."""
        out = bytearray([self.kind])
        put_varint(out, len(self.frame_records))
        for record in self.frame_records:
            put_varint(out, len(record))
            out += record
        put_varint(out, len(self.holes))
        previous = 0
        for offset, length in self.holes:
            put_varint(out, offset - previous)
            put_varint(out, length)
            previous = offset + length
        return bytes(out)

    def with_holes_removed(self, part10: bytes) -> bytes:
        out = bytearray()
        at = 0
        for offset, length in self.holes:
            out += part10[at:offset]
            at = offset + length
        return bytes(out + part10[at:])


def _fragments(part10: bytes, value_offset: int) -> tuple[bytes, list[tuple[int, int]]]:
    """``(basic offset table, [(file offset, length) of each fragment])``."""
    try:
        (table_at, table_length), *data = fragments(part10, value_offset)
    except (FrameHeaderError, ValueError):  # malformed items, or none at all
        raise NotRecoded("encapsulated pixel data items are malformed") from None
    return part10[table_at : table_at + table_length], data


def _frames_of(
    table: bytes, fragments: list[tuple[int, int]], n_frames: int
) -> list[list[tuple[int, int]]]:
    """The fragments of each frame (PS3.5 A.4: one frame, an offset table, or one each)."""
    if not fragments:
        raise NotRecoded("no fragments")
    if n_frames == 1:
        return [fragments]
    if table:
        starts = [s for (s,) in struct.iter_unpack("<I", table[: len(table) // 4 * 4])]
        if len(starts) != n_frames:
            raise NotRecoded("offset table does not list every frame")
        base = fragments[0][0] - 8
        by_start = {offset - 8 - base: k for k, (offset, _) in enumerate(fragments)}
        if any(s not in by_start for s in starts) or starts != sorted(starts):
            raise NotRecoded("offset table does not point at fragments")
        bounds = [by_start[s] for s in starts] + [len(fragments)]
        return [fragments[bounds[i] : bounds[i + 1]] for i in range(n_frames)]
    if len(fragments) == n_frames:
        return [[f] for f in fragments]
    raise NotRecoded("frame boundaries unknown (no offset table, fragments != frames)")


def _holes_of(pieces: Sequence[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The file ranges of bytes ``[start, end)`` of a codestream made of ``pieces``."""
    holes = []
    at = 0
    for offset, length in pieces:
        lo, hi = max(start, at), min(end, at + length)
        if lo < hi:
            holes.append((offset + lo - at, hi - lo))
        at += length
    return holes


def recode(part10: bytes) -> Recoded:
    """Decode a JPEG Lossless or RLE Lossless object's frames and check that the file comes
    back from the pixels; raises :class:`NotRecoded` (the reason) where it would not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote values (PHI)
        try:
            ds = pydicom.dcmread(io.BytesIO(part10), defer_size=1024, force=True)
            syntax = ds.file_meta.TransferSyntaxUID
            elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
            rows, columns = int(ds.Rows), int(ds.Columns)
            samples = int(ds.get("SamplesPerPixel", 1) or 1)
            bits_allocated = int(ds.BitsAllocated)
        except Exception as exc:
            raise NotRecoded(f"not parsable ({type(exc).__name__})") from None
    if syntax not in RECODED_SYNTAXES:
        raise NotRecoded("not JPEG Lossless, JPEG-LS lossless or RLE Lossless")
    declared = n_frames * rows * columns * samples * -(-bits_allocated // 8)
    if declared > _MAX_EXPANSION * len(part10) + (1 << 20):
        # a Huffman-coded sample takes at least a bit, an RLE run at most 128 bytes for 2:
        # more is a decompression bomb (or a lie), which is never decoded
        raise NotRecoded("the image attributes declare more pixels than its data can hold")
    if not isinstance(elem, RawDataElement) or elem.value_tell is None:
        raise NotRecoded("pixel data position unknown")
    value_offset = int(elem.value_tell)
    table, fragments = _fragments(part10, value_offset)
    per_frame = _frames_of(table, fragments, n_frames)
    if syntax == RLELossless:
        return _recode_rle(part10, per_frame, value_offset, rows, columns, samples, bits_allocated)
    family = _SCANS[_JPEGLS if syntax == JPEGLSLossless else _JPEG]
    return _recode_scans(part10, per_frame, value_offset, family)


@dataclass(frozen=True)
class _ScanFamily:
    """A codestream whose entropy-coded data the pixels and a few parameters determine."""

    name: str
    kind: int
    parse: Callable[[bytes], Any]  # the scan (parameters and ECS position) of a codestream
    decode: Callable[[bytes, Any], np.ndarray]
    entropy_coded: Callable[[np.ndarray, Any], bytes]
    unpack: Callable[[bytes, int], tuple[Any, int]]  # a scan from its record
    unsupported: type[Exception]


_SCANS = {
    _JPEG: _ScanFamily(
        "JPEG Lossless",
        _JPEG,
        jpeg_lossless.parse,
        lambda stream, _scan: np.asarray(imagecodecs.ljpeg_decode(stream)),
        jpeg_lossless.entropy_coded,
        jpeg_lossless.LosslessScan.unpack,
        jpeg_lossless.UnsupportedCodestream,
    ),
    _JPEGLS: _ScanFamily(
        "JPEG-LS",
        _JPEGLS,
        jpegls_lossless.parse,
        jpegls_lossless.decode,
        jpegls_lossless.entropy_coded,
        jpegls_lossless.JpegLsScan.unpack,
        jpegls_lossless.UnsupportedJpegLs,
    ),
}


def _recode_scans(
    part10: bytes, per_frame: list[list[tuple[int, int]]], value_offset: int, family: _ScanFamily
) -> Recoded:
    scans = []
    pixels = []
    holes: list[tuple[int, int]] = []
    for pieces in per_frame:
        stream = b"".join(part10[o : o + n] for o, n in pieces)
        try:
            scan = family.parse(stream)
            decoded = family.decode(stream, scan)
        except family.unsupported as exc:
            raise NotRecoded(f"{family.name} codestream: {exc}") from None
        except Exception as exc:
            raise NotRecoded(
                f"{family.name} frame does not decode ({type(exc).__name__})"
            ) from None
        if decoded.shape != (scan.rows, scan.columns) or int(decoded.max()) >> scan.precision:
            raise NotRecoded("decoded frame does not match its codestream's header")
        try:
            same = family.entropy_coded(decoded, scan) == stream[scan.ecs_start : scan.ecs_end]
        except family.unsupported:
            same = False
        if not same:
            raise NotRecoded("entropy-coded data not reproduced from the pixels")
        scans.append(scan)
        pixels.append(decoded)
        holes += _holes_of(pieces, scan.ecs_start, scan.ecs_end)
    first = scans[0]
    if any((s.rows, s.columns, s.precision) != (first.rows, first.columns, first.precision)
           for s in scans):  # fmt: skip
        raise NotRecoded("frames differ in size or precision")
    layout = PixelLayout(first.rows, first.columns, 1, 8 if first.precision <= 8 else 16,
                         first.precision, False)  # fmt: skip
    stack = np.stack(pixels).astype(layout.dtype).reshape(len(pixels), *layout.frame_shape)
    records = [scan.pack() for scan in scans]
    return Recoded(FrameSet(layout, stack), family.kind, records, holes, value_offset)


def _recode_rle(
    part10: bytes,
    per_frame: list[list[tuple[int, int]]],
    value_offset: int,
    rows: int,
    columns: int,
    samples: int,
    bits_allocated: int,
) -> Recoded:
    if bits_allocated not in (8, 16, 32):
        raise NotRecoded(f"RLE with {bits_allocated} bits allocated")
    sample_bytes = bits_allocated // 8
    skeletons = []
    pixels = []
    holes: list[tuple[int, int]] = []
    for pieces in per_frame:
        stream = b"".join(part10[o : o + n] for o, n in pieces)
        try:
            skeleton, planes = split(stream, samples * sample_bytes, rows * columns)
        except NotSplittable as exc:
            raise NotRecoded(f"RLE frame: {exc}") from None
        skeletons.append(skeleton)
        pixels.append(planes_to_samples(planes, rows, columns, samples, sample_bytes))
        holes += _holes_of(pieces, 0, len(stream))
    layout = PixelLayout(rows, columns, samples, bits_allocated, bits_allocated, False)
    stack = np.stack(pixels).astype(layout.dtype).reshape(len(pixels), *layout.frame_shape)
    return Recoded(FrameSet(layout, stack), _RLE, skeletons, holes, value_offset)


def _unpack(record: bytes) -> tuple[int, list[bytes], list[tuple[int, int]]]:
    kind = record[0]
    count, pos = get_varint(record, 1)
    frame_records = []
    for _ in range(count):
        length, pos = get_varint(record, pos)
        frame_records.append(record[pos : pos + length])
        pos += length
    n_holes, pos = get_varint(record, pos)
    holes = []
    at = 0
    for _ in range(n_holes):
        gap, pos = get_varint(record, pos)
        length, pos = get_varint(record, pos)
        holes.append((at + gap, length))
        at += gap + length
    if pos != len(record) or kind not in (_JPEG, _RLE, _JPEGLS):
        raise ValueError(f"kind {kind}, {len(record) - pos} bytes left over")
    return kind, frame_records, holes


def _frame_bytes(kind: int, record: bytes, pixels: np.ndarray) -> bytes:
    """The bytes of one frame's holes, from its record and pixels ``(rows, columns, samples)``."""
    if kind in _SCANS:
        family = _SCANS[kind]
        scan, _ = family.unpack(record, 0)
        return family.entropy_coded(pixels[..., 0], scan)
    sample_bytes = pixels.dtype.itemsize
    return join(record, samples_to_planes(pixels, sample_bytes))


def restore(frames: FrameSet, record: bytes, with_holes: bytes) -> bytes:
    """The original file from its pixels, :meth:`Recoded.pack`'s ``record`` and the file
    with its holes removed."""
    try:
        kind, frame_records, holes = _unpack(record)
        if len(frame_records) != frames.n_frames:
            raise ValueError(f"{len(frame_records)} frames, blob has {frames.n_frames}")
        data = b"".join(
            _frame_bytes(kind, r, frames.pixels[k]) for k, r in enumerate(frame_records)
        )
    except (
        ValueError,
        IndexError,
        KeyError,
        struct.error,
        jpeg_lossless.UnsupportedCodestream,
        jpegls_lossless.UnsupportedJpegLs,
    ) as exc:
        raise CorruptStreamError(f"DICOM adapter: recoded record invalid ({exc})") from None
    if len(data) != sum(length for _, length in holes):
        raise CorruptStreamError("DICOM adapter: regenerated pixel data does not fill its holes")
    out = bytearray()
    taken = used = 0
    for offset, length in holes:
        keep = offset - (taken + used)
        out += with_holes[taken : taken + keep]
        taken += keep
        out += data[used : used + length]
        used += length
    return bytes(out + with_holes[taken:])
