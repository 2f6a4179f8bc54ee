"""Global-path streams: the wavefront order, the bits-back latents and the two stream versions.

Stream version 2 (written by models with ``stream_version == 2``, e.g. ``global-vae-v2``)
--------------------------------------------------------------------------------------------
Header ``<4s B B I I 8s I I I``: magic ``MZGL``, version 2, bits, H, W, model tag (8 bytes of
the weights' sha256), ``n_init`` (words of the initial stack that decoding restores), CRC-32
of the values (little-endian uint16, row-major), ``n_words``; then ``n_words`` little-endian
uint32: one :class:`..rans.WordStack` (the project's integer rANS), top of the stack last.

The stack holds, from the bottom: what remains of the initial words (fill, payload, length
word) after the latents were sampled from them under q(z|x) (:func:`.kernel.posterior_freq`,
24-bit tables, block 0 first); the pixels in reverse decode order (wavefront steps
``t = x + 2y``, rows ascending within a step; per pixel its bucket symbol from ``pmf`` row
``sidx * 8 + phase`` (24-bit), then its mantissa bits); on top, z of every block under p(z)
(``prior``, 16-bit, block 0 on top).

Every table is integer when it reaches the coder and the coder is Python integer arithmetic, so
neither the float behaviour of a CPU nor the version of a library can change a stream.

Stream version 1 (``global-vae-v1``)
------------------------------------
Header ``4s B B I I 8s I I I`` (magic, version 1, bits, H, W, tag, n_init, crc32, n_words), then
one constriction ``AnsCoder`` stack: pixels, mantissas and latents on top of the initial words.
Its tables are handed to ``constriction.stream.model.Categorical(perfect=False)`` as float64
copies of the integer tables, and constriction re-quantises them with its own algorithm, so
version 1 streams are only as stable as that algorithm across constriction versions (written
with constriction 0.5.0). It needs constriction; decoding without it raises
:class:`~medzip_scp.codec.errors.IncompatibleLibraryError`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from medzip_scp.codec.errors import CorruptStreamError, IncompatibleLibraryError

from ..rans import WordStack, cumulative
from .kernel import (
    MBITS,
    OFFS,
    PAD,
    QOFFS,
    all_features,
    block_costs,
    block_index,
    features,
    from_symbols,
    params,
    posterior_freq,
    posterior_weights,
    symbol_mbits,
    to_symbols,
)
from .model import NQ, PMF_BITS, PRIOR_BITS, GlobalModel

__all__ = ["PayloadTooLargeError", "Q_BITS", "decode", "encode"]

_MAGIC = b"MZGL"
_HEAD = struct.Struct("<4sBBII8sIII")  # both versions
_LEN_FLAG = 0x80000000
_MAX_PAYLOAD = _LEN_FLAG - 1
Q_BITS = 24
"""Precision of the q(z|x) tables of stream version 2."""


class PayloadTooLargeError(ValueError):
    """The payload does not fit (over 2**31 - 1 bytes, or over capacity when ``strict``)."""


def _seed_words(n: int) -> npt.NDArray[np.uint32]:
    """The fixed fill stream that stands in for a payload: sha256 counter mode, deterministic."""
    out = bytearray()
    i = 0
    while len(out) < 4 * n:
        out += hashlib.sha256(b"medzip-global-fill" + i.to_bytes(8, "little")).digest()
        i += 1
    return np.frombuffer(bytes(out[: 4 * n]), "<u4").astype(np.uint32)


def _steps(H: int, W: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows and columns of each wavefront step ``t = x + 2y``, rows ascending."""
    for t in range(W + 2 * (H - 1)):
        ys = np.arange(max(0, -(-(t - W + 1) // 2)), min(H - 1, t // 2) + 1)
        yield ys, t - 2 * ys


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


def _check_payload(payload: bytes) -> None:
    if len(payload) > _MAX_PAYLOAD:
        raise PayloadTooLargeError(
            f"payload must be at most {_MAX_PAYLOAD} bytes, got {len(payload)}"
        )


def _check_strict(strict: bool, payload: bytes, consumed: int) -> None:
    if strict and payload and len(payload) * 8 + 32 > consumed:
        raise PayloadTooLargeError(
            f"payload of {len(payload)} bytes exceeds this frame's free capacity "
            f"({max(0, (consumed - 32) // 8)} bytes); pass strict=False to store the excess"
        )


def _check_header(
    H: int, W: int, sbits: int, tag: bytes, shape: tuple[int, int], bits: int, model: GlobalModel
) -> None:
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


def encode(
    high: np.ndarray, bits: int, model: GlobalModel, payload: bytes, strict: bool
) -> tuple[bytes, dict[str, float]]:
    """Encode in the model's stream version; returns the stream and accounting (bits consumed
    by sampling z, fill words)."""
    _check_payload(payload)
    if model.stream_version == 2:
        return _encode_v2(high, bits, model, payload, strict)
    return _encode_v1(high, bits, model, payload, strict)


def decode(
    data: bytes, shape: tuple[int, int], bits: int, model: GlobalModel
) -> tuple[np.ndarray, bytes]:
    if len(data) < 5:
        raise CorruptStreamError(f"global-path stream truncated: {len(data)} bytes")
    magic, ver = data[:4], data[4]
    if magic != _MAGIC:
        raise CorruptStreamError(f"not a global-path stream: magic {magic!r}, expected {_MAGIC!r}")
    if ver not in (1, 2):
        raise CorruptStreamError(f"global-path stream version {ver}, this build reads 1 and 2")
    if len(data) < _HEAD.size:
        raise CorruptStreamError(
            f"global-path stream truncated: {len(data)} bytes, header needs {_HEAD.size}"
        )
    _, _, sbits, H, W, tag, ninit, crc, nwords = _HEAD.unpack_from(data)
    if ver != model.stream_version:
        raise CorruptStreamError(
            f"global-path stream version {ver} cannot be decoded with model {model.model_id} "
            f"(it writes version {model.stream_version}); the stream names model tag "
            f"{data[14:22].hex()}"
        )
    _check_header(H, W, sbits, tag, shape, bits, model)
    if len(data) != _HEAD.size + 4 * nwords:
        raise CorruptStreamError(
            f"global-path stream has {len(data)} bytes, header announces {_HEAD.size + 4 * nwords}"
        )
    words = np.frombuffer(data, "<u4", offset=_HEAD.size).astype(np.uint32)
    if ver == 1:
        return _decode_v1(words, H, W, bits, model, ninit, crc)
    return _decode_v2(words, H, W, bits, model, ninit, crc)


# ----------------------------------------------------------------------------------------------
# stream version 2: integer tables, the project's rANS


def _order(H: int, W: int) -> list[np.ndarray]:
    """Pixel indices (row-major) of each wavefront step, in decode order."""
    return [ys * W + xs for ys, xs in _steps(H, W)]


def _q_cums(img: np.ndarray, bits: int, model: GlobalModel) -> tuple[list[list[int]], np.ndarray]:
    """q(z|x) of every block as cumulative integer tables, and the block index of each pixel."""
    L, bidx = block_costs(img, bits, model)
    return cumulative(posterior_freq(L, model, Q_BITS)), bidx


def _encode_v2(
    high: np.ndarray, bits: int, model: GlobalModel, payload: bytes, strict: bool
) -> tuple[bytes, dict[str, float]]:
    H, W = high.shape
    img = high.astype(np.int64)
    qcum, bidx = _q_cums(img, bits, model)
    nb = len(qcum)
    # sampling a latent pops at most one word (24-bit tables, 32-bit words): nb + 2 fill words
    # never run out; the ones it did not reach are dropped below
    fill = nb + 2
    init = _initial_words(payload, fill)
    stack = WordStack(init)
    before = stack.valid_bits()
    z = np.array([stack.decode(qcum[b], Q_BITS) for b in range(nb)], np.int64)
    consumed = before - stack.valid_bits()
    unread = min(len(stack.bulk), fill, init.size - 2)
    del stack.bulk[:unread]
    init = init[unread:]
    fill -= unread
    _check_strict(strict, payload, consumed)
    # x | z: pixels in reverse decode order, then z under the prior (block 0 on top)
    F, lg8e, lg8q = all_features(img, bits)
    base, phase, sidx = params(F, lg8e, lg8q, z[bidx], model, (1 << bits) - 1)
    sym, m, off = to_symbols(img.reshape(-1) - base)
    rows = sidx * NQ + phase
    idx = np.concatenate(_order(H, W))
    stack.encode_pixels(
        model.pixel_cums,
        PMF_BITS,
        rows[idx].tolist(),
        sym[idx].tolist(),
        m[idx].tolist(),
        off[idx].tolist(),
    )
    for b in range(nb - 1, -1, -1):
        stack.encode(model.prior_cum, int(z[b]), PRIOR_BITS)
    words = np.array(stack.words(), np.uint32)
    crc = zlib.crc32(high.astype("<u2").tobytes())
    head = _HEAD.pack(_MAGIC, 2, bits, H, W, model.tag, init.size, crc, words.size)
    stats = {
        "consumed_bits": float(consumed),
        "fill_words": float(fill),
        "payload_bits": 8.0 * len(payload),
    }
    return head + words.astype("<u4").tobytes(), stats


def _decode_v2(
    words: np.ndarray, H: int, W: int, bits: int, model: GlobalModel, ninit: int, crc: int
) -> tuple[np.ndarray, bytes]:
    maxv = (1 << bits) - 1
    bidx, bh, bw = block_index(H, W, model.block)
    stack = WordStack(words)
    z = np.array([stack.decode(model.prior_cum, PRIOR_BITS) for _ in range(bh * bw)], np.int64)
    zpix = z[bidx]
    tables = model.pixel_cums
    mbits_of = MBITS.tolist()
    P = np.full((H + PAD, W + 2 * PAD), 1 << (bits - 1), np.int64)
    Pf = P.reshape(-1)
    Qf = np.zeros_like(Pf)
    WP = W + 2 * PAD
    offs = [dy * WP + dx for dy, dx in OFFS]
    qoffs = [dy * WP + dx for dy, dx in QOFFS]
    for ys, xs in _steps(H, W):
        fidx = (ys + PAD) * WP + xs + PAD
        F, lg8e, lg8q = features([Pf[fidx + o] for o in offs], [Qf[fidx + o] for o in qoffs])
        base, phase, sidx = params(F, lg8e, lg8q, zpix[ys * W + xs], model, maxv)
        sym, off = stack.decode_pixels(tables, PMF_BITS, (sidx * NQ + phase).tolist(), mbits_of)
        s = np.array(sym, np.int64)
        sign, b, m = symbol_mbits(s)
        v = base + from_symbols(sign, b, m, np.array(off, np.int64))
        _place(P, Pf, Qf, fidx, ys, xs, v, F[:, 0], maxv, H, W)
    img = P[PAD:, PAD : W + PAD].copy()
    # bits back: re-encode z under q(z|x), which returns the initial words (payload + fill)
    qcum, _ = _q_cums(img, bits, model)
    for b in range(len(qcum) - 1, -1, -1):
        stack.encode(qcum[b], int(z[b]), Q_BITS)
    return _finish(np.array(stack.words(), np.uint32), ninit, img, crc)


def _place(
    P: np.ndarray,
    Pf: np.ndarray,
    Qf: np.ndarray,
    fidx: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    v: np.ndarray,
    med: np.ndarray,
    maxv: int,
    H: int,
    W: int,
) -> None:
    """Store one step's decoded values and the pad cells that copy them."""
    if v.size and (int(v.min()) < 0 or int(v.max()) > maxv):
        raise CorruptStreamError("global-path stream decodes to values outside the bit depth")
    Pf[fidx] = v
    Qf[fidx] = np.abs(v - med)
    top = ys == 0
    if top.any():
        P[:PAD, xs[top] + 4] = v[top][None]  # columns beyond W+3 do not exist
    left = (xs == 0) & (ys + 1 < H)
    if left.any():
        P[ys[left] + PAD + 1, :PAD] = v[left][:, None]
    right = xs == W - 1
    if right.any():
        P[ys[right] + PAD, W + PAD :] = v[right][:, None]


def _finish(init: np.ndarray, ninit: int, img: np.ndarray, crc: int) -> tuple[np.ndarray, bytes]:
    if init.size != ninit:
        raise CorruptStreamError(
            f"global-path stream: bits-back returned {init.size} words, header says {ninit}"
        )
    payload = _parse_initial(init)
    high = img.astype(np.uint16)
    if zlib.crc32(high.astype("<u2").tobytes()) != crc:
        raise CorruptStreamError("global-path stream: CRC-32 of the decoded values does not match")
    return high, payload


# ----------------------------------------------------------------------------------------------
# stream version 1: float tables re-quantised by constriction (kept so old streams decode)


def _constriction() -> Any:
    try:
        import constriction
    except ImportError as exc:
        raise IncompatibleLibraryError(
            "global-path stream version 1 (global-vae-v1) blobs", "constriction", ">=0.4,<0.6", None
        ) from exc
    return constriction


def _cat(constriction: Any) -> Any:
    # ``perfect`` is part of the format: fixed explicitly (its default changes between versions).
    return constriction.stream.model.Categorical(perfect=False)


def _encode_v1(
    high: np.ndarray, bits: int, model: GlobalModel, payload: bytes, strict: bool
) -> tuple[bytes, dict[str, float]]:
    cn = _constriction()
    stack_mod = cn.stream.stack
    H, W = high.shape
    img = high.astype(np.int64)
    maxv = (1 << bits) - 1
    L, bidx = block_costs(img, bits, model)
    qw = posterior_weights(L, model).astype(np.float64)
    p = qw / qw.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        hq = float(-np.where(p > 0, p * np.log2(p), 0.0).sum())  # only sizes the fill

    def sample(words: np.ndarray) -> tuple[np.ndarray, Any]:
        c = stack_mod.AnsCoder(words)
        return np.asarray(c.decode(_cat(cn), qw), np.int64), c

    avail = 32 * (-(-len(payload) // 4)) + 31
    fill = max(0, int(np.ceil((hq * 1.05 + 96 - avail) / 32)))
    while True:
        init = _initial_words(payload, fill)
        c0 = stack_mod.AnsCoder(init).num_valid_bits()
        z, coder = sample(init)
        left = coder.num_valid_bits()
        if left >= 64 or fill > 1 << 24:
            break
        fill += (64 - left) // 32 + 2
    # trim fill words the sampling never reached (they would only be overhead)
    if fill and left > 96:
        trim = min(fill, (left - 64) // 32)
        init2 = _initial_words(payload, fill - trim)
        z2, coder2 = sample(init2)
        if np.array_equal(z2, z) and coder2.num_valid_bits() >= 32:
            fill -= trim
            init, coder = init2, coder2
            left = coder.num_valid_bits()
    consumed = c0 - left
    _check_strict(strict, payload, consumed)
    # x | z in wavefront order: the decoder pops step 0 first, so push the last step first
    F, lg8e, lg8q = all_features(img, bits)
    base, phase, sidx = params(F, lg8e, lg8q, z[bidx], model, maxv)
    sym, m, off = to_symbols(img.reshape(-1) - base)
    cat, uni = _cat(cn), cn.stream.model.Uniform()
    pmf = model.pmf
    for ys, xs in reversed(list(_steps(H, W))):
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
    head = _HEAD.pack(_MAGIC, 1, bits, H, W, model.tag, init.size, crc, words.size)
    stats = {
        "consumed_bits": float(consumed),
        "hq_bits": hq,
        "fill_words": float(fill),
        "payload_bits": 8.0 * len(payload),
    }
    return head + words.astype("<u4").tobytes(), stats


def _decode_v1(
    words: np.ndarray, H: int, W: int, bits: int, model: GlobalModel, ninit: int, crc: int
) -> tuple[np.ndarray, bytes]:
    cn = _constriction()
    maxv = (1 << bits) - 1
    try:
        coder = cn.stream.stack.AnsCoder(words)
    except ValueError as exc:
        raise CorruptStreamError(f"global-path stream: invalid ANS data ({exc})") from exc
    K = model.K
    bidx, bh, bw = block_index(H, W, model.block)
    nb = bh * bw
    cat, uni = _cat(cn), cn.stream.model.Uniform()
    z = np.asarray(
        coder.decode(cat, np.broadcast_to(model.prior.astype(np.float64), (nb, K)).copy()), np.int64
    )
    zpix = z[bidx]
    P = np.full((H + PAD, W + 2 * PAD), 1 << (bits - 1), np.int64)
    Pf = P.reshape(-1)
    Qf = np.zeros_like(Pf)
    WP = W + 2 * PAD
    offs = [dy * WP + dx for dy, dx in OFFS]
    qoffs = [dy * WP + dx for dy, dx in QOFFS]
    pmf = model.pmf
    for ys, xs in _steps(H, W):
        fidx = (ys + PAD) * WP + xs + PAD
        F, lg8e, lg8q = features([Pf[fidx + o] for o in offs], [Qf[fidx + o] for o in qoffs])
        base, phase, sidx = params(F, lg8e, lg8q, zpix[ys * W + xs], model, maxv)
        sym = np.asarray(coder.decode(cat, pmf[sidx, phase].astype(np.float64)), np.int64)
        sign, b, m = symbol_mbits(sym)
        sel = m > 0
        off = np.zeros(sym.size, np.int64)
        if sel.any():
            off[sel] = coder.decode(uni, (1 << m[sel]).astype(np.int32))
        _place(P, Pf, Qf, fidx, ys, xs, base + from_symbols(sign, b, m, off), F[:, 0], maxv, H, W)
    img = P[PAD:, PAD : W + PAD].copy()
    # bits back: re-encode z under q(z|x), which returns the initial words (payload + fill)
    L, _ = block_costs(img, bits, model)
    qw = posterior_weights(L, model).astype(np.float64)
    coder.encode_reverse(z.astype(np.int32), cat, qw)
    return _finish(np.asarray(coder.get_compressed(), np.uint32), ninit, img, crc)
