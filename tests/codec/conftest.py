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
