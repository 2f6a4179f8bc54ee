"""The JPEG 2000 path, the JPEG-XL effort-9 encoder and the candidate gate."""

from __future__ import annotations

import imagecodecs
import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from medzip_scp.codec.api import FrameSet, PixelLayout, compress, decompress, describe
from medzip_scp.codec.gate import (
    EXTRA_CANDIDATES,
    PRIMED_FLAT_CANDIDATES,
    SMALL_FRAME_CANDIDATES,
    extra_candidates,
    frame_stats,
    screened_candidates,
)
from medzip_scp.codec.paths import get_encoder, get_path, values_dtype
from tests.data_paths import SHARED_DATA

Image = npt.NDArray[np.int64]


def _values(img: Image) -> tuple[npt.NDArray[np.unsignedinteger], int]:
    """``img`` as the codec hands it to a path: shifted to 0, (rows, columns, samples)."""
    img = img - img.min()
    nbits = int(img.max()).bit_length()
    v = img.astype(values_dtype(nbits))
    return (v[..., None] if v.ndim == 2 else v), nbits


def _frames(img: Image, bits: int) -> FrameSet:
    samples = 1 if img.ndim == 2 else img.shape[2]
    layout = PixelLayout(img.shape[0], img.shape[1], samples, 16 if bits > 8 else 8, bits)
    return FrameSet(
        layout, img.reshape(1, img.shape[0], img.shape[1], samples).astype(layout.dtype)
    )


def _mr_like(n: int, seed: int) -> Image:
    """A magnitude MR-like slice: a textured disc in Rician noise (about 11 bits)."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:n, :n] + 0.5) / n - 0.5
    body = (x**2 + y**2 < 0.16) * (900 + 250 * np.sin(20 * x) * np.cos(14 * y))
    noise = rng.normal(0, 25, body.shape) + 1j * rng.normal(0, 25, body.shape)
    return np.abs(body + noise).round().astype(np.int64)


def _upsampled(a: Image) -> Image:
    """``a`` interpolated 2x along both axes (integer linear interpolation), as scanners do."""
    h, w = a.shape
    b = np.empty((h, 2 * w), np.int64)
    b[:, 0::2], b[:, 1:-1:2], b[:, -1] = a, (a[:, :-1] + a[:, 1:] + 1) >> 1, a[:, -1]
    c = np.empty((2 * h, 2 * w), np.int64)
    c[0::2], c[1:-1:2], c[-1] = b, (b[:-1] + b[1:] + 1) >> 1, b[-1]
    return c


def _ultrasound_like(n: int, seed: int) -> Image:
    """An 8-bit ultrasound-like frame: black background, a sector of (smoothed) speckle and
    rows of repeated text glyphs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n]
    sector = ((x - n / 2) ** 2 + y**2 < (0.8 * n) ** 2) & (np.abs(x - n / 2) < 0.4 * y + 4)
    speckle = rng.gamma(2.0, 30.0, (n + 1, n + 1))
    speckle = (speckle[1:, 1:] + speckle[:-1, 1:] + speckle[1:, :-1] + speckle[:-1, :-1]) / 4
    img = np.where(sector, speckle.clip(1, 254).round(), 0).astype(np.int64)
    glyphs = rng.integers(0, 2, (10, 7, 5)) * 255
    for k in range(40):
        r, c = 4 + 9 * (k // 12), 4 + 6 * (k % 12)
        img[r : r + 7, c : c + 5] = glyphs[rng.integers(0, 10)]
    return img


def _ct_like(n: int, seed: int) -> Image:
    """A 12-bit CT-like slice: an ellipse of soft tissue with an insert, air around it,
    Gaussian noise everywhere (no padding, no clipping)."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:n, :n] + 0.5) / n - 0.5
    body = np.where(x**2 / 0.2 + y**2 / 0.14 < 1, 1000 + 40 * np.sin(25 * x + 9 * y), 24)
    body = body + np.where(x**2 + (y - 0.05) ** 2 < 0.01, 400, 0)
    return (body + rng.normal(0, 12, body.shape)).clip(0, 4095).round().astype(np.int64)


# --- the JPEG 2000 path ---------------------------------------------------------------


@pytest.mark.parametrize("nbits", [1, 8, 12, 16])
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("shape", [(17, 33), (5, 2), (1, 1), (64, 63)])
def test_jpeg2000_path_round_trips(nbits: int, samples: int, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(nbits * 7 + samples)
    dtype = values_dtype(nbits)
    values = rng.integers(0, 1 << nbits, (*shape, samples)).astype(dtype)
    values.flat[0] = (1 << nbits) - 1
    path = get_path("jpeg2000")
    assert path is not None
    data = path.encode(values, nbits)
    assert data is not None and data[:2] == b"\xff\x4f"  # a raw codestream (SOC), no JP2 boxes
    back = path.decode(data, values.shape, nbits)  # type: ignore[arg-type]
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, values)


def test_jpeg2000_path_declines_what_it_cannot_code() -> None:
    path = get_path("jpeg2000")
    assert path is not None
    assert path.encode(np.zeros((4, 4, 2), np.uint8), 8) is None
    assert path.encode(np.zeros((4, 4, 1), np.uint32), 17) is None


def test_blob_with_jpeg2000_frames_decodes() -> None:
    img = np.stack([_upsampled(_mr_like(32, s)) for s in range(2)])
    layout = PixelLayout(64, 64, 1, 16, 12)
    fs = FrameSet(layout, img[..., None].astype(np.uint16))
    blob = compress(fs, b"rest", paths=("jpeg2000",), learned=None)
    assert [f["path"] for f in describe(blob)["frames"]] == ["jpeg2000", "jpeg2000"]
    out = decompress(blob)
    assert out.frames is not None and out.dataset_rest == b"rest"
    np.testing.assert_array_equal(out.frames.pixels, fs.pixels)


def test_jpegxl_effort_9_is_recorded_as_jpegxl_and_decodes() -> None:
    img = _ultrasound_like(96, 1)
    values, nbits = _values(img)
    blob = compress(_frames(img, 8), paths=("jpegxl-e9",), learned=None)
    frame = describe(blob)["frames"][0]
    assert frame["path"] == "jpegxl"
    effort_9 = imagecodecs.jpegxl_encode(values[..., 0], lossless=True, effort=9, bitspersample=8)
    assert frame["bytes"] == len(effort_9)
    out = decompress(blob).frames
    assert out is not None and np.array_equal(out.pixels[0, ..., 0], img)


def test_encoder_variants_are_not_registered_ids() -> None:
    assert get_path("jpegxl-e9") is None
    variant = get_encoder("jpegxl-e9")
    assert variant is not None and variant.name == "jpegxl"


# --- the gate -------------------------------------------------------------------------


def _chosen(img: Image, bits: int) -> tuple[str, int]:
    blob = compress(_frames(img, bits), learned=None)
    frame = describe(blob)["frames"][0]
    return frame["path"], frame["bytes"]


def _pred_only_bytes(img: Image, bits: int) -> int:
    blob = compress(_frames(img, bits), paths=("pred", "jpegls"), learned=None)
    return int(describe(blob)["frames"][0]["bytes"])


def test_gate_tries_jpeg2000_on_an_interpolated_frame() -> None:
    img = _upsampled(_mr_like(128, 1))  # 256x256: above the small-frame size
    values, nbits = _values(img)
    assert frame_stats(values, nbits).wavelet_gain > 1
    assert "jpeg2000" in extra_candidates(values, nbits)
    path, size = _chosen(img, 12)
    assert path == "jpeg2000"
    assert size < 0.8 * _pred_only_bytes(img, 12)


def test_gate_tries_jpeg2000_on_a_frame_decoded_from_lossy_jpeg2000() -> None:
    original = (_mr_like(256, 9) + 300).astype(np.uint16)
    lossy = imagecodecs.jpeg2k_encode(original, level=70, reversible=True, bitspersample=12)
    img = np.asarray(imagecodecs.jpeg2k_decode(lossy)).astype(np.int64)
    values, nbits = _values(img)
    stats = frame_stats(values, nbits)
    assert stats.lattice > 0.3 and stats.wavelet_gain < 0.6  # the lattice alone finds it
    assert "jpeg2000" in extra_candidates(values, nbits)
    path, size = _chosen(img, 12)
    assert path == "jpeg2000"
    assert size < 0.85 * _pred_only_bytes(img, 12)


def test_gate_tries_jpegxl_on_an_ultrasound_like_frame() -> None:
    img = _ultrasound_like(256, 2)
    values, nbits = _values(img)
    assert {"jpegxl", "jpegxl-e9"} <= set(extra_candidates(values, nbits))
    path, size = _chosen(img, 8)
    assert path == "jpegxl"
    assert size < 0.95 * _pred_only_bytes(img, 8)


def test_gate_tries_jpegxl_on_a_colour_frame() -> None:
    grey = _ultrasound_like(160, 3)
    img = np.stack([grey, grey // 2, grey // 3], axis=-1)
    values, nbits = _values(img)
    assert {"jpegxl", "jpegxl-e9"} <= set(extra_candidates(values, nbits))
    path, size = _chosen(img, 8)
    assert path == "jpegxl"
    assert size < 0.5 * _pred_only_bytes(img, 8)


def test_gate_tries_jpegxl_on_a_mostly_background_frame() -> None:
    img = _mr_like(256, 8)
    y, x = (np.mgrid[:256, :256] + 0.5) / 256 - 0.5
    img[x**2 + y**2 >= 0.04] = 0  # masked background: 87 % of the frame
    values, nbits = _values(img)
    assert frame_stats(values, nbits).active_pixels < 0.2 * img.size
    assert "jpegxl" in extra_candidates(values, nbits)
    path, size = _chosen(img, 12)
    assert path == "jpegxl"
    assert size < 0.98 * _pred_only_bytes(img, 12)


def test_gate_tries_jpegxl_on_noise_clipped_at_a_floor() -> None:
    img = np.maximum(_ct_like(256, 4), 24)  # air's noise clipped: half of it at the minimum
    values, nbits = _values(img)
    assert frame_stats(values, nbits).floor > 0.12
    assert "jpegxl" in extra_candidates(values, nbits)
    path, size = _chosen(img, 12)
    assert path == "jpegxl"
    assert size < 0.98 * _pred_only_bytes(img, 12)


def test_gate_skips_the_slow_codecs_on_a_ct_like_frame() -> None:
    img = _ct_like(256, 5)
    values, nbits = _values(img)
    assert extra_candidates(values, nbits) == ()
    assert _chosen(img, 12)[0] == "pred"


def test_gate_tries_every_codec_on_small_frames_effort_9_on_low_noise_background() -> None:
    """Effort 9 only on small frames with a low-noise background (the MR edge slices it wins);
    effort 7, JPEG 2000 and zstd on every small frame; zstd alone beyond 16 bits."""
    small, nbits = _values(_ct_like(128, 6))
    assert extra_candidates(small, nbits) == SMALL_FRAME_CANDIDATES
    rng = np.random.default_rng(1)
    edge = rng.integers(0, 3, (128, 128))  # low noise around a small object: an MR edge slice
    edge[40:80, 30:90] = _ct_like(128, 6)[40:80, 30:90]
    values, nbits = _values(edge)
    assert extra_candidates(values, nbits) == EXTRA_CANDIDATES
    padded = edge.copy()
    padded[:, :64] = 0  # exact zero padding (DTI): pred codes it as well
    values, nbits = _values(padded)
    assert extra_candidates(values, nbits) == SMALL_FRAME_CANDIDATES
    wide = np.zeros((300, 300, 1), np.uint32)
    wide[0, 0] = 1 << 20
    assert extra_candidates(wide, 21) == ("zstd",)


def test_explicit_paths_are_not_gated() -> None:
    img = _upsampled(_mr_like(128, 7))
    blob = compress(_frames(img, 12), paths=("pred",), learned=None)
    assert describe(blob)["frames"][0]["path"] == "pred"


# --- real frames: never worse than a standard codec -----------------------------------

REAL_FRAMES = [  # (file under ../shared/data, frame): small MR, ultrasound, CT
    ("series/fmri-ge/mr_0004/axial_epi_fmri_interleaved_i_to_s-00006.dcm", 0),
    ("series/fmri-ge/mr_0005/axial_epi_fmri_sequential_i_to_s-00088.dcm", 0),
    ("series/mr-t1-3d/5001001.dcm", 0),  # 4 bits, JPEG-XL effort 9 beats pred
    ("series/mr-t1-3d/5001050.dcm", 0),
    ("series/mr-dti-enhanced/5000.dcm", 34),
    ("conformance/LittleEndianExplicit/OBXXXX1A.dcm", 0),
    ("series/ct-phantom-1mm/I600.dcm", 0),
]


def _standard_sizes(values: npt.NDArray[np.unsignedinteger], nbits: int) -> dict[str, int]:
    v = values[..., 0]
    return {
        "JPEG-XL effort 7": len(
            imagecodecs.jpegxl_encode(v, lossless=True, effort=7, bitspersample=nbits)
        ),
        "JPEG-XL effort 9": len(
            imagecodecs.jpegxl_encode(v, lossless=True, effort=9, bitspersample=nbits)
        ),
        "JPEG-LS": len(imagecodecs.jpegls_encode(v)),
        "JPEG 2000": len(
            imagecodecs.jpeg2k_encode(v, level=0, reversible=True, bitspersample=nbits)
        ),
    }


@pytest.mark.parametrize(("name", "index"), REAL_FRAMES)
def test_real_frame_is_never_larger_than_a_standard_codec(name: str, index: int) -> None:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real DICOM not found at {path}")
    ds = pydicom.dcmread(path)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = np.asarray(ds.pixel_array).reshape(n, ds.Rows, ds.Columns)[index].astype(np.int64)
    values, nbits = _values(pixels)
    layout = PixelLayout(ds.Rows, ds.Columns, 1, ds.BitsAllocated, ds.BitsStored)
    fs = FrameSet(layout, (pixels - pixels.min()).astype(layout.dtype)[None, ..., None])
    blob = compress(fs, learned=None)
    chosen = describe(blob)["frames"][0]
    for codec, size in _standard_sizes(values, nbits).items():
        assert chosen["bytes"] <= size, f"{codec} is smaller: {size} < {chosen['bytes']}"


def test_gate_leaves_small_frames_from_the_prior_to_pred_unless_jpegxl_may_win() -> None:
    """From the predictive prior a small single-sample frame tries only pred and JPEG-LS,
    then JPEG-XL effort 7 where effort 2's stream is not much larger than theirs; flat frames
    and colour frames are gated as without the prior."""
    values, nbits = _values(_mr_like(64, 4))
    assert extra_candidates(values, nbits, primed=True) == ()
    quick = len(imagecodecs.jpegxl_encode(values[..., 0], lossless=True, effort=2))
    assert screened_candidates(values, nbits, int(0.85 * quick)) == ()
    assert screened_candidates(values, nbits, int(0.95 * quick)) == ("jpegxl",)
    flat, fbits = _values(_ultrasound_like(128, 5))
    assert extra_candidates(flat, fbits, primed=True) == PRIMED_FLAT_CANDIDATES
    grey = _mr_like(64, 6)
    colour, cbits = _values(np.stack([grey, grey // 2, grey // 3], axis=-1))
    assert extra_candidates(colour, cbits, primed=True) == extra_candidates(colour, cbits)
    big, bbits = _values(_ct_like(256, 7))
    assert screened_candidates(big, bbits, 10**9) == ()  # larger frames: the gate's rule
