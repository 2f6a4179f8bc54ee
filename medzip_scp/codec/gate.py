"""Which candidates a frame tries beyond ``pred`` and ``jpegls``: a gate on cheap statistics.

By default (:func:`medzip_scp.codec.api.compress` with ``paths=None``) every frame tries
``pred`` and ``jpegls`` (about 50 MPx/s, a few % of ``pred``'s time); :func:`extra_candidates`
adds the slow standard codecs only where they can beat ``pred``, so that the chosen size stays
within 0.2 % of the best of all candidates on every set while JPEG-XL (effort 7: about
2.5 MPx/s, as slow as ``pred``; effort 9: about 0.3-0.7 MPx/s) mostly does not run.

Rule
----
Frames of more than 16 bits, or of other than 1 or 3 samples: ``zstd`` (no image codec takes
them). Frames of at most 128x128 pixels: ``jpegxl`` (effort 7), ``jpeg2000``, ``zstd``, each
costing milliseconds there, and JPEG-XL effort 9 only when ``flat >= 0.24`` and
``constant <= 0.1`` (below): effort 9 takes four times effort 7's time (15 against 4 ms on a
64x64 fMRI frame) and wins only on small frames whose background is low noise. Of the 96
mr-t1-3d frames and every 10th fmri-ge frame, effort 9 beat every other candidate on 24, all
mr-t1-3d edge slices with ``flat`` 0.24 to 0.32 and ``constant`` 0.03 to 0.05 (by 0.3-2.7 %),
and lost on every frame with ``flat < 0.24`` (every fMRI frame: 0.04-0.07); on every 8th frame
of an mr-dti-enhanced object (``flat`` 0.19-0.34, but exact zero padding: ``constant``
0.17-0.26) it never won. Trying it on every small frame instead cost 2.1x the encode CPU time
on fmri-ge, 1.4x on mr-t1-3d and 2.9x on an mr-dti-enhanced object for 0.0014 %, 0.05 % and
0.002 % smaller files. A single-sample small frame whose ``pred`` starts from the predictive
prior (:mod:`medzip_scp.codec.predictive.prior`; the default where it is installed) adds
JPEG-XL effort 7 and 9 and zstd when ``flat >= 0.9`` (``>= 0.5`` at 8 bits); otherwise it
first codes ``pred`` and ``jpegls`` alone and adds JPEG-XL effort 7 only when the smaller is
more than 0.9 times the size of JPEG-XL effort 2's stream (:func:`screened_candidates`:
0.2-0.5 ms). Efforts 7 and 9 took at least 0.90 of effort 2's bytes on every fMRI and T1
frame measured (median 0.93), 0.85 on one DTI frame (median 0.90), 0.97 on the conformance MR
and CT and 0.92 on synthetic MR-like frames. On the 528 single-sample small frames of
``../shared/data`` (fmri-ge, mr-t1-3d, every 3rd mr-dti-enhanced frame, the conformance MR and
CT) this picks the smallest of all candidates on all but one (a 128x128 T1 edge slice that
JPEG-XL effort 9 codes 4 bytes smaller); JPEG-XL runs on 3 of 300 fMRI, 31 of 96 T1 and 1 of
120 DTI frames. On 24 synthetic MR-like frames, which the prior does not fit, it lost nothing;
one other synthetic frame is 1.5 % larger than JPEG-XL would code it. Without the prior
``pred`` loses to JPEG-XL by up to 2.5 % on fMRI frames; the prior saves 1.7-5.3 % on
held-out small MR frames (its card). Larger frames, from statistics of the
first sample on up to 16 tiles of 64x64 pixels spread over the frame (at multiples of 64, so a
wavelet sees the frame's own grid; about 3 % of ``pred``'s time):

* ``constant``: the fraction of pixels equal to their W, N and NW neighbours (padding, masked
  background); ``active_pixels`` is the frame's pixel count times ``1 - constant``;
* ``flat``: the fraction of pixels the MED (LOCO-I) predictor gets exactly;
* ``floor``: the fraction of pixels at the frame's minimum with a W, N or NW neighbour above
  it: noise clipped at a floor, unlike constant padding;
* ``wavelet_gain``: zeroth-order entropy of the MED residual minus that of a 3-level integer
  5/3 wavelet (JPEG 2000's reversible transform), bits per pixel (:func:`_entropy`);
* ``lattice``: how far the first level's 5/3 detail coefficients sit on a lattice
  (:func:`_lattice`, bits); ``distinct``: distinct values over the tiles' value range.

=====================================================  ======================================
condition                                              adds
=====================================================  ======================================
3 samples; ``active_pixels <= 2 * 128 * 128``;         ``jpegxl`` (effort 7), ``jpegxl-e9``
``flat >= 0.5`` at 8 bits, ``>= 0.9`` above;
``floor >= 0.12``
``wavelet_gain >= 0.6``; ``lattice >= 0.3`` with        ``jpeg2000``
``distinct >= 0.1``
``flat >= 0.9``; 1-bit values                          ``zstd``
=====================================================  ======================================

Numbers behind it: every candidate on every lossless-origin frame of ``../shared/data``
(conformance without the lossy folders, mr-epi, the four series, the first 40 frames of each
mr-dti-enhanced object: 679 distinct frames), comparing stream sizes (``pred``'s with its 4-byte
length); ``pred/x`` is ``pred``'s size over the smaller of JPEG-XL effort 7 and 9.

* JPEG-XL beats ``pred`` on every colour frame (``pred/x`` 2.5-4.1: ultrasound, secondary
  capture), on 8-bit single-sample ultrasound with text (1.23 at ``flat`` 0.79, 2.1-2.2 at
  0.98), and on most small frames: 64x64 fMRI (293 of 300 frames, ``pred/x`` up to 1.066),
  128x128 T1 (28 of 96, up to 1.028), 80x80 DTI (42 of 120, up to 1.020), 64x64 MR (up to
  1.022). Effort 9 is not monotone in effort 7 (either is up to 14-21 % larger than the
  other on some frame; on 128x128 T1 effort 9 alone wins 24 frames, by up to 2.7 %), so both
  run where JPEG-XL runs; without effort 9 on small frames the T1 set grows by 0.21 %. On larger
  single-sample frames ``pred`` wins (``pred/x`` CT 0.91-0.93, MR-EPI 0.985-0.997, CR/DX
  0.95-0.96, 9-16-bit frames with padding 0.95-0.99), except one 512x512 CT frame (1.0016,
  which the gate leaves to ``pred``); there ``flat`` is 0.006-0.62, ``floor`` at most 0.083
  and ``active_pixels`` at least 110,000. A synthetic 256x256 MR slice whose background is
  masked to zero (87 % constant) codes 4 % smaller with JPEG-XL; CT-like noise clipped at
  its floor (``floor`` 0.16-0.21) 5 % smaller.
* JPEG 2000 beats ``pred`` on one real single-sample frame, the 16-bit 1416x1420 DX
  conformance frame (7.43 vs 8.99 bpp; ``lattice`` 0.86, ``distinct`` 0.47), on frames
  decoded from lossy (reversible) JPEG 2000 streams (an MR-like slice at 40-60 dB: 1.5-6x
  smaller than ``pred``, ``lattice`` 1.0-2.7) and on interpolated frames (a 128x128 MR-like
  slice upsampled 2x by linear interpolation: 39 % smaller, ``wavelet_gain`` 2.7; 2x cubic
  or along one axis: 6-27 % smaller, 1.5-2.1). On every other real single-sample frame
  ``wavelet_gain`` is at most 0.41 and ``lattice`` at most 0.14, except a 16-bit frame
  holding 236 distinct values (``lattice`` 0.82, ``distinct`` 0.004; ``pred`` codes their
  ranks, JPEG 2000 is 3.7x larger); JPEG 2000 is 1 % to 3.7x larger than ``pred`` there.
  Interpolated CT (smooth, little noise) and CT decoded from lossy 9/7 streams also pass
  the rule without JPEG 2000 winning: a wasted JPEG 2000 run costs 10-15 % of ``pred``'s
  time.
* zstd wins only on synthetic flat colour frames (``flat`` 1.0) and above 16 bits.

Result (``benchmarks/gate.py``, whole classical blobs, subsampled sets): on each set the
gated default is within 0.01 % of trying every candidate on every frame (one conformance
frame is 0.16 % larger, the CT frame above), and 3.8 % smaller than the candidates before
the gate on the conformance set (JPEG 2000 on the DX frame, JPEG-XL effort 9 on colour and
ultrasound).
Encode time is 0.6-0.7x that of the candidates before the gate on CT, MR-EPI and the
conformance frames, and 2.4-2.7x on the 64x64 to 128x128 series (JPEG-XL effort 9 on every
frame there: about 50 ms a frame).

What ``pred`` (pred-v2) misses where they win:
small frames (and frames that are mostly constant background) pay its fixed side
information (the used-value bitmap of packed mode and the predictor tables: 14 % of a 64x64
fMRI stream, 6 % of an 80x80 DTI one) and the learning cost of its adaptive contexts, where
JPEG-XL signals a compact MA tree. It codes the samples of a colour frame as independent
planes, with no colour transform. It spends a binary decision per pixel in long runs of exact
predictions and on repeated glyphs, which JPEG-XL codes almost for free (LZ77, palette, MA
tree splits on neighbour values, which also model a clipped floor). Its predictor is
position-invariant, so it cannot see that the odd rows or columns of an interpolated frame
are averages of their even neighbours; the 5/3 wavelet's predict step is exactly that
interpolation, which leaves those detail coefficients near zero (and ``wavelet_gain``
large). Nor can it see quantisation in a wavelet domain: the DX frame's 5/3 coefficients are
2 mod 4 for 70 % (the mark of a lossy JPEG 2000 stream decoded), which JPEG 2000 codes on
the same grid; flipped, or cropped by one row, the grid no longer matches and JPEG 2000's
advantage is gone (9.48 bpp).

Determinism: the statistics decide only which candidates are tried (in floating point, never
reaching a coder); every candidate's stream is deterministic and verified before it is kept,
and decoding never depends on the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import imagecodecs
import numpy as np
import numpy.typing as npt

__all__ = [
    "EXTRA_CANDIDATES",
    "PRIMED_FLAT_CANDIDATES",
    "FrameStats",
    "choose",
    "extra_candidates",
    "screened_candidates",
    "frame_stats",
]

EXTRA_CANDIDATES: tuple[str, ...] = ("jpegxl", "jpegxl-e9", "jpeg2000", "zstd")
SMALL_FRAME_CANDIDATES: tuple[str, ...] = ("jpegxl", "jpeg2000", "zstd")
PRIMED_FLAT_CANDIDATES: tuple[str, ...] = ("jpegxl", "jpegxl-e9", "zstd")
JPEGXL_SCREEN_RATIO = 0.9
FLAT_FOR_EFFORT_9_ON_SMALL = 0.24
CONSTANT_FOR_EFFORT_9_ON_SMALL = 0.1
"""Every candidate the gate can add, in tie-break order."""

SMALL_PIXELS = 128 * 128
"""Frames of at most this many pixels try every candidate."""
ACTIVE_PIXELS_FOR_JPEGXL = 2 * SMALL_PIXELS
FLAT_FOR_JPEGXL_8_BITS = 0.5
FLAT_FOR_JPEGXL = 0.9
FLOOR_FOR_JPEGXL = 0.12
FLAT_FOR_ZSTD = 0.9
WAVELET_GAIN_FOR_JPEG2000 = 0.6
LATTICE_FOR_JPEG2000 = 0.3
DISTINCT_FOR_JPEG2000 = 0.1
TILE = 64
TILES_PER_AXIS = 4
WAVELET_LEVELS = 3


@dataclass(frozen=True)
class FrameStats:
    """Cheap statistics of a frame's values (see the module docstring)."""

    pixels: int
    samples: int
    nbits: int
    constant: float
    flat: float
    floor: float
    distinct: float
    wavelet_gain: float
    lattice: float

    @property
    def active_pixels(self) -> float:
        """Pixels outside constant areas (an estimate for the whole frame)."""
        return self.pixels * (1 - self.constant)


def extra_candidates(
    values: npt.NDArray[np.unsignedinteger], nbits: int, primed: bool = False
) -> tuple[str, ...]:
    """Candidates to try on ``values`` (rows, columns, samples) besides ``pred`` and ``jpegls``;
    ``primed``: ``pred`` starts from the predictive prior (small single-sample frames)."""
    rows, columns, samples = values.shape
    if nbits > 16 or samples not in (1, 3):
        return ("zstd",)
    if rows * columns <= SMALL_PIXELS:
        # only two statistics: the wavelet ones would cost 10x as much (0.8 ms on 64x64)
        surface = _Surface.of(values)
        if primed and samples == 1:
            flat = FLAT_FOR_JPEGXL_8_BITS if nbits <= 8 else FLAT_FOR_JPEGXL
            return PRIMED_FLAT_CANDIDATES if surface.flat >= flat else ()
        if (
            surface.flat >= FLAT_FOR_EFFORT_9_ON_SMALL
            and surface.constant <= CONSTANT_FOR_EFFORT_9_ON_SMALL
        ):
            return EXTRA_CANDIDATES
        return SMALL_FRAME_CANDIDATES
    return choose(frame_stats(values, nbits))


def screened_candidates(
    values: npt.NDArray[np.unsignedinteger], nbits: int, best: int
) -> tuple[str, ...]:
    """The candidates a small single-sample frame left to ``pred`` from the prior
    (:func:`extra_candidates` with ``primed``) tries after all: JPEG-XL effort 7 where
    ``best``, the bytes of the smallest stream so far, exceeds :data:`JPEGXL_SCREEN_RATIO`
    times JPEG-XL effort 2's (0.2-0.5 ms on 64x64 to 128x128)."""
    rows, columns, samples = values.shape
    if samples != 1 or rows * columns > SMALL_PIXELS or not 1 <= nbits <= 16:
        return ()
    v = np.ascontiguousarray(values[..., 0])
    try:
        quick = imagecodecs.jpegxl_encode(v, lossless=True, effort=2, bitspersample=nbits)
    except Exception:  # JPEG-XL cannot take it here: it would not be a candidate either
        return ()
    return ("jpegxl",) if best > JPEGXL_SCREEN_RATIO * len(quick) else ()


def choose(stats: FrameStats) -> tuple[str, ...]:
    """The rule of the module docstring on a frame larger than ``SMALL_PIXELS``."""
    extras: list[str] = []
    if (
        stats.samples == 3
        or stats.active_pixels <= ACTIVE_PIXELS_FOR_JPEGXL
        or stats.flat >= (FLAT_FOR_JPEGXL_8_BITS if stats.nbits <= 8 else FLAT_FOR_JPEGXL)
        or stats.floor >= FLOOR_FOR_JPEGXL
    ):
        extras += ["jpegxl", "jpegxl-e9"]
    if stats.wavelet_gain >= WAVELET_GAIN_FOR_JPEG2000 or (
        stats.lattice >= LATTICE_FOR_JPEG2000 and stats.distinct >= DISTINCT_FOR_JPEG2000
    ):
        extras.append("jpeg2000")
    if stats.flat >= FLAT_FOR_ZSTD or stats.nbits <= 1:
        extras.append("zstd")
    return tuple(extras)


@dataclass(frozen=True)
class _Surface:
    """Tiles of a frame's first sample, each pixel's W, N, NW neighbours and MED residual."""

    tiles: npt.NDArray[np.int64]
    x: npt.NDArray[np.int64]
    w: npt.NDArray[np.int64]
    n: npt.NDArray[np.int64]
    nw: npt.NDArray[np.int64]
    residual: npt.NDArray[np.int64]

    @classmethod
    def of(cls, values: npt.NDArray[np.unsignedinteger]) -> _Surface:
        tiles = _tiles(values[:, :, 0].astype(np.int64))
        return cls(tiles, *_neighbours(tiles), _med_residual(tiles))

    @property
    def count(self) -> int:
        return max(1, self.x.size)

    @property
    def constant(self) -> float:
        x, w, n, nw = self.x, self.w, self.n, self.nw
        return np.count_nonzero((x == w) & (w == n) & (n == nw)) / self.count

    @property
    def flat(self) -> float:
        return np.count_nonzero(self.residual == 0) / self.count


def frame_stats(values: npt.NDArray[np.unsignedinteger], nbits: int) -> FrameStats:
    """:class:`FrameStats` of ``values`` (rows, columns, samples), from its first sample."""
    rows, columns, samples = values.shape
    s = _Surface.of(values)
    low = int(values[:, :, 0].min())
    floor = np.count_nonzero((s.x == low) & (np.maximum(np.maximum(s.w, s.n), s.nw) > low))
    distinct = np.unique(s.tiles).size / (int(s.tiles.max()) - int(s.tiles.min()) + 1)
    wavelet_bits, first_details = _wavelet_entropy(s.tiles)
    return FrameStats(
        pixels=rows * columns,
        samples=samples,
        nbits=nbits,
        constant=float(s.constant),
        flat=float(s.flat),
        floor=float(floor / s.count),
        distinct=float(distinct),
        wavelet_gain=_entropy(s.residual) - wavelet_bits,
        lattice=_lattice(first_details),
    )


def _tiles(plane: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Up to ``TILES_PER_AXIS``**2 tiles of ``TILE``x``TILE`` spread over the plane, as
    (tiles, TILE, TILE); a plane narrower than a tile is one tile of at most 64k pixels."""
    rows, columns = plane.shape
    if rows < TILE or columns < TILE:
        cap = max(1, 65536 // max(1, min(rows, columns)))
        return (plane[:cap] if rows > columns else plane[:, :cap])[None]
    ys = _spread(rows // TILE)
    xs = _spread(columns // TILE)
    return np.stack([plane[y : y + TILE, x : x + TILE] for y in ys for x in xs])


def _spread(count: int) -> list[int]:
    """Tile offsets (multiples of ``TILE``) spread evenly over ``count`` tile positions."""
    picks = np.linspace(0, count - 1, min(count, TILES_PER_AXIS)).round().astype(int)
    return [int(i) * TILE for i in np.unique(picks)]


def _neighbours(t: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], ...]:
    """(pixel, W, N, NW) over the last two axes, for the pixels that have all three."""
    return t[:, 1:, 1:], t[:, 1:, :-1], t[:, :-1, 1:], t[:, :-1, :-1]


def _med_residual(t: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Residual of the MED (median edge detector) predictor on the last two axes."""
    x, w, n, nw = _neighbours(t)
    hi, lo = np.maximum(w, n), np.minimum(w, n)
    pred = np.where(nw >= hi, lo, np.where(nw <= lo, hi, w + n - nw))
    return x - pred


def _lift53(x: npt.NDArray[np.int64], axis: int) -> tuple[npt.NDArray[np.int64], ...]:
    """One integer 5/3 lifting step along ``axis`` (even length; edges replicated):
    (low band, high band)."""
    x = np.moveaxis(x, axis, -1)
    x = x[..., : x.shape[-1] // 2 * 2]
    even, odd = x[..., 0::2], x[..., 1::2]
    right = np.concatenate([even[..., 1:], even[..., -1:]], axis=-1)
    high = odd - ((even + right) >> 1)
    left = np.concatenate([high[..., :1], high[..., :-1]], axis=-1)
    low = even + ((left + high + 2) >> 2)
    return np.moveaxis(low, -1, axis), np.moveaxis(high, -1, axis)


def _wavelet_entropy(
    tiles: npt.NDArray[np.int64],
) -> tuple[float, list[npt.NDArray[np.int64]]]:
    """Pixel-weighted zeroth-order entropy of the detail bands of a ``WAVELET_LEVELS``-level
    5/3 transform of each tile, the remaining low band coded by MED; and the first level's
    detail bands."""
    bits, count = 0.0, 0
    low = tiles
    first: list[npt.NDArray[np.int64]] = []
    for _ in range(WAVELET_LEVELS):
        if min(low.shape[1:]) < 4:
            break
        lo_x, hi_x = _lift53(low, 2)
        low, lh = _lift53(lo_x, 1)
        hl, hh = _lift53(hi_x, 1)
        for band in (lh, hl, hh):
            bits += _entropy(band) * band.size
            count += band.size
        first = first or [lh, hl, hh]
    rest = _med_residual(low) if min(low.shape[1:]) > 1 else low
    bits += _entropy(rest) * rest.size
    count += rest.size
    return bits / max(1, count), first


def _lattice(details: list[npt.NDArray[np.int64]]) -> float:
    """How far 5/3 detail coefficients sit on a lattice: the largest ``j - H(c mod 2**j)``
    (bits, ``j`` in 1..3) over the coefficients with ``|c| >= 2**(j+1)`` away from the tile
    edges (where the tiles' transform equals the frame's). About 0 for natural frames; large
    for a frame decoded from a lossy JPEG 2000 stream, whose coefficients were quantised on
    the same grid (the DX frame's are 2 mod 4 for 70 %)."""
    inner = np.concatenate([b[:, 1:-1, 1:-1].ravel() for b in details]) if details else None
    best = 0.0
    for j in (1, 2, 3):
        if inner is None:
            break
        big = inner[np.abs(inner) >= 1 << (j + 1)]
        if big.size < 1000:
            continue
        p = np.bincount(big & ((1 << j) - 1), minlength=1 << j) / big.size
        p = p[p > 0]
        best = max(best, j + float((p * np.log2(p)).sum()))
    return best


def _entropy(x: npt.NDArray[np.int64]) -> float:
    """Zeroth-order entropy of ``x`` in bits per value. Wide distributions are binned by
    ``2**k`` (about 4 to 8 bins per mean absolute value) and ``k`` bits added back, so that
    the estimate does not saturate at log2 of the sample count; the Miller-Madow correction,
    (distinct bins - 1) / (2 n ln 2), takes out most of the remaining small-sample bias."""
    if x.size == 0:
        return 0.0
    flat = x.ravel()
    mean_abs = float(np.abs(flat).mean())
    k = max(0, math.floor(math.log2(mean_abs)) - 2) if mean_abs > 0 else 0
    binned = flat >> k
    counts = np.bincount(binned - binned.min())
    counts = counts[counts > 0]
    p = counts / flat.size
    h = float(-(p * np.log2(p)).sum()) + (counts.size - 1) / (2 * flat.size * math.log(2))
    return h + k
