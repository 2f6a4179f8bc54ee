"""verification_run: when the archive was last verified, and with what result

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

``medzip verify`` and the node's sweep record each pass (counts only), so that ``medzip
status`` can say when every instance was last checked. A new table: nothing to convert; the
downgrade drops it (the history of passes is lost, nothing else).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "verification_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checked", sa.Integer(), nullable=False),
        sa.Column("not_ok", sa.Integer(), nullable=False),
        sa.Column("interrupted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verification_run")),
    )


def downgrade() -> None:
    op.drop_table("verification_run")
