"""Carried models (pred-v2 stream version 3): the frames of one object pass their adaptive
model on, in order; each frame still decodes exactly, and only in order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from medzip_scp.codec.api import FrameSet, PixelLayout, compress, decompress, describe
from medzip_scp.codec.predictive import (
    FRESH,
    CorruptStreamError,
    decode_frame,
    decode_frame_carried,
    encode_frame,
    encode_frame_carried,
)


def _series(n: int, seed: int = 0, size: int = 48) -> np.ndarray:
    """``n`` small noisy frames of one smooth object (what a multi-frame MR holds)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size]
    base = 900 + 600 * np.exp(-((y - size / 2) ** 2 + (x - size / 2) ** 2) / (size * 4))
    return np.stack(
        [np.clip(base * (1 + 0.02 * k) + rng.normal(0, 12, base.shape), 0, 4095) for k in range(n)]
    ).astype(np.uint16)


def test_frames_decode_in_order_and_only_in_order() -> None:
    frames = _series(4)
    state = FRESH
    streams = []
    for frame in frames:
        stream, slot, state = encode_frame_carried(frame, 12, state)
        assert slot is not None and stream[4] == 3  # version 3
        streams.append(stream)
    state = FRESH
    for frame, stream in zip(frames, streams, strict=True):
        back, _, state = decode_frame_carried(stream, frame.shape, 12, state)
        np.testing.assert_array_equal(back, frame)
    # later frames are smaller than each frame coded on its own: the model came adapted
    alone = [len(encode_frame(f, 12)) for f in frames]
    assert sum(map(len, streams[1:])) < 0.99 * sum(alone[1:])
    with pytest.raises(CorruptStreamError, match="decode the object's frames in order"):
        decode_frame(streams[2], frames[2].shape, 12)
    with pytest.raises(CorruptStreamError):  # started from the wrong model: caught, never served
        decode_frame_carried(streams[2], frames[2].shape, 12, FRESH)


def _object(frames: np.ndarray) -> FrameSet:
    return FrameSet(PixelLayout(*frames.shape[1:], 1, 16, 12, False), frames[..., None])


def test_a_multi_frame_blob_carries_models_through_other_paths_frames() -> None:
    frames = _series(6)
    frames[2] = 7  # a constant frame between: it does not touch the chain
    rng = np.random.default_rng(5)
    frames[4] = rng.integers(0, 4096, frames[4].shape)  # noise: pred stores it raw
    blob = compress(_object(frames))
    info = describe(blob)
    assert [f["path"] for f in info["frames"]][2] == "constant"
    np.testing.assert_array_equal(decompress(blob).frames.pixels[..., 0], frames)
    alone = sum(len(compress(_object(frames[k : k + 1]))) for k in range(len(frames)))
    assert len(blob) < alone
    # verified per frame (the encoder's fallback) the same streams come out
    assert compress(_object(frames), verify=True) == blob


def test_objects_coded_and_decoded_at_once_on_threads_are_exact() -> None:
    objects = [_series(5, seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        blobs = list(pool.map(lambda f: compress(_object(f)), objects))
        backs = list(pool.map(decompress, blobs))
    assert blobs == [compress(_object(f)) for f in objects]  # deterministic
    for frames, back in zip(objects, backs, strict=True):
        np.testing.assert_array_equal(back.frames.pixels[..., 0], frames)
