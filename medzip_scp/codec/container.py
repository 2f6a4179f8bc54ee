"""The medzip blob format (versions 1 to 3): a versioned, self-describing, checksummed container.

Every byte of the format is known here and nowhere else: :func:`write_blob` writes a blob
from frame records, coded streams, the data set and the payload's section;
:func:`read_container` and :func:`parse_sections` read one of any version back into
:class:`BlobContents`. :mod:`medzip_scp.codec.api` codes the frames.

Layout (all integers little-endian)::

    offset  size  field
    0       4     magic b"MZP1"
    4       2     format version (u16), 1, 2 or 3
    6       2     header flags (u16), 0
    8       4     H: length of the header body (u32)
    12      H     header body, version 1:
                    u8   length of the model id, then the model id (ASCII); empty = classical
                    32   sha256 of the model weights   } only when the model id is not
                    32   sha256 of the adapter weights } empty (zeros for no adapter)
                    u8   number of sections N
                    N x  section entry: u8 type, LEB128 varint length, u32 CRC-32
                  header body, version 2 (a model table; frames refer to it by index):
                    u8   number of models M
                    M x  u8 length of the model id, the model id (ASCII), 32 bytes sha256 of
                         the model's manifest.json (which pins its weights, tables and config),
                         32 bytes sha256 of the adapter weights (zeros: no adapter)
                    u8   number of sections N, then N section entries as in version 1
                  header body, version 3 (the compact form written today):
                    u8   number of models M
                    M x  u8 length of the model id, the model id (ASCII), 32 bytes sha256 of
                         the model's manifest.json, u8 adapter flag (0: no adapter; 1: the
                         32-byte sha256 of the adapter weights follows)
                    u8   number of sections N, then N section entries as in version 1
    12+H    4     CRC-32 of bytes [0, 12+H)
    ...           section bodies, in table order, back to back; the blob ends with the last

Writers emit version 3. Versions 1 and 2 were written by earlier releases and decode forever.
Version 3 exists because per-blob bytes matter for small images (a 64x64 fMRI slice codes to
about 3.8 KB, so the 94 bytes of a version-1 container were 2.5 % of it): it drops the
zero adapter digests, folds the layout into the frame index and leaves out empty sections.

The magic, version, flags and header length (the first 12 bytes) keep this meaning in every
future version, so a decoder can always tell "newer format" from "corrupted".

Section types (:class:`SectionType`):

``LAYOUT`` (versions 1 and 2: exactly one, empty for a blob without pixels; version 3: never)
    rows u16, columns u16, samples u8, bits allocated u8, bits stored u8, signed u8,
    planar configuration u8, frame count u32.
``FRAME_INDEX`` (versions 1 and 2: exactly one; version 3: at most one, absent for a blob
without pixels)
    Versions 1 and 2: a table of path names, then one :class:`FrameRecord` per frame, see
    :func:`pack_frame_index`. Version 3: the layout first (:func:`pack_layout_v3`), then the
    version-2 form of the index.
``STREAMS`` (versions 1 and 2: exactly one; version 3: present exactly when ``FRAME_INDEX``
is)
    The coded bytes of all frames back to back, in frame order; the frame index holds the
    lengths.
``DATASET`` (versions 1 and 2: exactly one; version 3: at most one, absent when empty)
    The caller's opaque non-pixel bytes: u8 method (:class:`DatasetMethod`), u64 raw length,
    then for method 0 (stored) the bytes, for method 1 (zstd) a zstd frame of them, for
    method 2 (version 3 only: zstd against a reference) the 32-byte sha256 of a *reference*
    and a zstd frame made with the reference's bytes as a raw-content dictionary. The
    reference is not in the blob: it is the data set of another instance of the series, kept
    once by the caller (the node's blob store, ``refs/``), so that the nearly identical
    headers of a series cost their differences only. A decoder is given the references it
    may need by sha256 and checks the bytes against it; without it the blob does not decode
    (:class:`~medzip_scp.codec.errors.MissingReferenceError`), but its pixels still do.
``PAYLOAD`` (versions 1 and 2: exactly one; version 3: at most one, absent for mode 0)
    The reserved slot for the encrypted metadata payload: u8 mode, then the payload bytes.
    Mode 0: none. Mode 1: the (already encrypted) payload is stored in this section.
    Mode 2 (version 2 only): the payload rides in the initial bits of the bits-back ANS
    stream of the global path of one frame; this section then holds u32 frame index and u32
    payload length, and the global path's decoder returns the bits when it has decoded the
    latents. The pixels never depend on the payload, so they decode without the key.
    Mode 3 (version 3): the payload is carried by the frames; this section holds LEB128 varint
    ``free`` (payload bytes in the frames' coder flushes), LEB128 varint ``spread`` (payload
    bytes in the frames' coded streams), then the remainder. The payload is the ``free``
    bytes, then the ``spread`` bytes, then the remainder. With ``L`` the payload length:

    1. *Free bits.* The carriers are the frames coded whole (``split_planes`` 0) by path
       ``pred``, in frame order; within a frame, its sample streams in sample order that are in
       predictive mode 1 or 2 (they end in an arithmetic coder's flush, see
       :mod:`medzip_scp.codec.predictive`; modes 0 and 3 carry nothing). Decoding such a
       stream ends with the coder's interval ``[x1, x2]`` and its last 4 arithmetic-coded
       bytes, read big-endian, as the window ``x`` (``x1 <= x <= x2``, else the stream is
       corrupt); its capacity is ``c = floor(log2(x2 - x1 + 1))`` bits (1 to 32). The first
       ``free`` payload bytes form a string of ``8 * free`` bits, each byte most significant
       bit first. Carrier ``i`` in order takes ``t_i = min(c_i, bits not yet taken)`` bits,
       as the integer ``k_i = x - x1`` whose ``t_i``-bit binary form, most significant bit
       first, is those bits; so ``k_i < 2 ** t_i``, and a carrier that takes none has
       ``x = x1``, its flush as the encoder writes it without a payload. A decoder rejects
       ``8 * free`` above the carriers' total capacity and any ``k_i >= 2 ** t_i``. Any value
       in ``[x1, x2]`` decodes to the same pixels, so the frames' bytes cost nothing more.
       Writers take ``free = min(L, floor(total capacity / 8))``.
    2. *Spread.* With ``R = L - free``, ``n`` frames and ``share = ceil(R / n)``, frame ``j``
       in order carries ``min(share, its coded stream's length, what is left of R)`` bytes
       (so a frame at most doubles), inserted into its coded stream at byte
       ``crc32 % (stream_bytes + 1)``; the STREAMS section holds those bytes as well, and
       ``spread`` is their sum. Segments are inserted after the flush bytes hold their free
       bits (a segment may split a flush; it moves those bytes, never changes them) and
       taken out before the frames are decoded.
    3. *Remainder.* What neither carries (``R - spread`` bytes) closes this section.

    A payload that fits the free bits costs only this section (about 9 bytes: its table
    entry, the mode byte and the two varints).

Every section is covered by its CRC-32, the header by its own; any mismatch, an unknown
section type, a missing or repeated mandatory section, or a length that disagrees with the
blob raises :class:`~medzip_scp.codec.errors.CorruptStreamError` naming the section and the
expected and actual values. In addition, each frame record carries the CRC-32 of the frame's
original values, checked after decoding (see :mod:`medzip_scp.codec.api`).
"""

from __future__ import annotations

import functools
import hashlib
import struct
import threading
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt
import zstandard

from medzip_scp.codec.errors import (
    CorruptStreamError,
    MissingReferenceError,
    UnsupportedFormatError,
)
from medzip_scp.codec.frames import PixelLayout

__all__ = [
    "FORMAT_VERSION",
    "FREE_BITS_PATH",
    "MAGIC",
    "MODEL_NONE",
    "ZERO_SHA256",
    "BlobContents",
    "ContainerHeader",
    "DatasetMethod",
    "DatasetReference",
    "FrameRecord",
    "FrameStreams",
    "FreeBitsSlot",
    "ModelRef",
    "PayloadMode",
    "PayloadSection",
    "ReferenceSource",
    "Section",
    "SectionType",
    "dataset_raw_length",
    "dataset_reference_of",
    "frame_crc32",
    "get_varint",
    "is_free_bits_carrier",
    "join_free_bits",
    "model_entry_size",
    "pack_dataset",
    "pack_frame_index",
    "pack_layout_v3",
    "pack_payload",
    "parse_sections",
    "unavailable_path",
    "put_varint",
    "read_container",
    "split_free_bits",
    "split_record_overhead",
    "spread_payload",
    "unpack_dataset",
    "unpack_frame_index",
    "unpack_layout",
    "unpack_layout_v3",
    "unpack_payload",
    "write_blob",
    "write_container",
]

MAGIC = b"MZP1"
FORMAT_VERSION = 3
"""Format version written (and the newest this decoder reads)."""
SUPPORTED_VERSIONS = (1, 2, 3)
MODEL_NONE = 0xFF
"""Model index of a frame part that uses no model (version-2 frame records)."""
ZERO_SHA256 = bytes(32)

_PREFIX = struct.Struct("<4sHHI")
_LAYOUT = struct.Struct("<HHBBBBBI")
_CRC32 = struct.Struct("<I")
_MAX_HEADER = 64 * 1024 * 1024


class SectionType(IntEnum):
    """Type tag of a section. Values are part of the format: never renumber, only append."""

    LAYOUT = 1
    FRAME_INDEX = 2
    STREAMS = 3
    DATASET = 4
    PAYLOAD = 5


class DatasetMethod(IntEnum):
    """How a ``DATASET`` section holds its bytes (see module docstring). Part of the format."""

    STORED = 0
    ZSTD = 1
    ZSTD_REFERENCE = 2


class PayloadMode(IntEnum):
    """How the encrypted metadata payload is carried (see module docstring)."""

    NONE = 0
    SECTION = 1
    BITS_BACK = 2
    SPREAD = 3


@dataclass(frozen=True)
class Section:
    """One section: its type and body."""

    type: SectionType
    data: bytes


@dataclass(frozen=True)
class ModelRef:
    """One exact model a blob needs: registry id, manifest sha256, adapter sha256.

    Attributes
    ----------
    model_id
        Registry id (:mod:`medzip_scp.codec.zoo`), e.g. ``"local-lm-v1"``.
    model_sha256
        Raw 32-byte sha256 of the model's ``manifest.json`` (which lists the sha256 of the
        weights and of every other file of the model).
    adapter_sha256
        Raw 32-byte sha256 of the adapter weights merged into the model; zeros for none.
    """

    model_id: str
    model_sha256: bytes
    adapter_sha256: bytes = ZERO_SHA256


@dataclass(frozen=True)
class ContainerHeader:
    """Model identification recorded in the header.

    Attributes
    ----------
    model_id
        Version 1 only: registry id of the learned model; empty for classical-only blobs.
    model_sha256, adapter_sha256
        Version 1 only: raw 32-byte digests of the weights; zeros when unused.
    version
        Format version read from (or to be written to) the blob: 1, 2 or 3.
    models
        Versions 2 and 3: the model table, referred to by index from frame records.
    """

    model_id: str = ""
    model_sha256: bytes = ZERO_SHA256
    adapter_sha256: bytes = ZERO_SHA256
    version: int = 1
    models: tuple[ModelRef, ...] = ()

    def model_refs(self) -> tuple[ModelRef, ...]:
        """Every model the blob names, whatever its version (v1: at most one)."""
        if self.version == 1:
            if not self.model_id and self.model_sha256 == ZERO_SHA256:
                return ()
            return (ModelRef(self.model_id, self.model_sha256, self.adapter_sha256),)
        return self.models


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
    if header.version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"format version must be one of {SUPPORTED_VERSIONS}, got {header.version}"
        )
    if header.version == 1 and header.models:
        raise ValueError("a model table needs format version 2")
    if len(sections) > 255:
        raise ValueError(f"at most 255 sections, got {len(sections)}")
    body = bytearray()
    if header.version >= 2:
        if header.model_id or header.model_sha256 != ZERO_SHA256:
            raise ValueError("versions 2 and 3 name their models in `models`, not in `model_id`")
        if len(header.models) >= MODEL_NONE:
            raise ValueError(f"at most {MODEL_NONE - 1} models, got {len(header.models)}")
        body.append(len(header.models))
        for ref in header.models:
            body += _pack_model_entry(ref, header.version)
        return _finish(header.version, body, sections)
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
    body += bytes([len(model_id)]) + model_id
    if model_id:
        body += header.model_sha256 + header.adapter_sha256
    return _finish(1, body, sections)


def _pack_model_entry(ref: ModelRef, version: int) -> bytes:
    """One entry of a version-2 or version-3 model table."""
    raw = ref.model_id.encode("ascii")
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"model id must be 1..255 bytes, got {len(raw)}")
    for name, digest in (("model", ref.model_sha256), ("adapter", ref.adapter_sha256)):
        if len(digest) != 32:
            raise ValueError(f"{name} sha256 must be 32 bytes, got {len(digest)}")
    entry = bytes([len(raw)]) + raw + ref.model_sha256
    if version == 2:
        return entry + ref.adapter_sha256
    if ref.adapter_sha256 == ZERO_SHA256:
        return entry + b"\x00"
    return entry + b"\x01" + ref.adapter_sha256


def model_entry_size(ref: ModelRef) -> int:
    """Bytes ``ref`` adds to the model table of a blob as written today."""
    return len(_pack_model_entry(ref, FORMAT_VERSION))


def _finish(version: int, body: bytearray, sections: list[Section]) -> bytes:
    body.append(len(sections))
    for s in sections:
        body.append(int(s.type))
        put_varint(body, len(s.data))
        body += _CRC32.pack(_crc(s.data))
    head = _PREFIX.pack(MAGIC, version, 0, len(body)) + bytes(body)
    out = bytearray(head)
    out += _CRC32.pack(_crc(head))
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
    if len(view) < _PREFIX.size + _CRC32.size:
        raise CorruptStreamError(
            f"blob header: need at least {_PREFIX.size + _CRC32.size} bytes, got {len(view)}"
        )
    magic, version, flags, hlen = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptStreamError(f"blob header: magic must be {MAGIC!r}, got {bytes(magic)!r}")
    hend = _PREFIX.size + hlen
    if hlen > _MAX_HEADER or hend + _CRC32.size > len(view):
        raise CorruptStreamError(
            f"blob header: header length {hlen} runs past the end of the {len(view)}-byte blob"
        )
    (stored_crc,) = _CRC32.unpack_from(view, hend)
    actual_crc = _crc(view[:hend])
    if stored_crc != actual_crc:
        raise CorruptStreamError(
            f"blob header: CRC-32 mismatch, expected {stored_crc:08x}, actual {actual_crc:08x}"
        )
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedFormatError(
            f"blob format version {version} is not supported by this decoder "
            f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade medzip"
        )
    if flags != 0:
        raise UnsupportedFormatError(
            f"blob header flags must be 0 in format version {version}, got {flags:#06x}"
        )
    pos = _PREFIX.size
    body = bytes(view[:hend])
    entries: list[tuple[int, int, int]] = []
    models: list[ModelRef] = []
    model_id, model_sha, adapter_sha = "", ZERO_SHA256, ZERO_SHA256
    try:
        if version == 1:
            n = body[pos]
            model_id = body[pos + 1 : pos + 1 + n].decode("ascii")
            pos += 1 + n
            if n:
                model_sha, adapter_sha = body[pos : pos + 32], body[pos + 32 : pos + 64]
                pos += 64
        else:
            n_models = body[pos]
            pos += 1
            for _ in range(n_models):
                n = body[pos]
                mid = body[pos + 1 : pos + 1 + n].decode("ascii")
                pos += 1 + n
                msha = body[pos : pos + 32]
                pos += 32
                if version == 2:
                    has_adapter = 1
                else:
                    has_adapter = body[pos]
                    pos += 1
                    if has_adapter > 1:
                        raise ValueError(f"adapter flag must be 0 or 1, got {has_adapter}")
                asha = body[pos : pos + 32] if has_adapter else ZERO_SHA256
                pos += 32 if has_adapter else 0
                if not mid or len(msha) != 32 or len(asha) != 32:
                    raise ValueError("truncated model table")
                models.append(ModelRef(mid, msha, asha))
        n_sections = body[pos]
        pos += 1
        for _ in range(n_sections):
            stype = body[pos]
            length, pos = get_varint(body, pos + 1)
            (crc,) = _CRC32.unpack_from(body, pos)
            pos += _CRC32.size
            entries.append((stype, length, crc))
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise CorruptStreamError(f"blob header: malformed header body ({exc})") from None
    if pos != hend or len(model_sha) != 32 or len(adapter_sha) != 32:
        raise CorruptStreamError(
            f"blob header: {len(entries)} section entries end at byte {pos}, header ends at {hend}"
        )

    offset = hend + _CRC32.size
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
    counts = {t: sum(1 for s in sections if s.type == t) for t in SectionType}
    if version < 3:
        allowed = {t: (1, 1) for t in SectionType}
    else:
        allowed = {t: (0, 1) for t in SectionType}
        allowed[SectionType.LAYOUT] = (0, 0)
        if counts[SectionType.FRAME_INDEX] != counts[SectionType.STREAMS]:
            raise CorruptStreamError(
                "blob: sections FRAME_INDEX and STREAMS must both be present or both absent, "
                f"found {counts[SectionType.FRAME_INDEX]} and {counts[SectionType.STREAMS]}"
            )
    for stype, (low, high) in allowed.items():
        if not low <= counts[stype] <= high:
            what = "exactly once" if low == high == 1 else f"{low} to {high} times"
            raise CorruptStreamError(
                f"blob: section {stype.name} must occur {what} in format version {version}, "
                f"found {counts[stype]}"
            )
    return ContainerHeader(model_id, model_sha, adapter_sha, version, tuple(models)), sections


def unpack_layout(data: bytes) -> tuple[PixelLayout, int]:
    """Parse a ``LAYOUT`` section body (versions 1 and 2; version 3 writes
    :func:`pack_layout_v3` instead).

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


_LAYOUT_V3_FLAGS = struct.Struct("<BBBB")


def pack_layout_v3(layout: PixelLayout, n_frames: int) -> bytes:
    """Serialise a layout and frame count in the compact form that opens a version-3
    ``FRAME_INDEX``: varint rows, varint columns, varint frame count, u8 samples, u8 bits
    allocated, u8 bits stored, u8 flags (bit 0 signed, bit 1 planar configuration 1)."""
    out = bytearray()
    for v in (layout.rows, layout.columns, n_frames):
        put_varint(out, v)
    flags = int(layout.signed) | (layout.planar_configuration << 1)
    out += _LAYOUT_V3_FLAGS.pack(
        layout.samples_per_pixel, layout.bits_allocated, layout.bits_stored, flags
    )
    return bytes(out)


def unpack_layout_v3(data: bytes) -> tuple[PixelLayout, int, int]:
    """Parse the compact layout at the start of a version-3 ``FRAME_INDEX``.

    Returns
    -------
    tuple of PixelLayout, int, int
        The layout, the frame count and the number of bytes read.

    Raises
    ------
    CorruptStreamError
        On truncation, unknown flag bits or values that break the DICOM rules.
    """
    try:
        rows, pos = get_varint(data, 0)
        cols, pos = get_varint(data, pos)
        n, pos = get_varint(data, pos)
        spp, ba, bs, flags = _LAYOUT_V3_FLAGS.unpack_from(data, pos)
    except (IndexError, ValueError, struct.error) as exc:
        raise CorruptStreamError(f"section FRAME_INDEX: truncated layout ({exc})") from None
    if flags > 3:
        raise CorruptStreamError(f"section FRAME_INDEX: layout flags must be <= 3, got {flags}")
    if rows > 0xFFFF or cols > 0xFFFF or n > 0xFFFFFFFF:
        raise CorruptStreamError(
            f"section FRAME_INDEX: layout {rows}x{cols}, {n} frames is out of range"
        )
    layout = PixelLayout(rows, cols, spp, ba, bs, bool(flags & 1), flags >> 1)
    try:
        layout.validate()
    except Exception as exc:
        raise CorruptStreamError(f"section FRAME_INDEX: {exc}") from None
    return layout, n, pos + _LAYOUT_V3_FLAGS.size


def put_varint(out: bytearray, value: int) -> None:
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


def get_varint(data: bytes, pos: int) -> tuple[int, int]:
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
        ``"pred"``; for a split frame the path of the *high* part: ``"pred"`` or ``"global"``).
        Stored by name (in the index's name table) so ids never get renumbered.
    value_bits
        Number of low bits of each stored value coded as the pixel value (Bits Stored, or
        Bits Allocated when the whole container word is coded as the value).
    split_planes
        ``s``: number of low bit planes of the (offset) value coded by the local path given
        the high part ``value >> s``; 0 for a frame coded whole by a classical path.
    nbits
        Bit depth of the shifted values handed to the path (0: constant frame); a split frame's
        high part has ``nbits - split_planes`` bits.
    offsets
        Per-sample minimum subtracted before coding (offset-binary domain).
    stream_bytes
        Length of the path's bytes (the high part's, for a split frame) in ``STREAMS``.
    residual_bytes
        Length of the zstd-coded bits above ``value_bits`` (XOR the sign extension for
        signed data), which follow the path's bytes; ``None`` when there is no residual.
    crc32
        CRC-32 of the frame's original values (container dtype, little-endian bytes).
    high_model
        Index in the header's model table of the high path's model (``None``: no model).
    low_path, low_model, low_bytes
        Split frames only: the low part's path id (``"local"``), its model index and its length
        in ``STREAMS`` (right after the high part's bytes).

    Notes
    -----
    Frames' streams lie back to back in the ``STREAMS`` section, in frame order, each frame's
    path bytes (high, then low for a split frame) followed by its residual bytes, so offsets
    follow from the lengths.
    """

    path: str
    value_bits: int
    split_planes: int
    nbits: int
    offsets: tuple[int, ...]
    stream_bytes: int
    residual_bytes: int | None = None
    crc32: int = 0
    high_model: int | None = None
    low_path: str | None = None
    low_model: int | None = None
    low_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes of this frame in ``STREAMS`` (high, low and residual)."""
        return self.stream_bytes + self.low_bytes + (self.residual_bytes or 0)


def frame_crc32(frame: npt.NDArray[np.generic]) -> int:
    """The CRC-32 a :class:`FrameRecord` holds: of the frame's values in its container dtype,
    little-endian."""
    le = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<"))
    return _crc(le.tobytes())


_FLAG_RESIDUAL = 1
_FLAG_SPLIT = 2
_LOW_PART = struct.Struct("<BB")
"""A split frame's low path name index and low model index (version 2 and later)."""
_LOW_LENGTH_ESTIMATE = 2
"""Bytes counted for a low length's varint before the low stream exists (128 B to 16 KiB).
The encoder compares costs with it, so changing it changes which frames are split."""


def split_record_overhead(low_path: str) -> int:
    """Bytes a split frame's record and the index's name table take beyond a frame coded
    whole: the low part's indices and length (estimated), and the low path's name entry."""
    return _LOW_PART.size + _LOW_LENGTH_ESTIMATE + 1 + len(low_path.encode("ascii"))


def _model_byte(ix: int | None) -> int:
    if ix is None:
        return MODEL_NONE
    if not 0 <= ix < MODEL_NONE:
        raise ValueError(f"model index must be in 0..{MODEL_NONE - 1}, got {ix}")
    return ix


def pack_frame_index(records: list[FrameRecord], version: int = 1) -> bytes:
    """Serialise frame records into a ``FRAME_INDEX`` section body.

    Version 1 body: u8 number of path names, then each name (u8 length, ASCII); then per
    frame: u8 path name index, u8 value bits, u8 split planes (0), u8 nbits, u8 flags (bit 0:
    residual present), one LEB128 varint offset per sample, varint stream length, varint
    residual length (only when flagged), u32 CRC-32 of the frame's values.

    Version 2: flags bit 1 marks a split frame; right after the stream length come u8 high
    model index (255: none) and, for a split frame only, u8 low path name index, u8 low model
    index (255: none) and varint low length; the rest is as in version 1. Version 3 uses the
    version-2 records (its ``FRAME_INDEX`` puts the layout in front, see
    :func:`pack_layout_v3`).

    Raises
    ------
    ValueError
        If a version-1 index would need a split frame or a model.
    """
    names: list[str] = []
    for r in records:
        for name in (r.path, r.low_path):
            if name is not None and name not in names:
                names.append(name)
    if len(names) > 255:
        raise ValueError(f"at most 255 distinct paths per blob, got {len(names)}")
    out = bytearray([len(names)])
    for name in names:
        raw = name.encode("ascii")
        out.append(len(raw))
        out += raw
    for r in records:
        split = r.split_planes != 0
        if split != (r.low_path is not None):
            raise ValueError("a split frame (split_planes > 0) needs a low path, and only it")
        if version == 1 and (split or r.high_model is not None):
            raise ValueError("split frames and models need format version 2")
        flags = (_FLAG_RESIDUAL if r.residual_bytes is not None else 0) | (
            _FLAG_SPLIT if split else 0
        )
        out += bytes([names.index(r.path), r.value_bits, r.split_planes, r.nbits, flags])
        for o in r.offsets:
            put_varint(out, o)
        put_varint(out, r.stream_bytes)
        if version >= 2:
            out.append(_model_byte(r.high_model))
            if split:
                assert r.low_path is not None
                out += _LOW_PART.pack(names.index(r.low_path), _model_byte(r.low_model))
                put_varint(out, r.low_bytes)
        if r.residual_bytes is not None:
            put_varint(out, r.residual_bytes)
        out += _CRC32.pack(r.crc32)
    return bytes(out)


def unpack_frame_index(
    data: bytes, n_frames: int, samples: int, version: int = 1, n_models: int = 0
) -> list[FrameRecord]:
    """Parse a ``FRAME_INDEX`` section body holding ``n_frames`` records.

    Raises
    ------
    CorruptStreamError
        On truncation, trailing bytes, bad flags, a path or model index outside its table,
        a split frame in a version-1 index or a non-ASCII path name.
    """
    out: list[FrameRecord] = []
    pos = 0
    max_flags = _FLAG_RESIDUAL if version == 1 else _FLAG_RESIDUAL | _FLAG_SPLIT

    def model_ix(i: int, b: int, what: str) -> int | None:
        if b == MODEL_NONE:
            return None
        if b >= n_models:
            raise CorruptStreamError(
                f"section FRAME_INDEX: frame {i} {what} model index must be < {n_models} "
                f"(or {MODEL_NONE}), got {b}"
            )
        return b

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
            if flags > max_flags:
                raise CorruptStreamError(
                    f"section FRAME_INDEX: frame {i} flags must be <= {max_flags}, got {flags}"
                )
            split = bool(flags & _FLAG_SPLIT)
            if split != (sp != 0) and version >= 2:
                raise CorruptStreamError(
                    f"section FRAME_INDEX: frame {i} split flag {int(split)} disagrees with "
                    f"split planes {sp}"
                )
            offsets = []
            for _ in range(samples):
                o, pos = get_varint(data, pos)
                offsets.append(o)
            stream_len, pos = get_varint(data, pos)
            high_model = low_model = None
            low_path = None
            low_len = 0
            if version >= 2:
                high_model = model_ix(i, data[pos], "high")
                pos += 1
                if split:
                    lix, lmb = data[pos : pos + _LOW_PART.size]  # ValueError when truncated
                    pos += _LOW_PART.size
                    if lix >= len(names):
                        raise CorruptStreamError(
                            f"section FRAME_INDEX: frame {i} low path index must be < "
                            f"{len(names)}, got {lix}"
                        )
                    low_path = names[lix]
                    low_model = model_ix(i, lmb, "low")
                    low_len, pos = get_varint(data, pos)
            residual_len = None
            if flags & _FLAG_RESIDUAL:
                residual_len, pos = get_varint(data, pos)
            (crc,) = _CRC32.unpack_from(data, pos)
            pos += _CRC32.size
            out.append(
                FrameRecord(
                    names[ix],
                    vb,
                    sp,
                    nb,
                    tuple(offsets),
                    stream_len,
                    residual_len,
                    crc,
                    high_model,
                    low_path,
                    low_model,
                    low_len,
                )
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


# -- DATASET section ------------------------------------------------------------------------

_DATASET_HEAD = struct.Struct("<BQ")
_MAX_RAW_DATASET = 1 << 36
_SHA256_BYTES = 32


@dataclass(frozen=True, eq=False)
class DatasetReference:
    """Bytes that the ``DATASET`` sections of a series' blobs are coded against (method 2):
    one instance's data set, kept once by the caller and named in each blob by sha256."""

    data: bytes

    @functools.cached_property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.data).digest()


ReferenceSource = Callable[[bytes], bytes | None]
"""Gives a reference's bytes by their raw sha256, or None when it has none."""


class _Dictionaries:
    """zstd dictionaries of references, prepared once each (a 150 KB Siemens header takes
    milliseconds to prepare) and shared by threads: prepared dictionaries are read-only."""

    _SIZE = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prepared: dict[tuple[bytes, int], zstandard.ZstdCompressionDict] = {}

    def get(self, sha256: bytes, data: bytes, level: int) -> zstandard.ZstdCompressionDict:
        """Prepared for compression at ``level``, or for decompression with level 0."""
        key = (sha256, level)
        with self._lock:
            found = self._prepared.get(key)
            if found is not None:
                return found
            prepared = zstandard.ZstdCompressionDict(data, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
            if level:
                prepared.precompute_compress(level=level)
            if len(self._prepared) >= self._SIZE:
                self._prepared.pop(next(iter(self._prepared)))
            self._prepared[key] = prepared
            return prepared


_DICTIONARIES = _Dictionaries()


def _zstd_level(raw_bytes: int) -> int:
    return 19 if raw_bytes <= 4 << 20 else 9


def pack_dataset(data: bytes, reference: DatasetReference | None = None) -> bytes:
    """The ``DATASET`` section body of ``data``: zstd (against ``reference`` when given) where
    that is smaller, else stored."""
    if data:
        level = _zstd_level(len(data))
        if reference is not None and reference.data:
            sha = reference.sha256
            prepared = _DICTIONARIES.get(sha, reference.data, level)
            z = zstandard.ZstdCompressor(level=level, dict_data=prepared).compress(data)
            if len(z) + _SHA256_BYTES < len(data):
                return _DATASET_HEAD.pack(DatasetMethod.ZSTD_REFERENCE, len(data)) + sha + z
        else:
            z = zstandard.ZstdCompressor(level=level).compress(data)
            if len(z) < len(data):
                return _DATASET_HEAD.pack(DatasetMethod.ZSTD, len(data)) + z
    return _DATASET_HEAD.pack(DatasetMethod.STORED, len(data)) + data


def _dataset_head(body: bytes) -> tuple[int, int]:
    if len(body) < _DATASET_HEAD.size:
        raise CorruptStreamError(
            f"section DATASET: need at least {_DATASET_HEAD.size} bytes, got {len(body)}"
        )
    method, raw_len = _DATASET_HEAD.unpack_from(body, 0)
    if method not in DatasetMethod.__members__.values():
        raise CorruptStreamError(f"section DATASET: method must be 0, 1 or 2, got {method}")
    if method != DatasetMethod.STORED and raw_len > _MAX_RAW_DATASET:
        raise CorruptStreamError(f"section DATASET: raw length {raw_len} is implausible")
    return method, raw_len


def dataset_raw_length(body: bytes) -> int:
    """How many bytes a ``DATASET`` section body decodes to (nothing is decoded)."""
    return _dataset_head(body)[1]


def dataset_reference_of(body: bytes) -> bytes | None:
    """The raw sha256 of the reference a ``DATASET`` section body is coded against, or None."""
    method, _ = _dataset_head(body)
    if method != DatasetMethod.ZSTD_REFERENCE:
        return None
    sha = body[_DATASET_HEAD.size : _DATASET_HEAD.size + _SHA256_BYTES]
    if len(sha) != _SHA256_BYTES:
        raise CorruptStreamError(
            f"section DATASET: method 2 needs a {_SHA256_BYTES}-byte reference sha256, "
            f"got {len(sha)} bytes"
        )
    return sha


def unpack_dataset(body: bytes, references: ReferenceSource | None = None) -> bytes:
    """The bytes a ``DATASET`` section body holds; ``references`` gives the reference it may
    be coded against.

    Raises
    ------
    CorruptStreamError
        A malformed body, or reference bytes that do not have the sha256 the body names.
    MissingReferenceError
        The body is coded against a reference ``references`` does not give.
    """
    method, raw_len = _dataset_head(body)
    data = body[_DATASET_HEAD.size :]
    if method == DatasetMethod.STORED:
        out = data
    else:
        dictionary = None
        sha = dataset_reference_of(body)
        if sha is not None:
            data = data[_SHA256_BYTES:]
            reference = None if references is None else references(sha)
            if reference is None:
                raise MissingReferenceError(sha)
            if hashlib.sha256(reference).digest() != sha:
                raise CorruptStreamError(
                    f"section DATASET: reference {sha.hex()} was given bytes with sha256 "
                    f"{hashlib.sha256(reference).hexdigest()}"
                )
            dictionary = _DICTIONARIES.get(sha, reference, 0)
        try:
            out = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(
                data, max_output_size=raw_len
            )
        except zstandard.ZstdError as exc:
            raise CorruptStreamError(f"section DATASET: zstd stream invalid ({exc})") from None
    if len(out) != raw_len:
        raise CorruptStreamError(f"section DATASET: expected {raw_len} raw bytes, got {len(out)}")
    return out


# -- PAYLOAD section ------------------------------------------------------------------------

_PAYLOAD_BITS_BACK = struct.Struct("<BII")
"""Mode 2: mode, carrier frame index, payload length."""


@dataclass(frozen=True)
class PayloadSection:
    """A ``PAYLOAD`` section body, parsed (the module docstring describes each mode).

    Attributes
    ----------
    mode
        Where the payload rides.
    data
        ``SECTION``: the payload; ``SPREAD``: its remainder, which the frames do not carry.
    frame, length
        ``BITS_BACK``: the carrier frame and the payload's length.
    free, spread
        ``SPREAD``: payload bytes in the carriers' coder flushes and in segments inside the
        frames' coded streams.
    """

    mode: PayloadMode = PayloadMode.NONE
    data: bytes = b""
    frame: int = 0
    length: int = 0
    free: int = 0
    spread: int = 0


def pack_payload(payload: PayloadSection) -> bytes:
    """Serialise a ``PAYLOAD`` section body."""
    if payload.mode == PayloadMode.BITS_BACK:
        return _PAYLOAD_BITS_BACK.pack(payload.mode, payload.frame, payload.length)
    out = bytearray([payload.mode])
    if payload.mode == PayloadMode.SPREAD:
        put_varint(out, payload.free)
        put_varint(out, payload.spread)
    if payload.mode in (PayloadMode.SECTION, PayloadMode.SPREAD):
        out += payload.data
    return bytes(out)


def unpack_payload(body: bytes, version: int) -> PayloadSection:
    """Parse a ``PAYLOAD`` section body of a blob of format ``version``.

    Raises
    ------
    CorruptStreamError
        On an unknown mode or a body of the wrong length.
    UnsupportedFormatError
        On a mode the blob's version does not have.
    """
    if not body:
        raise CorruptStreamError("section PAYLOAD: must hold at least its mode byte, got 0 bytes")
    mode = body[0]
    if mode == PayloadMode.NONE:
        if len(body) != 1:
            raise CorruptStreamError(
                f"section PAYLOAD: mode NONE must be 1 byte long, got {len(body)}"
            )
        return PayloadSection()
    if mode == PayloadMode.SECTION:
        return PayloadSection(PayloadMode.SECTION, body[1:])
    if mode == PayloadMode.BITS_BACK:
        if version < 2:
            raise UnsupportedFormatError(
                "section PAYLOAD: mode BITS_BACK needs format version 2, blob is version 1"
            )
        if len(body) != _PAYLOAD_BITS_BACK.size:
            raise CorruptStreamError(
                f"section PAYLOAD: mode BITS_BACK must be {_PAYLOAD_BITS_BACK.size} bytes long, "
                f"got {len(body)}"
            )
        _, frame, length = _PAYLOAD_BITS_BACK.unpack(body)
        return PayloadSection(PayloadMode.BITS_BACK, frame=frame, length=length)
    if mode == PayloadMode.SPREAD:
        if version < 3:
            raise UnsupportedFormatError(
                f"section PAYLOAD: mode SPREAD needs format version 3, blob is version {version}"
            )
        try:
            free, at = get_varint(body, 1)
            spread, at = get_varint(body, at)
        except (IndexError, ValueError):
            raise CorruptStreamError("section PAYLOAD: mode SPREAD length is cut short") from None
        return PayloadSection(PayloadMode.SPREAD, body[at:], free=free, spread=spread)
    raise CorruptStreamError(f"section PAYLOAD: mode must be 0, 1, 2 or 3, got {mode}")


# -- mode SPREAD: the payload in the frames -------------------------------------------------

FREE_BITS_PATH = "pred"
"""Mode 3: frames coded whole by this path carry free bits in their coders' flushes."""
_MAX_FREE_BITS = 32
"""Free bits one coder flush carries at most (its 4 bytes)."""


def is_free_bits_carrier(r: FrameRecord) -> bool:
    """Whether a frame's coder flushes carry payload bits (mode 3)."""
    return r.path == FREE_BITS_PATH and r.split_planes == 0


class FreeBitsSlot(Protocol):
    """A coder flush as the free bits see it
    (:class:`~medzip_scp.codec.predictive.FlushSlot`)."""

    @property
    def capacity(self) -> int:
        """Bits it carries at most."""
        ...

    @property
    def carried(self) -> int:
        """The number it carries."""
        ...


def _fill(capacities: Sequence[int], amount: int) -> list[int]:
    """How much of ``amount`` each place holds, filled in order up to its capacity."""
    out = []
    for capacity in capacities:
        take = min(capacity, amount)
        out.append(take)
        amount -= take
    return out


def split_free_bits(payload: bytes, capacities: Sequence[int]) -> tuple[int, list[tuple[int, int]]]:
    """How the first payload bytes ride in coder flushes of ``capacities`` bits:
    ``(free, [(bits taken, number carried)] per flush)``, ``free`` being as many whole
    payload bytes as the flushes hold."""
    free = min(len(payload), sum(capacities) // 8)
    bits = int.from_bytes(payload[:free], "big")
    left = 8 * free
    out = []
    for take in _fill(capacities, 8 * free):
        left -= take
        out.append((take, (bits >> left) & ((1 << take) - 1)))
    return free, out


def join_free_bits(slots: Sequence[tuple[int, FreeBitsSlot]], free: int) -> bytes:
    """The first ``free`` payload bytes from the ``(frame, slot)`` flushes of the carriers.

    Raises
    ------
    CorruptStreamError
        If the flushes cannot hold ``free`` bytes or one carries more bits than it takes.
    """
    counts = _fill([s.capacity for _, s in slots], 8 * free)
    if sum(counts) != 8 * free:
        raise CorruptStreamError(
            f"section PAYLOAD: the frames' coder flushes carry {sum(counts)} free bits, the "
            f"section says {free} free bytes ({8 * free} bits)"
        )
    bits = 0
    for (frame, slot), take in zip(slots, counts, strict=True):
        if slot.carried >> take:
            raise CorruptStreamError(
                f"section PAYLOAD: frame {frame}'s coder flush carries {slot.carried}, which "
                f"does not fit the {take} free bits it holds"
            )
        bits = (bits << take) | slot.carried
    return bits.to_bytes(free, "big")


def _spread_lengths(length: int, records: Sequence[FrameRecord]) -> list[int]:
    """How many payload bytes each frame carries in its coded stream."""
    if not records:
        return []
    share = -(-length // len(records))
    return _fill([min(share, r.stream_bytes) for r in records], length)


def _segment_offset(r: FrameRecord) -> int:
    """Where a frame's payload segment sits inside its coded stream."""
    return r.crc32 % (r.stream_bytes + 1)


def spread_payload(
    streams: bytes, records: Sequence[FrameRecord], payload: bytes, free: int
) -> tuple[bytes, PayloadSection]:
    """``(streams with the frames' segments of the payload in them, the PAYLOAD section)``
    for a ``payload`` whose first ``free`` bytes the coder flushes already carry."""
    rest = payload[free:]
    out = bytearray()
    pos = 0
    carried = 0
    for r, n in zip(records, _spread_lengths(len(rest), records), strict=True):
        at = pos + _segment_offset(r)
        out += streams[pos:at]
        out += rest[carried : carried + n]
        out += streams[at : pos + r.total_bytes]
        pos += r.total_bytes
        carried += n
    section = PayloadSection(PayloadMode.SPREAD, rest[carried:], free=free, spread=carried)
    return bytes(out), section


def _remove_segments(
    streams: bytes, records: Sequence[FrameRecord], spread: list[int]
) -> tuple[bytes, bytes]:
    """``(streams without the payload segments, the segments in frame order)``."""
    pixels = bytearray()
    carried = bytearray()
    pos = 0
    for r, n in zip(records, spread, strict=True):
        at = pos + _segment_offset(r)
        pixels += streams[pos:at]
        carried += streams[at : at + n]
        pixels += streams[at + n : pos + r.total_bytes + n]
        pos += r.total_bytes + n
    return bytes(pixels), bytes(carried)


# -- a whole blob ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameStreams:
    """One frame's bytes in ``STREAMS``, which holds them in this order.

    Attributes
    ----------
    high
        The path's bytes (the high part's, for a split frame).
    low
        A split frame's low part (empty otherwise).
    residual
        The bits above the value bits, zstd-coded; ``None`` when the frame has none.
    """

    high: bytes
    low: bytes = b""
    residual: bytes | None = None

    def joined(self) -> bytes:
        """The frame's bytes as ``STREAMS`` holds them (``high`` first)."""
        return self.high + self.low + (self.residual or b"")


@dataclass(frozen=True)
class BlobContents:
    """A blob's sections, parsed and checked against each other, whatever its version.

    Attributes
    ----------
    header
        Model identification.
    layout
        The pixel layout, or ``None`` for a blob without pixels.
    records
        One record per frame.
    starts
        Offset of each frame's bytes in ``streams``.
    streams
        The frames' coded bytes back to back (mode 3's payload segments taken out).
    dataset
        The ``DATASET`` section body (the empty data set's when the blob leaves it out).
    payload
        The ``PAYLOAD`` section.
    spread_payload
        Mode 3: the payload after its free bytes (the segments, then the remainder); the
        free bytes come out of the frames' decoding.
    """

    header: ContainerHeader
    layout: PixelLayout | None
    records: tuple[FrameRecord, ...]
    starts: tuple[int, ...]
    streams: bytes
    dataset: bytes
    payload: PayloadSection
    spread_payload: bytes = b""

    def frame_streams(self, i: int) -> FrameStreams:
        """Frame ``i``'s bytes."""
        r = self.records[i]
        high = self.starts[i] + r.stream_bytes
        low = high + r.low_bytes
        residual = None
        if r.residual_bytes is not None:
            residual = self.streams[low : low + r.residual_bytes]
        return FrameStreams(self.streams[self.starts[i] : high], self.streams[high:low], residual)


def write_blob(
    models: Sequence[ModelRef],
    layout: PixelLayout | None,
    records: Sequence[FrameRecord],
    streams: bytes,
    dataset: bytes = b"",
    reference: DatasetReference | None = None,
    payload: PayloadSection = PayloadSection(),
) -> bytes:
    """A blob of the current format version: the frames (``layout`` ``None``: none), their
    coded ``streams``, the opaque ``dataset`` (coded against ``reference`` where that is
    smaller) and the payload's section. Empty sections are left out."""
    sections = []
    if layout is not None:
        index_body = pack_layout_v3(layout, len(records)) + pack_frame_index(
            list(records), FORMAT_VERSION
        )
        sections += [
            Section(SectionType.FRAME_INDEX, index_body),
            Section(SectionType.STREAMS, bytes(streams)),
        ]
    if dataset:
        sections.append(Section(SectionType.DATASET, pack_dataset(bytes(dataset), reference)))
    if payload.mode != PayloadMode.NONE:
        sections.append(Section(SectionType.PAYLOAD, pack_payload(payload)))
    return write_container(ContainerHeader(version=FORMAT_VERSION, models=tuple(models)), sections)


def unavailable_path(frame: int, path: str) -> UnsupportedFormatError:
    """The error for a frame coded by a path this decoder does not have."""
    return UnsupportedFormatError(
        f"frame {frame}: path {path!r} is not available in this decoder; install the package "
        "that registers it"
    )


def parse_sections(
    header: ContainerHeader, sections: Sequence[Section], paths: Collection[str] | None = None
) -> BlobContents:
    """Parse the sections :func:`read_container` returned and check them against each other;
    with ``paths``, the path ids this decoder has, an unsplit frame coded by another path is
    unsupported before anything that path's streams would account for is checked.

    Raises
    ------
    CorruptStreamError
        On a malformed section, records that break the layout, or a ``STREAMS`` section
        whose length the frame index and payload do not account for.
    UnsupportedFormatError
        On a payload mode the blob's version does not have, or a path not in ``paths``.
    """
    by_type = {s.type: s.data for s in sections}
    # version 3 leaves empty sections out: they stand for their empty forms
    dataset = by_type.get(SectionType.DATASET)
    if dataset is None:
        dataset = pack_dataset(b"")
    payload_body = by_type.get(SectionType.PAYLOAD, bytes([PayloadMode.NONE]))
    streams = by_type.get(SectionType.STREAMS, b"")
    if header.version >= 3:
        index_body = by_type.get(SectionType.FRAME_INDEX)
        if index_body is None:
            return _assemble(header, None, [], streams, dataset, payload_body)
        layout, n, pos = unpack_layout_v3(index_body)
        index_body = index_body[pos:]
    else:
        layout_body = by_type[SectionType.LAYOUT]
        index_body = by_type[SectionType.FRAME_INDEX]
        if not layout_body:
            if index_body or streams:
                raise CorruptStreamError(
                    "sections FRAME_INDEX and STREAMS must be empty when LAYOUT is empty, got "
                    f"{len(index_body)} and {len(streams)} bytes"
                )
            return _assemble(header, None, [], streams, dataset, payload_body)
        layout, n = unpack_layout(layout_body)
    records = unpack_frame_index(
        index_body, n, layout.samples_per_pixel, min(header.version, 2), len(header.models)
    )
    _check_records(records, layout)
    for i, r in enumerate(records):
        if paths is not None and not r.split_planes and r.path not in paths:
            raise unavailable_path(i, r.path)
    return _assemble(header, layout, records, streams, dataset, payload_body)


def _check_records(records: Sequence[FrameRecord], layout: PixelLayout) -> None:
    """Raise CorruptStreamError for records that break ``layout``."""
    w = layout.bits_allocated
    for i, r in enumerate(records):
        if not 1 <= r.value_bits <= w:
            raise CorruptStreamError(
                f"section FRAME_INDEX: frame {i} value bits must be in 1..{w}, got {r.value_bits}"
            )
        if r.nbits > r.value_bits:
            raise CorruptStreamError(
                f"section FRAME_INDEX: frame {i} nbits must be <= value bits {r.value_bits}, "
                f"got {r.nbits}"
            )
        if r.residual_bytes is not None and r.value_bits >= w:
            raise CorruptStreamError(
                f"section FRAME_INDEX: frame {i} has a residual but its value bits "
                f"({r.value_bits}) cover the whole {w}-bit word"
            )
        if len(r.offsets) != layout.samples_per_pixel or max(r.offsets) >> r.value_bits:
            raise CorruptStreamError(
                f"section FRAME_INDEX: frame {i} offsets must fit in {r.value_bits} bits"
            )
        if r.split_planes and layout.samples_per_pixel != 1:
            raise CorruptStreamError(
                f"section FRAME_INDEX: frame {i} is split but has "
                f"{layout.samples_per_pixel} samples per pixel (must be 1)"
            )


def _assemble(
    header: ContainerHeader,
    layout: PixelLayout | None,
    records: list[FrameRecord],
    streams: bytes,
    dataset: bytes,
    payload_body: bytes,
) -> BlobContents:
    """The contents, once the payload's section is parsed and ``streams`` is checked to hold
    the frames' bytes (and, mode 3, the payload segments in them, which are taken out)."""
    payload = unpack_payload(payload_body, header.version)
    starts = []
    frame_bytes = 0
    for r in records:
        starts.append(frame_bytes)
        frame_bytes += r.total_bytes
    lengths: list[int] = []
    if payload.mode == PayloadMode.SPREAD:
        carriers = sum(map(is_free_bits_carrier, records))
        if layout is not None:
            carriers *= layout.samples_per_pixel
        if 8 * payload.free > _MAX_FREE_BITS * carriers:
            # the exact capacity is known once the frames decode
            raise CorruptStreamError(
                f"section PAYLOAD: {payload.free} free bytes, but the frames have {carriers} "
                f"streams coded by {FREE_BITS_PATH} (at most {_MAX_FREE_BITS} free bits each)"
            )
        lengths = _spread_lengths(payload.spread + len(payload.data), records)
        if sum(lengths) != payload.spread:
            raise CorruptStreamError(
                f"section PAYLOAD: frames can carry {sum(lengths)} of the payload's "
                f"{payload.spread + len(payload.data)} bytes, the section says {payload.spread}"
            )
    if frame_bytes + payload.spread != len(streams):
        raise CorruptStreamError(
            f"section STREAMS: frame index accounts for {frame_bytes + payload.spread} bytes, "
            f"section has {len(streams)}"
        )
    if payload.mode == PayloadMode.BITS_BACK and payload.frame >= len(records):
        raise CorruptStreamError(
            f"section PAYLOAD: carrier frame must be < {len(records)}, got {payload.frame}"
        )
    rest = payload.data if payload.mode == PayloadMode.SPREAD else b""
    if payload.spread:
        streams, carried = _remove_segments(streams, records, lengths)
        rest = carried + rest
    return BlobContents(
        header, layout, tuple(records), tuple(starts), streams, dataset, payload, rest
    )
