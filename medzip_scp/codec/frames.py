"""Raw pixel frames as the codec sees them.

A :class:`FrameSet` is the codec's view of native (uncompressed) pixel data: one numpy
array ``(frames, rows, columns, samples)`` in the container type implied by Bits Allocated
and Pixel Representation (DICOM PS3.5 section 8.1.1 and PS3.3 C.7.6.3.1). Every bit of every
stored value is significant: values in the unused high bits (Bits Stored < Bits Allocated,
e.g. overlays or garbage) are preserved exactly by the codec.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from medzip_scp.codec.errors import CodecError

__all__ = ["FrameSet", "PixelLayout", "container_dtype"]

_ALLOWED_BITS_ALLOCATED = (1, 8, 16, 32)


def container_dtype(bits_allocated: int, signed: bool) -> np.dtype:
    """Return the numpy dtype holding one stored value.

    Parameters
    ----------
    bits_allocated
        Bits Allocated (0028,0100): 1, 8, 16 or 32.
    signed
        Pixel Representation (0028,0103) == 1. Ignored for 1-bit data (always ``uint8``).

    Returns
    -------
    numpy.dtype
        ``uint8`` for 1-bit data (one value 0/1 per element), otherwise ``(u)int8/16/32``
        in native byte order.

    Raises
    ------
    CodecError
        If ``bits_allocated`` is not one of 1, 8, 16, 32.
    """
    if bits_allocated not in _ALLOWED_BITS_ALLOCATED:
        raise CodecError(
            f"Bits Allocated must be one of {_ALLOWED_BITS_ALLOCATED}, got {bits_allocated}"
        )
    if bits_allocated == 1:
        return np.dtype(np.uint8)
    return np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")


@dataclass(frozen=True)
class PixelLayout:
    """Geometry and sample format of a frame set (DICOM Image Pixel module, PS3.3 C.7.6.3).

    Attributes
    ----------
    rows, columns
        Frame size.
    samples_per_pixel
        1 (monochrome/palette) or more (e.g. 3 for RGB/YBR).
    bits_allocated
        1, 8, 16 or 32.
    bits_stored
        1 .. ``bits_allocated``.
    signed
        Pixel Representation == 1 (two's complement in ``bits_stored`` bits).
    planar_configuration
        0 (colour-by-pixel) or 1 (colour-by-plane). Recorded for the byte layout of the
        original object; the arrays are always ``(rows, columns, samples)``.
    """

    rows: int
    columns: int
    samples_per_pixel: int = 1
    bits_allocated: int = 16
    bits_stored: int = 16
    signed: bool = False
    planar_configuration: int = 0

    def validate(self) -> None:
        """Check the layout against the DICOM rules.

        Raises
        ------
        CodecError
            If any attribute is out of range.
        """
        if self.rows < 1 or self.columns < 1 or self.rows > 0xFFFF or self.columns > 0xFFFF:
            raise CodecError(
                f"rows and columns must be in 1..65535, got {self.rows}x{self.columns}"
            )
        if not 1 <= self.samples_per_pixel <= 255:
            raise CodecError(f"samples per pixel must be in 1..255, got {self.samples_per_pixel}")
        container_dtype(self.bits_allocated, self.signed)
        if not 1 <= self.bits_stored <= self.bits_allocated:
            raise CodecError(
                f"bits stored must be in 1..bits allocated ({self.bits_allocated}), "
                f"got {self.bits_stored}"
            )
        if self.planar_configuration not in (0, 1):
            raise CodecError(
                f"planar configuration must be 0 or 1, got {self.planar_configuration}"
            )

    @property
    def dtype(self) -> np.dtype:
        """Container dtype of one stored value (see :func:`container_dtype`)."""
        return container_dtype(self.bits_allocated, self.signed)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """``(rows, columns, samples_per_pixel)``."""
        return (self.rows, self.columns, self.samples_per_pixel)

    @property
    def pixels_per_frame(self) -> int:
        """Number of pixels (not samples) in one frame."""
        return self.rows * self.columns


@dataclass(frozen=True)
class FrameSet:
    """Native pixel frames plus their layout.

    Attributes
    ----------
    layout
        Geometry and sample format.
    pixels
        Array ``(frames, rows, columns, samples)`` of dtype ``layout.dtype``. For
        ``bits_allocated == 1`` every element must be 0 or 1.
    """

    layout: PixelLayout
    pixels: npt.NDArray[np.generic]

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_frames(self) -> int:
        """Number of frames."""
        return int(self.pixels.shape[0])

    def validate(self) -> None:
        """Check that ``pixels`` matches ``layout``.

        Raises
        ------
        CodecError
            On a dtype, dimensionality or shape mismatch, or 1-bit values other than 0/1.
        """
        self.layout.validate()
        px = self.pixels
        if not isinstance(px, np.ndarray):
            raise CodecError(f"pixels must be a numpy array, got {type(px).__name__}")
        expected = self.layout.dtype
        if px.dtype.kind != expected.kind or px.dtype.itemsize != expected.itemsize:
            raise CodecError(
                f"pixel dtype must match bits allocated {self.layout.bits_allocated} and "
                f"signedness {self.layout.signed}: expected {expected}, got {px.dtype}"
            )
        if px.ndim != 4 or tuple(px.shape[1:]) != self.layout.frame_shape:
            raise CodecError(
                "pixels must have shape (frames, rows, columns, samples) = "
                f"(n, {', '.join(map(str, self.layout.frame_shape))}), got {px.shape}"
            )
        if self.layout.bits_allocated == 1 and px.size and int(px.max()) > 1:
            raise CodecError("1-bit pixel arrays must hold only 0 and 1, found larger values")
