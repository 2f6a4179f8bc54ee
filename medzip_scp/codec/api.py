"""The codec's only import surface: :func:`compress`, :func:`decompress`, :func:`describe`.

Per frame, the candidate lossless paths are tried on the frame's values and the smallest one
that decodes back exactly is kept (verify before choose; or, with ``verify=False``, the
smallest, when the caller decodes the whole blob once instead). By default the candidates are
:data:`DEFAULT_PATHS` plus what :mod:`medzip_scp.codec.gate` adds for the frame (JPEG-XL,
JPEG 2000, zstd where cheap statistics say they can win). Values are prepared losslessly
before a path sees them:

1. the stored word is split at ``value_bits`` (Bits Stored): the low bits are the pixel
   value, the bits above it (overlays, garbage; for signed data XOR the sign extension, so a
   clean signed image has none) are a *residual* coded separately with zstd. When the
   residual is not empty, coding the whole word as the value is tried as well;
2. signed values are mapped to offset binary (XOR of the sign bit);
3. the per-sample minimum is subtracted and the bit depth of the remaining range is passed
   to the path (JPEG-XL ``bitspersample``).

The blob records everything the decoder needs per frame (path id, value bits, offsets, bit
depth, section indices) plus the CRC-32 of the frame's original values, which is checked
after decoding: a blob never decodes to wrong pixels silently.

Learned split frames
--------------------
With ``learned`` options (off by default), a single-sample frame of 2..16 bits may instead be
coded split at bit plane ``s`` (1..4): the high part by ``pred`` or the global path, the low
part by the local path (:mod:`medzip_scp.codec.learned.paths` documents which ``s`` is tried
and why). The split is chosen only when its verified size is below the best verified
classical path's, so a blob is never larger than the classical codec would make it (except
for the few bytes of the model table). The blob names every model it uses, exactly
(id, manifest sha256, adapter sha256). The models are loaded only when a split is tried or
decoded (torch only for the float ``local-lm-v1``); without them, or with ``learned=None``,
the codec is classical.

Payload
-------
``payload`` (already encrypted) rides in a frame's global-path stream for free (mode 2) when
a frame's high part is coded by the global path and the payload fits the bits its bits-back
sampling absorbs. Otherwise (mode 3) its first bytes ride for free in the final flush of the
arithmetic coder of each frame coded by ``pred`` (any value in the coder's final interval
decodes the same: 1 to 32 bits a frame, 26 on average on CT and MR), the rest is spread over
the frames' coded streams (a segment inside each frame's stream, at a position taken from the
frame's CRC, at most the stream's own length); what does not fit, and a blob without frames,
keeps it in the ``PAYLOAD`` section. Pixels decode without knowing what the payload means. A
payload costs what the free bits do not carry (it is ciphertext: nothing compresses it) plus 9
to 12 bytes below 16 KiB (the ``PAYLOAD`` section's table entry, its mode byte and two
lengths): a 520-frame 80x80 MR object carries about 1.6 KB in free bits, so an identity
payload costs it those few bytes alone.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from medzip_scp.codec import predictive
from medzip_scp.codec.container import (
    FORMAT_VERSION,
    ZERO_SHA256,
    ContainerHeader,
    DatasetReference,
    FrameRecord,
    ModelRef,
    PayloadMode,
    ReferenceSource,
    Section,
    SectionType,
    dataset_raw_length,
    dataset_reference_of,
    get_varint,
    pack_dataset,
    pack_frame_index,
    pack_layout_v3,
    put_varint,
    read_container,
    unpack_dataset,
    unpack_frame_index,
    unpack_layout,
    unpack_layout_v3,
    write_container,
)
from medzip_scp.codec.errors import CodecError, CorruptStreamError, UnsupportedFormatError
from medzip_scp.codec.frames import FrameSet, PixelLayout
from medzip_scp.codec.gate import extra_candidates
from medzip_scp.codec.learned.paths import LearnedOptions, SplitCode
from medzip_scp.codec.paths import (
    CarrierPath,
    PixelPath,
    ZstdPath,
    carried_models,
    frame_taken,
    get_encoder,
    get_path,
    values_dtype,
    without_carried_models,
)
from medzip_scp.codec.predictive import FlushSlot, warm_start, without_warm_start
from medzip_scp.codec.zoo import ModelStore, default_store, resolve_model

__all__ = [
    "DEFAULT_LEARNED",
    "DEFAULT_PATHS",
    "DatasetReference",
    "Decoded",
    "FrameSet",
    "LearnedOptions",
    "ModelStore",
    "PixelLayout",
    "ReferenceSource",
    "compress",
    "decompress",
    "describe",
    "read_dataset_rest_and_payload",
]

DEFAULT_PATHS: tuple[str, ...] = ("pred", "jpegls")
"""Candidates every frame tries by default, in tie-break order; :mod:`medzip_scp.codec.gate`
adds the others where they can win. ``constant`` and ``verbatim`` are always added."""

DEFAULT_LEARNED = LearnedOptions()
"""Learned split frames as :func:`compress` tries them when asked (``learned=``)."""

ProgressCallback = Callable[[int, int], None]
_PAYLOAD_V2 = struct.Struct("<BII")
log = logging.getLogger(__name__)

_RESIDUAL = ZstdPath(level=9)


@dataclass(frozen=True)
class Decoded:
    """What :func:`decompress` returns.

    Attributes
    ----------
    frames
        The pixel frames, or ``None`` when the blob holds none.
    dataset_rest
        The caller's opaque non-pixel bytes, exactly as given to :func:`compress`.
    payload
        The encrypted metadata payload (empty when none).
    """

    frames: FrameSet | None
    dataset_rest: bytes
    payload: bytes


def _frame_crc(frame: npt.NDArray[np.generic]) -> int:
    le = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<"))
    return zlib.crc32(le.tobytes()) & 0xFFFFFFFF


def _word_bits(layout: PixelLayout) -> int:
    return layout.bits_allocated


def _split(
    u: npt.NDArray[np.uint64], layout: PixelLayout, value_bits: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64] | None]:
    """Split stored words into offset-binary values and the residual above ``value_bits``."""
    w = _word_bits(layout)
    b = value_bits
    lo = u & np.uint64((1 << b) - 1)
    hi = u >> np.uint64(b) if b < w else None
    if layout.signed and w > 1:
        sign = (lo >> np.uint64(b - 1)) & np.uint64(1)
        if hi is not None:
            hi = hi ^ (sign * np.uint64((1 << (w - b)) - 1))
        lo = lo ^ np.uint64(1 << (b - 1))
    if hi is not None and not hi.any():
        hi = None
    return lo, hi


def _join(
    lo: npt.NDArray[np.uint64],
    hi: npt.NDArray[np.uint64] | None,
    layout: PixelLayout,
    value_bits: int,
) -> npt.NDArray[np.uint64]:
    """Inverse of :func:`_split`."""
    w = _word_bits(layout)
    b = value_bits
    if layout.signed and w > 1:
        lo = lo ^ np.uint64(1 << (b - 1))
        if b < w:
            sign = (lo >> np.uint64(b - 1)) & np.uint64(1)
            ext = sign * np.uint64((1 << (w - b)) - 1)
            hi = ext if hi is None else hi ^ ext
    if hi is None or b >= w:
        return lo
    return (hi << np.uint64(b)) | lo


def _unsigned_words(frame: npt.NDArray[np.generic], layout: PixelLayout) -> npt.NDArray[np.uint64]:
    if layout.bits_allocated == 1:
        return frame.astype(np.uint64)
    udt = np.dtype(f"u{frame.dtype.itemsize}")
    return frame.view(udt).astype(np.uint64)


def _words_to_frame(u: npt.NDArray[np.uint64], layout: PixelLayout) -> npt.NDArray[np.generic]:
    dt = layout.dtype
    if layout.bits_allocated == 1:
        return u.astype(np.uint8)
    return u.astype(np.dtype(f"u{dt.itemsize}")).view(dt)


def _candidate_paths(names: Sequence[str]) -> list[PixelPath]:
    out: list[PixelPath] = []
    for name in ("constant", *names, "verbatim"):
        p = get_encoder(name)
        if p is None:
            raise CodecError(
                f"path {name!r} is not registered; registered paths come from "
                "medzip_scp.codec.paths.register_path"
            )
        if p not in out:
            out.append(p)
    return out


def _gated_paths(values: npt.NDArray[np.unsignedinteger], nbits: int) -> list[PixelPath]:
    """The default candidates for this frame: :data:`DEFAULT_PATHS` and the gate's extras."""
    return _candidate_paths((*DEFAULT_PATHS, *extra_candidates(values, nbits)))


def _best_stream(
    values: npt.NDArray[np.unsignedinteger],
    nbits: int,
    paths: list[PixelPath] | None,
    verify: bool,
) -> tuple[PixelPath, bytes, list[FlushSlot]]:
    """Encode with every path (``None``: the gated default) and return the smallest, with the
    flush slots its encoder left (a :class:`CarrierPath`'s; else none). With ``verify`` the
    smallest that decodes back exactly; without, the smallest, unchecked (the caller decodes
    the whole blob)."""
    if paths is None:
        paths = _gated_paths(values, nbits)
    coded: list[tuple[int, int, PixelPath, bytes, list[FlushSlot]]] = []
    for order, path in enumerate(paths):
        slots: list[FlushSlot] = []
        try:
            if isinstance(path, CarrierPath):
                carried = path.encode_carrying(values, nbits)
                data, slots = carried if carried is not None else (None, [])
            else:
                data = path.encode(values, nbits)
        except predictive.CoreUnavailableError:
            raise  # a broken install, never a silent change of path
        except Exception:  # a path that cannot take this input is simply not a candidate
            data = None
        if data is not None:
            coded.append((len(data), order, path, data, slots))
    coded.sort(key=lambda c: (c[0], c[1]))
    if coded and not verify:
        return coded[0][2], coded[0][3], coded[0][4]
    shape = tuple(values.shape)
    for _, _, path, data, slots in coded:
        try:
            back = path.decode(data, shape, nbits)  # type: ignore[arg-type]
        except Exception:
            continue
        if back.shape == values.shape and np.array_equal(back, values):
            return path, data, slots
    raise CodecError(f"no lossless path reproduced the frame exactly (tried {len(coded)})")


@dataclass
class _EncodeContext:
    """Per-blob state of :func:`compress`: learned options, models, the payload's carriers
    (mode 2: a global-path frame; mode 3: the flush slots of the carrier frames, offsets into
    the streams coded so far)."""

    learned: LearnedOptions | None
    store: ModelStore
    payload: bytes
    models: list[ModelRef]
    verify: bool = True
    payload_frame: int | None = None
    flush_slots: list[FlushSlot] = field(default_factory=list)

    def model_index(self, ref: ModelRef | None) -> int | None:
        if ref is None:
            return None
        if ref not in self.models:
            self.models.append(ref)
        return self.models.index(ref)


def _try_split(
    values: npt.NDArray[np.unsignedinteger], nbits: int, classical_bytes: int, ctx: _EncodeContext
) -> SplitCode | None:
    """A verified split coding of ``values`` cheaper than ``classical_bytes``, or ``None``."""
    opts = ctx.learned
    if opts is None or values.shape[2] != 1 or not 2 <= nbits <= 16:
        return None
    from medzip_scp.codec.learned.paths import encode_split

    carry = ctx.payload if ctx.payload_frame is None else b""
    budget = None if opts.force_split is not None else classical_bytes + len(carry)
    try:
        # the next frame's hint and model are this frame's own
        with without_warm_start(), without_carried_models():
            code = encode_split(values[..., 0], nbits, budget, opts, ctx.store, carry)
    except CodecError as exc:  # e.g. a model went missing: the frame stays classical
        if opts.force_split is not None:
            raise
        log.warning("learned split not tried (%s)", type(exc).__name__)
        return None
    if code is None:
        return None
    if opts.force_split is None and code.cost(len(carry)) + _split_overhead(ctx, code) >= budget:  # type: ignore[operator]
        return None
    return code


def _split_overhead(ctx: _EncodeContext, code: SplitCode) -> int:
    """Extra blob bytes a split frame costs beyond its streams: new model-table entries
    (id, manifest sha256, adapter flag and digest), the low path's name in the frame index's
    name table, the longer frame record."""
    extra = 4 + 1 + len("local")  # low path and model index, low length varint; name entry
    for ref in (code.high_ref, code.low_ref):
        if ref is not None and ref not in ctx.models:
            extra += 1 + len(ref.model_id) + 33 + (32 if ref.adapter_sha256 != ZERO_SHA256 else 0)
    return extra


def _encode_frame(
    index: int,
    frame: npt.NDArray[np.generic],
    layout: PixelLayout,
    paths: list[PixelPath] | None,
    streams: bytearray,
    ctx: _EncodeContext,
) -> FrameRecord:
    """Code one frame, append its bytes to ``streams`` and return its record."""
    u = _unsigned_words(frame, layout)
    s = layout.samples_per_pixel
    w = _word_bits(layout)
    choices = [layout.bits_stored]
    best: tuple[int, Any] | None = None
    for value_bits in choices:
        lo, hi = _split(u, layout, value_bits)
        if hi is not None and w not in choices:
            choices.append(w)  # also try coding the whole word as the value
        offsets = lo.reshape(-1, s).min(axis=0)
        shifted = lo - offsets
        nbits = int(shifted.max()).bit_length()
        values = shifted.astype(values_dtype(nbits))
        path, data, slots = _best_stream(values, nbits, paths, ctx.verify)
        split = _try_split(values, nbits, len(data), ctx)
        res_data: bytes | None = None
        if hi is not None:
            res_bits = w - value_bits
            res_vals = hi.astype(values_dtype(res_bits))
            res_data = _RESIDUAL.encode(res_vals, res_bits)
            assert res_data is not None
            if ctx.verify:
                back = _RESIDUAL.decode(res_data, layout.frame_shape, res_bits)
                if not np.array_equal(back, res_vals):
                    raise CodecError("residual stream did not decode back exactly")
        res_len = len(res_data) if res_data is not None else 0
        carry = len(ctx.payload) if ctx.payload_frame is None else 0
        cost = len(data) + carry + res_len
        if split is not None:
            cost = split.cost(carry) + _split_overhead(ctx, split) + res_len
        if best is None or cost < best[0]:
            offs = tuple(int(o) for o in offsets)
            best = (cost, (value_bits, nbits, offs, path, data, slots, res_data, split))
    assert best is not None
    value_bits, nbits, offsets, path, data, slots, res_data, split = best[1]
    frame_taken(data if split is None else None)
    if split is None:
        start = len(streams)
        streams += data
        record = FrameRecord(
            path=path.name,
            value_bits=value_bits,
            split_planes=0,
            nbits=nbits,
            offsets=offsets,
            stream_bytes=len(data),
            residual_bytes=None if res_data is None else len(res_data),
            crc32=_frame_crc(frame),
        )
        if _is_free_bits_carrier(record):
            ctx.flush_slots += [replace(slot, offset=start + slot.offset) for slot in slots]
    else:
        from medzip_scp.codec.learned.paths import LOCAL_PATH

        streams += split.high_data
        streams += split.low_data
        if split.carries_payload:
            ctx.payload_frame = index
        record = FrameRecord(
            path=split.high_path,
            value_bits=value_bits,
            split_planes=split.s,
            nbits=nbits,
            offsets=offsets,
            stream_bytes=len(split.high_data),
            residual_bytes=None if res_data is None else len(res_data),
            crc32=_frame_crc(frame),
            high_model=ctx.model_index(split.high_ref),
            low_path=LOCAL_PATH,
            low_model=ctx.model_index(split.low_ref),
            low_bytes=len(split.low_data),
        )
    if res_data is not None:
        streams += res_data
    return record


def compress(
    frames: FrameSet | None,
    dataset_rest: bytes = b"",
    *,
    payload: bytes = b"",
    paths: Sequence[str] | None = None,
    learned: LearnedOptions | None = None,
    models: ModelStore | None = None,
    progress: ProgressCallback | None = None,
    verify: bool = True,
    reference: DatasetReference | None = None,
) -> bytes:
    """Code pixel frames and opaque non-pixel bytes into one blob, losslessly.

    Parameters
    ----------
    frames
        The native pixel frames, or ``None`` for a blob without pixels.
    dataset_rest
        Opaque bytes stored alongside (zstd when that is smaller), returned unchanged.
    payload
        Already-encrypted metadata payload. Carried in the bits-back initial bits of the
        global path (mode 2) when a frame's high part is coded by it and the payload fits;
        otherwise (mode 3) in the free bits of the ``pred`` frames' coder flushes, then spread
        over the frames' coded streams, the rest (all of it for a blob without frames) in the
        ``PAYLOAD`` section.
    paths
        Classical candidates to try on every frame, in tie-break order: path ids or encoder
        variants such as ``jpegxl-e9`` (:func:`medzip_scp.codec.paths.get_encoder`);
        ``constant`` and ``verbatim`` are always added. ``None``: :data:`DEFAULT_PATHS` plus
        what :mod:`medzip_scp.codec.gate` adds for each frame.
    learned
        How learned split frames are tried (:class:`LearnedOptions`, e.g.
        :data:`DEFAULT_LEARNED`); ``None`` (default): classical paths only. Ignored
        (classical only) when the named models are not installed, unless
        ``learned.force_split`` is set.
    models
        Where models are loaded from (default: the repository's ``models/``).
    progress
        Called as ``progress(done_frames, total_frames)`` after each frame.
    verify
        Decode each frame's smallest candidate stream and compare before choosing it (the
        next smallest when it differs). ``False``: choose the smallest unchecked; the caller
        must then decode the whole blob and compare before trusting it, and code again with
        ``verify`` on when that fails (:func:`medzip_scp.dicom.blob.encode_dataset`): one
        decode instead of two. Learned split streams are always verified.
    reference
        Code ``dataset_rest`` against these bytes (the data set of another instance of the
        series): the blob then decodes only where :func:`decompress` is given them
        (``references``).

    Returns
    -------
    bytes
        The blob (format described in :mod:`medzip_scp.codec.container`), format version 3.

    Raises
    ------
    CodecError
        If ``frames`` is inconsistent, a path id is unknown, or no path verifies.
    UnknownModelError
        With ``learned.force_split`` only, if a named model is not installed.

    .. versionchanged:: 0.2
        ``learned`` and ``models``; payload mode 2; format version 2.

    .. versionchanged:: 0.3
        Format version 3 (compact model table and layout, empty sections left out).

    .. versionchanged:: 0.4
        ``verify``; ``learned`` defaults to ``None`` (the learned paths saved under 2 %);
        ``paths=None`` (the default) gates JPEG-XL, JPEG 2000 and zstd per frame.

    .. versionchanged:: 0.5
        ``reference`` (``DATASET`` method 2).
    """
    candidates = None if paths is None else _candidate_paths(paths)
    store = models if models is not None else default_store()
    if learned is not None and learned.force_split is None:
        from medzip_scp.codec.learned.paths import learned_available

        if not learned_available(store, learned):
            log.info("learned paths unavailable (models not installed): classical only")
            learned = None
    ctx = _EncodeContext(learned, store, bytes(payload), [], verify)
    streams = bytearray()
    records: list[FrameRecord] = []
    sections = []
    if frames is not None:
        frames.validate()
        # each frame's predictor fit starts from the previous frame's, and in a multi-frame
        # object its model from the previous pred frame's (pred-v2 stream version 3)
        carried = carried_models(decoding=False) if frames.n_frames > 1 else nullcontext()
        with warm_start(), carried:
            for i in range(frames.n_frames):
                records.append(
                    _encode_frame(i, frames.pixels[i], frames.layout, candidates, streams, ctx)
                )
                if progress is not None:
                    progress(i + 1, frames.n_frames)
    payload_body = b""
    if ctx.payload_frame is not None:
        payload_body = _PAYLOAD_V2.pack(PayloadMode.BITS_BACK, ctx.payload_frame, len(payload))
    elif payload:
        free = _carry_free_bits(streams, ctx.flush_slots, payload)
        rest = payload[free:]
        spread = _spread_lengths(len(rest), records)
        carried = sum(spread)
        if carried:  # after the free bits: the segments move flush bytes, never change them
            streams = _insert_segments(streams, records, rest, spread)
        head = bytearray([PayloadMode.SPREAD])
        put_varint(head, free)
        put_varint(head, carried)
        payload_body = bytes(head) + rest[carried:]
    if frames is not None:
        index_body = pack_layout_v3(frames.layout, frames.n_frames) + pack_frame_index(
            records, FORMAT_VERSION
        )
        sections += [
            Section(SectionType.FRAME_INDEX, index_body),
            Section(SectionType.STREAMS, bytes(streams)),
        ]
    if dataset_rest:
        sections.append(Section(SectionType.DATASET, pack_dataset(bytes(dataset_rest), reference)))
    if payload_body:
        sections.append(Section(SectionType.PAYLOAD, payload_body))
    header = ContainerHeader(version=FORMAT_VERSION, models=tuple(ctx.models))
    return write_container(header, sections)


_FREE_BITS_PATH = "pred"
"""Mode 3: frames coded whole by this path carry free bits in their coders' flushes."""


def _is_free_bits_carrier(r: FrameRecord) -> bool:
    """Whether a frame's coder flushes carry payload bits (mode 3; the container's docstring)."""
    return r.path == _FREE_BITS_PATH and r.split_planes == 0


def _fill(capacities: Sequence[int], amount: int) -> list[int]:
    """How much of ``amount`` each place holds, filled in order up to its capacity."""
    out = []
    for capacity in capacities:
        take = min(capacity, amount)
        out.append(take)
        amount -= take
    return out


def _free_bit_counts(capacities: Sequence[int], free: int) -> list[int]:
    """Bits of the first ``free`` payload bytes each flush slot carries, in order."""
    return _fill(capacities, 8 * free)


def _carry_free_bits(streams: bytearray, slots: Sequence[FlushSlot], payload: bytes) -> int:
    """Write the first payload bytes, as many as the slots hold, into their flush bytes in
    ``streams``; return how many."""
    free = min(len(payload), sum(s.capacity for s in slots) // 8)
    bits = int.from_bytes(payload[:free], "big")
    left = 8 * free
    for slot, take in zip(slots, _free_bit_counts([s.capacity for s in slots], free), strict=True):
        if not take:
            break
        left -= take
        streams[slot.offset : slot.offset + 4] = slot.flush_bytes(
            (bits >> left) & ((1 << take) - 1)
        )
    return free


def _free_payload(slots: Sequence[tuple[int, FlushSlot]], free: int) -> bytes:
    """The first ``free`` payload bytes from the ``(frame, slot)`` flushes of the carriers."""
    counts = _free_bit_counts([s.capacity for _, s in slots], free)
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
    """How many payload bytes each frame carries (mode 3; see the container's docstring)."""
    if not records:
        return []
    share = -(-length // len(records))
    return _fill([min(share, r.stream_bytes) for r in records], length)


def _segment_offset(r: FrameRecord) -> int:
    """Where a frame's payload segment sits inside its coded stream."""
    return r.crc32 % (r.stream_bytes + 1)


def _insert_segments(
    streams: bytearray, records: Sequence[FrameRecord], payload: bytes, spread: list[int]
) -> bytearray:
    out = bytearray()
    pos = 0
    carried = 0
    for r, n in zip(records, spread, strict=True):
        at = pos + _segment_offset(r)
        out += streams[pos:at]
        out += payload[carried : carried + n]
        out += streams[at : pos + r.total_bytes]
        pos += r.total_bytes
        carried += n
    return out


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


@dataclass(frozen=True)
class _Parsed:
    header: ContainerHeader
    by_type: dict[SectionType, bytes]
    layout: PixelLayout | None
    records: list[FrameRecord]
    starts: list[int]
    free_bytes: int = 0  # mode 3: payload bytes in the carriers' coder flushes
    spread_bytes: int = 0  # mode 3: payload bytes in segments inside the frames' streams
    spread_payload: bytes = b""  # mode 3: the rest, taken out of STREAMS and the section


def _parse(blob: bytes) -> _Parsed:
    header, sections = read_container(blob)
    resolve_model(header)
    by_type = {s.type: s.data for s in sections}
    # version 3 leaves empty sections out; give the rest of the decoder their empty forms
    by_type.setdefault(SectionType.DATASET, pack_dataset(b""))
    by_type.setdefault(SectionType.PAYLOAD, bytes([PayloadMode.NONE]))
    by_type.setdefault(SectionType.STREAMS, b"")
    streams_len = len(by_type[SectionType.STREAMS])
    if header.version >= 3:
        index_body = by_type.get(SectionType.FRAME_INDEX)
        if index_body is None:
            return _with_spread_payload(_Parsed(header, by_type, None, [], []))
        layout, n, pos = unpack_layout_v3(index_body)
        index_body = index_body[pos:]
    else:
        layout_body = by_type[SectionType.LAYOUT]
        index_body = by_type[SectionType.FRAME_INDEX]
        if not layout_body:
            if index_body or streams_len:
                raise CorruptStreamError(
                    "sections FRAME_INDEX and STREAMS must be empty when LAYOUT is empty, got "
                    f"{len(index_body)} and {streams_len} bytes"
                )
            return _Parsed(header, by_type, None, [], [])
        layout, n = unpack_layout(layout_body)
    records = unpack_frame_index(
        index_body, n, layout.samples_per_pixel, min(header.version, 2), len(header.models)
    )
    w = _word_bits(layout)
    starts = []
    pos = 0
    for i, r in enumerate(records):
        starts.append(pos)
        pos += r.total_bytes
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
    return _with_spread_payload(_Parsed(header, by_type, layout, records, starts), pos)


def _with_spread_payload(parsed: _Parsed, frame_bytes: int = 0) -> _Parsed:
    """Check that STREAMS holds the frames' bytes (and, mode 3, the payload segments in
    them); for mode 3, take the segments out of STREAMS and join the rest of the payload (the
    free bytes come out of the frames' decoding)."""
    by_type = parsed.by_type
    streams = by_type[SectionType.STREAMS]
    body = by_type[SectionType.PAYLOAD]
    free, spread, remainder = 0, 0, b""
    if parsed.header.version >= 3 and body[:1] == bytes([PayloadMode.SPREAD]):
        try:
            free, at = get_varint(body, 1)
            spread, at = get_varint(body, at)
        except (IndexError, ValueError):
            raise CorruptStreamError("section PAYLOAD: mode SPREAD length is cut short") from None
        carriers = sum(map(_is_free_bits_carrier, parsed.records))
        if parsed.layout is not None:
            carriers *= parsed.layout.samples_per_pixel
        if 8 * free > 32 * carriers:  # the exact capacity is known once the frames decode
            raise CorruptStreamError(
                f"section PAYLOAD: {free} free bytes, but the frames have {carriers} streams "
                f"coded by {_FREE_BITS_PATH} (at most 32 free bits each)"
            )
        remainder = body[at:]
        lengths = _spread_lengths(spread + len(remainder), parsed.records)
        if sum(lengths) != spread:
            raise CorruptStreamError(
                f"section PAYLOAD: frames can carry {sum(lengths)} of the payload's "
                f"{spread + len(remainder)} bytes, the section says {spread}"
            )
    if frame_bytes + spread != len(streams):
        raise CorruptStreamError(
            f"section STREAMS: frame index accounts for {frame_bytes + spread} bytes, section "
            f"has {len(streams)}"
        )
    if not spread:
        return replace(parsed, free_bytes=free, spread_payload=remainder)
    pixels, carried = _remove_segments(streams, parsed.records, lengths)
    by_type[SectionType.STREAMS] = pixels
    return replace(parsed, free_bytes=free, spread_bytes=spread, spread_payload=carried + remainder)


def _ref(header: ContainerHeader, ix: int | None) -> ModelRef | None:
    return None if ix is None else header.models[ix]


def _decode_frame(
    i: int,
    r: FrameRecord,
    layout: PixelLayout,
    streams: bytes,
    start: int,
    header: ContainerHeader,
    store: ModelStore,
    threads: int | None,
    batch_chunks: int,
    flush_slots: list[tuple[int, FlushSlot]] | None = None,
) -> tuple[npt.NDArray[np.generic], bytes | None]:
    """Decode frame ``i``: ``(frame, the payload its global-path stream carries)``. With
    ``flush_slots`` (mode 3), a carrier frame appends ``(i, slot)`` for each coder flush."""
    shape = layout.frame_shape
    w = _word_bits(layout)
    data = streams[start : start + r.stream_bytes]
    rstart = start + r.stream_bytes + r.low_bytes
    payload: bytes | None = None
    try:
        if r.split_planes != 0:
            if header.version < 2:
                raise UnsupportedFormatError(
                    f"frame {i}: split planes {r.split_planes} in a version-1 blob"
                )
            from medzip_scp.codec.learned.paths import decode_split

            low_data = streams[start + r.stream_bytes : rstart]
            v2d, payload = decode_split(
                r.path,
                data,
                _ref(header, r.high_model),
                r.low_path or "",
                low_data,
                _ref(header, r.low_model),
                (layout.rows, layout.columns),
                r.nbits,
                r.split_planes,
                store,
                threads=threads,
                batch_chunks=batch_chunks,
            )
            values = v2d[..., None]
        else:
            path = get_path(r.path)
            if path is None or r.high_model is not None:
                raise UnsupportedFormatError(
                    f"frame {i}: path {r.path!r} is not available in this decoder; install the "
                    "package that registers it"
                )
            if flush_slots is not None and _is_free_bits_carrier(r):
                assert isinstance(path, CarrierPath)  # "pred" is always the predictive path
                values, slots = path.decode_carrying(data, shape, r.nbits)
                flush_slots += [(i, slot) for slot in slots]
            else:
                values = path.decode(data, shape, r.nbits)
        hi = None
        if r.residual_bytes is not None:
            hi = _RESIDUAL.decode(
                streams[rstart : rstart + r.residual_bytes], shape, w - r.value_bits
            )
    except CodecError:
        raise
    except Exception as exc:
        raise CorruptStreamError(
            f"frame {i}: path {r.path!r} failed to decode its stream ({type(exc).__name__})"
        ) from None
    if values.shape != shape:
        raise CorruptStreamError(
            f"frame {i}: path {r.path!r} decoded shape {values.shape}, expected {shape}"
        )
    lo = values.astype(np.uint64) + np.asarray(r.offsets, dtype=np.uint64)
    if lo.size and int(lo.max()) >> r.value_bits:
        raise CorruptStreamError(f"frame {i}: decoded values exceed {r.value_bits} value bits")
    u = _join(lo, None if hi is None else hi.astype(np.uint64), layout, r.value_bits)
    frame = _words_to_frame(u, layout)
    crc = _frame_crc(frame)
    if crc != r.crc32:
        raise CorruptStreamError(
            f"frame {i}: pixel CRC-32 after decoding path {r.path!r} mismatch, expected "
            f"{r.crc32:08x}, actual {crc:08x}"
        )
    return frame, payload


def decompress(
    blob: bytes,
    *,
    models: ModelStore | None = None,
    threads: int | None = 1,
    batch_chunks: int = 4,
    progress: ProgressCallback | None = None,
    references: ReferenceSource | None = None,
) -> Decoded:
    """Decode a blob made by :func:`compress`.

    Parameters
    ----------
    blob
        The blob.
    models
        Where models are loaded from (default: the repository's ``models/``).
    threads
        Threads of the learned networks while decoding learned frames (BLAS threads for the
        integer models, torch's for ``local-lm-v1``; ``None``: leave the process setting).
        Never changes the result.
    batch_chunks
        Local-path chunks decoded per network batch (speed and memory only; never the result).
    progress
        Called as ``progress(done_frames, total_frames)`` after each frame.
    references
        Gives the reference the data set may be coded against (``compress(reference=)``).

    Returns
    -------
    Decoded
        Frames, the opaque dataset bytes and the payload.

    Raises
    ------
    CorruptStreamError
        If any check fails (section CRC, lengths, records, per-frame pixel CRC).
    UnknownModelError
        If the blob needs a model that is not registered or not installed.
    UnsupportedFormatError
        If the blob uses a newer format version, path or payload mode;
        :class:`MissingReferenceError` if ``references`` lacks the one its data set needs.
    """
    parsed = _parse(blob)
    by_type = parsed.by_type
    store = models if models is not None else default_store()
    mode, payload, carrier = _unpack_payload(parsed)
    frames: FrameSet | None = None
    carried: bytes | None = None
    flush_slots: list[tuple[int, FlushSlot]] | None = [] if mode == PayloadMode.SPREAD else None
    if parsed.layout is not None:
        layout = parsed.layout
        streams = by_type[SectionType.STREAMS]
        pixels = np.empty((len(parsed.records), *layout.frame_shape), dtype=layout.dtype)
        with carried_models(decoding=True):  # frames in order: carried models (pred v3)
            for i, r in enumerate(parsed.records):
                pixels[i], frame_payload = _decode_frame(
                    i,
                    r,
                    layout,
                    streams,
                    parsed.starts[i],
                    parsed.header,
                    store,
                    threads,
                    batch_chunks,
                    flush_slots,
                )
                if i == carrier:
                    carried = frame_payload
                if progress is not None:
                    progress(i + 1, len(parsed.records))
        frames = FrameSet(layout, pixels)
    if mode == PayloadMode.BITS_BACK:
        if carried is None or len(carried) != len(payload):
            raise CorruptStreamError(
                f"section PAYLOAD: frame {carrier} should carry {len(payload)} payload bytes "
                f"in its global-path stream, got {None if carried is None else len(carried)}"
            )
        payload = carried
    if flush_slots is not None:
        free = parsed.free_bytes
        payload = _free_payload(flush_slots, free) + payload[free:]
    dataset_rest = unpack_dataset(by_type[SectionType.DATASET], references)
    return Decoded(frames, dataset_rest, payload)


def _unpack_payload(parsed: _Parsed) -> tuple[int, bytes, int | None]:
    """``(mode, payload, carrier frame)``; for mode 2, ``payload`` is zeros of its length,
    for mode 3 its first ``free`` bytes are (the frames' coder flushes hold them)."""
    body = parsed.by_type[SectionType.PAYLOAD]
    version = parsed.header.version
    n_frames = len(parsed.records)
    if not body:
        raise CorruptStreamError("section PAYLOAD: must hold at least its mode byte, got 0 bytes")
    mode = body[0]
    if mode == PayloadMode.NONE:
        if len(body) != 1:
            raise CorruptStreamError(
                f"section PAYLOAD: mode NONE must be 1 byte long, got {len(body)}"
            )
        return mode, b"", None
    if mode == PayloadMode.SECTION:
        return mode, body[1:], None
    if mode == PayloadMode.BITS_BACK:
        if version < 2:
            raise UnsupportedFormatError(
                "section PAYLOAD: mode BITS_BACK needs format version 2, blob is version 1"
            )
        if len(body) != _PAYLOAD_V2.size:
            raise CorruptStreamError(
                f"section PAYLOAD: mode BITS_BACK must be {_PAYLOAD_V2.size} bytes long, "
                f"got {len(body)}"
            )
        _, frame, length = _PAYLOAD_V2.unpack(body)
        if frame >= n_frames:
            raise CorruptStreamError(
                f"section PAYLOAD: carrier frame must be < {n_frames}, got {frame}"
            )
        return mode, bytes(length), frame
    if mode == PayloadMode.SPREAD:
        if version < 3:
            raise UnsupportedFormatError(
                f"section PAYLOAD: mode SPREAD needs format version 3, blob is version {version}"
            )
        return mode, bytes(parsed.free_bytes) + parsed.spread_payload, None
    raise CorruptStreamError(f"section PAYLOAD: mode must be 0, 1, 2 or 3, got {mode}")


def read_dataset_rest_and_payload(
    blob: bytes, references: ReferenceSource | None = None
) -> tuple[bytes, bytes | None]:
    """``(the opaque dataset bytes, the payload)`` of a blob without decoding its pixels.
    The payload is ``b""`` when the blob carries none, and None when some of it rides in
    the frames' coded bits (mode BITS_BACK, and mode SPREAD's free bits): only
    :func:`decompress` gives it then. All checksums are validated as in :func:`decompress`.

    Raises
    ------
    CorruptStreamError, UnknownModelError, UnsupportedFormatError
        As :func:`decompress`.
    """
    parsed = _parse(blob)
    mode, payload, _ = _unpack_payload(parsed)
    rest = unpack_dataset(parsed.by_type[SectionType.DATASET], references)
    if mode == PayloadMode.BITS_BACK or parsed.free_bytes:
        return rest, None
    return rest, payload


def describe(blob: bytes) -> dict[str, Any]:
    """Summarise a blob without decoding its pixels (validates all checksums).

    Returns
    -------
    dict
        ``format_version``, ``model`` (first model id, ``None`` for classical),
        ``model_sha256``, ``adapter_sha256`` (of that model), ``models`` (list of dicts with
        ``id``, ``sha256``, ``adapter_sha256``), ``layout`` (dict or ``None``), ``frames``
        (list of dicts with ``path``, ``bytes``, ``residual_bytes``, ``nbits``,
        ``value_bits``, ``split_planes``, ``low_path``, ``low_bytes``, ``models``),
        ``pixel_bytes``, ``dataset_bytes``, ``dataset_raw_bytes``, ``dataset_reference``
        (hex sha256 of the reference the data set is coded against, or None), ``payload_bytes``,
        ``payload_mode``, where the payload rides: ``payload_free_bytes`` (bits-back, coder
        flushes), ``payload_stream_bytes`` (segments in the frames' streams),
        ``payload_section_bytes`` (the PAYLOAD section); ``total_bytes``.

    Raises
    ------
    CorruptStreamError, UnknownModelError, UnsupportedFormatError
        As :func:`decompress`.
    """
    parsed = _parse(blob)
    by_type = parsed.by_type
    header = parsed.header
    refs = header.model_refs()
    frames = []
    for r in parsed.records:
        frames.append(
            {
                "path": r.path,
                "bytes": r.stream_bytes + r.low_bytes,
                "residual_bytes": r.residual_bytes or 0,
                "nbits": r.nbits,
                "value_bits": r.value_bits,
                "split_planes": r.split_planes,
                "high_bytes": r.stream_bytes,
                "low_path": r.low_path,
                "low_bytes": r.low_bytes,
                "models": [
                    header.models[ix].model_id
                    for ix in (r.high_model, r.low_model)
                    if ix is not None
                ],
            }
        )
    ds_body = by_type[SectionType.DATASET]
    raw_len = dataset_raw_length(ds_body)
    reference = dataset_reference_of(ds_body)
    mode, payload, _ = _unpack_payload(parsed)
    free = len(payload) if mode == PayloadMode.BITS_BACK else parsed.free_bytes
    lay = parsed.layout
    first = refs[0] if refs else None
    return {
        "format_version": header.version,
        "model": first.model_id if first else None,
        "model_sha256": (first.model_sha256 if first else bytes(32)).hex(),
        "adapter_sha256": (first.adapter_sha256 if first else bytes(32)).hex(),
        "models": [
            {
                "id": m.model_id,
                "sha256": m.model_sha256.hex(),
                "adapter_sha256": m.adapter_sha256.hex(),
            }
            for m in refs
        ],
        "layout": None
        if lay is None
        else {
            "rows": lay.rows,
            "columns": lay.columns,
            "samples_per_pixel": lay.samples_per_pixel,
            "bits_allocated": lay.bits_allocated,
            "bits_stored": lay.bits_stored,
            "signed": lay.signed,
            "planar_configuration": lay.planar_configuration,
        },
        "frames": frames,
        "pixel_bytes": sum(f["bytes"] + f["residual_bytes"] for f in frames),
        "dataset_bytes": len(ds_body),
        "dataset_raw_bytes": raw_len,
        "dataset_reference": None if reference is None else reference.hex(),
        "payload_bytes": len(payload),
        "payload_mode": int(mode),
        "payload_free_bytes": free,
        "payload_stream_bytes": parsed.spread_bytes,
        "payload_section_bytes": len(payload) - free - parsed.spread_bytes,
        "total_bytes": len(blob),
    }
