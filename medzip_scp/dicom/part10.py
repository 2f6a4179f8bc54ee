"""Received DICOM objects: parse, validate and hash what a peer sent, without PHI in errors.

The node keeps the peer's encoded data set bytes exactly as received; these helpers only read
them (PS3.10 file format: 128-byte preamble, ``DICM``, File Meta group 0002, then the data set).

Every received object is walked element by element (:class:`_Walk`), which checks
that the elements exactly fill the file, and only the few values the node checks and indexes
are kept and converted, by pydicom's own converters. A full pydicom parse cost four times as
much, the most expensive step of a C-STORE; it still decides every object the walk finds
unusual (another byte order, a deflated or inconsistent encoding, anything cut short), so
its verdict and its error messages stand for all bad input.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from medzip_scp.dicom.frames import FrameHeaderError, ImageAttributes, check_frames

PREAMBLE_LENGTH = 132  # 128-byte preamble + b"DICM"
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX_UID = 0x00020010


class RejectReason(Enum):
    """Why a received object is refused; ``net`` maps each to a DIMSE status."""

    UNPARSABLE = "unparsable"
    MISSING_ATTRIBUTE = "missing_attribute"
    SOP_CLASS_MISMATCH = "sop_class_mismatch"
    SOP_INSTANCE_MISMATCH = "sop_instance_mismatch"
    PIXEL_DATA_INCONSISTENT = "pixel_data_inconsistent"
    INVALID_UID = "invalid_uid"  # C-FIND and C-GET could never match it


class InvalidObjectError(ValueError):
    """A received object cannot be archived. The message carries no PHI."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ReceivedObject:
    """A parsed, validated object as spooled by the network layer."""

    path: Path
    transfer_syntax_uid: UID
    header: Dataset | HeaderElements  # the values of HEADER_KEYWORDS at least
    dataset_offset: int  # where the data set bytes start in the file
    file_size: int

    @property
    def dataset_size(self) -> int:
        return self.file_size - self.dataset_offset


# Explicit VR encodings with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset(
    {
        b"OB",
        b"OD",
        b"OF",
        b"OL",
        b"OV",
        b"OW",
        b"SQ",
        b"SV",
        b"UC",
        b"UN",
        b"UR",
        b"UT",
        b"UV",
    }
)


def dataset_offset(path: Path) -> int:
    """Return the byte offset of the data set in a Part-10 file (after group 0002)."""
    with _mapped(path) as buf:
        return _file_meta(buf)[0]


def dataset_offset_of(part10: bytes) -> int:
    """Return the byte offset of the data set in a Part-10 object (after group 0002)."""
    return _file_meta(part10)[0]


def file_meta_of(part10: bytes) -> tuple[int, str]:
    """The data set offset and the Transfer Syntax UID ("" when absent) of a Part-10 object."""
    return _file_meta(part10)


@contextmanager
def _mapped(path: Path) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes, mapped (files too short to hold a data set are read)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= PREAMBLE_LENGTH:
            yield fh.read()
            return
        with mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as buf:
            yield buf


def _file_meta(buf: bytes | mmap.mmap) -> tuple[int, str]:
    """The data set offset and the Transfer Syntax UID ("" when absent) of a Part-10 object.

    Group 0002 is always Explicit VR Little Endian (PS3.10 7.1), whatever the data set uses.
    """
    if len(buf) < PREAMBLE_LENGTH or buf[128:PREAMBLE_LENGTH] != b"DICM":
        raise InvalidObjectError(RejectReason.UNPARSABLE, "no DICOM preamble and prefix")
    pos = PREAMBLE_LENGTH
    syntax = ""
    while pos + 8 <= len(buf):
        group, element, vr, length = _TAG_VR_LENGTH.unpack_from(buf, pos)
        if group != 0x0002:
            break
        value = pos + 8
        if vr in LONG_LENGTH_VRS:
            if pos + 12 > len(buf):
                raise InvalidObjectError(RejectReason.UNPARSABLE, "truncated file meta")
            (length,) = _LONG_LENGTH.unpack_from(buf, pos + 8)
            value = pos + 12
        pos = value + length
        if group << 16 | element == _TRANSFER_SYNTAX_UID:
            syntax = bytes(buf[value:pos]).decode("ascii", "replace").rstrip("\0 ")
    return pos, syntax


def _walks_whole(path: Path) -> bool:
    """Whether the quick walk finds the file made of whole elements, to its last byte."""
    try:
        _walk_path(path)
    except (_Unusual, OSError):
        return False
    return True


def _check_complete(ds: Dataset, file_size: int) -> None:
    """Reject a data set that is cut short or followed by bytes that are not elements.

    pydicom silently shortens a truncated final value and stops at a partial element header,
    so compare the elements' extent with the file size before any value is converted.
    """
    end = 0
    measurable = True
    for raw in ds._dict.values():
        tell = getattr(raw, "value_tell", None)
        length = getattr(raw, "length", None)
        if tell is None or length is None:
            continue
        if length == 0xFFFFFFFF:
            if raw.value is None:  # deferred: its end is not known without reading it
                measurable = False
                continue
            length = len(raw.value) + 8  # the value, then the Sequence Delimitation Item
        end = max(end, tell + length)
    if end > file_size or (measurable and end != file_size):
        raise InvalidObjectError(
            RejectReason.UNPARSABLE,
            f"data set elements span {end} bytes but {file_size} arrived",
        )


def expected_pixel_bytes(ds: Dataset | HeaderElements) -> int:
    """Bytes of native Pixel Data the image attributes call for (PS3.5 8.1.1), unpadded."""
    rows = int(ds.get("Rows"))
    columns = int(ds.get("Columns"))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated"))
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")).strip() in _SUBSAMPLED_422:
        samples = 2  # two luminance values share one Cb and one Cr (PS3.3 C.7.6.3.1.2)
    return (rows * columns * samples * frames * bits + 7) // 8


_SUBSAMPLED_422 = ("YBR_FULL_422", "YBR_PARTIAL_422")


# What the node checks and indexes of a received data set (here and in
# index.ingest.attributes_from_dataset); the quick reader keeps these values and no others.
HEADER_KEYWORDS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SeriesDate",
    "SeriesTime",
    "BodyPartExamined",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "PhotometricInterpretation",
)
_IDENTIFYING_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# PS3.5 9.1: digits and dots, at most 64 characters. Anything else ('*', '?', a backslash)
# reads as a wildcard or a list in a C-FIND or C-GET identifier: the object could never be
# found or retrieved again.
_UID_TEXT = re.compile(r"[0-9]+(\.[0-9]+)*")
_MAX_UID_LENGTH = 64
# Pixel Data, Float Pixel Data, Double Float Pixel Data
_PIXEL_DATA_TAGS = (_PIXEL_DATA, 0x7FE00008, 0x7FE00009)
_TAG_OF_KEYWORD: dict[str, int] = {k: int(tag_for_keyword(k) or 0) for k in HEADER_KEYWORDS}
_KEPT_TAGS = frozenset(_TAG_OF_KEYWORD.values())
_CHARSET = _TAG_OF_KEYWORD["SpecificCharacterSet"]
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32  # nested sequences; deeper objects go to pydicom
_TAG_LENGTH = struct.Struct("<HHI")
_TAG_VR_LENGTH = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<I")


class _Unusual(Exception):
    """The quick walk met something it leaves to pydicom."""


def _is_sequence(tag: int, known: dict[int, bool] = {}) -> bool:  # noqa: B006 - a cache
    """Whether the data dictionary makes an (implicit VR) element a sequence."""
    if tag in known:
        return known[tag]
    try:
        sequence = dictionary_VR(tag) == "SQ"
    except KeyError:  # private or unknown
        sequence = False
    if not tag >> 16 & 1:  # cache public tags only: a peer could send any number of private
        known[tag] = sequence
    return sequence


def _looks_like_vr(first: int, second: int) -> bool:
    return 0x40 < first < 0x5B and 0x40 < second < 0x5B  # as pydicom's own test


@dataclass
class _Walk:
    """Where a walk over an explicit or implicit VR little endian data set keeps what it
    found at the top level."""

    buf: bytes | mmap.mmap
    implicit: bool
    kept: dict[int, tuple[str | None, bytes]]
    pixel_data: tuple[str | None, int, int] | None = None  # VR, length, value offset

    def _tag_and_length(self, pos: int, limit: int) -> tuple[int, int]:
        """The tag and the 4-byte length field of the element or item at ``pos``."""
        if pos + 8 > limit:
            raise _Unusual
        group, element, length = _TAG_LENGTH.unpack_from(self.buf, pos)
        return group << 16 | element, length

    def elements(self, pos: int, end: int | None, depth: int) -> int:
        """Walk data elements from ``pos`` to ``end``, or (``end`` None) through an Item
        Delimitation Item; returns the position after them."""
        buf = self.buf
        limit = len(buf) if end is None else end
        first = True
        while end is None or pos != end:
            tag, length = self._tag_and_length(pos, limit)
            if tag == _ITEM_END and end is None and length == 0:
                return pos + 8
            if tag >> 16 in (0xFFFE, 0x0000):
                # A delimiter out of place, or command elements (pydicom reads those apart
                # and checks the encoding again after them).
                raise _Unusual
            vr: str | None = None
            value = pos + 8
            if self.implicit:
                # pydicom switches to explicit VR when the first element looks explicit
                if first and depth == 0 and _looks_like_vr(buf[pos + 4], buf[pos + 5]):
                    raise _Unusual
            else:
                _, _, vr_bytes, length = _TAG_VR_LENGTH.unpack_from(buf, pos)
                if vr_bytes not in _VRS:
                    raise _Unusual  # perhaps an implicit VR item: pydicom copes
                if vr_bytes in LONG_LENGTH_VRS:
                    if pos + 12 > limit:
                        raise _Unusual
                    (length,) = _LONG_LENGTH.unpack_from(buf, pos + 8)
                    value = pos + 12
                vr = vr_bytes.decode("ascii")
            first = False
            if length == _UNDEFINED:
                if tag == _PIXEL_DATA and depth == 0 and vr in ("OB", "OW"):
                    pos = self.fragments(value)
                elif vr == "SQ" or (vr is None and _is_sequence(tag)):
                    pos = self.items(value, None, depth + 1)
                else:
                    raise _Unusual  # pydicom has its own rules for these values
            else:
                pos = value + length
                if pos > limit:
                    raise _Unusual  # cut short
                if vr == "SQ" or (vr is None and length and _is_sequence(tag)):
                    self.items(value, pos, depth + 1)
            if depth == 0:
                if tag == _PIXEL_DATA:
                    self.pixel_data = (vr, length, value)
                elif tag in _KEPT_TAGS:
                    if length == _UNDEFINED:
                        raise _Unusual
                    self.kept[tag] = (vr, bytes(buf[value:pos]))
        return pos

    def items(self, pos: int, end: int | None, depth: int) -> int:
        """Walk the items of a sequence value (to ``end``, or through its Sequence
        Delimitation Item)."""
        if depth > _MAX_DEPTH:
            raise _Unusual
        limit = len(self.buf) if end is None else end
        while end is None or pos != end:
            tag, length = self._tag_and_length(pos, limit)
            if tag == _SEQUENCE_END and end is None and length == 0:
                return pos + 8
            if tag != _ITEM:
                raise _Unusual
            if length == _UNDEFINED:
                pos = self.elements(pos + 8, None, depth)
            else:
                if pos + 8 + length > limit:
                    raise _Unusual
                pos = self.elements(pos + 8, pos + 8 + length, depth)
        return pos

    def fragments(self, pos: int) -> int:
        """Walk the items of encapsulated pixel data through its Sequence Delimitation Item."""
        while True:
            tag, length = self._tag_and_length(pos, len(self.buf))
            if tag == _SEQUENCE_END and length == 0:
                return pos + 8
            if tag != _ITEM or length == _UNDEFINED:
                raise _Unusual
            pos += 8 + length


class HeaderElements:
    """The kept elements of a walked data set; each value converted on first use by
    pydicom's own converter, so values equal what a pydicom Dataset gives."""

    def __init__(self, kept: dict[int, tuple[str | None, bytes]], implicit: bool) -> None:
        self._kept = kept
        self._implicit = implicit
        self._values: dict[int, Any] = {}
        self._encodings: str | list[str] | None = None

    def _convert(self, tag: int, encodings: str | list[str]) -> Any:
        vr, data = self._kept[tag]
        raw = RawDataElement(Tag(tag), vr, len(data), data, 0, self._implicit, True)
        return convert_raw_data_element(raw, encoding=encodings).value

    def get(self, keyword: str, default: Any = None) -> Any:
        tag = _TAG_OF_KEYWORD[keyword]  # KeyError: a keyword outside HEADER_KEYWORDS
        if tag not in self._kept:
            return default
        if tag not in self._values:
            if self._encodings is None:  # as Dataset._character_set
                charset = (
                    self._convert(_CHARSET, default_encoding) if _CHARSET in self._kept else None
                )
                self._encodings = convert_encodings(charset) if charset else default_encoding
            self._values[tag] = self._convert(tag, self._encodings)
        return self._values[tag]


def implicit_vr_of(syntax: UID) -> bool | None:
    """Whether a little-endian, not deflated syntax is implicit VR (True) or explicit
    (False): the encodings an element walk reads in place. None for the others (big
    endian, deflated, private or unknown syntaxes)."""
    if syntax == ImplicitVRLittleEndian:
        return True
    if syntax.is_transfer_syntax and syntax.is_little_endian and not syntax.is_deflated:
        return False
    return None


def _walk_file(buf: bytes | mmap.mmap) -> tuple[UID, int, _Walk]:
    """Walk a whole Part-10 file; raises _Unusual for anything left to pydicom."""
    try:
        offset, syntax_text = _file_meta(buf)
    except InvalidObjectError:
        raise _Unusual from None
    syntax = UID(syntax_text)
    implicit = implicit_vr_of(syntax)
    if implicit is None:
        raise _Unusual
    walk = _Walk(buf, implicit, kept={})
    walk.elements(offset, len(buf), 0)
    return syntax, offset, walk


def _walk_path(path: Path) -> tuple[UID, int, _Walk, int]:
    with _mapped(path) as buf:
        return (*_walk_file(buf), len(buf))


def _read_quickly(
    path: Path, expected_sop_class_uid: str | None, expected_sop_instance_uid: str | None
) -> ReceivedObject | None:
    """The object, when the quick walk reads it and every check passes; None otherwise."""
    try:
        with _mapped(path) as buf:
            syntax, offset, walk = _walk_file(buf)
            header = HeaderElements(walk.kept, walk.implicit)
            if not _passes_quick_checks(
                buf, syntax, walk, header, expected_sop_class_uid, expected_sop_instance_uid
            ):
                return None
            size = len(buf)
    except (_Unusual, OSError):
        return None
    return ReceivedObject(path, syntax, header, offset, size)


def _passes_quick_checks(
    buf: bytes | mmap.mmap,
    syntax: UID,
    walk: _Walk,
    header: HeaderElements,
    expected_sop_class_uid: str | None,
    expected_sop_instance_uid: str | None,
) -> bool:
    try:
        for keyword in HEADER_KEYWORDS:  # all converted now, or pydicom's parse decides
            header.get(keyword)
        uids = [header.get(keyword) for keyword in _IDENTIFYING_UIDS]
        if not all(isinstance(uid, str) and uid.strip() for uid in uids):
            return False
        _check_uids(header)
        _check_text(header)
        if expected_sop_class_uid and uids[0] != expected_sop_class_uid:
            return False
        if expected_sop_instance_uid and uids[1] != expected_sop_instance_uid:
            return False
        if walk.pixel_data is None:
            # Float Pixel Data, which the walk does not note, may stand in for it
            return not _requires_pixel_data(uids[0])
        if not _pixel_data_long_enough(header, syntax, walk.pixel_data[1]):
            return False
        if syntax.is_encapsulated:
            check_frames(buf, walk.pixel_data[2], syntax, ImageAttributes.of(header))
    except Exception:  # a value pydicom does not convert, a check failed: pydicom decides
        return False
    return True


def _pixel_data_long_enough(header: HeaderElements, syntax: UID, length: int) -> bool:
    if any(header.get(keyword) in (None, "") for keyword in ("Rows", "Columns", "BitsAllocated")):
        return False
    if syntax.is_encapsulated:
        return True
    return length != _UNDEFINED and length >= expected_pixel_bytes(header)


def read_received(
    path: Path,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
) -> ReceivedObject:
    """Parse and validate a spooled Part-10 object.

    Raises
    ------
    InvalidObjectError
        The object cannot be parsed, lacks an identifying attribute, disagrees with the
        C-STORE request, or its pixel data is shorter than its image attributes require.
    """
    received = _read_quickly(path, expected_sop_class_uid, expected_sop_instance_uid)
    if received is None:
        received = _read_with_pydicom(path, expected_sop_class_uid, expected_sop_instance_uid)
    return received


def _read_with_pydicom(
    path: Path,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
) -> ReceivedObject:
    """:func:`read_received` by a full pydicom parse: for the objects the quick walk leaves
    to it, and for the verdict on every object a quick check doubts."""
    offset = dataset_offset(path)
    try:
        ds = dcmread(path, defer_size=1 << 16)
        deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        # (a deflated data set's element positions are those of the inflated stream)
        if not deflated and not _walks_whole(path):  # else the walk accounted for every byte
            _check_complete(ds, path.stat().st_size)
    except InvalidObjectError:
        raise
    except Exception as exc:
        raise InvalidObjectError(
            RejectReason.UNPARSABLE, f"data set could not be parsed ({type(exc).__name__})"
        ) from None
    for keyword in _IDENTIFYING_UIDS:
        if not str(ds.get(keyword, "") or "").strip():
            raise InvalidObjectError(
                RejectReason.MISSING_ATTRIBUTE, f"required attribute {keyword} is missing or empty"
            )
    syntax = UID(ds.file_meta.get("TransferSyntaxUID") or "")
    _check_encoding(ds, syntax)
    _check_uids(ds)
    _check_text(ds)
    if expected_sop_class_uid and ds.SOPClassUID != expected_sop_class_uid:
        raise InvalidObjectError(
            RejectReason.SOP_CLASS_MISMATCH,
            f"SOPClassUID {ds.SOPClassUID} differs from the request's {expected_sop_class_uid}",
        )
    if expected_sop_instance_uid and ds.SOPInstanceUID != expected_sop_instance_uid:
        raise InvalidObjectError(
            RejectReason.SOP_INSTANCE_MISMATCH,
            f"SOPInstanceUID {ds.SOPInstanceUID} differs from the request's "
            f"{expected_sop_instance_uid}",
        )
    if not any(tag in ds._dict for tag in _PIXEL_DATA_TAGS) and _requires_pixel_data(
        ds.SOPClassUID
    ):
        raise InvalidObjectError(
            RejectReason.MISSING_ATTRIBUTE,
            f"required attribute PixelData is missing ({UID(ds.SOPClassUID).name})",
        )
    _check_pixel_data(ds, syntax, path)
    return ReceivedObject(
        path=path,
        transfer_syntax_uid=syntax,
        header=ds,
        dataset_offset=offset,
        file_size=path.stat().st_size,
    )


def _check_encoding(ds: Dataset, syntax: UID) -> None:
    """Refuse what pydicom reads only by guessing, or cannot convert: pydicom
    reads an implicit VR body under an explicit VR syntax (and the reverse) and keeps
    elements of unknown VR, but the object could not be sent again as the syntax says,
    nor indexed; no retry would change that."""
    if not syntax.is_transfer_syntax:
        raise InvalidObjectError(
            RejectReason.UNPARSABLE, f"unknown transfer syntax {syntax or '(none)'}"
        )
    # pydicom notes how it read each element, not that it switched encodings
    implicit = {getattr(raw, "is_implicit_VR", syntax.is_implicit_VR) for raw in ds._dict.values()}
    if implicit != {syntax.is_implicit_VR}:
        raise InvalidObjectError(
            RejectReason.UNPARSABLE,
            f"data set is not {'implicit' if syntax.is_implicit_VR else 'explicit'} VR as "
            f"its transfer syntax {syntax.name} says",
        )
    try:
        _check_known_vrs(ds)
        for keyword in HEADER_KEYWORDS:
            ds.get(keyword)
    except InvalidObjectError:
        raise
    except Exception as exc:
        raise InvalidObjectError(
            RejectReason.UNPARSABLE, f"a value could not be converted ({type(exc).__name__})"
        ) from None


def _check_known_vrs(ds: Dataset) -> None:
    for tag, elem in ds._dict.items():
        vr = elem.VR  # None when implicit: the data dictionary's (UN when unknown)
        if isinstance(elem, RawDataElement) and vr and vr.encode("ascii", "replace") not in _VRS:
            raise InvalidObjectError(
                RejectReason.UNPARSABLE, f"element {Tag(tag)} has an unknown VR"
            )
        if vr == "SQ":
            for item in ds[tag].value:
                _check_known_vrs(item)


def _check_text(header: Dataset | HeaderElements) -> None:
    """No NUL inside an indexed value (pydicom strips trailing ones): PostgreSQL stores no
    NUL in text, and the failed commit would read as out of resources, forever."""
    for keyword in HEADER_KEYWORDS:
        if "\0" in str(header.get(keyword, "")):
            raise InvalidObjectError(RejectReason.UNPARSABLE, f"{keyword} holds a NUL character")


def _check_uids(header: Dataset | HeaderElements) -> None:
    for keyword in _IDENTIFYING_UIDS:
        uid = str(header.get(keyword)).strip("\0 ")
        if len(uid) > _MAX_UID_LENGTH or not _UID_TEXT.fullmatch(uid):
            raise InvalidObjectError(
                RejectReason.INVALID_UID,
                f"{keyword} is not a UID of at most 64 digits and dots (length {len(uid)})",
            )


def _requires_pixel_data(sop_class_uid: str) -> bool:
    """Whether the IOD of an image storage SOP class requires pixel data (PS3.3)."""
    return "Image Storage" in UID(sop_class_uid).name


def _check_pixel_data(ds: Dataset, transfer_syntax: UID, path: Path) -> None:
    if _PIXEL_DATA not in ds._dict:
        return
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(keyword) in (None, ""):
            raise InvalidObjectError(
                RejectReason.PIXEL_DATA_INCONSISTENT,
                f"Pixel Data present but {keyword} is missing",
            )
    raw = ds.get_item(_PIXEL_DATA)
    if transfer_syntax.is_encapsulated:
        _check_encapsulated(ds, transfer_syntax, path, raw)
        return

    length = raw.length if hasattr(raw, "length") else len(ds.PixelData)
    try:
        expected = expected_pixel_bytes(ds)
    except (TypeError, ValueError):
        raise InvalidObjectError(
            RejectReason.PIXEL_DATA_INCONSISTENT, "image attributes are not integers"
        ) from None
    if length < expected:
        raise InvalidObjectError(
            RejectReason.PIXEL_DATA_INCONSISTENT,
            f"Pixel Data holds {length} bytes, Rows x Columns x Samples x Frames x "
            f"BitsAllocated needs {expected}",
        )


def _check_encapsulated(ds: Dataset, syntax: UID, path: Path, raw: Any) -> None:
    """The frame headers agree with the image attributes (see :mod:`.frames`)."""
    try:
        image = ImageAttributes.of(ds)
        if getattr(raw, "length", _UNDEFINED) != _UNDEFINED:
            raise FrameHeaderError("encapsulated Pixel Data has a defined length")
        if isinstance(raw, RawDataElement) and raw.value is None:  # deferred: still in the file
            with _mapped(path) as buf:
                check_frames(buf, raw.value_tell, syntax, image)
        else:
            check_frames(ds.PixelData, 0, syntax, image, delimited=False)
    except FrameHeaderError as exc:
        raise InvalidObjectError(RejectReason.PIXEL_DATA_INCONSISTENT, str(exc)) from None


def instance_uids(part10: bytes) -> tuple[str, str, str]:
    """The Study, Series and SOP Instance UIDs an object names ("" for each it lacks); it may
    be cut short after them (the elements before its pixel data, say)."""
    with warnings.catch_warnings():  # pydicom's warnings may quote values (PHI)
        warnings.simplefilter("ignore")
        ds = dcmread(
            BytesIO(part10),
            force=True,
            specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        )
    study, series, sop = (
        str(ds.get(k, "") or "").strip()
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    return study, series, sop


def load_dataset(part10: bytes, stop_before_pixels: bool = False) -> Dataset:
    """Parse a stored Part-10 object completely (for retrieval), or up to its pixels."""
    # Closed once read: pydicom keeps the buffer in the data set, and with it the whole
    # object (a second copy of the pixels) for as long as the data set is being sent.
    with BytesIO(part10) as buffer:
        return dcmread(buffer, stop_before_pixels=stop_before_pixels)
