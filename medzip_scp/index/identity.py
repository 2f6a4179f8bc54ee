"""Does the index say what an instance's sealed identity says? (``medzip verify``, retrieval)"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from medzip_scp.index.ingest import InstanceAttributes
from medzip_scp.index.models import Instance, Patient, Series, Study

__all__ = ["identity_differences"]

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
    session: Session, instance_id: int, sealed: InstanceAttributes
) -> list[str]:
    """Keywords (never values) where the index row of an instance, its series, study and
    patient differ from the attributes of its sealed data set.

    Study-level copies hold the newest non-empty value a study's instances gave, so an
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
    differing = []
    for (keyword, _, field), indexed in zip(_COMPARED, row, strict=True):
        value = getattr(sealed, field)
        if value and value != indexed:
            differing.append(keyword)
    return differing
