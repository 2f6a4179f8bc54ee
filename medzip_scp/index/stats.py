"""What the index says about the archive as a whole, for ``medzip status``: instances and bytes
by modality and state, and the verification passes. Counts and sums only: no UID, no name."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from medzip_scp.index.models import Instance, InstanceState, Series, VerificationRun

__all__ = [
    "StateTotals",
    "VerificationPass",
    "instance_totals",
    "last_verification",
    "record_verification",
]


@dataclass(frozen=True)
class StateTotals:
    """Instances of one modality in one state, and their bytes as received and as stored."""

    modality: str
    state: InstanceState
    instances: int
    original_bytes: int
    stored_bytes: int


def instance_totals(session: Session) -> list[StateTotals]:
    """One row per (modality, state) that has instances, by modality then state."""
    rows = session.execute(
        select(
            Series.modality,
            Instance.state,
            func.count(Instance.id),
            func.coalesce(func.sum(Instance.original_size), 0),
            func.coalesce(func.sum(Instance.stored_size), 0),
        )
        .join(Series, Instance.series_fk == Series.id)
        .group_by(Series.modality, Instance.state)
        .order_by(Series.modality, Instance.state)
    ).all()
    return [
        StateTotals(modality or "", InstanceState(state), int(n), int(original), int(stored))
        for modality, state, n, original, stored in rows
    ]


@dataclass(frozen=True)
class VerificationPass:
    """One verification pass, as recorded: counts only."""

    kind: str  # "verify" (the command) or "sweep" (the node's)
    started_at: dt.datetime
    checked: int
    not_ok: int
    interrupted: bool


def record_verification(session: Session, run: VerificationPass) -> None:
    """Add a verification pass; the caller commits."""
    session.add(VerificationRun(**dataclasses.asdict(run)))


def last_verification(session: Session) -> VerificationRun | None:
    """The newest verification pass, or None before the first."""
    return session.scalars(
        select(VerificationRun).order_by(VerificationRun.finished_at.desc()).limit(1)
    ).first()
