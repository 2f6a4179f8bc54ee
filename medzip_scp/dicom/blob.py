"""DICOM Part-10 file <-> codec blob, byte for byte.

:func:`encode_dataset` takes a complete Part-10 file exactly as the node received it and
returns a blob; :func:`decode_blob` gives back the identical bytes (same sha256). How:

* **native** transfer syntaxes (Implicit/Explicit VR Little Endian, Explicit VR Big Endian;
  PS3.5 section A.1-A.3): pydicom locates the top-level Pixel Data (7FE0,0010) value in the
  original byte stream; its frames (PS3.5 section 8.1.1 and 8.2, Bits Allocated 1/8/16/32,
  1 or more samples, Planar Configuration 0/1) go through the pixel codec; everything before
  the value (preamble, file meta, other elements, the element header), the bytes of the value
  beyond the last frame (odd-length padding, PS3.5 section 7.1.1) and everything after the
  value are kept verbatim (zstd);
* **JPEG Lossless** (process 14, PS3.5 section A.4.1; single component) and **RLE Lossless**
  (A.4.2): each frame is decoded and its pixels go through the pixel codec; the file is kept
  verbatim except the bytes the pixels determine (JPEG entropy-coded data, RLE run data),
  which :mod:`medzip_scp.dicom.recode` regenerates on decode (checked at encode time: a frame
  it does not reproduce keeps the file whole);
* other **encapsulated** transfer syntaxes (PS3.5 section A.4): the whole file is kept
  verbatim (zstd);
* anything else (deflated syntax, no or short pixel data, unsupported layouts, parse errors):
  the whole file is kept verbatim (zstd), so nothing is ever lost.

The blob also records the sha256 and length of the original file, checked on decode, and
:func:`encode_dataset` decodes its own output and compares it before returning.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medzip_scp.codec.api import (
    DatasetReference,
    FrameSet,
    LearnedOptions,
    PixelLayout,
    ReferenceSource,
    compress,
    decompress,
    describe,
    read_dataset_rest_and_payload,
)
from medzip_scp.codec.errors import CodecError, CorruptStreamError
from medzip_scp.dicom.recode import RECODED_SYNTAXES, NotRecoded, recode, restore

log = logging.getLogger(__name__)

__all__ = [
    "BlobMode",
    "blob_info",
    "dataset_reference",
    "decode_blob",
    "encode_dataset",
    "open_blob",
    "peek_blob",
    "references_of",
]

_MAGIC = b"MZD1"
_VERSION = 1
# magic, version, mode, original sha256, original length, big endian flag, prefix length,
# tail length, 1-bit pad bits of the last value byte, transfer syntax length, reason length
_HEAD = struct.Struct("<4sBB32sQBQQBBB")
_PIXEL_DATA = 0x7FE00010
_NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
_RECORD_LENGTH = struct.Struct("<I")
_COMPARE_WHOLE_BYTES = 64 << 10
"""Recoded files up to this size are also coded whole, and the smaller blob kept (where the
record of a tiny image outweighs what its pixels save); larger ones are kept whole only when
their coded pixels are no smaller than the encapsulated ones (coding a 160 KB file whole as
well doubled the time to compress a JPEG Lossless MR series)."""


class BlobMode(IntEnum):
    """How the adapter stored the file. Values are part of the format."""

    FILE = 0
    NATIVE = 1
    ENCAPSULATED = 2
    RECODED = 3  # JPEG Lossless or RLE: pixels coded, their encapsulated bytes regenerated


@dataclass(frozen=True)
class _Native:
    """Where the native pixel value lies and how its frames are laid out."""

    value_offset: int
    value_length: int
    pixel_bytes: int
    layout: PixelLayout
    n_frames: int
    big_endian: bool
    transfer_syntax: str


class _Fallback(Exception):
    """Internal: store the file whole, for the given (PHI-free) reason."""

    def __init__(self, mode: BlobMode, reason: str, transfer_syntax: str = "") -> None:
        super().__init__(reason)
        self.mode = mode
        self.reason = reason
        self.transfer_syntax = transfer_syntax


def _int_attr(ds: pydicom.Dataset, keyword: str, default: int | None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise _Fallback(BlobMode.FILE, f"{keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _Fallback(BlobMode.FILE, f"{keyword} is not an integer") from None


def _analyse(part10: bytes) -> _Native:
    """Locate native pixel data in ``part10`` or raise :class:`_Fallback`.

    pydicom's warnings are silenced here: they may quote dataset values (PHI).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _analyse_quietly(part10)


def _analyse_quietly(part10: bytes) -> _Native:
    try:
        ds = pydicom.dcmread(io.BytesIO(part10), defer_size=1024, force=True)
        ts_value = ds.file_meta.get("TransferSyntaxUID") if ds.file_meta is not None else None
    except Exception as exc:
        raise _Fallback(BlobMode.FILE, f"not parsable ({type(exc).__name__})") from None
    if ts_value is None:
        raise _Fallback(BlobMode.FILE, "no Transfer Syntax UID in the file meta")
    ts = pydicom.uid.UID(str(ts_value))
    try:
        elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    except Exception as exc:
        raise _Fallback(
            BlobMode.FILE, f"pixel data unreadable ({type(exc).__name__})", ts
        ) from None
    if elem is None:
        raise _Fallback(BlobMode.FILE, "no Pixel Data element", ts)
    if ts not in _NATIVE_SYNTAXES:
        mode = BlobMode.ENCAPSULATED if ts.is_compressed and not ts.is_deflated else BlobMode.FILE
        raise _Fallback(mode, f"transfer syntax is not native ({ts.name})", ts)
    if not isinstance(elem, RawDataElement) or elem.value_tell is None:
        raise _Fallback(BlobMode.FILE, "pixel data position unknown", ts)
    length = int(elem.length)
    offset = int(elem.value_tell)
    if length == 0xFFFFFFFF:
        raise _Fallback(BlobMode.FILE, "native pixel data with undefined length", ts)
    if offset + length > len(part10):
        raise _Fallback(BlobMode.FILE, "pixel data runs past the end of the file", ts)
    big = ts == ExplicitVRBigEndian
    tag_bytes = struct.pack(">HH" if big else "<HH", 0x7FE0, 0x0010)
    if tag_bytes not in part10[max(0, offset - 12) : offset - 4]:
        raise _Fallback(BlobMode.FILE, "pixel data tag not found before its value", ts)
    try:
        rows = _int_attr(ds, "Rows", None)
        cols = _int_attr(ds, "Columns", None)
        spp = _int_attr(ds, "SamplesPerPixel", 1)
        ba = _int_attr(ds, "BitsAllocated", None)
        bs = _int_attr(ds, "BitsStored", ba)
        pr = _int_attr(ds, "PixelRepresentation", 0)
        planar = _int_attr(ds, "PlanarConfiguration", 0) if spp > 1 else 0
        n_frames = _int_attr(ds, "NumberOfFrames", 1)
    except _Fallback as fb:
        raise _Fallback(BlobMode.FILE, fb.reason, ts) from None
    except Exception as exc:
        raise _Fallback(
            BlobMode.FILE, f"image pixel attributes unreadable ({type(exc).__name__})", ts
        ) from None
    if pr not in (0, 1):
        raise _Fallback(BlobMode.FILE, f"Pixel Representation must be 0 or 1, got {pr}", ts)
    if n_frames < 1:
        raise _Fallback(BlobMode.FILE, f"Number of Frames must be >= 1, got {n_frames}", ts)
    layout = PixelLayout(rows, cols, spp, ba, bs, bool(pr) and ba > 1, planar)
    try:
        layout.validate()
    except CodecError as exc:
        raise _Fallback(BlobMode.FILE, f"unsupported pixel layout: {exc}", ts) from None
    if ba == 1:
        if spp != 1:
            raise _Fallback(BlobMode.FILE, "1-bit data with more than one sample", ts)
        if big:
            raise _Fallback(BlobMode.FILE, "1-bit data in big endian", ts)
        pixel_bytes = (n_frames * rows * cols + 7) // 8
    else:
        if big and ba == 8 and elem.VR == "OW":
            raise _Fallback(BlobMode.FILE, "8-bit data as OW in big endian", ts)
        pixel_bytes = n_frames * rows * cols * spp * (ba // 8)
    if length < pixel_bytes:
        raise _Fallback(
            BlobMode.FILE,
            f"pixel data shorter than expected: {length} bytes, expected {pixel_bytes}",
            ts,
        )
    return _Native(offset, length, pixel_bytes, layout, n_frames, big, str(ts))


def _value_to_frames(value: bytes, native: _Native) -> FrameSet:
    lay = native.layout
    n = native.n_frames
    if lay.bits_allocated == 1:
        count = n * lay.rows * lay.columns
        bits = np.unpackbits(np.frombuffer(value, np.uint8), count=count, bitorder="little")
        return FrameSet(lay, bits.reshape(n, lay.rows, lay.columns, 1))
    dt = lay.dtype.newbyteorder(">" if native.big_endian else "<")
    flat = np.frombuffer(value, dt).astype(lay.dtype)
    if lay.planar_configuration == 1:
        arr = flat.reshape(n, lay.samples_per_pixel, lay.rows, lay.columns).transpose(0, 2, 3, 1)
    else:
        arr = flat.reshape(n, lay.rows, lay.columns, lay.samples_per_pixel)
    return FrameSet(lay, np.ascontiguousarray(arr))


def _frames_to_value(frames: FrameSet, big_endian: bool, pad_bits: int) -> bytes:
    lay = frames.layout
    px: npt.NDArray[Any] = frames.pixels
    if lay.bits_allocated == 1:
        packed = np.packbits(px.reshape(-1), bitorder="little")
        if pad_bits and packed.size:
            packed[-1] |= pad_bits
        return packed.tobytes()
    if lay.planar_configuration == 1:
        px = px.transpose(0, 3, 1, 2)
    dt = lay.dtype.newbyteorder(">" if big_endian else "<")
    return np.ascontiguousarray(px, dtype=dt).tobytes()


def _head(
    mode: BlobMode,
    part10: bytes,
    *,
    big: bool = False,
    prefix_len: int = 0,
    tail_len: int = 0,
    pad_bits: int = 0,
    transfer_syntax: str = "",
    reason: str = "",
) -> bytes:
    ts = transfer_syntax.encode("ascii", "replace")[:255]
    rs = reason.encode("ascii", "replace")[:255]
    return (
        _HEAD.pack(
            _MAGIC,
            _VERSION,
            int(mode),
            hashlib.sha256(part10).digest(),
            len(part10),
            int(big),
            prefix_len,
            tail_len,
            pad_bits,
            len(ts),
            len(rs),
        )
        + ts
        + rs
    )


@dataclass(frozen=True)
class _Head:
    mode: BlobMode
    sha256: bytes
    length: int
    big: bool
    prefix_len: int
    tail_len: int
    pad_bits: int
    transfer_syntax: str
    reason: str
    body_offset: int


def _read_head(rest: bytes) -> _Head:
    if len(rest) < _HEAD.size:
        raise CorruptStreamError(f"DICOM adapter header: need {_HEAD.size} bytes, got {len(rest)}")
    magic, version, mode, sha, length, big, prefix_len, tail_len, pad, ts_len, rs_len = (
        _HEAD.unpack_from(rest, 0)
    )
    if magic != _MAGIC:
        raise CorruptStreamError(f"DICOM adapter header: magic must be {_MAGIC!r}, got {magic!r}")
    if version != _VERSION:
        raise CorruptStreamError(f"DICOM adapter header: version must be {_VERSION}, got {version}")
    try:
        bmode = BlobMode(mode)
    except ValueError:
        raise CorruptStreamError(
            f"DICOM adapter header: mode must be 0, 1, 2 or 3, got {mode}"
        ) from None
    pos = _HEAD.size
    ts = rest[pos : pos + ts_len].decode("ascii", "replace")
    reason = rest[pos + ts_len : pos + ts_len + rs_len].decode("ascii", "replace")
    pos += ts_len + rs_len
    if pos > len(rest):
        raise CorruptStreamError("DICOM adapter header: truncated")
    return _Head(bmode, sha, length, bool(big), prefix_len, tail_len, pad, ts, reason, pos)


def _rest_and_frames(part10: bytes, recode: bool = True) -> tuple[bytes, FrameSet | None]:
    """What the codec is given: everything but the pixel frames (behind the adapter's head),
    and the frames (None: the file is kept whole). ``recode``: JPEG Lossless as pixels."""
    try:
        native = _analyse(part10)
    except _Fallback as fb:
        reason = fb.reason
        if recode and fb.mode == BlobMode.ENCAPSULATED and fb.transfer_syntax in RECODED_SYNTAXES:
            try:
                return _recoded_rest_and_frames(part10, fb.transfer_syntax)
            except NotRecoded as why:
                reason = f"{reason}; kept whole: {why}"
        rest = _head(fb.mode, part10, transfer_syntax=fb.transfer_syntax, reason=reason)
        return rest + part10, None
    start = native.value_offset
    pix_end = start + native.pixel_bytes
    value_end = start + native.value_length
    frames = _value_to_frames(part10[start:pix_end], native)
    pad_bits = 0
    total_bits = native.n_frames * native.layout.rows * native.layout.columns
    if native.layout.bits_allocated == 1 and total_bits % 8:
        pad_bits = part10[pix_end - 1] & (0xFF << (total_bits % 8)) & 0xFF
    rest = _head(
        BlobMode.NATIVE,
        part10,
        big=native.big_endian,
        prefix_len=start,
        tail_len=value_end - pix_end,
        pad_bits=pad_bits,
        transfer_syntax=native.transfer_syntax,
    )
    rest += part10[:start] + part10[pix_end:value_end] + part10[value_end:]
    return rest, frames


def _recoded_rest_and_frames(part10: bytes, transfer_syntax: str) -> tuple[bytes, FrameSet]:
    """A JPEG Lossless or RLE object as its pixels and the rest
    (:mod:`medzip_scp.dicom.recode`): the adapter's head, the record, the file without the
    bytes the pixels give back."""
    recoded = recode(part10)
    record = recoded.pack()
    head = _head(
        BlobMode.RECODED,
        part10,
        prefix_len=recoded.value_offset,
        transfer_syntax=transfer_syntax,
    )
    rest = head + _RECORD_LENGTH.pack(len(record)) + record
    return rest + recoded.with_holes_removed(part10), recoded.frames


def _recoded_parts(body: bytes) -> tuple[bytes, bytes]:
    """``(record, file without the bytes its pixels give back)`` of a RECODED blob's body."""
    if len(body) < _RECORD_LENGTH.size:
        raise CorruptStreamError("DICOM adapter: recoded record missing")
    (n,) = _RECORD_LENGTH.unpack_from(body, 0)
    end = _RECORD_LENGTH.size + n
    if end > len(body):
        raise CorruptStreamError(f"DICOM adapter: recoded record of {n} bytes truncated")
    return body[_RECORD_LENGTH.size : end], body[end:]


_REFERENCE_CAP = 256 << 10
"""Bytes of a file kept whole that a reference holds at most when its pixels cannot be
located: the rest of such a file is mostly pixels, which other instances do not share."""


def dataset_reference(part10: bytes) -> DatasetReference:
    """A reference the data sets of ``part10``'s series can be coded against
    (:func:`encode_dataset`): what its own blob's ``DATASET`` section holds, uncompressed,
    up to the pixel data of a file kept whole (its pixels would only make it larger)."""
    part10 = bytes(part10)
    rest = _rest_and_frames(part10)[0]
    head = _read_head(rest)
    if head.mode in (BlobMode.FILE, BlobMode.ENCAPSULATED):
        pixels_at = _pixel_value_offset(part10)
        keep = _REFERENCE_CAP if pixels_at is None else min(pixels_at, _REFERENCE_CAP)
        rest = rest[: head.body_offset + keep]
    return DatasetReference(rest)


def _pixel_value_offset(part10: bytes) -> int | None:
    """Where the top-level Pixel Data value starts in ``part10``, when pydicom finds it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(part10), defer_size=1024, force=True)
            elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
        except Exception:
            return None
    if not isinstance(elem, RawDataElement) or elem.value_tell is None:
        return None
    return int(elem.value_tell)


def _encode(
    part10: bytes,
    learned: LearnedOptions | None,
    payload: bytes,
    verify_frames: bool,
    reference: DatasetReference | None,
) -> bytes:
    def coded(recode: bool) -> tuple[bytes, bytes]:
        rest, frames = _rest_and_frames(part10, recode)
        blob = compress(
            frames,
            rest,
            learned=learned,
            payload=payload,
            verify=verify_frames,
            reference=reference,
        )
        return rest, blob

    rest, blob = coded(recode=True)
    head = _read_head(rest)
    if head.mode == BlobMode.RECODED:  # kept whole where that is smaller (noise, tiny images)
        if len(part10) <= _COMPARE_WHOLE_BYTES:
            whole = coded(recode=False)[1]
            return whole if len(whole) <= len(blob) else blob
        _record, with_holes = _recoded_parts(rest[head.body_offset :])
        if describe(blob)["pixel_bytes"] >= len(part10) - len(with_holes):
            return coded(recode=False)[1]
    return blob


BlobCheck = Callable[[bytes], None]
"""Checks a new blob against what it was made from; raises :class:`CodecError` when it differs."""


def encode_dataset(
    part10: bytes,
    learned: LearnedOptions | None = None,
    payload: bytes = b"",
    verify: bool = True,
    check: BlobCheck | None = None,
    reference: DatasetReference | None = None,
) -> bytes:
    """Code a complete DICOM Part-10 file into a blob, verified by decoding it.

    Parameters
    ----------
    part10
        The file exactly as received (preamble, file meta information, data set; PS3.10
        section 7.1). Anything else is accepted too and stored whole.
    learned
        Also try the learned split paths (:class:`LearnedOptions`); ``None`` (default):
        classical paths only. On the dev sets the learned paths saved under 2 % (MR, MR-EPI;
        nothing on CT and CR/DX) and decode split frames at 0.05-0.25 MPx/s against about
        10 classically (``benchmarks/RESULTS.md``), so they are opt-in
        (``[pipeline] learned``) until they save more.
    payload
        Opaque (encrypted) bytes the codec carries in the pixel streams
        (:func:`medzip_scp.codec.api.compress`); :func:`open_blob` returns them.
    verify
        Check the blob once, whole (default): decode it and compare with ``part10`` and
        ``payload``, or run ``check``. The codec does not also decode each frame's stream:
        only when this check fails is the blob coded again with every frame's stream
        verified before it is chosen (a path whose decoder disagrees with its encoder is
        then passed over), and checked again. ``False``: unchecked, for a caller that
        decodes and compares it itself (the compression worker) and calls again with
        ``verify`` on when that fails.
    check
        Replaces the comparison (:func:`medzip_scp.identity.instance.seal_instance` opens
        the blob with every identity check).
    reference
        Code everything but the pixels against another instance of the series
        (:func:`dataset_reference`): a series' headers are nearly identical, so each blob
        then holds their differences. The blob decodes only with it (``references`` of
        :func:`open_blob`).

    Returns
    -------
    bytes
        A blob that :func:`decode_blob` turns back into exactly ``part10``.

    Raises
    ------
    CodecError
        If decoding the blob does not give back ``part10`` (verify-before-replace: the caller
        must then keep the original).
    """
    part10 = bytes(part10)
    blob = _encode(part10, learned, payload, False, reference)
    if not verify:
        return blob
    if check is None:
        check = functools.partial(_check_round_trip, part10, payload, reference)
    try:
        check(blob)
        return blob
    except CodecError as exc:
        log.warning("new blob failed its check (%s): coding it again, every frame verified", exc)
    blob = _encode(part10, learned, payload, True, reference)
    check(blob)
    return blob


def _check_round_trip(
    part10: bytes, payload: bytes, reference: DatasetReference | None, blob: bytes
) -> None:
    try:
        restored, carried = open_blob(blob, references_of(reference))
    except CodecError as exc:
        raise CodecError(f"verification failed: the new blob does not decode ({exc})") from exc
    if carried != payload:
        raise CodecError("verification failed: the payload did not come back")
    if restored != part10:
        raise CodecError(
            "verification failed: decoded file differs from the original "
            f"(sha256 expected {hashlib.sha256(part10).hexdigest()}, "
            f"actual {hashlib.sha256(restored).hexdigest()})"
        )


def references_of(*references: DatasetReference | None) -> ReferenceSource:
    """A reference source that gives these references (for blobs just coded with them)."""
    by_sha = {r.sha256: r.data for r in references if r is not None}
    return by_sha.get


def decode_blob(blob: bytes, references: ReferenceSource | None = None) -> bytes:
    """Restore the original Part-10 file from a blob made by :func:`encode_dataset`;
    ``references`` gives the reference it was coded against, if any.

    Raises
    ------
    CorruptStreamError
        If the blob fails any check, including the sha256 of the restored file.
    UnknownModelError, UnsupportedFormatError
        See :func:`medzip_scp.codec.api.decompress`.
    """
    return open_blob(blob, references)[0]


def open_blob(blob: bytes, references: ReferenceSource | None = None) -> tuple[bytes, bytes]:
    """``(the Part-10 file given to encode_dataset, the payload)``; raises as
    :func:`decode_blob`."""
    decoded = decompress(blob, references=references)
    rest = decoded.dataset_rest
    head = _read_head(rest)
    body = rest[head.body_offset :]
    if head.mode == BlobMode.NATIVE:
        if decoded.frames is None:
            raise CorruptStreamError("DICOM adapter: native mode blob without frames")
        if head.prefix_len + head.tail_len > len(body):
            raise CorruptStreamError(
                f"DICOM adapter: prefix {head.prefix_len} + tail {head.tail_len} bytes exceed "
                f"the {len(body)} stored bytes"
            )
        value = _frames_to_value(decoded.frames, head.big, head.pad_bits)
        out = body[: head.prefix_len] + value + body[head.prefix_len :]
    elif head.mode == BlobMode.RECODED:
        if decoded.frames is None:
            raise CorruptStreamError("DICOM adapter: recoded mode blob without frames")
        out = restore(decoded.frames, *_recoded_parts(body))
    else:
        if decoded.frames is not None:
            raise CorruptStreamError(f"DICOM adapter: {head.mode.name} mode blob with frames")
        out = body
    if len(out) != head.length:
        raise CorruptStreamError(
            f"DICOM adapter: restored file length expected {head.length}, actual {len(out)}"
        )
    digest = hashlib.sha256(out).digest()
    if digest != head.sha256:
        raise CorruptStreamError(
            f"DICOM adapter: restored file sha256 expected {head.sha256.hex()}, "
            f"actual {digest.hex()}"
        )
    return out, decoded.payload


def peek_blob(blob: bytes, references: ReferenceSource | None = None) -> tuple[bytes, bytes | None]:
    """``(the stored file up to its Pixel Data value, the payload)``, without decoding pixels:
    what a blob holds, cheaply. The first is the whole file when its pixels are not coded
    apart (encapsulated or other files kept whole); every element before the pixel data is
    whole in it. The payload is ``b""`` when there is none, None when only decoding gives it
    (:func:`medzip_scp.codec.api.read_dataset_rest_and_payload`).

    Raises
    ------
    CorruptStreamError, UnknownModelError, UnsupportedFormatError
        As :func:`decode_blob`.
    """
    rest, payload = read_dataset_rest_and_payload(blob, references)
    head = _read_head(rest)
    body = rest[head.body_offset :]
    if head.mode == BlobMode.RECODED:
        body = _recoded_parts(body)[1]  # the same bytes as the original up to the pixels
    if head.mode in (BlobMode.NATIVE, BlobMode.RECODED):
        if head.prefix_len > len(body):
            raise CorruptStreamError(
                f"DICOM adapter: prefix {head.prefix_len} bytes exceed the {len(body)} stored"
            )
        body = body[: head.prefix_len]
    return body, payload


def blob_info(blob: bytes, references: ReferenceSource | None = None) -> dict[str, Any]:
    """Summarise a blob without decoding its pixels (PHI-free: no dataset values).

    Returns
    -------
    dict
        ``mode`` (``native``/``encapsulated``/``file``), ``reason`` (why not native),
        ``transfer_syntax``, ``original_bytes``, ``original_sha256``, ``total_bytes``,
        ``pixel_bytes``, ``frames``, ``paths`` (per frame), ``model``, ``payload_bytes``
        and the codec's ``layout`` and per-frame details under ``codec``.

    Raises
    ------
    CorruptStreamError, UnknownModelError, UnsupportedFormatError
        As :func:`decode_blob`.
    """
    codec = describe(blob)
    head = _read_head(read_dataset_rest_and_payload(blob, references)[0])
    return {
        "mode": head.mode.name.lower(),
        "reason": head.reason or None,
        "transfer_syntax": head.transfer_syntax or None,
        "original_bytes": head.length,
        "original_sha256": head.sha256.hex(),
        "total_bytes": codec["total_bytes"],
        "pixel_bytes": codec["pixel_bytes"],
        "frames": len(codec["frames"]),
        "paths": [f["path"] for f in codec["frames"]],
        "model": codec["model"] or "classical",
        "payload_bytes": codec["payload_bytes"],
        "layout": codec["layout"],
        "codec": codec,
    }
