"""a patient per study without Patient ID; patient attributes kept per study

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

Until now all instances without a Patient ID shared one patient row (per issuer), and a
patient row took the attributes of its newest instance, so a study could be answered
with another study's patient name and birth date. This revision

* adds ``study.patient_name``, ``patient_birth_date`` and ``patient_sex`` (the values
  each study's instances gave), filled here from the study's patient row, except where
  that row was shared by several studies without a Patient ID: it held the newest
  instance's values, maybe another patient's, so those studies get none (the original
  per-study values are in the blobs, not in the index; an empty name is better than
  another patient's);
* adds ``patient.sole_study_uid`` to the patient key and gives every study whose patient
  had an empty Patient ID a patient row of its own, then drops the shared rows.

The downgrade merges those patients back into one per issuer (the newest row's values).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PATIENT_ATTRIBUTES = ("patient_name", "patient_birth_date", "patient_sex")
_DESCRIPTIVE = (*_PATIENT_ATTRIBUTES, "specific_character_set")


def _text(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(), server_default="", nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("study") as batch:
        for name in _PATIENT_ATTRIBUTES:
            batch.add_column(_text(name))
        batch.create_index(op.f("ix_study_patient_name"), ["patient_name"])
        batch.create_index(op.f("ix_study_patient_birth_date"), ["patient_birth_date"])
    op.execute(
        "UPDATE study SET "
        + ", ".join(
            f"{name} = (SELECT p.{name} FROM patient p WHERE p.id = study.patient_fk)"
            for name in _PATIENT_ATTRIBUTES
        )
    )
    op.execute(
        "UPDATE study SET "
        + ", ".join(f"{name} = ''" for name in _PATIENT_ATTRIBUTES)
        + " WHERE patient_fk IN (SELECT p.id FROM patient p WHERE p.patient_id = '' AND "
        "(SELECT COUNT(*) FROM study s2 WHERE s2.patient_fk = p.id) > 1)"
    )

    with op.batch_alter_table("patient") as batch:
        batch.add_column(_text("sole_study_uid"))
        batch.drop_constraint("uq_patient_patient_id_issuer_of_patient_id", type_="unique")
        batch.create_unique_constraint(
            op.f("uq_patient_patient_id_issuer_of_patient_id_sole_study_uid"),
            ["patient_id", "issuer_of_patient_id", "sole_study_uid"],
        )
    columns = ", ".join(_DESCRIPTIVE)
    # the study's own values, as set above (none where the shared row was ambiguous)
    selected = ", ".join(f"s.{name}" for name in _PATIENT_ATTRIBUTES)
    selected += ", p.specific_character_set"
    op.execute(
        f"INSERT INTO patient (patient_id, issuer_of_patient_id, sole_study_uid, {columns}) "
        f"SELECT '', p.issuer_of_patient_id, s.study_instance_uid, {selected} "
        "FROM study s JOIN patient p ON p.id = s.patient_fk WHERE p.patient_id = ''"
    )
    op.execute(
        "UPDATE study SET patient_fk = (SELECT p.id FROM patient p WHERE p.patient_id = '' "
        "AND p.sole_study_uid = study.study_instance_uid) "
        "WHERE patient_fk IN (SELECT id FROM patient WHERE patient_id = '' "
        "AND sole_study_uid = '')"
    )
    op.execute("DELETE FROM patient WHERE patient_id = '' AND sole_study_uid = ''")


def downgrade() -> None:
    columns = ", ".join(_DESCRIPTIVE)
    op.execute(
        f"INSERT INTO patient (patient_id, issuer_of_patient_id, sole_study_uid, {columns}) "
        f"SELECT '', issuer_of_patient_id, '', {columns} FROM patient WHERE id IN "
        "(SELECT MAX(id) FROM patient WHERE patient_id = '' GROUP BY issuer_of_patient_id)"
    )
    op.execute(
        "UPDATE study SET patient_fk = (SELECT m.id FROM patient m JOIN patient p "
        "ON m.issuer_of_patient_id = p.issuer_of_patient_id WHERE p.id = study.patient_fk "
        "AND m.patient_id = '' AND m.sole_study_uid = '') "
        "WHERE patient_fk IN (SELECT id FROM patient WHERE patient_id = '' "
        "AND sole_study_uid <> '')"
    )
    op.execute("DELETE FROM patient WHERE patient_id = '' AND sole_study_uid <> ''")
    with op.batch_alter_table("patient") as batch:
        batch.drop_constraint(
            "uq_patient_patient_id_issuer_of_patient_id_sole_study_uid", type_="unique"
        )
        batch.drop_column("sole_study_uid")
        batch.create_unique_constraint(
            op.f("uq_patient_patient_id_issuer_of_patient_id"),
            ["patient_id", "issuer_of_patient_id"],
        )

    with op.batch_alter_table("study") as batch:
        batch.drop_index(op.f("ix_study_patient_birth_date"))
        batch.drop_index(op.f("ix_study_patient_name"))
        for name in reversed(_PATIENT_ATTRIBUTES):
            batch.drop_column(name)
