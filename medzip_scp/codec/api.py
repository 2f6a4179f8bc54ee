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

Predictive prior
----------------
``pred`` codes the single-sample frames of an object of at most :data:`PRIOR_MAX_PIXELS`
pixels a frame from the shipped prior :data:`PRIOR` (:mod:`medzip_scp.codec.predictive.prior`)
instead of a fresh model; a classical blob whose frames continue it names it in its model
table like a learned model, and decodes only where it is installed. A single frame falls back
to a fresh model where the prior does not pay for its entry there.

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
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from medzip_scp.codec import predictive
from medzip_scp.codec.container import (
    BlobContents,
    ContainerHeader,
    DatasetReference,
    FrameRecord,
    FrameStreams,
    ModelRef,
    PayloadMode,
    PayloadSection,
    ReferenceSource,
    dataset_raw_length,
    dataset_reference_of,
    frame_crc32,
    is_free_bits_carrier,
    join_free_bits,
    model_entry_size,
    parse_sections,
    read_container,
    split_free_bits,
    split_record_overhead,
    spread_payload,
    unavailable_path,
    unpack_dataset,
    write_blob,
)
from medzip_scp.codec.errors import (
    CodecError,
    CorruptStreamError,
    UnknownModelError,
    UnsupportedFormatError,
)
from medzip_scp.codec.frames import FrameSet, PixelLayout
from medzip_scp.codec.gate import SMALL_PIXELS, extra_candidates, screened_candidates
from medzip_scp.codec.learned.paths import LOCAL_PATH, LearnedOptions, SplitCode
from medzip_scp.codec.paths import (
    CarrierPath,
    PixelPath,
    ZstdPath,
    carried_models,
    frame_taken,
    get_encoder,
    get_path,
    registered_paths,
    values_dtype,
    without_carried_models,
)
from medzip_scp.codec.predictive import FlushSlot, warm_start, without_warm_start
from medzip_scp.codec.predictive.prior import PredPrior
from medzip_scp.codec.zoo import MODELS, ModelStore, default_store, resolve_model

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
    "load_prior",
    "read_dataset_rest_and_payload",
]

DEFAULT_PATHS: tuple[str, ...] = ("pred", "jpegls")
"""Candidates every frame tries by default, in tie-break order; :mod:`medzip_scp.codec.gate`
adds the others where they can win. ``constant`` and ``verbatim`` are always added."""

DEFAULT_LEARNED = LearnedOptions()
"""Learned split frames as :func:`compress` tries them when asked (``learned=``)."""

ProgressCallback = Callable[[int, int], None]
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


def _split(
    u: npt.NDArray[np.uint64], layout: PixelLayout, value_bits: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64] | None]:
    """Split stored words into offset-binary values and the residual above ``value_bits``."""
    w = layout.bits_allocated
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
    w = layout.bits_allocated
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


@dataclass(frozen=True)
class _Candidate:
    """One path's coding of a frame's values: an alternative the frame may be coded with.

    Attributes
    ----------
    path
        The path that coded it.
    data
        Its coded bytes.
    slots
        The coder flushes that can carry free payload bits (a :class:`CarrierPath`'s).
    order
        Place of ``path`` among the frame's candidates: breaks ties between equal sizes.
    """

    path: PixelPath
    data: bytes
    slots: tuple[FlushSlot, ...] = ()
    order: int = 0


def _code_candidates(
    values: npt.NDArray[np.unsignedinteger], nbits: int, paths: list[PixelPath], first: int = 0
) -> list[_Candidate]:
    """Every path's coding of ``values``, smallest first (ties: in the order of ``paths``,
    numbered from ``first``); a path that cannot code them is left out."""
    coded: list[_Candidate] = []
    for order, path in enumerate(paths, first):
        slots: Sequence[FlushSlot] = ()
        try:
            if isinstance(path, CarrierPath):
                carried = path.encode_carrying(values, nbits)
                data, slots = carried if carried is not None else (None, ())
            else:
                data = path.encode(values, nbits)
        except predictive.CoreUnavailableError:
            raise  # a broken install, never a silent change of path
        except Exception:  # a path that cannot take this input is simply not a candidate
            data = None
        if data is not None:
            coded.append(_Candidate(path, data, tuple(slots), order))
    coded.sort(key=lambda c: (len(c.data), c.order))
    return coded


def _best_stream(
    values: npt.NDArray[np.unsignedinteger],
    nbits: int,
    paths: list[PixelPath] | None,
    verify: bool,
    primed: bool = False,
) -> _Candidate:
    """The smallest candidate of every path (``None``: the gated default; ``primed``: pred
    starts from the prior). With ``verify`` the smallest that decodes back exactly; without,
    the smallest, unchecked (the caller decodes the whole blob)."""
    if paths is not None:
        coded = _code_candidates(values, nbits, paths)
    else:  # the gated default: DEFAULT_PATHS and the gate's extras
        extras = extra_candidates(values, nbits, primed)
        gated = _candidate_paths((*DEFAULT_PATHS, *extras))
        coded = _code_candidates(values, nbits, gated)
        if primed and not extras and coded:  # pred from the prior: the slow codecs only
            screened = screened_candidates(values, nbits, len(coded[0].data))  # where they may win
            more = [p for p in _candidate_paths(screened) if p not in gated]
            coded += _code_candidates(values, nbits, more, len(gated))
            coded.sort(key=lambda c: (len(c.data), c.order))
    if coded and not verify:
        return coded[0]
    shape = tuple(values.shape)
    for c in coded:
        try:
            back = c.path.decode(c.data, shape, nbits)  # type: ignore[arg-type]
        except Exception:
            continue
        if back.shape == values.shape and np.array_equal(back, values):
            return c
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
    primed: bool = False  # pred frames start from the prior
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
    """Extra blob bytes a split frame costs beyond its streams: the longer frame record, the
    low path's name in the frame index, and the model-table entries of models not yet named."""
    extra = split_record_overhead(LOCAL_PATH)
    for ref in (code.high_ref, code.low_ref):
        if ref is not None and ref not in ctx.models:
            extra += model_entry_size(ref)
    return extra


@dataclass(frozen=True)
class _FrameCoding:
    """One way to code a frame, as :func:`_encode_frame` compares them.

    Attributes
    ----------
    value_bits
        Low bits of each stored word coded as the value; the bits above are the residual.
    nbits
        Bit depth of the values handed to the path (after the offsets are subtracted).
    offsets
        Per-sample minimum subtracted from the values.
    stream
        The best whole-frame candidate for the values.
    residual
        The zstd-coded bits above ``value_bits``; ``None`` when they are all zero.
    split
        A learned split coding cheaper than ``stream``, or ``None``.
    cost
        Bytes this coding adds to the blob, the payload it would leave in the section included.
    """

    value_bits: int
    nbits: int
    offsets: tuple[int, ...]
    stream: _Candidate
    residual: bytes | None
    split: SplitCode | None
    cost: int


def _code_words(
    u: npt.NDArray[np.uint64],
    layout: PixelLayout,
    value_bits: int,
    paths: list[PixelPath] | None,
    ctx: _EncodeContext,
) -> _FrameCoding:
    """Code a frame's stored words ``u`` with their values in the low ``value_bits``."""
    lo, hi = _split(u, layout, value_bits)
    w = layout.bits_allocated
    offsets = lo.reshape(-1, layout.samples_per_pixel).min(axis=0)
    shifted = lo - offsets
    nbits = int(shifted.max()).bit_length()
    values = shifted.astype(values_dtype(nbits))
    stream = _best_stream(values, nbits, paths, ctx.verify, ctx.primed)
    split = _try_split(values, nbits, len(stream.data), ctx)
    residual: bytes | None = None
    if hi is not None:
        res_bits = w - value_bits
        res_vals = hi.astype(values_dtype(res_bits))
        residual = _RESIDUAL.encode(res_vals, res_bits)
        assert residual is not None
        if ctx.verify:
            back = _RESIDUAL.decode(residual, layout.frame_shape, res_bits)
            if not np.array_equal(back, res_vals):
                raise CodecError("residual stream did not decode back exactly")
    res_len = len(residual) if residual is not None else 0
    carry = len(ctx.payload) if ctx.payload_frame is None else 0
    cost = len(stream.data) + carry + res_len
    if split is not None:
        cost = split.cost(carry) + _split_overhead(ctx, split) + res_len
    return _FrameCoding(
        value_bits, nbits, tuple(int(o) for o in offsets), stream, residual, split, cost
    )


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
    w = layout.bits_allocated
    best: _FrameCoding | None = None
    choices = [layout.bits_stored]
    for value_bits in choices:
        coding = _code_words(u, layout, value_bits, paths, ctx)
        if coding.residual is not None and w not in choices:
            choices.append(w)  # also try coding the whole word as the value
        if best is None or coding.cost < best.cost:
            best = coding
    assert best is not None
    return _append_frame(index, best, frame_crc32(frame), streams, ctx)


def _append_frame(
    index: int, coding: _FrameCoding, crc32: int, streams: bytearray, ctx: _EncodeContext
) -> FrameRecord:
    """Append the chosen coding's bytes to ``streams`` and return the frame's record."""
    split = coding.split
    residual_bytes = None if coding.residual is None else len(coding.residual)
    frame_taken(coding.stream.data if split is None else None)
    if split is None:
        parts = FrameStreams(coding.stream.data, residual=coding.residual)
        record = FrameRecord(
            path=coding.stream.path.name,
            value_bits=coding.value_bits,
            split_planes=0,
            nbits=coding.nbits,
            offsets=coding.offsets,
            stream_bytes=len(coding.stream.data),
            residual_bytes=residual_bytes,
            crc32=crc32,
        )
        if is_free_bits_carrier(record):
            start = len(streams)  # the path's bytes open the frame's
            ctx.flush_slots += [
                replace(slot, offset=start + slot.offset) for slot in coding.stream.slots
            ]
    else:
        if split.carries_payload:
            ctx.payload_frame = index
        parts = FrameStreams(split.high_data, split.low_data, coding.residual)
        record = FrameRecord(
            path=split.high_path,
            value_bits=coding.value_bits,
            split_planes=split.s,
            nbits=coding.nbits,
            offsets=coding.offsets,
            stream_bytes=len(split.high_data),
            residual_bytes=residual_bytes,
            crc32=crc32,
            high_model=ctx.model_index(split.high_ref),
            low_path=LOCAL_PATH,
            low_model=ctx.model_index(split.low_ref),
            low_bytes=len(split.low_data),
        )
    streams += parts.joined()
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
    if frames is not None:
        frames.validate()
        # each frame's predictor fit starts from the previous frame's, and in a multi-frame
        # object its model from the previous pred frame's (pred-v2 stream version 3); the
        # first from the prior where the frames are small
        prior = _prior_for(frames.layout, store)
        ctx.primed = prior is not None
        if prior is not None:
            # a single frame falls back to a fresh model where the prior does not pay for
            # its entry in the model table; in a larger object the frames after it gain too
            cost = model_entry_size(prior[0]) if frames.n_frames == 1 else None
            carried = carried_models(decoding=False, start=prior[1].state, start_cost=cost)
        else:
            carried = carried_models(decoding=False) if frames.n_frames > 1 else nullcontext()
        with warm_start(), carried as chain:
            for i in range(frames.n_frames):
                records.append(
                    _encode_frame(i, frames.pixels[i], frames.layout, candidates, streams, ctx)
                )
                if progress is not None:
                    progress(i + 1, frames.n_frames)
        if prior is not None and chain is not None and chain.continued:
            ctx.model_index(prior[0])  # the blob names the prior its pred frames start from
    section = PayloadSection()
    if ctx.payload_frame is not None:
        section = PayloadSection(
            PayloadMode.BITS_BACK, frame=ctx.payload_frame, length=len(payload)
        )
    elif payload:
        free = _carry_free_bits(streams, ctx.flush_slots, payload)
        # after the free bits: the segments move flush bytes, never change them
        coded, section = spread_payload(bytes(streams), records, payload, free)
        streams = bytearray(coded)
    return write_blob(
        ctx.models,
        None if frames is None else frames.layout,
        records,
        bytes(streams),
        dataset_rest,
        reference,
        section,
    )


def _carry_free_bits(streams: bytearray, slots: Sequence[FlushSlot], payload: bytes) -> int:
    """Write the first payload bytes, as many as the slots hold, into their flush bytes in
    ``streams``; return how many."""
    free, carried = split_free_bits(payload, [s.capacity for s in slots])
    for slot, (take, number) in zip(slots, carried, strict=True):
        if not take:
            break
        flush = slot.flush_bytes(number)
        streams[slot.offset : slot.offset + len(flush)] = flush
    return free


PRIOR = "pred-prior-v1"
"""The prior (:mod:`medzip_scp.codec.predictive.prior`) small frames of new blobs start from."""
PRIOR_MAX_PIXELS = SMALL_PIXELS
"""Frames up to this size (the gate's small frames) start from the prior: on held-out frames
of its card it saves 1.7-5.3 % of a 64x64 to 128x128 MR frame's pred stream, nothing on
384x384 MR or CT."""
_prior_warned: set[str] = set()


def load_prior(store: ModelStore) -> tuple[ModelRef, PredPrior]:
    """The reference new blobs name :data:`PRIOR` by, and the prior as ``store`` loads it.

    Raises
    ------
    UnknownModelError
        If ``store``'s registry lacks it, or it is not installed or does not load.
    """
    ref = store.entry(PRIOR).ref()
    prior: PredPrior = store.load(ref)
    return ref, prior


def _prior_for(layout: PixelLayout, store: ModelStore) -> tuple[ModelRef, PredPrior] | None:
    """The prior the pred frames of an object of ``layout`` start from, or None (large or
    colour frames; the prior not installed: coded from a fresh model, logged once)."""
    if layout.samples_per_pixel != 1 or layout.rows * layout.columns > PRIOR_MAX_PIXELS:
        return None
    try:
        return load_prior(store)
    except UnknownModelError as exc:
        if str(store.root) not in _prior_warned:
            _prior_warned.add(str(store.root))
            log.warning("small frames are coded without the predictive prior: %s", exc)
        return None


def _prior_state(header: ContainerHeader, store: ModelStore) -> predictive.ModelState:
    """The model the blob's first pred frame starts from: the prior its header names, or
    fresh."""
    for ref in header.model_refs():
        if store.entry(ref.model_id).kind == "prior":
            prior: PredPrior = store.load(ref)
            return prior.state
    return predictive.FRESH


def _read(blob: bytes) -> BlobContents:
    """Parse and check a blob; its models must be registered (resolved before its sections
    are parsed)."""
    header, sections = read_container(blob)
    resolve_model(header)
    return parse_sections(header, sections, registered_paths())


def _ref(header: ContainerHeader, ix: int | None) -> ModelRef | None:
    return None if ix is None else header.models[ix]


def _decode_frame(
    i: int,
    blob: BlobContents,
    store: ModelStore,
    threads: int | None,
    batch_chunks: int,
    flush_slots: list[tuple[int, FlushSlot]] | None = None,
) -> tuple[npt.NDArray[np.generic], bytes | None]:
    """Decode frame ``i``: ``(frame, the payload its global-path stream carries)``. With
    ``flush_slots`` (mode 3), a carrier frame appends ``(i, slot)`` for each coder flush."""
    layout = blob.layout
    assert layout is not None
    r = blob.records[i]
    header = blob.header
    parts = blob.frame_streams(i)
    shape = layout.frame_shape
    payload: bytes | None = None
    try:
        if r.split_planes != 0:
            if header.version < 2:
                raise UnsupportedFormatError(
                    f"frame {i}: split planes {r.split_planes} in a version-1 blob"
                )
            from medzip_scp.codec.learned.paths import decode_split

            v2d, payload = decode_split(
                r.path,
                parts.high,
                _ref(header, r.high_model),
                r.low_path or "",
                parts.low,
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
                raise unavailable_path(i, r.path)
            if flush_slots is not None and is_free_bits_carrier(r):
                assert isinstance(path, CarrierPath)  # "pred" is always the predictive path
                values, slots = path.decode_carrying(parts.high, shape, r.nbits)
                flush_slots += [(i, slot) for slot in slots]
            else:
                values = path.decode(parts.high, shape, r.nbits)
        hi = None
        if parts.residual is not None:
            hi = _RESIDUAL.decode(parts.residual, shape, layout.bits_allocated - r.value_bits)
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
    crc = frame_crc32(frame)
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
    parsed = _read(blob)
    store = models if models is not None else default_store()
    mode, payload, carrier = _unpack_payload(parsed)
    frames: FrameSet | None = None
    carried: bytes | None = None
    flush_slots: list[tuple[int, FlushSlot]] | None = [] if mode == PayloadMode.SPREAD else None
    if parsed.layout is not None:
        layout = parsed.layout
        n_frames = len(parsed.records)
        pixels = np.empty((n_frames, *layout.frame_shape), dtype=layout.dtype)
        # frames in order: carried models (pred v3), from the prior the blob names
        with carried_models(decoding=True, start=_prior_state(parsed.header, store)):
            for i in range(n_frames):
                pixels[i], frame_payload = _decode_frame(
                    i, parsed, store, threads, batch_chunks, flush_slots
                )
                if i == carrier:
                    carried = frame_payload
                if progress is not None:
                    progress(i + 1, n_frames)
        frames = FrameSet(layout, pixels)
    if mode == PayloadMode.BITS_BACK:
        if carried is None or len(carried) != len(payload):
            raise CorruptStreamError(
                f"section PAYLOAD: frame {carrier} should carry {len(payload)} payload bytes "
                f"in its global-path stream, got {None if carried is None else len(carried)}"
            )
        payload = carried
    if flush_slots is not None:
        payload = join_free_bits(flush_slots, parsed.payload.free) + parsed.spread_payload
    dataset_rest = unpack_dataset(parsed.dataset, references)
    return Decoded(frames, dataset_rest, payload)


def _unpack_payload(parsed: BlobContents) -> tuple[PayloadMode, bytes, int | None]:
    """``(mode, payload, carrier frame)``; for mode 2, ``payload`` is zeros of its length,
    for mode 3 its first ``free`` bytes are (the frames' coder flushes hold them)."""
    section = parsed.payload
    if section.mode == PayloadMode.BITS_BACK:
        return section.mode, bytes(section.length), section.frame
    if section.mode == PayloadMode.SPREAD:
        return section.mode, bytes(section.free) + parsed.spread_payload, None
    return section.mode, section.data, None


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
    parsed = _read(blob)
    mode, payload, _ = _unpack_payload(parsed)
    rest = unpack_dataset(parsed.dataset, references)
    if mode == PayloadMode.BITS_BACK or parsed.payload.free:
        return rest, None
    return rest, payload


def describe(blob: bytes) -> dict[str, Any]:
    """Summarise a blob without decoding its pixels (validates all checksums).

    Returns
    -------
    dict
        ``format_version``, ``model`` (first learned model id, ``None`` for classical),
        ``model_sha256``, ``adapter_sha256`` (of that model), ``models`` (list of dicts with
        ``id``, ``sha256``, ``adapter_sha256``: every model named, the predictive prior
        too), ``layout`` (dict or ``None``), ``frames`` (list of dicts with ``path``,
        ``bytes``, ``residual_bytes``, ``nbits``, ``value_bits``, ``split_planes``,
        ``low_path``, ``low_bytes``, ``models``),
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
    parsed = _read(blob)
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
    ds_body = parsed.dataset
    raw_len = dataset_raw_length(ds_body)
    reference = dataset_reference_of(ds_body)
    mode, payload, _ = _unpack_payload(parsed)
    free = len(payload) if mode == PayloadMode.BITS_BACK else parsed.payload.free
    lay = parsed.layout
    first = next((r for r in refs if MODELS[r.model_id].kind != "prior"), None)  # learned
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
        "payload_stream_bytes": parsed.payload.spread,
        "payload_section_bytes": len(payload) - free - parsed.payload.spread,
        "total_bytes": len(blob),
    }
