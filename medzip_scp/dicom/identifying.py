"""Cut the identifying elements out of a Part-10 object, byte-exact, and put them back.

What is cut (:data:`IDENTIFYING_KEYWORDS`): the attributes of PS3.15 Annex E's Basic
Application Level Confidentiality Profile that identify a patient, a visit, a person or a place
(patient module, accession number, physicians and operators, institution, study, series,
acquisition and content dates and times, descriptions that may hold names), any top-level
sequence that holds one of them at any depth, the attributes a configuration adds and, with
``private``, every top-level private element (the profile removes them: vendors keep names in
them; private elements nested in standard sequences stay). Each is cut as a whole
top-level element (tag, VR, length, value), so the object left behind is still a valid data
set of the same transfer syntax, its pixels where they were, and putting the cut bytes back
at their offsets gives the original byte for byte.

An object whose elements cannot be walked in place (deflated, unparsable) is cut whole: the
stored object is then empty and everything is in the identity payload.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword
from pydicom.filereader import data_element_generator
from pydicom.uid import UID

from medzip_scp.dicom.part10 import LONG_LENGTH_VRS, file_meta_of

__all__ = [
    "IDENTIFYING_KEYWORDS",
    "IdentitySplit",
    "content_hashes",
    "identifying_tags",
    "restore",
    "split",
]

IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    # patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientMotherBirthName",
    "PatientTelephoneNumbers",
    "PatientTelecomInformation",
    "PatientReligiousPreference",
    "PatientComments",
    "PatientState",
    "PatientInsurancePlanCodeSequence",
    "PatientPrimaryLanguageCodeSequence",
    "MedicalRecordLocator",
    "MilitaryRank",
    "BranchOfService",
    "EthnicGroup",
    "Occupation",
    "AdditionalPatientHistory",
    "MedicalAlerts",
    "Allergies",
    "SmokingStatus",
    "PregnancyStatus",
    "LastMenstrualDate",
    "CountryOfResidence",
    "RegionOfResidence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "ReferencedPatientSequence",
    "ReferencedPatientPhotoSequence",
    # visit, request, people, places
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyID",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "OperatorsName",
    "OperatorIdentificationSequence",
    "RequestingPhysician",
    "RequestingService",
    "ScheduledPerformingPhysicianName",
    "PersonName",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "StationName",
    "DeviceSerialNumber",
    "AdmissionID",
    "AdmittingDiagnosesDescription",
    "CurrentPatientLocation",
    "RequestAttributesSequence",
    "PerformedProcedureStepID",
    "PerformedProcedureStepDescription",
    "ScheduledProcedureStepID",
    "RequestedProcedureID",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "ImageComments",
    "DerivationDescription",
    "StudyComments",
    "AcquisitionComments",
    "FrameComments",
    "VisitComments",
    "RequestedProcedureDescription",
    "RequestedProcedureComments",
    "ReasonForStudy",
    "ReasonForTheRequestedProcedure",
    "PatientTransportArrangements",
    "ScheduledStudyLocation",
    "ServiceEpisodeID",
    "IssuerOfAdmissionIDSequence",
    "DischargeDiagnosisDescription",
    "PatientBirthDateInAlternativeCalendar",
    "VerifyingObserverName",
    "VerifyingObserverSequence",
    "ContentCreatorName",
    "PersonAddress",
    "PersonTelephoneNumbers",
    "PersonIdentificationCodeSequence",
    "OriginalAttributesSequence",
    # dates and times
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "ContentDate",
    "ContentTime",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)

_PIXEL_DATA = 0x7FE00010


def identifying_tags(extra_keywords: Iterable[str] = ()) -> frozenset[int]:
    """The tags of :data:`IDENTIFYING_KEYWORDS` and of ``extra_keywords``.

    Raises
    ------
    ValueError
        An extra keyword is not in pydicom's data dictionary.
    """
    tags = set()
    for keyword in (*IDENTIFYING_KEYWORDS, *extra_keywords):
        # pydicom answers "" with (300A,0782), a dictionary entry without a keyword
        tag = tag_for_keyword(keyword) if keyword else None
        if tag is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
        tags.add(tag)
    return frozenset(tags)


@dataclass(frozen=True)
class IdentitySplit:
    """An object with its identifying elements cut out."""

    stored: bytes  # what the blob keeps
    removed: tuple[tuple[int, bytes], ...]  # (offset in the original, the element's bytes)
    pixel_sha256: bytes  # of the original's top-level Pixel Data value (b"" when none)
    rest_sha256: bytes  # of the original with that value taken out


def _elements(part10: bytes) -> list[tuple[int, int, int, int]] | None:
    """``(tag, start, value offset, value end or -1)`` of each top-level element, or None
    when they cannot be walked in place. Element ``i`` ends where ``i + 1`` starts."""
    try:
        offset, syntax_text = file_meta_of(part10)
        syntax = UID(syntax_text)
        if not syntax.is_transfer_syntax or syntax.is_deflated:
            return None
        implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
        fp = io.BytesIO(part10)
        fp.seek(offset)
        found = []
        with warnings.catch_warnings():  # pydicom's warnings may quote values (PHI)
            warnings.simplefilter("ignore")
            for elem in data_element_generator(fp, implicit, little, defer_size=256):
                # a raw element, or (a sequence of undefined length) a read one, whose
                # file_tell is then where its value starts
                value = getattr(elem, "value_tell", None)
                if value is None:
                    value = elem.file_tell
                vr = None if elem.VR is None else elem.VR.encode()
                header = 8 if implicit or vr not in LONG_LENGTH_VRS else 12
                length = getattr(elem, "length", None)  # a read one: its end is unknown
                end = -1 if length is None or length == 0xFFFFFFFF else value + length
                found.append((int(elem.tag), value - header, value, end))
    except Exception:
        return None
    tag_format = "<HH" if little else ">HH"
    expected: int | None = offset  # None after an undefined length: ends at the next start
    previous = -1
    for tag, start, _, value_end in found:
        # contiguous from the data set's start, each beginning with its own tag
        if start <= previous or (expected is not None and start != expected):
            return None
        if part10[start : start + 4] != struct.pack(tag_format, tag >> 16, tag & 0xFFFF):
            return None
        previous, expected = start, (None if value_end < 0 else value_end)
    if expected is not None and expected != len(part10):
        return None
    return found


def split(part10: bytes, tags: frozenset[int], private: bool = False) -> IdentitySplit:
    """Cut the elements with ``tags`` (and, ``private``, every private element, and any
    top-level sequence holding one of ``tags``) out of ``part10``."""
    elements = _elements(part10)
    pixel_sha256, rest_sha256 = _hashes(part10, elements)
    if elements is None:
        return IdentitySplit(b"", ((0, part10),), pixel_sha256, rest_sha256)
    little = UID(file_meta_of(part10)[1]).is_little_endian
    patterns = [struct.pack("<HH" if little else ">HH", t >> 16, t & 0xFFFF) for t in tags]
    stored = bytearray()
    removed = []
    position = 0
    for tag, start, value, end in _spans(part10, elements):
        if tag == _PIXEL_DATA:
            continue
        cut = tag in tags or (private and (tag >> 16) & 1 == 1 and tag >> 16 > 8)
        if not cut and end > value and _may_nest(part10, start, value):
            span = part10[value:end]
            cut = any(p in span for p in patterns)
        if cut:
            stored += part10[position:start]
            removed.append((start, part10[start:end]))
            position = end
    stored += part10[position:]
    return IdentitySplit(bytes(stored), tuple(removed), pixel_sha256, rest_sha256)


def content_hashes(part10: bytes) -> tuple[bytes, bytes]:
    """SHA-256 of the top-level Pixel Data value, and of the object without that value."""
    return _hashes(part10, _elements(part10))


def _spans(
    part10: bytes, elements: list[tuple[int, int, int, int]]
) -> list[tuple[int, int, int, int]]:
    """``(tag, start, value offset, end)``: each element runs to where the next starts."""
    if not elements:
        return []
    ends = [e[1] for e in elements[1:]] + [len(part10)]
    return [(t, s, v, end) for (t, s, v, _), end in zip(elements, ends, strict=True)]


def _hashes(part10: bytes, elements: list[tuple[int, int, int, int]] | None) -> tuple[bytes, bytes]:
    pixel = (0, 0)
    for tag, _, value, end in _spans(part10, elements or []):
        if tag == _PIXEL_DATA:
            pixel = (value, end)
    rest = hashlib.sha256(part10[: pixel[0]])
    rest.update(part10[pixel[1] :])
    return hashlib.sha256(part10[pixel[0] : pixel[1]]).digest(), rest.digest()


def _may_nest(part10: bytes, start: int, value: int) -> bool:
    """Whether an element can hold nested elements: a sequence (explicit VR ``SQ``, or
    ``UN``, or any implicit VR element with items, which begin with (FFFE,E000))."""
    header = part10[start:value]
    if len(header) >= 6 and header[4:6] in (b"SQ", b"UN"):
        return True
    return part10[value : value + 4] in (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")


def restore(stored: bytes, removed: Iterable[tuple[int, bytes]]) -> bytes:
    """Put the cut elements back: the original object."""
    out = bytearray()
    taken = 0  # bytes of ``stored`` copied so far
    for offset, data in removed:
        gap = offset - len(out)
        if gap < 0 or taken + gap > len(stored):
            raise ValueError("identifying elements do not fit the stored object")
        out += stored[taken : taken + gap]
        taken += gap
        out += data
    out += stored[taken:]
    return bytes(out)
