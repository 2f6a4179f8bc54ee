"""Which blobs the index names, current versions and superseded ones alike (housekeeping:
orphaned blobs, a lost identity key file)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from medzip_scp.index.models import Instance, SupersededInstance

__all__ = ["blob_keys_of", "holds_codec", "index_is_empty", "named_blob_keys"]

_VERSIONS = (Instance, SupersededInstance)


def named_blob_keys(session: Session, prefix: str) -> set[str]:
    """The blob keys starting with ``prefix`` that an index row, current or superseded,
    names."""
    return {
        key
        for table in _VERSIONS
        for key in session.scalars(select(table.blob_key).where(table.blob_key.like(f"{prefix}%")))
    }


def blob_keys_of(session: Session, sop_instance_uid: str) -> list[str]:
    """The blob keys the versions of one instance, current and superseded, name."""
    return [
        key
        for table in _VERSIONS
        for key in session.scalars(
            select(table.blob_key).where(table.sop_instance_uid == sop_instance_uid)
        )
    ]


def holds_codec(session: Session, codec_id: str) -> bool:
    """Whether any version, current or superseded, is stored by ``codec_id``."""
    return any(
        session.scalar(select(table.id).where(table.codec_id == codec_id).limit(1)) is not None
        for table in _VERSIONS
    )


def index_is_empty(session: Session) -> bool:
    """Whether the index holds no version at all, current or superseded."""
    return all(session.scalar(select(table.id).limit(1)) is None for table in _VERSIONS)
