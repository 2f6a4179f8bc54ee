"""Frames shared by the payload tests."""

from __future__ import annotations

import numpy as np
import pytest

from medzip_scp.codec.api import FrameSet, PixelLayout


@pytest.fixture(scope="session")
def carrier_frames() -> FrameSet:
    """Four 16x16 12-bit frames whose coded streams differ in length: noise (hundreds of
    bytes), noise with an overlay bit (a residual stream after its coded stream), a nearly
    constant frame (a few bytes) and a constant one (no bytes)."""
    rng = np.random.default_rng(1)
    px = rng.integers(0, 4096, (4, 16, 16, 1)).astype(np.uint16)
    px[1, rng.random((16, 16)) < 0.2] |= 0x8000
    px[2] = 7
    px[2, 3, 5] = 8
    px[3] = 7
    return FrameSet(PixelLayout(16, 16, 1, 16, 12, False), px)


@pytest.fixture(scope="session")
def free_bits_frames() -> FrameSet:
    """Six 64x48 12-bit frames, four coded by ``pred``, three of them by its arithmetic coder
    (whose flushes carry free payload bits): smooth, noise (``pred`` stores it raw: no coder),
    constant, smooth with an overlay bit (a residual after its coded stream), blocks
    (``jpegxl``), smooth."""
    rng = np.random.default_rng(2)
    y, x = np.mgrid[:64, :48]

    def smooth(i: int) -> np.ndarray:
        a = 1500 + 400 * np.sin(x / (5 + i)) + 300 * np.cos(y / 7) + rng.normal(0, 3, y.shape)
        return a.astype(np.uint16)

    noise = rng.integers(0, 4096, y.shape)
    blocks = (y // 16 + x // 16) % 2 * 3000
    px = np.stack([smooth(0), noise, np.full(y.shape, 7), smooth(1), blocks, smooth(2)])
    px = px.astype(np.uint16)
    px[3, rng.random(y.shape) < 0.2] |= 0x8000
    return FrameSet(PixelLayout(64, 48, 1, 16, 12, False), px[..., None])
