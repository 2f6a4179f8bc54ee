"""The global path's own range-ANS coder: integer frequency tables in, 32-bit words out.

Why not constriction: its ``Categorical`` takes float probabilities and re-quantises them with
an algorithm that belongs to the library version (stream version 1 depends on it). Here every
table is an integer frequency table summing to ``2**prec`` (every entry >= 1) when it reaches
the coder, and the coder is a few lines of integer arithmetic, so a stream decodes the same
with any library version.

Coder (one state, rANS with 64-bit state and 32-bit words, as in constriction's ``AnsCoder``):
the state ``x`` stays in ``[2**32, 2**64)``. Coding symbol ``s`` of frequency ``f`` and
cumulative ``c`` at precision ``prec <= 32``: if ``x >= f * 2**(64 - prec)``, push ``x mod 2**32``
and shift ``x`` right by 32; then ``x = (x // f) * 2**prec + x % f + c``. Decoding is the exact
inverse: ``slot = x mod 2**prec``, ``s`` the symbol with ``c <= slot < c + f``,
``x = f * (x >> prec) + slot - c``, and if ``x < 2**32`` pop a word into its low bits. Every
intermediate value stays below ``2**64`` (``uint64`` / Python ``int``, no rounding anywhere).
A uniform ``m``-bit value is the symbol ``v`` with ``f = 1``, ``c = v``, ``prec = m`` (``m = 0``
leaves the state unchanged).

* :class:`WordStack`: one state over a stack of words (Python integers): the bits-back stack
  of the latents, which starts from the payload words.
* :class:`LaneEncoder` / :class:`LaneDecoder`: ``L`` interleaved states coded together
  (numpy ``uint64``), one symbol per lane per call, sharing one word stream: within a call the
  decoder reads the words of the lanes that need one in lane order, and the encoder pushes them
  in the reverse order. The decoder starts by reading each lane's state (high word first); each
  lane ends at the encoder's initial state ``2**32``, which the decoder checks.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np
import numpy.typing as npt

from medzip_scp.codec.errors import CorruptStreamError

__all__ = ["LaneDecoder", "LaneEncoder", "SymbolTable", "WordStack"]

_LOW = 1 << 32
_M32 = (1 << 32) - 1
_U = np.uint64


class WordStack:
    """One rANS state over a stack of 32-bit words (top = last): encode pushes, decode pops.

    Built from words, the top two form the state; :meth:`words` flattens it back, so
    ``WordStack(w).words() == w`` and an encode exactly undoes the decode before it.
    """

    def __init__(self, words: npt.NDArray[np.uint32] | list[int]) -> None:
        w = [int(v) for v in words]
        if len(w) < 2 or w[-1] == 0:
            raise CorruptStreamError(
                f"global-path stream: a word stack needs 2 words with a non-zero top, got {len(w)}"
            )
        self.bulk = w[:-2]
        self.x = (w[-1] << 32) | w[-2]

    def valid_bits(self) -> int:
        """Information held: 32 bits per stacked word plus the state's significant bits."""
        return 32 * len(self.bulk) + self.x.bit_length()

    def words(self) -> list[int]:
        return [*self.bulk, self.x & _M32, self.x >> 32]

    def encode(self, cum: list[int], s: int, prec: int) -> None:
        """Push symbol ``s`` of the table with cumulative frequencies ``cum`` (``len n + 1``)."""
        c = cum[s]
        f = cum[s + 1] - c
        x = self.x
        if x >= f << (64 - prec):
            self.bulk.append(x & _M32)
            x >>= 32
        self.x = ((x // f) << prec) + x % f + c

    def decode(self, cum: list[int], prec: int) -> int:
        """Pop a symbol; raises :class:`CorruptStreamError` when the stack runs out of words."""
        x = self.x
        slot = x & ((1 << prec) - 1)
        s = bisect_right(cum, slot) - 1
        c = cum[s]
        x = (cum[s + 1] - c) * (x >> prec) + slot - c
        if x < _LOW:
            if not self.bulk:
                raise CorruptStreamError("global-path stream: the latent word stack ran out")
            x = (x << 32) | self.bulk.pop()
        self.x = x
        return s


class SymbolTable:
    """Rows of integer frequencies (each row sums to ``2**prec``, entries >= 1), flattened for
    vectorised lookups: symbol ``s`` of row ``r`` is entry ``r * n + s``."""

    def __init__(self, freq: npt.NDArray[np.integer], prec: int) -> None:
        f = np.asarray(freq, np.int64)
        rows, n = f.shape
        if int(f.min()) < 1 or np.any(f.sum(axis=1) != 1 << prec):
            raise ValueError(f"frequency rows must be >= 1 and sum to 2**{prec}")
        cum = np.cumsum(f, axis=1) - f
        self.prec = prec
        self.n = n
        self.freq = f.reshape(-1).astype(np.uint64)
        self.cum = cum.reshape(-1).astype(np.uint64)
        # strictly increasing (entries >= 1): one searchsorted finds (row, symbol) of a slot
        self.keys = (np.arange(rows, dtype=np.int64)[:, None] << prec) + cum
        self.keys = self.keys.reshape(-1)


class LaneEncoder:
    """``lanes`` interleaved rANS states; symbols are pushed in the reverse of decode order."""

    def __init__(self, lanes: int) -> None:
        self.x = np.full(lanes, _LOW, np.uint64)
        self._pushed: list[npt.NDArray[np.uint64]] = []

    def _push(self, n: int, freq: np.ndarray, cum: np.ndarray, prec: np.ndarray | int) -> None:
        x = self.x[:n]
        # x >= f * 2**(64 - prec), written without forming 2**64 when prec = 0
        emit = (x >> (_U(63) - _U(prec))) >= (freq << _U(1))
        if emit.any():
            self._pushed.append((x[emit] & _U(_M32))[::-1])
            x = np.where(emit, x >> _U(32), x)
        self.x[:n] = ((x // freq) << _U(prec)) + (x % freq) + cum

    def encode(self, table: SymbolTable, rows: np.ndarray, symbols: np.ndarray) -> None:
        """Lane ``i`` codes ``symbols[i]`` from table row ``rows[i]`` (lanes 0 .. n-1)."""
        idx = rows.astype(np.int64) * table.n + symbols
        self._push(len(idx), table.freq[idx], table.cum[idx], table.prec)

    def encode_bits(self, values: np.ndarray, nbits: np.ndarray) -> None:
        """Lane ``i`` codes the ``nbits[i]``-bit value ``values[i]`` (0 bits: no change)."""
        if nbits.any():
            n = len(values)
            self._push(n, np.ones(n, np.uint64), values.astype(np.uint64), nbits.astype(np.uint64))

    def finish(self) -> npt.NDArray[np.uint32]:
        """The word stream in the order the decoder reads it (lane states first)."""
        head = np.empty(2 * self.x.size, np.uint64)
        head[0::2] = self.x >> _U(32)
        head[1::2] = self.x & _U(_M32)
        body = np.concatenate(self._pushed)[::-1] if self._pushed else np.empty(0, np.uint64)
        return np.concatenate([head, body]).astype(np.uint32)


class LaneDecoder:
    """Inverse of :class:`LaneEncoder` over the words it produced."""

    def __init__(self, words: npt.NDArray[np.uint32], lanes: int) -> None:
        w = np.asarray(words, np.uint64)
        if lanes < 1 or w.size < 2 * lanes:
            raise CorruptStreamError(
                f"global-path stream: {w.size} pixel words cannot hold {lanes} lane states"
            )
        self.x = (w[0 : 2 * lanes : 2] << _U(32)) | w[1 : 2 * lanes : 2]
        if np.any(self.x < _U(_LOW)):
            raise CorruptStreamError("global-path stream: a lane state is below 2**32")
        self._w = w
        self._ptr = 2 * lanes

    def _refill(self, x: np.ndarray) -> np.ndarray:
        need = x < _U(_LOW)
        k = int(np.count_nonzero(need))
        if k:
            if self._ptr + k > self._w.size:
                raise CorruptStreamError("global-path stream: pixel words end early")
            x[need] = (x[need] << _U(32)) | self._w[self._ptr : self._ptr + k]
            self._ptr += k
        return x

    def decode(self, table: SymbolTable, rows: np.ndarray) -> npt.NDArray[np.int64]:
        """Symbols of lanes 0 .. n-1, lane ``i`` from table row ``rows[i]``."""
        n = len(rows)
        x = self.x[:n]
        slot = x & _U((1 << table.prec) - 1)
        base = rows.astype(np.int64) << table.prec
        idx = np.searchsorted(table.keys, base + slot.view(np.int64), "right") - 1
        x = table.freq[idx] * (x >> _U(table.prec)) + (slot - table.cum[idx])
        self.x[:n] = self._refill(x)
        return idx - rows * table.n

    def decode_bits(self, nbits: np.ndarray) -> npt.NDArray[np.int64]:
        """``nbits[i]``-bit values of lanes 0 .. n-1."""
        n = len(nbits)
        if not nbits.any():
            return np.zeros(n, np.int64)
        x = self.x[:n]
        m = nbits.astype(np.uint64)
        values = x & ((_U(1) << m) - _U(1))
        self.x[:n] = self._refill(x >> m)
        return values.view(np.int64)

    def check_end(self) -> None:
        """Every word read and every lane back at the encoder's initial state."""
        if self._ptr != self._w.size or np.any(self.x != _U(_LOW)):
            raise CorruptStreamError(
                "global-path stream: pixel words do not end where the lanes do "
                f"(read {self._ptr} of {self._w.size})"
            )
