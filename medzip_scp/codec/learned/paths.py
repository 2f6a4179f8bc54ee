"""Container integration of the dual-path learned codec: choosing and coding split frames.

A single-sample frame whose (offset) values have ``nbits`` bits (2..16) may be coded split at
bit plane ``s`` (1..4, ``s < nbits``): the high part ``values >> s`` by the better of ``pred``
(pred-v2) and the global path (bits-back latent model), the low part ``values & (2**s - 1)`` by
the local path (transformer LM over low planes, prompted with the decoded high part).

Which split is tried (the rule)
-------------------------------
The caller has already coded the frame whole (``s = 0``) with every classical path and knows
the smallest verified size ``C0``. The local path codes ~0.1 MPx/s, so it runs only where a
cheap estimate says a split can beat ``C0``:

1. **Headroom screen (no network).** For each candidate ``s``, pred-v2 codes the high part
   (fast; these bytes are reused if the split is chosen). The low part can only win if
   ``C0 - pred(high_s) > LOW_FLOOR * s * pixels``: the local path has never coded held-out
   low planes below ~0.74 bit per low bit (``models/local-lm/v1/CARD.md``); the floor
   (0.70) sits under that, so the screen only drops splits that cannot win.
2. **Sampled estimate.** For the surviving ``s``, the local path's ideal code length
   (``estimate_bits``, one batched network pass) on horizontal bands of 16 rows (one tile
   row) spread evenly over the frame (at most ``SAMPLE_PIXELS`` = 65,536 pixels; the whole
   frame when it is smaller), scaled to the frame. The ``s`` with the smallest estimated
   total (pred-v2 high bytes + low estimate) is kept, and only when that total promises a
   gain of at least ``MIN_ESTIMATED_GAIN`` = 0.25 % over ``C0``: a split frame encodes and
   decodes ~20-50x slower than pred-v2 (local path ~0.1 MPx/s), which a smaller gain does
   not pay for, and the band sample's error is of that order.
3. **Real coding, verified.** The kept ``s`` is coded for real: the high part by pred-v2 and
   by the global path (carrying the payload when one is given and it fits), the low part by
   the local path; every stream is decoded and compared before it may be chosen, and the
   split is chosen only when its real, verified size is below ``C0`` (the caller compares).

Determinism: the estimates decide only which split is *tried*; the bytes of every stream are
deterministic, and decoding never depends on the estimates, thread counts or batch sizes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medzip_scp.codec.container import ModelRef
from medzip_scp.codec.errors import CodecError, CorruptStreamError, UnknownModelError
from medzip_scp.codec.learned import bitplanes
from medzip_scp.codec.paths import get_path
from medzip_scp.codec.zoo import ModelStore

__all__ = [
    "GLOBAL_PATH",
    "HIGH_PATHS",
    "LOCAL_PATH",
    "LOW_FLOOR",
    "LearnedOptions",
    "SplitCode",
    "decode_split",
    "encode_split",
    "learned_available",
]

log = logging.getLogger(__name__)

GLOBAL_PATH = "global"
"""Path id of the global (bits-back latent model) path for the high part."""
LOCAL_PATH = "local"
"""Path id of the local (transformer LM) path for the low part."""
HIGH_PATHS = ("pred", GLOBAL_PATH)
LOW_FLOOR = 0.70
"""Screen: the fewest bits per low bit the local path is assumed to ever need."""
SAMPLE_PIXELS = 65536
"""At most this many pixels go through the network for the sampled estimate."""
MIN_ESTIMATED_GAIN = 0.0025
"""A split is coded for real only when its estimate is below ``(1 - MIN_ESTIMATED_GAIN) * C0``."""
_BAND = 16
_S_MAX = 4
_LOCAL_OVERHEAD_BITS = 8 * 64  # stream header, chunk table, CRC


@dataclass(frozen=True)
class LearnedOptions:
    """How :func:`medzip_scp.codec.api.compress` tries learned split frames.

    Attributes
    ----------
    splits
        Split planes ``s`` to consider (each 1..4; those ``>= nbits`` are skipped).
    high_paths
        Paths tried for the high part: ``"pred"`` and/or ``"global"``.
    local_model, local_adapter
        Registry id of the local-path model and the adapter to merge (``""``: none).
    global_model
        Registry id of the global-path model.
    force_split
        Testing and benchmarks: code every eligible frame split at exactly this ``s``,
        skipping the screen and the comparison with the classical paths (every stream is
        still verified). ``None`` (default): choose by measured cost.
    chunk_tiles
        Tiles per independent ANS chunk of the local path (recorded in its stream).
    threads
        Network threads while coding (BLAS threads for the integer models, torch's for
        ``local-lm-v1``; ``None``: leave the process setting); never
        changes the bytes.
    """

    splits: tuple[int, ...] = (1, 2, 3, 4)
    high_paths: tuple[str, ...] = HIGH_PATHS
    local_model: str = "local-lm-v2"
    local_adapter: str = ""
    global_model: str = "global-vae-v2"
    force_split: int | None = None
    chunk_tiles: int = 1024
    threads: int | None = 1

    def __post_init__(self) -> None:
        for s in (*self.splits, *([self.force_split] if self.force_split is not None else [])):
            if not 1 <= s <= _S_MAX:
                raise ValueError(f"split planes must be in 1..{_S_MAX}, got {s}")
        bad = [p for p in self.high_paths if p not in HIGH_PATHS]
        if bad or not self.high_paths:
            raise ValueError(f"high_paths must be a non-empty subset of {HIGH_PATHS}, got {bad}")


@dataclass
class SplitCode:
    """A verified split coding of one frame.

    ``cost`` is what it adds to the blob: high + low bytes, minus the payload bytes it carries
    (those would otherwise be stored in the ``PAYLOAD`` section).
    """

    s: int
    high_path: str
    high_ref: ModelRef | None
    high_data: bytes
    low_ref: ModelRef
    low_data: bytes
    carries_payload: bool
    estimates: dict[int, float] = field(default_factory=dict)

    def cost(self, payload_len: int) -> int:
        return (
            len(self.high_data) + len(self.low_data) - (payload_len if self.carries_payload else 0)
        )


def learned_available(store: ModelStore, options: LearnedOptions) -> bool:
    """Whether the models ``options`` names are installed. The integer models (the defaults)
    need numpy alone; a float ``local-lm-v1`` also needs torch and transformers, which loading
    it checks (:class:`~medzip_scp.codec.errors.IncompatibleLibraryError`)."""
    needed = [options.local_model]
    if GLOBAL_PATH in options.high_paths:
        needed.append(options.global_model)
    return all(store.installed(m) for m in needed)


def _pred_encode(high: npt.NDArray[np.uint16], bits: int) -> bytes | None:
    path = get_path("pred")
    assert path is not None
    return path.encode(high[..., None], bits)


def _pred_decode(data: bytes, shape: tuple[int, int], bits: int) -> npt.NDArray[np.uint16]:
    path = get_path("pred")
    assert path is not None
    return np.asarray(path.decode(data, (shape[0], shape[1], 1), bits))[..., 0]


def _sampled_low_bits(
    low: npt.NDArray[np.uint16],
    high: npt.NDArray[np.uint16],
    s: int,
    nbits: int,
    model: Any,
    threads: int | None,
) -> float:
    from medzip_scp.codec.learned import local_path

    rows, cols = low.shape
    if rows * cols <= SAMPLE_PIXELS or rows <= 4 * _BAND:
        return local_path.estimate_bits(low, high, s, nbits, model, threads=threads)
    n_bands = max(1, min(rows // (2 * _BAND), SAMPLE_PIXELS // (_BAND * cols)))
    total = 0.0
    px = 0
    for k in range(n_bands):
        y0 = int((k + 0.5) * rows / n_bands) - _BAND // 2
        y0 = max(0, min(rows - _BAND, y0 - y0 % 16))
        sl = slice(y0, y0 + _BAND)
        total += local_path.estimate_bits(low[sl], high[sl], s, nbits, model, threads=threads)
        px += _BAND * cols
    return total * (rows * cols) / px


def encode_split(
    values: npt.NDArray[np.unsignedinteger],
    nbits: int,
    budget: int | None,
    options: LearnedOptions,
    store: ModelStore,
    payload: bytes = b"",
) -> SplitCode | None:
    """Try to code a ``(rows, cols)`` frame split (see the module docstring for the rule).

    Parameters
    ----------
    values
        2-D non-negative values below ``2**nbits``.
    nbits
        Their bit depth (2..16).
    budget
        ``C0``: the blob bytes of the best verified classical coding (including, when a
        payload is given, the payload bytes the ``PAYLOAD`` section would hold). ``None``
        only with ``options.force_split``.
    payload
        Payload to try to carry in the global path's bits-back initial bits (empty: none).

    Returns
    -------
    SplitCode or None
        A verified split coding (its ``cost`` below ``budget`` unless forced), or ``None``.

    Raises
    ------
    UnknownModelError
        If a model ``options`` names is not registered or not installed.
    """
    from medzip_scp.codec.learned import global_path, local_path

    rows, cols = values.shape
    npix = rows * cols
    forced = options.force_split is not None
    cands = [options.force_split] if forced else list(options.splits)
    cands = [s for s in cands if s is not None and 1 <= s <= min(_S_MAX, nbits - 1)]
    if not cands or npix == 0:
        return None
    v = np.ascontiguousarray(values, dtype=np.uint16)
    budget_bits = None if budget is None else 8.0 * budget
    # 1. headroom screen
    parts: dict[int, tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16], bytes | None]] = {}
    for s in cands:
        high, low = bitplanes.split(v, nbits, s)
        hb = _pred_encode(high, nbits - s) if "pred" in options.high_paths else None
        if not forced and budget_bits is not None:
            high_bits = 8.0 * len(hb) if hb is not None else 0.0
            if budget_bits - high_bits <= LOW_FLOOR * s * npix:
                continue
        parts[s] = (high, low, hb)
    if not parts:
        return None
    # 2. sampled estimate with the local model
    local_entry = store.entry(options.local_model)
    local_ref = local_entry.ref(options.local_adapter)
    lmodel = store.load(local_ref)
    est: dict[int, float] = {}
    for s, (high, low, hb) in parts.items():
        high_bits = 8.0 * len(hb) if hb is not None else 8.0 * npix * (nbits - s)
        est[s] = (
            high_bits
            + _LOCAL_OVERHEAD_BITS
            + _sampled_low_bits(low, high, s, nbits, lmodel, options.threads)
        )
    s = min(est, key=lambda k: (est[k], k))
    if not forced and budget_bits is not None and est[s] >= (1 - MIN_ESTIMATED_GAIN) * budget_bits:
        return None
    high, low, hb = parts[s]
    # 3. real coding; high candidates verified in size order
    hcands: list[tuple[int, int, str, bytes, ModelRef | None, bool]] = []
    if hb is not None:
        hcands.append((len(hb), 0, "pred", hb, None, False))
    gref: ModelRef | None = None
    if GLOBAL_PATH in options.high_paths:
        gref = store.entry(options.global_model).ref()
        gmodel = store.load(gref)
        carried = False
        gdata = None
        if payload:
            try:
                gdata = global_path.encode_high(high, nbits - s, gmodel, payload, strict=True)
                carried = True
            except global_path.PayloadTooLargeError:
                gdata = None
        if gdata is None:
            gdata = global_path.encode_high(high, nbits - s, gmodel)
        hcands.append(
            (len(gdata) - (len(payload) if carried else 0), 1, GLOBAL_PATH, gdata, gref, carried)
        )
    hcands.sort(key=lambda c: (c[0], c[1]))
    chosen = None
    for hcost, _, name, data, ref, carried in hcands:
        if not forced and budget_bits is not None and 8.0 * hcost >= budget_bits:
            break  # the high part alone already loses to s = 0
        try:
            if name == "pred":
                back = _pred_decode(data, (rows, cols), nbits - s)
                back_payload = b""
            else:
                back, back_payload = global_path.decode_high(data, (rows, cols), nbits - s, gmodel)
        except (CodecError, ValueError) as exc:
            log.warning("high path %s failed verification (%s)", name, type(exc).__name__)
            continue
        if np.array_equal(back, high) and back_payload == (payload if carried else b""):
            chosen = (hcost, name, data, ref, carried)
            break
    if chosen is None:
        return None
    hcost, hname, hdata, href, carried = chosen
    low_data = local_path.encode_low(
        low, high, s, nbits, lmodel, chunk_tiles=options.chunk_tiles, threads=options.threads
    )
    if not forced and budget is not None and hcost + len(low_data) >= budget:
        return None  # the real size says s = 0 wins: no need to verify the slow decode
    try:
        back_low = local_path.decode_low(low_data, high, s, nbits, lmodel, threads=options.threads)
    except CodecError as exc:
        log.warning("local path failed verification (%s)", type(exc).__name__)
        return None
    if not np.array_equal(back_low, low):
        return None
    return SplitCode(s, hname, href, hdata, local_ref, low_data, carried, est)


def decode_split(
    high_path: str,
    high_data: bytes,
    high_ref: ModelRef | None,
    low_path: str,
    low_data: bytes,
    low_ref: ModelRef | None,
    shape: tuple[int, int],
    nbits: int,
    s: int,
    store: ModelStore,
    *,
    threads: int | None = 1,
    batch_chunks: int = 4,
) -> tuple[npt.NDArray[np.uint16], bytes | None]:
    """Decode a split frame: ``(values, payload)``; payload is ``None`` unless the global path
    carried one.

    Raises
    ------
    UnknownModelError
        If a model is not registered or not installed.
    CorruptStreamError
        If a stream does not decode or the records are inconsistent.
    """
    if not 1 <= s <= _S_MAX or s >= nbits:
        raise CorruptStreamError(f"split planes must be in 1..min(4, nbits - 1), got s={s}")
    if low_path != LOCAL_PATH or low_ref is None:
        raise CorruptStreamError(f"low path must be {LOCAL_PATH!r} with a model, got {low_path!r}")
    payload: bytes | None = None
    if high_path == "pred":
        if high_ref is not None:
            raise CorruptStreamError("high path 'pred' takes no model")
        try:
            high = _pred_decode(high_data, shape, nbits - s)
        except Exception as exc:
            raise CorruptStreamError(f"high path 'pred' failed ({type(exc).__name__})") from None
    elif high_path == GLOBAL_PATH:
        if high_ref is None:
            raise CorruptStreamError("high path 'global' needs a model")
        from medzip_scp.codec.learned import global_path

        gmodel = store.load(high_ref)
        high, payload = global_path.decode_high(high_data, shape, nbits - s, gmodel)
    else:
        raise CorruptStreamError(f"high path must be one of {HIGH_PATHS}, got {high_path!r}")
    from medzip_scp.codec.learned import local_path

    lmodel = store.load(low_ref)
    try:
        low = local_path.decode_low(
            low_data, high, s, nbits, lmodel, batch_chunks=batch_chunks, threads=threads
        )
    except (UnknownModelError, CorruptStreamError):
        raise
    except ValueError as exc:
        raise CorruptStreamError(f"low path failed ({exc})") from None
    return bitplanes.join(high, low, s), payload
