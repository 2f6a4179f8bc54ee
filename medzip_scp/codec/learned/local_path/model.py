"""The local-path network, its token geometry, features and integer probability tables.

No I/O here: :mod:`.` (the package) loads weights and codes streams, :mod:`.train` trains.

Tokens
------
The low part (``s`` planes) is cut into 2x2 blocks; one block is one *token*.  Tokens are grouped
into tiles of ``TILE x TILE`` blocks (16x16 pixels); the tokens of a tile form one causal
sequence in raster order, and all tiles of a frame are independent sequences, decoded as one
batch (``TOKENS = 64`` decode steps for any frame size).

Input of token ``t`` (the "visual prompt" plus the causal low context): the 6x6 pixel window
around its block, where every pixel is either its exact full value (when its low part is already
known: an earlier token of the same tile) or the midpoint of its interval ``high << s + (2**s -
1) / 2`` (high part only), relative to the block's own midpoint and in units of ``2**s``; the
known/unknown mask; ``s`` one-hot (no absolute intensity: it made the model scanner-specific).
Output: for each of the 4 pixels a location and a log-scale of a logistic over the full value,
restricted to the pixel's interval ``[high << s, (high + 1) << s)``: the distribution of its low
value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

TILE = 8  # tile side in blocks
TOKENS = TILE * TILE  # tokens per tile = decode steps
TILE_PX = 2 * TILE  # tile side in pixels
WIN = 6  # feature window side (pixels), offsets -2..3 around the block's top-left pixel
BORDER = 2  # padding around the tiled frame so every window is inside the array
S_MAX = 4  # largest supported split plane
PREC = 16  # integer probability tables sum to 2**PREC
MU_STEP = 8  # location quantised to 1/8 pixel
LS_STEP = 8  # natural-log scale quantised to 1/8
LN_MIN = math.log(0.1)  # smallest scale (pixels)
N_LS = 72  # log-scale levels: 0.1 .. ~780 pixels
MU_MARGIN = 24  # location clipped to [-(2**s + MU_MARGIN), 2 * 2**s + MU_MARGIN] pixels
EPS = 1e-6  # margin (in quantisation steps) of the determinism check; see the package docstring

N_FEAT = 2 * WIN * WIN + WIN * WIN + S_MAX


@dataclass(frozen=True)
class NetConfig:
    hidden: int = 48
    layers: int = 2
    heads: int = 4
    intermediate: int = 96

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# geometry


def _known_masks() -> npt.NDArray[np.bool_]:
    """(TOKENS, 36): whether window pixel k of token t has a known low part (causal, in tile)."""
    m = np.zeros((TOKENS, WIN * WIN), dtype=bool)
    for t in range(TOKENS):
        a, b = divmod(t, TILE)
        for k in range(WIN * WIN):
            dy, dx = divmod(k, WIN)
            py, px = 2 * a + dy - 2, 2 * b + dx - 2
            if not (0 <= py < TILE_PX and 0 <= px < TILE_PX):
                continue
            ba, bb = py // 2, px // 2
            m[t, k] = ba * TILE + bb < t
    return m


KNOWN = _known_masks()
_WOFF = np.array([(dy - 2, dx - 2) for dy in range(WIN) for dx in range(WIN)], dtype=np.int64)
_POFF = np.array([(0, 0), (0, 1), (1, 0), (1, 1)], dtype=np.int64)
# window index of the 4 block pixels
_SELF = np.array([(dy + 2) * WIN + (dx + 2) for dy, dx in _POFF], dtype=np.int64)


@dataclass
class Geometry:
    """A frame padded to whole tiles, with ``BORDER`` extra pixels on every side."""

    rows: int
    cols: int
    tiles_y: int
    tiles_x: int

    @property
    def n_tiles(self) -> int:
        return self.tiles_y * self.tiles_x

    @property
    def shape_padded(self) -> tuple[int, int]:
        return self.tiles_y * TILE_PX + 2 * BORDER, self.tiles_x * TILE_PX + 2 * BORDER

    @classmethod
    def of(cls, rows: int, cols: int) -> Geometry:
        return cls(rows, cols, -(-rows // TILE_PX), -(-cols // TILE_PX))

    def pad(self, a: npt.NDArray, mode: str) -> npt.NDArray[np.int64]:
        ph, pw = self.shape_padded
        a = np.asarray(a, dtype=np.int64)
        spec = ((BORDER, ph - BORDER - self.rows), (BORDER, pw - BORDER - self.cols))
        if mode == "zero" or a.size == 0:
            return np.pad(a, spec)
        return np.pad(a, spec, mode="edge")

    def block_origin(self, tiles: npt.NDArray[np.int64], t: npt.NDArray[np.int64]):
        """Padded-array (y, x) of the top-left pixel of token ``t`` of tile ``tiles``."""
        ty, tx = np.divmod(tiles, self.tiles_x)
        a, b = np.divmod(t, TILE)
        return BORDER + ty * TILE_PX + 2 * a, BORDER + tx * TILE_PX + 2 * b

    def valid(self, y: npt.NDArray[np.int64], x: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """Whether padded-array pixels are real frame pixels."""
        return (y - BORDER < self.rows) & (x - BORDER < self.cols)


def features(
    full: npt.NDArray[np.int64],
    base: npt.NDArray[np.int64],
    y0: npt.NDArray[np.int64],
    x0: npt.NDArray[np.int64],
    t: npt.NDArray[np.int64],
    s: int,
    bits: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Features (n, N_FEAT) of tokens at block origins ``(y0, x0)`` with tile positions ``t``.

    ``full`` holds exact full values where the low part is known (others are ignored), ``base``
    holds ``high << s``.  Also returns ``off`` (n, 4): the block midpoint minus each pixel's
    ``base``, in units of ``2**s`` (exact).  All arithmetic before the network is exact in
    float64 (integers and halves below 2**17, divided by powers of two).
    """
    q = float(1 << s)
    yy = y0[:, None] + _WOFF[None, :, 0]
    xx = x0[:, None] + _WOFF[None, :, 1]
    known = KNOWN[t]
    mid = base[yy, xx] + (q - 1) / 2
    e = np.where(known, full[yy, xx], mid).astype(np.float64)
    own_base = base[y0[:, None] + _POFF[None, :, 0], x0[:, None] + _POFF[None, :, 1]]
    ref = own_base.mean(axis=1) + (q - 1) / 2  # exact: sum of 4 integers / 4
    d = (e - ref[:, None]) / q
    n = len(y0)
    f = np.empty((n, N_FEAT), dtype=np.float64)
    k = WIN * WIN
    f[:, :k] = np.clip(d, -16.0, 16.0) * 0.25
    f[:, k : 2 * k] = np.sign(d) * np.log1p(np.abs(d))
    f[:, 2 * k : 3 * k] = known
    f[:, 3 * k : 3 * k + S_MAX] = 0.0
    f[:, 3 * k + s - 1] = 1.0
    off = (ref[:, None] - own_base) / q
    return f, off


# ---------------------------------------------------------------------------------------------
# integer tables


def mu_range(s: int) -> tuple[int, int]:
    """Inclusive range of the quantised location (1/MU_STEP pixel) for split plane ``s``."""
    q = 1 << s
    return -(q + MU_MARGIN) * MU_STEP, (2 * q + MU_MARGIN) * MU_STEP


def build_table(s: int) -> npt.NDArray[np.int32]:
    """Integer frequency tables (n_mu, N_LS, 2**s), each row summing to 2**PREC, every entry >= 1.

    Built once when a model is made and shipped with its weights (sha256 in the manifest), so
    decoding never depends on this machine's ``exp``.
    """
    lo, hi = mu_range(s)
    q = 1 << s
    mu = np.arange(lo, hi + 1, dtype=np.float64) / MU_STEP
    sc = np.exp(LN_MIN + np.arange(N_LS, dtype=np.float64) / LS_STEP)
    edges = np.arange(q + 1, dtype=np.float64) - 0.5
    z = (edges[None, None, :] - mu[:, None, None]) / sc[None, :, None]
    # difference of logistic CDFs, computed on the side of the smaller tail
    cdf = 1.0 / (1.0 + np.exp(-z))
    ccdf = 1.0 / (1.0 + np.exp(z))
    p_left = np.diff(cdf, axis=2)
    p_right = -np.diff(ccdf, axis=2)
    use_right = mu[:, None, None] < (q - 1) / 2
    p = np.where(use_right, p_right, p_left)
    # for locations far outside the interval both are tiny: use log-space geometric tail
    p = np.maximum(p, 1e-300)
    p = p / p.sum(axis=2, keepdims=True)
    total = 1 << PREC
    f = np.maximum(1, np.floor(p * (total - q))).astype(np.int64)
    rem = total - f.sum(axis=2)
    idx = np.argmax(f, axis=2)
    np.put_along_axis(
        f, idx[..., None], np.take_along_axis(f, idx[..., None], 2) + rem[..., None], 2
    )
    assert (f.sum(axis=2) == total).all() and (f >= 1).all()
    return f.astype(np.int32)


def quantise(
    raw: npt.NDArray[np.float64], off: npt.NDArray[np.float64], s: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Network outputs (n, 4, 2) -> table indices (mu_idx, ls_idx) (n, 4) and an unsafe flag (n,).

    A token is unsafe when any of its 8 scaled values lies within ``EPS`` of a rounding boundary
    (or is not finite): its quantisation could differ under a tiny float perturbation.
    """
    q = float(1 << s)
    mu_px = (off + raw[..., 0]) * q  # location relative to the pixel's base, pixels
    ln_sc = raw[..., 1] + s * math.log(2.0)
    a = mu_px * MU_STEP
    b = (ln_sc - LN_MIN) * LS_STEP
    bad = ~(np.isfinite(a) & np.isfinite(b)).all(axis=1)
    a = np.nan_to_num(a, nan=0.0, posinf=1e9, neginf=-1e9)
    b = np.nan_to_num(b, nan=0.0, posinf=1e9, neginf=-1e9)
    fa = np.abs(a - np.floor(a) - 0.5)
    fb = np.abs(b - np.floor(b) - 0.5)
    bad |= ((fa < EPS) | (fb < EPS)).any(axis=1)
    lo, hi = mu_range(s)
    mi = np.clip(np.floor(a + 0.5), lo, hi).astype(np.int64) - lo
    li = np.clip(np.floor(b + 0.5), 0, N_LS - 1).astype(np.int64)
    return mi, li, bad
