"""KnownSeries: the C-STORE fast path that skips patient/study/series look-ups."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from index_helpers import make_ds, storage_kwargs
from pydicom.uid import generate_uid
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp.index.ingest import (
    KnownSeries,
    StorageFacts,
    add_instance,
    add_instances_of_known_series,
    attributes_from_dataset,
)
from medzip_scp.index.models import Instance, Patient, Series, Study


@contextmanager
def _statements(session: Session) -> Iterator[list[str]]:
    seen: list[str] = []
    engine = session.get_bind()

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        seen.append(statement.split()[0].upper())

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _add(session: Session, ds, known: KnownSeries) -> Instance:  # noqa: ANN001
    return add_instance(
        session, attributes_from_dataset(ds), StorageFacts(**storage_kwargs(ds)), known_series=known
    )


def _add_committed(sessions: sessionmaker[Session], ds, known: KnownSeries) -> None:  # noqa: ANN001
    """Index ``ds`` in a transaction of its own, committed, and tell ``known`` so."""
    with sessions() as session:
        _add(session, ds, known)
        session.commit()
    known.committed()


def test_committed_series_skips_the_lookups(db_session_factory: sessionmaker[Session]) -> None:
    known = KnownSeries()
    first = make_ds()
    same_series = {
        "StudyInstanceUID": first.StudyInstanceUID,
        "SeriesInstanceUID": first.SeriesInstanceUID,
    }
    with db_session_factory() as session:
        with _statements(session) as slow:
            _add(session, first, known)
        session.commit()
    known.committed()
    with db_session_factory() as session:
        with _statements(session) as fast:
            second = _add(session, make_ds(**same_series), known)
            series_fk = second.series_fk
        session.commit()
    assert fast.count("SELECT") < slow.count("SELECT")
    with db_session_factory() as session:
        series = session.scalars(select(Series)).one()
        assert series_fk == series.id
        fks = session.scalars(select(Instance.series_fk)).all()
        assert fks == [series.id, series.id]


def test_changed_values_take_the_slow_path(db_session_factory: sessionmaker[Session]) -> None:
    known = KnownSeries()
    first = make_ds(StudyDescription="HEAD")
    _add_committed(db_session_factory, first, known)
    newer = make_ds(
        StudyInstanceUID=first.StudyInstanceUID,
        SeriesInstanceUID=first.SeriesInstanceUID,
        StudyDescription="HEAD WITH CONTRAST",
    )
    _add_committed(db_session_factory, newer, known)
    with db_session_factory() as session:
        assert session.scalars(select(Study.study_description)).one() == "HEAD WITH CONTRAST"


def test_rolled_back_series_is_not_trusted(db_session_factory: sessionmaker[Session]) -> None:
    """A series row created in a transaction that rolled back must be created again."""
    known = KnownSeries()
    lost = make_ds()
    with db_session_factory() as session:
        _add(session, lost, known)
        session.rollback()
    known.rolled_back()
    known.committed()  # nothing pending any more: promotes nothing
    again = make_ds(
        StudyInstanceUID=lost.StudyInstanceUID,
        SeriesInstanceUID=lost.SeriesInstanceUID,
        SOPInstanceUID=generate_uid(),
    )
    with db_session_factory() as session:
        instance = _add(session, again, known)
        session.commit()
        series = session.get(Series, instance.series_fk)
        assert series is not None
        assert series.series_instance_uid == str(lost.SeriesInstanceUID)


def test_newest_instance_still_wins_for_a_shared_study(
    db_session_factory: sessionmaker[Session],
) -> None:
    """Series S2 moves the shared study to another patient; the next instance of the cached
    series S1 names the first patient again, and, being newest, moves the study back."""
    known = KnownSeries()
    first = make_ds(PatientID="P1")
    study = {"StudyInstanceUID": first.StudyInstanceUID}
    s1_again = {**study, "SeriesInstanceUID": first.SeriesInstanceUID, "PatientID": "P1"}
    for ds in (first, make_ds(**study, PatientID="P2"), make_ds(**s1_again)):
        _add_committed(db_session_factory, ds, known)
    with db_session_factory() as session:
        owner = session.scalars(
            select(Patient.patient_id).join(Study, Study.patient_fk == Patient.id)
        ).one()
    assert owner == "P1"


def test_one_insert_indexes_the_new_instances_of_known_series(
    db_session_factory: sessionmaker[Session],
) -> None:
    known = KnownSeries()
    first = make_ds()
    _add_committed(db_session_factory, first, known)
    same_series = {
        "StudyInstanceUID": first.StudyInstanceUID,
        "SeriesInstanceUID": first.SeriesInstanceUID,
    }
    new_a, new_b = make_ds(**same_series), make_ds(**same_series)
    unknown_series = make_ds()
    batch = [new_a, first, new_b, unknown_series, new_a]
    with db_session_factory() as session:
        with _statements(session) as statements:
            indexed = add_instances_of_known_series(
                session,
                [(attributes_from_dataset(ds), StorageFacts(**storage_kwargs(ds))) for ds in batch],
                known,
            )
        session.commit()
    # already indexed, of a series this process has not committed, a second copy in the
    # batch: each is left to the caller
    assert indexed == [True, False, True, False, False]
    assert "SELECT" not in statements
    with db_session_factory() as session:
        uids = set(session.scalars(select(Instance.sop_instance_uid)))
    assert uids == {first.SOPInstanceUID, new_a.SOPInstanceUID, new_b.SOPInstanceUID}
    # after an instance the fast path cannot take, none: the caller indexes the rest in
    # arrival order, so that a later instance's values win over an earlier one's
    after_unknown = [make_ds(), make_ds(**same_series)]
    with db_session_factory() as session:
        indexed = add_instances_of_known_series(
            session,
            [
                (attributes_from_dataset(ds), StorageFacts(**storage_kwargs(ds)))
                for ds in after_unknown
            ],
            known,
        )
    assert indexed == [False, False]
    known.clear()
    assert known.lookup(attributes_from_dataset(make_ds(**same_series))) is None
