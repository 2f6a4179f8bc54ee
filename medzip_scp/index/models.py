"""SQLAlchemy models of the DICOM index: patient / study / series / instance.

The hierarchy follows the DICOM information model used by Query/Retrieve
(PS3.4 Annex C.6.1 Patient Root and C.6.2 Study Root). Text attributes are stored
decoded (``str``) and never ``NULL``: an absent or empty DICOM value is stored as
``""`` so that unique constraints (``NULL`` is distinct from ``NULL`` in SQL) and
matching (PS3.4 C.2.2.2: empty values match only universal matching) behave.
Numeric attributes (IS/US) are ``NULL`` when absent.

The schema is created by Alembic (``alembic upgrade head``); never call
``Base.metadata.create_all`` outside tests of the migrations.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Base",
    "Instance",
    "InstanceState",
    "Patient",
    "Series",
    "SeriesReference",
    "Study",
    "SupersededInstance",
    "UTCDateTime",
    "VerificationRun",
    "utcnow",
]

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Return the current time as an aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always returned timezone-aware (UTC).

    PostgreSQL stores ``timestamp with time zone``; SQLite has no time zone
    support, so the value is stored as naive UTC and tagged UTC when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC timestamp column")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class InstanceState(enum.StrEnum):
    """Lifecycle state of a stored instance.

    ``STORED``: blob written and index row committed (C-STORE acknowledged), as received.
    ``COMPRESSED``: the original was replaced by a codec blob that decoded bit-exact.
    ``COMPRESS_FAILED``: the codec could not reproduce the original; the original is kept.
    ``VERIFIED``: blob re-read and its checksum confirmed.
    ``CORRUPT``: a verification failed; the instance must not be served.

    Stored as a plain string (no native enum, no CHECK), so adding a state needs no migration.
    """

    STORED = "stored"
    COMPRESSED = "compressed"
    COMPRESS_FAILED = "compress_failed"
    VERIFIED = "verified"
    CORRUPT = "corrupt"


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable for Alembic)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _text(**kw: Any) -> Any:
    """A non-null text column defaulting to ``""`` (absent DICOM value)."""
    return mapped_column(String, nullable=False, default="", server_default="", **kw)


class Patient(Base):
    """A patient, identified by Patient ID (0010,0020) and its issuer (0010,0021).

    Patient ID is type 2 and may be empty. An empty one links a study to no other, so
    each study without a Patient ID has a patient of its own, keyed by its Study Instance
    UID in ``sole_study_uid`` (``""`` for patients keyed by their Patient ID).

    The descriptive attributes are those first received for the patient; later instances
    fill empty ones but never overwrite a value: a differing name or birth date from
    another source would otherwise rename the patient of every study. Each study keeps the
    patient attributes its own instances gave (:class:`Study`).
    """

    __tablename__ = "patient"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id", "sole_study_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = _text()
    issuer_of_patient_id: Mapped[str] = _text()
    sole_study_uid: Mapped[str] = _text()
    patient_name: Mapped[str] = _text(index=True)
    patient_birth_date: Mapped[str] = _text(index=True)
    patient_sex: Mapped[str] = _text()
    specific_character_set: Mapped[str] = _text()

    studies: Mapped[list[Study]] = relationship(back_populates="patient", lazy="raise")


class Study(Base):
    """A study, identified by Study Instance UID (0020,000D).

    ``patient_name``, ``patient_birth_date`` and ``patient_sex`` are the patient
    attributes as this study's instances gave them (the newest non-empty value, like the
    study's own attributes): study-level answers carry them, so a study is never answered
    with the name another study gave its patient.
    """

    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    patient_fk: Mapped[int] = mapped_column(
        ForeignKey("patient.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    patient_name: Mapped[str] = _text(index=True)
    patient_birth_date: Mapped[str] = _text(index=True)
    patient_sex: Mapped[str] = _text()
    study_date: Mapped[str] = _text(index=True)
    study_time: Mapped[str] = _text()
    accession_number: Mapped[str] = _text(index=True)
    study_id: Mapped[str] = _text()
    study_description: Mapped[str] = _text()
    referring_physician_name: Mapped[str] = _text()
    specific_character_set: Mapped[str] = _text()

    patient: Mapped[Patient] = relationship(back_populates="studies", lazy="raise")
    series: Mapped[list[Series]] = relationship(back_populates="study", lazy="raise")


class Series(Base):
    """A series, identified by Series Instance UID (0020,000E)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    study_fk: Mapped[int] = mapped_column(
        ForeignKey("study.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    modality: Mapped[str] = _text(index=True)
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str] = _text()
    series_date: Mapped[str] = _text()
    series_time: Mapped[str] = _text()
    body_part_examined: Mapped[str] = _text()
    specific_character_set: Mapped[str] = _text()

    study: Mapped[Study] = relationship(back_populates="series", lazy="raise")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", lazy="raise")


class Instance(Base):
    """A composite SOP instance and where its (compressed) blob lives."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String, nullable=False, index=True)
    series_fk: Mapped[int] = mapped_column(
        ForeignKey("series.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    instance_number: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(String, nullable=False)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    specific_character_set: Mapped[str] = _text()
    blob_key: Mapped[str] = mapped_column(String, nullable=False)
    original_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    original_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    stored_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    stored_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    codec_id: Mapped[str] = mapped_column(String, nullable=False)
    state: Mapped[InstanceState] = mapped_column(
        Enum(
            InstanceState,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
            validate_strings=True,
        ),
        nullable=False,
        default=InstanceState.STORED,
    )
    calling_ae_title: Mapped[str] = _text()
    received_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime, nullable=False, default=utcnow, index=True
    )

    series: Mapped[Series] = relationship(back_populates="instances", lazy="raise")


class SeriesReference(Base):
    """The data set reference new blobs of a series are coded against
    (:mod:`medzip_scp.storage.references`): at most one per series, made when a series of
    two or more is first compressed (a small series may use its study's instead: see
    ``Archive.series_reference``). Only encoding reads this table: every blob names its
    reference by sha256 and decodes without the index, so a lost row costs a new reference
    for the series, never a blob."""

    __tablename__ = "series_reference"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class SupersededInstance(Base):
    """A previous version of an instance, kept when a differing duplicate replaced it.

    Rows are never deleted automatically and carry no foreign key, so they survive
    the deletion of the current instance; ``blob_key`` keeps the old blob reachable.
    """

    __tablename__ = "superseded_instance"
    __table_args__ = (Index(None, "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String, nullable=False)
    sop_class_uid: Mapped[str] = mapped_column(String, nullable=False)
    series_instance_uid: Mapped[str] = mapped_column(String, nullable=False)
    study_instance_uid: Mapped[str] = mapped_column(String, nullable=False)
    transfer_syntax_uid: Mapped[str] = mapped_column(String, nullable=False)
    blob_key: Mapped[str] = mapped_column(String, nullable=False)
    original_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    original_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    stored_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    stored_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    codec_id: Mapped[str] = mapped_column(String, nullable=False)
    calling_ae_title: Mapped[str] = _text()
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    superseded_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)


class VerificationRun(Base):
    """One verification pass (``medzip verify`` or the node's sweep): counts only, never a
    UID or a value; the newest is what ``medzip status`` reports as the last check."""

    __tablename__ = "verification_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # "verify" or "sweep"
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False)
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, nullable=False, default=utcnow)
    checked: Mapped[int] = mapped_column(Integer, nullable=False)
    not_ok: Mapped[int] = mapped_column(Integer, nullable=False)
    interrupted: Mapped[bool] = mapped_column(Boolean, nullable=False)
