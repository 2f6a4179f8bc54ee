"""The predictive coder's prior: made reproducibly, loaded exactly, named by the blobs that
start from it, and a clear error where it is missing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medzip_scp.archive import Archive
from medzip_scp.cli.train import train_app
from medzip_scp.codec import gate
from medzip_scp.codec.api import PRIOR, compress, decompress, describe
from medzip_scp.codec.errors import UnknownModelError
from medzip_scp.codec.frames import FrameSet, PixelLayout
from medzip_scp.codec.installation import CodecInstallError, check_codec
from medzip_scp.codec.predictive import (
    FRESH,
    CorruptStreamError,
    decode_frame_carried,
    encode_frame,
    encode_frame_carried,
    soften,
)
from medzip_scp.codec.predictive.prior import PRIOR_FILE, encode_prior, read_prior
from medzip_scp.codec.zoo import (
    DEFAULT_MODELS_ROOT,
    MODELS,
    ModelStore,
    default_store,
    use_models_folder,
)
from tests.codec.golden import GOLDEN_PRIOR_V3, golden_prior_pixels
from tests.data_paths import NO_SHARED_DATA, SHARED_DATA
from tests.helpers.node import make_settings


def _noisy(n: int, seed: int, sigma: float = 25, amp: float = 900) -> np.ndarray:
    """An MR-like magnitude frame: a textured disc in Rician noise (12 bits)."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:n, :n] + 0.5) / n - 0.5
    body = (x**2 + y**2 < 0.16) * (amp + 0.3 * amp * np.sin(20 * x) * np.cos(14 * y))
    img = np.abs(body + rng.normal(0, sigma, body.shape) + 1j * rng.normal(0, sigma, body.shape))
    return img.clip(0, 4095).round().astype(np.uint16)


def _frames(img: np.ndarray) -> FrameSet:
    layout = PixelLayout(img.shape[0], img.shape[1], 1, 16, 12, False)
    return FrameSet(layout, img[None, ..., None])


def test_the_shipped_prior_is_what_medzip_train_prior_makes(tmp_path: Path) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_SHARED_DATA)
    out = tmp_path / "pred-prior" / "v9"
    result = CliRunner().invoke(train_app, ["prior", "--out", str(out), "--data", str(SHARED_DATA)])
    assert result.exit_code == 0, result.output
    shipped = DEFAULT_MODELS_ROOT / MODELS[PRIOR].folder
    assert (out / PRIOR_FILE).read_bytes() == (shipped / PRIOR_FILE).read_bytes()
    manifest = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert manifest == MODELS[PRIOR].manifest_sha256
    assert "| fMRI 64x64 (mr_0005) |" in (out / "CARD.md").read_text()  # held-out results


def test_soften_caps_a_copy_and_keeps_fresh_fresh() -> None:
    assert soften(FRESH, 16) is FRESH
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="cap"):
            soften(FRESH, bad)
    _, _, state = encode_frame_carried(_noisy(64, 1), 12, FRESH)
    assert state.buffer is not None
    before = state.buffer.copy()
    soft = soften(state, 4)
    assert np.array_equal(state.buffer, before)  # the original is untouched
    assert soft.buffer is not None and not soft.buffer.flags.writeable
    assert not np.array_equal(soft.buffer, before)
    frame = _noisy(64, 2)
    stream, _, _ = encode_frame_carried(frame, 12, soft)
    back, _, _ = decode_frame_carried(stream, frame.shape, 12, soft)
    assert np.array_equal(back, frame)


def test_a_prior_file_loads_the_same_state_every_time_and_rejects_damage(tmp_path: Path) -> None:
    data = encode_prior(((_noisy(48, s), 12) for s in range(3)), cap=16)
    path = tmp_path / PRIOR_FILE
    path.write_bytes(data)
    first, second = read_prior(path), read_prior(path)
    assert (first.frames, first.cap) == (3, 16)
    assert first.state.buffer is not None and second.state.buffer is not None
    assert np.array_equal(first.state.buffer, second.state.buffer)
    frame = _noisy(48, 7)
    primed, _, _ = encode_frame_carried(frame, 12, first.state)
    assert len(primed) < len(encode_frame(frame, 12))  # it learned frames of this kind
    assert np.array_equal(decode_frame_carried(primed, frame.shape, 12, second.state)[0], frame)
    for damaged, why in [
        (data[:-3], "cut short"),
        (b"MZPX" + data[4:], "not a prior file"),
        (data + b"\0", "after its last frame"),
        (data[:40] + bytes([data[40] ^ 0xFF]) + data[41:], "predictive stream"),
    ]:
        path.write_bytes(damaged)
        with pytest.raises(CorruptStreamError, match=why):
            read_prior(path)
    with pytest.raises(ValueError, match="at least one"):
        encode_prior([], cap=16)


def test_small_frames_start_from_the_prior_and_the_blob_names_it(tmp_path: Path) -> None:
    fs = _frames(_noisy(40, 1, sigma=6, amp=1500))
    blob = compress(fs)
    assert [m["id"] for m in describe(blob)["models"]] == [PRIOR]
    assert describe(blob)["models"][0]["sha256"] == MODELS[PRIOR].manifest_sha256
    assert describe(blob)["frames"][0]["path"] == "pred"
    out = decompress(blob).frames
    assert out is not None and np.array_equal(out.pixels, fs.pixels)
    empty = ModelStore(root=tmp_path)  # a node without the shipped models
    fresh = compress(fs, models=empty)
    assert describe(fresh)["models"] == []
    back = decompress(fresh, models=empty).frames
    assert back is not None and np.array_equal(back.pixels, fs.pixels)
    with pytest.raises(UnknownModelError, match=f"{PRIOR}.*not installed"):
        decompress(blob, models=empty)


def test_a_single_frame_the_prior_does_not_pay_for_is_coded_fresh() -> None:
    fs = _frames(_noisy(64, 1, sigma=60, amp=300))  # noise-dominated: the prior saves < 47 B
    blob = compress(fs)
    assert describe(blob)["frames"][0]["path"] == "pred"
    assert describe(blob)["models"] == []  # a version-2 stream: no model to name
    out = decompress(blob).frames
    assert out is not None and np.array_equal(out.pixels, fs.pixels)


def test_real_small_frames_gain_from_the_prior(tmp_path: Path) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_SHARED_DATA)
    held_out = sorted((SHARED_DATA / "series/fmri-ge/mr_0005").iterdir())[::30]  # not trained on
    empty = ModelStore(root=tmp_path)
    primed = fresh = 0
    for path in held_out:
        ds = pydicom.dcmread(path)
        fs = _frames(np.asarray(ds.pixel_array, np.uint16))
        with_prior, without = compress(fs), compress(fs, models=empty)
        assert [m["id"] for m in describe(with_prior)["models"]] == [PRIOR]
        assert len(with_prior) < len(without)  # without: JPEG-XL tried, often chosen
        primed, fresh = primed + len(with_prior), fresh + len(without)
    assert primed < 0.99 * fresh


def test_large_and_colour_frames_code_without_the_prior() -> None:
    assert describe(compress(_frames(_noisy(160, 4))))["models"] == []
    rgb = np.stack([_noisy(64, 5) >> 4] * 3, axis=-1).astype(np.uint8)
    colour = FrameSet(PixelLayout(64, 64, 3, 8, 8, False), rgb[None])
    assert describe(compress(colour))["models"] == []


def test_golden_blob_from_the_prior_decodes_and_is_reproduced() -> None:
    pixels = golden_prior_pixels()
    out = decompress(GOLDEN_PRIOR_V3).frames
    assert out is not None and np.array_equal(out.pixels, pixels)
    assert default_store().installed(PRIOR)
    layout = PixelLayout(pixels.shape[1], pixels.shape[2], 1, 16, 12, False)
    assert compress(FrameSet(layout, pixels), b"rest", learned=None) == GOLDEN_PRIOR_V3


def test_a_node_without_the_prior_refuses_to_start(tmp_path: Path) -> None:
    """A node must decode every blob it keeps: started on a models folder without the prior
    (``[pipeline] models_dir``), it stops at once naming it; ``medzip codec`` codes without."""
    empty = tmp_path / "models"
    empty.mkdir()
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'index.db'}")
    settings.pipeline.models_dir = empty
    try:
        with pytest.raises(CodecInstallError, match=f"{PRIOR}.* not installed .*16,384 pixels"):
            Archive.open(settings)
    finally:
        use_models_folder(DEFAULT_MODELS_ROOT)
    check_codec(store=ModelStore(root=empty))  # without prior=True: coded from fresh models


def test_the_prior_is_part_of_the_classical_coder(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob that names only the prior is classical to its readers; a registry without the
    prior, or a JPEG-XL that fails its quick screen, codes from a fresh model or without
    JPEG-XL, never fails."""
    fs = _frames(_noisy(40, 1, sigma=6, amp=1500))
    blob = compress(fs)
    assert describe(blob)["model"] is None and describe(blob)["models"][0]["id"] == PRIOR
    no_prior = compress(fs, models=ModelStore(models={}))
    assert describe(no_prior)["models"] == []
    out = decompress(no_prior).frames
    assert out is not None and np.array_equal(out.pixels, fs.pixels)

    def broken(*_: object, **__: object) -> bytes:
        raise RuntimeError("no JPEG-XL here")

    monkeypatch.setattr(gate.imagecodecs, "jpegxl_encode", broken)
    values = fs.pixels[0].astype(np.uint16)
    assert gate.screened_candidates(values, 12, 10**9) == ()
    assert decompress(compress(fs)).frames is not None
