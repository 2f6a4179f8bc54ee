"""DICOM Part-10 <-> blob: byte-exact round trips of real and synthetic files."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from medzip_scp.codec import predictive
from medzip_scp.codec.api import PRIOR, LearnedOptions, decompress
from medzip_scp.codec.errors import CodecError, CorruptStreamError
from medzip_scp.codec.paths import PredictivePath
from medzip_scp.codec.predictive import FlushSlot
from medzip_scp.dicom import blob as blob_module
from medzip_scp.dicom.blob import blob_info, decode_blob, encode_dataset, open_blob, peek_blob
from tests.data_paths import PYDICOM_FILES, SHARED_DATA

PHI = "ZZSECRET^PATIENTNAME"


def _files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    skip = {".py", ".md", ".txt", ".json"}
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix not in skip and "LICENSE" not in p.name
    )


def _need_shared() -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real DICOM data not found at {SHARED_DATA} (see ../shared/data/README.md)")


def _assert_roundtrip(data: bytes) -> bytes:
    blob = encode_dataset(data)
    assert decode_blob(blob) == data
    return blob


CONFORMANCE = _files(SHARED_DATA / "conformance")


@pytest.mark.parametrize(
    "path", CONFORMANCE or [None], ids=[p.name for p in CONFORMANCE] or ["missing"]
)
def test_conformance_files_roundtrip_byte_exact(path: Path | None) -> None:
    _need_shared()
    assert path is not None
    data = path.read_bytes()
    blob = _assert_roundtrip(data)
    info = blob_info(blob)
    assert info["original_bytes"] == len(data)
    ts = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        assert info["mode"] == "native", info["reason"]
        assert info["frames"] >= 1


def test_conformance_native_pixels_match_pydicom() -> None:
    """The frames the codec stores are the pixels pydicom reads (no rescale)."""
    _need_shared()
    for path in CONFORMANCE:
        data = path.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data))
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            continue
        frames = decompress(encode_dataset(data)).frames
        assert frames is not None, path.name
        expected = ds.pixel_array.reshape(frames.pixels.shape)
        np.testing.assert_array_equal(frames.pixels, expected, err_msg=path.name)


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["mr-epi", "series/ct-phantom-1mm", "series/fmri-ge"])
def test_real_series_sample_roundtrip(folder: str) -> None:
    _need_shared()
    files = _files(SHARED_DATA / folder)[::7][:8]
    assert files
    for path in files:
        data = path.read_bytes()
        blob = _assert_roundtrip(data)
        assert len(blob) < len(data)


@pytest.mark.slow
def test_enhanced_multiframe_roundtrip() -> None:
    _need_shared()
    path = _files(SHARED_DATA / "series" / "mr-dti-enhanced")[0]
    data = path.read_bytes()
    info = blob_info(_assert_roundtrip(data))
    assert info["mode"] == "native"
    assert info["frames"] == 520


@pytest.mark.slow
def test_pydicom_bundled_files_roundtrip() -> None:
    files = _files(PYDICOM_FILES)
    assert files, "pydicom's bundled test files are missing"
    for path in files:
        data = path.read_bytes()
        assert decode_blob(encode_dataset(data)) == data, path.name


# --------------------------------------------------------------------------- synthetic files


def _part10(
    pixels: bytes | None,
    *,
    rows: int = 4,
    cols: int = 5,
    spp: int = 1,
    ba: int = 16,
    bs: int = 12,
    pr: int = 0,
    planar: int | None = None,
    frames: int | None = None,
    ts: str = ExplicitVRLittleEndian,
    trailer: bool = False,
) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = PHI
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, spp
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = ba, bs, bs - 1
    ds.PixelRepresentation = pr
    ds.PhotometricInterpretation = "RGB" if spp == 3 else "MONOCHROME2"
    if planar is not None:
        ds.PlanarConfiguration = planar
    if frames is not None:
        ds.NumberOfFrames = frames
    if pixels is not None:
        ds.PixelData = pixels
        if ba > 8:
            ds["PixelData"].VR = "OW"
    if trailer:
        ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 6)
    buf = io.BytesIO()
    ds.save_as(
        buf,
        enforce_file_format=True,
        implicit_vr=ts == ImplicitVRLittleEndian,
        little_endian=ts != ExplicitVRBigEndian,
    )
    return buf.getvalue()


def _frames_of(data: bytes) -> npt.NDArray[np.generic]:
    frames = decompress(encode_dataset(data)).frames
    assert frames is not None
    return frames.pixels


@pytest.mark.parametrize("bs", range(1, 17))
def test_every_bits_stored(bs: int) -> None:
    rng = np.random.default_rng(bs)
    px = rng.integers(0, 1 << bs, (4, 5)).astype("<u2")
    data = _part10(px.tobytes(), bs=bs)
    blob = _assert_roundtrip(data)
    assert blob_info(blob)["mode"] == "native"
    np.testing.assert_array_equal(_frames_of(data)[0, ..., 0], px)


def test_signed_extremes_and_garbage_high_bits() -> None:
    px = np.array([[-2048, 2047, -1, 0, 1]] * 4, dtype="<i2")
    words = px.view("<u2") & np.uint16(0x0FFF)
    words[1, 1] |= np.uint16(0xA000)  # garbage above Bits Stored
    data = _part10(words.tobytes(), bs=12, pr=1)
    _assert_roundtrip(data)


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar(planar: int) -> None:
    rng = np.random.default_rng(planar)
    rgb = rng.integers(0, 256, (2, 6, 7, 3)).astype(np.uint8)
    raw = rgb.transpose(0, 3, 1, 2).tobytes() if planar else rgb.tobytes()
    data = _part10(raw, rows=6, cols=7, spp=3, ba=8, bs=8, planar=planar, frames=2)
    _assert_roundtrip(data)
    np.testing.assert_array_equal(_frames_of(data), rgb)


def test_odd_length_pixel_data_padding_byte() -> None:
    px = np.arange(9, dtype=np.uint8).reshape(3, 3)
    data = _part10(px.tobytes(), rows=3, cols=3, ba=8, bs=8)
    blob = _assert_roundtrip(data)
    assert blob_info(blob)["mode"] == "native"


def test_one_bit_with_padding_bits() -> None:
    rng = np.random.default_rng(1)
    bits = (rng.random(3 * 5 * 3) < 0.5).astype(np.uint8)  # 45 bits: last byte partly used
    packed = bytearray(np.packbits(bits, bitorder="little").tobytes())
    packed[-1] |= 0xE0  # garbage in the unused bits of the last byte
    data = _part10(bytes(packed), rows=5, cols=3, ba=1, bs=1, frames=3)
    blob = _assert_roundtrip(data)
    assert blob_info(blob)["mode"] == "native"
    np.testing.assert_array_equal(_frames_of(data).reshape(-1), bits)


@pytest.mark.parametrize("signed", [0, 1])
def test_thirty_two_bit(signed: int) -> None:
    rng = np.random.default_rng(2)
    px = rng.integers(0, 2**32, (2, 4, 5), dtype=np.uint64).astype("<u4")
    data = _part10(px.tobytes(), ba=32, bs=32, pr=signed, frames=2)
    blob = _assert_roundtrip(data)
    assert blob_info(blob)["mode"] == "native"


def test_big_endian_explicit() -> None:
    px = (np.arange(20).reshape(4, 5) * 100).astype(">u2")
    data = _part10(px.tobytes(), ts=ExplicitVRBigEndian)  # pydicom writes the bytes as given
    blob = _assert_roundtrip(data)
    assert blob_info(blob)["mode"] == "native"
    np.testing.assert_array_equal(_frames_of(data)[0, ..., 0], px.astype(np.uint16))


def test_implicit_vr_and_trailing_elements_after_pixel_data() -> None:
    px = np.arange(20, dtype="<u2")
    data = _part10(px.tobytes(), ts=ImplicitVRLittleEndian, trailer=True)
    blob = _assert_roundtrip(data)
    assert blob_info(blob)["mode"] == "native"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: _part10(None), "no Pixel Data"),
        (lambda: _part10(np.zeros(10, "<u2").tobytes()), "shorter than expected"),
        (lambda: b"", None),
        (lambda: b"not a dicom file at all" * 10, None),
        (lambda: _part10(np.zeros(20, "<u2").tobytes(), bs=17), "layout"),
    ],
)
def test_odd_inputs_are_stored_whole(make: Callable[[], bytes], reason: str | None) -> None:
    data = make()
    info = blob_info(_assert_roundtrip(data))
    assert info["mode"] == "file"
    assert info["frames"] == 0
    if reason:
        assert reason in info["reason"]


def test_info_and_errors_carry_no_phi() -> None:
    data = _part10(np.arange(20, dtype="<u2").tobytes())
    assert PHI.encode() in data
    blob = encode_dataset(data)
    assert PHI not in json.dumps(blob_info(blob))
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(CorruptStreamError) as err:
        decode_blob(bytes(bad))
    assert PHI not in str(err.value)


def test_corrupted_blob_never_returns_wrong_bytes() -> None:
    data = _part10(np.arange(20, dtype="<u2").tobytes())
    blob = encode_dataset(data)
    for pos in range(0, len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x04
        with pytest.raises(CodecError):
            decode_blob(bytes(bad))
    for n in range(0, len(blob), 7):
        with pytest.raises(CodecError):
            decode_blob(blob[:n])


def test_encode_verifies_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _part10(np.arange(20, dtype="<u2").tobytes())
    real = blob_module.open_blob

    def damaged(blob: bytes, references: object = None) -> tuple[bytes, bytes]:
        part10, payload = real(blob, references)
        return part10[:-1] + b"\x01", payload

    monkeypatch.setattr(blob_module, "open_blob", damaged)
    with pytest.raises(CodecError, match="verification failed"):
        encode_dataset(data)


def _count_pred_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    for name in ("decode_frame", "decode_frame_slot", "decode_frame_carried"):
        real = getattr(predictive, name)

        def counting(*args: object, _real: Callable[..., object] = real) -> object:
            calls[0] += 1
            return _real(*args)

        monkeypatch.setattr(predictive, name, counting)
    return calls


def test_a_blob_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify once: the whole blob is decoded and compared; the codec does not decode each
    frame's chosen stream as well (it did: two decodes of every frame)."""
    data = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    calls = _count_pred_decodes(monkeypatch)
    blob = encode_dataset(data)
    assert blob_info(blob)["codec"]["frames"][0]["path"] == "pred"
    assert calls[0] == 1
    assert decode_blob(blob) == data


def test_a_stream_that_does_not_decode_back_is_passed_over(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the one check of the whole blob fails (here pred-v2's encoder codes another
    frame than it was given), the blob is coded again with every frame's stream verified
    before it is chosen: another path takes the frame and the result is exact."""
    data = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    real = PredictivePath.encode_carrying

    def lying(
        self: PredictivePath, values: npt.NDArray[np.unsignedinteger], nbits: int
    ) -> tuple[bytes, list[FlushSlot]] | None:
        other = values.copy()
        other[0, 0, 0] ^= 1
        return real(self, other, nbits)

    monkeypatch.setattr(PredictivePath, "encode_carrying", lying)
    unchecked = encode_dataset(data, verify=False)
    with pytest.raises(CodecError):
        decode_blob(unchecked)
    with caplog.at_level("WARNING"):
        blob = encode_dataset(data)
    assert "coding it again" in caplog.text
    assert decode_blob(blob) == data
    assert blob_info(blob)["codec"]["frames"][0]["path"] != "pred"


def test_learned_paths_are_opt_in_and_decode() -> None:
    """The node compresses classically unless ``[pipeline] learned``; a blob coded with the
    learned paths through the DICOM adapter decodes bit-exact."""
    data = (PYDICOM_FILES / "MR_small.dcm").read_bytes()
    classical = blob_info(encode_dataset(data))["codec"]["models"]
    assert {m["id"] for m in classical} <= {PRIOR}  # the predictive prior at most
    learned = encode_dataset(data, LearnedOptions(force_split=2))
    assert blob_info(learned)["codec"]["models"], "the learned options did not reach the codec"
    assert decode_blob(learned) == data


@pytest.mark.parametrize(
    ("name", "payload", "readable"),
    [
        ("CT_small.dcm", b"", True),  # no payload: mzp1
        ("CT_small.dcm", bytes(range(256)) * 3, False),  # its first bytes in coder flushes
        ("rtstruct.dcm", bytes(range(256)) * 3, True),  # no pixels: in a section
    ],
)
def test_peek_gives_the_stored_head_and_the_payload_unless_decoding_is_needed(
    name: str, payload: bytes, readable: bool
) -> None:
    part10 = Path(pydicom.data.get_testdata_file(name)).read_bytes()
    blob = encode_dataset(part10, payload=payload)
    head, peeked = peek_blob(blob)
    assert open_blob(blob) == (part10, payload)
    assert peeked == (payload if readable else None)
    ds = pydicom.dcmread(io.BytesIO(part10), force=True)
    if "PixelData" in ds:  # up to its value (explicit VR: tag, OW, 2 reserved bytes, length)
        assert head == part10[: part10.index(b"\xe0\x7f\x10\x00OW") + 12]
    else:
        assert head == part10
    assert pydicom.dcmread(io.BytesIO(head), force=True).SOPInstanceUID == ds.SOPInstanceUID
