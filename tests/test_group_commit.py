"""The C-STORE group commit: handlers take turns leading, batches form under load, a
failing request fails alone, and a commit reported as failed that went through loses
nothing."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from medzip_scp.archive import (
    Archive,
    BlobsNotDurableError,
    StoreOutcome,
    StoreRequest,
    StoreResult,
)
from medzip_scp.config import Settings, StorageSettings
from medzip_scp.dicom.part10 import ReceivedObject, read_received
from medzip_scp.group_commit import GroupCommitter
from medzip_scp.index.ingest import attributes_from_dataset
from medzip_scp.index.models import Instance


def _request(uid: str) -> StoreRequest:
    attrs: Any = type("Attrs", (), {"sop_instance_uid": uid})()
    return StoreRequest(
        received=None,  # type: ignore[arg-type]
        attrs=attrs,
        blob=None,  # type: ignore[arg-type]
        dataset_sha256="",
        calling_ae_title="TEST",
    )


class _RecordingCommit:
    """Commits by recording the batch (and which thread committed it), slowly enough that
    concurrent requests queue behind it; refuses any batch holding ``bad``."""

    def __init__(self, bad: str | None = None) -> None:
        self.batches: list[tuple[list[str], str]] = []
        self.bad = bad
        self.active = 0
        self.overlapped = False
        self._lock = threading.Lock()

    def __call__(self, batch: list[StoreRequest]) -> list[StoreOutcome]:
        with self._lock:
            self.active += 1
            self.overlapped |= self.active > 1
        try:
            time.sleep(0.05)
            uids = [r.attrs.sop_instance_uid for r in batch]
            if self.bad in uids:
                raise OSError("disk full")
            self.batches.append((uids, threading.current_thread().name))
            return [StoreOutcome(StoreResult.STORED, uid) for uid in uids]
        finally:
            with self._lock:
                self.active -= 1


def _submit_concurrently(
    committer: GroupCommitter, uids: list[str]
) -> dict[str, StoreOutcome | BaseException]:
    results: dict[str, StoreOutcome | BaseException] = {}
    start = threading.Barrier(len(uids))

    def handler(uid: str) -> None:
        start.wait()
        try:
            results[uid] = committer.submit(_request(uid))
        except BaseException as exc:
            results[uid] = exc

    threads = [threading.Thread(target=handler, args=(uid,), name=uid) for uid in uids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads), "a handler never returned"
    return results


def test_each_request_gets_its_own_outcome_and_batches_form() -> None:
    commit = _RecordingCommit()
    uids = [f"1.2.{i}" for i in range(8)]
    results = _submit_concurrently(GroupCommitter(commit), uids)
    assert {uid: r.sop_instance_uid for uid, r in results.items()} == {u: u for u in uids}
    committed = [uid for batch, _ in commit.batches for uid in batch]
    assert sorted(committed) == sorted(uids)  # each exactly once
    assert max(len(batch) for batch, _ in commit.batches) > 1
    assert not commit.overlapped  # one leader at a time
    # every batch is committed by a handler thread whose own request is in it
    assert all(thread in batch for batch, thread in commit.batches)


def test_a_failing_request_fails_alone() -> None:
    commit = _RecordingCommit(bad="1.2.3")
    uids = [f"1.2.{i}" for i in range(6)]
    results = _submit_concurrently(GroupCommitter(commit), uids)
    assert isinstance(results.pop("1.2.3"), OSError)
    assert all(isinstance(r, StoreOutcome) for r in results.values())


def test_a_lone_request_commits_on_its_own_thread() -> None:
    commit = _RecordingCommit()
    committer = GroupCommitter(commit)
    assert committer.submit(_request("1.2.9")).result is StoreResult.STORED
    assert commit.batches == [(["1.2.9"], threading.current_thread().name)]
    with pytest.raises(OSError):
        GroupCommitter(_RecordingCommit(bad="1.2.9")).submit(_request("1.2.9"))


# -- against a real archive (SQLite, blob store on disk) ----------------------------------


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive.open(Settings(storage=StorageSettings(data_dir=tmp_path / "data")))


def _spooled(tmp_path: Path, name: str) -> ReceivedObject:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return read_received(path)


def _written_batch(archive: Archive, tmp_path: Path) -> list[StoreRequest]:
    """Two requests whose blobs are written, ready for the committer."""
    batch = []
    for name in ("a", "b"):
        received = _spooled(tmp_path, name)
        attrs = attributes_from_dataset(received.header)
        blob, sha256 = archive._write_original(received, attrs.sop_instance_uid)
        batch.append(StoreRequest(received, attrs, blob, sha256, "TEST"))
    return batch


def _commit_then_fail_once(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first index transaction commits and then reports failure, as when the
    connection to PostgreSQL is lost during COMMIT."""
    real = archive._index_batch
    calls = []

    def index_batch(
        batch: list[StoreRequest], fast: bool, blobs_durable: Callable[[], object]
    ) -> list[StoreOutcome]:
        outcomes = real(batch, fast, blobs_durable)
        calls.append(len(batch))
        if len(calls) == 1:
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return outcomes

    monkeypatch.setattr(archive, "_index_batch", index_batch)


def _indexed_blob(archive: Archive, uid: str) -> str:
    with archive.sessions() as session:
        return session.scalars(
            select(Instance.blob_key).where(Instance.sop_instance_uid == uid)
        ).one()


def test_a_commit_reported_failed_but_done_keeps_its_blob(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    received = _spooled(tmp_path, "a")
    _commit_then_fail_once(archive, monkeypatch)
    with pytest.raises(OperationalError):  # the peer is told it failed, and retries
        archive.store(received, "TEST")
    uid = str(received.header.get("SOPInstanceUID"))
    key = _indexed_blob(archive, uid)
    assert archive.blobs.read(key, uid) == received.path.read_bytes()  # the row's blob is there
    retry = archive.store(received, "TEST")
    assert retry.result is StoreResult.IDENTICAL_DUPLICATE
    assert _indexed_blob(archive, uid) == key
    assert list(archive.blobs.keys()) == [key]  # the retry's copy was not kept


def test_a_batch_reported_failed_but_done_is_stored_on_retry(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _written_batch(archive, tmp_path)
    _commit_then_fail_once(archive, monkeypatch)
    archive._committer._process(batch)  # fails as a whole, then each alone
    assert [r.outcome.result for r in batch if r.outcome] == [StoreResult.STORED] * 2
    for request in batch:
        assert _indexed_blob(archive, request.attrs.sop_instance_uid) == request.blob.key


def test_a_failed_blob_fsync_commits_nothing(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fsyncs run beside the insert; the transaction must still wait for them and
    roll back when one fails."""
    received = _spooled(tmp_path, "a")

    def failing_sync(keys: object) -> None:
        time.sleep(0.05)  # slower than the insert: the commit must wait for it
        raise OSError(errno.EIO, "fsync failed")

    monkeypatch.setattr(archive.blobs, "sync", failing_sync)
    with pytest.raises(OSError):
        archive.store(received, "TEST")
    with archive.sessions() as session:
        assert session.scalars(select(Instance.id)).all() == []
    assert list(archive.blobs.keys()) == []  # nothing half-stored


def test_a_failed_fsync_fails_its_whole_batch_without_retry(
    archive: Archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed fsync a second one may succeed for data the kernel already dropped
    (Linux clears the error): the batch must fail as a whole, not be retried one by one."""
    batch = _written_batch(archive, tmp_path)
    calls = []

    def failing_once(keys: list[str]) -> None:
        calls.append(keys)
        if len(calls) == 1:
            raise OSError(errno.EIO, "fsync failed")

    monkeypatch.setattr(archive.blobs, "sync", failing_once)
    archive._committer._process(batch)
    assert len(calls) == 1
    assert all(isinstance(r.error, BlobsNotDurableError) for r in batch)
    with archive.sessions() as session:
        assert session.scalars(select(Instance.id)).all() == []
