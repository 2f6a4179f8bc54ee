"""C-FIND matching against the index, and instance selection for C-GET/C-MOVE.

Implements the baseline (hierarchical) query of PS3.4 Annex C for the Patient Root
and Study Root information models (C.6.1, C.6.2) at the PATIENT, STUDY, SERIES and
IMAGE levels, with the attribute matching of C.2.2.2:

* universal matching (C.2.2.2.3): a zero-length value, or ``*``, matches everything,
  including entities whose value is empty;
* single value matching (C.2.2.2.1): case-sensitive, except PN, which is matched
  case-insensitively (C.2.2.2.1 allows it); the ``^`` component structure of a PN
  is compared literally;
* wildcard matching (C.2.2.2.4): ``*`` and ``?`` on text VRs (not DA, TM, DT, UI or
  numeric VRs); SQL ``LIKE`` metacharacters in the value are escaped;
* list of UID matching (C.2.2.2.2) for UI keys; a backslash-separated list on
  other keys is matched as "any of" (used by ModalitiesInStudy, C.6.1.1.3.2);
* range matching (C.2.2.2.5) for DA and TM: ``A-B``, ``-B`` and ``A-``, inclusive
  (a TM upper bound of reduced precision includes the whole minute/hour/second).
  Combined DA/TM range matching (C.2.2.2.5.1) is not implemented: the date and the
  time keys are matched independently.

Patient attributes are matched and returned at PATIENT level from the patient (the
values first received for it) and at the STUDY level of the Study Root model from the
study (the values its own instances gave; see :class:`~medzip_scp.index.models.Study`).
Each study without a Patient ID has a patient of its own.

An entity whose attribute is empty matches only universal matching. Exactly one
response is returned per matching entity of the query level (C.4.1.3.1.1). A key
that the level does not support is returned with zero length in the response
identifier (C.4.1.1.3.2).

Queries are always relational (C.4.1.2.2, C.4.1.3.2), whether or not the peer
negotiated it: the unique keys of the levels above the query level may be absent or
empty, and every key of those levels is matched and returned (all MR series of the
archive: SERIES level, ``Modality=MR``, no StudyInstanceUID). A retrieve needs only
the unique key of its level (a SERIES by SeriesInstanceUID alone, an IMAGE by
SOPInstanceUID alone: these UIDs are globally unique); the unique keys above it are
matched when present.

Responses are written in the character set the query names in Specific Character
Set (0008,0005), else in the configured one (UTF-8 by default); text is stored
decoded, so it is re-encoded, never copied as stored bytes. A response whose values
that character set cannot represent is written in UTF-8 (ISO_IR 192) instead, and
says so in its Specific Character Set: the values stay exact (a replacement ``?``
would even turn into a wildcard if the peer queried with it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydicom import Dataset
from pydicom.charset import custom_encoders, python_encoding
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    distinct,
    exists,
    false,
    func,
    or_,
    select,
    true,
)
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from medzip_scp.index.db import SQLITE_LOWER_FUNCTION
from medzip_scp.index.errors import IndexError_
from medzip_scp.index.ingest import normalise_da, normalise_tm
from medzip_scp.index.models import Instance, Patient, Series, Study

__all__ = ["LEVELS", "QueryError", "QueryLevel", "QueryModel", "find", "find_instances"]

QueryModel = Literal["PATIENT", "STUDY"]
QueryLevel = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
LEVELS: tuple[QueryLevel, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")

#: Values of these keywords are PHI and never appear in error messages.
_PHI_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "OtherPatientIDs",
        "OtherPatientNames",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
    }
)

_UNIQUE_KEY: dict[QueryLevel, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

#: VRs on which wildcard matching applies (PS3.4 C.2.2.2.4).
_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})

_DA_RE = re.compile(r"^\d{8}$")
_TM_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_TM_MAX = "235959.999999"


class QueryError(IndexError_, ValueError):
    """The identifier is not a valid baseline query (PS3.4 C.4.1.2.1 / C.4.2.2.1).

    The message states the violated rule and the offending value (PHI values are
    replaced by their length).
    """


@dataclass(frozen=True)
class _Key:
    keyword: str
    vr: str
    level: QueryLevel
    column: InstrumentedAttribute[Any] | None = None
    #: name of a computed key (PS3.4 C.3.4 additional query keys)
    computed: str | None = None


def _keys() -> dict[str, _Key]:
    keys = [
        _Key("PatientName", "PN", "PATIENT", Patient.patient_name),
        _Key("PatientID", "LO", "PATIENT", Patient.patient_id),
        _Key("IssuerOfPatientID", "LO", "PATIENT", Patient.issuer_of_patient_id),
        _Key("PatientBirthDate", "DA", "PATIENT", Patient.patient_birth_date),
        _Key("PatientSex", "CS", "PATIENT", Patient.patient_sex),
        _Key("NumberOfPatientRelatedStudies", "IS", "PATIENT", computed="patient_studies"),
        _Key("NumberOfPatientRelatedSeries", "IS", "PATIENT", computed="patient_series"),
        _Key("NumberOfPatientRelatedInstances", "IS", "PATIENT", computed="patient_instances"),
        _Key("StudyInstanceUID", "UI", "STUDY", Study.study_instance_uid),
        _Key("StudyDate", "DA", "STUDY", Study.study_date),
        _Key("StudyTime", "TM", "STUDY", Study.study_time),
        _Key("AccessionNumber", "SH", "STUDY", Study.accession_number),
        _Key("StudyID", "SH", "STUDY", Study.study_id),
        _Key("StudyDescription", "LO", "STUDY", Study.study_description),
        _Key("ReferringPhysicianName", "PN", "STUDY", Study.referring_physician_name),
        _Key("ModalitiesInStudy", "CS", "STUDY", computed="modalities"),
        _Key("SOPClassesInStudy", "UI", "STUDY", computed="sop_classes"),
        _Key("NumberOfStudyRelatedSeries", "IS", "STUDY", computed="study_series"),
        _Key("NumberOfStudyRelatedInstances", "IS", "STUDY", computed="study_instances"),
        _Key("SeriesInstanceUID", "UI", "SERIES", Series.series_instance_uid),
        _Key("Modality", "CS", "SERIES", Series.modality),
        _Key("SeriesNumber", "IS", "SERIES", Series.series_number),
        _Key("SeriesDescription", "LO", "SERIES", Series.series_description),
        _Key("SeriesDate", "DA", "SERIES", Series.series_date),
        _Key("SeriesTime", "TM", "SERIES", Series.series_time),
        _Key("BodyPartExamined", "CS", "SERIES", Series.body_part_examined),
        _Key("NumberOfSeriesRelatedInstances", "IS", "SERIES", computed="series_instances"),
        _Key("SOPInstanceUID", "UI", "IMAGE", Instance.sop_instance_uid),
        _Key("SOPClassUID", "UI", "IMAGE", Instance.sop_class_uid),
        _Key("InstanceNumber", "IS", "IMAGE", Instance.instance_number),
        _Key("Rows", "US", "IMAGE", Instance.rows),
        _Key("Columns", "US", "IMAGE", Instance.columns),
        _Key("NumberOfFrames", "IS", "IMAGE", Instance.number_of_frames),
    ]
    return {k.keyword: k for k in keys}


_KEYS = _keys()

#: Below PATIENT level, the patient attributes are matched and answered with those the
#: study's own instances gave, not with its patient's (first received) ones, so that a
#: study is never answered with the name another source gave its Patient ID.
_STUDY_COPIES_OF_PATIENT_KEYS = {
    k.keyword: k
    for k in (
        _Key("PatientName", "PN", "PATIENT", Study.patient_name),
        _Key("PatientBirthDate", "DA", "PATIENT", Study.patient_birth_date),
        _Key("PatientSex", "CS", "PATIENT", Study.patient_sex),
    )
}


# --------------------------------------------------------------------------- helpers


def _shown(keyword: str, value: str) -> str:
    if keyword in _PHI_KEYWORDS:
        return f"<{len(value)} characters, not shown>"
    return repr(value)


def _values(elem: DataElement) -> list[str]:
    """The query value(s) of an identifier element as strings (``[]`` if zero-length)."""
    value: Any = elem.value
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        items = ["" if v is None else str(v).strip() for v in value]
    else:
        items = [str(value).strip()]
    if all(v == "" for v in items):
        return []
    return items


def _elements(identifier: Dataset) -> list[DataElement]:
    """The identifier's top-level elements, decoded; undecodable values are a QueryError."""
    elements: list[DataElement] = []
    for tag in list(identifier.keys()):
        try:
            elements.append(identifier[tag])
        except Exception as exc:  # pydicom raises various types for malformed values
            raise QueryError(
                f"the identifier element {tag} cannot be decoded ({type(exc).__name__})"
            ) from None
    return elements


def _allowed_keys(model: QueryModel, level: QueryLevel, *, relational: bool) -> dict[str, _Key]:
    """Keys matchable/returnable at ``level`` of ``model`` (PS3.4 C.6.1.1, C.6.2.1).

    ``relational``: every key of the levels above too (C.4.1.2.2); else only their
    unique keys (the hierarchical identifier of C.4.1.2.1 and C.4.2.2.1).
    """
    allowed = {k: v for k, v in _KEYS.items() if v.level == level}
    first = 0 if model == "PATIENT" else 1
    for above in LEVELS[: LEVELS.index(level)]:
        if relational or (model == "STUDY" and level == "STUDY"):
            # Study Root merges the patient attributes into the STUDY level (C.6.2.1.1).
            allowed.update({k: v for k, v in _KEYS.items() if v.level == above})
        elif LEVELS.index(above) >= first:
            allowed[_UNIQUE_KEY[above]] = _KEYS[_UNIQUE_KEY[above]]
    if level != "PATIENT":
        allowed.update({k: v for k, v in _STUDY_COPIES_OF_PATIENT_KEYS.items() if k in allowed})
    return allowed


def _unique_keys(model: QueryModel, level: QueryLevel) -> list[str]:
    first = 0 if model == "PATIENT" else 1
    return [_UNIQUE_KEY[lv] for lv in LEVELS[first : LEVELS.index(level) + 1]]


def _validate(model: str, identifier: Dataset, *, retrieve: bool) -> QueryLevel:
    if model not in ("PATIENT", "STUDY"):
        raise QueryError(
            f"the information model must be 'PATIENT' (Patient Root) or 'STUDY' "
            f"(Study Root), got {model!r}"
        )
    elem = identifier.get("QueryRetrieveLevel")
    if elem is None:
        raise QueryError("the identifier must contain QueryRetrieveLevel (0008,0052), it has none")
    raw = identifier["QueryRetrieveLevel"].value
    level = str(raw).strip().upper() if isinstance(raw, str) else raw
    if level not in LEVELS:
        raise QueryError(
            f"QueryRetrieveLevel must be one of PATIENT, STUDY, SERIES, IMAGE, got {raw!r}"
        )
    if model == "STUDY" and level == "PATIENT":
        raise QueryError(
            "QueryRetrieveLevel PATIENT is not defined in the Study Root information "
            "model (PS3.4 C.6.2), got 'PATIENT'"
        )
    unique = _unique_keys(model, level)
    if retrieve and unique[-1] not in identifier:
        raise QueryError(
            f"a {level} level retrieve must contain the unique key {unique[-1]} "
            f"(PS3.4 C.4.2.2.1), it is absent"
        )
    # Relational (C.4.1.2.2): the unique keys above the level may be absent or empty.
    for keyword in unique if retrieve else unique[:-1]:
        if keyword not in identifier:
            continue
        values = _values(identifier[keyword])
        is_level_key = keyword == unique[-1]
        if values in ([], ["*"]) and not is_level_key:
            continue  # universal matching
        if keyword == "PatientID" and not is_level_key:
            continue  # a LO key: wildcards allowed
        if not values or any(v in ("", "*") or "?" in v or "*" in v for v in values):
            shown = "\\".join(values)
            raise QueryError(
                f"the unique key {keyword} must be a single value or a list of values "
                f"(no universal or wildcard matching) at {level} level, got "
                f"{_shown(keyword, shown)}"
            )
    return level  # type: ignore[return-value]


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _wildcard_to_like(value: str) -> str:
    return _escape_like(value).replace("*", "%").replace("?", "_")


def _wildcard_to_glob(value: str) -> str:
    # SQLite GLOB is case-sensitive; '[' opens a character class, escape it as '[[]'.
    return value.replace("[", "[[]")


class _Matcher:
    """Builds SQL conditions for one dialect."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    # -- per VR --------------------------------------------------------------
    def text(self, column: Any, vr: str, value: str) -> ColumnElement[bool]:
        has_wild = vr in _WILDCARD_VRS and ("*" in value or "?" in value)
        if vr == "PN":
            pattern = _wildcard_to_like(value) if has_wild else _escape_like(value)
            if self.dialect == "sqlite":
                # SQLite folds ASCII only; use the Unicode-aware function db.py registers.
                folded = getattr(func, SQLITE_LOWER_FUNCTION)(column)
                return folded.like(pattern.lower(), escape="\\")
            return column.ilike(pattern, escape="\\")
        if not has_wild:
            return column == value
        if self.dialect == "sqlite":
            return column.op("GLOB")(_wildcard_to_glob(value))
        return column.like(_wildcard_to_like(value), escape="\\")

    def date(self, column: Any, keyword: str, value: str) -> ColumnElement[bool]:
        if "-" in value:
            low, _, high = value.partition("-")
            low, high = normalise_da(low), normalise_da(high)
            for part in (low, high):
                if part and not _DA_RE.match(part):
                    raise QueryError(
                        f"a DA range must be YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD- "
                        f"(PS3.4 C.2.2.2.5), {keyword} is {_shown(keyword, value)}"
                    )
            conds: list[ColumnElement[bool]] = [column != ""]
            if low:
                conds.append(column >= low)
            if high:
                conds.append(column <= high)
            return and_(*conds)
        norm = normalise_da(value)
        if not _DA_RE.match(norm):
            raise QueryError(
                f"a DA value must be YYYYMMDD or a range (PS3.4 C.2.2.2.1, C.2.2.2.5), "
                f"{keyword} is {_shown(keyword, value)}"
            )
        return column == norm

    def time(self, column: Any, keyword: str, value: str) -> ColumnElement[bool]:
        def check(part: str) -> str:
            norm = normalise_tm(part)
            if norm and not _TM_RE.match(norm):
                raise QueryError(
                    f"a TM value must be HH[MM[SS[.F{{1,6}}]]] or a range of those "
                    f"(PS3.4 C.2.2.2.5), {keyword} is {_shown(keyword, value)}"
                )
            return norm

        if "-" in value:
            low, _, high = value.partition("-")
            low, high = check(low), check(high)
            conds: list[ColumnElement[bool]] = [column != ""]
            if low:
                conds.append(column >= low)
            if high:
                conds.append(column <= high + _TM_MAX[len(high) :])
            return and_(*conds)
        norm = check(value)
        return column == norm

    def integer(self, column: Any, keyword: str, value: str) -> ColumnElement[bool]:
        try:
            number = int(value)
        except ValueError:
            raise QueryError(
                f"{keyword} takes a single integer value (PS3.4 C.2.2.2.1), got "
                f"{_shown(keyword, value)}"
            ) from None
        return column == number

    def condition(self, key: _Key, column: Any, values: Sequence[str]) -> ColumnElement[bool]:
        """Condition of one key: OR over the values (list matching)."""
        if key.vr == "UI":
            return column.in_(list(values))
        conds: list[ColumnElement[bool]] = []
        for value in values:
            if value == "":
                continue
            if key.vr == "DA":
                conds.append(self.date(column, key.keyword, value))
            elif key.vr == "TM":
                conds.append(self.time(column, key.keyword, value))
            elif key.vr in ("IS", "US", "UL", "SS", "SL"):
                conds.append(self.integer(column, key.keyword, value))
            else:
                conds.append(self.text(column, key.vr, value))
        if not conds:
            return false()
        return or_(*conds) if len(conds) > 1 else conds[0]


def _string_agg(dialect: str, column: Any) -> Any:
    """Comma-separated distinct values (CS and UI values cannot contain commas)."""
    if dialect == "postgresql":
        return func.string_agg(distinct(column), ",")
    return func.group_concat(distinct(column))


def _computed_expression(name: str, dialect: str) -> Any:
    """Correlated scalar subqueries for the computed keys (counted in SQL)."""
    st, se, ins = aliased(Study), aliased(Series), aliased(Instance)
    if name == "patient_studies":
        stmt = select(func.count(st.id)).where(st.patient_fk == Patient.id)
        return stmt.correlate(Patient).scalar_subquery()
    if name == "patient_series":
        stmt = (
            select(func.count(se.id))
            .join(st, se.study_fk == st.id)
            .where(st.patient_fk == Patient.id)
        )
        return stmt.correlate(Patient).scalar_subquery()
    if name == "patient_instances":
        stmt = (
            select(func.count(ins.id))
            .join(se, ins.series_fk == se.id)
            .join(st, se.study_fk == st.id)
            .where(st.patient_fk == Patient.id)
        )
        return stmt.correlate(Patient).scalar_subquery()
    if name == "study_series":
        stmt = select(func.count(se.id)).where(se.study_fk == Study.id)
        return stmt.correlate(Study).scalar_subquery()
    if name == "study_instances":
        stmt = (
            select(func.count(ins.id))
            .join(se, ins.series_fk == se.id)
            .where(se.study_fk == Study.id)
        )
        return stmt.correlate(Study).scalar_subquery()
    if name == "series_instances":
        stmt = select(func.count(ins.id)).where(ins.series_fk == Series.id)
        return stmt.correlate(Series).scalar_subquery()
    if name == "modalities":
        stmt = select(_string_agg(dialect, se.modality)).where(
            se.study_fk == Study.id, se.modality != ""
        )
        return stmt.correlate(Study).scalar_subquery()
    if name == "sop_classes":
        stmt = (
            select(_string_agg(dialect, ins.sop_class_uid))
            .join(se, ins.series_fk == se.id)
            .where(se.study_fk == Study.id)
        )
        return stmt.correlate(Study).scalar_subquery()
    raise AssertionError(name)  # pragma: no cover


def _computed_condition(
    name: str, matcher: _Matcher, key: _Key, values: Sequence[str]
) -> ColumnElement[bool] | None:
    """Matching on ModalitiesInStudy / SOPClassesInStudy: any series/instance matches."""
    se, ins = aliased(Series), aliased(Instance)
    if name == "modalities":
        cond = matcher.condition(key, se.modality, values)
        return exists(select(se.id).where(se.study_fk == Study.id, cond).correlate(Study))
    if name == "sop_classes":
        cond = matcher.condition(key, ins.sop_class_uid, values)
        return exists(
            select(ins.id)
            .join(se, ins.series_fk == se.id)
            .where(se.study_fk == Study.id, cond)
            .correlate(Study)
        )
    return None  # counts are return keys only


def _base_select(level: QueryLevel, columns: Sequence[Any]) -> Select[Any]:
    """FROM the query-level entity joined to its ancestors (one row per entity).

    Patients, studies and series without any instance (left behind when
    :func:`~medzip_scp.index.ingest.replace_instance` or a newer instance moved their
    content elsewhere) are not reported.
    """
    stmt = select(*columns)
    st, se, ins = aliased(Study), aliased(Series), aliased(Instance)
    if level == "PATIENT":
        has_content = exists(
            select(ins.id)
            .join(se, ins.series_fk == se.id)
            .join(st, se.study_fk == st.id)
            .where(st.patient_fk == Patient.id)
            .correlate(Patient)
        )
        return stmt.select_from(Patient).where(has_content)
    if level == "STUDY":
        has_content = exists(
            select(ins.id)
            .join(se, ins.series_fk == se.id)
            .where(se.study_fk == Study.id)
            .correlate(Study)
        )
        return (
            stmt.select_from(Study).join(Patient, Study.patient_fk == Patient.id).where(has_content)
        )
    if level == "SERIES":
        has_content = exists(select(ins.id).where(ins.series_fk == Series.id).correlate(Series))
        return (
            stmt.select_from(Series)
            .join(Study, Series.study_fk == Study.id)
            .join(Patient, Study.patient_fk == Patient.id)
            .where(has_content)
        )
    return (
        stmt.select_from(Instance)
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
        .join(Patient, Study.patient_fk == Patient.id)
    )


def _conditions(
    matcher: _Matcher, allowed: dict[str, _Key], elements: Sequence[DataElement]
) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    for elem in elements:
        key = allowed.get(elem.keyword)
        if key is None:
            continue
        values = _values(elem)
        if not values or "*" in values:
            continue  # universal matching
        if key.computed is not None:
            cond = _computed_condition(key.computed, matcher, key, values)
            if cond is not None:
                conds.append(cond)
            continue
        conds.append(matcher.condition(key, key.column, values))
    return conds


# --------------------------------------------------------------------------- charset


UTF8 = "ISO_IR 192"


def _encodes(text: str, encoding: str) -> bool:
    encoder = custom_encoders.get(encoding)
    try:
        encoder(text) if encoder is not None else text.encode(encoding)
    except UnicodeError:
        return False
    return True


def _can_encode(values: Sequence[str], charset: Sequence[str]) -> bool:
    """Whether pydicom writes every value in ``charset`` (the terms of a Specific Character
    Set) exactly, without the replacement characters it falls back to.

    With code extensions (several terms) pydicom switches encodings within a value, so
    each character needs one term that encodes it. An empty first term is the default
    repertoire: ASCII. An unknown term encodes nothing.
    """
    encodings = []
    for position, term in enumerate(charset):
        if not term and position == 0:
            encodings.append("ascii")
        elif term in python_encoding:
            encodings.append(python_encoding[term])
        else:
            return False
    for value in values:
        if any(_encodes(value, e) for e in encodings):
            continue
        if len(encodings) == 1 or not all(any(_encodes(c, e) for e in encodings) for c in value):
            return False
    return True


def _response_charset(
    texts: Sequence[str], target: Sequence[str], requested: Sequence[str] | None
) -> Sequence[str] | None:
    """Specific Character Set of a response (PS3.4 C.4.1.1.3.2), or ``None`` to omit it.

    ``requested`` is the query's own value (``None`` when it has no such element):
    ASCII responses carry it back as asked; others are in ``target`` when it encodes
    them, else in UTF-8.
    """
    if all(t.isascii() for t in texts):
        return requested
    return target if _can_encode(texts, target) else [UTF8]


# --------------------------------------------------------------------------- public


def find(
    session: Session,
    model: QueryModel,
    identifier: Dataset,
    is_cancelled: Callable[[], bool] = lambda: False,
    *,
    default_charset: str = UTF8,
    limit: int | None = None,
) -> Iterator[Dataset]:
    """Run a C-FIND query and yield one response identifier per matching entity.

    Parameters
    ----------
    session : Session
        Session to read with (on SQLite preferably from
        ``session_factory(engine, readonly=True)``).
    model : {"PATIENT", "STUDY"}
        Patient Root (PS3.4 C.6.1) or Study Root (C.6.2) information model.
    identifier : Dataset
        The request identifier: QueryRetrieveLevel plus matching and return keys
        (PS3.4 C.4.1.1.3.1). Relational (C.4.1.2.2): keys of the query level and
        of any level above; the unique keys above may be absent.
    is_cancelled : callable, optional
        Checked before each response is yielded; the query stops when it returns
        true (C-CANCEL, PS3.4 C.4.1).
    default_charset : str, optional
        Specific Character Set of the responses when the identifier names none.
    limit : int, optional
        Read at most this many matches from the database.

    Yields
    ------
    Dataset
        QueryRetrieveLevel, every requested key (value, or zero length when empty
        or not supported at this level), the unique keys of this and the higher
        levels, and SpecificCharacterSet when the values need it or it was
        requested (PS3.4 C.4.1.1.3.2): the identifier's, ``default_charset`` or,
        for values those cannot encode, ISO_IR 192. Rows are streamed from the
        database.

    Raises
    ------
    QueryError
        For an invalid identifier (raised by the call itself, before any row is read).
    """
    elements = _elements(identifier)
    level = _validate(model, identifier, retrieve=False)
    dialect = session.get_bind().dialect.name
    matcher = _Matcher(dialect)
    allowed = _allowed_keys(model, level, relational=True)

    requested: list[DataElement] = []
    requested_charset: list[str] | None = None
    for elem in elements:
        if elem.tag.element == 0 or elem.keyword == "QueryRetrieveLevel":
            continue
        if elem.keyword == "SpecificCharacterSet":
            requested_charset = _values(elem)
            continue
        requested.append(elem)
    target_charset = requested_charset or [t.strip() for t in default_charset.split("\\")]

    # Output plan: (keyword or None, tag, VR, label of the selected column or None).
    columns: list[Any] = []
    labels: dict[str, str] = {}

    def select_key(key: _Key) -> str:
        if key.keyword not in labels:
            label = f"k{len(columns)}"
            expr = (
                _computed_expression(key.computed, dialect)
                if key.computed is not None
                else key.column
            )
            columns.append(expr.label(label))
            labels[key.keyword] = label
        return labels[key.keyword]

    plan: list[tuple[DataElement, _Key | None]] = []
    for elem in requested:
        key = allowed.get(elem.keyword)
        if key is not None:
            select_key(key)
        plan.append((elem, key))
    unique = [_KEYS[k] for k in _unique_keys(model, level)]
    for key in unique:
        select_key(key)

    entity_id = {
        "PATIENT": Patient.id,
        "STUDY": Study.id,
        "SERIES": Series.id,
        "IMAGE": Instance.id,
    }[level]
    stmt = _base_select(level, columns)
    conds = _conditions(matcher, allowed, elements)
    if conds:
        stmt = stmt.where(and_(true(), *conds))
    stmt = stmt.order_by(entity_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    charsets = (target_charset, requested_charset)
    return _stream(session, stmt, level, plan, unique, labels, charsets, is_cancelled)


def _stream(
    session: Session,
    stmt: Select[Any],
    level: QueryLevel,
    plan: list[tuple[DataElement, _Key | None]],
    unique: list[_Key],
    labels: dict[str, str],
    charsets: tuple[Sequence[str], Sequence[str] | None],
    is_cancelled: Callable[[], bool],
) -> Iterator[Dataset]:
    result = session.execute(stmt.execution_options(yield_per=500))
    try:
        for row in result:
            mapping = row._mapping
            ds = Dataset()
            texts: list[str] = []
            for elem, key in plan:
                value = None if key is None else mapping[labels[key.keyword]]
                _set(ds, elem, key, value, texts)
            for key in unique:
                if key.keyword not in ds:
                    value = mapping[labels[key.keyword]]
                    texts.append(value)
                    setattr(ds, key.keyword, value or None)
            charset = _response_charset(texts, *charsets)
            if charset is not None:
                ds.SpecificCharacterSet = (charset[0] if len(charset) == 1 else charset) or None
            ds.QueryRetrieveLevel = level
            if is_cancelled():
                return
            yield ds
    finally:
        result.close()


def _set(ds: Dataset, elem: DataElement, key: _Key | None, value: Any, texts: list[str]) -> None:
    if key is None or value is None or value == "":
        if elem.VR == "SQ":
            ds.add_new(elem.tag, "SQ", [])
        else:
            ds.add_new(elem.tag, elem.VR, None)
        return
    if key.computed in ("modalities", "sop_classes"):
        items = sorted(set(str(value).split(",")))
        ds.add_new(elem.tag, key.vr, items if len(items) > 1 else items[0])
        return
    if isinstance(value, str):
        texts.append(value)
    ds.add_new(elem.tag, key.vr, value)


def find_instances(session: Session, model: QueryModel, identifier: Dataset) -> list[Instance]:
    """Select the instances a C-GET or C-MOVE identifier designates.

    Parameters
    ----------
    session : Session
        Session to read with.
    model : {"PATIENT", "STUDY"}
        Patient Root or Study Root information model.
    identifier : Dataset
        Retrieve identifier (PS3.4 C.4.2.2.1 / C.4.3.2.1): QueryRetrieveLevel
        (PATIENT for Patient Root only, STUDY, SERIES or IMAGE) and the unique key
        of the level (single value or list). The unique keys of the levels above
        are optional (relational retrieve): when present they are matched too, as
        are other known keys of the level, as in C-FIND.

    Returns
    -------
    list[Instance]
        All instances under the matched entities, ordered by study, series
        (Series Number) and Instance Number.

    Raises
    ------
    QueryError
        For an invalid identifier, including an empty or wildcard unique key of the
        retrieve level (which would designate the whole archive).
    """
    elements = _elements(identifier)
    level = _validate(model, identifier, retrieve=True)
    matcher = _Matcher(session.get_bind().dialect.name)
    allowed = _allowed_keys(model, level, relational=False)
    conds = _conditions(matcher, allowed, elements)
    stmt = (
        select(Instance)
        .join(Series, Instance.series_fk == Series.id)
        .join(Study, Series.study_fk == Study.id)
        .join(Patient, Study.patient_fk == Patient.id)
        .where(and_(true(), *conds))
        .order_by(
            Study.id,
            Series.series_number.asc().nulls_last(),
            Series.id,
            Instance.instance_number.asc().nulls_last(),
            Instance.id,
        )
    )
    return list(session.scalars(stmt))
