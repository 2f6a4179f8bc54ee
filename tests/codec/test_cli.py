"""``medzip codec`` encode/decode/info on files and folders."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from medzip_scp.cli import codec as codec_cli
from medzip_scp.cli.codec import codec_app
from medzip_scp.codec.api import LearnedOptions
from medzip_scp.codec.zoo import DEFAULT_MODELS_ROOT, use_models_folder
from medzip_scp.config import PipelineSettings
from medzip_scp.dicom.blob import blob_info, encode_dataset
from tests.data_paths import PYDICOM_FILES

PHI = "ZZCLI^SECRETNAME"


def _write_dicom(path: Path, seed: int) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = PHI
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 16, 12, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (16, 12)).astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    src = tmp_path / "in"
    files = {
        "a.dcm": _write_dicom(src / "a.dcm", 1),
        "sub/b.dcm": _write_dicom(src / "sub" / "b.dcm", 2),
    }
    (src / "sub" / "notes.txt").write_bytes(b"not dicom")
    files["sub/notes.txt"] = b"not dicom"
    return src, files


def test_folder_encode_decode_info(tmp_path: Path, tree: tuple[Path, dict[str, bytes]]) -> None:
    src, files = tree
    runner = CliRunner()
    res = runner.invoke(codec_app, ["encode", str(src), str(tmp_path / "enc")])
    assert res.exit_code == 0, res.output
    lines = _lines(res.stdout)
    assert {r["file"] for r in lines} == set(files)
    dicom = next(r for r in lines if r["file"] == "a.dcm")
    for key in ("pixels", "pixel_bytes", "total_bytes", "seconds", "model", "paths"):
        assert key in dicom
    assert dicom["pixels"] == 16 * 12
    assert len(dicom["paths"]) == 1
    assert (tmp_path / "enc" / "sub" / "b.dcm.mzp").is_file()
    assert PHI not in res.output

    res = runner.invoke(codec_app, ["decode", str(tmp_path / "enc"), str(tmp_path / "dec")])
    assert res.exit_code == 0, res.output
    for rel, data in files.items():
        assert (tmp_path / "dec" / rel).read_bytes() == data

    res = runner.invoke(codec_app, ["info", str(tmp_path / "enc" / "a.dcm.mzp")])
    assert res.exit_code == 0, res.output
    (info,) = _lines(res.stdout)
    assert info["mode"] == "native"
    assert PHI not in res.output
    assert pydicom.dcmread(tmp_path / "dec" / "a.dcm").PatientName == PHI


def test_files_coded_at_once_give_the_same_blobs_in_input_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in"
    for i in range(6):
        _write_dicom(src / f"f{i}.dcm", i)
    runner = CliRunner()
    one = runner.invoke(codec_app, ["encode", "-j", "1", str(src), str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    started: set[int] = set()
    overlapped = threading.Event()
    real = codec_cli.encode_dataset

    def watched(data: bytes, learned: object) -> bytes:
        started.add(threading.get_ident())
        if len(started) > 1:
            overlapped.set()
        overlapped.wait(5)  # the first file waits until another thread codes one too
        return real(data, learned)

    monkeypatch.setattr(codec_cli, "encode_dataset", watched)
    many = runner.invoke(codec_app, ["encode", "--jobs", "3", str(src), str(tmp_path / "many")])
    assert many.exit_code == 0, many.output
    assert overlapped.is_set(), "files were not coded at once"
    assert [r["file"] for r in _lines(many.stdout)] == [f"f{i}.dcm" for i in range(6)]
    for i in range(6):
        name = f"f{i}.dcm.mzp"
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_single_file_and_corrupt_blob(tmp_path: Path) -> None:
    data = _write_dicom(tmp_path / "x.dcm", 3)
    runner = CliRunner()
    res = runner.invoke(codec_app, ["encode", str(tmp_path / "x.dcm"), str(tmp_path / "x.mzp")])
    assert res.exit_code == 0, res.output
    blob = bytearray((tmp_path / "x.mzp").read_bytes())
    blob[-3] ^= 0xFF
    (tmp_path / "bad.mzp").write_bytes(bytes(blob))
    res = runner.invoke(codec_app, ["decode", str(tmp_path / "bad.mzp"), str(tmp_path / "y.dcm")])
    assert res.exit_code == 1
    (line,) = _lines(res.stdout)
    assert "CorruptStreamError" in line["error"]
    assert not (tmp_path / "y.dcm").exists()
    res = runner.invoke(codec_app, ["decode", str(tmp_path / "x.mzp"), str(tmp_path / "y.dcm")])
    assert res.exit_code == 0
    assert (tmp_path / "y.dcm").read_bytes() == data


@pytest.fixture(scope="module")
def identity_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node's identity key file and its exported public keys, and another node's."""
    from medzip_scp.identity.keys import IdentityKeyring

    folder = tmp_path_factory.mktemp("identity")
    for name in ("ours", "theirs"):
        keyring = IdentityKeyring.open_or_create(folder / f"{name}.json")
        (folder / f"{name}-public.json").write_text(keyring.export_public())
    return folder


def test_sealed_blob_decodes_pixels_without_a_key_and_everything_with_it(
    tmp_path: Path, identity_files: Path
) -> None:
    original = _write_dicom(tmp_path / "in.dcm", seed=7)
    runner = CliRunner()
    keys = str(identity_files / "ours.json")
    result = runner.invoke(
        codec_app, ["encode", "--identity-keys", keys, str(tmp_path / "in.dcm"), str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    blob = tmp_path / "in.dcm.mzp"
    assert PHI.encode() not in blob.read_bytes()
    assert _lines(result.output)[0]["payload_bytes"] > 100

    result = runner.invoke(codec_app, ["decode", str(blob), str(tmp_path / "keyless.dcm")])
    assert result.exit_code == 0, result.output
    assert _lines(result.output)[0]["identity"].startswith("unavailable")
    keyless = pydicom.dcmread(tmp_path / "keyless.dcm")
    assert "PatientName" not in keyless  # unavailable, never invented
    expected = pydicom.dcmread(tmp_path / "in.dcm")
    assert np.array_equal(keyless.pixel_array, expected.pixel_array)
    assert keyless.SOPInstanceUID == expected.SOPInstanceUID

    args = ["decode", "--identity-keys", keys, str(blob), str(tmp_path / "full.dcm")]
    result = runner.invoke(codec_app, args)
    assert result.exit_code == 0, result.output
    assert _lines(result.output)[0]["identity"] == "restored"
    assert (tmp_path / "full.dcm").read_bytes() == original

    theirs = str(identity_files / "theirs.json")
    result = runner.invoke(codec_app, ["decode", "--identity-keys", theirs, str(blob), "x.dcm"])
    assert result.exit_code == 1
    assert "KEY-MISSING" in _lines(result.output)[0]["error"]


def test_signature_checks_with_public_keys_only(tmp_path: Path, identity_files: Path) -> None:
    _write_dicom(tmp_path / "in.dcm", seed=8)
    runner = CliRunner()
    keys = str(identity_files / "ours.json")
    args = ["encode", "--identity-keys", keys, str(tmp_path / "in.dcm"), str(tmp_path)]
    assert runner.invoke(codec_app, args).exit_code == 0
    blob = str(tmp_path / "in.dcm.mzp")
    ours = str(identity_files / "ours-public.json")
    result = runner.invoke(codec_app, ["signature", blob, "--public-keys", ours])
    assert result.exit_code == 0, result.output
    assert _lines(result.output)[0]["signature"] == "valid"
    theirs = str(identity_files / "theirs-public.json")
    result = runner.invoke(codec_app, ["signature", blob, "--public-keys", theirs])
    assert result.exit_code == 1
    assert "TAMPERED" in _lines(result.output)[0]["error"]
    plain = tmp_path / "plain"
    assert runner.invoke(codec_app, ["encode", str(tmp_path / "in.dcm"), str(plain)]).exit_code == 0
    result = runner.invoke(codec_app, ["signature", str(plain), "--public-keys", ours])
    assert result.exit_code == 1
    assert "no identity payload" in _lines(result.output)[0]["error"]


def test_models_folder_is_chosen_and_a_missing_model_is_named(tmp_path: Path) -> None:
    data = (PYDICOM_FILES / "MR_small.dcm").read_bytes()
    blob = tmp_path / "learned.mzp"
    blob.write_bytes(encode_dataset(data, LearnedOptions(force_split=2)))
    model_ids = [m["id"] for m in blob_info(blob.read_bytes())["codec"]["models"]]
    runner = CliRunner()
    empty = tmp_path / "no-models"
    empty.mkdir()
    try:
        res = runner.invoke(
            codec_app, ["decode", "--models", str(empty), str(blob), str(tmp_path / "x.dcm")]
        )
        assert res.exit_code == 1
        (line,) = _lines(res.stdout)
        assert "not installed" in line["error"]
        assert any(m in line["error"] for m in model_ids)
        assert "Traceback" not in res.output
        res = runner.invoke(
            codec_app,
            ["decode", "--models", str(DEFAULT_MODELS_ROOT), str(blob), str(tmp_path / "y.dcm")],
        )
        assert res.exit_code == 0, res.output
    finally:
        use_models_folder(DEFAULT_MODELS_ROOT)
    res = runner.invoke(codec_app, ["decode", str(blob), str(tmp_path / "y.dcm")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "y.dcm").read_bytes() == data
    res = runner.invoke(
        codec_app, ["decode", "--models", str(tmp_path / "nowhere"), str(blob), "z"]
    )
    assert res.exit_code == 1
    assert "models folder" in res.output and "nowhere" in res.output


def test_models_folder_setting_must_exist(tmp_path: Path) -> None:
    assert PipelineSettings(models_dir=tmp_path).models_dir == tmp_path
    with pytest.raises(ValidationError, match="models folder"):
        PipelineSettings(models_dir=tmp_path / "missing")
