"""Local path of the dual-path learned codec: the low ``s`` bit planes given the high part.

A frame is split at plane ``s`` (:mod:`medzip_scp.codec.learned.bitplanes`); the high part is
coded first (pred-v2 or the global model), so the decoder knows it entirely before the low part.
This module codes the low part with a small causal transformer language model
(:class:`~.model.LocalNet`, a 2-layer GPT-2 from ``transformers`` trained from scratch) driving
``constriction``'s ANS coder.

Tokens and parallelism
----------------------
A token is a 2x2 block of low values.  The frame is cut into tiles of 8x8 blocks (16x16 pixels);
each tile is one causal sequence of 64 tokens in raster order, and *all tiles decode as one
batch*: 64 network steps with a KV cache (``past_key_values``) whatever the frame size.  Each
token's input is a "visual prompt" (the high part of its 6x6 pixel neighbourhood) merged with the
already decoded low values of earlier tokens of its tile (exact full values where known); its
output is, for each of the 4 pixels, the location and scale of a logistic over the full value
restricted to the pixel's known interval ``[high << s, (high + 1) << s)``.  The encoder scores
all tokens in one causal pass (teacher forcing).

Determinism (why encoder and decoder build identical integer tables)
--------------------------------------------------------------------
1. Everything before the network is exact: features are integers and halves (< 2**17) divided by
   powers of two, in float64.  The ANS coder sees only integer frequency tables.
2. The network runs in float64.  The encoder (one full causal pass, any batch) and the decoder
   (incremental, KV cache, any batch, any thread count, CPU or GPU) evaluate the same function
   on the same inputs (the decoded low values are exact by induction over the steps), with a
   different order of floating-point operations.  For a network of this size the difference is
   a few hundred ulp at most: measured max |delta| ~1e-15 on the hidden states between the full
   pass and the KV-cache decode, i.e. ~1e-13 in the quantised units below, seven orders of
   magnitude under the margin.  (On a GPU, TF32 must stay off: it is float32-only anyway.)
3. Each pixel's two outputs are quantised: location in 1/8 pixel, log-scale in 1/8, each by
   ``floor(v + 0.5)``; the indices select a *shipped* integer table (sum 2**16, every entry >= 1,
   sha256 in the model manifest), so no transcendental function is evaluated on the probability
   path at decode time.
4. Margin check: the encoder marks a token *unsafe* when any of its 8 quantised values lies
   within ``EPS = 1e-6`` of a rounding boundary (or is not finite).  For a safe token any
   perturbation below EPS rounds identically, so the decoder's indices equal the encoder's.  The
   unsafe tokens (expected ~1.6e-5 of tokens; measured 0-2 per 512x512 slice) are listed in the
   stream (4 bytes each) and coded with the uniform table, which both sides use without
   evaluating the network's output.
5. A CRC-32 of the decoded low values ends the stream: a corrupted stream (or a violated
   assumption) raises :class:`~medzip_scp.codec.errors.CorruptStreamError`, never returns wrong
   values silently.

Stream layout (little-endian)
-----------------------------
``b"MZLL"``, u8 version (1), u8 s, u8 bits, u32 rows, u32 cols, u32 tiles per chunk, 8 bytes of
the model's manifest sha256 (and 8 of the adapter's, zeros for none), u32 n_unsafe, u32[n_unsafe]
token indices (tile * 64 + t), u32 n_chunks, then per chunk u32 n_words and n_words uint32 ANS
words (the chunk's symbols in decode order: step, tile, pixel), then u32 CRC-32 of the low part
as uint16 LE row-major.  Chunks are independent ANS streams of ``tiles per chunk`` consecutive
tiles, so a decoder may batch any number of chunks per network call.

Speed
-----
One float64 pass of the 79k-parameter network per token: a 512x512 slice (65,536 tokens) encodes
or decodes in ~2.5 s on one core of the shared 2-core development machine (~0.1 MPx/s).  Coding
functions run torch with one intra-op thread by default (``threads=``): on a loaded 2-core
machine two threads of these small ops were up to 10x slower.  Results never depend on it.

Adapters
--------
``load_model(name, adapter="ct")`` merges a LoRA adapter (``peft``, trained per modality by
:mod:`.train`) into the weights; its sha256 is part of :attr:`LocalModel.adapter_sha256` and of
the stream header, so a stream names the adapter it needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import constriction
import numpy as np
import numpy.typing as npt
import torch

from medzip_scp.codec.errors import CodecError, CorruptStreamError, UnknownModelError

from . import model as M

__all__ = [
    "MODEL_ID",
    "LocalModel",
    "choose_split",
    "decode_low",
    "encode_low",
    "estimate_bits",
    "load_model",
]

MODEL_ID = "local-lm-v1"
_MAGIC = b"MZLL"
_VERSION = 1
_CHUNK_TILES = 1024
_HEADER = struct.Struct("<4sBBBIII8s8sI")
MODELS_ROOT = Path(__file__).resolve().parents[4] / "models"
# sha256 of each released model's manifest.json (which lists the sha256 of every file): a model
# id is never reused, so its manifest may never change.
PINNED_MANIFESTS = {
    "local-lm-v1": "da280dcb29bd0cb704057f05715e110b2d47866ead21f1f4716843f75e4a80b0",
}


@dataclass
class LocalModel:
    """Loaded local-path model: the float64 network and its shipped integer tables."""

    model_id: str
    net: M.LocalNet
    tables: dict[int, npt.NDArray[np.int64]]
    sha256: bytes  # sha256 of manifest.json (which lists every file's sha256)
    adapter: str = ""
    adapter_sha256: bytes = field(default=bytes(32))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run torch with ``n`` intra-op threads (``None``: leave as is), restoring the old count.

    Results never depend on the thread count (see the determinism argument); speed does: on a
    loaded 2-core machine two threads of tiny ops are up to 10x slower than one.
    """
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None and n != old:
            torch.set_num_threads(old)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_dir(name: str, root: Path | None) -> Path:
    if not name.startswith("local-lm-"):
        raise UnknownModelError(name, "?", "0" * 64)
    return (root or MODELS_ROOT) / "local-lm" / name.removeprefix("local-lm-")


def load_model(
    name: str = MODEL_ID, adapter: str | None = None, root: Path | None = None
) -> LocalModel:
    """Load ``models/local-lm/<version>/`` after checking every file against its manifest.

    Parameters
    ----------
    name
        Model id, ``"local-lm-<version>"``.
    adapter
        Optional LoRA adapter (e.g. ``"ct"``, ``"mr"``) under ``adapters/<adapter>/``, merged
        into the weights.
    root
        Models folder (default: the repository's ``models/``).

    Raises
    ------
    UnknownModelError
        If the folder, a file or the adapter is missing, or a sha256 differs from the manifest.
    """
    d = _model_dir(name, root)
    manifest_path = d / "manifest.json"
    if not manifest_path.is_file():
        raise UnknownModelError(name, f"(no manifest at {manifest_path})", "0" * 64)
    man_bytes = manifest_path.read_bytes()
    man_sha = hashlib.sha256(man_bytes).digest()
    pinned = PINNED_MANIFESTS.get(name)
    if pinned is not None and man_sha.hex() != pinned:
        raise UnknownModelError(
            name, f"{pinned} (installed manifest has sha256 {man_sha.hex()})", "0" * 64
        )
    manifest = json.loads(man_bytes)
    for rel, want in manifest["files"].items():
        p = d / rel
        if not p.is_file() or _sha(p) != want:
            got = _sha(p) if p.is_file() else "missing"
            raise UnknownModelError(
                name, f"{man_sha.hex()} (file {rel}: expected sha256 {want}, got {got})", "0" * 64
            )
    from safetensors.numpy import load_file

    cfg = M.NetConfig(**json.loads((d / "config.json").read_text())["net"])
    net = M.LocalNet(cfg)
    weights = load_file(d / "weights.safetensors")
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    ad_sha = bytes(32)
    if adapter:
        rel = f"adapters/{adapter}/adapter_model.safetensors"
        if rel not in manifest["files"]:
            raise UnknownModelError(name, man_sha.hex(), f"(adapter {adapter!r} not installed)")
        ad_sha = bytes.fromhex(manifest["files"][rel])
        from .adapters import merge_adapter

        merge_adapter(net, d / "adapters" / adapter)
    net = net.double().eval()
    tabs = load_file(d / "tables.safetensors")
    tables = {s: tabs[f"s{s}"].astype(np.int64) for s in range(1, M.S_MAX + 1)}
    return LocalModel(name, net, tables, man_sha, adapter or "", ad_sha)


# ---------------------------------------------------------------------------------------------


def _check(low, high, s: int, bits: int) -> None:  # noqa: ANN001
    if not 1 <= s <= M.S_MAX:
        raise ValueError(f"split plane s must be in 1..{M.S_MAX} for the local path, got {s}")
    if not s <= bits <= 16:
        raise ValueError(f"bits must be in s..16 = {s}..16, got {bits}")
    if high.ndim != 2:
        raise ValueError(f"high must be 2-D, got shape {high.shape}")
    if low is not None:
        if low.shape != high.shape:
            raise ValueError(
                f"low and high must have the same shape, got {low.shape}, {high.shape}"
            )
        if low.size and int(low.max()) >= (1 << s):
            raise ValueError(f"low values must be below 2**s = {1 << s}")


@torch.no_grad()
def _full_pass(
    model: LocalModel,
    high: npt.NDArray,
    low: npt.NDArray,
    s: int,
    bits: int,
    batch_tiles: int = 1024,
):
    """Quantised parameters of every token by one causal pass per batch of tiles.

    Returns table indices ``mi, li`` (n_tiles, 64, 4), unsafe (n_tiles, 64), symbols and validity
    (n_tiles, 64, 4).
    """
    g = M.Geometry.of(*high.shape)
    base = g.pad(high, "edge") << s
    full = base + g.pad(low, "zero")
    n = g.n_tiles
    mi = np.empty((n, M.TOKENS, 4), np.int64)
    li = np.empty((n, M.TOKENS, 4), np.int64)
    bad = np.empty((n, M.TOKENS), bool)
    sym = np.empty((n, M.TOKENS, 4), np.int64)
    val = np.empty((n, M.TOKENS, 4), bool)
    t = np.tile(np.arange(M.TOKENS), 1)
    for a in range(0, n, batch_tiles):
        tiles = np.arange(a, min(n, a + batch_tiles))
        tt = np.repeat(tiles, M.TOKENS)
        ts = np.tile(t, len(tiles))
        y0, x0 = g.block_origin(tt, ts)
        f, off = M.features(full, base, y0, x0, ts, s, bits)
        raw, _ = model.net(torch.from_numpy(f).view(len(tiles), M.TOKENS, M.N_FEAT))
        raw = raw.reshape(-1, 4, 2).numpy()
        m_, l_, b_ = M.quantise(raw, off, s)
        sl = slice(a, a + len(tiles))
        mi[sl] = m_.reshape(-1, M.TOKENS, 4)
        li[sl] = l_.reshape(-1, M.TOKENS, 4)
        bad[sl] = b_.reshape(-1, M.TOKENS)
        py = y0[:, None] + M._POFF[None, :, 0]
        px = x0[:, None] + M._POFF[None, :, 1]
        sym[sl] = (full[py, px] - base[py, px]).reshape(-1, M.TOKENS, 4)
        val[sl] = g.valid(py, px).reshape(-1, M.TOKENS, 4)
    return g, mi, li, bad, sym, val


def _freqs(model: LocalModel, s: int, mi, li, bad) -> npt.NDArray[np.int64]:  # noqa: ANN001
    f = model.tables[s][mi, li]  # (..., 4, 2**s)
    if bad.any():
        f[bad] = (1 << M.PREC) >> s
    return f


def _crc(low: npt.NDArray) -> int:
    return zlib.crc32(np.ascontiguousarray(low, dtype="<u2").tobytes())


def estimate_bits(
    low, high, s: int, bits: int, model: LocalModel, *, threads: int | None = 1
) -> float:  # noqa: ANN001
    """Ideal code length (bits) of ``low`` given ``high`` under the model's integer tables.

    Within ~0.1 % of ``8 * len(encode_low(...))`` minus the ~40-byte header, for large frames.
    """
    low = np.asarray(low)
    high = np.asarray(high)
    _check(low, high, s, bits)
    with _threads(threads):
        _, mi, li, bad, sym, val = _full_pass(model, high, low, s, bits)
    f = _freqs(model, s, mi, li, bad[..., None].repeat(4, -1))
    p = np.take_along_axis(f, sym[..., None], -1)[..., 0]
    return float(-(np.log2(p[val]) - M.PREC).sum())


def encode_low(
    low,
    high,
    s: int,
    bits: int,
    model: LocalModel,
    *,
    chunk_tiles: int = _CHUNK_TILES,  # noqa: ANN001
    threads: int | None = 1,
) -> bytes:
    """Encode the low ``s`` planes of a frame given its high part.

    Parameters
    ----------
    low, high
        ``uint16`` arrays of one shape: ``frame & (2**s - 1)`` and ``frame >> s``.
    s
        Split plane, 1..4.
    bits
        Bit depth of the whole frame.
    model
        From :func:`load_model`.
    chunk_tiles
        Tiles per independent ANS chunk (recorded in the stream; decoders may batch chunks).
    threads
        torch intra-op threads while coding (``None``: unchanged); never changes the bytes.

    Returns
    -------
    bytes
        The stream (layout in the module docstring).

    Raises
    ------
    ValueError
        If the shapes, ``s``, ``bits`` or the low values are out of range.
    """
    low = np.asarray(low)
    high = np.asarray(high)
    _check(low, high, s, bits)
    with _threads(threads):
        g, mi, li, bad, sym, val = _full_pass(model, high, low, s, bits)
    unsafe = np.flatnonzero(bad.reshape(-1)).astype("<u4")
    f = _freqs(model, s, mi, li, bad[..., None].repeat(4, -1))
    fam = constriction.stream.model.Categorical(perfect=False)
    out = [
        _HEADER.pack(
            _MAGIC,
            _VERSION,
            s,
            bits,
            high.shape[0],
            high.shape[1],
            chunk_tiles,
            model.sha256[:8],
            model.adapter_sha256[:8],
            len(unsafe),
        ),
        unsafe.tobytes(),
    ]
    if chunk_tiles < 1:
        raise ValueError(f"chunk_tiles must be >= 1, got {chunk_tiles}")
    chunks = range(0, g.n_tiles, chunk_tiles)
    out.append(struct.pack("<I", len(chunks)))
    for a in chunks:
        sl = slice(a, a + chunk_tiles)
        # decode order: step, tile, pixel
        v = val[sl].transpose(1, 0, 2).reshape(-1)
        sy = sym[sl].transpose(1, 0, 2).reshape(-1)[v]
        pr = f[sl].transpose(1, 0, 2, 3).reshape(-1, 1 << s)[v] / float(1 << M.PREC)
        coder = constriction.stream.stack.AnsCoder()
        if len(sy):
            coder.encode_reverse(sy.astype(np.int32), fam, pr)
        w = coder.get_compressed().astype("<u4")
        out += [struct.pack("<I", len(w)), w.tobytes()]
    out.append(struct.pack("<I", _crc(low)))
    return b"".join(out)


@torch.no_grad()
def decode_low(
    data: bytes,
    high,
    s: int,
    bits: int,
    model: LocalModel,
    batch_chunks: int = 4,  # noqa: ANN001
    threads: int | None = 1,
) -> npt.NDArray[np.uint16]:
    """Decode a stream of :func:`encode_low` given the (already decoded) high part.

    ``batch_chunks`` chunks (of 1024 tiles = 262,144 pixels) go through the network together;
    it changes speed and memory, never the result; so does ``threads`` (torch intra-op threads,
    ``None`` leaves the process setting alone).

    Raises
    ------
    CorruptStreamError
        If the stream is truncated, inconsistent with ``high``/``s``/``bits``/``model``, or its
        CRC-32 does not match the decoded values.
    """
    high = np.asarray(high)
    _check(None, high, s, bits)
    mv = memoryview(data)
    try:
        (magic, ver, s_, bits_, rows, cols, chunk_tiles, msha, asha, n_unsafe) = (
            _HEADER.unpack_from(mv, 0)
        )
    except struct.error as e:
        raise CorruptStreamError(f"local-path stream truncated: {len(data)} bytes") from e
    if magic != _MAGIC:
        raise CorruptStreamError(
            f"local-path stream must start with {_MAGIC!r}, got {bytes(magic)!r}"
        )
    if ver != _VERSION:
        raise CorruptStreamError(f"local-path stream version must be {_VERSION}, got {ver}")
    if (s_, bits_, rows, cols) != (s, bits, *high.shape):
        raise CorruptStreamError(
            f"local-path stream is for s={s_}, bits={bits_}, shape=({rows}, {cols}); "
            f"expected s={s}, bits={bits}, shape={high.shape}"
        )
    if msha != model.sha256[:8] or asha != model.adapter_sha256[:8]:
        raise CorruptStreamError(
            f"local-path stream was coded with model {msha.hex()}/adapter {asha.hex()}; "
            f"the loaded model is {model.sha256[:8].hex()}/{model.adapter_sha256[:8].hex()}"
        )
    g = M.Geometry.of(rows, cols)
    pos = _HEADER.size
    try:
        unsafe = np.frombuffer(mv, "<u4", n_unsafe, pos).astype(np.int64)
        pos += 4 * n_unsafe
        (n_chunks,) = struct.unpack_from("<I", mv, pos)
        pos += 4
        if chunk_tiles < 1 or n_chunks != -(-g.n_tiles // chunk_tiles):
            raise CorruptStreamError(
                f"local-path stream has {n_chunks} chunks, inconsistent with its shape"
            )
        words = []
        for _ in range(n_chunks):
            (nw,) = struct.unpack_from("<I", mv, pos)
            pos += 4
            words.append(np.frombuffer(mv, "<u4", nw, pos).astype(np.uint32))
            pos += 4 * nw
        (crc,) = struct.unpack_from("<I", mv, pos)
        pos += 4
    except (struct.error, ValueError) as e:
        raise CorruptStreamError(f"local-path stream truncated or malformed: {e}") from e
    if pos != len(data):
        raise CorruptStreamError(f"local-path stream has {len(data) - pos} trailing bytes")
    bad_all = np.zeros(g.n_tiles * M.TOKENS, bool)
    if n_unsafe and (unsafe.max() >= len(bad_all)):
        raise CorruptStreamError("local-path stream lists an unsafe token beyond the frame")
    bad_all[unsafe] = True
    bad_all = bad_all.reshape(g.n_tiles, M.TOKENS)

    base = g.pad(high, "edge") << s
    full = base.copy()
    coders = [constriction.stream.stack.AnsCoder(w) for w in words]
    with _threads(threads):
        low = _decode_steps(
            model, g, s, bits, base, full, bad_all, coders, n_chunks, chunk_tiles, batch_chunks
        )
    b = M.BORDER
    low = low[b : b + rows, b : b + cols].astype(np.uint16)
    if _crc(low) != crc or not all(c.is_empty() for c in coders):
        raise CorruptStreamError("local-path stream CRC-32 mismatch: the stream is corrupted")
    return low


def _decode_steps(
    model, g, s, bits, base, full, bad_all, coders, n_chunks, chunk_tiles, batch_chunks
):  # noqa: ANN001, ANN202
    fam = constriction.stream.model.Categorical(perfect=False)
    try:
        for c0 in range(0, n_chunks, max(1, batch_chunks)):
            cs = range(c0, min(n_chunks, c0 + max(1, batch_chunks)))
            tiles = np.arange(cs[0] * chunk_tiles, min(g.n_tiles, (cs[-1] + 1) * chunk_tiles))
            cache = None
            for t in range(M.TOKENS):
                ts = np.full(len(tiles), t)
                y0, x0 = g.block_origin(tiles, ts)
                f, off = M.features(full, base, y0, x0, ts, s, bits)
                raw, cache = model.net(torch.from_numpy(f)[:, None, :], cache, position=t)
                mi, li, _ = M.quantise(raw.reshape(-1, 4, 2).numpy(), off, s)
                bad = np.repeat(bad_all[tiles, t][:, None], 4, 1)
                fr = _freqs(model, s, mi, li, bad)
                py = y0[:, None] + M._POFF[None, :, 0]
                px = x0[:, None] + M._POFF[None, :, 1]
                v = g.valid(py, px)
                vals = np.zeros((len(tiles), 4), np.int64)
                for c in cs:
                    r = slice(
                        c * chunk_tiles - tiles[0],
                        min(len(tiles), (c + 1) * chunk_tiles - tiles[0]),
                    )
                    vv = v[r].reshape(-1)
                    if not vv.any():
                        continue
                    pr = fr[r].reshape(-1, 1 << s)[vv] / float(1 << M.PREC)
                    d = coders[c].decode(fam, pr)
                    tmp = np.zeros(len(vv), np.int64)
                    tmp[vv] = d
                    vals[r] = tmp.reshape(-1, 4)
                full[py, px] = base[py, px] + vals
    except CodecError:
        raise
    except Exception as e:  # constriction raises on exhausted / malformed words
        raise CorruptStreamError(f"local-path stream could not be decoded: {e}") from e
    return full - base


def choose_split(
    frame,  # noqa: ANN001
    bits: int,
    model: LocalModel,
    candidates: tuple[int, ...] = (1, 2, 3, 4),
    *,
    threads: int | None = 1,
) -> tuple[int, dict[int, float]]:
    """Pick the split plane of a frame by measured cost: pred-v2 bytes of the high part plus the
    local path's ideal code length of the low part, against pred-v2 on the whole frame (s = 0).

    Returns the chosen ``s`` (0 = no split) and the cost in bits of every candidate.  Costs one
    pred-v2 encode and one network pass per candidate.
    """
    from medzip_scp.codec.learned import bitplanes
    from medzip_scp.codec.predictive import encode_frame

    frame = np.asarray(frame)
    cost = {0: 8.0 * len(encode_frame(frame, bits))}
    for s in candidates:
        if not 1 <= s <= min(M.S_MAX, bits - 1):
            continue
        high, low = bitplanes.split(frame, bits, s)
        cost[s] = (
            8.0 * len(encode_frame(high, bits - s))
            + estimate_bits(low, high, s, bits, model, threads=threads)
            + 8.0 * (_HEADER.size + 12)
        )
    return min(cost, key=lambda k: (cost[k], k)), cost
