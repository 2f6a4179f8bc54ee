"""C-FIND matching (PS3.4 C.2.2.2), levels, models and responses; C-GET/C-MOVE selection."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from io import BytesIO
from typing import Any

import pydicom
import pytest
from index_helpers import make_ds, store
from pydicom import Dataset
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom.dsutils import decode, encode
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp.index.db import create_engine_for, session_factory, upgrade_database
from medzip_scp.index.query import QueryError, find, find_instances
from tests.conftest import DB_KINDS, database_url
from tests.index.index_helpers import identifier

S1, S2, S3, S4, S5 = (f"1.2.826.0.1.3680043.10.1234.1.{n}" for n in range(1, 6))
SE = {n: f"1.2.826.0.1.3680043.10.1234.2.{n}" for n in range(1, 7)}
I = {n: f"1.2.826.0.1.3680043.10.1234.3.{n}" for n in range(1, 8)}  # noqa: E741

P1 = {"PatientID": "PID-1", "PatientName": "Doe^John", "PatientBirthDate": "19700101",
      "PatientSex": "M"}  # fmt: skip
P2 = {"PatientID": "PID-2", "PatientName": "Smith^Anna", "PatientSex": "F"}
P3 = {"PatientID": "AB%CD", "PatientName": "Müller^Jörg", "PatientBirthDate": "19800505",
      "SpecificCharacterSet": "ISO_IR 100"}  # fmt: skip
P4 = {"PatientID": "ABxCD", "PatientName": "Other^Person"}

STUDY1 = {"StudyInstanceUID": S1, "StudyDate": "20200101", "StudyTime": "101010",
          "AccessionNumber": "ACC-1", "StudyID": "1", "StudyDescription": "CT Head",
          "ReferringPhysicianName": "Ref^Doc"}  # fmt: skip
STUDY2 = {"StudyInstanceUID": S2, "StudyDate": "20210615", "StudyTime": "230000",
          "AccessionNumber": "ACC-2", "StudyDescription": "MR Knee"}  # fmt: skip
STUDY3 = {"StudyInstanceUID": S3, "StudyDate": "20200301", "StudyTime": "0800",
          "StudyDescription": "50%_off study"}  # fmt: skip
STUDY4 = {"StudyInstanceUID": S4, "StudyDate": "20220101", "StudyDescription": "Zweite_Studie"}
STUDY5 = {"StudyInstanceUID": S5, "StudyDescription": "Zweite Studie"}

INSTANCES: list[dict[str, Any]] = [
    # P1 / S1: CT series with two images (numbers 2, 1) and an SR series
    P1 | STUDY1 | {"SeriesInstanceUID": SE[1], "Modality": "CT", "SeriesNumber": 1,
                   "SeriesDescription": "Axial", "SeriesDate": "20200101",
                   "SeriesTime": "101500", "BodyPartExamined": "HEAD",
                   "SOPInstanceUID": I[1], "InstanceNumber": 2, "Rows": 512, "Columns": 512},
    P1 | STUDY1 | {"SeriesInstanceUID": SE[1], "Modality": "CT", "SeriesNumber": 1,
                   "SOPInstanceUID": I[2], "InstanceNumber": 1, "Rows": 512, "Columns": 512},
    P1 | STUDY1 | {"SeriesInstanceUID": SE[2], "Modality": "SR", "SeriesNumber": 2,
                   "SOPClassUID": BasicTextSRStorage, "SOPInstanceUID": I[3]},
    # P1 / S2: MR
    P1 | STUDY2 | {"SeriesInstanceUID": SE[3], "Modality": "MR", "SeriesNumber": 1,
                   "SOPClassUID": MRImageStorage, "SOPInstanceUID": I[4],
                   "InstanceNumber": 1, "NumberOfFrames": 3},
    # P2 / S3: no accession number, no series number
    P2 | STUDY3 | {"SeriesInstanceUID": SE[4], "Modality": "CT", "SOPInstanceUID": I[5]},
    # P3 / S4 (Latin-1 names)
    P3 | STUDY4 | {"SeriesInstanceUID": SE[5], "Modality": "CT", "SOPInstanceUID": I[6],
                   "SeriesDescription": "Täglich"},
    # P4 / S5
    P4 | STUDY5 | {"SeriesInstanceUID": SE[6], "Modality": "OT", "SOPInstanceUID": I[7],
                   "SOPClassUID": SecondaryCaptureImageStorage,
                   "SeriesDescription": "Scout [1]"},
]  # fmt: skip


@pytest.fixture(scope="module")
def sessions(module_db_url: str) -> Iterator[sessionmaker[Session]]:
    upgrade_database(module_db_url)
    engine = create_engine_for(module_db_url)
    factory = session_factory(engine)
    with factory() as session:
        for attrs in INSTANCES:
            store(session, make_ds(**attrs))
        session.commit()
    try:
        yield session_factory(engine, readonly=True)
    finally:
        engine.dispose()


def run(sessions: sessionmaker[Session], model: str, level: str, **keys: Any) -> list[Dataset]:
    with sessions() as session:
        return list(find(session, model, identifier(level, **keys)))  # type: ignore[arg-type]


def values(responses: list[Dataset], keyword: str) -> list[Any]:
    return sorted(str(r.get(keyword, "")) for r in responses)


# ----------------------------------------------------------------------- levels / models


def test_patient_level_universal(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "PATIENT", "PATIENT", PatientName="", PatientID="")
    assert values(res, "PatientID") == ["AB%CD", "ABxCD", "PID-1", "PID-2"]
    for r in res:
        assert set(r.dir()) <= {"QueryRetrieveLevel", "PatientName", "PatientID",
                                "SpecificCharacterSet"}  # fmt: skip
        assert r.QueryRetrieveLevel == "PATIENT"


def test_study_root_has_no_patient_level(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(QueryError, match="Study Root"):
        run(sessions, "STUDY", "PATIENT", PatientID="")


def test_study_level_one_response_per_study(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "STUDY", "STUDY", StudyInstanceUID="", ModalitiesInStudy="")
    assert values(res, "StudyInstanceUID") == sorted([S1, S2, S3, S4, S5])
    by_uid = {r.StudyInstanceUID: r for r in res}
    assert list(by_uid[S1].ModalitiesInStudy) == ["CT", "SR"]
    assert by_uid[S2].ModalitiesInStudy == "MR"


def test_study_root_study_level_matches_patient_attributes(
    sessions: sessionmaker[Session],
) -> None:
    res = run(sessions, "STUDY", "STUDY", PatientName="doe*", PatientBirthDate="",
              StudyInstanceUID="")  # fmt: skip
    assert values(res, "StudyInstanceUID") == sorted([S1, S2])
    assert {r.PatientBirthDate for r in res} == {"19700101"}
    assert {str(r.PatientName) for r in res} == {"Doe^John"}


def test_patient_root_study_level(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "PATIENT", "STUDY", PatientID="PID-1", PatientName="", StudyDate="")
    assert len(res) == 2
    for r in res:
        assert r.PatientID == "PID-1"
        assert r.PatientName == "Doe^John"  # a PATIENT key, matched relationally
        assert "StudyInstanceUID" in r
    assert run(sessions, "PATIENT", "STUDY", PatientID="PID-1", PatientName="Nobody") == []


def test_series_level_hierarchical(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "STUDY", "SERIES", StudyInstanceUID=S1, Modality="",
              SeriesNumber="", NumberOfSeriesRelatedInstances="")  # fmt: skip
    assert values(res, "SeriesInstanceUID") == sorted([SE[1], SE[2]])
    by_uid = {r.SeriesInstanceUID: r for r in res}
    assert by_uid[SE[1]].Modality == "CT"
    assert by_uid[SE[1]].SeriesNumber == 1
    assert by_uid[SE[1]].NumberOfSeriesRelatedInstances == 2
    for r in res:
        assert r.StudyInstanceUID == S1
        assert "PatientID" not in r  # not a unique key above SERIES in Study Root
        assert set(r.dir()) == {
            "QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID",
            "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances",
        }  # fmt: skip


def test_patient_root_series_level_returns_higher_unique_keys(
    sessions: sessionmaker[Session],
) -> None:
    res = run(sessions, "PATIENT", "SERIES", PatientID="PID-1", StudyInstanceUID=S2)
    assert len(res) == 1
    assert res[0].PatientID == "PID-1"
    assert res[0].StudyInstanceUID == S2
    assert res[0].SeriesInstanceUID == SE[3]


def test_image_level(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "STUDY", "IMAGE", StudyInstanceUID=S1, SeriesInstanceUID=SE[1],
              SOPInstanceUID="", SOPClassUID="", InstanceNumber="", Rows=None, Columns=None,
              NumberOfFrames="")  # fmt: skip
    assert values(res, "SOPInstanceUID") == sorted([I[1], I[2]])
    for r in res:
        assert r.SOPClassUID == CTImageStorage
        assert r.Rows == 512 and r.Columns == 512
        assert r.NumberOfFrames is None
        assert r.SeriesInstanceUID == SE[1] and r.StudyInstanceUID == S1
    res = run(sessions, "STUDY", "IMAGE", StudyInstanceUID=S1, SeriesInstanceUID=SE[1],
              InstanceNumber="2")  # fmt: skip
    assert [r.SOPInstanceUID for r in res] == [I[1]]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the '*' below
def test_relational_series_level_without_parent_keys(sessions: sessionmaker[Session]) -> None:
    # All CT series of the archive (PS3.4 C.4.1.2.2): no StudyInstanceUID, or an empty one.
    for keys in ({}, {"StudyInstanceUID": ""}, {"StudyInstanceUID": "*"}):
        res = run(sessions, "STUDY", "SERIES", Modality="CT", SeriesDescription="", **keys)
        assert values(res, "SeriesInstanceUID") == sorted([SE[1], SE[4], SE[5]])
        by_uid = {r.SeriesInstanceUID: r for r in res}
        assert by_uid[SE[4]].StudyInstanceUID == S3  # where each series belongs
        assert by_uid[SE[5]].SeriesDescription == "Täglich"
    res = run(sessions, "PATIENT", "SERIES", Modality="MR")
    assert [(r.PatientID, r.StudyInstanceUID, r.SeriesInstanceUID) for r in res] == [
        ("PID-1", S2, SE[3])
    ]


def test_relational_matching_on_keys_of_upper_levels(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "STUDY", "SERIES", PatientName="doe*", StudyDate="20200101-",
              Modality="", StudyDescription="")  # fmt: skip
    assert values(res, "SeriesInstanceUID") == sorted([SE[1], SE[2], SE[3]])
    assert {str(r.PatientName) for r in res} == {"Doe^John"}
    assert values(res, "StudyDescription") == ["CT Head", "CT Head", "MR Knee"]
    res = run(sessions, "PATIENT", "IMAGE", PatientID="PID-1", Modality="CT", StudyDate="")
    assert values(res, "SOPInstanceUID") == sorted([I[1], I[2]])
    assert {r.StudyDate for r in res} == {"20200101"}
    res = run(sessions, "STUDY", "IMAGE", ModalitiesInStudy="MR", SOPInstanceUID="")
    assert values(res, "SOPInstanceUID") == [I[4]]


def test_find_limit(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        res = list(find(session, "STUDY", identifier("IMAGE"), limit=3))
    assert len(res) == 3


def test_image_level_series_list(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "STUDY", "IMAGE", StudyInstanceUID=S1,
              SeriesInstanceUID=[SE[1], SE[2]])  # fmt: skip
    assert len(res) == 3


# ----------------------------------------------------------------------- matching kinds


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("Doe^John", ["PID-1"]),  # single value
        ("doe^JOHN", ["PID-1"]),  # PN: case-insensitive
        ("Doe", []),  # ^ components compared literally
        ("D?e^*", ["PID-1"]),  # wildcards
        ("*^anna", ["PID-2"]),
        ("*", ["AB%CD", "ABxCD", "PID-1", "PID-2"]),  # * = universal
        ("müller*", ["AB%CD"]),
        ("MÜLLER^JÖRG", ["AB%CD"]),  # non-ASCII case folding on both dialects
        ("*%*", []),  # LIKE metacharacters are literal in PN too
        ("Doe_John", []),
    ],
)
def test_pn_matching(sessions: sessionmaker[Session], query: str, expected: list[str]) -> None:
    res = run(sessions, "PATIENT", "PATIENT", PatientName=query)
    assert values(res, "PatientID") == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("PID-1", ["PID-1"]),
        ("pid-1", []),  # LO: case-sensitive
        ("PID-*", ["PID-1", "PID-2"]),
        ("pid-*", []),
        ("PID-?", ["PID-1", "PID-2"]),
        ("AB%CD", ["AB%CD"]),  # % is not a wildcard
        ("AB%*", ["AB%CD"]),
        ("AB_CD", []),  # _ is not a wildcard
        ("AB_*", []),
        ("AB?CD", ["AB%CD", "ABxCD"]),
    ],
)
def test_wildcard_and_like_escaping(
    sessions: sessionmaker[Session], query: str, expected: list[str]
) -> None:
    res = run(sessions, "PATIENT", "PATIENT", PatientID=query)
    assert values(res, "PatientID") == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("*_*", [S3, S4]),
        ("*%*", [S3]),
        ("Zweite?Studie", [S4, S5]),
        ("Zweite_Studie", [S4]),
        ("ct head", []),
        ("CT*", [S1]),
    ],
)
def test_study_description_matching(
    sessions: sessionmaker[Session], query: str, expected: list[str]
) -> None:
    res = run(sessions, "STUDY", "STUDY", StudyDescription=query)
    assert values(res, "StudyInstanceUID") == sorted(expected)


def test_glob_metacharacters_are_literal(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "STUDY", "SERIES", StudyInstanceUID=S5, SeriesDescription="Scout [1]*")
    assert [r.SeriesInstanceUID for r in res] == [SE[6]]
    res = run(sessions, "STUDY", "SERIES", StudyInstanceUID=S5, SeriesDescription="Scout [1]")
    assert len(res) == 1
    res = run(sessions, "STUDY", "SERIES", StudyInstanceUID=S5, SeriesDescription="Scout 1*")
    assert res == []


def test_empty_values_match_only_universal(sessions: sessionmaker[Session]) -> None:
    all_studies = run(sessions, "STUDY", "STUDY", AccessionNumber="")
    assert len(all_studies) == 5
    assert {r.StudyInstanceUID: r["AccessionNumber"] for r in all_studies}[S3].is_empty
    assert len(run(sessions, "STUDY", "STUDY", AccessionNumber="*")) == 5
    assert values(run(sessions, "STUDY", "STUDY", AccessionNumber="ACC*"), "StudyInstanceUID") == [
        S1,
        S2,
    ]
    # Empty dates are never within a range.
    res = run(sessions, "PATIENT", "PATIENT", PatientBirthDate="19000101-")
    assert values(res, "PatientID") == ["AB%CD", "PID-1"]
    # Empty integers do not match a single value.
    res = run(sessions, "STUDY", "SERIES", StudyInstanceUID=S3, SeriesNumber="1")
    assert res == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # ACR-NEMA forms, wildcards
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("20200101", [S1]),
        ("20200101-20200301", [S1, S3]),
        ("-20200101", [S1]),
        ("20210101-", [S2, S4]),
        ("20200302-20200101", []),
        ("2020.01.01", [S1]),  # ACR-NEMA form
    ],
)
def test_date_matching(sessions: sessionmaker[Session], query: str, expected: list[str]) -> None:
    res = run(sessions, "STUDY", "STUDY", StudyDate=query)
    assert values(res, "StudyInstanceUID") == sorted(expected)


@pytest.mark.filterwarnings("ignore::UserWarning")  # ACR-NEMA forms, wildcards
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("101010", [S1]),
        ("1010", []),  # single value: exact
        ("1000-1011", [S1]),
        ("1010-1010", [S1]),  # upper bound of minute precision covers the minute
        ("-0800", [S3]),
        ("2300-", [S2]),
        ("07-09", [S3]),
        ("10:10:10", [S1]),
    ],
)
def test_time_matching(sessions: sessionmaker[Session], query: str, expected: list[str]) -> None:
    res = run(sessions, "STUDY", "STUDY", StudyTime=query)
    assert values(res, "StudyInstanceUID") == sorted(expected)


def test_uid_list_matching(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "STUDY", "STUDY", StudyInstanceUID=[S1, S3, "1.2.3.999"])
    assert values(res, "StudyInstanceUID") == sorted([S1, S3])


@pytest.mark.filterwarnings("ignore::UserWarning")  # ACR-NEMA forms, wildcards
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("MR", [S2]),
        ("CT", [S1, S3, S4]),
        (["SR", "OT"], [S1, S5]),
        ("C*", [S1, S3, S4]),
    ],
)
def test_modalities_in_study_matching(
    sessions: sessionmaker[Session], query: Any, expected: list[str]
) -> None:
    res = run(sessions, "STUDY", "STUDY", ModalitiesInStudy=query)
    assert values(res, "StudyInstanceUID") == sorted(expected)  # one response per study
    for r in res:
        assert "ModalitiesInStudy" in r


def test_sop_classes_in_study(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "STUDY", "STUDY", SOPClassesInStudy=BasicTextSRStorage)
    assert len(res) == 1
    assert res[0].StudyInstanceUID == S1
    assert sorted(res[0].SOPClassesInStudy) == sorted([BasicTextSRStorage, CTImageStorage])


def test_computed_counts(sessions: sessionmaker[Session]) -> None:
    res = run(sessions, "PATIENT", "PATIENT", PatientID="PID-1",
              NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
              NumberOfPatientRelatedInstances="")  # fmt: skip
    (p,) = res
    assert (p.NumberOfPatientRelatedStudies, p.NumberOfPatientRelatedSeries,
            p.NumberOfPatientRelatedInstances) == (2, 3, 4)  # fmt: skip
    res = run(sessions, "STUDY", "STUDY", StudyInstanceUID=S1, NumberOfStudyRelatedSeries="",
              NumberOfStudyRelatedInstances="", NumberOfPatientRelatedStudies="")  # fmt: skip
    (s,) = res
    assert (s.NumberOfStudyRelatedSeries, s.NumberOfStudyRelatedInstances) == (2, 3)
    assert s.NumberOfPatientRelatedStudies == 2  # Study Root: patient keys at STUDY level


# ----------------------------------------------------------------------- responses


def test_unknown_and_unsupported_keys_returned_empty(sessions: sessionmaker[Session]) -> None:
    ident = identifier("STUDY", StudyInstanceUID=S1, InstitutionName="", Modality="CT")
    ident.add_new(0x00091010, "LO", "private")
    ident.ReferencedStudySequence = [Dataset()]
    with sessions() as session:
        (r,) = list(find(session, "STUDY", ident))
    assert r["InstitutionName"].is_empty
    assert r["Modality"].is_empty  # SERIES level key at STUDY level: not matched, empty
    assert r[0x00091010].is_empty
    assert r["ReferencedStudySequence"].is_empty
    assert set(r.dir()) == {"QueryRetrieveLevel", "StudyInstanceUID", "InstitutionName",
                            "Modality", "ReferencedStudySequence"}  # fmt: skip


def test_specific_character_set(sessions: sessionmaker[Session]) -> None:
    (r,) = run(sessions, "PATIENT", "PATIENT", PatientID="AB%CD", PatientName="",
               SpecificCharacterSet="ISO_IR 100")  # fmt: skip
    assert str(r.PatientName) == "Müller^Jörg"
    assert r.SpecificCharacterSet == "ISO_IR 100"
    (r,) = run(sessions, "PATIENT", "PATIENT", PatientID="PID-1", PatientName="")
    assert "SpecificCharacterSet" not in r  # ASCII only
    (r,) = run(sessions, "PATIENT", "PATIENT", PatientID="PID-1", SpecificCharacterSet="")
    assert r["SpecificCharacterSet"].is_empty
    (r,) = run(sessions, "STUDY", "SERIES", StudyInstanceUID=S4, SeriesDescription="")
    assert r.SeriesDescription == "Täglich"
    assert r.SpecificCharacterSet == "ISO_IR 192"  # the query names none: UTF-8


def test_cancel_stops_responses(sessions: sessionmaker[Session]) -> None:
    seen: list[Dataset] = []
    with sessions() as session:
        for ds in find(session, "STUDY", identifier("STUDY", StudyInstanceUID=""),
                       lambda: len(seen) >= 2):  # fmt: skip
            seen.append(ds)
    assert len(seen) == 2
    with sessions() as session:
        assert list(find(session, "STUDY", identifier("STUDY"), lambda: True)) == []


# ----------------------------------------------------------------------- character sets

# pydicom's character set examples (one per patient) and a Japanese study whose text is
# ASCII but whose Specific Character Set is "ISO 2022 IR 13\ISO 2022 IR 87".
CHARSET_FILES = {name: get_charset_files(name)[0] for name in (
    "chrArab.dcm", "chrFren.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrH31.dcm", "chrH32.dcm",
    "chrHbrw.dcm", "chrI2.dcm", "chrKoreanMulti.dcm", "chrRuss.dcm", "chrX1.dcm",
    "chrX2.dcm")}  # fmt: skip
CHARSET_FILES["J2K_pixelrep_mismatch.dcm"] = get_testdata_file("J2K_pixelrep_mismatch.dcm")
LATIN1_FILES = {"chrFren.dcm", "chrGerm.dcm"}


@pytest.fixture(scope="module", params=DB_KINDS)
def charset_sessions(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[sessionmaker[Session], dict[str, Dataset]]]:
    headers = {n: pydicom.dcmread(p, stop_before_pixels=True) for n, p in CHARSET_FILES.items()}
    with database_url(request.param, tmp_path_factory.mktemp("charsets")) as url:
        upgrade_database(url)
        engine = create_engine_for(url)
        with session_factory(engine)() as session:
            for ds in headers.values():
                store(session, ds)
            session.commit()
        try:
            yield session_factory(engine, readonly=True), headers
        finally:
            engine.dispose()


def _charset(ds: Dataset) -> list[str]:
    value = ds.SpecificCharacterSet
    return [value] if isinstance(value, str) else list(value)


def _as_received(response: Dataset) -> Dataset:
    """The response as the peer reads it: encoded as pynetdicom sends it, then decoded;
    a value pydicom could only write with replacement characters is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = encode(response, True, True)
        assert raw is not None
        received = decode(BytesIO(raw), True, True)
        received.decode()
    return received


@pytest.mark.parametrize("name", sorted(CHARSET_FILES))
@pytest.mark.parametrize("requested", [None, "stored", "ISO_IR 100", "ISO_IR 192"])
def test_responses_in_a_character_set_the_requester_reads(
    charset_sessions: tuple[sessionmaker[Session], dict[str, Dataset]],
    name: str,
    requested: str | None,
) -> None:
    sessions, headers = charset_sessions
    stored = headers[name]
    ident = identifier("STUDY", StudyInstanceUID=stored.StudyInstanceUID, PatientName="",
                       PatientID="", StudyDescription="")  # fmt: skip
    if requested is not None:
        ident.SpecificCharacterSet = _charset(stored) if requested == "stored" else requested
    with sessions() as session:
        (response,) = list(find(session, "STUDY", ident))
    received = _as_received(response)
    assert str(received.PatientName) == str(stored.PatientName)
    assert received.PatientID == stored.PatientID
    ascii_only = str(stored.PatientName).isascii()
    if requested is None:
        expected = None if ascii_only else ["ISO_IR 192"]
    elif requested == "stored":
        expected = _charset(stored)
    elif requested == "ISO_IR 100" and not (ascii_only or name in LATIN1_FILES):
        expected = ["ISO_IR 192"]  # not representable in Latin-1: UTF-8 instead
    else:
        expected = [requested]
    assert (_charset(received) if "SpecificCharacterSet" in received else None) == expected


def test_values_a_code_extension_cannot_encode_go_out_in_utf8(
    charset_sessions: tuple[sessionmaker[Session], dict[str, Dataset]],
) -> None:
    sessions, headers = charset_sessions
    # Half-width katakana are JIS X 0201 (ISO 2022 IR 13), not JIS X 0208 (IR 87).
    for name, charset, expected in [
        ("chrH32.dcm", ["", "ISO 2022 IR 87"], ["ISO_IR 192"]),
        ("chrH31.dcm", ["", "ISO 2022 IR 87"], ["", "ISO 2022 IR 87"]),
        ("chrI2.dcm", ["", "ISO 2022 IR 87"], ["ISO_IR 192"]),
        ("chrKoreanMulti.dcm", ["", "ISO 2022 IR 149"], ["", "ISO 2022 IR 149"]),
    ]:
        ident = identifier("PATIENT", PatientID=headers[name].PatientID, PatientName="",
                           SpecificCharacterSet=charset)  # fmt: skip
        with sessions() as session:
            (response,) = list(find(session, "PATIENT", ident))
        received = _as_received(response)
        assert str(received.PatientName) == str(headers[name].PatientName), name
        assert _charset(received) == expected, name


def test_configured_character_set_for_queries_that_name_none(
    charset_sessions: tuple[sessionmaker[Session], dict[str, Dataset]],
) -> None:
    sessions, headers = charset_sessions
    for name, expected in [("chrGerm.dcm", "ISO_IR 100"), ("chrRuss.dcm", "ISO_IR 192")]:
        ident = identifier("PATIENT", PatientID=headers[name].PatientID, PatientName="")
        with sessions() as session:
            (response,) = list(find(session, "PATIENT", ident, default_charset="ISO_IR 100"))
        received = _as_received(response)
        assert str(received.PatientName) == str(headers[name].PatientName)
        assert received.SpecificCharacterSet == expected


# ----------------------------------------------------------------------- invalid identifiers


def raw_identifier(level: str | None, **keys: str) -> Dataset:
    """An identifier as read from the network: values are decoded lazily, unvalidated."""
    ds = Dataset()
    items = ({"QueryRetrieveLevel": level} if level is not None else {}) | keys
    for keyword, value in items.items():
        tag = Tag(keyword)
        raw = value.encode("ascii")
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    return ds


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("model", "level", "keys", "message"),
    [
        ("STUDY", None, {}, "QueryRetrieveLevel"),
        ("STUDY", "FOO", {}, "'FOO'"),
        ("STUDY", "PATIENT", {}, "Study Root"),
        ("XYZ", "STUDY", {}, "'XYZ'"),
        ("STUDY", "SERIES", {"StudyInstanceUID": "1.2.*"}, "wildcard"),
        ("STUDY", "IMAGE", {"SeriesInstanceUID": "1.2.?"}, "wildcard"),
        ("STUDY", "STUDY", {"StudyDate": "2020"}, "'2020'"),
        ("STUDY", "STUDY", {"StudyDate": "2020*"}, "DA"),
        ("STUDY", "STUDY", {"StudyTime": "25x"}, "TM"),
        ("STUDY", "SERIES", {"StudyInstanceUID": S1, "SeriesNumber": "x"}, "integer"),
    ],
)
def test_invalid_identifiers(
    sessions: sessionmaker[Session],
    model: str,
    level: str | None,
    keys: dict[str, str],
    message: str,
) -> None:
    ident = raw_identifier(level, **keys)
    with sessions() as session, pytest.raises(QueryError, match=message):
        list(find(session, model, ident))  # type: ignore[arg-type]
    assert issubclass(QueryError, ValueError)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_query_error_does_not_leak_phi(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(QueryError) as info:
        list(find(session, "STUDY", raw_identifier("STUDY", PatientBirthDate="1970-01-01x")))
    assert "1970" not in str(info.value)
    assert "PatientBirthDate" in str(info.value)


# ----------------------------------------------------------------------- retrieve


def _uids(instances: list[Any]) -> list[str]:
    return [i.sop_instance_uid for i in instances]


def test_find_instances_levels(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        got = find_instances(session, "STUDY", identifier("STUDY", StudyInstanceUID=S1))
        assert _uids(got) == [I[2], I[1], I[3]]  # series number, then instance number
        got = find_instances(session, "STUDY", identifier("STUDY", StudyInstanceUID=[S2, S1]))
        assert _uids(got) == [I[2], I[1], I[3], I[4]]
        got = find_instances(session, "PATIENT", identifier("PATIENT", PatientID="PID-1"))
        assert _uids(got) == [I[2], I[1], I[3], I[4]]
        got = find_instances(
            session, "STUDY", identifier("SERIES", StudyInstanceUID=S1, SeriesInstanceUID=SE[2])
        )
        assert _uids(got) == [I[3]]
        got = find_instances(
            session,
            "PATIENT",
            identifier("IMAGE", PatientID="PID-1", StudyInstanceUID=S1,
                       SeriesInstanceUID=SE[1], SOPInstanceUID=[I[1], I[2]]),
        )  # fmt: skip
        assert _uids(got) == [I[2], I[1]]
        assert got[0].blob_key.startswith("blobs/")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("model", "level", "keys"),
    [
        ("STUDY", "STUDY", {}),
        ("STUDY", "STUDY", {"StudyInstanceUID": ""}),
        ("STUDY", "STUDY", {"StudyInstanceUID": "*"}),
        ("STUDY", "PATIENT", {"PatientID": "PID-1"}),
        ("PATIENT", "PATIENT", {"PatientID": ""}),
        ("PATIENT", "PATIENT", {"PatientID": "PID*"}),
        ("STUDY", "SERIES", {"StudyInstanceUID": S1}),
        ("STUDY", "IMAGE", {"StudyInstanceUID": S1, "SeriesInstanceUID": SE[1]}),
        ("PATIENT", "IMAGE", {"SOPInstanceUID": ""}),
    ],
)
def test_find_instances_rejects_unbounded_retrieves(
    sessions: sessionmaker[Session], model: str, level: str, keys: dict[str, str]
) -> None:
    ident = raw_identifier(level, **keys)
    with sessions() as session, pytest.raises(QueryError):
        find_instances(session, model, ident)  # type: ignore[arg-type]


def test_find_instances_by_the_unique_key_of_the_level_alone(
    sessions: sessionmaker[Session],
) -> None:
    # Series and SOP Instance UIDs are globally unique: the keys above are optional.
    with sessions() as session:
        got = find_instances(session, "STUDY", identifier("SERIES", SeriesInstanceUID=SE[1]))
        assert _uids(got) == [I[2], I[1]]
        got = find_instances(session, "PATIENT", identifier("IMAGE", SOPInstanceUID=[I[4], I[5]]))
        assert _uids(got) == [I[4], I[5]]
        got = find_instances(session, "PATIENT", identifier("STUDY", StudyInstanceUID=S3))
        assert _uids(got) == [I[5]]
        # Present keys above still have to match.
        got = find_instances(
            session, "STUDY", identifier("IMAGE", StudyInstanceUID=S2, SOPInstanceUID=I[1])
        )
        assert got == []
