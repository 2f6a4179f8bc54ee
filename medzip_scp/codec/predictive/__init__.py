"""Lossless predictive coder for one 2-D frame of integers (CT, MR, CR/DX, 1-16 bits).

This is the classical backbone of medzip's codec: a strong, deterministic, per-frame lossless
coder that the learned path is measured against and falls back to.

Design
------
1. **Value packing.**  Many stored images use only a sparse subset of their value range (a LUT or
   rescale was applied before storage: the CR/DX conformance images use 500-800 of 4096 levels).
   When fewer than 70 % of the levels between the minimum and maximum occur, the frame is coded
   as ranks into the sorted set of used values and the set is sent as a zlib-compressed bitmap;
   a frame of at most 128x128 pixels, whose levels are sparse by sampling alone, is coded as
   values, and also as ranks only where more levels are missing than sampling explains.
2. **Classified least-squares prediction, fitted by the encoder.**  Each pixel is put into one of
   ``K`` classes by a causal activity measure (sum of six absolute neighbour differences), with
   thresholds at the activity quantiles of the frame.  For each class the encoder fits an
   ``nn``-tap linear predictor over the causal neighbourhood (up to 24 pixels within distance 3)
   by iteratively reweighted least squares (an approximate L1 fit, robust to edges).  The
   coefficients are quantised to integers (``2**-shift``) and transmitted, so the decoder never
   solves anything and the prediction is exact integer arithmetic.  **Warm start**: given a
   similar frame's fit (a :class:`Fit` hint, or the previous frame's inside :func:`warm_start`,
   which :func:`medzip_scp.codec.api.compress` uses for the frames of one object), the fit
   starts from those coefficients and solves once instead of three times: encoding is 4-14 %
   faster and the streams are within 0.03 % of the cold fit's size.  Only the encoder uses it.
3. **Bias cancellation** (as in CALIC): the mean error of the uncorrected prediction is tracked in
   1/16 pixel units per context (class x 6-bit texture pattern x error-energy level) and added
   to the prediction.
4. **Context-mixing binary arithmetic coding of the residual.**  The residual is binarised
   as zero flag, unary bit length, two context-coded mantissa bits, remaining mantissa bits and a
   sign.  Each of the main decisions is predicted by three adaptive models (16-bit probabilities,
   count-based learning rate) with different contexts: (a) the quantised error energy (weighted
   sum of neighbouring residual magnitudes plus activity, two levels per octave), (b) the
   magnitudes of the west and north residuals separately, (c) the predictor class and the
   energy of the diagonal residuals; for the sign, the neighbouring residual signs and where the
   prediction fell inside its integer bin.  The three are combined by an integer logistic mixer
   (lpaq-style stretch/squash tables, weights selected by the energy) and coded by a 32-bit
   carry-less binary arithmetic coder.  Mixing is worth 1-1.5 % on CT and MR over the best
   single context (format version 1, still decodable, used model (a) alone).

Measured on the shared data (``benchmarks/predictive.py``), the coder is 1-8 % smaller than the
best of JPEG-XL effort 9/7, JPEG-LS and JPEG 2000 lossless on every set (CT, MR-EPI, MR, CR/DX).

Why a C core and not constriction: the model has about 5,000 adaptive binary contexts whose
probabilities change after every symbol, so each symbol has its own distribution; constriction
codes such per-symbol tables at well under 1 M symbols/s from Python, and the prediction itself
is a serial causal recursion.  The C core (``_pred.c``, compiled at install time by ``setup.py``)
decodes about 5-9 MPx/s per core (a 512x512 CT slice in ~30 ms) and encodes 3.5-6 MPx/s, about
a third of that the least-squares fit on a 70k-pixel subsample, also in C
(``benchmarks/predictive_speed.py``).

Determinism: the whole probability path (prediction, bias, contexts, probabilities, coder) is
integer arithmetic in C; the encoder's float least-squares fit only chooses the integer
coefficients, which are stored in the stream.  The fit is plain IEEE double arithmetic in a
fixed order (no BLAS, no contraction, no libm), so a frame (and a hint) gives the same stream on
every machine.  There is no threading.

Stream layout (little-endian; ``CODER_ID`` "pred-v2"; "pred-v1" wrote format version 1):

=========  ==============================================================================
bytes      field
=========  ==============================================================================
4          magic ``b"MZPF"``
1          format version (2, or 3 for a frame whose model continues, see below; version 1
           streams still decode)
1          bits of the frame (1..16)
4, 4       rows, columns
1          mode: 0 constant, 1 direct, 2 packed values, 3 raw
...        mode 0: u16 value.  mode 2: u16 lo, u16 hi, u32 n, n bytes zlib(bitmap of used
           values in [lo, hi]).  mode 3: the values as packed big-endian ``bits``-bit fields.
...        modes 1, 2: u8 coded bits, u8 nn, u8 K, u8 shift, u32 n, n bytes zlib(int32
           thresholds[K-1], int32 coefficients[K][nn]) (version 3: n = 0 reuses the table of
           the frame before), u32 n, n bytes arithmetic-coded payload
4          CRC-32 of the decoded frame as little-endian uint16, row-major
=========  ==============================================================================

Carried models (version 3)
--------------------------
A small frame is coded before its adaptive contexts have learned much (a 64x64 or 80x80 MR
frame pays for it in every frame). The frames of one multi-frame object are alike, so a
version-3 stream starts from the model state (every probability, mixer weight and bias
accumulator) that the object's previous version-3 frame left, in frame order, instead of a
fresh one; the first starts fresh. It may also reuse the predictor table of the frame before
(no side information; the encoder keeps it where that codes the frame smaller, which on the
DTI objects is nearly every frame). Measured on the 520-frame Enhanced MR DTI objects: 5 %
fewer bytes (3.107 -> 2.950 bits per pixel). The state never leaves memory (encoder and
decoder build it by coding the same frames with the same integer routine), so a version-3
stream decodes only after the frames before it, through :func:`encode_frame_carried` and
:func:`decode_frame_carried`.

The first frame may start from a prior instead (:mod:`.prior`: the state left by coding small
MR frames, shipped as a model that blobs name); a frame coded from one falls back to a fresh
model, as a version-2 stream, where the prior does not pay for what naming it costs.

Free bits in the flush
----------------------
The arithmetic coder (modes 1 and 2) ends by writing the 4 bytes of its interval's low end
``x1`` (big-endian, the last 4 bytes of the arithmetic-coded payload).  Any 32-bit value in the
final interval ``[x1, x2]`` decodes to the same frame, and the decoder ends with that value in
its window.  So a stream carries ``floor(log2(x2 - x1 + 1))`` bits (1..32, about 26 on CT and MR)
for free as ``k = value - x1``: :func:`encode_frame_slot` and :func:`decode_frame_slot` report
the :class:`FlushSlot`, :meth:`FlushSlot.flush_bytes` gives the 4 bytes that carry ``k``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import CoreUnavailableError

__all__ = [
    "CODER_ID",
    "CoreUnavailableError",
    "check_core",
    "CorruptStreamError",
    "Fit",
    "FlushSlot",
    "ModelState",
    "continues_model",
    "soften",
    "decode_frame",
    "decode_frame_carried",
    "decode_frame_slot",
    "encode_frame",
    "encode_frame_carried",
    "encode_frame_fit",
    "encode_frame_slot",
    "warm_start",
    "without_warm_start",
]

CODER_ID = "pred-v2"

_MAGIC = b"MZPF"
_VERSION = 2
_VERSION_CARRIED = 3  # version 2 coding, the model carried on from the frame before
_READABLE_VERSIONS = (1, 2, 3)  # every version ever written must stay decodable
_MODE_CONSTANT, _MODE_DIRECT, _MODE_PACKED, _MODE_RAW = 0, 1, 2, 3
_MAX_NN = 24  # predictor taps: the causal neighbours OFF in _pred.c
_MAX_K = 64
_PACK_FRACTION = 0.7
# A small frame's values are sparse by sampling alone (4,096 pixels of a 64x64 fMRI frame over
# 3,000 levels use a quarter of them), where ranks code worse than values (fMRI 5.7 %, 128x128
# T1 1.4 %, 80x80 DTI 2.1 % larger); a larger frame fills its levels unless a LUT or a gap
# left them empty. So up to this size ranks are tried only where the gaps are more than
# sampling leaves (_gappy), and then beside values.
_TRY_BOTH_PIXELS = 128 * 128
_DENSE_WINDOW, _DENSE_COUNT = 9, 18  # a level whose 9 neighbours hold 18 pixels is "dense"


def _gappy(img: npt.NDArray[np.uint16], lo: int, hi: int) -> bool:
    """Whether a small frame's unused levels are more than sampling leaves: over 30 % of
    its dense levels (a LUT or rescale skipped them) or a gap of a quarter of its range (two
    clusters of values). Integer counts only: the same frame decides the same everywhere.
    Measured on the small frames of ``../shared/data``: values coded smaller than ranks on
    every frame this calls not gappy."""
    counts = np.bincount((img - lo).ravel(), minlength=hi - lo + 1)
    total = np.concatenate(([0], np.cumsum(counts)))
    at = np.arange(counts.size)
    half = _DENSE_WINDOW // 2
    window = total[np.minimum(at + half + 1, counts.size)] - total[np.maximum(at - half, 0)]
    dense = window >= _DENSE_COUNT
    unused_dense = int(np.count_nonzero(dense & (counts == 0)))
    used = np.flatnonzero(counts)
    gap = int(np.diff(used).max()) - 1 if used.size > 1 else 0
    return 10 * unused_dense > 3 * int(np.count_nonzero(dense)) or 4 * gap >= counts.size


class CorruptStreamError(ValueError):
    """The stream is truncated, corrupted or not a predictive-coder stream."""


@dataclass(frozen=True)
class FlushSlot:
    """The 4 flush bytes of a stream's arithmetic coder and the final interval they lie in.

    Attributes
    ----------
    offset
        Byte offset of the flush bytes in the stream.
    low, high
        The coder's final interval ``[x1, x2]``: any value in it, written big-endian as the
        flush bytes, decodes to the same frame.
    value
        The value the flush bytes hold (``low`` as the encoder writes them).
    """

    offset: int
    low: int
    high: int
    value: int

    @property
    def capacity(self) -> int:
        """Bits the flush carries for free: ``floor(log2(high - low + 1))``."""
        return (self.high - self.low + 1).bit_length() - 1

    @property
    def carried(self) -> int:
        """The number the flush carries, ``value - low`` (0 as the encoder writes it)."""
        return self.value - self.low

    def flush_bytes(self, carried: int) -> bytes:
        """The 4 flush bytes that carry ``carried`` (``0 <= carried < 2**capacity``).

        Raises
        ------
        ValueError
            If ``carried`` does not fit in the slot's capacity.
        """
        if not 0 <= carried < 1 << self.capacity:
            raise ValueError(f"carried value must be in [0, 2**{self.capacity}), got {carried}")
        return struct.pack(">I", self.low + carried)


@dataclass(frozen=True, eq=False)
class Fit:
    """The predictors the encoder fitted to one frame: a warm-start hint for the next frame.

    A hint only steers the encoder's least-squares fit (it starts from these coefficients and
    solves once instead of three times): the stream stores its own coefficients, so decoding
    never needs the hint.  A hint that does not match the frame (another tap count or number of
    classes) is ignored.

    Attributes
    ----------
    coefficients
        ``(classes, taps)`` float coefficients per activity class, before quantisation.
    """

    coefficients: npt.NDArray[np.float64]


_Table = tuple[int, int, int, npt.NDArray[np.int32], npt.NDArray[np.int32]]
"""A predictor table: taps, classes, coefficient shift, thresholds, coefficients."""


@dataclass(eq=False)
class ModelState:
    """The adaptive model and predictor table a version-3 frame left
    (:func:`encode_frame_carried`), for the next frame of the object to start from;
    :data:`FRESH` before the first. Opaque: only the core reads the model, and it never
    leaves memory."""

    buffer: npt.NDArray[np.uint8] | None
    table: _Table | None = None

    def address(self) -> int | None:
        return None if self.buffer is None else _ptr(self.buffer)


FRESH = ModelState(None)


def _new_state() -> ModelState:
    return ModelState(np.empty(int(_core.load().mz_state_size()), np.uint8))


def continues_model(stream: bytes) -> bool:
    """Whether ``stream`` (one frame's, as :func:`encode_frame_carried` wrote it) starts from
    the model it was given: a version-3 stream with an arithmetic coder (modes 1 and 2)."""
    return (
        len(stream) > 14
        and stream[:4] == _MAGIC
        and stream[4] == _VERSION_CARRIED
        and stream[14] in (_MODE_DIRECT, _MODE_PACKED)
    )


def soften(state: ModelState, cap: int) -> ModelState:
    """A read-only copy of ``state`` whose probabilities count at most ``cap`` observations
    each (and bias accumulators as many): frames coded from it start with what it learned
    but adapt as fast as after ``cap`` bits (a prior, :mod:`.prior`). :data:`FRESH` stays
    fresh.

    Raises
    ------
    ValueError
        If ``cap`` is outside 1..1000 (the coder's own limit).
    """
    if not 1 <= cap <= 1000:
        raise ValueError(f"cap must be in 1..1000, got {cap}")
    if state.buffer is None:
        return state
    out = state.buffer.copy()
    _core.load().mz_state_soften(_ptr(out), cap)
    out.flags.writeable = False  # shared by every frame coded from it
    return ModelState(out, state.table)


@dataclass
class _Chain:
    """The fit of the frame last encoded inside a :func:`warm_start` block."""

    last: Fit | None = None


_chain: ContextVar[_Chain | None] = ContextVar("medzip_predictive_fit_chain", default=None)


@contextmanager
def warm_start() -> Iterator[None]:
    """Within the block, each frame encoded without an explicit hint is warm-started from the
    fit of the frame encoded before it in the same context (the frames of one multi-frame
    object, coded in order).

    The chain is per context (:mod:`contextvars`): frames coded concurrently must each run in
    their own context, in a fixed order, for the streams to be reproducible.
    """
    token = _chain.set(_Chain())
    try:
        yield
    finally:
        _chain.reset(token)


@contextmanager
def without_warm_start() -> Iterator[None]:
    """Within the block, frames are fitted cold and leave the :func:`warm_start` chain as it
    was (other parts coded between two frames, e.g. a learned split's high part, must not
    become the next frame's hint)."""
    token = _chain.set(None)
    try:
        yield
    finally:
        _chain.reset(token)


@dataclass(frozen=True)
class _Config:
    nn: int  # predictor taps
    K: int  # activity classes
    shift: int  # fixed-point fraction bits of the coefficients
    irls: int  # reweighting iterations of the fit


def _default_config(npix: int) -> _Config:
    # Side information (K * nn coefficients) must stay small against the payload.
    if npix >= 600_000:
        return _Config(nn=24, K=24, shift=12, irls=2)
    if npix >= 150_000:
        return _Config(nn=18, K=16, shift=12, irls=2)
    if npix >= 30_000:
        return _Config(nn=12, K=6, shift=10, irls=2)
    if npix >= 4_000:
        return _Config(nn=6, K=2, shift=9, irls=2)
    return _Config(nn=4, K=1, shift=8, irls=1)


def _ptr(a: np.ndarray) -> int:
    """The address of a C-contiguous array's data, for a pointer argument of the core (a plain
    address: typed ctypes pointers cost microseconds each, which shows on small frames)."""
    return a.ctypes.data


_WARM_SOLVES = 1  # least-squares solves of a warm-started fit (a cold one does irls + 1)


def _fit(
    img: npt.NDArray[np.uint16], cfg: _Config, hint: Fit | None = None, max_samples: int = 70_000
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], Fit | None]:
    """Choose class thresholds and fit one integer predictor per class (encoder only); also
    the fit as a hint for the next frame (``None`` for a frame too small to fit)."""
    lib = _core.load()
    H, W = img.shape
    nn = cfg.nn
    default = np.zeros(nn)
    default[:3] = [0.75, 0.75, -0.5] if nn >= 3 else [1.0 / nn] * nn
    if H < 2 or W < 2:
        q = np.round(default * (1 << cfg.shift)).astype(np.int32)
        return np.zeros(0, np.int32), q[None], None
    # a regular subsample of the pixels with a full neighbourhood keeps the fit cheap (70k
    # samples instead of 100k: 10 % faster encoding of large frames, streams 0.02 % larger)
    step = -(-(H - 1) * (W - 1) // max_samples)
    coefs = np.empty((cfg.K, nn))
    hint_k = 0
    if hint is not None and hint.coefficients.shape[1] == nn and len(hint.coefficients) <= cfg.K:
        hint_k = len(hint.coefficients)  # used only if the frame has as many classes
        coefs[:hint_k] = hint.coefficients
    thr = np.empty(cfg.K, np.int32)
    K = lib.mz_fit(
        _ptr(img),
        H,
        W,
        step,
        nn,
        cfg.K,
        hint_k,
        cfg.irls + 1,
        _WARM_SOLVES,
        _ptr(default),
        _ptr(coefs),
        _ptr(thr),
    )
    if K < 1:
        raise MemoryError(f"predictive core: no memory to fit a {H}x{W} frame (code {K})")
    thr, coefs = thr[: K - 1], coefs[:K]
    q = np.clip(np.round(coefs * (1 << cfg.shift)), -(1 << 24), 1 << 24)
    return thr, q.astype(np.int32), Fit(coefs)


def _encode_body(
    img: npt.NDArray[np.uint16],
    bits: int,
    final: npt.NDArray[np.uint32],
    cfg: _Config | None = None,
    version: int = _VERSION,
    hint: Fit | None = None,
    start: ModelState = FRESH,
    end: ModelState | None = None,
    fresh_cost: int | None = None,
) -> tuple[bytes, Fit | None, int]:
    """Modes 1 and 2 body, the fit and the body's version; ``final`` receives the coder's
    final interval ``x1, x2``; a version-3 model starts from ``start`` and leaves its state in
    ``end``, and the frame reuses the previous frame's predictor table where that codes it
    smaller. With ``fresh_cost`` the frame is also coded from a fresh model (version 2, the
    same table) and keeps that unless it is larger by more than ``fresh_cost`` bytes (``end``
    is then not written: the next frame starts from ``start``)."""
    H, W = img.shape
    if cfg is None:
        cfg = _default_config(H * W)
    thr, coef, fit = _fit(img, cfg, hint)
    fitted: _Table = (cfg.nn, thr.size + 1, cfg.shift, thr, coef)
    table = fitted
    body = _code(img, bits, final, version, table, start, end, stored=True)
    if version >= _VERSION_CARRIED and start.table is not None and end is not None:
        again = np.zeros(2, np.uint32)
        other = ModelState(np.empty_like(end.buffer))
        reused = _code(img, bits, again, version, start.table, start, other, stored=False)
        if len(reused) < len(body):
            body, table = reused, start.table
            final[:] = again
            np.copyto(end.buffer, other.buffer)  # type: ignore[arg-type]
    if fresh_cost is not None and version >= _VERSION_CARRIED and start.buffer is not None:
        again = np.zeros(2, np.uint32)
        fresh = _code(img, bits, again, _VERSION, fitted, FRESH, None, stored=True)
        if len(fresh) <= len(body) + fresh_cost:  # (the next frame starts from ``start``)
            final[:] = again
            return fresh, fit, _VERSION
    if end is not None:
        end.table = table
    return body, fit, version


def _code(
    img: npt.NDArray[np.uint16],
    bits: int,
    final: npt.NDArray[np.uint32],
    version: int,
    table: _Table,
    start: ModelState,
    end: ModelState | None,
    stored: bool,
) -> bytes:
    """The body coded with ``table``, stored in it (``stored``) or, version 3, taken from
    the frame before (an empty table)."""
    lib = _core.load()
    H, W = img.shape
    nn, K, shift, thr, coef = table
    cap = H * W * 3 + 4096
    out = np.empty(cap, np.uint8)
    n = lib.mz_encode(
        version,
        _ptr(img),
        H,
        W,
        bits,
        nn,
        K,
        shift,
        _ptr(thr),
        _ptr(coef),
        _ptr(out),
        cap,
        _ptr(final),
        start.address(),
        None if end is None else end.address(),
    )
    if n < 0:
        raise RuntimeError(f"predictive core failed to encode (code {n})")
    params = b""
    if stored:
        params = zlib.compress(thr.astype("<i4").tobytes() + coef.astype("<i4").tobytes(), 9)
    return (
        struct.pack("<BBBBI", bits, nn, K, shift, len(params))
        + params
        + struct.pack("<I", n)
        + out[:n].tobytes()
    )


def _pack_raw(img: npt.NDArray[np.uint16], bits: int) -> bytes:
    planes = np.unpackbits(img.astype(">u2").view(np.uint8).reshape(-1, 2), axis=1)
    return np.packbits(planes[:, 16 - bits :]).tobytes()


def _unpack_raw(blob: bytes, H: int, W: int, bits: int) -> npt.NDArray[np.uint16]:
    planes = np.unpackbits(np.frombuffer(blob, np.uint8))[: H * W * bits].reshape(H * W, bits)
    full = np.zeros((H * W, 16), np.uint8)
    full[:, 16 - bits :] = planes
    return np.packbits(full, axis=1).view(">u2").reshape(H, W).astype(np.uint16)


def check_core() -> None:
    """Load the C core now, so a broken install fails at start (``medzip serve``, ``worker``,
    ``codec``) rather than at the first frame.

    Raises
    ------
    CoreUnavailableError
        If the core is not built, does not load or is stale (the message says what to do).
    """
    _core.load()


def encode_frame(frame: npt.NDArray[np.integer], bits: int, hint: Fit | None = None) -> bytes:
    """Encode one 2-D frame losslessly (:func:`encode_frame_slot` without the slot)."""
    return _encode(frame, bits, hint)[0]


def encode_frame_carried(
    frame: npt.NDArray[np.integer], bits: int, start: ModelState, fresh_cost: int | None = None
) -> tuple[bytes, FlushSlot | None, ModelState]:
    """Encode one frame of a multi-frame object as a version-3 stream whose model starts from
    ``start`` (:data:`FRESH` for the first frame, else what the previous frame's call
    returned, or a prior's state); returns the stream, its flush slot and the state the next
    frame starts from (``start`` itself when the frame needed no model: constant or raw).

    With ``fresh_cost`` (what starting from ``start`` costs elsewhere, e.g. a prior's entry in
    a blob's model table) the frame is a version-2 stream from a fresh model where that is
    not larger by more than ``fresh_cost`` bytes (:func:`continues_model` tells), and the next
    frame starts from ``start``."""
    end = _new_state()
    stream, slot, _ = _encode(frame, bits, None, start, end, fresh_cost)
    return stream, slot, end if continues_model(stream) else start


def encode_frame_fit(
    frame: npt.NDArray[np.integer], bits: int, hint: Fit | None = None
) -> tuple[bytes, Fit | None]:
    """Encode one 2-D frame losslessly and return its fit, the hint for the next frame.

    ``encode_frame_fit(f1, bits, encode_frame_fit(f0, bits)[1])`` codes ``f1`` with a fit
    warm-started from ``f0``'s (:class:`Fit`).  The fit is ``None`` for frames that need none
    (constant, tiny).  See :func:`encode_frame_slot` for the parameters.
    """
    stream, _, fit = _encode(frame, bits, hint)
    return stream, fit


def encode_frame_slot(
    frame: npt.NDArray[np.integer], bits: int, hint: Fit | None = None
) -> tuple[bytes, FlushSlot | None]:
    """Encode one 2-D frame losslessly.

    Parameters
    ----------
    frame : ndarray of integers, shape (rows, columns)
        Pixel values in ``[0, 2**bits)``; signed data must be shifted by the caller.
    bits : int
        Bits stored, 1..16 (DICOM PS3.3 C.7.6.3.1, Bits Stored).
    hint : Fit, optional
        A similar frame's fit to warm-start the encoder's predictor fit from (faster, the
        stream nearly as small); without one, inside :func:`warm_start` the fit of the frame
        encoded before.  Decoding never needs it.

    Returns
    -------
    tuple of bytes and FlushSlot or None
        A self-delimiting stream (``decode_frame(stream, frame.shape, bits)`` returns the frame)
        and, for modes 1 and 2, the coder's flush as the encoder left it.

    Raises
    ------
    ValueError
        If ``frame`` is not a non-empty 2-D integer array, ``bits`` is outside 1..16 or a value
        lies outside ``[0, 2**bits)``.
    """
    stream, slot, _ = _encode(frame, bits, hint)
    return stream, slot


def _encode(
    frame: npt.NDArray[np.integer],
    bits: int,
    hint: Fit | None,
    start: ModelState | None = None,
    end: ModelState | None = None,
    fresh_cost: int | None = None,
) -> tuple[bytes, FlushSlot | None, Fit | None]:
    """``(stream, flush slot, fit)``; keeps the fit in the :func:`warm_start` chain. With
    ``start`` a version-3 stream, its model starting there and its end state in ``end``
    (``fresh_cost``: see :func:`encode_frame_carried`)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    bits = int(bits)
    arr = np.asarray(frame)
    if arr.ndim != 2:
        raise ValueError(f"frame must be 2-D (rows, columns), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"frame must have an integer dtype, got {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"frame must not be empty, got shape {arr.shape}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(
            f"frame values must lie in [0, {(1 << bits) - 1}] for bits={bits}, got [{lo}, {hi}]; "
            "shift signed data by 2**(bits-1) first"
        )
    chain = _chain.get()
    if hint is None and chain is not None:
        hint = chain.last
    img = np.ascontiguousarray(arr, dtype=np.uint16)
    H, W = img.shape
    version = _VERSION if start is None else _VERSION_CARRIED
    final = np.zeros(2, np.uint32)
    fit = None
    if lo == hi:
        body = struct.pack("<BH", _MODE_CONSTANT, lo)
    else:
        used = np.bincount((img - lo).ravel(), minlength=hi - lo + 1) > 0  # no sort: a count
        n_values = int(np.count_nonzero(used))
        small = H * W <= _TRY_BOTH_PIXELS
        pack = n_values <= _PACK_FRACTION * (hi - lo + 1) and (not small or _gappy(img, lo, hi))
        tries: list[tuple[bytes, Fit | None, npt.NDArray[np.uint32], ModelState | None, int]] = []

        def attempt(mode: bytes, values: npt.NDArray[np.uint16], nbits: int) -> None:
            fin = np.zeros(2, np.uint32)
            state = None if end is None else ModelState(np.empty_like(end.buffer))
            kw = {} if start is None else {"version": version, "start": start, "end": state}
            coded, f, v = _encode_body(values, nbits, fin, hint=hint, fresh_cost=fresh_cost, **kw)
            tries.append((mode + coded, f, fin, state, v))

        if pack:
            table = zlib.compress(np.packbits(used).tobytes(), 9)
            rank_bits = max(1, (n_values - 1).bit_length())
            rank_of = (np.cumsum(used, dtype=np.int64) - 1).astype(np.uint16)
            mode = struct.pack("<BHHI", _MODE_PACKED, lo, hi, len(table)) + table
            attempt(mode, rank_of[img - lo], rank_bits)
        if not pack or small:
            attempt(struct.pack("<B", _MODE_DIRECT), img, bits)
        carried_cost = fresh_cost or 0  # what a stream that continues ``start`` costs besides
        body, fit, fin, state, version = min(
            tries, key=lambda t: len(t[0]) + (carried_cost if t[4] >= _VERSION_CARRIED else 0)
        )
        final[:] = fin
        if end is not None and state is not None and version >= _VERSION_CARRIED:
            np.copyto(end.buffer, state.buffer)  # type: ignore[arg-type]
            end.table = state.table
        if (H * W * bits + 7) // 8 + 1 < len(body):  # incompressible (noise): store the bits
            body = struct.pack("<B", _MODE_RAW) + _pack_raw(img, bits)
    if chain is not None and fit is not None:
        chain.last = fit
    crc = zlib.crc32(img.astype("<u2").tobytes())
    head = _MAGIC + struct.pack("<BBII", version, bits, H, W)
    stream = head + body + struct.pack("<I", crc)
    if body[0] not in (_MODE_DIRECT, _MODE_PACKED):
        return stream, None, fit
    low, high = int(final[0]), int(final[1])
    return stream, FlushSlot(len(stream) - 8, low, high, low), fit


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise CorruptStreamError(
                f"predictive stream truncated: needed {size} more bytes at offset {self.pos}, "
                f"stream has {len(self.data)}"
            )
        vals = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return vals

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CorruptStreamError(
                f"predictive stream truncated: a field of {n} bytes at offset {self.pos} runs "
                f"past the end ({len(self.data)} bytes)"
            )
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b


def _inflate(blob: bytes, what: str) -> bytes:
    try:
        return zlib.decompress(blob)
    except zlib.error as exc:
        raise CorruptStreamError(f"predictive stream: corrupted {what} ({exc})") from exc


def _decode_body(
    rd: _Reader,
    H: int,
    W: int,
    max_bits: int,
    version: int,
    start: ModelState = FRESH,
    end: ModelState | None = None,
) -> tuple[npt.NDArray[np.uint16], FlushSlot | None]:
    """Modes 1 and 2 body; the slot is ``None`` when the coder did not end on the stream's
    last 4 arithmetic-coded bytes (never for a stream the encoder wrote)."""
    lib = _core.load()
    cbits, nn, K, shift = rd.unpack("<BBBB")
    if not (
        1 <= cbits <= max_bits and 1 <= nn <= _MAX_NN and 1 <= K <= _MAX_K and 5 <= shift <= 24
    ):
        raise CorruptStreamError(
            f"predictive stream: invalid coder parameters bits={cbits} nn={nn} K={K} shift={shift}"
        )
    (plen,) = rd.unpack("<I")
    if plen == 0 and version >= _VERSION_CARRIED:  # the table of the frame before
        if start.table is None or start.table[:3] != (nn, K, shift):
            raise CorruptStreamError(
                "predictive stream reuses the predictor table of the frame before it, "
                "which has none of that shape"
            )
        thr, coef = start.table[3], start.table[4]
    else:
        params = _inflate(rd.take(plen), "predictor table")
        if len(params) != 4 * (K - 1 + K * nn):
            raise CorruptStreamError(
                f"predictive stream: predictor table has {len(params)} bytes, expected "
                f"{4 * (K - 1 + K * nn)}"
            )
        tab = np.frombuffer(params, "<i4").astype(np.int32)
        thr, coef = np.ascontiguousarray(tab[: K - 1]), np.ascontiguousarray(tab[K - 1 :])
    if end is not None:
        end.table = (nn, K, shift, thr, coef)
    (n,) = rd.unpack("<I")
    payload = np.frombuffer(rd.take(n), np.uint8).copy()
    img = np.empty((H, W), np.uint16)
    final = np.zeros(3, np.uint32)
    rc = lib.mz_decode(
        version,
        _ptr(payload),
        n,
        H,
        W,
        cbits,
        nn,
        K,
        shift,
        _ptr(thr),
        _ptr(coef),
        _ptr(img),
        _ptr(final),
        start.address(),
        None if end is None else end.address(),
    )
    if rc != 0:
        raise CorruptStreamError(f"predictive stream: payload does not decode (core code {rc})")
    low, high, value = (int(v) for v in final)
    if n < 4 or value != int.from_bytes(payload[-4:].tobytes(), "big") or not low <= value <= high:
        return img, None
    return img, FlushSlot(rd.pos - 4, low, high, value)


def decode_frame(data: bytes, shape: tuple[int, int], bits: int) -> npt.NDArray[np.uint16]:
    """Decode a stream written by :func:`encode_frame`.

    Parameters
    ----------
    data : bytes
        The stream.
    shape : tuple of int
        Expected (rows, columns); must match the stream.
    bits : int
        Expected bits stored; must match the stream.

    Returns
    -------
    ndarray of uint16, shape ``shape``
        The frame (:func:`decode_frame_slot` also reports the coder's flush).

    Raises
    ------
    CorruptStreamError (a ValueError)
        If the stream is truncated, corrupted (CRC-32 of the decoded pixels differs), of an
        unknown version, or does not match ``shape`` and ``bits``.
    """
    return _decode(data, shape, bits)[0]


def decode_frame_carried(
    data: bytes, shape: tuple[int, int], bits: int, start: ModelState
) -> tuple[npt.NDArray[np.uint16], FlushSlot | None, ModelState]:
    """Decode one frame of a multi-frame object (any version): a version-3 stream's model
    starts from ``start``, what the previous frame's call returned (:data:`FRESH` for the
    first). Returns the frame, its flush slot (as :func:`decode_frame_slot`) and the state the
    next frame starts from (``start`` itself after a frame that carried no model).

    Raises
    ------
    CorruptStreamError (a ValueError)
        As :func:`decode_frame_slot`.
    """
    img, mode, slot, end = _decode(data, shape, bits, start)
    if mode in (_MODE_DIRECT, _MODE_PACKED) and slot is None:
        raise CorruptStreamError(
            "predictive stream: the arithmetic coder does not end on its 4 flush bytes"
        )
    return img, slot, start if end is None else end


def decode_frame_slot(
    data: bytes, shape: tuple[int, int], bits: int
) -> tuple[npt.NDArray[np.uint16], FlushSlot | None]:
    """Decode a stream and report the flush of its arithmetic coder.

    Returns
    -------
    tuple of ndarray of uint16 and FlushSlot or None
        The frame and, for modes 1 and 2, the slot (its ``value`` as read from the stream);
        ``None`` for modes 0 and 3, which have no arithmetic coder.

    Raises
    ------
    CorruptStreamError (a ValueError)
        As :func:`decode_frame`, and if the coder did not end on the stream's last 4
        arithmetic-coded bytes inside its final interval.
    """
    img, mode, slot, _ = _decode(data, shape, bits)
    if mode in (_MODE_DIRECT, _MODE_PACKED) and slot is None:
        raise CorruptStreamError(
            "predictive stream: the arithmetic coder does not end on its 4 flush bytes"
        )
    return img, slot


def _decode(
    data: bytes,
    shape: tuple[int, int],
    bits: int,
    start: ModelState | None = None,
) -> tuple[npt.NDArray[np.uint16], int, FlushSlot | None, ModelState | None]:
    """``(frame, mode, flush slot, the state its model left)``; the slot as
    :func:`_decode_body` reports it. A version-3 stream needs ``start`` (the model state it
    continues); the state is None for a stream that carried no model (another version, or a
    mode without a coder)."""
    rd = _Reader(bytes(data))
    magic = rd.take(4)
    if magic != _MAGIC:
        raise CorruptStreamError(
            f"not a predictive-coder stream: magic {magic!r}, expected {_MAGIC!r}"
        )
    version, sbits, H, W = rd.unpack("<BBII")
    if version not in _READABLE_VERSIONS:
        raise CorruptStreamError(
            f"predictive stream version {version} is not supported "
            f"(this build reads {_READABLE_VERSIONS})"
        )
    exp = (tuple(int(s) for s in shape), int(bits))
    if version == _VERSION_CARRIED and start is None:
        raise CorruptStreamError(
            "predictive stream continues the model of the frame before it: decode the "
            "object's frames in order (decode_frame_carried)"
        )
    end = _new_state() if version == _VERSION_CARRIED else None
    carried = {} if start is None else {"start": start, "end": end}
    if ((H, W), sbits) != exp:
        raise CorruptStreamError(
            f"predictive stream holds a {H}x{W} frame of {sbits} bits, "
            f"expected {exp[0][0]}x{exp[0][1]} of {exp[1]} bits"
        )
    if H < 1 or W < 1 or not 1 <= sbits <= 16:
        raise CorruptStreamError(f"predictive stream: invalid header {H}x{W}, {sbits} bits")
    (mode,) = rd.unpack("<B")
    slot = None
    if mode == _MODE_CONSTANT:
        (v,) = rd.unpack("<H")
        img = np.full((H, W), v, np.uint16)
    elif mode == _MODE_DIRECT:
        img, slot = _decode_body(rd, H, W, sbits, version, **carried)
    elif mode == _MODE_PACKED:
        lo, hi, tlen = rd.unpack("<HHI")
        used = np.unpackbits(np.frombuffer(_inflate(rd.take(tlen), "value table"), np.uint8))
        if hi < lo or used.size < hi - lo + 1:
            raise CorruptStreamError("predictive stream: corrupted value table")
        lut = (np.flatnonzero(used[: hi - lo + 1].view(bool)) + lo).astype(np.uint16)
        ranks, slot = _decode_body(rd, H, W, 16, version, **carried)
        if lut.size == 0 or int(ranks.max()) >= lut.size:
            raise CorruptStreamError("predictive stream: value rank outside the value table")
        img = lut[ranks]
    elif mode == _MODE_RAW:
        img = _unpack_raw(rd.take((H * W * sbits + 7) // 8), H, W, sbits)
    else:
        raise CorruptStreamError(f"predictive stream: unknown mode {mode}")
    (crc,) = rd.unpack("<I")
    if rd.pos != len(rd.data):
        raise CorruptStreamError(
            f"predictive stream has {len(rd.data) - rd.pos} unexpected trailing bytes"
        )
    if int(img.max()) >= 1 << sbits:
        raise CorruptStreamError(f"predictive stream decodes to values above {sbits} bits")
    if zlib.crc32(img.astype("<u2").tobytes()) != crc:
        raise CorruptStreamError("predictive stream: CRC-32 of the decoded pixels does not match")
    return img, mode, slot, end if mode in (_MODE_DIRECT, _MODE_PACKED) else None
