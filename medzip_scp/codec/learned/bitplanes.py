"""Bit-plane split of a frame into a high (global) part and a low (local) part.

``split(frame, bits, s)`` returns ``high = frame >> s`` (``bits - s`` bits per value) and
``low = frame & ((1 << s) - 1)`` (``s`` bits per value); ``join(high, low, s)`` inverts it
exactly. ``s = 0`` means no split: ``high`` is the frame and ``low`` is all zeros.

This API is stable: the global and local paths both import it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["split", "join"]


def _check_s(bits: int, s: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if not 0 <= s <= bits:
        raise ValueError(f"split plane s must be in 0..bits={bits}, got {s}")


def split(
    frame: npt.NDArray[np.integer], bits: int, s: int
) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16]]:
    """Split ``frame`` at bit plane ``s``.

    Parameters
    ----------
    frame
        Integer array of non-negative values below ``2**bits``.
    bits
        Bit depth of the frame (1..16).
    s
        Number of low planes in the local part (0..bits).

    Returns
    -------
    high, low
        ``uint16`` arrays of the frame's shape: ``frame >> s`` and ``frame & (2**s - 1)``.

    Raises
    ------
    ValueError
        If ``bits`` or ``s`` is out of range, or a value is negative or ``>= 2**bits``.
    """
    _check_s(bits, s)
    a = np.asarray(frame)
    if a.size and (int(a.min()) < 0 or int(a.max()) >= (1 << bits)):
        raise ValueError(
            f"frame values must lie in 0..{(1 << bits) - 1} for bits={bits}, "
            f"got range {int(a.min())}..{int(a.max())}"
        )
    a = a.astype(np.uint16, copy=False)
    high = (a >> np.uint16(s)).astype(np.uint16)
    low = (a & np.uint16((1 << s) - 1)).astype(np.uint16)
    return high, low


def join(
    high: npt.NDArray[np.integer], low: npt.NDArray[np.integer], s: int
) -> npt.NDArray[np.uint16]:
    """Inverse of :func:`split`: ``(high << s) | low`` as ``uint16``.

    Raises
    ------
    ValueError
        If the shapes differ, ``s`` is outside 0..16, or ``low`` has values ``>= 2**s``.
    """
    h = np.asarray(high)
    lo = np.asarray(low)
    if h.shape != lo.shape:
        raise ValueError(f"high and low must have the same shape, got {h.shape} and {lo.shape}")
    if not 0 <= s <= 16:
        raise ValueError(f"split plane s must be in 0..16, got {s}")
    if lo.size and int(lo.max()) >= (1 << s):
        raise ValueError(f"low values must be below 2**s={1 << s}, got max {int(lo.max())}")
    return ((h.astype(np.uint32) << s) | lo.astype(np.uint32)).astype(np.uint16)
