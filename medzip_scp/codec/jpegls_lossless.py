"""JPEG-LS lossless (ISO/IEC 14495-1, NEAR = 0) scans, regenerated from pixels.

Like :mod:`.jpeg_lossless` for T.81: an object that arrives JPEG-LS lossless can be stored as
pixels (coded by medzip, smaller) if its original bytes come back exactly on retrieval. The
regular and run modes of JPEG-LS leave an encoder no choice once its parameters are fixed
(sample precision, MAXVAL, the thresholds T1-T3, RESET, no restart interval), so the
entropy-coded segment of a single-component scan is a function of the pixels and those
parameters. :func:`parse` accepts only scans whose parameters are the standard's defaults for
their precision (C.2.4.1.1), which is what an encoder writes unless told otherwise, and
:func:`entropy_coded` regenerates the segment with CharLS (through ``pyjpegls``) at those
defaults. The caller compares at encode time and keeps the original bytes whenever they
differ: a codestream this module cannot reproduce is never recoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import imagecodecs
import jpeg_ls
import numpy as np
import numpy.typing as npt

__all__ = [
    "JpegLsScan",
    "UnsupportedJpegLs",
    "decode",
    "default_parameters",
    "entropy_coded",
    "parse",
]

_SOI, _EOI, _SOS, _DRI, _SOF55, _LSE = 0xD8, 0xD9, 0xDA, 0xDD, 0xF7, 0xF8
_DEFAULT_RESET = 64


class UnsupportedJpegLs(Exception):
    """The codestream is not one this module regenerates (the reason names what, no data)."""


@dataclass(frozen=True)
class JpegLsScan:
    """What the entropy-coded data of one single-component JPEG-LS lossless scan depends on."""

    rows: int
    columns: int
    precision: int  # P, bits per sample (2..16)
    ecs_start: int  # where the entropy-coded data starts in the codestream
    ecs_end: int  # and where it ends (the EOI marker)

    _FIXED = struct.Struct("<HHB")

    def pack(self) -> bytes:
        """The parameters (not the positions) as bytes, for :meth:`unpack`."""
        return self._FIXED.pack(self.rows, self.columns, self.precision)

    @classmethod
    def unpack(cls, data: bytes, pos: int) -> tuple[JpegLsScan, int]:
        """A scan from :meth:`pack`'s bytes at ``pos`` and where they end (no positions)."""
        if pos + cls._FIXED.size > len(data):
            raise ValueError("JPEG-LS scan record truncated")
        rows, columns, precision = cls._FIXED.unpack_from(data, pos)
        if not (rows and columns and 2 <= precision <= 16):
            raise ValueError(f"JPEG-LS scan record: {rows}x{columns}, precision {precision}")
        return cls(rows, columns, precision, 0, 0), pos + cls._FIXED.size


def default_parameters(precision: int) -> tuple[int, int, int, int, int]:
    """MAXVAL, T1, T2, T3 and RESET an encoder uses for ``precision`` bits when it is given
    none (ISO/IEC 14495-1 C.2.4.1.1, NEAR = 0)."""
    maxval = (1 << precision) - 1
    if maxval >= 128:
        factor = (min(maxval, 4095) + 128) >> 8
        t1 = factor * (3 - 2) + 2
        t2 = factor * (7 - 3) + 3
        t3 = factor * (21 - 4) + 4
    else:
        factor = 256 // (maxval + 1)
        t1, t2, t3 = max(2, 3 // factor), max(2, 7 // factor), max(2, 21 // factor)
    t1 = min(max(t1, 1), maxval)
    t2 = min(max(t2, t1), maxval)
    t3 = min(max(t3, t2), maxval)
    return maxval, t1, t2, t3, _DEFAULT_RESET


def parse(stream: bytes) -> JpegLsScan:
    """The one scan of a single-component JPEG-LS lossless codestream with default
    parameters; raises :class:`UnsupportedJpegLs` for anything else."""
    if stream[:2] != b"\xff\xd8":
        raise UnsupportedJpegLs("no SOI marker")
    pos = 2
    frame: tuple[int, int, int] | None = None
    preset: tuple[int, int, int, int, int] | None = None
    while True:
        if pos + 4 > len(stream) or stream[pos] != 0xFF:
            raise UnsupportedJpegLs("marker segments malformed")
        marker = stream[pos + 1]
        (length,) = struct.unpack_from(">H", stream, pos + 2)
        body = stream[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            raise UnsupportedJpegLs("marker segment truncated")
        pos += 2 + length
        if marker == _SOF55:
            precision, rows, columns, components = struct.unpack_from(">BHHB", body, 0)
            if components != 1:
                raise UnsupportedJpegLs(f"{components} components (one only)")
            frame = (precision, rows, columns)
        elif marker == _LSE:
            if body[:1] != b"\x01" or len(body) != 11:
                raise UnsupportedJpegLs("LSE segment other than preset coding parameters")
            preset = struct.unpack_from(">HHHHH", body, 1)
        elif marker == _DRI:
            raise UnsupportedJpegLs("restart interval")
        elif marker == _SOS:
            break
        elif not (0xE0 <= marker <= 0xEF or marker == 0xFE):  # APPn and COM are kept as-is
            raise UnsupportedJpegLs(f"marker 0xFF{marker:02X} before the scan")
    if frame is None:
        raise UnsupportedJpegLs("no SOF55 (JPEG-LS frame header)")
    precision, rows, columns = frame
    if not (2 <= precision <= 16 and rows and columns):
        raise UnsupportedJpegLs(f"frame {rows}x{columns}, precision {precision}")
    # SOS: Ns, (component id, mapping table), NEAR, ILV, point transform
    if len(body) != 6 or body[0] != 1 or body[2] != 0 or body[3:] != b"\x00\x00\x00":
        raise UnsupportedJpegLs("scan not lossless single-component (NEAR, ILV, mapping)")
    if preset is not None:
        defaults = default_parameters(precision)
        given = tuple(v or d for v, d in zip(preset, defaults, strict=True))  # 0: default
        if given != defaults:
            raise UnsupportedJpegLs("preset coding parameters other than the defaults")
    end = _scan_end(stream, pos)
    return JpegLsScan(rows, columns, precision, pos, end)


def _scan_end(stream: bytes, start: int) -> int:
    """Where the entropy-coded data from ``start`` ends: at an 0xFF followed by a byte
    with its high bit set (in the data an 0xFF is followed by a 0 bit); that must be EOI."""
    data = np.frombuffer(stream, np.uint8, offset=start)
    ff = np.flatnonzero(data[:-1] == 0xFF)
    markers = ff[data[ff + 1] >= 0x80]
    if not len(markers) or data[markers[0] + 1] != _EOI:
        raise UnsupportedJpegLs("the scan is not followed by EOI (more scans, or DNL)")
    return start + int(markers[0])


def decode(stream: bytes, scan: JpegLsScan) -> npt.NDArray[np.uint16]:
    """The scan's samples, ``(rows, columns)``."""
    samples = np.asarray(imagecodecs.jpegls_decode(stream))
    if samples.shape != (scan.rows, scan.columns):
        raise UnsupportedJpegLs(f"decoded {samples.shape}, scan {scan.rows}x{scan.columns}")
    return samples.astype(np.uint16)


def entropy_coded(samples: npt.NDArray[np.integer], scan: JpegLsScan) -> bytes:
    """The entropy-coded data of ``samples`` ``(rows, columns)`` coded as ``scan`` says."""
    if samples.shape != (scan.rows, scan.columns):
        raise UnsupportedJpegLs(f"samples {samples.shape}, scan {scan.rows}x{scan.columns}")
    dtype = np.uint8 if scan.precision <= 8 else np.dtype("<u2")
    raw = np.ascontiguousarray(samples, dtype=dtype).tobytes()
    coded = bytes(jpeg_ls.encode_buffer(raw, scan.rows, scan.columns, 1, scan.precision))
    ours = parse(coded)
    return coded[ours.ecs_start : ours.ecs_end]
