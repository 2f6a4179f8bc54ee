"""``medzip verify`` on a live node: compression moving rows to new blobs while verify runs
is never reported as damage (it was: "blob unreadable" for instances that were fine)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from medzip_scp.identity.instance import Verdict
from medzip_scp.index.models import Instance
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import CompressionSummary, compress_instance, compress_pending
from medzip_scp.pipeline.verify import verify_archive, verify_instance
from tests.helpers.node import RunningNode
from tests.helpers.scu import ct_dataset, store


def _rows(node: RunningNode) -> list[Instance]:
    with node.archive.sessions() as session:
        rows = list(session.scalars(select(Instance).order_by(Instance.id)))
        session.expunge_all()
        return rows


def test_a_row_read_before_compression_is_checked_as_it_is_now(node: RunningNode) -> None:
    assert store(node, ct_dataset()) == Status.SUCCESS
    (stale,) = _rows(node)  # verify has read the row...
    summary = CompressionSummary()
    compress_instance(node.archive, node.archive.compressing_codec(), stale.id, summary)
    assert summary.compressed == 1  # ...and the original blob is gone before it is read
    assert not node.archive.blobs.exists(stale.blob_key)
    assert verify_instance(node.archive, stale) == (Verdict.OK, "")


@pytest.mark.slow
def test_verify_during_compression_reports_nothing_false(node: RunningNode) -> None:
    for _ in range(6):
        assert store(node, ct_dataset()) == Status.SUCCESS
    done = threading.Event()
    compressed: list[int] = []

    def compress() -> None:
        try:
            compressed.append(
                compress_pending(node.archive, node.archive.compressing_codec()).compressed
            )
        finally:
            done.set()

    worker = threading.Thread(target=compress)
    worker.start()
    passes, problems = 0, []
    while not done.is_set() or passes == 0:
        report = verify_archive(node.archive)
        passes += 1
        problems += report.problems
        assert report.checked == 6
    worker.join()
    assert compressed == [6]
    assert problems == [], f"false damage in {passes} verify passes during compression"
    assert verify_archive(node.archive).ok


def test_an_unreadable_blob_is_a_finding_not_an_abort(node: RunningNode) -> None:
    for _ in range(2):
        assert store(node, ct_dataset()) == Status.SUCCESS
    first, second = _rows(node)
    path = node.archive.blobs._path(first.blob_key)
    path.unlink()
    path.mkdir()  # reading it raises IsADirectoryError, an OSError
    report = verify_archive(node.archive)
    assert report.checked == 2 and report.ok_count == 1
    assert report.problems == [(first.sop_instance_uid, "blob unreadable (IsADirectoryError)")]
