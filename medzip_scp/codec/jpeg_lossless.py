"""JPEG Lossless (ITU T.81 process 14, Huffman) entropy-coded data, regenerated from pixels.

An object that arrives JPEG Lossless keeps its original bytes only if they come back exactly
on retrieval. This module lets the store hold the *pixels* (coded by medzip, smaller) and
the codestream's *skeleton* instead: :func:`parse` finds the one scan of a single-component
codestream and its parameters (precision, predictor, Huffman table, restart interval);
:func:`entropy_coded` codes pixels with them into the entropy-coded segment(s) exactly as
T.81 prescribes (Annex H prediction, Annex F/C Huffman codes, byte stuffing, 1-bit padding,
restart markers). Encoders have freedoms the standard allows (padding bits, fill bytes before
markers), so the caller regenerates and compares at encode time, and keeps the original
bytes whenever they differ: a codestream this module cannot reproduce is never recoded.

Pure: integers only (numpy), no float anywhere, so the result is the same on every machine.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["LosslessScan", "UnsupportedCodestream", "entropy_coded", "parse"]

_SOI, _EOI, _SOS, _DHT, _DRI, _SOF3 = 0xD8, 0xD9, 0xDA, 0xC4, 0xDD, 0xC3
_RST0 = 0xD0
_SOF_OTHER = set(range(0xC0, 0xD0)) - {_DHT, 0xC8, 0xCC, _SOF3}  # other processes
_DNL = 0xDC
_POWERS = 1 << np.arange(16, dtype=np.int64)  # 1, 2, ..., 32768


class UnsupportedCodestream(Exception):
    """The codestream is not one this module regenerates (the reason names what, no data)."""


@dataclass(frozen=True)
class LosslessScan:
    """What the entropy-coded data of one single-component lossless scan depends on."""

    rows: int
    columns: int
    precision: int  # P, bits per sample (2..16)
    predictor: int  # Ss, 1..7
    restart_interval: int  # Ri in samples (0: none); a multiple of ``columns``
    bits: bytes  # BITS: how many Huffman codes of each length 1..16
    values: bytes  # HUFFVAL: the categories (0..16) in code order
    ecs_start: int  # where the entropy-coded data starts in the codestream
    ecs_end: int  # and where it ends (the next marker, not a restart marker)

    _FIXED = struct.Struct("<HHBBI16sB")

    def pack(self) -> bytes:
        """The parameters (not the positions) as bytes, for :meth:`unpack`."""
        return (
            self._FIXED.pack(
                self.rows,
                self.columns,
                self.precision,
                self.predictor,
                self.restart_interval,
                self.bits,
                len(self.values),
            )
            + self.values
        )

    @classmethod
    def unpack(cls, data: bytes, pos: int) -> tuple[LosslessScan, int]:
        """A scan from :meth:`pack`'s bytes at ``pos`` and where they end (no positions)."""
        if pos + cls._FIXED.size > len(data):
            raise ValueError("JPEG Lossless scan record truncated")
        rows, cols, p, ss, ri, bits, n = cls._FIXED.unpack_from(data, pos)
        pos += cls._FIXED.size
        values = bytes(data[pos : pos + n])
        if len(values) != n:
            raise ValueError("JPEG Lossless scan record truncated")
        scan = cls(rows, cols, p, ss, ri, bytes(bits), values, 0, 0)
        scan.check()
        return scan, pos + n

    def check(self) -> None:
        """Raise UnsupportedCodestream unless this module can code the scan."""
        if not (self.rows >= 1 and self.columns >= 1):
            raise UnsupportedCodestream("image size is zero (DNL)")
        if not 2 <= self.precision <= 16:
            raise UnsupportedCodestream(f"precision must be 2..16, got {self.precision}")
        if not 1 <= self.predictor <= 7:
            raise UnsupportedCodestream(f"predictor must be 1..7, got {self.predictor}")
        if self.restart_interval % self.columns:
            raise UnsupportedCodestream("restart interval is not a whole number of lines")
        if len(self.values) != sum(self.bits) or any(v > 16 for v in self.values):
            raise UnsupportedCodestream("Huffman table is not a lossless DC table")
        _codes(self.bits, self.values)  # raises when the table is not a valid code


def _segments(stream: bytes) -> tuple[int, dict[int, bytes], list[tuple[int, bytes]]]:
    """``(position after the first SOS header, DHT tables by id, [(marker, body)])``."""
    if stream[:2] != b"\xff\xd8":
        raise UnsupportedCodestream("codestream does not start with SOI")
    pos = 2
    tables: dict[int, bytes] = {}
    seen: list[tuple[int, bytes]] = []
    while True:
        if pos + 4 > len(stream) or stream[pos] != 0xFF:
            raise UnsupportedCodestream("marker expected")
        marker = stream[pos + 1]
        if marker in (_SOI, _EOI) or _RST0 <= marker <= _RST0 + 7 or marker == 0xFF:
            raise UnsupportedCodestream(f"unexpected marker FF{marker:02X} before the scan")
        (length,) = struct.unpack_from(">H", stream, pos + 2)
        body = stream[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            raise UnsupportedCodestream("marker segment runs past the codestream")
        seen.append((marker, body))
        pos += 2 + length
        if marker == _DHT:
            at = 0
            while at < len(body):
                tc_th = body[at]
                counts = body[at + 1 : at + 17]
                n = sum(counts)
                tables[tc_th] = body[at + 1 : at + 17 + n]
                at += 17 + n
        if marker == _SOS:
            return pos, tables, seen


def parse(stream: bytes) -> LosslessScan:
    """The scan of a single-component, single-scan process-14 Huffman codestream.

    Raises
    ------
    UnsupportedCodestream
        Anything else: another process, several components or scans, a point transform,
        DNL, a restart interval that is not whole lines, a malformed structure.
    """
    ecs_start, tables, seen = _segments(stream)
    markers = [m for m, _ in seen]
    if any(m in _SOF_OTHER or m == _DNL for m in markers) or markers.count(_SOF3) != 1:
        raise UnsupportedCodestream("not a process-14 (lossless Huffman) codestream")
    sof = seen[markers.index(_SOF3)][1]
    if len(sof) < 6:
        raise UnsupportedCodestream("SOF3 segment too short")
    precision, rows, columns, components = struct.unpack_from(">BHHB", sof, 0)
    if components != 1:
        raise UnsupportedCodestream(f"{components} components (only 1 is recoded)")
    restart = 0
    for marker, body in seen:
        if marker == _DRI:
            (restart,) = struct.unpack(">H", body[:2])
    sos = seen[-1][1]
    if len(sos) != 6 or sos[0] != 1:
        raise UnsupportedCodestream("scan must hold exactly one component")
    table_id = sos[2] >> 4
    predictor, _se, ah_al = sos[3], sos[4], sos[5]
    if ah_al & 0x0F:
        raise UnsupportedCodestream("point transform (lossy reduction of precision)")
    table = tables.get(table_id)  # class 0 (DC/lossless), this id
    if table is None:
        raise UnsupportedCodestream("scan names a Huffman table the codestream lacks")
    end = ecs_start
    while True:
        end = stream.find(b"\xff", end)
        if end < 0 or end + 1 >= len(stream):
            raise UnsupportedCodestream("entropy-coded data does not end in a marker")
        following = stream[end + 1]
        if following == 0 or _RST0 <= following <= _RST0 + 7:
            end += 2
            continue
        break
    if stream[end : end + 2] != b"\xff\xd9":  # what follows EOI stays as it is
        raise UnsupportedCodestream("more than one scan")
    scan = LosslessScan(
        rows,
        columns,
        precision,
        predictor,
        restart,
        bytes(table[:16]),
        bytes(table[16:]),
        ecs_start,
        end,
    )
    scan.check()
    return scan


def _codes(bits: bytes, values: bytes) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Code and length of each category 0..16 (T.81 Annex C); length 0: no code."""
    code = np.zeros(17, dtype=np.int64)
    size = np.zeros(17, dtype=np.int64)
    next_code = 0
    k = 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            value = values[k]
            if size[value]:
                raise UnsupportedCodestream("Huffman table codes a category twice")
            code[value], size[value] = next_code, length
            next_code += 1
            k += 1
        if next_code > (1 << length) - (1 if length == 16 else 0):
            raise UnsupportedCodestream("Huffman table is not a prefix code")
        next_code <<= 1
    return code, size


def _predictions(x: npt.NDArray[np.int64], scan: LosslessScan) -> npt.NDArray[np.int64]:
    """Px of every sample (Annex H.1.2.1), each line after a restart like the first line."""
    ra = np.zeros_like(x)
    rb = np.zeros_like(x)
    rc = np.zeros_like(x)
    ra[:, 1:] = x[:, :-1]
    rb[1:, :] = x[:-1, :]
    rc[1:, 1:] = x[:-1, :-1]
    s = scan.predictor
    if s == 1:
        px = ra
    elif s == 2:
        px = rb
    elif s == 3:
        px = rc
    elif s == 4:
        px = ra + rb - rc
    elif s == 5:
        px = ra + ((rb - rc) >> 1)
    elif s == 6:
        px = rb + ((ra - rc) >> 1)
    else:
        px = (ra + rb) >> 1
    px = px.copy()
    lines_per_interval = scan.restart_interval // scan.columns if scan.restart_interval else 0
    first_lines = np.zeros(x.shape[0], dtype=bool)
    first_lines[0] = True
    if lines_per_interval:
        first_lines[::lines_per_interval] = True
    px[first_lines, 1:] = ra[first_lines, 1:]  # first line: the left neighbour
    px[~first_lines, 0] = rb[~first_lines, 0]  # first column: the sample above
    px[first_lines, 0] = 1 << (scan.precision - 1)
    return px


_CHUNK = 1 << 20  # words unpacked at once: 32 MB of bits


def _pack_bits(words: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]) -> bytes:
    """The words' low ``lengths`` bits (at most 32), most significant first, back to back,
    the last byte padded with 1-bits, then byte-stuffed (0x00 after each 0xFF)."""
    pieces = []
    columns = np.arange(32)
    for start in range(0, len(words), _CHUNK):
        w = words[start : start + _CHUNK].astype(">u4")
        n = lengths[start : start + _CHUNK]
        bits = np.unpackbits(w.view(np.uint8)).reshape(len(w), 32)
        pieces.append(bits[columns >= (32 - n)[:, None]])
    bits = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    pad = -len(bits) % 8
    if pad:
        bits = np.concatenate([bits, np.ones(pad, dtype=np.uint8)])
    packed = np.packbits(bits)
    stuffed_at = np.flatnonzero(packed == 0xFF) + 1
    return np.insert(packed, stuffed_at, 0).tobytes()


def entropy_coded(samples: npt.NDArray[np.integer], scan: LosslessScan) -> bytes:
    """The entropy-coded data (restart markers included) of ``samples`` (rows x columns,
    values below ``2 ** precision``) coded as ``scan`` says."""
    x = np.asarray(samples, dtype=np.int64).reshape(scan.rows, scan.columns)
    diff = (x - _predictions(x, scan)) & 0xFFFF
    diff = np.where(diff > 0x8000, diff - 0x10000, diff).ravel()
    category = np.searchsorted(_POWERS, np.abs(diff), side="right")  # bits of |diff|
    code, size = _codes(scan.bits, scan.values)
    if np.any(size[category] == 0):
        raise UnsupportedCodestream("a difference's category has no Huffman code")
    extra_len = np.where(category == 16, 0, category)
    extra = np.where(diff < 0, diff + (1 << extra_len) - 1, diff) & ((1 << extra_len) - 1)
    words = (code[category] << extra_len) | extra
    lengths = size[category] + extra_len
    per = scan.restart_interval or x.size
    out = bytearray()
    for k, start in enumerate(range(0, x.size, per)):
        if k:
            out += bytes((0xFF, _RST0 + (k - 1) % 8))
        out += _pack_bits(words[start : start + per], lengths[start : start + per])
    return bytes(out)
