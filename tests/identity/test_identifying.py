"""Identifying elements cut out byte-exact: the original always comes back, the stored object
holds no name or ID in any encoding, is still DICOM and has the same pixels."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medzip_scp.dicom.identifying import (
    IDENTIFYING_KEYWORDS,
    content_hashes,
    identifying_tags,
    restore,
    split,
)
from tests.data_paths import PYDICOM_FILES, SHARED_DATA

TAGS = identifying_tags()
NAME = "Zqxwv^Distinctive"
PATIENT_ID = "ZQX-ID-987654"
ACCESSION = "ACC-ZQX-555"
ACCENTED_NAME = "Dïstinctivé^Zqxwv"
PHI_TEXTS = [NAME, *NAME.split("^"), PATIENT_ID, ACCESSION, *ACCENTED_NAME.split("^")]
PHI_FORMS = {
    form
    for text in PHI_TEXTS
    for codec in ("utf-8", "latin-1", "utf-16-le", "utf-16-be")
    for form in [text.encode(codec)]
}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def test_restore_gives_back_every_real_file() -> None:
    """Every file of ../shared/data and of pydicom's test files, the unparsable too."""
    files = _files(SHARED_DATA) + _files(PYDICOM_FILES)
    assert len(files) > 50, f"no DICOM found under {SHARED_DATA} or {PYDICOM_FILES}"
    walked = 0
    for path in files:
        original = path.read_bytes()
        cut = split(original, TAGS, private=True)
        assert restore(cut.stored, cut.removed) == original, path
        assert [offset for offset, _ in cut.removed] == sorted(o for o, _ in cut.removed), path
        assert (cut.pixel_sha256, cut.rest_sha256) == content_hashes(original), path
        walked += bool(cut.stored)
    assert walked > 0.9 * len(files)  # all but the odd few are walked, not cut whole


def _items(elem: DataElement) -> list[Dataset]:
    return list(elem.value) if elem.VR == "SQ" else []


def _with_undefined_lengths(ds: Dataset) -> None:
    for elem in ds:
        for item in _items(elem):
            elem.is_undefined_length = True
            item.is_undefined_length_sequence_item = True
            _with_undefined_lengths(item)


def _un_sequence_value(inner: Dataset) -> bytes:
    """The value of a sequence of one item holding ``inner``, encoded Implicit VR Little
    Endian, as a UN element carries it."""
    body = b""
    for elem in inner:
        value = elem.value.encode() if isinstance(elem.value, str) else bytes(elem.value)
        value += b" " * (len(value) % 2)
        body += struct.pack("<HHI", elem.tag.group, elem.tag.element, len(value)) + value
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


def _item(**keywords: object) -> Dataset:
    item = Dataset()
    for keyword, value in keywords.items():
        setattr(item, keyword, value)
    return item


UN_SEQUENCE = 0x00081250  # Related Series Sequence


def _distinctive(base: str, undefined_lengths: bool) -> bytes:
    """A pydicom test file (and its transfer syntax) given a distinctive patient, written
    where the profile looks: top level, nested sequences (to depth 2), a private element and
    (explicit VR Little Endian) a sequence stored as UN."""
    ds = dcmread(get_testdata_file(base))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.OtherPatientNames = ACCENTED_NAME
    ds.ReferencedImageSequence = Sequence(
        [_item(ReferencedSOPInstanceUID="1.2.3.4", PatientName=NAME)]
    )
    ds.ReferencedStudySequence = Sequence(
        [_item(ReferencedSOPInstanceUID="1.2.3.5", AccessionNumber=ACCESSION)]
    )
    ds.SourceImageSequence = Sequence(
        [_item(DerivationCodeSequence=Sequence([_item(PersonName=ACCENTED_NAME)]))]
    )
    ds.RequestAttributesSequence = Sequence([_item(RequestedProcedureID=PATIENT_ID)])
    ds.ReferencedPerformedProcedureStepSequence = Sequence(
        [_item(ReferencedSOPInstanceUID="1.2.3.6")]
    )
    block = ds.private_block(0x0011, "ZQX VENDOR", create=True)
    block.add_new(0x01, "LO", NAME)
    syntax = ds.file_meta.TransferSyntaxUID
    with_un = not syntax.is_implicit_VR and syntax.is_little_endian
    if with_un:  # written as OB, then relabelled: pydicom makes a known sequence's UN an SQ
        ds.add_new(UN_SEQUENCE, "OB", _un_sequence_value(_item(PatientID=PATIENT_ID)))
    if undefined_lengths:
        _with_undefined_lengths(ds)
    out = io.BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    written = out.getvalue()
    if with_un:
        ob = struct.pack("<HH", UN_SEQUENCE >> 16, UN_SEQUENCE & 0xFFFF) + b"OB"
        assert written.count(ob) == 1
        written = written.replace(ob, ob[:4] + b"UN")
    return written


KEPT_SEQUENCE = 0x00081111  # ReferencedPerformedProcedureStepSequence: no PHI in it
HOLDERS = {0x00081140, 0x00081110, 0x00082112, 0x0040A370, UN_SEQUENCE}


def _read(part10: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(part10))


@pytest.mark.parametrize("undefined_lengths", [False, True], ids=["defined", "undefined"])
@pytest.mark.parametrize(
    "base", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"]
)
def test_stored_object_holds_no_name_or_id(base: str, undefined_lengths: bool) -> None:
    original = _distinctive(base, undefined_lengths)
    assert all(form in original for form in (NAME.encode(), PATIENT_ID.encode()))
    cut = split(original, TAGS, private=True)
    found = [form for form in PHI_FORMS if form in cut.stored]
    assert not found, f"{base}: the stored object still holds {found}"
    assert restore(cut.stored, cut.removed) == original

    before, after = _read(original), _read(cut.stored)
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    cut_tags = {e.tag for e in before if e.tag in TAGS or e.tag.is_private} | HOLDERS
    assert {e.tag for e in after} == {e.tag for e in before} - cut_tags
    assert after[KEPT_SEQUENCE].value == before[KEPT_SEQUENCE].value
    np.testing.assert_array_equal(after.pixel_array, before.pixel_array)
    assert cut.pixel_sha256 == hashlib.sha256(before.PixelData).digest()


def test_private_elements_stay_unless_asked() -> None:
    original = _distinctive("CT_small.dcm", undefined_lengths=False)
    kept = _read(split(original, TAGS).stored)
    assert kept.private_block(0x0011, "ZQX VENDOR")[0x01].value == NAME
    assert any(e.tag.is_private for e in kept)
    assert not any(e.tag.is_private for e in _read(split(original, TAGS, private=True).stored))


def test_extra_keywords_are_cut_too() -> None:
    original = _distinctive("CT_small.dcm", undefined_lengths=False)
    tags = identifying_tags(["Manufacturer", "SOPInstanceUID"])
    assert tags == TAGS | {0x00080070, 0x00080018}
    stored = _read(split(original, tags).stored)
    assert "Manufacturer" not in stored and "SOPInstanceUID" not in stored
    assert "Modality" in stored


@pytest.mark.parametrize("keyword", ["NotADicomKeyword", "patientname", ""])
def test_unknown_keyword_is_refused(keyword: str) -> None:
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        identifying_tags([keyword])


def test_every_profile_keyword_is_known() -> None:
    assert len(TAGS) == len(set(IDENTIFYING_KEYWORDS))


@pytest.mark.parametrize("name", ["image_dfl.dcm", "no_meta.dcm"])
def test_objects_that_cannot_be_walked_are_cut_whole(name: str) -> None:
    """Deflated (its elements are not where the bytes are) or without a preamble."""
    original = Path(get_testdata_file(name)).read_bytes()
    cut = split(original, TAGS, private=True)
    assert cut.stored == b""
    assert cut.removed == ((0, original),)
    assert restore(cut.stored, cut.removed) == original


def test_restore_refuses_pieces_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        restore(b"abc", [(5, b"x")])
    with pytest.raises(ValueError, match="do not fit"):
        restore(b"abc", [(2, b"x"), (1, b"y")])
