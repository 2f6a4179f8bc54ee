"""read_received: the quick element walk gives pydicom's verdict and values, faster.

The node reads every received object with its own walk over the elements and keeps only
the values it checks and indexes; a full pydicom parse decides whatever the walk finds
unusual. These tests hold the two to the same answers: over every real file at hand, and
over thousands of damaged copies of them.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import warnings
from io import BytesIO
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
from tests.data_paths import NO_SHARED_DATA, PYDICOM_FILES, SHARED_DATA, part10_files

SHARED_FILES = part10_files(SHARED_DATA)
FILES = SHARED_FILES + part10_files(PYDICOM_FILES)


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
    """Every Part 10 file at hand; the tests skip without ../shared/data (pydicom's files
    alone are mostly odd ones that the walk hands to pydicom)."""
    if not SHARED_FILES:
        pytest.skip(NO_SHARED_DATA)
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


# Hand-built data sets for the structures real files seldom have (found in review).
_EXPLICIT, _IMPLICIT, _JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"
_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_UNDEFINED = 0xFFFFFFFF
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


def _even(value: bytes, pad: bytes = b"\0") -> bytes:
    return value + pad if len(value) % 2 else value


def _ex(group: int, element: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    length = len(value) if length is None else length
    if vr in _LONG:
        return struct.pack("<HH2sHI", group, element, vr, 0, length) + value
    return struct.pack("<HH2sH", group, element, vr, length) + value


def _im(group: int, element: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("<HHI", group, element, len(value) if length is None else length) + value


def _item(body: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED) + body + _ITEM_END
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


# Basic Text SR: these structures need no Pixel Data (an image storage SOP class does)
_SOP_CLASS = b"1.2.840.10008.5.1.4.1.1.88.11"


def _meta(syntax: str) -> bytes:
    body = (
        _ex(2, 1, b"OB", b"\0\1")
        + _ex(2, 2, b"UI", _even(_SOP_CLASS))
        + _ex(2, 3, b"UI", _even(b"1.2.3.4"))
        + _ex(2, 0x10, b"UI", _even(syntax.encode()))
    )
    return b"\0" * 128 + b"DICM" + _ex(2, 0, b"UL", struct.pack("<I", len(body))) + body


_UIDS = [(8, 0x16, _SOP_CLASS), (8, 0x18, b"1.2.3.4"), (0x20, 0xD, b"1.2.3")]
_UIDS.append((0x20, 0xE, b"1.2.3.5"))
_IDS_EX = b"".join(_ex(g, e, b"UI", _even(v)) for g, e, v in _UIDS)
_IDS_IM = b"".join(_im(g, e, _even(v)) for g, e, v in _UIDS)
_IMAGE = b"".join(_ex(0x28, e, b"US", v) for e, v in [(2, b"\1\0"), (0x10, b"\2\0")])
_IMAGE += _ex(0x28, 0x11, b"US", b"\2\0") + _ex(0x28, 0x100, b"US", b"\x08\0")


def _nested(depth: int) -> bytes:
    if depth == 0:
        return _ex(8, 0x100, b"SH", b"AB")
    body = _item(_nested(depth - 1), undefined=True)
    return _ex(0x40, 0xA730, b"SQ", b"", _UNDEFINED) + body + _SEQUENCE_END


_LAST_SEQUENCE = _nested(1)
_FRAGMENT = b"\xfe\xff\xdd\xe0\0\0\0\0" + b"XY" * 4  # holds a delimiter's bytes
_PIXELS_UNDEFINED = _ex(0x7FE0, 0x10, b"OB", b"", _UNDEFINED)
_PROTOCOL_UNDEFINED = (  # ProtocolName (LO) with an undefined length, a sequence inside
    _im(0x18, 0x1030, b"", _UNDEFINED)
    + _item(
        _im(0x40, 0xA730, b"", _UNDEFINED) + _item(_im(8, 0x100, b"AB"), True) + _SEQUENCE_END,
        True,
    )
    + _SEQUENCE_END
)

# name: (bytes, the verdict both readers must give, or None where only equality matters)
CRAFTED: dict[str, tuple[bytes, str | None]] = {
    "ends with a sequence": (_meta(_EXPLICIT) + _IDS_EX + _LAST_SEQUENCE, "accepted"),
    "4 junk bytes after a last sequence": (
        _meta(_EXPLICIT) + _IDS_EX + _LAST_SEQUENCE + b"\1\2\3\4",
        "refused",
    ),
    "8 zero bytes after a last sequence": (  # pydicom reads them as an empty element
        _meta(_EXPLICIT) + _IDS_EX + _LAST_SEQUENCE + b"\0" * 8,
        None,
    ),
    "item delimiter and junk after a last sequence": (
        _meta(_EXPLICIT) + _IDS_EX + _LAST_SEQUENCE + _ITEM_END + b"JUNK" * 5000,
        "refused",
    ),
    "a last sequence cut short": (_meta(_EXPLICIT) + _IDS_EX + _LAST_SEQUENCE[:-8], "refused"),
    "implicit VR, undefined length on a non-sequence": (
        _meta(_IMPLICIT) + _IDS_IM + _PROTOCOL_UNDEFINED,
        "refused",
    ),
    "implicit VR, a command element first": (
        _meta(_IMPLICIT) + _im(0, 0x900, b"\0\0") + _im(8, 1, b"A" * 0x4955) + _IDS_IM,
        "refused",
    ),
    "explicit VR, a command element first": (
        _meta(_EXPLICIT) + _ex(0, 0x900, b"US", b"\0\0") + _IDS_EX,
        None,
    ),
    "a duplicated element": (
        _meta(_EXPLICIT) + _IDS_EX + _ex(0x10, 0x20, b"LO", b"A1") + _ex(0x10, 0x20, b"LO", b"B2"),
        "accepted",
    ),
    "encapsulated pixel data": (
        _meta(_JPEG)
        + _IDS_EX
        + _IMAGE
        + _PIXELS_UNDEFINED
        + _item(b"")
        + _item(_FRAGMENT)
        + _SEQUENCE_END,
        "accepted",
    ),
    "a fragment of undefined length": (
        _meta(_JPEG)
        + _IDS_EX
        + _IMAGE
        + _PIXELS_UNDEFINED
        + _item(b"")
        + struct.pack("<HHI", 0xFFFE, 0xE000, _UNDEFINED)
        + _FRAGMENT
        + _SEQUENCE_END,
        None,
    ),
    "sequences nested 30 deep": (_meta(_EXPLICIT) + _IDS_EX + _nested(30), "accepted"),
    "sequences nested 200 deep": (_meta(_EXPLICIT) + _IDS_EX + _nested(200), None),
    "implicit VR private element of undefined length": (
        _meta(_IMPLICIT) + _IDS_IM + _im(9, 0x1010, b"", _UNDEFINED) + b"abcdefgh" + _SEQUENCE_END,
        None,
    ),
    "explicit VR item holding implicit VR": (
        _meta(_EXPLICIT)
        + _IDS_EX
        + _ex(0x40, 0xA730, b"SQ", b"", _UNDEFINED)
        + _item(_im(8, 0x100, b"AB"), True)
        + _SEQUENCE_END,
        None,
    ),
    "file meta only": (_meta(_EXPLICIT), "refused"),
    "shorter than the preamble": (b"\0" * 100, "refused"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_structures_get_pydicoms_verdict(tmp_path: Path, name: str) -> None:
    data, expected = CRAFTED[name]
    path = tmp_path / "crafted.dcm"
    path.write_bytes(data)
    verdict = _verdict(read_received, path)
    assert verdict == _verdict(_by_pydicom, path)
    if expected is not None:
        assert verdict[0] == expected, verdict


def test_a_loaded_data_set_does_not_keep_the_stored_object_alive() -> None:
    """A C-GET holds the data set while pynetdicom encodes and sends it: the object it was
    parsed from, as large as its pixels, must not be held with it."""
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    stored = buffer.getvalue()
    del buffer
    unreferenced = sys.getrefcount(stored)
    loaded = part10.load_dataset(stored)
    assert loaded.PixelData == ds.PixelData
    assert sys.getrefcount(stored) == unreferenced  # nothing in `loaded` refers to it


@pytest.mark.parametrize(
    "name",
    [
        "image_dfl.dcm",  # Deflated Explicit VR: element positions are the inflated stream's
        "SC_ybr_full_422_uncompressed.dcm",  # native 4:2:2: two samples per pixel's worth
    ],
)
def test_valid_files_found_by_the_fuzz_test_are_accepted(name: str, tmp_path: Path) -> None:
    received = read_received(Path(pydicom.data.get_testdata_file(name)))
    assert str(received.header.get("SOPInstanceUID"))
