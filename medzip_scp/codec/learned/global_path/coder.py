"""Integer features, the wavefront order and the bits-back ANS coder of the global path."""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import constriction
import numpy as np
import numpy.typing as npt

from medzip_scp.codec.errors import CorruptStreamError

from .model import COEF_SHIFT, NQ, NS, GlobalModel

__all__ = ["decode", "encode", "posterior_bits", "PayloadTooLargeError"]

_MAGIC = b"MZGL"
_VERSION = 1
_HEAD = struct.Struct("<4sBBII8sIII")  # magic, version, bits, H, W, model tag, n_init, crc, n_words
_PAD = 2
# (dy, dx) of the causal neighbours, in FEATURES order after MED. All satisfy dx + 2*dy < 0, so
# they are decoded before (y, x) in the wavefront order t = x + 2*y.
_OFFS = ((0, -1), (-1, 0), (-1, -1), (-1, 1), (0, -2), (-2, 0), (-1, -2), (-2, -1), (-2, 1))
_LEN_FLAG = 0x80000000
_MAX_PAYLOAD = _LEN_FLAG - 1

_stack = constriction.stream.stack
_cmodel = constriction.stream.model


class PayloadTooLargeError(ValueError):
    """The payload does not fit (over 2**31 - 1 bytes, or over capacity when ``strict``)."""


def _cat() -> object:
    # ``perfect`` is part of the format: fixed explicitly (its default changes between versions).
    return _cmodel.Categorical(perfect=False)


def _seed_words(n: int) -> npt.NDArray[np.uint32]:
    """The fixed fill stream that stands in for a payload: sha256 counter mode, deterministic."""
    out = bytearray()
    i = 0
    while len(out) < 4 * n:
        out += hashlib.sha256(b"medzip-global-fill" + i.to_bytes(8, "little")).digest()
        i += 1
    return np.frombuffer(bytes(out[: 4 * n]), "<u4").astype(np.uint32)


# ----------------------------------------------------------------------------------------------
# causal padding and features


def padded(img: npt.NDArray[np.integer], bits: int) -> npt.NDArray[np.int64]:
    """The frame in the causally padded layout the decoder rebuilds as it goes.

    Padded shape (H+2, W+4), pixel (y, x) at [y+2, x+2]. Pad rules (each pad cell is a copy of
    a pixel decoded before every pixel that reads it): top rows at column x' hold x[0, x'-2];
    left pad of row y >= 1 holds x[y-1, 0]; right pad of row y holds x[y, W-1]; the rest holds
    ``2**(bits-1)``.
    """
    H, W = img.shape
    P = np.full((H + _PAD, W + 2 * _PAD), 1 << (bits - 1), np.int64)
    P[_PAD:, _PAD : W + _PAD] = img
    # top: padded column c' (x' = c' - 2) holds x[0, x' - 2] -> padded columns 4 .. W+3
    P[:_PAD, 4 : W + 4] = img[0][None, :]
    if H > 1:
        P[_PAD + 1 :, :_PAD] = img[:-1, :1]
    P[_PAD:, W + _PAD :] = img[:, -1:]
    return P


def _med(w: np.ndarray, n: np.ndarray, nw: np.ndarray) -> np.ndarray:
    mx = np.maximum(w, n)
    mn = np.minimum(w, n)
    return np.where(nw >= mx, mn, np.where(nw <= mn, mx, w + n - nw))


def _lg8(e: np.ndarray) -> np.ndarray:
    """Integer log2 in 1/8 octave (piecewise linear) of e >= 1."""
    k = np.frexp(e.astype(np.float64))[1].astype(np.int64) - 1  # exact: e < 2**53
    return 8 * k + (((e << 3) >> k) & 7)


def _features(
    nb: list[np.ndarray], qb: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (n, 10), lg8 of the gradient energy and lg8 of the neighbours' MED errors.

    ``nb``: the 9 neighbour values (``_OFFS`` order); ``qb``: |x - MED| at W, N, NW, NE.
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
    return F, _lg8(e), _lg8(e2)


def _params(
    F: np.ndarray, lg8: np.ndarray, lg8b: np.ndarray, z: np.ndarray, model: GlobalModel, maxv: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer base prediction, phase and scale index of each pixel under its class z."""
    mu = np.einsum("ni,ni->n", F, model.coef[z])
    base = np.clip(mu >> COEF_SHIFT, 0, maxv)
    phase = (mu >> (COEF_SHIFT - 3)) & (NQ - 1)
    sidx = np.clip(
        (model.scale_a[z] * lg8 + model.scale_c[z] * lg8b + model.scale_b[z]) >> 8, 0, NS - 1
    )
    return base, phase, sidx


def _to_symbols(r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.abs(r)
    k = np.frexp(np.maximum(a, 1).astype(np.float64))[1].astype(np.int64) - 1
    big = a >= 16
    kk = np.where(big, k, 4)
    bucket = np.where(big, 16 + (kk - 4) * 4 + ((a >> (kk - 2)) & 3), a)
    m = np.where(big, kk - 2, 0)
    off = a & ((1 << m) - 1)
    return 63 + np.sign(r) * bucket, m, off


def _sym_mbits(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sign, bucket, mantissa bits) of decoded symbols."""
    b = np.abs(sym - 63)
    m = np.where(b >= 16, (b - 16) // 4 + 2, 0)
    return np.sign(sym - 63), b, m


def _from_symbols(sign: np.ndarray, b: np.ndarray, m: np.ndarray, off: np.ndarray) -> np.ndarray:
    k = m + 2
    a = np.where(b >= 16, (1 << k) + (((b - 16) & 3) << m) + off, b)
    return sign * a


_QOFFS = _OFFS[:4]  # W, N, NW, NE of the MED-error plane (zero outside the frame)


def _all_features(img: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    H, W = img.shape
    P = padded(img, bits)
    nb = [P[_PAD + dy : _PAD + dy + H, _PAD + dx : _PAD + dx + W].reshape(-1) for dy, dx in _OFFS]
    med = _med(nb[0], nb[1], nb[2])
    Q = np.zeros_like(P)
    Q[_PAD:, _PAD : W + _PAD] = np.abs(img.astype(np.int64) - med.reshape(H, W))
    qb = [Q[_PAD + dy : _PAD + dy + H, _PAD + dx : _PAD + dx + W].reshape(-1) for dy, dx in _QOFFS]
    return _features(nb, qb)


# ----------------------------------------------------------------------------------------------
# latent posterior q(z|x): exact posterior of the model, in integers


def _block_index(H: int, W: int, block: int) -> tuple[np.ndarray, int, int]:
    bh, bw = -(-H // block), -(-W // block)
    ys, xs = np.divmod(np.arange(H * W), W)
    return (ys // block) * bw + xs // block, bh, bw


def _block_costs(img: np.ndarray, bits: int, model: GlobalModel) -> tuple[np.ndarray, np.ndarray]:
    """Code length of each block under each class, in 1/256 bit (int64): (nblocks, K)."""
    H, W = img.shape
    F, lg8, lg8b = _all_features(img, bits)
    x = img.reshape(-1).astype(np.int64)
    bidx, bh, bw = _block_index(H, W, model.block)
    maxv = (1 << bits) - 1
    K = model.K
    L = np.zeros((bh * bw, K), np.int64)
    for z in range(K):
        zz = np.full(x.size, z)
        base, phase, sidx = _params(F, lg8, lg8b, zz, model, maxv)
        sym, _, _ = _to_symbols(x - base)
        # float64 sums of integers below 2**53 are exact, whatever the summation order
        L[:, z] = np.bincount(
            bidx, model.sym_len[sidx, phase, sym].astype(np.float64), minlength=bh * bw
        ).astype(np.int64)
    return L + model.prior_len[None, :], bidx


def _posterior(L: np.ndarray, model: GlobalModel) -> np.ndarray:
    """Integer weights of q(z|x) per block, from integer code lengths (deterministic)."""
    d = L - L.min(axis=1, keepdims=True)
    w = model.exp2neg[np.minimum(d, model.exp2neg.size - 1)]
    w[d >= model.exp2neg.size - 1] = 0
    return w


def posterior_bits(img: np.ndarray, bits: int, model: GlobalModel) -> float:
    """Expected bits the sampling of z consumes (entropy of q), for capacity estimates."""
    L, _ = _block_costs(img, bits, model)
    w = _posterior(L, model).astype(np.float64)
    p = w / w.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum()
    return float(h)


# ----------------------------------------------------------------------------------------------
# wavefront steps


@dataclass
class _Steps:
    H: int
    W: int

    def __iter__(self):  # type: ignore[no-untyped-def]
        H, W = self.H, self.W
        for t in range(W + 2 * (H - 1)):
            y0 = max(0, -(-(t - W + 1) // 2))
            y1 = min(H - 1, t // 2)
            ys = np.arange(y0, y1 + 1)
            yield t, ys, t - 2 * ys


def _initial_words(payload: bytes, fill: int) -> npt.NDArray[np.uint32]:
    n = len(payload)
    padded_payload = payload + b"\0" * (-n % 4)
    pw = np.frombuffer(padded_payload, "<u4").astype(np.uint32)
    return np.concatenate(
        [_seed_words(fill)[::-1], pw[::-1], np.array([_LEN_FLAG | n], np.uint32)]
    ).astype(np.uint32)


def _parse_initial(words: np.ndarray) -> bytes:
    if words.size < 1 or not int(words[-1]) & _LEN_FLAG:
        raise CorruptStreamError("global-path stream: bits-back words lack the payload header")
    n = int(words[-1]) & ~_LEN_FLAG
    nw = -(-n // 4)
    if nw + 1 > words.size:
        raise CorruptStreamError(
            f"global-path stream: payload of {n} bytes needs {nw + 1} words, only {words.size}"
        )
    pw = words[words.size - 1 - nw : words.size - 1][::-1]
    raw = pw.astype("<u4").tobytes()
    if any(raw[n:]):
        raise CorruptStreamError("global-path stream: payload padding is not zero")
    fill = words[: words.size - 1 - nw]
    if not np.array_equal(fill, _seed_words(fill.size)[::-1]):
        raise CorruptStreamError("global-path stream: bits-back fill words do not match")
    return raw[:n]


def _sample_z(words: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, object]:
    coder = _stack.AnsCoder(words)
    z = coder.decode(_cat(), probs)
    return np.asarray(z, np.int64), coder


def encode(
    high: np.ndarray, bits: int, model: GlobalModel, payload: bytes, strict: bool
) -> tuple[bytes, dict[str, float]]:
    """Encode; returns the stream and accounting (bits consumed by sampling z, fill words)."""
    H, W = high.shape
    img = high.astype(np.int64)
    maxv = (1 << bits) - 1
    if len(payload) > _MAX_PAYLOAD:
        raise PayloadTooLargeError(
            f"payload must be at most {_MAX_PAYLOAD} bytes, got {len(payload)}"
        )
    L, bidx = _block_costs(img, bits, model)
    qw = _posterior(L, model).astype(np.float64)
    p = qw / qw.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        hq = float(-np.where(p > 0, p * np.log2(p), 0.0).sum())
    avail = 32 * (-(-len(payload) // 4)) + 31
    fill = max(0, int(np.ceil((hq * 1.05 + 96 - avail) / 32)))
    while True:
        init = _initial_words(payload, fill)
        c0 = _stack.AnsCoder(init).num_valid_bits()
        z, coder = _sample_z(init, qw)
        left = coder.num_valid_bits()
        if left >= 64 or fill > 1 << 24:
            break
        fill += (64 - left) // 32 + 2
    # trim fill words the sampling never reached (they would only be overhead)
    if fill and left > 96:
        trim = min(fill, (left - 64) // 32)
        init2 = _initial_words(payload, fill - trim)
        z2, coder2 = _sample_z(init2, qw)
        if np.array_equal(z2, z) and coder2.num_valid_bits() >= 32:
            fill -= trim
            init, coder = init2, coder2
            left = coder.num_valid_bits()
    consumed = c0 - left
    if strict and len(payload) * 8 + 32 > consumed:
        raise PayloadTooLargeError(
            f"payload of {len(payload)} bytes exceeds this frame's free capacity "
            f"({max(0, (consumed - 32) // 8)} bytes); pass strict=False to store the excess"
        )
    # x | z in wavefront order: the decoder pops step 0 first, so push the last step first
    F, lg8, lg8b = _all_features(img, bits)
    zpix = z[bidx]
    base, phase, sidx = _params(F, lg8, lg8b, zpix, model, maxv)
    sym, m, off = _to_symbols(img.reshape(-1) - base)
    cat, uni = _cat(), _cmodel.Uniform()
    pmf = model.pmf
    for _t, ys, xs in reversed(list(_Steps(H, W))):
        idx = ys * W + xs
        mm = m[idx]
        sel = mm > 0
        if sel.any():
            coder.encode_reverse(
                off[idx][sel].astype(np.int32), uni, (1 << mm[sel]).astype(np.int32)
            )
        coder.encode_reverse(
            sym[idx].astype(np.int32), cat, pmf[sidx[idx], phase[idx]].astype(np.float64)
        )
    K = model.K
    coder.encode_reverse(
        z.astype(np.int32), cat, np.broadcast_to(model.prior.astype(np.float64), (z.size, K)).copy()
    )
    words = np.asarray(coder.get_compressed(), np.uint32)
    crc = zlib.crc32(high.astype("<u2").tobytes())
    head = _HEAD.pack(_MAGIC, _VERSION, bits, H, W, model.tag, init.size, crc, words.size)
    stats = {
        "consumed_bits": float(consumed),
        "hq_bits": hq,
        "fill_words": float(fill),
        "payload_bits": 8.0 * len(payload),
    }
    return head + words.astype("<u4").tobytes(), stats


def decode(
    data: bytes, shape: tuple[int, int], bits: int, model: GlobalModel
) -> tuple[np.ndarray, bytes]:
    if len(data) < _HEAD.size:
        raise CorruptStreamError(
            f"global-path stream truncated: {len(data)} bytes, header needs {_HEAD.size}"
        )
    magic, ver, sbits, H, W, tag, ninit, crc, nwords = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise CorruptStreamError(f"not a global-path stream: magic {magic!r}, expected {_MAGIC!r}")
    if ver != _VERSION:
        raise CorruptStreamError(f"global-path stream version {ver}, this build reads {_VERSION}")
    if (H, W, sbits) != (int(shape[0]), int(shape[1]), int(bits)):
        raise CorruptStreamError(
            f"global-path stream holds {H}x{W} of {sbits} bits, expected "
            f"{shape[0]}x{shape[1]} of {bits} bits"
        )
    if tag != model.tag:
        raise CorruptStreamError(
            f"global-path stream was written by model tag {tag.hex()}, loaded model "
            f"{model.model_id} has tag {model.tag.hex()}"
        )
    if len(data) != _HEAD.size + 4 * nwords:
        raise CorruptStreamError(
            f"global-path stream has {len(data)} bytes, header announces {_HEAD.size + 4 * nwords}"
        )
    words = np.frombuffer(data, "<u4", offset=_HEAD.size).astype(np.uint32)
    maxv = (1 << bits) - 1
    try:
        coder = _stack.AnsCoder(words)
    except ValueError as exc:
        raise CorruptStreamError(f"global-path stream: invalid ANS data ({exc})") from exc
    K = model.K
    bidx, bh, bw = _block_index(H, W, model.block)
    nb = bh * bw
    cat, uni = _cat(), _cmodel.Uniform()
    z = np.asarray(
        coder.decode(cat, np.broadcast_to(model.prior.astype(np.float64), (nb, K)).copy()), np.int64
    )
    zpix = z[bidx]
    P = np.full((H + _PAD, W + 2 * _PAD), 1 << (bits - 1), np.int64)
    Pf = P.reshape(-1)
    Qf = np.zeros_like(Pf)
    WP = W + 2 * _PAD
    offs = [dy * WP + dx for dy, dx in _OFFS]
    qoffs = [dy * WP + dx for dy, dx in _QOFFS]
    pmf = model.pmf
    for _t, ys, xs in _Steps(H, W):
        fidx = (ys + _PAD) * WP + xs + _PAD
        F, lg8, lg8b = _features([Pf[fidx + o] for o in offs], [Qf[fidx + o] for o in qoffs])
        zz = zpix[ys * W + xs]
        base, phase, sidx = _params(F, lg8, lg8b, zz, model, maxv)
        sym = np.asarray(coder.decode(cat, pmf[sidx, phase].astype(np.float64)), np.int64)
        sign, b, m = _sym_mbits(sym)
        sel = m > 0
        off = np.zeros(sym.size, np.int64)
        if sel.any():
            off[sel] = coder.decode(uni, (1 << m[sel]).astype(np.int32))
        v = base + _from_symbols(sign, b, m, off)
        if v.size and (int(v.min()) < 0 or int(v.max()) > maxv):
            raise CorruptStreamError("global-path stream decodes to values outside the bit depth")
        Pf[fidx] = v
        Qf[fidx] = np.abs(v - F[:, 0])
        top = ys == 0
        if top.any():
            P[:_PAD, xs[top] + 4] = v[top][None]  # columns beyond W+3 do not exist
        left = (xs == 0) & (ys + 1 < H)
        if left.any():
            P[ys[left] + _PAD + 1, :_PAD] = v[left][:, None]
        right = xs == W - 1
        if right.any():
            P[ys[right] + _PAD, W + _PAD :] = v[right][:, None]
    img = P[_PAD:, _PAD : W + _PAD].copy()
    # bits back: re-encode z under q(z|x), which returns the initial words (payload + fill)
    L, _ = _block_costs(img, bits, model)
    qw = _posterior(L, model).astype(np.float64)
    coder.encode_reverse(z.astype(np.int32), cat, qw)
    init = np.asarray(coder.get_compressed(), np.uint32)
    if init.size != ninit:
        raise CorruptStreamError(
            f"global-path stream: bits-back returned {init.size} words, header says {ninit}"
        )
    payload = _parse_initial(init)
    high = img.astype(np.uint16)
    if zlib.crc32(high.astype("<u2").tobytes()) != crc:
        raise CorruptStreamError("global-path stream: CRC-32 of the decoded values does not match")
    return high, payload
