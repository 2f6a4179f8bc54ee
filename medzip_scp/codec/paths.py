"""Lossless coding paths for one plane group of one frame.

A path turns an array of non-negative integers ``(rows, columns, samples)`` whose values fit
in ``nbits`` bits (dtype ``uint8`` for nbits <= 8, ``uint16`` for <= 16, else ``uint32``) into
bytes and back. Paths are looked up by their string id, which the blob records per frame; ids
are part of the format and are never reused. :func:`register_path` lets other packages (the
predictive coder, later the learned paths) add theirs.

A *candidate* names an encoder: a registered id, or an encoder variant that writes a registered
id with other encoder settings (:func:`get_encoder`; ``jpegxl-e9`` is JPEG-XL at effort 9,
recorded as ``jpegxl``, whose decoder reads every effort).

Every path here is deterministic. The caller (:mod:`medzip_scp.codec.api`) verifies each
candidate by decoding it before choosing it. A :class:`CarrierPath` (``pred``) also reports
where its streams can carry bits for free (:class:`~medzip_scp.codec.predictive.FlushSlot`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import imagecodecs
import numpy as np
import numpy.typing as npt
import zstandard

from medzip_scp.codec import predictive
from medzip_scp.codec.errors import UnsupportedFormatError
from medzip_scp.codec.predictive import FlushSlot

__all__ = [
    "CarrierPath",
    "ConstantPath",
    "Jpeg2000Path",
    "JpegLsPath",
    "JpegXlPath",
    "ModelChain",
    "PixelPath",
    "PredictivePath",
    "VerbatimPath",
    "ZstdPath",
    "carried_models",
    "frame_taken",
    "get_encoder",
    "get_path",
    "register_path",
    "registered_paths",
    "values_dtype",
    "without_carried_models",
]


def values_dtype(nbits: int) -> np.dtype:
    """Smallest unsigned dtype for values of ``nbits`` bits (0..32)."""
    if nbits <= 8:
        return np.dtype(np.uint8)
    if nbits <= 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


@runtime_checkable
class PixelPath(Protocol):
    """A lossless coder of one ``(rows, columns, samples)`` array of unsigned values."""

    name: str

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        """Return the coded bytes, or ``None`` when the path cannot take this input."""
        ...

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        """Return the array of shape ``shape`` and dtype ``values_dtype(nbits)``."""
        ...


@runtime_checkable
class CarrierPath(PixelPath, Protocol):
    """A path whose streams end in arithmetic-coder flushes that carry bits for free."""

    def encode_carrying(
        self, values: npt.NDArray[np.unsignedinteger], nbits: int
    ) -> tuple[bytes, list[FlushSlot]] | None:
        """:meth:`encode`, and the flush slots of its bytes as the encoder left them (what
        :meth:`decode_carrying` finds in them)."""
        ...

    def decode_carrying(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> tuple[npt.NDArray[np.unsignedinteger], list[FlushSlot]]:
        """:meth:`decode`, and the flush slots of ``data`` in stream order (offsets into
        ``data``), one per part that has an arithmetic coder."""
        ...


def _as_codec_input(values: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.unsignedinteger]:
    v = values[..., 0] if values.shape[2] == 1 else values
    return np.ascontiguousarray(v)


class ConstantPath:
    """All values are zero (after the per-sample offset): nothing to store."""

    name = "constant"

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        if nbits != 0 or values.any():
            return None
        return b""

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        if data or nbits != 0:
            raise ValueError(
                f"constant path: expected 0 bytes and nbits 0, got {len(data)}, {nbits}"
            )
        return np.zeros(shape, values_dtype(0))


class JpegXlPath:
    """JPEG XL lossless (libjxl through imagecodecs), 1 or 3 samples, 1..16 bits. The decoder
    reads streams of every effort, so one id serves them all (``jpegxl-e9`` writes it too)."""

    def __init__(self, effort: int = 7, name: str = "jpegxl") -> None:
        self.effort = effort
        self.name = name

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        if not 1 <= nbits <= 16 or values.shape[2] not in (1, 3):
            return None
        return bytes(
            imagecodecs.jpegxl_encode(
                _as_codec_input(values), lossless=True, effort=self.effort, bitspersample=nbits
            )
        )

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        return np.asarray(imagecodecs.jpegxl_decode(data)).reshape(shape)


class JpegLsPath:
    """JPEG-LS lossless (CharLS through imagecodecs), 1 or 3 samples, 2..16 bits."""

    name = "jpegls"

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        if not 2 <= nbits <= 16 or values.shape[2] not in (1, 3):
            return None
        return bytes(imagecodecs.jpegls_encode(_as_codec_input(values)))

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        return np.asarray(imagecodecs.jpegls_decode(data)).reshape(shape)


class Jpeg2000Path:
    """JPEG 2000 lossless (OpenJPEG through imagecodecs, reversible 5/3 wavelet), 1 or 3 samples
    (3: with the reversible colour transform), 1..16 bits.

    Written as a raw codestream (the JP2 file boxes would add 85 bytes a frame). Options by
    measurement (imagecodecs 2026.3.6, OpenJPEG 2.5.4) on the frames where JPEG 2000 wins (the
    16-bit DX conformance frame, 2x-interpolated MR and CT; see :mod:`medzip_scp.codec.gate`):
    5 to 7 resolution levels are within 0.1 % of each other, 3 cost 1-3 %, so the library's
    default (6, fewer where the frame is too small for them) stays. Code-block size and tiles
    cannot be set through imagecodecs (it writes one tile).
    """

    name = "jpeg2000"

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        if not 1 <= nbits <= 16 or values.shape[2] not in (1, 3):
            return None
        return bytes(
            imagecodecs.jpeg2k_encode(
                _as_codec_input(values),
                level=0,
                reversible=True,
                bitspersample=nbits,
                codecformat="J2K",
            )
        )

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        return np.asarray(imagecodecs.jpeg2k_decode(data)).reshape(shape)


class ZstdPath:
    """zstd over byte planes (1-bit values are bit-packed first): takes any input."""

    name = "zstd"

    def __init__(self, level: int = 9) -> None:
        self.level = level

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        if nbits <= 1:
            raw = np.packbits(values.reshape(-1).astype(np.uint8), bitorder="little").tobytes()
        else:
            v = values.astype(values.dtype.newbyteorder("<"), copy=False).reshape(-1)
            raw = v.view(np.uint8).reshape(-1, v.dtype.itemsize).T.tobytes()
        return zstandard.ZstdCompressor(level=self.level).compress(raw)

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        dtype = values_dtype(nbits)
        count = int(np.prod(shape))
        if nbits <= 1:
            size = (count + 7) // 8
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
            if len(raw) != size:
                raise ValueError(f"zstd path: expected {size} bytes, got {len(raw)}")
            bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=count, bitorder="little")
            return bits.reshape(shape).astype(dtype)
        size = count * dtype.itemsize
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        if len(raw) != size:
            raise ValueError(f"zstd path: expected {size} bytes, got {len(raw)}")
        planes = np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, count)
        le = np.ascontiguousarray(planes.T).view(dtype.newbyteorder("<")).reshape(shape)
        return le.astype(dtype)


class VerbatimPath:
    """The values as little-endian bytes of ``values_dtype(nbits)``: the last resort."""

    name = "verbatim"

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        return values.astype(values_dtype(nbits).newbyteorder("<")).tobytes()

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        dtype = values_dtype(nbits)
        expected = int(np.prod(shape)) * dtype.itemsize
        if len(data) != expected:
            raise ValueError(f"verbatim path: expected {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype.newbyteorder("<")).reshape(shape).astype(dtype)


@dataclass
class ModelChain:
    """The pred path's carried model through the frames of one object (see
    :func:`carried_models`): the state the last frame taken left, and (encoder) the state
    each candidate stream of the current frame would leave and whether it continued a model.

    Attributes
    ----------
    start_cost
        Encoder: what starting from the chain's first state costs the blob (a prior's entry
        in the model table), or None: no fallback. A sample is then also coded from a fresh
        model (a version-2 stream, which needs no state) and keeps that unless it is larger
        than the carried stream by more than this.
    continued
        Encoder: whether a taken stream continued the chain's model (version 3), so that the
        blob needs the state the chain started from.
    """

    decoding: bool
    state: predictive.ModelState = predictive.FRESH
    start_cost: int | None = None
    continued: bool = False
    pending: dict[bytes, tuple[predictive.ModelState, bool]] = field(default_factory=dict)


_model_chain: ContextVar[ModelChain | None] = ContextVar("medzip_pred_model", default=None)


@contextmanager
def carried_models(
    decoding: bool, start: predictive.ModelState = predictive.FRESH, start_cost: int | None = None
) -> Iterator[ModelChain]:
    """Within the block the pred path codes the frames of one object in order with carried
    models (:func:`medzip_scp.codec.predictive.encode_frame_carried`): a frame's model starts
    where the model of the last frame coded by pred ended, the first where ``start`` (a
    prior's state, or fresh; ``start_cost``: see :class:`ModelChain`). Encoding, the caller
    says which stream it took for each frame (:func:`frame_taken`); decoding, each decoded
    pred frame passes its model on. Per context (:mod:`contextvars`), like ``warm_start``."""
    chain = ModelChain(decoding, start, start_cost)
    token = _model_chain.set(chain)
    try:
        yield chain
    finally:
        _model_chain.reset(token)


@contextmanager
def without_carried_models() -> Iterator[None]:
    """Within the block the pred path codes without carried models and leaves the chain as it
    was (a learned split's parts are not frames of the object)."""
    token = _model_chain.set(None)
    try:
        yield
    finally:
        _model_chain.reset(token)


def frame_taken(data: bytes | None) -> None:
    """The encoder took ``data`` (a path's stream; None: a split frame) for the current frame:
    when the pred path coded it, the next pred frame starts from the model it left."""
    chain = _model_chain.get()
    if chain is None:
        return
    if data is not None and data in chain.pending:
        chain.state, continued = chain.pending[data]
        chain.continued |= continued
    chain.pending.clear()


class PredictivePath:
    """The predictive coder (:mod:`medzip_scp.codec.predictive`), one stream per sample.

    Its streams carry their own coder version, so this one id decodes every version ever
    written. Samples are coded as separate planes, each stream prefixed with its length.
    A :class:`CarrierPath`: a sample stream in mode 1 or 2 has a flush slot.
    """

    name = "pred"

    def encode(self, values: npt.NDArray[np.unsignedinteger], nbits: int) -> bytes | None:
        coded = self.encode_carrying(values, nbits)
        return None if coded is None else coded[0]

    def encode_carrying(
        self, values: npt.NDArray[np.unsignedinteger], nbits: int
    ) -> tuple[bytes, list[FlushSlot]] | None:
        if not 1 <= nbits <= 16:
            return None
        chain = _model_chain.get()
        state = predictive.FRESH if chain is None else chain.state
        out = bytearray()
        slots: list[FlushSlot] = []
        continued = False
        for sample in range(values.shape[2]):
            plane = values[:, :, sample]
            if chain is None:
                stream, slot = predictive.encode_frame_slot(plane, nbits)
            else:  # samples in order, each carrying the model on
                stream, slot, state = predictive.encode_frame_carried(
                    plane, nbits, state, chain.start_cost
                )
                continued |= predictive.continues_model(stream)
            out += struct.pack("<I", len(stream))
            if slot is not None:
                slots.append(replace(slot, offset=len(out) + slot.offset))
            out += stream
        data = bytes(out)
        if chain is not None:
            chain.pending[data] = (state, continued)
        return data, slots

    def decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> npt.NDArray[np.unsignedinteger]:
        return self._decode_with_core(data, shape, nbits, None)

    def decode_carrying(
        self, data: bytes, shape: tuple[int, int, int], nbits: int
    ) -> tuple[npt.NDArray[np.unsignedinteger], list[FlushSlot]]:
        slots: list[FlushSlot] = []
        return self._decode_with_core(data, shape, nbits, slots), slots

    def _decode_with_core(
        self, data: bytes, shape: tuple[int, int, int], nbits: int, slots: list[FlushSlot] | None
    ) -> npt.NDArray[np.unsignedinteger]:
        try:
            return self._decode(data, shape, nbits, slots)
        except predictive.CoreUnavailableError as exc:  # the blob is fine, this node is not
            raise UnsupportedFormatError(
                f"pred-v2 streams need the predictive coder's C core: {exc}"
            ) from None

    def _decode(
        self, data: bytes, shape: tuple[int, int, int], nbits: int, slots: list[FlushSlot] | None
    ) -> npt.NDArray[np.unsignedinteger]:
        """Decode; when ``slots`` is a list, append each sample stream's flush slot to it."""
        rows, columns, samples = shape
        out = np.empty(shape, values_dtype(nbits))
        offset = 0
        chain = _model_chain.get()
        state = predictive.FRESH if chain is None else chain.state
        for sample in range(samples):
            if offset + 4 > len(data):
                raise ValueError("pred path: stream table is truncated")
            (length,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if offset + length > len(data):
                raise ValueError("pred path: sample stream is truncated")
            stream = data[offset : offset + length]
            slot = None
            if chain is not None:
                plane, slot, state = predictive.decode_frame_carried(
                    stream, (rows, columns), nbits, state
                )
            elif slots is None:
                plane = predictive.decode_frame(stream, (rows, columns), nbits)
            else:
                plane, slot = predictive.decode_frame_slot(stream, (rows, columns), nbits)
            if slots is not None and slot is not None:
                slots.append(replace(slot, offset=offset + slot.offset))
            out[:, :, sample] = plane
            offset += length
        if offset != len(data):
            raise ValueError(f"pred path: {len(data) - offset} trailing bytes")
        if chain is not None and chain.decoding:
            chain.state = state
        return out


_REGISTRY: dict[str, PixelPath] = {}


def register_path(path: PixelPath) -> None:
    """Make ``path`` available to :func:`medzip_scp.codec.api.compress` and to the decoder.

    Raises
    ------
    ValueError
        If a different path object is already registered under the same id.
    """
    existing = _REGISTRY.get(path.name)
    if existing is not None and existing is not path:
        raise ValueError(f"path id {path.name!r} is already registered; ids are never reused")
    _REGISTRY[path.name] = path


def get_path(name: str) -> PixelPath | None:
    """Return the registered path ``name`` or ``None``."""
    return _REGISTRY.get(name)


def registered_paths() -> tuple[str, ...]:
    """Ids of all registered paths."""
    return tuple(_REGISTRY)


_VARIANTS: dict[str, PixelPath] = {"jpegxl-e9": JpegXlPath(effort=9)}
"""Encoder variants by candidate name; each writes (``name``) and is decoded as a registered id."""


def get_encoder(candidate: str) -> PixelPath | None:
    """The path that encodes candidate ``candidate`` (a registered id or an encoder variant such
    as ``jpegxl-e9``), or ``None``. Its ``name`` is the id the blob records."""
    return _REGISTRY.get(candidate) or _VARIANTS.get(candidate)


for _p in (
    ConstantPath(),
    JpegXlPath(),
    JpegLsPath(),
    Jpeg2000Path(),
    ZstdPath(),
    VerbatimPath(),
    PredictivePath(),
):
    register_path(_p)
