"""The data set references recorded for series (the blobs of a series are coded against
one; :mod:`medzip_scp.storage.references` keeps their files)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from medzip_scp.index.models import Instance, Series, SeriesReference

__all__ = ["SeriesReferences", "record_reference", "recorded_reference", "series_references"]


def recorded_reference(session: Session, series_uid: str) -> str | None:
    """The sha256 (hex) of the data set reference recorded for a series, or None."""
    return session.scalar(
        select(SeriesReference.sha256).where(SeriesReference.series_instance_uid == series_uid)
    )


@dataclass(frozen=True)
class SeriesReferences:
    """What the index says of the references a series' blobs may be coded against."""

    series_instance_uid: str
    recorded: str | None  # the sha256 (hex) of the series' own, if any
    # Only looked up when the series has none of its own (else 0 and None):
    members: int  # instances of the series
    study: str | None  # the sha256 (hex) of the study's first recorded reference


def series_references(session: Session, series_fk: int) -> SeriesReferences | None:
    """The references of the series with row id ``series_fk``; None when there is no such
    series (its instance was replaced or removed meanwhile)."""
    series = session.get(Series, series_fk)
    if series is None:
        return None
    series_uid = series.series_instance_uid
    sha256 = recorded_reference(session, series_uid)
    if sha256 is not None:
        return SeriesReferences(series_uid, sha256, 0, None)
    count = select(func.count(Instance.id)).where(Instance.series_fk == series.id)
    study_sha256 = session.scalar(
        select(SeriesReference.sha256)
        .join(Series, Series.series_instance_uid == SeriesReference.series_instance_uid)
        .where(Series.study_fk == series.study_fk)
        .order_by(SeriesReference.id)
        .limit(1)
    )
    return SeriesReferences(series_uid, None, session.scalar(count) or 0, study_sha256)


def record_reference(session: Session, series_uid: str, sha256: str, size: int) -> None:
    """Record a series' reference; the caller commits, and an IntegrityError on commit
    means another process recorded one first."""
    session.add(SeriesReference(series_instance_uid=series_uid, sha256=sha256, size=size))
