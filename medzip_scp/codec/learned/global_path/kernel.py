"""The global path's inference kernel: integer features, predictions, tables and posterior.

Every function maps integer arrays to integer arrays (numpy ``int64``; no float, no BLAS, no
threads), so its results do not depend on the CPU, the thread count, the batch it runs in or a
library version. No int64 value can overflow, whatever int32 weights a model file holds
(inputs are at most 16 bits, checked by the API):

* features ``< 2**16``; a prediction sums 10 products ``|F * coef| < 2**16 * 2**31``:
  ``< 2**51``; the scale index ``a * lg8 + c * lg8 + b < 3 * 2**31 * 2**8``;
* gradient energies ``< 7 * 2**16 + 1 < 2**20`` (the range of :func:`.fixed.lg8`);
* a block's code length: 64 pixels of ``sym_len < 2**31`` plus ``prior_len``: ``< 2**38``;
* posterior weights ``<= 2**24``; :func:`posterior_freq` products ``< 2**48``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .fixed import frequency_table, ilog2, lg8
from .model import COEF_SHIFT, NQ, NS, GlobalModel

__all__ = [
    "MBITS",
    "OFFS",
    "PAD",
    "QOFFS",
    "all_features",
    "block_costs",
    "block_index",
    "features",
    "from_symbols",
    "padded",
    "params",
    "posterior_freq",
    "posterior_weights",
    "symbol_mbits",
    "to_symbols",
]

PAD = 2
# (dy, dx) of the causal neighbours, in FEATURES order after MED. All satisfy dx + 2*dy < 0, so
# they are decoded before (y, x) in the wavefront order t = x + 2*y.
OFFS = ((0, -1), (-1, 0), (-1, -1), (-1, 1), (0, -2), (-2, 0), (-1, -2), (-2, -1), (-2, 1))
QOFFS = OFFS[:4]  # W, N, NW, NE of the MED-error plane (zero outside the frame)


def padded(img: npt.NDArray[np.integer], bits: int) -> npt.NDArray[np.int64]:
    """The frame in the causally padded layout the decoder rebuilds as it goes.

    Padded shape (H+2, W+4), pixel (y, x) at [y+2, x+2]. Pad rules (each pad cell is a copy of
    a pixel decoded before every pixel that reads it): top rows at column x' hold x[0, x'-2];
    left pad of row y >= 1 holds x[y-1, 0]; right pad of row y holds x[y, W-1]; the rest holds
    ``2**(bits-1)``.
    """
    H, W = img.shape
    P = np.full((H + PAD, W + 2 * PAD), 1 << (bits - 1), np.int64)
    P[PAD:, PAD : W + PAD] = img
    # top: padded column c' (x' = c' - 2) holds x[0, x' - 2] -> padded columns 4 .. W+3
    P[:PAD, 4 : W + 4] = img[0][None, :]
    if H > 1:
        P[PAD + 1 :, :PAD] = img[:-1, :1]
    P[PAD:, W + PAD :] = img[:, -1:]
    return P


def _med(w: np.ndarray, n: np.ndarray, nw: np.ndarray) -> np.ndarray:
    mx = np.maximum(w, n)
    mn = np.minimum(w, n)
    return np.where(nw >= mx, mn, np.where(nw <= mn, mx, w + n - nw))


def features(
    nb: list[np.ndarray], qb: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (n, 10), lg8 of the gradient energy and lg8 of the neighbours' MED errors.

    ``nb``: the 9 neighbour values (``OFFS`` order); ``qb``: |x - MED| at W, N, NW, NE.
    """
    W_, N_, NW_, NE_, WW_, NN_, _NWW, NNW_, NNE_ = nb
    F = np.stack([_med(W_, N_, NW_), *nb], axis=1)
    e = (
        np.abs(W_ - NW_)
        + np.abs(N_ - NW_)
        + np.abs(N_ - NE_)
        + np.abs(W_ - WW_)
        + np.abs(N_ - NN_)
        + np.abs(NE_ - NNE_)
        + np.abs(NW_ - NNW_)
    ) + 1
    e2 = 2 * qb[0] + 2 * qb[1] + qb[2] + qb[3] + 1
    return F, lg8(e), lg8(e2)


def params(
    F: np.ndarray, lg8e: np.ndarray, lg8q: np.ndarray, z: np.ndarray, model: GlobalModel, maxv: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer base prediction, phase and scale index of each pixel under its class z."""
    mu = np.einsum("ni,ni->n", F, model.coef[z])  # int64: exact in any summation order
    base = np.clip(mu >> COEF_SHIFT, 0, maxv)
    phase = (mu >> (COEF_SHIFT - 3)) & (NQ - 1)
    sidx = np.clip(
        (model.scale_a[z] * lg8e + model.scale_c[z] * lg8q + model.scale_b[z]) >> 8, 0, NS - 1
    )
    return base, phase, sidx


def to_symbols(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residuals -> (signed bucket symbol 0..126, mantissa bits, mantissa value)."""
    a = np.abs(r)
    k = ilog2(np.maximum(a, 1))
    big = a >= 16
    kk = np.where(big, k, 4)
    bucket = np.where(big, 16 + (kk - 4) * 4 + ((a >> (kk - 2)) & 3), a)
    m = np.where(big, kk - 2, 0)
    off = a & ((1 << m) - 1)
    return 63 + np.sign(r) * bucket, m, off


def symbol_mbits(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sign, bucket, mantissa bits) of decoded symbols."""
    b = np.abs(sym - 63)
    m = np.where(b >= 16, (b - 16) // 4 + 2, 0)
    return np.sign(sym - 63), b, m


MBITS = symbol_mbits(np.arange(127))[2]
"""Mantissa bits of each bucket symbol 0..126 (one lookup instead of :func:`symbol_mbits`)."""


def from_symbols(sign: np.ndarray, b: np.ndarray, m: np.ndarray, off: np.ndarray) -> np.ndarray:
    k = m + 2
    a = np.where(b >= 16, (1 << k) + (((b - 16) & 3) << m) + off, b)
    return sign * a


def all_features(img: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`features` of every pixel of a known frame (row-major)."""
    H, W = img.shape
    P = padded(img, bits)
    nb = [P[PAD + dy : PAD + dy + H, PAD + dx : PAD + dx + W].reshape(-1) for dy, dx in OFFS]
    med = _med(nb[0], nb[1], nb[2])
    Q = np.zeros_like(P)
    Q[PAD:, PAD : W + PAD] = np.abs(img.astype(np.int64) - med.reshape(H, W))
    qb = [Q[PAD + dy : PAD + dy + H, PAD + dx : PAD + dx + W].reshape(-1) for dy, dx in QOFFS]
    return features(nb, qb)


# ----------------------------------------------------------------------------------------------
# latent posterior q(z|x): the model's exact posterior, in integers


def block_index(H: int, W: int, block: int) -> tuple[np.ndarray, int, int]:
    """Block number of every pixel (row-major), blocks per column and per row."""
    bh, bw = -(-H // block), -(-W // block)
    ys, xs = np.divmod(np.arange(H * W), W)
    return (ys // block) * bw + xs // block, bh, bw


def block_costs(img: np.ndarray, bits: int, model: GlobalModel) -> tuple[np.ndarray, np.ndarray]:
    """Code length of each block under each class, in 1/256 bit: ``(nblocks, K)`` int64, and
    the block index of every pixel. Integer sums over each block (exact, order-free)."""
    H, W = img.shape
    F, lg8e, lg8q = all_features(img, bits)
    x = img.reshape(-1).astype(np.int64)
    B = model.block
    bidx, bh, bw = block_index(H, W, B)
    maxv = (1 << bits) - 1
    K = model.K
    L = np.zeros((bh * bw, K), np.int64)
    cost = np.zeros((bh * B, bw * B), np.int64)
    for z in range(K):
        base, phase, sidx = params(F, lg8e, lg8q, np.full(x.size, z), model, maxv)
        sym, _, _ = to_symbols(x - base)
        cost[:H, :W] = model.sym_len[sidx, phase, sym].reshape(H, W)
        L[:, z] = cost.reshape(bh, B, bw, B).sum(axis=(1, 3)).reshape(-1)
    return L + model.prior_len[None, :], bidx


def posterior_weights(L: np.ndarray, model: GlobalModel) -> np.ndarray:
    """Integer weights ``2**24 * 2**(-(L_z - min L) / 256)`` of q(z|x) per block (0 when the
    difference is beyond the table)."""
    d = L - L.min(axis=1, keepdims=True)
    w = model.exp2neg[np.minimum(d, model.exp2neg.size - 1)]
    w[d >= model.exp2neg.size - 1] = 0
    return w


def posterior_freq(L: np.ndarray, model: GlobalModel, prec: int) -> np.ndarray:
    """q(z|x) per block as integer frequencies (each >= 1, summing to ``2**prec``)."""
    return frequency_table(posterior_weights(L, model), prec)
