"""read_received: the quick element walk gives pydicom's verdict and values, faster.

The node reads every received object with its own walk over the elements and keeps only
the values it checks and indexes; a full pydicom parse decides whatever the walk finds
unusual. These tests hold the two to the same answers: over every real file at hand, and
over thousands of damaged copies of them.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from medzip_scp.dicom import part10
from medzip_scp.dicom.part10 import (
    HEADER_KEYWORDS,
    InvalidObjectError,
    RejectReason,
    dataset_offset,
    read_received,
)
from medzip_scp.index.ingest import attributes_from_dataset
from tests.data_paths import PYDICOM_FILES, SHARED_DATA


def _part10_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.stat().st_size > 132:
            with open(path, "rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    found.append(path)
    return found


FILES = _part10_files(SHARED_DATA) + _part10_files(PYDICOM_FILES)


def _value(header: Any, keyword: str) -> str:
    try:
        return repr(header.get(keyword))
    except Exception as exc:  # pydicom refuses to convert it: the same refusal either way
        return type(exc).__name__


def _verdict(read: Any, path: Path) -> tuple[Any, ...]:
    """Everything the node takes from reading a received object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            received = read(path)
        except InvalidObjectError as exc:
            return ("refused", exc.reason)
        except Exception as exc:
            return ("error", type(exc).__name__)
        try:
            attributes: Any = attributes_from_dataset(received.header)
        except Exception as exc:
            attributes = type(exc).__name__
        return (
            "accepted",
            attributes,
            str(received.transfer_syntax_uid),
            received.dataset_offset,
            received.file_size,
            tuple(_value(received.header, k) for k in HEADER_KEYWORDS),
        )


def _by_pydicom(path: Path) -> part10.ReceivedObject:
    return part10._read_with_pydicom(path, None, None)


@pytest.fixture(scope="module")
def files() -> list[Path]:
    if len(FILES) < 50:
        pytest.skip(f"real DICOM data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return FILES


def test_every_real_file_reads_as_pydicom_reads_it(files: list[Path]) -> None:
    quick = 0
    for path in files:
        assert _verdict(read_received, path) == _verdict(_by_pydicom, path), path
        quick += part10._read_quickly(path, None, None) is not None
    # the walk must carry the load, not hand everything to pydicom
    assert quick >= 0.85 * len(files), f"only {quick} of {len(files)} read by the walk"


@pytest.mark.parametrize("seed", range(4))
def test_damaged_files_get_pydicoms_verdict(files: list[Path], seed: int) -> None:
    """Cut, truncated, overwritten and extended copies: same refusal reason or same values."""
    rng = random.Random(seed)
    verdicts: set[str] = set()
    path = Path(f"/dev/shm/medzip-part10-{os.getpid()}-{seed}.dcm")
    if not path.parent.is_dir():
        path = Path(os.environ.get("TMPDIR", "/tmp")) / path.name
    try:
        for _ in range(400):
            source = rng.choice(files)
            data = bytearray(source.read_bytes())
            start = dataset_offset(source)
            how = rng.choice(["truncate", "overwrite", "append", "cut"])
            if how == "truncate":
                del data[rng.randrange(start, len(data)) :]
            elif how == "overwrite":
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(start, min(len(data), start + 4096))] = rng.randrange(256)
            elif how == "append":
                data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
            else:
                at = rng.randrange(start, len(data))
                del data[at : at + rng.randint(1, 16)]
            path.write_bytes(bytes(data))
            verdict = _verdict(read_received, path)
            assert verdict == _verdict(_by_pydicom, path), (source, how)
            verdicts.add(verdict[0])
    finally:
        path.unlink(missing_ok=True)
    assert verdicts >= {"accepted", "refused"}  # the damage was varied enough to matter


def _part10_copy(tmp_path: Path, name: str, **changes: Any) -> Path:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = changes.pop("syntax", ExplicitVRLittleEndian)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_structured_report_ending_in_a_sequence_is_accepted() -> None:
    """Its last element is a sequence pydicom parses while reading; the full parse once
    measured the data set without it and refused the file as cut short."""
    received = read_received(PYDICOM_FILES / "reportsi.dcm")
    assert received.header.get("Modality") == "SR"
    assert _by_pydicom(PYDICOM_FILES / "reportsi.dcm").file_size == received.file_size


def test_short_pixel_data_is_refused_with_its_reason(tmp_path: Path) -> None:
    path = _part10_copy(tmp_path, "short.dcm", Rows=256)  # the pixels are 128 rows
    with pytest.raises(InvalidObjectError) as refused:
        read_received(path)
    assert refused.value.reason is RejectReason.PIXEL_DATA_INCONSISTENT


def test_request_mismatch_is_refused_with_its_reason(tmp_path: Path) -> None:
    path = _part10_copy(tmp_path, "ct.dcm")
    with pytest.raises(InvalidObjectError) as refused:
        read_received(path, expected_sop_instance_uid="1.2.3.4")
    assert refused.value.reason is RejectReason.SOP_INSTANCE_MISMATCH
    assert read_received(path, expected_sop_class_uid=pydicom.dcmread(path).SOPClassUID)


def test_big_endian_objects_are_read_by_pydicom() -> None:
    path = PYDICOM_FILES / "MR_small_bigendian.dcm"
    assert part10._read_quickly(path, None, None) is None
    received = read_received(path)
    assert received.transfer_syntax_uid == ExplicitVRBigEndian
    assert received.header.get("Rows") == pydicom.dcmread(path).Rows


def test_only_kept_keywords_can_be_asked_for(tmp_path: Path) -> None:
    received = part10._read_quickly(_part10_copy(tmp_path, "ct.dcm"), None, None)
    assert received is not None
    assert received.header.get("PatientName") == pydicom.dcmread(tmp_path / "ct.dcm").PatientName
    with pytest.raises(KeyError):
        received.header.get("PatientComments")  # not kept: an error, never a silent None
