"""attributes_from_dataset, add_instance (incl. concurrency) and replace_instance."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import threading
import warnings
from typing import Any

import pydicom
import pytest
from index_helpers import UID_ROOT, make_ds, storage_kwargs, store
from pydicom.data import get_testdata_file
from pydicom.uid import MRImageStorage, generate_uid
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp.index.errors import DuplicateInstanceError, IndexError_, MissingAttributeError
from medzip_scp.index.ingest import (
    StorageFacts,
    add_instance,
    attributes_from_dataset,
    get_instance,
    replace_instance,
)
from medzip_scp.index.models import (
    Instance,
    InstanceState,
    Patient,
    Series,
    Study,
    SupersededInstance,
)
from medzip_scp.index.query import find


def _count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


@pytest.mark.parametrize(
    "keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
)
@pytest.mark.parametrize("how", ["absent", "empty"])
def test_missing_required_uid(keyword: str, how: str) -> None:
    ds = make_ds(**{keyword: None if how == "absent" else ""})
    with pytest.raises(MissingAttributeError) as info:
        attributes_from_dataset(ds)
    assert info.value.keyword == keyword
    assert keyword in str(info.value)
    assert isinstance(info.value, IndexError_)


def test_attributes_from_dataset_values() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ACR-NEMA DA/TM forms on purpose
        ds = _acr_nema_ds()
    attrs = attributes_from_dataset(ds)
    assert attrs.patient_id == ""
    assert attrs.patient_birth_date == "19700102"
    assert attrs.study_time == "101112"
    assert attrs.series_number == 7
    assert attrs.instance_number is None
    assert attrs.number_of_frames == 3
    assert attrs.specific_character_set == "ISO_IR 100"


def _acr_nema_ds() -> pydicom.Dataset:
    return make_ds(
        PatientID="",
        PatientBirthDate="1970.01.02",
        StudyTime="10:11:12",
        SeriesNumber="7",
        InstanceNumber=None,
        NumberOfFrames="3",
        SpecificCharacterSet="ISO_IR 100",
        ModalitiesInStudy=None,
    )


def test_attributes_from_bundled_file() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    attrs = attributes_from_dataset(ds)
    assert attrs.sop_instance_uid == ds.SOPInstanceUID
    assert attrs.modality == "CT"
    assert attrs.rows == 128 and attrs.columns == 128
    assert attrs.patient_name == str(ds.PatientName)


def test_add_instance_builds_hierarchy(db_session_factory: sessionmaker[Session]) -> None:
    study_uid, series_uid = generate_uid(prefix=UID_ROOT), generate_uid(prefix=UID_ROOT)
    first = make_ds(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        StudyDescription="Old description",
        InstanceNumber=1,
    )
    second = make_ds(
        StudyInstanceUID=study_uid,
        SeriesInstanceUID=series_uid,
        StudyDescription="New description",
        PatientName="Test^Renamed",
        InstanceNumber=2,
    )
    # no description, no name: empty values do not erase
    third = make_ds(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, PatientName=None)
    with db_session_factory() as session:
        inst = store(session, first)
        assert inst.id is not None
        session.commit()
    with db_session_factory() as session:
        store(session, second)
        store(session, third)
        session.commit()
    with db_session_factory() as session:
        assert _count(session, Patient) == 1
        assert _count(session, Study) == 1
        assert _count(session, Series) == 1
        assert _count(session, Instance) == 3
        study = session.scalars(select(Study)).one()
        assert study.study_description == "New description"  # newest non-empty wins
        assert study.patient_name == "Test^Renamed"  # the study's copy: newest wins too
        patient = session.scalars(select(Patient)).one()
        assert patient.patient_name == "Test^Patient"  # a patient keeps its first name
        got = get_instance(session, str(first.SOPInstanceUID))
        assert got is not None
        assert got.state is InstanceState.STORED
        assert got.instance_number == 1
        assert got.calling_ae_title == "TESTSCU"
        assert got.received_at.tzinfo is not None
        assert abs(got.received_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
        assert get_instance(session, "1.2.3.404") is None


def test_issuers_are_distinct_patients_and_each_study_without_id_has_its_own(
    db_session_factory: sessionmaker[Session],
) -> None:
    with db_session_factory() as session:
        store(session, make_ds(PatientID=""))
        store(session, make_ds(PatientID=""))
        store(session, make_ds(PatientID="X", IssuerOfPatientID="A"))
        store(session, make_ds(PatientID="X", IssuerOfPatientID="B"))
        store(session, make_ds(PatientID="X"))
        session.commit()
        assert _count(session, Patient) == 5


def test_duplicate_instance_raises_and_session_stays_usable(
    db_session_factory: sessionmaker[Session],
) -> None:
    ds = make_ds()
    with db_session_factory() as session:
        store(session, ds)
        session.commit()
    with db_session_factory() as session:
        with pytest.raises(DuplicateInstanceError) as info:
            store(session, ds)
        assert str(ds.SOPInstanceUID) in str(info.value)
        other = store(session, make_ds(StudyInstanceUID=ds.StudyInstanceUID))
        session.commit()
        assert other.id is not None
        assert _count(session, Instance) == 2


def test_concurrent_add_same_new_study(db_session_factory: sessionmaker[Session]) -> None:
    """4 associations store instances of one new study/series at the same moment."""
    study_uid, series_uid = generate_uid(prefix=UID_ROOT), generate_uid(prefix=UID_ROOT)
    workers, per_worker = 4, 6
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(per_worker):
                ds = make_ds(
                    StudyInstanceUID=study_uid,
                    SeriesInstanceUID=series_uid,
                    PatientID="CONCURRENT",
                    InstanceNumber=n * 100 + i,
                )
                with db_session_factory() as session:
                    if i == 0:
                        barrier.wait(timeout=30)
                    store(session, ds)
                    session.commit()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with db_session_factory() as session:
        assert _count(session, Patient) == 1
        assert _count(session, Study) == 1
        assert _count(session, Series) == 1
        assert _count(session, Instance) == workers * per_worker


def test_concurrent_hierarchy_creation_in_open_transactions(
    db_session_factory: sessionmaker[Session],
) -> None:
    """Both writers create the hierarchy before either commits (PostgreSQL waits
    on the conflicting insert; SQLite serialises the transactions)."""
    study_uid, series_uid = generate_uid(prefix=UID_ROOT), generate_uid(prefix=UID_ROOT)
    first_flushed = threading.Event()
    errors: list[BaseException] = []

    def second_writer() -> None:
        try:
            first_flushed.wait(timeout=30)
            with db_session_factory() as session:
                store(session, make_ds(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid))
                session.commit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=second_writer)
    thread.start()
    with db_session_factory() as session:
        store(session, make_ds(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid))
        first_flushed.set()
        thread.join(timeout=0.5)  # let the other writer block on our rows
        session.commit()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert not errors, errors
    with db_session_factory() as session:
        assert _count(session, Study) == 1
        assert _count(session, Series) == 1
        assert _count(session, Instance) == 2


def test_replace_instance_keeps_superseded_version(
    db_session_factory: sessionmaker[Session],
) -> None:
    old = make_ds(InstanceNumber=1)
    new = make_ds(
        SOPInstanceUID=old.SOPInstanceUID,
        SOPClassUID=MRImageStorage,
        StudyInstanceUID=old.StudyInstanceUID,
        SeriesInstanceUID=generate_uid(prefix=UID_ROOT),  # moved to another series
        Modality="MR",
        InstanceNumber=5,
    )
    with db_session_factory() as session:
        store(session, old)
        session.commit()
    old_kwargs = storage_kwargs(old)
    new_kwargs = storage_kwargs(new) | {
        "blob_key": "blobs/new",
        "original_sha256": "f" * 64,
        "codec_id": "zstd-2",
    }
    with db_session_factory() as session:
        existing = get_instance(session, str(old.SOPInstanceUID))
        assert existing is not None
        replaced = replace_instance(
            session, existing, attributes_from_dataset(new), StorageFacts(**new_kwargs)
        )
        session.commit()
        assert replaced.id == existing.id
    with db_session_factory() as session:
        current = get_instance(session, str(old.SOPInstanceUID))
        assert current is not None
        assert current.blob_key == "blobs/new"
        assert current.sop_class_uid == MRImageStorage
        assert current.instance_number == 5
        series = session.get(Series, current.series_fk)
        assert series is not None
        assert series.series_instance_uid == new.SeriesInstanceUID
        assert series.modality == "MR"
        superseded = session.scalars(select(SupersededInstance)).all()
        assert len(superseded) == 1
        sup = superseded[0]
        assert sup.sop_instance_uid == old.SOPInstanceUID
        assert sup.blob_key == old_kwargs["blob_key"]
        assert sup.original_sha256 == old_kwargs["original_sha256"]
        assert sup.stored_size == old_kwargs["stored_size"]
        assert sup.codec_id == "zstd-1"
        assert sup.series_instance_uid == old.SeriesInstanceUID
        assert sup.superseded_at.tzinfo is not None
        assert _count(session, Instance) == 1


def test_replace_instance_rejects_other_uid(db_session_factory: sessionmaker[Session]) -> None:
    ds = make_ds()
    with db_session_factory() as session:
        inst = store(session, ds)
        with pytest.raises(ValueError, match="cannot replace"):
            replace_instance(
                session,
                inst,
                attributes_from_dataset(make_ds()),
                StorageFacts(**storage_kwargs(ds)),
            )


def test_add_instance_direct_call(db_session_factory: sessionmaker[Session]) -> None:
    ds = make_ds()
    with db_session_factory() as session:
        inst = add_instance(
            session, attributes_from_dataset(ds), StorageFacts(**storage_kwargs(ds))
        )
        session.rollback()
        assert get_instance(session, str(ds.SOPInstanceUID)) is None
        assert inst.sop_instance_uid == ds.SOPInstanceUID


def _process_worker(url: str, study_uid: str, series_uid: str, n: int, start: Any) -> None:
    """One 'association' in its own process (multiprocessing spawn target)."""
    from medzip_scp.index.db import create_engine_for, session_factory

    engine = create_engine_for(url)
    try:
        factory = session_factory(engine)
        start.wait(60)
        for i in range(5):
            with factory() as session:
                store(
                    session,
                    make_ds(
                        StudyInstanceUID=study_uid,
                        SeriesInstanceUID=series_uid,
                        InstanceNumber=n * 100 + i,
                    ),
                )
                session.commit()
    finally:
        engine.dispose()


@pytest.mark.slow
def test_concurrent_add_from_processes(db_url: str, db_engine: Any) -> None:
    ctx = multiprocessing.get_context("spawn")
    study_uid, series_uid = generate_uid(prefix=UID_ROOT), generate_uid(prefix=UID_ROOT)
    start = ctx.Event()
    procs = [
        ctx.Process(target=_process_worker, args=(db_url, study_uid, series_uid, n, start))
        for n in range(4)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with sessionmaker(bind=db_engine)() as session:
        assert _count(session, Study) == 1
        assert _count(session, Series) == 1
        assert _count(session, Instance) == 20


def _find(session: Session, level: str, **keys: Any) -> list[pydicom.Dataset]:
    ident = pydicom.Dataset()
    ident.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ident, keyword, value)
    return list(find(session, "STUDY" if level != "PATIENT" else "PATIENT", ident))


def test_emptied_entities_are_not_reported(db_session_factory: sessionmaker[Session]) -> None:
    first = make_ds(PatientID="OLD-PID")
    moved = make_ds(
        SOPInstanceUID=first.SOPInstanceUID,
        StudyInstanceUID=first.StudyInstanceUID,
        SeriesInstanceUID=generate_uid(prefix=UID_ROOT),
        PatientID="OLD-PID",
    )
    with db_session_factory() as session:
        store(session, first)
        session.commit()
        existing = get_instance(session, str(first.SOPInstanceUID))
        assert existing is not None
        replace_instance(
            session, existing, attributes_from_dataset(moved), StorageFacts(**storage_kwargs(moved))
        )
        session.commit()
        res = _find(session, "SERIES", StudyInstanceUID=first.StudyInstanceUID)
        assert [r.SeriesInstanceUID for r in res] == [moved.SeriesInstanceUID]
        # The newest instance of a study names another patient: the study follows it.
        store(session, make_ds(StudyInstanceUID=first.StudyInstanceUID,
                               SeriesInstanceUID=moved.SeriesInstanceUID,
                               PatientID="NEW-PID"))  # fmt: skip
        session.commit()
        res = _find(session, "PATIENT", PatientID="")
        assert [r.PatientID for r in res] == ["NEW-PID"]
        (study,) = _find(session, "STUDY", StudyInstanceUID="", PatientID="",
                         NumberOfStudyRelatedInstances="")  # fmt: skip
        assert study.PatientID == "NEW-PID"
        assert study.NumberOfStudyRelatedInstances == 2


def test_parameters_hidden_from_errors(db_session_factory: sessionmaker[Session]) -> None:
    with db_session_factory() as session:
        session.add(Patient(patient_id="SECRET-PID", patient_name="Secret^Name"))
        session.add(Patient(patient_id="SECRET-PID", patient_name="Secret^Name"))
        with pytest.raises(IntegrityError) as info:
            session.flush()
    # Bound parameters (here the patient's name) are never rendered. (PostgreSQL's
    # own DETAIL may still echo the violated key; the ingest code avoids unique
    # violations on PHI columns with ON CONFLICT DO NOTHING.)
    assert "Secret^Name" not in str(info.value)
    assert "hide_parameters" in str(info.value)
