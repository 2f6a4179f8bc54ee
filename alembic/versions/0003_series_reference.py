"""series_reference: the data set reference each series' new blobs are coded against

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

Blobs code their non-pixel data against one instance of their series (the reference is in
the blob store, ``refs/``, named by sha256); this table says which reference a series uses,
for encoding only. A new table: nothing to convert. The downgrade drops it (blobs keep
decoding: they name their references themselves).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "series_reference",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series_reference")),
        sa.UniqueConstraint(
            "series_instance_uid", name=op.f("uq_series_reference_series_instance_uid")
        ),
    )


def downgrade() -> None:
    op.drop_table("series_reference")
