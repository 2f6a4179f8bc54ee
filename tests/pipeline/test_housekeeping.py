"""Start-up housekeeping: blobs orphaned by a crash are removed (only those no row names),
and the index database is private to its owner."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url

from medzip_scp.index.models import Instance
from medzip_scp.net.status import Status
from tests.net.conftest import RunningNode
from tests.net.test_store import ct_dataset, store


def _age(node: RunningNode, key: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(node.archive.blobs._path(key), (then, then))


def test_orphaned_blobs_are_removed_and_indexed_ones_kept(node: RunningNode) -> None:
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
