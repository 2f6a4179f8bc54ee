"""initial schema: patient, study, series, instance, superseded_instance

Revision ID: 0001
Revises:
Create Date: 2026-11-26

One migration tree for SQLite and PostgreSQL: use ``op.batch_alter_table`` for
ALTERs (env.py enables ``render_as_batch`` on SQLite only).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _text(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(), server_default="", nullable=False)


def upgrade() -> None:
    op.create_table(
        "patient",
        sa.Column("id", sa.Integer(), nullable=False),
        _text("patient_id"),
        _text("issuer_of_patient_id"),
        _text("patient_name"),
        _text("patient_birth_date"),
        _text("patient_sex"),
        _text("specific_character_set"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_patient")),
        sa.UniqueConstraint(
            "patient_id",
            "issuer_of_patient_id",
            name=op.f("uq_patient_patient_id_issuer_of_patient_id"),
        ),
    )
    op.create_index(op.f("ix_patient_patient_birth_date"), "patient", ["patient_birth_date"])
    op.create_index(op.f("ix_patient_patient_name"), "patient", ["patient_name"])

    op.create_table(
        "study",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(), nullable=False),
        sa.Column("patient_fk", sa.Integer(), nullable=False),
        _text("study_date"),
        _text("study_time"),
        _text("accession_number"),
        _text("study_id"),
        _text("study_description"),
        _text("referring_physician_name"),
        _text("specific_character_set"),
        sa.ForeignKeyConstraint(
            ["patient_fk"],
            ["patient.id"],
            name=op.f("fk_study_patient_fk_patient"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_study_study_instance_uid")),
    )
    op.create_index(op.f("ix_study_accession_number"), "study", ["accession_number"])
    op.create_index(op.f("ix_study_patient_fk"), "study", ["patient_fk"])
    op.create_index(op.f("ix_study_study_date"), "study", ["study_date"])

    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(), nullable=False),
        sa.Column("study_fk", sa.Integer(), nullable=False),
        _text("modality"),
        sa.Column("series_number", sa.Integer(), nullable=True),
        _text("series_description"),
        _text("series_date"),
        _text("series_time"),
        _text("body_part_examined"),
        _text("specific_character_set"),
        sa.ForeignKeyConstraint(
            ["study_fk"], ["study.id"], name=op.f("fk_series_study_fk_study"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series")),
        sa.UniqueConstraint("series_instance_uid", name=op.f("uq_series_series_instance_uid")),
    )
    op.create_index(op.f("ix_series_modality"), "series", ["modality"])
    op.create_index(op.f("ix_series_study_fk"), "series", ["study_fk"])

    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("sop_class_uid", sa.String(), nullable=False),
        sa.Column("series_fk", sa.Integer(), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("number_of_frames", sa.Integer(), nullable=True),
        _text("specific_character_set"),
        sa.Column("blob_key", sa.String(), nullable=False),
        sa.Column("original_size", sa.BigInteger(), nullable=False),
        sa.Column("original_sha256", sa.String(length=64), nullable=False),
        sa.Column("stored_size", sa.BigInteger(), nullable=False),
        sa.Column("stored_sha256", sa.String(length=64), nullable=False),
        sa.Column("codec_id", sa.String(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        _text("calling_ae_title"),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_fk"],
            ["series.id"],
            name=op.f("fk_instance_series_fk_series"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instance")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_instance_sop_instance_uid")),
    )
    op.create_index(op.f("ix_instance_series_fk"), "instance", ["series_fk"])
    op.create_index(op.f("ix_instance_sop_class_uid"), "instance", ["sop_class_uid"])

    op.create_table(
        "superseded_instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(), nullable=False),
        sa.Column("sop_class_uid", sa.String(), nullable=False),
        sa.Column("series_instance_uid", sa.String(), nullable=False),
        sa.Column("study_instance_uid", sa.String(), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(), nullable=False),
        sa.Column("blob_key", sa.String(), nullable=False),
        sa.Column("original_size", sa.BigInteger(), nullable=False),
        sa.Column("original_sha256", sa.String(length=64), nullable=False),
        sa.Column("stored_size", sa.BigInteger(), nullable=False),
        sa.Column("stored_sha256", sa.String(length=64), nullable=False),
        sa.Column("codec_id", sa.String(), nullable=False),
        _text("calling_ae_title"),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_superseded_instance")),
    )
    op.create_index(
        op.f("ix_superseded_instance_sop_instance_uid"),
        "superseded_instance",
        ["sop_instance_uid"],
    )


def downgrade() -> None:
    op.drop_table("superseded_instance")
    op.drop_table("instance")
    op.drop_table("series")
    op.drop_table("study")
    op.drop_table("patient")
