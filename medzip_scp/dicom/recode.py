"""Encapsulated JPEG Lossless objects stored as pixels, their original bytes regenerated.

An object that arrives JPEG Lossless (process 14, PS3.5 A.4.1; the usual lossless syntax of
CR/DX/MR forwarded by PACS) would otherwise be kept as it came: no smaller than its JPEG.
:func:`recode_jpeg_lossless` decodes each frame, lets the codec store the pixels, and keeps
everything else of the file *except* the entropy-coded data of each frame (the "holes"):
:func:`restore_jpeg_lossless` codes the pixels back into exactly those bytes
(:mod:`medzip_scp.codec.jpeg_lossless`) and fills them in. Item tags, the offset table,
fragment boundaries, JPEG marker segments, padding and whatever follows stay verbatim, so
the original file comes back byte for byte. Before any of this is used, every frame's
regenerated data is compared with the original: one byte off and the file is kept whole.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import imagecodecs
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import JPEGLossless, JPEGLosslessSV1

from medzip_scp.codec.api import FrameSet, PixelLayout
from medzip_scp.codec.container import get_varint, put_varint
from medzip_scp.codec.errors import CorruptStreamError
from medzip_scp.codec.jpeg_lossless import (
    LosslessScan,
    UnsupportedCodestream,
    entropy_coded,
    parse,
)

JPEG_LOSSLESS_SYNTAXES = frozenset({JPEGLossless, JPEGLosslessSV1})
_PIXEL_DATA = 0x7FE00010
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"
_COUNT = struct.Struct("<I")


class NotRecoded(Exception):
    """The object is kept as it came; the reason names why (no data values)."""


@dataclass(frozen=True)
class Recoded:
    """The frames' pixels, each frame's scan, and where its entropy-coded data was."""

    frames: FrameSet
    scans: list[LosslessScan]
    holes: list[tuple[int, int]]  # (offset in the file, length), in file order
    value_offset: int  # where the Pixel Data value starts in the file

    def pack(self) -> bytes:
        """The scans and holes (:func:`restore_jpeg_lossless` reads them back)."""
        out = bytearray(_COUNT.pack(len(self.scans)))
        for scan in self.scans:
            out += scan.pack()
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
    pos = value_offset
    table = b""
    fragments: list[tuple[int, int]] = []
    first = True
    while True:
        tag = part10[pos : pos + 4]
        if len(tag) < 4 or pos + 8 > len(part10):
            raise NotRecoded("encapsulated pixel data runs past the end of the file")
        if tag == _SEQUENCE_END:
            return table, fragments
        if tag != _ITEM:
            raise NotRecoded("encapsulated pixel data holds something other than items")
        (length,) = _COUNT.unpack_from(part10, pos + 4)
        if length == 0xFFFFFFFF or pos + 8 + length > len(part10):
            raise NotRecoded("an item of the encapsulated pixel data has no usable length")
        if first:
            table = part10[pos + 8 : pos + 8 + length]
            first = False
        else:
            fragments.append((pos + 8, length))
        pos += 8 + length


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


def recode_jpeg_lossless(part10: bytes) -> Recoded:
    """Decode a JPEG Lossless object's frames and check that their entropy-coded data comes
    back from the pixels; raises :class:`NotRecoded` (the reason) where it would not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote values (PHI)
        try:
            ds = pydicom.dcmread(io.BytesIO(part10), defer_size=1024, force=True)
            syntax = ds.file_meta.TransferSyntaxUID
            elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
            n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        except Exception as exc:
            raise NotRecoded(f"not parsable ({type(exc).__name__})") from None
    if syntax not in JPEG_LOSSLESS_SYNTAXES:
        raise NotRecoded("not JPEG Lossless")
    if not isinstance(elem, RawDataElement) or elem.value_tell is None:
        raise NotRecoded("pixel data position unknown")
    value_offset = int(elem.value_tell)
    table, fragments = _fragments(part10, value_offset)
    scans: list[LosslessScan] = []
    pixels = []
    holes: list[tuple[int, int]] = []
    for pieces in _frames_of(table, fragments, n_frames):
        stream = b"".join(part10[o : o + n] for o, n in pieces)
        try:
            scan = parse(stream)
            samples = np.asarray(imagecodecs.ljpeg_decode(stream))
        except UnsupportedCodestream as exc:
            raise NotRecoded(f"JPEG Lossless codestream: {exc}") from None
        except Exception as exc:
            raise NotRecoded(
                f"JPEG Lossless frame does not decode ({type(exc).__name__})"
            ) from None
        if samples.shape != (scan.rows, scan.columns) or int(samples.max()) >> scan.precision:
            raise NotRecoded("decoded frame does not match its codestream's header")
        if entropy_coded(samples, scan) != stream[scan.ecs_start : scan.ecs_end]:
            raise NotRecoded("entropy-coded data not reproduced from the pixels")
        scans.append(scan)
        pixels.append(samples)
        holes += _holes_of(pieces, scan.ecs_start, scan.ecs_end)
    first = scans[0]
    if any((s.rows, s.columns, s.precision) != (first.rows, first.columns, first.precision)
           for s in scans):  # fmt: skip
        raise NotRecoded("frames differ in size or precision")
    layout = PixelLayout(first.rows, first.columns, 1, 8 if first.precision <= 8 else 16,
                         first.precision, False)  # fmt: skip
    stack = np.stack(pixels).astype(layout.dtype).reshape(len(pixels), *layout.frame_shape)
    return Recoded(FrameSet(layout, stack), scans, holes, value_offset)


def restore_jpeg_lossless(frames: FrameSet, record: bytes, with_holes: bytes) -> bytes:
    """The original file from its pixels, :meth:`Recoded.pack`'s ``record`` and the file
    with its holes removed."""
    try:
        (n,) = _COUNT.unpack_from(record, 0)
        pos = _COUNT.size
        scans = []
        for _ in range(n):
            scan, pos = LosslessScan.unpack(record, pos)
            scans.append(scan)
        count, pos = get_varint(record, pos)
        holes = []
        at = 0
        for _ in range(count):
            gap, pos = get_varint(record, pos)
            length, pos = get_varint(record, pos)
            holes.append((at + gap, length))
            at += gap + length
    except (ValueError, struct.error, UnsupportedCodestream) as exc:
        raise CorruptStreamError(f"DICOM adapter: JPEG Lossless record invalid ({exc})") from None
    if n != frames.n_frames or pos != len(record):
        raise CorruptStreamError(
            f"DICOM adapter: JPEG Lossless record for {n} frames ({len(record) - pos} bytes "
            f"left over), blob has {frames.n_frames}"
        )
    data = b"".join(entropy_coded(frames.pixels[k][..., 0], scan) for k, scan in enumerate(scans))
    if len(data) != sum(length for _, length in holes):
        raise CorruptStreamError("DICOM adapter: regenerated JPEG data does not fill its holes")
    out = bytearray()
    taken = used = 0
    for offset, length in holes:
        keep = offset - (taken + used)
        out += with_holes[taken : taken + keep]
        taken += keep
        out += data[used : used + length]
        used += length
    return bytes(out + with_holes[taken:])
