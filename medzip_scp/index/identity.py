"""Does the index say what an instance's sealed identity says? (``medzip verify``, retrieval)"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from medzip_scp.index.ingest import InstanceAttributes
from medzip_scp.index.models import Instance, Patient, Series, Study

__all__ = [
    "InstanceFilter",
    "identity_differences",
    "index_identity_mismatch",
    "instances_by_id",
    "select_instances",
    "study_instances",
]

# (keyword, index column, InstanceAttributes field): what identifies whose image this is
_COMPARED = (
    ("StudyInstanceUID", Study.study_instance_uid, "study_instance_uid"),
    ("SeriesInstanceUID", Series.series_instance_uid, "series_instance_uid"),
    ("SOPClassUID", Instance.sop_class_uid, "sop_class_uid"),
    ("PatientID", Patient.patient_id, "patient_id"),
    ("IssuerOfPatientID", Patient.issuer_of_patient_id, "issuer_of_patient_id"),
    ("PatientName", Study.patient_name, "patient_name"),
    ("PatientBirthDate", Study.patient_birth_date, "patient_birth_date"),
    ("PatientSex", Study.patient_sex, "patient_sex"),
    ("AccessionNumber", Study.accession_number, "accession_number"),
    ("StudyDate", Study.study_date, "study_date"),
)


def identity_differences(
    session: Session,
    instance_id: int,
    sealed: InstanceAttributes,
    study_sealed: Iterable[InstanceAttributes] = (),
) -> list[str]:
    """Keywords (never values) where the index row of an instance, its series, study and
    patient differ from the attributes of its sealed data set.

    Study and patient rows follow the newest instance of a study (its non-empty values; a
    study or series moves where its newest instance says), so a value that another instance
    of the same study gave (``study_sealed``: what each of them holds) is no difference,
    unless the instance is filed in a series that is not its own (or in a study no
    instance of its series names): then every attribute is compared strictly. An
    attribute the sealed data set leaves empty is not compared.
    """
    row = session.execute(
        select(*(column for _, column, _ in _COMPARED))
        .select_from(Instance)
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
        .join(Patient, Study.patient_fk == Patient.id)
        .where(Instance.id == instance_id)
    ).one_or_none()
    if row is None:
        return ["index row"]
    indexed = dict(zip((field for _, _, field in _COMPARED), row, strict=True))
    # Where the instance is filed: its series row never changes UID, and its series moves
    # to another study only as another instance of the same series says.
    same_series = [
        other for other in study_sealed if other.series_instance_uid == sealed.series_instance_uid
    ]
    misfiled = sealed.series_instance_uid != indexed["series_instance_uid"] or (
        sealed.study_instance_uid != indexed["study_instance_uid"]
        and all(o.study_instance_uid != indexed["study_instance_uid"] for o in same_series)
    )
    # A misfiled instance is compared strictly; otherwise what another instance of its
    # study gave is no difference.
    others = [] if misfiled else list(study_sealed)
    differing = []
    for keyword, _, field in _COMPARED:
        value = getattr(sealed, field)
        if not value or value == indexed[field]:
            continue
        if field == "series_instance_uid" or not any(
            getattr(other, field) == indexed[field]
            for other in (same_series if field == "study_instance_uid" else others)
        ):
            differing.append(keyword)
    return differing


def index_identity_mismatch(
    session: Session,
    instance_id: int,
    sealed: InstanceAttributes,
    study_sealed: Iterable[InstanceAttributes] = (),
) -> str | None:
    """What ``medzip verify`` and retrieval say when :func:`identity_differences` finds
    some (the keywords, never a value); None when there are none."""
    differing = identity_differences(session, instance_id, sealed, study_sealed)
    if not differing:
        return None
    return f"index row differs from the sealed identity ({', '.join(differing)})"


def study_instances(session: Session, instance_ids: Iterable[int]) -> dict[int, list[int]]:
    """The ids of every instance of each study these instances belong to, by study id."""
    study_of = (
        select(Series.study_fk)
        .join(Instance, Instance.series_fk == Series.id)
        .where(Instance.id.in_(list(instance_ids)))
    )
    rows = session.execute(
        select(Series.study_fk, Instance.id)
        .join(Instance, Instance.series_fk == Series.id)
        .where(Series.study_fk.in_(study_of))
        .order_by(Series.study_fk, Instance.id)
    )
    out: dict[int, list[int]] = {}
    for study_id, instance_id in rows:
        out.setdefault(study_id, []).append(instance_id)
    return out


def instances_by_id(session: Session, instance_ids: Iterable[int]) -> list[Instance]:
    """The rows of these instances (those that still exist), by id."""
    rows = session.scalars(select(Instance).where(Instance.id.in_(list(instance_ids))))
    return sorted(rows, key=lambda row: row.id)


@dataclass(frozen=True)
class InstanceFilter:
    """Which instances to check (all of them when every field is empty)."""

    sop_instance_uids: tuple[str, ...] = ()
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    since: dt.datetime | None = None  # received at or after


def select_instances(session: Session, which: InstanceFilter) -> list[Instance]:
    """The rows of the instances ``which`` selects, by id."""
    query = select(Instance).order_by(Instance.id)
    if which.sop_instance_uids:
        query = query.where(Instance.sop_instance_uid.in_(which.sop_instance_uids))
    if which.study_instance_uid or which.series_instance_uid:
        query = query.join(Series, Instance.series_fk == Series.id)
        if which.series_instance_uid:
            query = query.where(Series.series_instance_uid == which.series_instance_uid)
        if which.study_instance_uid:
            query = query.join(Study, Series.study_fk == Study.id).where(
                Study.study_instance_uid == which.study_instance_uid
            )
    if which.since is not None:
        query = query.where(Instance.received_at >= which.since)
    return list(session.scalars(query))
