"""Content equivalence of two Part-10 objects (duplicate detection): the encodings that
carry no information are equal, every real difference is found and named by its tag."""

from __future__ import annotations

import copy
from collections.abc import Callable
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medzip_scp.dicom import equivalence
from medzip_scp.dicom.equivalence import first_difference, same_content
from tests.dicom.forwarding import TRAILING_PADDING, forwarded, with_group_lengths

PRIVATE_SEQUENCE = 0x00991001


def ct() -> Dataset:
    """CT_small (explicit VR, private elements, a sequence of two items) with a private
    sequence, an all-space value and Data Set Trailing Padding."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.add_new(0x00990010, "LO", "MEDZIP TEST")
    item = Dataset()
    item.add_new(0x00991002, "LO", "inner")
    ds.add_new(PRIVATE_SEQUENCE, "SQ", Sequence([item]))
    ds.StudyID = "    "
    ds.add_new(TRAILING_PADDING, "OB", b"\0" * 16)
    return ds


def jpeg() -> Dataset:
    return dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))


def part10(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def variant(change: Callable[[Dataset], object], base: Callable[[], Dataset] = ct) -> bytes:
    ds = base()
    change(ds)
    return part10(ds)


def set_raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    ds[tag] = DataElement(tag, vr, value)


def filled_offset_table(ds: Dataset) -> None:
    assert ds.PixelData[:8] == b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # empty, as written
    ds.PixelData = b"\xfe\xff\x00\xe0\x04\x00\x00\x00\x00\x00\x00\x00" + ds.PixelData[8:]


def undefined_lengths(ds: Dataset) -> None:
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True


EQUAL = {
    "as forwarded (all at once)": lambda: forwarded(part10(ct())),
    "implicit VR": lambda: part10(ct(), ImplicitVRLittleEndian),
    "group lengths": lambda: with_group_lengths(ct()),
    "no trailing padding": lambda: variant(lambda ds: ds.pop(TRAILING_PADDING)),
    "undefined lengths": lambda: variant(undefined_lengths),
    "all-space value emptied": lambda: variant(lambda ds: setattr(ds, "StudyID", "")),
    "trailing spaces of LO": lambda: variant(
        lambda ds: setattr(ds, "Manufacturer", ds.Manufacturer + "    ")
    ),
    "leading space of CS values": lambda: variant(
        lambda ds: set_raw(ds, 0x00080008, "CS", b" ORIGINAL\\PRIMARY \\AXIAL")
    ),
    "NUL padding of UI": lambda: variant(
        lambda ds: set_raw(ds, 0x00080016, "UI", ds.SOPClassUID.encode() + b"\0\0")
    ),
    "known attribute as UN": lambda: part10(ct()).replace(
        b"\x08\x00\x60\x00CS\x02\x00CT", b"\x08\x00\x60\x00UN\x00\x00\x02\x00\x00\x00CT"
    ),
    "private sequence as UN bytes": lambda: variant(
        lambda ds: set_raw(ds, PRIVATE_SEQUENCE, "UN", part10_items(ds[PRIVATE_SEQUENCE].value))
    ),
}


def part10_items(items: Sequence) -> bytes:
    """A sequence's items in implicit VR, as UN holds them (PS3.5 6.2.2)."""
    whole = part10(sequence_only(items), ImplicitVRLittleEndian)
    return whole[whole.index(b"\xfe\xff\x00\xe0") :]


def sequence_only(items: Sequence) -> Dataset:
    ds = Dataset()
    ds.file_meta = copy.deepcopy(ct().file_meta)
    ds.add_new(PRIVATE_SEQUENCE, "SQ", items)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the padded UI, on purpose
@pytest.mark.parametrize("case", sorted(EQUAL))
def test_encodings_without_information_are_equal(case: str) -> None:
    original = part10(ct())
    copy_ = EQUAL[case]()
    assert copy_ != original  # the bytes do differ
    assert first_difference(original, copy_) is None
    assert first_difference(copy_, original) is None


def test_encapsulated_pixel_data_with_an_offset_table_is_equal() -> None:
    original = part10(jpeg())
    with_table = variant(filled_offset_table, jpeg)
    assert with_table != original
    assert same_content(original, with_table)


def changed_pixel(ds: Dataset) -> None:
    pixels = bytearray(ds.PixelData)
    pixels[1000] ^= 1
    ds.PixelData = bytes(pixels)


def changed_fragment(ds: Dataset) -> None:
    pixels = bytearray(ds.PixelData)
    pixels[-100] ^= 1
    ds.PixelData = bytes(pixels)


def as_native(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = b"\0" * (ds.Rows * ds.Columns * 3)


DIFFERENT = {
    "changed value": (
        lambda: variant(lambda ds: setattr(ds, "SeriesDescription", "x")),
        "(0008,103E)",
    ),
    "changed pixel": (lambda: variant(changed_pixel), "(7FE0,0010)"),
    "added element": (
        lambda: variant(lambda ds: setattr(ds, "PhysiciansOfRecord", "X")),
        "(0008,1048)",
    ),
    "removed element": (lambda: variant(lambda ds: ds.pop(0x00200011)), "(0020,0011)"),
    "value emptied": (lambda: variant(lambda ds: setattr(ds, "StationName", "")), "(0008,1010)"),
    "empty element added": (
        lambda: variant(lambda ds: setattr(ds, "OperatorsName", "")),
        "(0008,1070)",
    ),
    "changed value in an item": (
        lambda: variant(lambda ds: setattr(ds.OtherPatientIDsSequence[1], "PatientID", "X")),
        "(0010,1002)[1](0010,0020)",
    ),
    "item added": (
        lambda: variant(lambda ds: ds.OtherPatientIDsSequence.append(Dataset())),
        "(0010,1002)",
    ),
    "leading space of LT": (
        lambda: variant(lambda ds: setattr(ds, "ImageComments", " x")),
        "(0020,4000)",
    ),
    "changed fragment": (lambda: variant(changed_fragment, jpeg), "(7FE0,0010)"),
    "decompressed": (lambda: variant(as_native, jpeg), "(7FE0,0010)"),
    "big endian": (lambda: part10(ct(), ExplicitVRBigEndian), "(0002,0010)"),
}


@pytest.mark.parametrize("case", sorted(DIFFERENT))
def test_real_differences_are_found_by_tag(case: str) -> None:
    make, tag = DIFFERENT[case]
    base = jpeg() if case in ("changed fragment", "decompressed") else ct()
    if case == "leading space of LT":
        base.ImageComments = "x"
    original = part10(base)
    assert first_difference(original, make()) == tag
    assert first_difference(forwarded(make()), original) == tag or case == "big endian"


def test_an_object_of_too_many_elements_is_not_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    original = part10(ct())
    assert same_content(original, original)
    monkeypatch.setattr(equivalence, "MAX_ELEMENTS", 100)  # CT_small has about 280
    assert first_difference(original, original) == "not compared: too many elements"
