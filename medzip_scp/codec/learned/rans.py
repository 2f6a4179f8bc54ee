"""The learned codec's own range-ANS coder: integer frequency tables in, 32-bit words out.

Used by global-path stream version 2 (``global-vae-v2``) and local-path stream version 2
(``local-lm-v2``, MZLL 2). Why not constriction: its ``Categorical`` takes float probabilities
and re-quantises them with an algorithm that belongs to the library version (version 1 streams
of both paths depend on it). Here every
table is an integer frequency table summing to ``2**prec`` (every entry >= 1) when it reaches
the coder, and the coder is a few lines of Python integer arithmetic (exact, unbounded), so a
stream decodes the same with any CPU and any library version.

rANS with a 64-bit state and 32-bit words, as constriction's ``AnsCoder``: the state ``x``
stays in ``[2**32, 2**64)``. Coding symbol ``s`` of frequency ``f`` and cumulative ``c`` at
precision ``prec <= 32``: if ``x >= f * 2**(64 - prec)``, push ``x mod 2**32`` and shift ``x``
right by 32; then ``x = (x // f) * 2**prec + x % f + c``. Decoding is the exact inverse:
``slot = x mod 2**prec``, ``s`` the symbol with ``c <= slot < c + f``,
``x = f * (x >> prec) + slot - c``, and if ``x < 2**32`` pop a word into its low bits (one word
always suffices). A uniform ``k``-bit value ``v`` is the symbol ``f = 1, c = v, prec = k``.

A table is its cumulative frequencies: a list of ``n + 1`` Python ints from 0 to ``2**prec``.
The pixel methods (:meth:`WordStack.encode_pixels`, :meth:`WordStack.decode_pixels`) are the
same arithmetic written out for a bucket symbol followed by its mantissa bits, so that a frame
costs one Python loop iteration per pixel; :meth:`WordStack.encode_symbols` and
:meth:`WordStack.decode_symbols` likewise for plain symbols, each of its own table.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from medzip_scp.codec.errors import CorruptStreamError

__all__ = ["WordStack", "cumulative"]

_LOW = 1 << 32
_M32 = _LOW - 1


def cumulative(freq: npt.NDArray[np.integer]) -> list[list[int]]:
    """Rows of integer frequencies -> rows of cumulative frequencies (Python ints)."""
    f = np.asarray(freq, np.int64)
    cum = np.zeros((f.shape[0], f.shape[1] + 1), np.int64)
    np.cumsum(f, axis=1, out=cum[:, 1:])
    return cum.tolist()


class WordStack:
    """One rANS state over a stack of 32-bit words (top = last): encode pushes, decode pops.

    Built from words, the top two form the state; :meth:`words` flattens it back, so
    ``WordStack(w).words() == w``, and an encode exactly undoes the decode before it.
    """

    def __init__(self, words: npt.NDArray[np.uint32] | list[int] | None = None) -> None:
        if words is None:
            self.bulk: list[int] = []
            self.x = _LOW
            return
        w = [int(v) for v in words]
        if len(w) < 2 or w[-1] == 0:
            raise CorruptStreamError(
                f"rANS stream: a word stack needs 2 words with a non-zero top, got {len(w)}"
            )
        self.bulk = w[:-2]
        self.x = (w[-1] << 32) | w[-2]

    def valid_bits(self) -> int:
        """Information held: 32 bits per stacked word plus the state's significant bits."""
        return 32 * len(self.bulk) + self.x.bit_length()

    def words(self) -> list[int]:
        return [*self.bulk, self.x & _M32, self.x >> 32]

    def encode(self, cum: list[int], s: int, prec: int) -> None:
        """Push symbol ``s`` of the table ``cum``."""
        c = cum[s]
        f = cum[s + 1] - c
        x = self.x
        if x >= f << (64 - prec):
            self.bulk.append(x & _M32)
            x >>= 32
        self.x = ((x // f) << prec) + x % f + c

    def decode(self, cum: list[int], prec: int) -> int:
        """Pop a symbol of the table ``cum``."""
        x = self.x
        slot = x & ((1 << prec) - 1)
        s = bisect_right(cum, slot) - 1
        c = cum[s]
        x = (cum[s + 1] - c) * (x >> prec) + slot - c
        if x < _LOW:
            x = (x << 32) | self._pop()
        self.x = x
        return s

    def encode_symbols(self, starts: list[int], freqs: list[int], prec: int) -> None:
        """Push symbols ``len - 1`` down to 0, symbol ``i`` given by its cumulative frequency
        ``starts[i]`` and frequency ``freqs[i]`` (>= 1), so that :meth:`decode_symbols` pops
        symbol 0 first."""
        x = self.x
        bulk = self.bulk
        shift = 64 - prec
        for i in range(len(freqs) - 1, -1, -1):
            f = freqs[i]
            if x >= f << shift:
                bulk.append(x & _M32)
                x >>= 32
            x = ((x // f) << prec) + x % f + starts[i]
        self.x = x

    def decode_symbols(self, tables: Sequence[list[int]], prec: int, rows: list[int]) -> list[int]:
        """Pop ``len(rows)`` symbols pushed by :meth:`encode_symbols`, symbol ``i`` of the
        cumulative table ``tables[rows[i]]``."""
        x = self.x
        bulk = self.bulk
        mask = (1 << prec) - 1
        out = [0] * len(rows)
        try:
            for i, r in enumerate(rows):
                cum = tables[r]
                slot = x & mask
                s = bisect_right(cum, slot) - 1
                c = cum[s]
                x = (cum[s + 1] - c) * (x >> prec) + slot - c
                if x < _LOW:
                    x = (x << 32) | bulk.pop()
                out[i] = s
        except IndexError:
            raise CorruptStreamError("rANS stream: the word stack ran out") from None
        self.x = x
        return out

    def is_empty(self) -> bool:
        """True when every pushed symbol has been popped (the state is back to its start)."""
        return not self.bulk and self.x == _LOW

    def _pop(self) -> int:
        if not self.bulk:
            raise CorruptStreamError("rANS stream: the word stack ran out")
        return self.bulk.pop()

    def encode_pixels(
        self,
        tables: Sequence[list[int]],
        prec: int,
        rows: list[int],
        symbols: list[int],
        mbits: list[int],
        mantissas: list[int],
    ) -> None:
        """Push pixels ``len - 1`` down to 0, each its mantissa then its symbol, so that
        :meth:`decode_pixels` pops pixel 0 first (symbol of table ``rows[i]``, then
        ``mbits[i]`` mantissa bits)."""
        x = self.x
        bulk = self.bulk
        shift = 64 - prec
        for i in range(len(rows) - 1, -1, -1):
            k = mbits[i]
            if k:
                if x >> (64 - k):
                    bulk.append(x & _M32)
                    x >>= 32
                x = (x << k) | mantissas[i]
            cum = tables[rows[i]]
            s = symbols[i]
            c = cum[s]
            f = cum[s + 1] - c
            if x >= f << shift:
                bulk.append(x & _M32)
                x >>= 32
            x = ((x // f) << prec) + x % f + c
        self.x = x

    def decode_pixels(
        self, tables: Sequence[list[int]], prec: int, rows: list[int], mbits_of: list[int]
    ) -> tuple[list[int], list[int]]:
        """Pop ``len(rows)`` pixels pushed by :meth:`encode_pixels`: (symbols, mantissas);
        ``mbits_of[s]`` is the number of mantissa bits of symbol ``s``."""
        x = self.x
        bulk = self.bulk
        mask = (1 << prec) - 1
        n = len(rows)
        symbols = [0] * n
        mantissas = [0] * n
        try:
            for i in range(n):
                cum = tables[rows[i]]
                slot = x & mask
                s = bisect_right(cum, slot) - 1
                c = cum[s]
                x = (cum[s + 1] - c) * (x >> prec) + slot - c
                if x < _LOW:
                    x = (x << 32) | bulk.pop()
                k = mbits_of[s]
                if k:
                    mantissas[i] = x & ((1 << k) - 1)
                    x >>= k
                    if x < _LOW:
                        x = (x << 32) | bulk.pop()
                symbols[i] = s
        except IndexError:
            raise CorruptStreamError("rANS stream: the word stack ran out") from None
        self.x = x
        return symbols, mantissas
