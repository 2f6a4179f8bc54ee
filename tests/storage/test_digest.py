"""ConcurrentSha256: the same digest as hashlib, whatever the updates and threads."""

from __future__ import annotations

import hashlib
import os
import threading

from medzip_scp.storage.digest import ConcurrentSha256


def test_ordered_updates_give_hashlibs_digest() -> None:
    data = os.urandom(3_000_017)
    digest = ConcurrentSha256()
    view = memoryview(data)
    for start in range(0, len(data), 65_537):  # many updates, each queued behind the last
        digest.update(view[start : start + 65_537])
    digest.update(b"")
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_empty_and_repeated_hexdigest() -> None:
    digest = ConcurrentSha256()
    assert digest.hexdigest() == hashlib.sha256().hexdigest()
    digest.update(b"abc")
    assert digest.hexdigest() == digest.hexdigest() == hashlib.sha256(b"abc").hexdigest()


def test_many_threads_hash_side_by_side() -> None:
    """More concurrent digests than pool workers: each still equals hashlib's."""
    payloads = [os.urandom(200_000 + i) for i in range(12)]
    results: dict[int, str] = {}

    def work(i: int) -> None:
        digest = ConcurrentSha256()
        digest.update(payloads[i][:1000])
        digest.update(payloads[i][1000:])
        results[i] = digest.hexdigest()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: hashlib.sha256(p).hexdigest() for i, p in enumerate(payloads)}
