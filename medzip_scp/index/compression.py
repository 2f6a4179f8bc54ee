"""The index side of background compression: which instances wait for it, and the swap of
an instance's row from its original blob to the verified codec blob. The caller commits."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from medzip_scp.index.models import Instance, InstanceState

__all__ = ["mark_compress_failed", "pending_compression", "swap_blob"]


def pending_compression(
    session: Session,
    codec_id: str,
    limit: int,
    shard: tuple[int, int] = (0, 1),
    quiet_since: dt.datetime | None = None,
) -> list[int]:
    """Ids of the instances still stored by ``codec_id`` as received, oldest first; of
    those whose id is ``k`` modulo ``n`` for ``shard`` ``(k, n)``; with ``quiet_since``,
    only of series none of whose instances arrived after it."""
    k, n = shard
    query = select(Instance.id).where(
        Instance.codec_id == codec_id,
        Instance.state == InstanceState.STORED,
    )
    if n > 1:
        query = query.where(Instance.id % n == k)
    if quiet_since is not None:
        busy = select(Instance.series_fk).where(Instance.received_at > quiet_since)
        query = query.where(Instance.series_fk.not_in(busy))
    return list(session.scalars(query.order_by(Instance.id).limit(limit)))


def mark_compress_failed(session: Session, instance_id: int, blob_key: str) -> None:
    """Mark an instance whose compression failed, so that it is not tried again; only while
    its row still names ``blob_key`` (a replaced instance is compressed afresh)."""
    session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.blob_key == blob_key)
        .values(state=InstanceState.COMPRESS_FAILED)
    )


def swap_blob(
    session: Session,
    instance_id: int,
    old_key: str,
    new_key: str,
    codec_id: str,
    stored_size: int,
    stored_sha256: str,
) -> bool:
    """Point an instance's row at its compressed blob, in one UPDATE that only succeeds if
    the row still names ``old_key``; whether it did (not: a concurrent replace won)."""
    result = session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.blob_key == old_key)
        .values(
            blob_key=new_key,
            codec_id=codec_id,
            stored_size=stored_size,
            stored_sha256=stored_sha256,
            state=InstanceState.COMPRESSED,
        )
    )
    return result.rowcount == 1  # type: ignore[attr-defined]
