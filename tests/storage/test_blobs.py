"""Sealed blob store: round trips, tamper detection, durability layout."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from medzip_scp.storage.envelope import (
    HEADER,
    LEGACY_MAGIC,
    SEGMENT_SIZE,
    BlobKey,
    EnvelopeError,
)
from medzip_scp.storage.local import (
    BlobNotFoundError,
    KeyFileError,
    LocalBlobStore,
    _DirectWriter,
    open_blob_key,
)

UID = "1.2.826.0.1.3680043.8.498.1"  # the instance a test blob is bound to


@pytest.fixture(params=["direct I/O where supported", "buffered"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalBlobStore:
    blobs = LocalBlobStore(tmp_path / "blobs", BlobKey.create(tmp_path / "key"))
    if request.param == "buffered":
        blobs._direct_io = False
    return blobs


@pytest.mark.parametrize(
    "size", [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 3 * SEGMENT_SIZE]
)
def test_round_trip_at_segment_boundaries(store: LocalBlobStore, size: int) -> None:
    data = os.urandom(size)
    blob = store.put_bytes(data, UID)
    assert store.read(blob.key, UID) == data
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
    chunked = store.put(chunks, UID)
    whole = store.put_bytes(data, UID)
    assert store.read(chunked.key, UID) == data
    # same segmentation whatever the chunking: same sealed size, same plaintext hash
    assert chunked.stored_size == whole.stored_size
    assert chunked.sha256 == whole.sha256


def test_plaintext_not_on_disk(store: LocalBlobStore) -> None:
    secret = b"Doe^Jane PID-12345 " * 100
    blob = store.put_bytes(secret, UID)
    assert b"Doe^Jane" not in store._path(blob.key).read_bytes()


@pytest.mark.parametrize("where", ["header", "first_segment", "tag", "truncate", "append"])
def test_tampering_is_detected(store: LocalBlobStore, where: str) -> None:
    blob = store.put_bytes(os.urandom(SEGMENT_SIZE + 1000), UID)
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
        store.read(blob.key, UID)


def test_wrong_key_is_refused(tmp_path: Path, store: LocalBlobStore) -> None:
    blob = store.put_bytes(b"x" * 100, UID)
    other = LocalBlobStore(store.root, BlobKey(os.urandom(32)))
    with pytest.raises(EnvelopeError, match="sealed with key"):
        other.read(blob.key, UID)


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "blob.key"
    first = BlobKey.create(path)
    assert path.stat().st_mode & 0o077 == 0
    assert BlobKey.load(path).key_id == first.key_id
    assert path.read_text().strip() not in repr(first)


def test_missing_blob(store: LocalBlobStore) -> None:
    with pytest.raises(BlobNotFoundError):
        store.read("0" * 32, UID)
    with pytest.raises(ValueError):
        store.read("../../etc/passwd", UID)


def test_batch_shares_a_folder_and_syncs(store: LocalBlobStore) -> None:
    blobs = [store.write([os.urandom(1000)], UID) for _ in range(3)]
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
    blob = blobs.put_bytes(b"x" * 5000, UID)
    assert blobs.read(blob.key, UID) == b"x" * 5000
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
    blob = store.put_bytes(b"z" * 9000, UID)
    assert store.read(blob.key, UID) == b"z" * 9000


def test_a_blob_opens_only_under_its_own_name_and_instance(store: LocalBlobStore) -> None:
    first = store.put_bytes(b"first patient's image", UID)
    second = store.put_bytes(b"second patient's image", UID + "9")
    with pytest.raises(EnvelopeError, match="not the blob of this name and instance"):
        store.read(first.key, UID + "9")  # a row pointing at another instance's blob
    # the two files swapped on disk: each name now holds the other's sealed bytes
    a, b = store._path(first.key), store._path(second.key)
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    with pytest.raises(EnvelopeError):
        store.read(first.key, UID)
    with pytest.raises(EnvelopeError):
        store.read(second.key, UID + "9")


def test_format_1_blobs_still_open(store: LocalBlobStore, tmp_path: Path) -> None:
    """Blobs sealed before binding existed (MZE1: no name or instance in the associated
    data) must decode forever. Sealed here by hand, as format 1 wrote them."""
    key_material = bytes(range(32))
    key = BlobKey(key_material)
    header = HEADER.pack(LEGACY_MAGIC, key.key_id, b"\x07" * 8, SEGMENT_SIZE)
    plaintext = os.urandom(SEGMENT_SIZE + 99)
    sealed = bytearray(header)
    for index, part in enumerate((plaintext[:SEGMENT_SIZE], plaintext[SEGMENT_SIZE:])):
        nonce = header[12:20] + struct.pack(">I", index)
        aad = header + struct.pack("<I?", index, index == 1)
        sealed += AESGCM(key_material).encrypt(nonce, part, aad)
    legacy = LocalBlobStore(tmp_path / "legacy", key)
    path = legacy._path("ab" + "0" * 30)
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(sealed))
    assert legacy.read("ab" + "0" * 30, UID) == plaintext


def test_a_missing_key_is_created_only_for_an_empty_store(tmp_path: Path) -> None:
    key_file, root = tmp_path / "keys" / "blob.key", tmp_path / "blobs"
    key = open_blob_key(key_file, root)
    assert open_blob_key(key_file, root).key_id == key.key_id
    LocalBlobStore(root, key).put_bytes(b"acknowledged", UID)
    key_file.rename(tmp_path / "elsewhere.key")
    with pytest.raises(KeyFileError, match=f"missing.*key id {key.key_id.hex()}"):
        open_blob_key(key_file, root)
    assert not key_file.exists()  # nothing was created
    BlobKey.create(key_file)  # a new key in the old place: refused as well
    with pytest.raises(KeyFileError, match=f"sealed with key id {key.key_id.hex()}"):
        open_blob_key(key_file, root)


@pytest.mark.parametrize(
    "size", [0, 1, 15, 16, 17, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 2 * SEGMENT_SIZE]
)
@pytest.mark.parametrize("limit", [None, 0, 4, 16, SEGMENT_SIZE, SEGMENT_SIZE + 5])
def test_unauthenticated_read_gives_the_plaintext(
    store: LocalBlobStore, size: int, limit: int | None
) -> None:
    data = os.urandom(size)
    blob = store.put_bytes(data, UID)
    assert store.read_unauthenticated(blob.key, limit) == data[:limit]


def test_unauthenticated_read_checks_nothing_but_the_key(store: LocalBlobStore) -> None:
    data = os.urandom(SEGMENT_SIZE + 1000)
    blob = store.put_bytes(data, UID)
    path = store._path(blob.key)
    raw = bytearray(path.read_bytes())
    raw[HEADER.size + 100] ^= 1  # a flipped ciphertext bit flips that plaintext bit (CTR)
    raw[-1] ^= 1  # and a tag: not looked at
    path.write_bytes(bytes(raw))
    altered = bytearray(data)
    altered[100] ^= 1
    assert store.read_unauthenticated(blob.key) == altered
    with pytest.raises(EnvelopeError):
        store.read(blob.key, UID)  # the authenticated read refuses it
    other = LocalBlobStore(store.root, BlobKey(os.urandom(32)))
    with pytest.raises(EnvelopeError, match="sealed with key"):
        other.read_unauthenticated(blob.key)
    with pytest.raises(BlobNotFoundError):
        store.read_unauthenticated("0" * 32)
