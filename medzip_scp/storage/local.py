"""Blob store on a local file system: sealed, written durably, addressed by random keys.

Durability order (the node acknowledges C-STORE only after it): write a temporary file in the
store, fsync it, rename it into place, fsync the directory. Keys are random so that file names
reveal nothing about patients or studies.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    """Sealed blobs under ``root/ab/cd/<key>``."""

    def __init__(self, root: Path, key: BlobKey) -> None:
        self.root = root
        self._key = key
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if len(key) != 32 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"blob key must be 32 lowercase hex digits, got {key!r}")
        return self.root / key[:2] / key[2:4] / key

    def put(self, chunks: Iterable[bytes]) -> StoredBlob:
        """Seal and durably write a new blob; returns once it is on stable storage."""
        key = uuid.uuid4().hex
        final = self._path(key)
        tmp = self._tmp / f"{key}.part"
        digest = hashlib.sha256()
        size = 0

        def plaintext() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                yield chunk

        stored = 0
        try:
            with open(tmp, "wb") as fh:
                for sealed in self._key.seal(plaintext()):
                    fh.write(sealed)
                    stored += len(sealed)
                fh.flush()
                os.fsync(fh.fileno())
            new_dirs = [p for p in (final.parent.parent, final.parent) if not p.exists()]
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            for created in reversed(new_dirs):
                _fsync_dir(created.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StoredBlob(key=key, stored_size=stored, sha256=digest.hexdigest(), size=size)

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
        for path in self.root.glob("??/??/*"):
            if path.is_file():
                yield path.name
