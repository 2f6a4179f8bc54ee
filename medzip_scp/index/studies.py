"""Studies as an admin manages them (``medzip studies``): summaries, one study's series, and
deleting a study's rows (the archive then deletes its blobs)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from medzip_scp.index.models import (
    Instance,
    Patient,
    Series,
    SeriesReference,
    Study,
    SupersededInstance,
)

__all__ = [
    "DeletedStudy",
    "SeriesSummary",
    "StudySummary",
    "delete_study_rows",
    "named_keys",
    "series_of",
    "study_summaries",
]


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    study_date: str
    study_description: str
    patient_id: str
    patient_name: str
    modalities: str  # the series' modalities, "CT\\SR"
    series: int
    instances: int
    original_bytes: int
    stored_bytes: int


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    series_number: int | None
    modality: str
    series_description: str
    instances: int
    original_bytes: int
    stored_bytes: int


def study_summaries(
    session: Session, study_instance_uid: str | None = None, limit: int | None = None
) -> list[StudySummary]:
    """Every study (or the one named), newest study date first; a study whose series moved
    to another study (or that has none left) is listed too, with zero counts."""
    chosen = select(Study.id).order_by(Study.study_date.desc(), Study.study_instance_uid)
    if study_instance_uid is not None:
        chosen = chosen.where(Study.study_instance_uid == study_instance_uid)
    if limit is not None:
        chosen = chosen.limit(limit)
    ids = chosen.subquery()
    per_series = (
        select(
            Series.id.label("series_id"),
            Series.study_fk.label("study_fk"),
            func.count(Instance.id).label("instances"),
            func.coalesce(func.sum(Instance.original_size), 0).label("original"),
            func.coalesce(func.sum(Instance.stored_size), 0).label("stored"),
        )
        .outerjoin(Instance, Instance.series_fk == Series.id)
        .where(Series.study_fk.in_(select(ids.c.id)))
        .group_by(Series.id)
        .subquery()
    )
    rows = session.execute(
        select(
            Study.study_instance_uid,
            Study.study_date,
            Study.study_description,
            Patient.patient_id,
            Study.patient_name,
            func.count(per_series.c.series_id),
            func.coalesce(func.sum(per_series.c.instances), 0),
            func.coalesce(func.sum(per_series.c.original), 0),
            func.coalesce(func.sum(per_series.c.stored), 0),
            Study.id,
        )
        .join(ids, ids.c.id == Study.id)
        .join(Patient, Study.patient_fk == Patient.id)
        .outerjoin(per_series, per_series.c.study_fk == Study.id)
        .group_by(Study.id, Patient.id)
        .order_by(Study.study_date.desc(), Study.study_instance_uid)
    ).all()
    modalities: dict[int, set[str]] = {}
    found = session.execute(
        select(Series.study_fk, Series.modality)
        .where(Series.study_fk.in_(select(ids.c.id)))
        .distinct()
    )
    for study_id, modality in found:
        modalities.setdefault(study_id, set()).add(modality)
    return [
        StudySummary(
            uid,
            date,
            description,
            patient_id,
            name,
            "\\".join(sorted(m for m in modalities.get(study_id, ()) if m)),
            int(series),
            int(instances),
            int(original),
            int(stored),
        )
        for uid, date, description, patient_id, name, series, instances, original, stored, study_id in rows  # noqa: E501
    ]


def series_of(session: Session, study_instance_uid: str) -> list[SeriesSummary]:
    """The series of a study, by series number."""
    rows = session.execute(
        select(
            Series.series_instance_uid,
            Series.series_number,
            Series.modality,
            Series.series_description,
            func.count(Instance.id),
            func.coalesce(func.sum(Instance.original_size), 0),
            func.coalesce(func.sum(Instance.stored_size), 0),
        )
        .join(Study, Series.study_fk == Study.id)
        .join(Instance, Instance.series_fk == Series.id)
        .where(Study.study_instance_uid == study_instance_uid)
        .group_by(Series.id)
        .order_by(Series.series_number, Series.series_instance_uid)
    ).all()
    return [
        SeriesSummary(uid, number, modality, description, int(n), int(original), int(stored))
        for uid, number, modality, description, n, original, stored in rows
    ]


@dataclass(frozen=True)
class DeletedStudy:
    """What a study's deleted rows named: blobs (current and superseded versions), and the
    data set references (raw sha256) no remaining series records."""

    blob_keys: list[str]
    references: list[bytes]


def delete_study_rows(session: Session, study_instance_uid: str) -> DeletedStudy | None:
    """Delete a study's instances, superseded versions, series (and their reference rows),
    the study, and its patient when no other study has it (None: no such study). The
    caller commits, then deletes what :class:`DeletedStudy` names."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == study_instance_uid)
    ).one_or_none()
    if study is None:
        return None
    series_ids = list(session.scalars(select(Series.id).where(Series.study_fk == study.id)))
    series_uids = list(
        session.scalars(select(Series.series_instance_uid).where(Series.id.in_(series_ids)))
    )
    in_study = Instance.series_fk.in_(series_ids)
    keys = list(session.scalars(select(Instance.blob_key).where(in_study)))
    superseded = SupersededInstance.study_instance_uid == study_instance_uid
    keys += list(session.scalars(select(SupersededInstance.blob_key).where(superseded)))
    recorded = SeriesReference.series_instance_uid.in_(series_uids)
    shas = set(session.scalars(select(SeriesReference.sha256).where(recorded)))
    session.execute(delete(Instance).where(in_study))
    session.execute(delete(SupersededInstance).where(superseded))
    session.execute(delete(SeriesReference).where(recorded))
    session.execute(delete(Series).where(Series.id.in_(series_ids)))
    patient_id = study.patient_fk
    session.execute(delete(Study).where(Study.id == study.id))
    others = session.scalar(select(func.count(Study.id)).where(Study.patient_fk == patient_id))
    if not others:
        session.execute(delete(Patient).where(Patient.id == patient_id))
    still = set(
        session.scalars(select(SeriesReference.sha256).where(SeriesReference.sha256.in_(shas)))
    )
    return DeletedStudy(keys, [bytes.fromhex(sha) for sha in sorted(shas - still)])


def named_keys(session: Session, keys: list[str]) -> set[str]:
    """Which of ``keys`` an index row, current or superseded, names."""
    named: set[str] = set()
    for start in range(0, len(keys), 1000):  # bounded IN lists
        chunk = keys[start : start + 1000]
        for table in (Instance, SupersededInstance):
            named |= set(session.scalars(select(table.blob_key).where(table.blob_key.in_(chunk))))
    return named
