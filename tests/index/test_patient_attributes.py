"""Patient identity: no merging of studies without Patient ID, no overwriting of one
study's patient attributes by another's, and a PHI-free warning when sources disagree."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from index_helpers import make_ds, storage_kwargs, store
from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp.index.ingest import (
    KnownSeries,
    StorageFacts,
    add_instance,
    add_instances_of_known_series,
    attributes_from_dataset,
)
from medzip_scp.index.models import Patient, Study
from medzip_scp.index.query import find, find_instances
from tests.index.index_helpers import identifier

INGEST_LOGGER = "medzip_scp.index.ingest"

ALPHA = {"PatientName": "Alpha^Ann", "PatientBirthDate": "19610101", "PatientSex": "F"}
BETA = {"PatientName": "Beta^Bob", "PatientBirthDate": "19720202", "PatientSex": "M"}


def _find(session: Session, model: str, level: str, **keys: Any) -> list[Dataset]:
    return list(find(session, model, identifier(level, **keys)))  # type: ignore[arg-type]


def _patient_of_each_study(responses: list[Dataset]) -> dict[str, tuple[str, Any, Any]]:
    return {
        str(r.StudyInstanceUID): (str(r.PatientName), r.PatientBirthDate, r.PatientSex)
        for r in responses
    }


def test_studies_without_patient_id_are_never_merged(
    db_session_factory: sessionmaker[Session],
) -> None:
    alpha = make_ds(PatientID="", **ALPHA)
    beta = make_ds(PatientID="", **BETA)
    # a second instance of the first study, in another series: still its own patient
    alpha_again = make_ds(PatientID="", StudyInstanceUID=alpha.StudyInstanceUID, **ALPHA)
    with db_session_factory() as session:
        for ds in (alpha, beta, alpha_again):
            store(session, ds)
        session.commit()

        assert session.scalar(select(func.count()).select_from(Patient)) == 2
        study_keys = {"StudyInstanceUID": "", "PatientID": ""}
        patient_keys = {"PatientName": "", "PatientBirthDate": "", "PatientSex": ""}
        expected = {
            alpha.StudyInstanceUID: ("Alpha^Ann", "19610101", "F"),
            beta.StudyInstanceUID: ("Beta^Bob", "19720202", "M"),
        }
        study_root = _find(session, "STUDY", "STUDY", **study_keys, **patient_keys)
        assert _patient_of_each_study(study_root) == expected

        patients = _find(
            session, "PATIENT", "PATIENT", PatientID="", NumberOfPatientRelatedStudies="",
            NumberOfPatientRelatedInstances="", **patient_keys,
        )  # fmt: skip
        got = sorted(
            (str(p.PatientName), p.PatientBirthDate, p.PatientSex,
             p.NumberOfPatientRelatedStudies, p.NumberOfPatientRelatedInstances)
            for p in patients
        )  # fmt: skip
        assert got == [("Alpha^Ann", "19610101", "F", 1, 2), ("Beta^Bob", "19720202", "M", 1, 1)]

        # Matching a patient attribute selects only that study's patient, at either level.
        (beta_patient,) = _find(session, "PATIENT", "PATIENT", PatientID="", PatientName="beta*")
        assert str(beta_patient.PatientName) == "Beta^Bob"
        (beta_study,) = _find(session, "STUDY", "STUDY", StudyInstanceUID="", PatientSex="M")
        assert beta_study.StudyInstanceUID == beta.StudyInstanceUID
        retrieved = find_instances(
            session,
            "STUDY",
            identifier("STUDY", StudyInstanceUID=alpha.StudyInstanceUID, PatientName=""),
        )
        assert {i.sop_instance_uid for i in retrieved} == {
            alpha.SOPInstanceUID,
            alpha_again.SOPInstanceUID,
        }


def test_differing_patient_attributes_under_one_patient_id(
    db_session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    first = make_ds(PatientID="PID-SHARED", **(ALPHA | {"PatientSex": ""}))
    other_source = make_ds(PatientID="PID-SHARED", **BETA)
    with db_session_factory() as session:
        with caplog.at_level(logging.WARNING, logger=INGEST_LOGGER):
            store(session, first)
            session.commit()
            assert caplog.records == []
            store(session, other_source)
            session.commit()

        (record,) = caplog.records
        message = record.getMessage()
        assert other_source.StudyInstanceUID in message
        assert other_source.SOPInstanceUID in message
        assert "PatientName, PatientBirthDate differing" in message
        assert "1 of its 2 studies" in message
        for phi in ("PID-SHARED", "Alpha", "Beta", "19610101", "19720202"):
            assert phi not in message

        # Study Root STUDY level: each study with the patient attributes it was sent with.
        responses = _find(
            session, "STUDY", "STUDY", StudyInstanceUID="", PatientID="",
            PatientName="", PatientBirthDate="", PatientSex="",
        )  # fmt: skip
        assert _patient_of_each_study(responses) == {
            first.StudyInstanceUID: ("Alpha^Ann", "19610101", None),  # as received: empty
            other_source.StudyInstanceUID: ("Beta^Bob", "19720202", "M"),
        }
        assert {r.PatientID for r in responses} == {"PID-SHARED"}
        (matched,) = _find(
            session, "STUDY", "STUDY", StudyInstanceUID="", PatientBirthDate="19720202"
        )
        assert matched.StudyInstanceUID == other_source.StudyInstanceUID

        # PATIENT level: one patient, with the values first received (an empty one filled).
        (patient,) = _find(
            session, "PATIENT", "PATIENT", PatientID="PID-SHARED", PatientName="",
            PatientBirthDate="", PatientSex="", NumberOfPatientRelatedStudies="",
        )  # fmt: skip
        assert (str(patient.PatientName), patient.PatientBirthDate, patient.PatientSex) == (
            "Alpha^Ann",
            "19610101",
            "M",
        )
        assert patient.NumberOfPatientRelatedStudies == 2


def test_warned_once_per_series_on_the_fast_path(
    db_session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """The known-series cache keeps serving both studies of a patient whose sources
    disagree: the warning comes with the first instance of the differing series only."""
    known = KnownSeries()
    first = make_ds(PatientID="PID-SHARED", **ALPHA)
    other_source = make_ds(PatientID="PID-SHARED", **BETA)
    with caplog.at_level(logging.WARNING, logger=INGEST_LOGGER):
        for ds in (first, other_source):
            with db_session_factory() as session:
                add_instance(
                    session,
                    attributes_from_dataset(ds),
                    StorageFacts(**storage_kwargs(ds)),
                    known_series=known,
                )
                session.commit()
            known.committed()
        assert len(caplog.records) == 1
        more = [
            make_ds(
                PatientID="PID-SHARED",
                StudyInstanceUID=ds.StudyInstanceUID,
                SeriesInstanceUID=ds.SeriesInstanceUID,
                **values,
            )
            for ds, values in ((first, ALPHA), (other_source, BETA), (first, ALPHA))
        ]
        with db_session_factory() as session:
            indexed = add_instances_of_known_series(
                session,
                [(attributes_from_dataset(ds), StorageFacts(**storage_kwargs(ds))) for ds in more],
                known,
            )
            session.commit()
        assert indexed == [True, True, True]
        assert len(caplog.records) == 1
    with db_session_factory() as session:
        names = dict(session.execute(select(Study.study_instance_uid, Study.patient_name)).all())
    assert names == {
        first.StudyInstanceUID: "Alpha^Ann",
        other_source.StudyInstanceUID: "Beta^Bob",
    }


def test_study_moved_to_another_patient_is_warned(
    db_session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    first = make_ds(PatientID="PID-FIRST", **ALPHA)
    moving = make_ds(PatientID="PID-OTHER", StudyInstanceUID=first.StudyInstanceUID, **ALPHA)
    with db_session_factory() as session:
        store(session, first)
        session.commit()
        with caplog.at_level(logging.WARNING, logger=INGEST_LOGGER):
            store(session, moving)
            session.commit()
    (record,) = caplog.records
    message = record.getMessage()
    assert first.StudyInstanceUID in message
    assert moving.SOPInstanceUID in message
    assert "PID-" not in message
