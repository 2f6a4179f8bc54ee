"""Sealed blob store: round trips, tamper detection, durability layout."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from medzip_scp.storage.envelope import SEGMENT_SIZE, BlobKey, EnvelopeError
from medzip_scp.storage.local import BlobNotFoundError, LocalBlobStore, _DirectWriter


@pytest.fixture(params=["direct I/O where supported", "buffered"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalBlobStore:
    blobs = LocalBlobStore(tmp_path / "blobs", BlobKey.load_or_create(tmp_path / "key"))
    if request.param == "buffered":
        blobs._direct_io = False
    return blobs


@pytest.mark.parametrize(
    "size", [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 3 * SEGMENT_SIZE]
)
def test_round_trip_at_segment_boundaries(store: LocalBlobStore, size: int) -> None:
    data = os.urandom(size)
    blob = store.put_bytes(data)
    assert store.read(blob.key) == data
    assert blob.size == size
    assert blob.stored_size == store.stored_size(blob.key)
    assert list(store.keys()) == [blob.key]


@pytest.mark.parametrize(
    ("total", "step"),
    [
        (2 * SEGMENT_SIZE + 17, 70_001),  # segments straddle chunks
        (2 * SEGMENT_SIZE, SEGMENT_SIZE),  # chunks are exactly segments
        (2 * SEGMENT_SIZE, SEGMENT_SIZE // 2),  # chunks fill a segment exactly
        (3 * SEGMENT_SIZE + 5, 2 * SEGMENT_SIZE + 1),  # chunks larger than a segment
        (SEGMENT_SIZE + 1, 1 << 14),
    ],
)
def test_chunked_input_equals_whole(store: LocalBlobStore, total: int, step: int) -> None:
    data = os.urandom(total)
    chunks = [data[i : i + step] for i in range(0, len(data), step)] + [b""]
    chunked = store.put(chunks)
    whole = store.put_bytes(data)
    assert store.read(chunked.key) == data
    # same segmentation whatever the chunking: same sealed size, same plaintext hash
    assert chunked.stored_size == whole.stored_size
    assert chunked.sha256 == whole.sha256


def test_plaintext_not_on_disk(store: LocalBlobStore) -> None:
    secret = b"Doe^Jane PID-12345 " * 100
    blob = store.put_bytes(secret)
    assert b"Doe^Jane" not in store._path(blob.key).read_bytes()


@pytest.mark.parametrize("where", ["header", "first_segment", "tag", "truncate", "append"])
def test_tampering_is_detected(store: LocalBlobStore, where: str) -> None:
    blob = store.put_bytes(os.urandom(SEGMENT_SIZE + 1000))
    path = store._path(blob.key)
    raw = bytearray(path.read_bytes())
    if where == "header":
        raw[10] ^= 1
    elif where == "first_segment":
        raw[100] ^= 1
    elif where == "tag":
        raw[-1] ^= 1
    elif where == "truncate":
        raw = raw[: 24 + SEGMENT_SIZE + 16]  # drop the final segment whole
    else:
        raw += raw[24 : 24 + 100]
    path.write_bytes(bytes(raw))
    with pytest.raises(EnvelopeError):
        store.read(blob.key)


def test_wrong_key_is_refused(tmp_path: Path, store: LocalBlobStore) -> None:
    blob = store.put_bytes(b"x" * 100)
    other = LocalBlobStore(store.root, BlobKey(os.urandom(32)))
    with pytest.raises(EnvelopeError, match="sealed with key"):
        other.read(blob.key)


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "blob.key"
    first = BlobKey.load_or_create(path)
    assert path.stat().st_mode & 0o077 == 0
    assert BlobKey.load_or_create(path).key_id == first.key_id
    assert path.read_text().strip() not in repr(first)


def test_missing_blob(store: LocalBlobStore) -> None:
    with pytest.raises(BlobNotFoundError):
        store.read("0" * 32)
    with pytest.raises(ValueError):
        store.read("../../etc/passwd")


def test_batch_shares_a_folder_and_syncs(store: LocalBlobStore) -> None:
    blobs = [store.write([os.urandom(1000)]) for _ in range(3)]
    store.sync(b.key for b in blobs)
    assert sorted(store.keys()) == sorted(b.key for b in blobs)
    assert len({store._path(b.key).parent for b in blobs}) <= 2  # unless a minute turned over


@pytest.mark.parametrize(
    "sizes", [[0], [1], [4095, 1], [_DirectWriter.BUFFER - 1, 2], [3 * _DirectWriter.BUFFER + 7]]
)
def test_direct_writer_writes_exactly_what_it_was_given(tmp_path: Path, sizes: list[int]) -> None:
    chunks = [os.urandom(n) for n in sizes]
    path = tmp_path / "direct"
    try:
        writer = _DirectWriter(path)
    except OSError:
        pytest.skip("no O_DIRECT on this file system")
    for chunk in chunks:
        writer.write(chunk)
    writer.close()
    assert path.read_bytes() == b"".join(chunks)  # padding of the last block truncated away


def test_store_falls_back_to_buffered_writes_without_direct_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: _DirectWriter, path: Path) -> None:
        raise OSError(errno.EINVAL, "O_DIRECT not supported")  # as older tmpfs answers

    monkeypatch.setattr(_DirectWriter, "__init__", refuse)
    blobs = LocalBlobStore(tmp_path / "blobs", BlobKey(os.urandom(32)))
    assert not blobs._direct_io
    blob = blobs.put_bytes(b"x" * 5000)
    assert blobs.read(blob.key) == b"x" * 5000
    assert not list(blobs.root.glob(".direct-io-probe-*"))


def test_direct_writer_after_a_failed_write_only_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        writer = _DirectWriter(tmp_path / "full")
    except OSError:
        pytest.skip("no O_DIRECT on this file system")

    def disk_full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError) as failed:
        writer.write(os.urandom(_DirectWriter.BUFFER + 10))
    assert failed.value.errno == errno.ENOSPC
    writer.close()  # no second write of the stale buffer, no other error
    writer.close()  # and a second close does nothing (its buffer went back to the pool once)


def test_a_folder_refusing_direct_io_gets_buffered_writes(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: _DirectWriter, path: Path) -> None:
        path.touch()  # as open(O_CREAT | O_DIRECT) may leave it
        raise OSError(errno.EINVAL, "O_DIRECT not supported")

    monkeypatch.setattr(_DirectWriter, "__init__", refuse)
    blob = store.put_bytes(b"z" * 9000)
    assert store.read(blob.key) == b"z" * 9000
