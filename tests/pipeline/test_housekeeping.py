"""Start-up housekeeping: blobs orphaned by a crash are removed (only those no row names),
and the index database is private to its owner."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import delete, select, update
from sqlalchemy.engine import make_url

from medzip_scp.index.models import Instance, Patient, Series, Study
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from tests.helpers.node import RunningNode
from tests.helpers.scu import ct_dataset, store


def _age(node: RunningNode, key: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(node.archive.blobs._path(key), (then, then))


def test_orphaned_blobs_are_set_aside_and_indexed_ones_kept(node: RunningNode) -> None:
    for _ in range(3):
        assert store(node, ct_dataset()) == Status.SUCCESS
    with node.archive.sessions() as session:
        indexed = set(session.scalars(select(Instance.blob_key)))
    # what a crash between a blob's write and its commit leaves behind
    old_orphan = node.archive.blobs.put_bytes(b"never indexed", "1.2.3.4").key
    young_orphan = node.archive.blobs.put_bytes(b"maybe in flight", "1.2.3.5").key
    for key in [*indexed, old_orphan]:
        _age(node, key, 2 * node.archive.ORPHAN_MIN_AGE)

    assert node.archive.remove_orphan_blobs(wait=False) == 1
    assert set(node.archive.blobs.keys()) == indexed | {young_orphan}
    # the young one goes once it is old enough and still unnamed
    assert node.archive.remove_orphan_blobs(min_age=0.5, wait=True) == 1
    assert set(node.archive.blobs.keys()) == indexed
    # set aside, never deleted: an index older than the store names none of the newer ones
    aside = node.archive.blobs.root / node.archive.blobs.SET_ASIDE
    assert {p.name for p in aside.iterdir()} == {old_orphan, young_orphan}
    with open(aside / old_orphan, "rb") as sealed:
        assert b"".join(node.archive.blobs._key.open(sealed, f"{old_orphan}\n1.2.3.4".encode()))


def test_an_empty_index_removes_no_blob(node: RunningNode) -> None:
    """A lost index names no blob: every one would have gone as an orphan."""
    for _ in range(2):
        assert store(node, ct_dataset()) == Status.SUCCESS
    stored = set(node.archive.blobs.keys())
    with node.archive.sessions() as session:
        for table in (Instance, Series, Study, Patient):
            session.execute(delete(table))
        session.commit()
    for key in stored:
        _age(node, key, 2 * node.archive.ORPHAN_MIN_AGE)
    assert node.archive.remove_orphan_blobs(wait=False) == 0
    assert set(node.archive.blobs.keys()) == stored


def test_compressed_blobs_the_index_does_not_know_are_kept(node: RunningNode) -> None:
    """After a rebuild without the identity key (say) the index lacks sealed instances:
    their blobs are no crash's leftovers. A compression's leftover (its instance indexed)
    and a C-STORE's (an original) still go."""
    for _ in range(3):
        assert store(node, ct_dataset()) == Status.SUCCESS
    codec = node.archive.compressing_codec()
    assert compress_pending(node.archive, codec).compressed == 3
    with node.archive.sessions() as session:
        rows = list(session.scalars(select(Instance).order_by(Instance.id)))
        session.expunge_all()
    unknown, known = rows[0], rows[1]
    with node.archive.sessions() as session:
        session.execute(delete(Instance).where(Instance.id == unknown.id))
        session.commit()
    again = codec.encode(node.archive.load_part10(known))  # a compression whose swap failed
    leftover = node.archive.blobs.put_bytes(again, known.sop_instance_uid).key
    original = node.archive.blobs.put_bytes(b"never indexed", "1.2.3.4").key
    for key in [*(row.blob_key for row in rows), leftover, original]:
        _age(node, key, 2 * node.archive.ORPHAN_MIN_AGE)

    assert node.archive.remove_orphan_blobs(wait=False) == 2
    assert not node.archive.blobs.exists(leftover) and not node.archive.blobs.exists(original)
    assert set(node.archive.blobs.keys()) == {row.blob_key for row in rows}


def test_the_index_database_is_private(node: RunningNode) -> None:
    assert store(node, ct_dataset()) == Status.SUCCESS
    data_dir = node.settings.storage.data_dir
    assert data_dir.stat().st_mode & 0o077 == 0
    url = make_url(node.settings.storage.resolved_database_url())
    if url.get_backend_name() == "sqlite":
        database = Path(str(url.database))
        files = list(database.parent.glob(database.name + "*"))
        assert files, "no SQLite files found"
        for path in files:
            assert path.stat().st_mode & 0o077 == 0, path


def test_a_compressed_blob_whose_row_names_a_lost_original_is_kept(node: RunningNode) -> None:
    """An index restored from a backup older than the compression names the original,
    which compression removed: the unindexed compressed blob is the only copy."""
    assert store(node, ct_dataset()) == Status.SUCCESS
    (before,) = _rows_of(node)
    assert compress_pending(node.archive, node.archive.compressing_codec()).compressed == 1
    (after,) = _rows_of(node)
    assert not node.archive.blobs.exists(before.blob_key)
    with node.archive.sessions() as session:  # the old index, restored
        session.execute(
            update(Instance)
            .where(Instance.id == after.id)
            .values(blob_key=before.blob_key, codec_id=before.codec_id)
        )
        session.commit()
    _age(node, after.blob_key, 2 * node.archive.ORPHAN_MIN_AGE)
    assert node.archive.remove_orphan_blobs(wait=False) == 0
    assert node.archive.blobs.exists(after.blob_key)


def _rows_of(node: RunningNode) -> list[Instance]:
    with node.archive.sessions() as session:
        rows = list(session.scalars(select(Instance).order_by(Instance.id)))
        session.expunge_all()
    return rows
