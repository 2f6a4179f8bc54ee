"""Integer arithmetic of the global path: logarithms, powers of two and frequency tables.

Everything here is exact integer arithmetic (numpy ``int64`` or Python ``int``), so its results
are the same on every CPU, thread count and library version. The coder uses :func:`ilog2`,
:func:`lg8` and :func:`frequency_table` while coding; :func:`log2_fixed` and
:func:`exp2neg_table` build a model's tables once (``train.quantize_from``).

Bounds (asserted where they are not guaranteed by the caller's types):

* :func:`ilog2` and :func:`lg8` take values in ``1 .. 2**20 - 1``: the largest argument is the
  gradient energy ``e <= 7 * (2**16 - 1) + 1`` of a 16-bit frame (a larger one raises
  ``IndexError`` from the table lookup, it never returns a wrong value).
* :func:`frequency_table` multiplies weights ``< 2**31`` by totals ``<= 2**31``: products stay
  below ``2**62``.
* :func:`log2_fixed` squares 31-bit mantissas: products below ``2**62``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["exp2neg_table", "frequency_table", "ilog2", "lg8", "log2_fixed"]

_LOG2_BITS = 10
# floor(log2(i)) for i in 1..1023 (entry 0 is never the answer: callers pass values >= 1)
_LOG2_TABLE = np.array([0] + [i.bit_length() - 1 for i in range(1, 1 << _LOG2_BITS)], np.int64)


def ilog2(a: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """``floor(log2(a))`` of integers ``1 <= a < 2**20``, by two lookups in a 1024-entry table."""
    hi = a >> _LOG2_BITS
    return np.where(
        hi > 0,
        _LOG2_BITS + _LOG2_TABLE[hi],
        _LOG2_TABLE[a & ((1 << _LOG2_BITS) - 1)],
    )


def lg8(e: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Integer log2 in 1/8 octave (piecewise linear) of ``1 <= e < 2**20``."""
    k = ilog2(e)
    return 8 * k + (((e << 3) >> k) & 7)


def frequency_table(weights: npt.NDArray[np.int64], total_bits: int) -> npt.NDArray[np.int64]:
    """Integer frequencies following ``weights`` (rows), each >= 1, summing to
    ``2**total_bits``.

    With ``v = max(w - 1, 0)``: ``f = 1 + floor(v * (T - n) / sum(v))``, and the remainder
    (less than ``n``) goes to the largest weight (the first one on ties). A row that already
    is such a table (entries >= 1 summing to ``T``) comes back unchanged. Every row needs a
    weight above 1.
    """
    w = np.asarray(weights, np.int64)
    n = w.shape[-1]
    total = 1 << total_bits
    assert int(w.max()) < 1 << 31 and total <= 1 << 31 and n < total
    v = np.maximum(w - 1, 0)
    s = v.sum(axis=-1, keepdims=True)
    assert int(s.min()) > 0
    f = 1 + (v * (total - n)) // s
    rest = total - f.sum(axis=-1)
    flat = f.reshape(-1, n)
    flat[np.arange(flat.shape[0]), np.argmax(w.reshape(-1, n), axis=-1)] += rest.reshape(-1)
    return f


def log2_fixed(n: npt.NDArray[np.int64], frac_bits: int) -> npt.NDArray[np.int64]:
    """``log2(n)`` in units of ``2**-frac_bits`` (truncated; exact integer steps) for
    ``1 <= n < 2**30``.

    The fractional bits come from repeated squaring of the 30-bit mantissa ``n / 2**k``: each
    squaring doubles the logarithm, and the square's integer part is the next bit.
    """
    n = np.asarray(n, np.int64)
    assert int(n.min()) >= 1 and int(n.max()) < 1 << 30
    k = np.zeros(n.shape, np.int64)
    rest = n.copy()
    for step in (16, 8, 4, 2, 1):
        big = rest >> step > 0
        rest = np.where(big, rest >> step, rest)
        k += big * step
    y = n << (30 - k)  # mantissa in [2**30, 2**31): 1.xxx with 30 fractional bits
    out = k << frac_bits
    for i in range(frac_bits):
        y = (y * y) >> 30
        bit = y >= 1 << 31
        y = np.where(bit, y >> 1, y)
        out += bit.astype(np.int64) << (frac_bits - 1 - i)
    return out


def _iroot(n: int, r: int) -> int:
    """``floor(n ** (1/r))`` for integers ``n >= 1``, by Newton's method from above."""
    x = 1 << -(-n.bit_length() // r)  # >= the root
    while True:
        y = ((r - 1) * x + n // x ** (r - 1)) // r
        if y >= x:
            return x
        x = y


def exp2neg_table(length: int, steps_per_octave: int, one_bits: int) -> npt.NDArray[np.int64]:
    """``round(2**one_bits * 2**(-d / steps_per_octave))`` for ``d = 0 .. length - 1``.

    One integer root ``floor(2**(128 - 1/steps))`` of a Python integer, then its powers in
    128-bit fixed point (each product truncated: the error stays below ``steps * 2**-128``),
    so the table is the same wherever it is built.
    """
    prec = 128
    step = _iroot(1 << (prec * steps_per_octave - 1), steps_per_octave)
    powers = [1 << prec]
    for _ in range(1, steps_per_octave):
        powers.append((powers[-1] * step) >> prec)
    out = []
    for d in range(length):
        q, f = divmod(d, steps_per_octave)
        shift = prec - one_bits + q
        out.append((powers[f] + (1 << (shift - 1))) >> shift)
    return np.array(out, np.int64)
