"""instance.received_at indexed: compression waits for quiet series

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

With ``[pipeline] series_quiet_seconds`` the compression pass leaves out the series that
received an instance recently; the index keeps that look-up off a full scan. An index only:
nothing to convert.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_instance_received_at"), "instance", ["received_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_instance_received_at"), table_name="instance")
