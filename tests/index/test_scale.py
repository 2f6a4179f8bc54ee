"""The query layer at 100k instances: counts in SQL, responses streamed."""

from __future__ import annotations

import datetime as dt
import time
import tracemalloc
from itertools import islice

import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp.index.models import Instance, InstanceState, Patient, Series, Study
from medzip_scp.index.query import find, find_instances

STUDIES, SERIES_PER_STUDY, INSTANCES_PER_SERIES = 10, 10, 1000
ROOT = "1.2.826.0.1.3680043.10.1234.9"


def _populate(session: Session) -> None:
    patient_id = session.scalar(
        insert(Patient).values(patient_id="SCALE", patient_name="Scale^Test").returning(Patient.id)
    )
    now = dt.datetime.now(dt.UTC)
    for st in range(STUDIES):
        study_id = session.scalar(
            insert(Study)
            .values(study_instance_uid=f"{ROOT}.{st}", patient_fk=patient_id, study_date="20240101")
            .returning(Study.id)
        )
        for se in range(SERIES_PER_STUDY):
            series_id = session.scalar(
                insert(Series)
                .values(
                    series_instance_uid=f"{ROOT}.{st}.{se}",
                    study_fk=study_id,
                    modality="CT" if se % 2 else "MR",
                    series_number=se,
                )
                .returning(Series.id)
            )
            session.execute(
                insert(Instance),
                [
                    {
                        "sop_instance_uid": f"{ROOT}.{st}.{se}.{n}",
                        "sop_class_uid": CTImageStorage,
                        "series_fk": series_id,
                        "instance_number": n,
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "blob_key": f"k{st}.{se}.{n}",
                        "original_size": 1,
                        "original_sha256": "0" * 64,
                        "stored_size": 1,
                        "stored_sha256": "0" * 64,
                        "codec_id": "x",
                        "state": InstanceState.STORED,
                        "received_at": now,
                    }
                    for n in range(INSTANCES_PER_SERIES)
                ],
            )
    session.commit()


@pytest.mark.slow
def test_100k_instances(db_session_factory: sessionmaker[Session]) -> None:
    with db_session_factory() as session:
        _populate(session)

    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = ""
    ident.ModalitiesInStudy = "CT"
    ident.NumberOfStudyRelatedSeries = None
    ident.NumberOfStudyRelatedInstances = None
    with db_session_factory() as session:
        started = time.perf_counter()
        res = list(find(session, "STUDY", ident))
        elapsed = time.perf_counter() - started
    assert len(res) == STUDIES
    assert {r.NumberOfStudyRelatedInstances for r in res} == {
        SERIES_PER_STUDY * INSTANCES_PER_SERIES
    }
    assert {r.NumberOfStudyRelatedSeries for r in res} == {SERIES_PER_STUDY}
    assert list(res[0].ModalitiesInStudy) == ["CT", "MR"]
    assert elapsed < 20, elapsed

    # 100k IMAGE responses are streamed: the first few arrive without materialising all.
    ident = Dataset()
    ident.QueryRetrieveLevel = "IMAGE"
    ident.StudyInstanceUID = [f"{ROOT}.{st}" for st in range(STUDIES)]
    ident.SeriesInstanceUID = [
        f"{ROOT}.{st}.{se}" for st in range(STUDIES) for se in range(SERIES_PER_STUDY)
    ]
    ident.SOPInstanceUID = ""
    ident.InstanceNumber = None
    with db_session_factory() as session:
        tracemalloc.start()
        try:
            first = list(islice(find(session, "STUDY", ident), 10))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(first) == 10
    assert peak < 4 * 1024 * 1024, peak  # materialising 100k rows takes > 20 MB

    retrieve = Dataset()
    retrieve.QueryRetrieveLevel = "STUDY"
    retrieve.StudyInstanceUID = f"{ROOT}.3"
    with db_session_factory() as session:
        instances = find_instances(session, "STUDY", retrieve)
        assert len(instances) == SERIES_PER_STUDY * INSTANCES_PER_SERIES
        assert [i.instance_number for i in instances[:3]] == [0, 1, 2]
        assert session.scalar(select(Series.series_number).where(
            Series.id == instances[-1].series_fk)) == SERIES_PER_STUDY - 1  # fmt: skip
