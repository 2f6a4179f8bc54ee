"""The predictive coder as a container path: chosen on real images, exact, smaller."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medzip_scp.codec import api
from medzip_scp.codec.api import FrameSet, PixelLayout, compress, decompress, describe
from medzip_scp.codec.errors import UnsupportedFormatError
from medzip_scp.codec.installation import CodecInstallError, check_codec
from medzip_scp.codec.predictive import CoreUnavailableError, _core
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
    monkeypatch.setattr(api, "carried_models", lambda *_, **__: contextlib.nullcontext())
    warm = compress(frames, paths=("pred",), learned=None)
    monkeypatch.setattr(api, "warm_start", contextlib.nullcontext)
    cold = compress(frames, paths=("pred",), learned=None)
    assert warm != cold  # frames 1 and 2 were fitted from the frame before
    assert abs(len(warm) - len(cold)) < 0.005 * len(cold)
    for blob in (warm, cold):
        assert [f["path"] for f in describe(blob)["frames"]] == ["pred"] * 3
        back = decompress(blob).frames
        assert back is not None and np.array_equal(back.pixels, pixels)


def _smooth_frames() -> FrameSet:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:64]
    frame = (1000 + 300 * np.sin(yy / 9) + rng.normal(0, 4, yy.shape)).astype(np.uint16)
    return FrameSet(PixelLayout(64, 64, 1, 16, 12, False), frame[None, ..., None])


def _core_from(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make the loader look for the C core in ``folder`` from now on."""
    monkeypatch.setattr(_core, "_lib", None)
    monkeypatch.setattr(_core, "_failed", None)
    monkeypatch.setattr(_core, "_HERE", folder)
    monkeypatch.setattr(_core, "_SOURCE", folder / "_pred.c")


def test_without_the_c_core_nothing_is_coded_by_another_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An install whose C core is not built: encoding and the start-up check fail naming it
    and saying how to rebuild (never a silent change to a larger codec); a blob that needs
    the core says so, never "corrupt stream"."""
    frames = _smooth_frames()
    with_core = compress(frames, learned=None)
    assert describe(with_core)["frames"][0]["path"] == "pred"
    _core_from(monkeypatch, tmp_path)
    with pytest.raises(CoreUnavailableError, match="not built .* reinstall medzip"):
        compress(frames, learned=None)
    with pytest.raises(CodecInstallError, match="not built"):
        check_codec()
    with pytest.raises(UnsupportedFormatError, match="need the predictive coder's C core"):
        decompress(with_core)


def test_a_core_built_from_another_source_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A checkout whose ``_pred.c`` changed after ``pip install -e .`` would run a stale core:
    the loader compares the sha256 the build recorded with the source beside it."""
    built = next(Path(_core.__file__).parent.glob("_pred.*.so"))
    shutil.copy2(built, tmp_path / built.name)
    (tmp_path / "_pred.c").write_text("/* another source */\n")
    _core_from(monkeypatch, tmp_path)
    with pytest.raises(CodecInstallError, match="built from another _pred.c"):
        check_codec()
    shutil.copy2(Path(_core.__file__).with_name("_pred.c"), tmp_path / "_pred.c")
    _core_from(monkeypatch, tmp_path)
    check_codec()  # the same source: it loads
