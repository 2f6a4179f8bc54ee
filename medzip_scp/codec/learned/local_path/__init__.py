"""Local path of the dual-path learned codec: the low ``s`` bit planes given the high part.

A frame is split at plane ``s`` (:mod:`medzip_scp.codec.learned.bitplanes`); the high part is
coded first (pred-v2 or the global model), so the decoder knows it entirely before the low part.
This module codes the low part with a small causal transformer language model (a 2-layer GPT-2
trained from scratch, :mod:`.float_net`; run in integers by :mod:`.intnet`) driving an ANS coder:
the project's integer rANS (:mod:`..rans`) for version 2, ``constriction``'s for version 1.

Tokens and parallelism
----------------------
A token is a 2x2 block of low values.  The frame is cut into tiles of 8x8 blocks (16x16 pixels);
each tile is one causal sequence of 64 tokens in raster order, and *all tiles decode as one
batch*: 64 network steps with a key/value cache whatever the frame size.  Each token's input is a
"visual prompt" (the high part of its 6x6 pixel neighbourhood) merged with the already decoded
low values of earlier tokens of its tile (exact full values where known); its output is, for each
of the 4 pixels, the location and scale of a logistic over the full value restricted to the
pixel's known interval ``[high << s, (high + 1) << s)``, quantised (1/8 pixel, 1/8 log-scale)
to index a *shipped* integer frequency table (sum ``2**16``, sha256 in the model manifest).  The
encoder scores all tokens in one causal pass (teacher forcing).

Stream versions and models
--------------------------
**Version 2** (written by default, models ``local-lm-v2`` and later): the network runs in the
project's own integer kernel (:mod:`.intnet`, numpy, integer weights and lookup tables shipped in
the model folder, every product exact).  The table indices are integers computed by integer
floor division, so the encoder and any decoder (any CPU, thread count, batch size, numpy/BLAS
version) compute the same indices: no margin check.  The indexed rows of ``tables.safetensors``
(integers, each summing to ``2**16``, every entry >= 1: :func:`load_model` refuses others) go
to the project's integer rANS (:class:`..rans.WordStack`, Python integers) unchanged: no float
probability and no third-party coder, so neither ``torch``, ``transformers`` nor
``constriction`` is imported to encode or decode.  (Version 2 coded with constriction's float
``Categorical`` until it moved to the integer rANS, in place, before any version-2 stream left
development; its goldens were regenerated then.)

**Version 1** (``local-lm-v1``; still decoded, written only when asked with that model): the
float64 ``transformers`` network.  Encoder and decoder evaluate it with a different order of
floating-point operations (full pass vs. key/value cache, any batch), which moves the outputs by
~1e-13 quantisation steps; a token whose 8 quantised values lie within ``EPS = 1e-6`` of a
rounding boundary is *unsafe*, listed in the stream and coded with the uniform table.  The ANS
coder is ``constriction``'s, fed the integer rows as float probabilities, which it re-quantises
with its own algorithm (written with 0.5.0; part of the format).  This needs ``constriction``,
``torch`` and the ``transformers`` releases whose GPT-2 API the model code uses
(:data:`V1_LIBRARIES`, the same bounds as ``pyproject.toml``); with any other version loading the
model raises :class:`~medzip_scp.codec.errors.IncompatibleLibraryError` naming the library.

Both versions end with a CRC-32 of the decoded low values: a corrupted stream (or a violated
assumption) raises :class:`~medzip_scp.codec.errors.CorruptStreamError`, never returns wrong
values silently.

Stream layout (little-endian)
-----------------------------
``b"MZLL"``, u8 version, u8 s, u8 bits, u32 rows, u32 cols, u32 tiles per chunk, 8 bytes of the
model's manifest sha256 (and 8 of the adapter's, zeros for none); version 1 only: u32 n_unsafe,
u32[n_unsafe] token indices (tile * 64 + t); then u32 n_chunks, per chunk u32 n_words and n_words
uint32 ANS words (the chunk's symbols in decode order: step, tile, pixel), then u32 CRC-32 of the
low part as uint16 LE row-major.  Version 2 chunk words: one :class:`..rans.WordStack` (64-bit
state, 32-bit words, precision 16; top of the stack last, at least 2 words, ``[0, 1]`` for a
chunk without pixels); version 1: ``constriction``'s ``AnsCoder.get_compressed()``.  Chunks are
independent ANS streams of ``tiles per chunk`` consecutive tiles, so a decoder may batch any
number of chunks per network call.

Speed
-----
One pass of the 79k-parameter network per token (65,536 tokens for a 512x512 slice).  Version 2
(integer kernel, float64 BLAS products of integer arrays): see ``models/local-lm/v2/CARD.md``
for measured MPx/s; version 1 (torch float64): ~0.1 MPx/s on one core of the shared 2-core
development machine.  ``threads`` sets torch's intra-op threads for version 1 (default 1: on a
loaded 2-core machine two threads of these small ops were up to 10x slower); results never depend
on it, nor on BLAS threads for version 2.

Adapters
--------
``load_model(name, adapter="ct")`` merges a per-modality LoRA adapter into the weights: for
integer models as integer LoRA factors merged in int64 (:func:`.quantize.merge_adapter`), for
``local-lm-v1`` with ``peft``.  Its sha256 is :attr:`LocalModel.adapter_sha256` and in the stream
header, so a stream names the adapter it needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medzip_scp.codec.errors import (
    CorruptStreamError,
    IncompatibleLibraryError,
    UnknownModelError,
    UnsupportedFormatError,
)
from medzip_scp.codec.zoo import DEFAULT_MODELS_ROOT, check_model_folder

from ..rans import WordStack, cumulative
from . import model as M
from .intnet import IntNet

__all__ = [
    "MODEL_ID",
    "V1_LIBRARIES",
    "LocalModel",
    "check_v1_libraries",
    "choose_split",
    "decode_low",
    "encode_low",
    "estimate_bits",
    "load_model",
    "write_manifest",
]

MODEL_ID = "local-lm-v2"
"""The model new streams are coded with by default."""
_MAGIC = b"MZLL"
_FLOAT_VERSION = 1  # float64 transformers network, margin check, unsafe-token list
_INT_VERSION = 2  # integer kernel
_CHUNK_TILES = 1024
_HEADER = struct.Struct("<4sBBBIII8s8s")
V1_LIBRARIES = {
    "torch": ((2, 3), (2, 14)),
    "transformers": ((5, 24), (5, 26)),
    "peft": ((0, 10), (0, 22)),
}
"""Versions ``[lower, upper)`` that decode ``local-lm-v1`` streams (``peft`` only for its
adapters); ``pyproject.toml`` pins the same bounds.  transformers 5.24.0 and 5.25.0 decode the
version-1 goldens; 4.57.6, 5.20.2, 5.21.1, 5.22.2 and 5.23.0 lack the ``cache=`` argument and
output of GPT-2 that the model code uses."""
_INT_KERNEL = "int-v1"


def _spec(lib: str) -> str:
    lo, hi = V1_LIBRARIES[lib]
    return f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def check_v1_libraries(adapter: bool = False) -> None:
    """Raise :class:`IncompatibleLibraryError` unless the installed ``torch``, ``transformers``
    (and ``peft`` for an adapter) are within :data:`V1_LIBRARIES`."""
    for lib in ("torch", "transformers", *(("peft",) if adapter else ())):
        try:
            have = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            raise IncompatibleLibraryError("local-lm-v1 streams", lib, _spec(lib), None) from None
        lo, hi = V1_LIBRARIES[lib]
        if not lo <= _release(have) < hi:
            raise IncompatibleLibraryError("local-lm-v1 streams", lib, _spec(lib), have)


@dataclass
class LocalModel:
    """Loaded local-path model: its network and shipped integer frequency tables.

    Exactly one of ``int_net`` (integer kernel: streams version 2) and ``net`` (the float64
    ``transformers`` network of ``local-lm-v1``: streams version 1) is set.
    """

    model_id: str
    tables: dict[int, npt.NDArray[np.int64]]
    sha256: bytes  # sha256 of manifest.json (which lists every file's sha256)
    adapter: str = ""
    adapter_sha256: bytes = field(default=bytes(32))
    int_net: IntNet | None = None
    net: Any = None

    @property
    def stream_version(self) -> int:
        return _INT_VERSION if self.int_net is not None else _FLOAT_VERSION


@contextlib.contextmanager
def _threads(model: LocalModel, n: int | None) -> Iterator[None]:
    """Run the network with ``n`` threads (``None``: leave the process setting as is): torch's
    intra-op threads for a float model, the BLAS threads (``threadpoolctl``, when installed) for
    an integer model.

    Results never depend on the thread count; speed does: on a loaded 2-core machine two threads
    of these small products were 10-15x slower than one (torch and OpenBLAS alike).
    """
    if n is None:
        yield
        return
    if model.net is None:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: speed only
            yield
            return
        with threadpool_limits(n, user_api="blas"):
            yield
        return
    import torch

    old = torch.get_num_threads()
    if n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != old:
            torch.set_num_threads(old)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(out_dir: Path) -> None:
    """Write ``out_dir/manifest.json``: the sha256 of every file but itself and ``CARD.md``."""
    files = sorted(
        p for p in out_dir.rglob("*") if p.is_file() and p.name not in ("manifest.json", "CARD.md")
    )
    man = {"files": {p.relative_to(out_dir).as_posix(): _sha(p) for p in files}}
    (out_dir / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")


def _model_dir(name: str, root: Path | None) -> Path:
    if not name.startswith("local-lm-"):
        raise UnknownModelError(name, "unknown", "0" * 64, "is not a local-lm model id")
    return (root or DEFAULT_MODELS_ROOT) / "local-lm" / name.removeprefix("local-lm-")


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
    IncompatibleLibraryError
        ``local-lm-v1`` only: if torch, transformers (or peft, for an adapter) is missing or
        outside :data:`V1_LIBRARIES`.
    UnsupportedFormatError
        If the model needs an integer kernel this decoder does not implement.
    """
    d = _model_dir(name, root)
    files, man_sha = check_model_folder(name, d, ("config.json", "tables.safetensors"))
    from safetensors.numpy import load_file

    config = json.loads((d / "config.json").read_text())
    cfg = M.NetConfig(**config["net"])
    integer = "kernel" in config
    ad_rel = f"adapters/{adapter}/adapter{'' if integer else '_model'}.safetensors"
    if adapter and ad_rel not in files:
        raise UnknownModelError(
            name, man_sha.hex(), "0" * 64, f"has no adapter {adapter!r} installed"
        )
    ad_sha = bytes.fromhex(files[ad_rel]) if adapter else bytes(32)
    tabs = load_file(d / "tables.safetensors")
    tables = {s: tabs[f"s{s}"].astype(np.int64) for s in range(1, M.S_MAX + 1)}
    for s, tab in tables.items():
        # version 2 hands these rows to the integer rANS unchanged: they must be exact
        if tab.min() < 1 or (tab.sum(-1) != 1 << M.PREC).any():
            raise UnsupportedFormatError(
                f"model {name}: tables.safetensors s{s} rows must sum to 2**{M.PREC} with every "
                "entry >= 1: reinstall the model"
            )
    model = LocalModel(name, tables, man_sha, adapter or "", ad_sha)
    if integer:
        if config["kernel"].get("format") != _INT_KERNEL:
            raise UnsupportedFormatError(
                f"model {name} needs integer kernel {config['kernel'].get('format')!r}; this "
                f"decoder implements {_INT_KERNEL!r}: upgrade medzip"
            )
        weights = load_file(d / "weights.safetensors")
        if adapter:
            from .quantize import merge_adapter

            weights = merge_adapter(weights, load_file(d / ad_rel))
        model.int_net = IntNet(weights, cfg.heads)
        return model
    check_v1_libraries(bool(adapter))
    try:
        import torch

        from .float_net import LocalNet

        net = LocalNet(cfg)
        net.load_state_dict(
            {k: torch.from_numpy(v) for k, v in load_file(d / "weights.safetensors").items()}
        )
        if adapter:
            from .adapters import merge_adapter as merge_lora

            merge_lora(net, d / "adapters" / adapter)
    except ImportError as exc:  # installed (per its metadata) but not importable
        lib = (exc.name or "torch").split(".")[0]
        spec = _spec(lib) if lib in V1_LIBRARIES else ""
        raise IncompatibleLibraryError("local-lm-v1 streams", lib, spec, None) from exc
    model.net = net.double().eval()
    return model


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


def _float_pass(model: LocalModel, full, base, y0, x0, ts, s: int, bits: int, n_tiles: int):  # noqa: ANN001, ANN202
    """Version 1: quantised parameters and unsafe flags of whole tiles (one causal pass)."""
    import torch

    f, off = M.features(full, base, y0, x0, ts, s, bits)
    with torch.no_grad():
        raw, _ = model.net(torch.from_numpy(f).view(n_tiles, M.TOKENS, M.N_FEAT))
    return M.quantise(raw.reshape(-1, 4, 2).numpy(), off, s)


def _full_pass(
    model: LocalModel,
    high: npt.NDArray,
    low: npt.NDArray,
    s: int,
    bits: int,
    batch_tiles: int = 1024,
):
    """Table indices of every token by one causal pass per batch of tiles.

    Returns the geometry, table indices ``mi, li`` (n_tiles, 64, 4), unsafe flags (n_tiles, 64;
    always false for integer models), symbols and validity (n_tiles, 64, 4).
    """
    g = M.Geometry.of(*high.shape)
    base = g.pad(high, "edge") << s
    full = base + g.pad(low, "zero")
    n = g.n_tiles
    mi = np.empty((n, M.TOKENS, 4), np.int64)
    li = np.empty((n, M.TOKENS, 4), np.int64)
    bad = np.zeros((n, M.TOKENS), bool)
    sym = np.empty((n, M.TOKENS, 4), np.int64)
    val = np.empty((n, M.TOKENS, 4), bool)
    for a in range(0, n, batch_tiles):
        tiles = np.arange(a, min(n, a + batch_tiles))
        tt = np.repeat(tiles, M.TOKENS)
        ts = np.tile(np.arange(M.TOKENS), len(tiles))
        y0, x0 = g.block_origin(tt, ts)
        sl = slice(a, a + len(tiles))
        if model.int_net is not None:
            f, ref8 = model.int_net.features(full, base, y0, x0, ts, s)
            raw = model.int_net.forward(f.reshape(len(tiles), M.TOKENS, M.N_FEAT))
            m_, l_ = model.int_net.indices(raw.reshape(-1, 8), ref8, s)
        else:
            m_, l_, b_ = _float_pass(model, full, base, y0, x0, ts, s, bits, len(tiles))
            bad[sl] = b_.reshape(-1, M.TOKENS)
        mi[sl] = m_.reshape(-1, M.TOKENS, 4)
        li[sl] = l_.reshape(-1, M.TOKENS, 4)
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


def _constriction() -> Any:
    """constriction, which version 1 streams need (its float ``Categorical`` re-quantiser is part
    of their format); version 2 never imports it."""
    try:
        import constriction
    except ImportError:
        raise IncompatibleLibraryError(
            "local-lm-v1 streams", "constriction", ">=0.4,<0.6", None
        ) from None
    return constriction


def _rans_encode(freqs: npt.NDArray[np.int64], symbols: npt.NDArray[np.int64]) -> npt.NDArray:
    """Version 2: one chunk's symbols (in decode order), each with its integer frequency row
    (sum ``2**PREC``, entries >= 1), as the words of one :class:`..rans.WordStack`."""
    idx = np.arange(len(symbols))
    f = freqs[idx, symbols]
    start = np.cumsum(freqs, axis=1)[idx, symbols] - f
    stack = WordStack()
    stack.encode_symbols(start.tolist(), f.tolist(), M.PREC)
    return np.asarray(stack.words(), "<u4")


def _constriction_encode(freqs: npt.NDArray[np.int64], symbols: npt.NDArray[np.int64]):  # noqa: ANN202
    """Version 1: the rows as float probabilities, re-quantised by constriction (its format)."""
    constriction = _constriction()
    coder = constriction.stream.stack.AnsCoder()
    if len(symbols):
        fam = constriction.stream.model.Categorical(perfect=False)
        coder.encode_reverse(symbols.astype(np.int32), fam, freqs / float(1 << M.PREC))
    return coder.get_compressed().astype("<u4")


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
    with _threads(model, threads):
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

    Writes stream version 2 with an integer model (``local-lm-v2``), version 1 with
    ``local-lm-v1``.

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
        torch intra-op threads while coding a version-1 stream (``None``: unchanged); never
        changes the bytes.

    Returns
    -------
    bytes
        The stream (layout in the module docstring).

    Raises
    ------
    ValueError
        If the shapes, ``s``, ``bits``, ``chunk_tiles`` or the low values are out of range.
    """
    low = np.asarray(low)
    high = np.asarray(high)
    _check(low, high, s, bits)
    if chunk_tiles < 1:
        raise ValueError(f"chunk_tiles must be >= 1, got {chunk_tiles}")
    with _threads(model, threads):
        g, mi, li, bad, sym, val = _full_pass(model, high, low, s, bits)
    f = _freqs(model, s, mi, li, bad[..., None].repeat(4, -1))
    version = model.stream_version
    rows, cols = high.shape
    out = [
        _HEADER.pack(
            _MAGIC,
            version,
            s,
            bits,
            rows,
            cols,
            chunk_tiles,
            model.sha256[:8],
            model.adapter_sha256[:8],
        )
    ]
    if version == _FLOAT_VERSION:
        unsafe = np.flatnonzero(bad.reshape(-1)).astype("<u4")
        out += [struct.pack("<I", len(unsafe)), unsafe.tobytes()]
    chunks = range(0, g.n_tiles, chunk_tiles)
    out.append(struct.pack("<I", len(chunks)))
    for a in chunks:
        sl = slice(a, a + chunk_tiles)
        # decode order: step, tile, pixel
        v = val[sl].transpose(1, 0, 2).reshape(-1)
        sy = sym[sl].transpose(1, 0, 2).reshape(-1)[v]
        fr = f[sl].transpose(1, 0, 2, 3).reshape(-1, 1 << s)[v]
        w = _rans_encode(fr, sy) if version == _INT_VERSION else _constriction_encode(fr, sy)
        out += [struct.pack("<I", len(w)), w.tobytes()]
    out.append(struct.pack("<I", _crc(low)))
    return b"".join(out)


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

    ``batch_chunks`` chunks (of 1024 tiles = 262,144 pixels by default) go through the network
    together; it changes speed and memory (the key/value cache holds ~130 kB per tile), never
    the result; so does ``threads`` (torch intra-op threads for version 1, ``None`` leaves the
    process setting alone).

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
        (magic, ver, s_, bits_, rows, cols, chunk_tiles, msha, asha) = _HEADER.unpack_from(mv, 0)
    except struct.error as e:
        raise CorruptStreamError(f"local-path stream truncated: {len(data)} bytes") from e
    if magic != _MAGIC:
        raise CorruptStreamError(
            f"local-path stream must start with {_MAGIC!r}, got {bytes(magic)!r}"
        )
    if ver not in (_FLOAT_VERSION, _INT_VERSION):
        raise CorruptStreamError(f"local-path stream version must be 1 or 2, got {ver}")
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
    if ver != model.stream_version:
        raise CorruptStreamError(
            f"local-path stream version {ver} cannot be decoded with {model.model_id} "
            f"(version {model.stream_version} streams)"
        )
    g = M.Geometry.of(rows, cols)
    pos = _HEADER.size
    bad_all = np.zeros(g.n_tiles * M.TOKENS, bool)
    try:
        if ver == _FLOAT_VERSION:
            (n_unsafe,) = struct.unpack_from("<I", mv, pos)
            unsafe = np.frombuffer(mv, "<u4", n_unsafe, pos + 4).astype(np.int64)
            pos += 4 + 4 * n_unsafe
            if n_unsafe and (unsafe.max() >= len(bad_all)):
                raise CorruptStreamError("local-path stream lists an unsafe token beyond the frame")
            bad_all[unsafe] = True
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
    bad_all = bad_all.reshape(g.n_tiles, M.TOKENS)
    base = g.pad(high, "edge") << s
    full = base.copy()
    if ver == _INT_VERSION:
        try:
            coders = [WordStack(w) for w in words]
        except CorruptStreamError as e:
            raise CorruptStreamError(f"local-path stream could not be decoded: {e}") from e
    else:
        constriction = _constriction()
        coders = [constriction.stream.stack.AnsCoder(w) for w in words]
    with _threads(model, threads):
        for c0 in range(0, n_chunks, max(1, batch_chunks)):
            cs = range(c0, min(n_chunks, c0 + max(1, batch_chunks)))
            _decode_chunks(model, g, s, bits, base, full, bad_all, coders, cs, chunk_tiles)
    b = M.BORDER
    low = (full - base)[b : b + rows, b : b + cols].astype(np.uint16)
    if _crc(low) != crc or not all(c.is_empty() for c in coders):
        raise CorruptStreamError("local-path stream CRC-32 mismatch: the stream is corrupted")
    return low


def _float_step(model: LocalModel, full, base, y0, x0, ts, s: int, bits: int, cache, t: int):  # noqa: ANN001, ANN202
    import torch

    f, off = M.features(full, base, y0, x0, ts, s, bits)
    with torch.no_grad():
        raw, cache = model.net(torch.from_numpy(f)[:, None, :], cache, position=t)
    mi, li, _ = M.quantise(raw.reshape(-1, 4, 2).numpy(), off, s)
    return mi, li, cache


def _decode_chunks(model, g, s, bits, base, full, bad_all, coders, cs, chunk_tiles) -> None:  # noqa: ANN001
    """Decode the chunks ``cs`` together (64 network steps), writing ``full`` in place."""
    integer = model.int_net is not None
    n_ls = model.tables[s].shape[1]
    fam = None if integer else _constriction().stream.model.Categorical(perfect=False)
    tiles = np.arange(cs[0] * chunk_tiles, min(g.n_tiles, (cs[-1] + 1) * chunk_tiles))
    cache = model.int_net.new_cache(len(tiles)) if integer else None
    for t in range(M.TOKENS):
        ts = np.full(len(tiles), t)
        y0, x0 = g.block_origin(tiles, ts)
        if integer:
            f, ref8 = model.int_net.features(full, base, y0, x0, ts, s)
            mi, li = model.int_net.indices(model.int_net.step(f, cache, t), ref8, s)
            row_id = mi * n_ls + li  # (tiles, 4) rows of the flattened table
        else:
            mi, li, cache = _float_step(model, full, base, y0, x0, ts, s, bits, cache, t)
            fr = _freqs(model, s, mi, li, np.repeat(bad_all[tiles, t][:, None], 4, 1))
        py = y0[:, None] + M._POFF[None, :, 0]
        px = x0[:, None] + M._POFF[None, :, 1]
        v = g.valid(py, px)
        vals = np.zeros((len(tiles), 4), np.int64)
        for c in cs:
            r = slice(c * chunk_tiles - tiles[0], min(len(tiles), (c + 1) * chunk_tiles - tiles[0]))
            vv = v[r].reshape(-1)
            if not vv.any():
                continue
            try:
                if integer:
                    # cumulative tables of the distinct rows only: building Python lists of
                    # every symbol's row cost twice the rANS loop itself
                    u, inv = np.unique(row_id[r].reshape(-1)[vv], return_inverse=True)
                    cum = cumulative(model.tables[s].reshape(-1, 1 << s)[u])
                    d = coders[c].decode_symbols(cum, M.PREC, inv.tolist())
                else:
                    d = coders[c].decode(fam, fr[r].reshape(-1, 1 << s)[vv] / float(1 << M.PREC))
            except Exception as e:  # the word stack ran out / constriction on malformed words
                raise CorruptStreamError(f"local-path stream could not be decoded: {e}") from e
            tmp = np.zeros(len(vv), np.int64)
            tmp[vv] = d
            vals[r] = tmp.reshape(-1, 4)
        full[py, px] = base[py, px] + vals


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
