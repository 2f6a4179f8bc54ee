"""The C-STORE group commit: handlers take turns leading, batches form under load, and a
failing request fails alone."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from medzip_scp.archive import StoreOutcome, StoreResult, _GroupCommitter, _StoreRequest


def _request(uid: str) -> _StoreRequest:
    attrs: Any = type("Attrs", (), {"sop_instance_uid": uid})()
    return _StoreRequest(
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

    def __call__(self, batch: list[_StoreRequest]) -> list[StoreOutcome]:
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
    committer: _GroupCommitter, uids: list[str]
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
    results = _submit_concurrently(_GroupCommitter(commit), uids)
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
    results = _submit_concurrently(_GroupCommitter(commit), uids)
    assert isinstance(results.pop("1.2.3"), OSError)
    assert all(isinstance(r, StoreOutcome) for r in results.values())


def test_a_lone_request_commits_on_its_own_thread() -> None:
    commit = _RecordingCommit()
    committer = _GroupCommitter(commit)
    assert committer.submit(_request("1.2.9")).result is StoreResult.STORED
    assert commit.batches == [(["1.2.9"], threading.current_thread().name)]
    with pytest.raises(OSError):
        _GroupCommitter(_RecordingCommit(bad="1.2.9")).submit(_request("1.2.9"))
