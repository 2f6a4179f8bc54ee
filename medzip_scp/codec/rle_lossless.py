"""DICOM RLE Lossless frames (PS3.5 Annex G) split into their byte planes and a skeleton.

An RLE frame is a 64-byte header (segment count, segment offsets) and one PackBits segment per
byte plane (sample by sample, most significant byte first). Encoders choose their runs
differently, so the runs cannot be recomputed; they need not be: :func:`split` keeps the
header, every run's control byte and whatever follows a segment's data (padding) as the
*skeleton*, and the planes' bytes, which the pixels hold, apart. :func:`join` puts them back
together byte for byte, whatever encoder made the frame.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

__all__ = ["NotSplittable", "join", "planes_to_samples", "samples_to_planes", "split"]

_HEADER = struct.Struct("<16I")
_TOTAL = struct.Struct("<I")


class NotSplittable(Exception):
    """The frame is not a well-formed RLE frame of the expected planes (the reason says how)."""


def _segment_bounds(stream: bytes, n_planes: int) -> list[tuple[int, int]]:
    if len(stream) < _HEADER.size:
        raise NotSplittable("RLE frame shorter than its header")
    count, *offsets = _HEADER.unpack_from(stream, 0)
    if count != n_planes:
        raise NotSplittable(f"RLE frame has {count} segments, expected {n_planes}")
    starts = offsets[:count] + [len(stream)]
    if starts[0] != _HEADER.size or any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise NotSplittable("RLE segment offsets are not increasing from the header")
    return [(starts[k], starts[k + 1]) for k in range(count)]


def split(stream: bytes, n_planes: int, plane_bytes: int) -> tuple[bytes, list[bytes]]:
    """``(skeleton, planes)`` of one RLE frame of ``n_planes`` planes of ``plane_bytes``.

    Raises
    ------
    NotSplittable
        A malformed frame, another segment count, or a segment that decodes to more or fewer
        bytes than a plane.
    """
    skeleton = bytearray(_TOTAL.pack(len(stream)) + stream[: _HEADER.size])
    planes = []
    for start, end in _segment_bounds(stream, n_planes):
        plane = bytearray()
        pos = start
        while len(plane) < plane_bytes:
            if pos >= end:
                raise NotSplittable("RLE segment ends before its plane is complete")
            control = stream[pos]
            skeleton.append(control)
            pos += 1
            if control < 128:
                n = control + 1
                if pos + n > end:
                    raise NotSplittable("RLE literal run runs past its segment")
                plane += stream[pos : pos + n]
                pos += n
            elif control > 128:
                if pos >= end:
                    raise NotSplittable("RLE replicate run runs past its segment")
                plane += bytes([stream[pos]]) * (257 - control)
                pos += 1
        if len(plane) != plane_bytes:
            raise NotSplittable("RLE segment decodes past the end of its plane")
        skeleton += stream[pos:end]  # what follows the plane's runs (padding), as it is
        planes.append(bytes(plane))
    if join(bytes(skeleton), planes) != stream:  # by construction; cheap to be sure
        raise NotSplittable("RLE frame not rebuilt from its skeleton")
    return bytes(skeleton), planes


def join(skeleton: bytes, planes: list[bytes]) -> bytes:
    """The RLE frame :func:`split` took apart.

    Raises
    ------
    ValueError
        The skeleton does not fit the planes.
    """
    (total,) = _TOTAL.unpack_from(skeleton, 0)
    pos = _TOTAL.size + _HEADER.size
    if pos > len(skeleton):
        raise ValueError("RLE skeleton shorter than its header")
    out = bytearray(skeleton[_TOTAL.size : pos])
    count, *offsets = _HEADER.unpack_from(out, 0)
    if count != len(planes) or count > 15:
        raise ValueError(f"RLE skeleton has {count} segments for {len(planes)} planes")
    ends = offsets[1:count] + [total]
    for k, plane in enumerate(planes):
        p = 0
        while p < len(plane):
            if pos >= len(skeleton):
                raise ValueError("RLE skeleton ends inside a plane")
            control = skeleton[pos]
            pos += 1
            out.append(control)
            if control < 128:
                out += plane[p : p + control + 1]
                p += control + 1
            elif control > 128:
                out.append(plane[p])
                p += 257 - control
        tail = ends[k] - len(out)
        if tail < 0 or pos + tail > len(skeleton):
            raise ValueError("RLE skeleton does not fit its segment offsets")
        out += skeleton[pos : pos + tail]
        pos += tail
    if pos != len(skeleton) or len(out) != total:
        raise ValueError("RLE skeleton and planes do not make a frame of its length")
    return bytes(out)


def planes_to_samples(
    planes: list[bytes], rows: int, columns: int, samples: int, sample_bytes: int
) -> npt.NDArray[np.unsignedinteger]:
    """``(rows, columns, samples)`` values from the planes (per sample, most significant
    byte first)."""
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}[sample_bytes]
    out = np.zeros((rows, columns, samples), dtype=dtype)
    for s in range(samples):
        for b in range(sample_bytes):
            plane = np.frombuffer(planes[s * sample_bytes + b], np.uint8).reshape(rows, columns)
            out[..., s] |= plane.astype(dtype) << (8 * (sample_bytes - 1 - b))
    return out


def samples_to_planes(values: npt.NDArray[np.unsignedinteger], sample_bytes: int) -> list[bytes]:
    """The planes of ``(rows, columns, samples)`` values (inverse of
    :func:`planes_to_samples`)."""
    planes = []
    for s in range(values.shape[2]):
        v = values[..., s].astype(np.uint32)
        for b in range(sample_bytes):
            planes.append(((v >> (8 * (sample_bytes - 1 - b))) & 0xFF).astype(np.uint8).tobytes())
    return planes
