"""The predictive coder as a container path: chosen on real images, exact, smaller."""

from __future__ import annotations

import contextlib
import logging
import threading

import numpy as np
import pydicom
import pytest

from medzip_scp.codec import api
from medzip_scp.codec.api import FrameSet, PixelLayout, compress, decompress, describe
from medzip_scp.codec.errors import UnsupportedFormatError
from medzip_scp.codec.predictive import _build
from tests.data_paths import SHARED_DATA

CT_DIR = SHARED_DATA / "series" / "ct-phantom-1mm"


def _ct_frameset() -> FrameSet:
    if not CT_DIR.is_dir():
        pytest.skip(f"real CT series not found at {CT_DIR}")
    ds = pydicom.dcmread(sorted(CT_DIR.glob("*.dcm"))[len(list(CT_DIR.glob("*.dcm"))) // 2])
    pixels = ds.pixel_array.reshape(1, ds.Rows, ds.Columns, 1)
    layout = PixelLayout(
        rows=ds.Rows,
        columns=ds.Columns,
        samples_per_pixel=1,
        bits_allocated=ds.BitsAllocated,
        bits_stored=ds.BitsStored,
        signed=bool(ds.PixelRepresentation),
        planar_configuration=0,
    )
    return FrameSet(layout, pixels)


def test_pred_path_wins_on_ct_and_round_trips() -> None:
    frames = _ct_frameset()
    with_pred = compress(frames)
    without = compress(frames, paths=("jpegxl", "jpegls", "zstd"))
    assert [f["path"] for f in describe(with_pred)["frames"]] == ["pred"]
    assert len(with_pred) < len(without)
    back = decompress(with_pred).frames
    assert back is not None
    assert np.array_equal(back.pixels, frames.pixels)


def test_pred_path_codes_each_sample_of_rgb() -> None:
    rng = np.random.default_rng(3)
    base = np.cumsum(rng.integers(-2, 3, size=(1, 40, 50, 3)), axis=2)
    pixels = (base - base.min()).clip(0, 255).astype(np.uint8)
    layout = PixelLayout(
        rows=40, columns=50, samples_per_pixel=3, bits_allocated=8, bits_stored=8,
        signed=False, planar_configuration=0,
    )  # fmt: skip
    blob = compress(FrameSet(layout, pixels), paths=("pred",))
    assert describe(blob)["frames"][0]["path"] in {"pred", "constant", "verbatim"}
    back = decompress(blob).frames
    assert back is not None and np.array_equal(back.pixels, pixels)


def test_frames_of_one_object_warm_start_each_others_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0:160, 0:200]
    scene = 1500 + 800 * np.sin(yy / 23.0) * np.cos(xx / 31.0) + 3 * yy
    pixels = np.stack([scene + rng.normal(0, 12, scene.shape) for _ in range(3)])
    pixels = pixels.clip(0, 4095).astype(np.uint16)[..., None]
    layout = PixelLayout(
        rows=160, columns=200, samples_per_pixel=1, bits_allocated=16, bits_stored=12,
        signed=False, planar_configuration=0,
    )  # fmt: skip
    frames = FrameSet(layout, pixels)
    # the fit alone: carried models (test_carried.py) would reuse frame 0's table
    monkeypatch.setattr(api, "carried_models", lambda decoding: contextlib.nullcontext())
    warm = compress(frames, paths=("pred",), learned=None)
    monkeypatch.setattr(api, "warm_start", contextlib.nullcontext)
    cold = compress(frames, paths=("pred",), learned=None)
    assert warm != cold  # frames 1 and 2 were fitted from the frame before
    assert abs(len(warm) - len(cold)) < 0.005 * len(cold)
    for blob in (warm, cold):
        assert [f["path"] for f in describe(blob)["frames"]] == ["pred"] * 3
        back = decompress(blob).frames
        assert back is not None and np.array_equal(back.pixels, pixels)


def test_without_the_c_core_frames_go_to_other_codecs_and_it_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An install whose C core cannot be built (no compiler): new blobs are larger and the
    log says why, once; blobs that need the core say so, never "corrupt stream"."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64]
    frame = (1000 + 300 * np.sin(yy / 9) + rng.normal(0, 4, yy.shape)).astype(np.uint16)
    layout = PixelLayout(64, 64, 1, 16, 12, False)
    frames = FrameSet(layout, frame[None, ..., None])
    with_core = compress(frames, learned=None)
    assert describe(with_core)["frames"][0]["path"] == "pred"
    monkeypatch.setattr(_build, "_lib", None)
    monkeypatch.setattr(_build, "_failed", _build.BuildError("no C compiler found"))
    monkeypatch.setattr(api, "_said_core_unavailable", threading.Event())
    with caplog.at_level(logging.ERROR):
        without = [compress(frames, learned=None) for _ in range(2)]
    said = [r.message for r in caplog.records if "C core is unavailable" in r.message]
    assert len(said) == 1 and "install a C compiler" in said[0]
    assert describe(without[0])["frames"][0]["path"] != "pred"
    assert np.array_equal(decompress(without[0]).frames.pixels, frames.pixels)
    with pytest.raises(UnsupportedFormatError, match="need the predictive coder's C core"):
        decompress(with_core)
