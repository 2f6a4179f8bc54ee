"""Indexing of received instances (the C-STORE side of the index).

:func:`attributes_from_dataset` extracts what the tables store from a pydicom
dataset; :func:`add_instance` and :func:`replace_instance` write it. The caller owns
the transaction: these functions flush but never commit, so the node acknowledges a
C-STORE only after its own ``session.commit()`` (PS3.4 Annex B: success means the
SCP has stored the instance).

Concurrency: several associations (threads or processes) may store instances of the
same new study at once. Patient, study and series rows are created with
``INSERT ... ON CONFLICT DO NOTHING`` followed by a ``SELECT``; on PostgreSQL
(READ COMMITTED) a conflicting insert waits for the other transaction and then sees
its committed row, on SQLite writers are serialised by ``BEGIN IMMEDIATE``. Rows are
always locked in the order patient, study, series, instance, so concurrent writers
cannot deadlock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from pydicom.multival import MultiValue
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from medzip_scp.index.errors import DuplicateInstanceError, MissingAttributeError
from medzip_scp.index.models import (
    Instance,
    InstanceState,
    Patient,
    Series,
    Study,
    SupersededInstance,
    utcnow,
)

__all__ = [
    "InstanceAttributes",
    "KnownSeries",
    "Rebuilt",
    "StorageFacts",
    "add_instance",
    "add_instances_of_known_series",
    "attributes_from_dataset",
    "get_instance",
    "index_found_version",
    "indexed_counts",
    "indexed_content",
    "normalise_da",
    "normalise_tm",
    "replace_instance",
]

logger = logging.getLogger(__name__)

_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class StorageFacts:
    """What the index records of an instance version's blob and its arrival, besides the
    attributes read from its data set."""

    transfer_syntax_uid: str
    blob_key: str
    original_size: int  # of the data set as received (after File Meta)
    original_sha256: str  # hex, of the same bytes
    stored_size: int  # of the blob
    stored_sha256: str  # hex, of the blob's plaintext
    codec_id: str  # the instance codec that wrote the blob
    calling_ae_title: str

    @classmethod
    def of(cls, row: Instance) -> StorageFacts:
        """The facts an index row records."""
        return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(cls)})

    def columns(self) -> dict[str, Any]:
        """The facts as column values of an instance row."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class InstanceAttributes:
    """Every attribute the index stores for one instance, as plain Python values.

    Text attributes are ``""`` when absent; integers are ``None`` when absent or not
    parseable. DA values are normalised to ``YYYYMMDD`` and TM values to
    ``HHMMSS.FFFFFF`` prefixes without ``:`` (ACR-NEMA forms are converted).
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    specific_character_set: str = ""
    # patient level
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    # study level
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    # series level
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    series_date: str = ""
    series_time: str = ""
    body_part_examined: str = ""
    # instance level
    instance_number: int | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int | None = None


def normalise_da(value: str) -> str:
    """Normalise a DA value to ``YYYYMMDD`` (drops ACR-NEMA ``YYYY.MM.DD`` dots)."""
    return value.strip().replace(".", "") if "." in value else value.strip()


def normalise_tm(value: str) -> str:
    """Normalise a TM value by dropping ACR-NEMA ``HH:MM:SS`` colons."""
    return value.strip().replace(":", "")


class AttributeSource(Protocol):
    """A data set's values by keyword, as pydicom gives them: a ``pydicom.Dataset`` or the
    node's quick reading of a received object (``dicom.part10.HeaderElements``)."""

    def get(self, keyword: str, default: Any = None) -> Any: ...


def _text(ds: AttributeSource, keyword: str) -> str:
    elem = ds.get(keyword)
    if elem is None:
        return ""
    value: Any = elem
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join("" if v is None else str(v) for v in value)
    return "" if value is None else str(value).strip()


def _int(ds: AttributeSource, keyword: str) -> int | None:
    value: Any = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        logger.warning("ignoring unparseable %s value", keyword)
        return None


def attributes_from_dataset(ds: AttributeSource) -> InstanceAttributes:
    """Extract the indexed attributes of a composite instance.

    Parameters
    ----------
    ds : AttributeSource
        The received dataset (its text is decoded with its Specific Character Set).

    Returns
    -------
    InstanceAttributes
        The values the index stores.

    Raises
    ------
    MissingAttributeError
        If SOPClassUID, SOPInstanceUID, StudyInstanceUID or SeriesInstanceUID is
        absent or empty (type 1 in every composite IOD, PS3.3). PatientID (type 2)
        may be empty.
    """
    uids: dict[str, str] = {}
    for keyword in _REQUIRED_UIDS:
        value = _text(ds, keyword)
        if not value:
            raise MissingAttributeError(keyword)
        uids[keyword] = value
    return InstanceAttributes(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        specific_character_set=_text(ds, "SpecificCharacterSet"),
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=normalise_da(_text(ds, "PatientBirthDate")),
        patient_sex=_text(ds, "PatientSex"),
        study_date=normalise_da(_text(ds, "StudyDate")),
        study_time=normalise_tm(_text(ds, "StudyTime")),
        accession_number=_text(ds, "AccessionNumber"),
        study_id=_text(ds, "StudyID"),
        study_description=_text(ds, "StudyDescription"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        series_date=normalise_da(_text(ds, "SeriesDate")),
        series_time=normalise_tm(_text(ds, "SeriesTime")),
        body_part_examined=_text(ds, "BodyPartExamined"),
        instance_number=_int(ds, "InstanceNumber"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=_int(ds, "NumberOfFrames"),
    )


def get_instance(
    session: Session, sop_instance_uid: str, for_update: bool = False
) -> Instance | None:
    """Return the indexed instance with this SOP Instance UID, or ``None``; with
    ``for_update``, its row locked (PostgreSQL; SQLite writers hold the database) and read
    afresh, so that what is read stays true until the transaction ends."""
    query = select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
    return session.scalars(query).one_or_none()


def indexed_content(
    session: Session, sop_instance_uids: Collection[str]
) -> dict[str, tuple[str, str]]:
    """``(original SHA-256, blob key)`` of those of these SOP Instance UIDs that are
    indexed: the duplicate check of a C-STORE, without loading ORM objects."""
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.original_sha256, Instance.blob_key).where(
            Instance.sop_instance_uid.in_(list(sop_instance_uids))
        )
    )
    return {uid: (sha256, blob_key) for uid, sha256, blob_key in rows}


def _dialect_insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT construct (it has ``on_conflict_do_nothing``)."""
    return _insert_of(session.get_bind().dialect.name, table)


def _insert_of(dialect: str, table: Any) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported dialect {dialect}")  # pragma: no cover - rejected earlier


def _insert_ignore(session: Session, table: Any, values: dict[str, Any]) -> None:
    """``INSERT ... ON CONFLICT DO NOTHING`` on either dialect."""
    session.execute(_dialect_insert(session, table).values(**values).on_conflict_do_nothing())


def _update_nonempty(obj: Any, values: dict[str, Any]) -> None:
    """Copy descriptive values onto ``obj``; empty/absent values do not erase."""
    for name, value in values.items():
        if value is None or value == "":
            continue
        if getattr(obj, name) != value:
            setattr(obj, name, value)


def _fill_empty(obj: Any, values: dict[str, Any]) -> None:
    """Copy values onto ``obj`` where it has none; a value it has is never overwritten."""
    for name, value in values.items():
        if value and not getattr(obj, name):
            setattr(obj, name, value)


#: The descriptive patient attributes, kept on the patient and on each study, with their
#: DICOM keywords (log messages name the keywords, never the values).
_PATIENT_KEYWORDS = {
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
}


def _patient_attributes(attrs: InstanceAttributes) -> dict[str, str]:
    return {name: getattr(attrs, name) for name in _PATIENT_KEYWORDS}


def _get_or_create_patient(session: Session, attrs: InstanceAttributes) -> Patient:
    # Without a Patient ID nothing links a study to another: each study has its own patient.
    sole_study_uid = "" if attrs.patient_id else attrs.study_instance_uid
    key = (
        (Patient.patient_id == attrs.patient_id)
        & (Patient.issuer_of_patient_id == attrs.issuer_of_patient_id)
        & (Patient.sole_study_uid == sole_study_uid)
    )
    patient = session.scalars(select(Patient).where(key)).one_or_none()
    descriptive = {
        **_patient_attributes(attrs),
        "specific_character_set": attrs.specific_character_set,
    }
    if patient is None:
        _insert_ignore(
            session,
            Patient.__table__,
            {
                "patient_id": attrs.patient_id,
                "issuer_of_patient_id": attrs.issuer_of_patient_id,
                "sole_study_uid": sole_study_uid,
                **descriptive,
            },
        )
        patient = session.scalars(select(Patient).where(key)).one()
    _fill_empty(patient, descriptive)
    return patient


def _get_or_create_study(session: Session, attrs: InstanceAttributes, patient: Patient) -> Study:
    key = Study.study_instance_uid == attrs.study_instance_uid
    study = session.scalars(select(Study).where(key)).one_or_none()
    descriptive = {
        **_patient_attributes(attrs),
        "study_date": attrs.study_date,
        "study_time": attrs.study_time,
        "accession_number": attrs.accession_number,
        "study_id": attrs.study_id,
        "study_description": attrs.study_description,
        "referring_physician_name": attrs.referring_physician_name,
        "specific_character_set": attrs.specific_character_set,
    }
    if study is None:
        _insert_ignore(
            session,
            Study.__table__,
            {
                "study_instance_uid": attrs.study_instance_uid,
                "patient_fk": patient.id,
                **descriptive,
            },
        )
        study = session.scalars(select(Study).where(key)).one()
    _update_nonempty(study, descriptive)
    if study.patient_fk != patient.id:
        # The newest instance names another patient for this study: follow it.
        logger.warning(
            "study %s moved from patient record %d to %d: instance %s gives another "
            "Patient ID or issuer than the study's earlier instances",
            attrs.study_instance_uid,
            study.patient_fk,
            patient.id,
            attrs.sop_instance_uid,
        )
        study.patient_fk = patient.id
    return study


def _warn_of_differing_patient_attributes(
    session: Session, attrs: InstanceAttributes, patient: Patient, study: Study
) -> None:
    """Log when this study's patient attributes differ from its patient's (first received)
    ones: two sources disagree about one Patient ID, or a study was corrected. UIDs, row
    ids, keywords and counts only: the values are PHI."""
    differing = [
        keyword
        for name, keyword in _PATIENT_KEYWORDS.items()
        if getattr(study, name) and getattr(patient, name) != getattr(study, name)
    ]
    if not differing:
        return
    session.flush()
    studies = session.execute(
        select(Study.patient_name, Study.patient_birth_date, Study.patient_sex).where(
            Study.patient_fk == patient.id
        )
    ).all()
    disagreeing = sum(
        1
        for row in studies
        if any(
            value and value != getattr(patient, name)
            for name, value in zip(_PATIENT_KEYWORDS, row, strict=True)
        )
    )
    logger.warning(
        "study %s (instance %s) gives %s differing from patient record %d: %d of its %d "
        "studies differ; study-level answers carry each study's own values, patient-level "
        "answers the first received",
        attrs.study_instance_uid,
        attrs.sop_instance_uid,
        ", ".join(differing),
        patient.id,
        disagreeing,
        len(studies),
    )


def _get_or_create_series(session: Session, attrs: InstanceAttributes, study: Study) -> Series:
    key = Series.series_instance_uid == attrs.series_instance_uid
    series = session.scalars(select(Series).where(key)).one_or_none()
    descriptive = {
        "modality": attrs.modality,
        "series_number": attrs.series_number,
        "series_description": attrs.series_description,
        "series_date": attrs.series_date,
        "series_time": attrs.series_time,
        "body_part_examined": attrs.body_part_examined,
        "specific_character_set": attrs.specific_character_set,
    }
    if series is None:
        _insert_ignore(
            session,
            Series.__table__,
            {"series_instance_uid": attrs.series_instance_uid, "study_fk": study.id, **descriptive},
        )
        series = session.scalars(select(Series).where(key)).one()
    _update_nonempty(series, descriptive)
    if series.study_fk != study.id:
        logger.info(
            "series %s moved to study %s", attrs.series_instance_uid, attrs.study_instance_uid
        )
        series.study_fk = study.id
    return series


_INSTANCE_LEVEL = frozenset(
    {"sop_class_uid", "sop_instance_uid", "instance_number", "rows", "columns", "number_of_frames"}
)
_HIERARCHY_FIELDS = tuple(
    f.name for f in dataclasses.fields(InstanceAttributes) if f.name not in _INSTANCE_LEVEL
)


def _hierarchy_values(attrs: InstanceAttributes) -> tuple[Any, ...]:
    """Everything :func:`_hierarchy` reads from an instance (patient, study, series level)."""
    return tuple(getattr(attrs, name) for name in _HIERARCHY_FIELDS)


_STUDY_AT = _HIERARCHY_FIELDS.index("study_instance_uid")


class KnownSeries:
    """Series rows this process has committed, with the patient/study/series values they
    were committed with (a C-STORE fast path).

    Instances of one series arrive one after another with identical patient, study and
    series attributes; for them :func:`_hierarchy` (three look-ups, three ORM loads) would
    find the rows and change nothing, so :func:`add_instance` skips it when the values
    equal those this process last committed for the series. Entries noted during a
    transaction count only after :meth:`committed`; call :meth:`rolled_back` when the
    transaction is rolled back. Not thread-safe: use it from the thread that commits.

    Another node process may change a shared study or patient meanwhile; this process then
    skips re-applying its own (unchanged) values for that series, as if its instance had
    arrived first. Each instance's own series is always the one it names.
    """

    MAX_ENTRIES = 4096

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, tuple[Any, ...]]] = {}
        self._pending: dict[str, tuple[int, tuple[Any, ...]]] = {}

    def lookup(self, attrs: InstanceAttributes) -> int | None:
        """The series row id, when committed by this process with these same values."""
        entry = self._known.get(attrs.series_instance_uid)
        if entry is None or entry[1] != _hierarchy_values(attrs):
            return None
        return entry[0]

    def note(self, attrs: InstanceAttributes, series_id: int) -> None:
        """Record a series the slow path wrote. That path may also have moved or updated
        the study, which other series share: forget those series, so that their next
        instance takes the slow path and, newest first, sets it again. (A patient row only
        ever gains values it lacked, whatever the order: no need to forget its series.)"""
        study = attrs.study_instance_uid
        for uid, (_id, values) in list(self._known.items()):
            if values[_STUDY_AT] == study:
                del self._known[uid]
        self._pending[attrs.series_instance_uid] = (series_id, _hierarchy_values(attrs))

    def committed(self) -> None:
        if len(self._known) + len(self._pending) > self.MAX_ENTRIES:
            self._known.clear()
        self._known.update(self._pending)
        self._pending.clear()

    def rolled_back(self) -> None:
        self._pending.clear()

    def clear(self) -> None:
        """Forget every series: their rows may have changed in ways this process did
        not see (the next instance of each takes the full path)."""
        self._known.clear()
        self._pending.clear()


def _hierarchy(session: Session, attrs: InstanceAttributes) -> Series:
    patient = _get_or_create_patient(session, attrs)
    study = _get_or_create_study(session, attrs, patient)
    _warn_of_differing_patient_attributes(session, attrs, patient, study)
    return _get_or_create_series(session, attrs, study)


def _instance_values(
    attrs: InstanceAttributes,
    facts: StorageFacts,
    received_at: dt.datetime | None = None,
    state: InstanceState = InstanceState.STORED,
) -> dict[str, Any]:
    return {
        "sop_class_uid": attrs.sop_class_uid,
        "instance_number": attrs.instance_number,
        "rows": attrs.rows,
        "columns": attrs.columns,
        "number_of_frames": attrs.number_of_frames,
        "specific_character_set": attrs.specific_character_set,
        **facts.columns(),
        "state": state,
        "calling_ae_title": facts.calling_ae_title.strip(),
        "received_at": utcnow() if received_at is None else received_at,
    }


def add_instance(
    session: Session,
    attrs: InstanceAttributes,
    facts: StorageFacts,
    *,
    received_at: dt.datetime | None = None,
    state: InstanceState = InstanceState.STORED,
    known_series: KnownSeries | None = None,
) -> Instance:
    """Index a newly stored instance; the caller commits.

    Patient, study and series rows are fetched or created. Study and series attributes
    (and the study's copy of the patient attributes) are updated from this (newest)
    instance, where it has a non-empty value; a patient's attributes are only filled
    where empty (see :class:`~medzip_scp.index.models.Patient`), and a study whose patient
    attributes differ from its patient's is logged as a warning. A study or series whose
    parent UID/key differs in the newest instance is moved under the new parent.

    Parameters
    ----------
    session : Session
        Session whose transaction the caller commits (or rolls back).
    attrs : InstanceAttributes
        From :func:`attributes_from_dataset`.
    facts : StorageFacts
        Of the blob written for this instance.
    received_at, state : optional
        When it was received (default: now) and its state (default: as received); given
        by ``medzip db rebuild``, which indexes what was received long ago.
    known_series : KnownSeries, optional
        Skip the patient/study/series look-ups for a series this process committed with
        the same values (the caller reports its commit or rollback to it).

    Returns
    -------
    Instance
        The new, flushed row.

    Raises
    ------
    DuplicateInstanceError
        If the SOP Instance UID is already indexed (possibly by a concurrent
        association). The session's transaction stays usable.
    """
    series_id = known_series.lookup(attrs) if known_series is not None else None
    if series_id is None:
        series_id = _hierarchy(session, attrs).id
        if known_series is not None:
            known_series.note(attrs, series_id)
    instance = Instance(
        sop_instance_uid=attrs.sop_instance_uid,
        series_fk=series_id,
        **_instance_values(attrs, facts, received_at, state),
    )
    session.flush()  # write hierarchy updates outside the savepoint below
    try:
        with session.begin_nested():
            session.add(instance)
    except IntegrityError as exc:
        if get_instance(session, attrs.sop_instance_uid) is not None:
            raise DuplicateInstanceError(attrs.sop_instance_uid) from None
        raise exc
    return instance


def add_instances_of_known_series(
    session: Session,
    new: list[tuple[InstanceAttributes, StorageFacts]],
    known_series: KnownSeries,
) -> list[bool]:
    """Index, in one statement, instances whose series this process committed with the
    same values and whose SOP Instance UID is not indexed yet; says for each whether it was
    indexed (the others need :func:`add_instance` or :func:`replace_instance`). The C-STORE
    fast path: no look-ups, ORM objects or savepoints, which cost the ORM path about 1 ms
    per instance.

    ``new`` pairs each instance's attributes with its storage facts, in arrival order.
    Only the leading run of instances of known series is considered: from the first other
    one on, the caller's path may change patient, study or series rows, and later instances
    must see that (the newest values win). A UID already indexed, by anyone, or twice in the
    run is left to the caller too (``ON CONFLICT DO NOTHING``).
    """
    rows: dict[str, tuple[int, dict[str, Any]]] = {}
    for position, (attrs, facts) in enumerate(new):
        series_id = known_series.lookup(attrs)
        if series_id is None:
            break
        if attrs.sop_instance_uid not in rows:
            rows[attrs.sop_instance_uid] = (
                position,
                {
                    "sop_instance_uid": attrs.sop_instance_uid,
                    "series_fk": series_id,
                    **_instance_values(attrs, facts),
                },
            )
    indexed = [False] * len(new)
    if rows:
        # In UID order: two processes inserting overlapping sets lock rows in one order.
        ordered = [rows[uid][1] for uid in sorted(rows)]
        # On the session's connection: the ORM's execute costs 0.2 ms more per statement.
        statement = _new_instances_statement(session.get_bind().dialect.name)
        inserted = session.connection().execute(statement, ordered)
        for uid in inserted.scalars():
            indexed[rows[uid][0]] = True
    return indexed


@functools.cache
def _new_instances_statement(dialect: str) -> Any:
    """``INSERT INTO instance ... ON CONFLICT DO NOTHING RETURNING sop_instance_uid``, built
    once per dialect (building it cost as much as running it)."""
    table = Instance.__table__
    uid = table.c.sop_instance_uid
    return _insert_of(dialect, table).on_conflict_do_nothing(index_elements=[uid]).returning(uid)


def replace_instance(
    session: Session,
    existing: Instance,
    attrs: InstanceAttributes,
    facts: StorageFacts,
    *,
    received_at: dt.datetime | None = None,
    state: InstanceState = InstanceState.STORED,
    known_series: KnownSeries | None = None,
) -> Instance:
    """Replace an indexed instance by a differing new version; the caller commits.

    The existing version is recorded in :class:`SupersededInstance` (its blob is
    kept), then the row is updated in place to the new version, moving it to another
    series (and study/patient) if the new dataset's UIDs differ.

    Parameters
    ----------
    session : Session
        Session whose transaction the caller commits.
    existing : Instance
        The current row, e.g. from :func:`get_instance`.
    attrs : InstanceAttributes
        Attributes of the new version; its SOP Instance UID must equal the existing one.
    facts : StorageFacts
        Of the new version's blob.
    received_at, state : optional
        As :func:`add_instance`.
    known_series : KnownSeries, optional
        Told the values the new version's series now has (it may have moved).

    Returns
    -------
    Instance
        ``existing``, updated and flushed.

    Raises
    ------
    ValueError
        If the SOP Instance UIDs differ.
    """
    if attrs.sop_instance_uid != existing.sop_instance_uid:
        raise ValueError(f"cannot replace {existing.sop_instance_uid} by {attrs.sop_instance_uid}")
    old_series, old_study = session.execute(
        select(Series.series_instance_uid, Study.study_instance_uid)
        .join(Study, Series.study_fk == Study.id)
        .where(Series.id == existing.series_fk)
    ).one()
    session.add(
        SupersededInstance(
            sop_instance_uid=existing.sop_instance_uid,
            sop_class_uid=existing.sop_class_uid,
            series_instance_uid=old_series,
            study_instance_uid=old_study,
            **StorageFacts.of(existing).columns(),
            received_at=existing.received_at,
            superseded_at=utcnow(),
        )
    )
    series = _hierarchy(session, attrs)
    values = _instance_values(attrs, facts, received_at, state)
    for name, value in values.items():
        setattr(existing, name, value)
    existing.series_fk = series.id
    if known_series is not None:
        known_series.note(attrs, series.id)
    session.flush()
    return existing


class Rebuilt(Enum):
    """What :func:`index_found_version` made of a version found in the blob store."""

    INDEXED = "indexed"  # the instance's first version found
    COPY = "copy"  # a second copy of the indexed version: not indexed
    SUPERSEDED = "superseded"  # a newer version: the indexed one is kept superseded


def index_found_version(
    session: Session,
    attrs: InstanceAttributes,
    facts: StorageFacts,
    received_at: dt.datetime,
    state: InstanceState,
    known_series: KnownSeries,
) -> Rebuilt:
    """Index a version of an instance found in the blob store (``medzip db rebuild``, which
    offers them oldest first): the newest version found is the current one. The caller
    commits, once, at the end."""
    existing = get_instance(session, attrs.sop_instance_uid)
    if existing is None:
        add_instance(
            session, attrs, facts, received_at=received_at, state=state, known_series=known_series
        )
        outcome = Rebuilt.INDEXED
    elif existing.original_sha256 == facts.original_sha256:
        return Rebuilt.COPY
    else:
        replace_instance(
            session,
            existing,
            attrs,
            facts,
            received_at=received_at,
            state=state,
            known_series=known_series,
        )
        outcome = Rebuilt.SUPERSEDED
    # Counted as committed at once: a rollback ends the whole rebuild, KnownSeries with it.
    known_series.committed()
    return outcome


def indexed_counts(session: Session) -> tuple[int, int]:
    """How many instances, and superseded versions, the index holds."""
    instances, superseded = (
        session.scalar(select(func.count(table.id))) or 0
        for table in (Instance, SupersededInstance)
    )
    return instances, superseded
