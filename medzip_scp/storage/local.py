"""Blob store on a local file system: sealed, written durably, addressed by random keys.

Durability order (the node acknowledges C-STORE only after it): write the sealed blob, fsync
it and its directories, and only then commit the index row that names it. Keys are random so
that file names reveal nothing about patients or studies.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from medzip_scp.storage.envelope import BlobKey


class BlobNotFoundError(KeyError):
    """The index names a blob that is not in the store."""


@dataclass(frozen=True)
class StoredBlob:
    key: str
    stored_size: int  # bytes on disk, sealed
    sha256: str  # of the plaintext
    size: int  # plaintext bytes


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    """Sealed blobs under ``root/ab/<key>`` (256 folders, so new folders are rare)."""

    def __init__(self, root: Path, key: BlobKey) -> None:
        self.root = root
        self._key = key
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if len(key) != 32 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"blob key must be 32 lowercase hex digits, got {key!r}")
        return self.root / key[:2] / key

    def write(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Seal and write a new blob under its final name, *not yet durable*.

        Nothing refers to the new key until the caller has called :meth:`sync` and committed
        an index row naming it, so a crash before then leaves only an unreferenced file, never
        a referenced partial one; that is why no temporary name and rename are needed.
        """
        key = uuid.uuid4().hex
        final = self._path(key)
        digest = hashlib.sha256()
        size = 0

        def plaintext() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                yield chunk

        stored = 0
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(final, "xb") as fh:
                for sealed in self._key.seal(plaintext()):
                    fh.write(sealed)
                    stored += len(sealed)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return StoredBlob(key=key, stored_size=stored, sha256=digest.hexdigest(), size=size)

    def sync(self, keys: Iterable[str]) -> None:
        """Make written blobs durable, with their directory entries.

        On Linux one ``syncfs`` flushes the blob file system once for the whole batch: each
        ``fsync`` costs a device cache flush (about 3-4 ms on a VM disk), so syncing N files
        and their directories one by one costs N+ flushes where ``syncfs`` costs one (group
        commit). Elsewhere each file and each of its directories is fsynced.
        """
        paths = [self._path(key) for key in keys]
        if not paths:
            return
        if _syncfs is not None:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if _syncfs(fd) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"syncfs of the blob store failed: {os.strerror(error)}")
            finally:
                os.close(fd)
            return
        directories: set[Path] = set()
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            directories.update((path.parent, self.root))
        for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(directory)

    def put(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Seal and durably write a new blob; returns once it is on stable storage."""
        blob = self.write(chunks)
        try:
            self.sync([blob.key])
        except BaseException:
            self.delete(blob.key)
            raise
        return blob

    def put_bytes(self, data: bytes) -> StoredBlob:
        return self.put([data])

    def read_chunks(self, key: str) -> Iterator[bytes]:
        """Open a blob and yield its plaintext; raises EnvelopeError on tampering."""
        path = self._path(key)
        if not path.exists():
            raise BlobNotFoundError(key)
        with open(path, "rb") as fh:
            yield from self._key.open(fh)

    def read(self, key: str) -> bytes:
        return b"".join(self.read_chunks(key))

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def stored_size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def keys(self) -> Iterator[str]:
        for path in self.root.glob("??/*"):
            if path.is_file():
                yield path.name
