"""Data set references: the bytes a series' blobs code their headers against, kept once.

A series' headers are nearly identical, so each blob's non-pixel data is coded against one
instance's (``DATASET`` method 2, :mod:`medzip_scp.codec.container`) and holds only the
differences; the reference itself lives here, under ``<blob root>/refs/``:

* **content-addressed, written once.** A reference is named by its sha256 (through the blob
  key, so file names reveal nothing) and never changes: an instance replaced, a series grown
  or a reference made again by another process touch no blob that needs it. Any blob
  decodes with one read of this folder (cached).
* **sealed and durable** like a blob (zstd-compressed inside the seal): written under a
  temporary name, fsynced and renamed, so a crash leaves the whole reference or none; the
  compression swap that first names it commits after :meth:`ReferenceStore.put` returns.
* **never deleted** while the store keeps blobs: they are a few per series (kilobytes), and
  blobs of superseded instances may name them too.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

import zstandard

from medzip_scp.storage.envelope import BlobKey
from medzip_scp.storage.fsync import fsync

FOLDER = "refs"


def _binding(sha256: bytes) -> bytes:
    return b"dataset-reference\n" + sha256.hex().encode()


class ReferenceStore:
    """Sealed references under ``folder``, by sha256; reads are cached (``cache_bytes``)."""

    def __init__(self, folder: Path, key: BlobKey, cache_bytes: int = 64 << 20) -> None:
        self.folder = folder
        self._key = key
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached = 0
        self._cache_bytes = cache_bytes
        self._lock = threading.Lock()

    def _path(self, sha256: bytes) -> Path:
        return self.folder / self._key.file_name(_binding(sha256))

    def put(self, data: bytes) -> bytes:
        """Keep ``data`` durably (once: a reference already kept is not written again);
        returns its sha256."""
        sha = hashlib.sha256(data).digest()
        final = self._path(sha)
        if final.exists():
            return sha
        if not self.folder.exists():
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync(self.folder.parent, os.O_DIRECTORY)
        temporary = self.folder / f".{uuid.uuid4().hex}.tmp"
        try:
            packed = zstandard.ZstdCompressor(level=19).compress(data)
            with open(temporary, "xb") as fh:
                for sealed in self._key.seal([packed], _binding(sha)):
                    fh.write(sealed)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, final)  # two processes may write the same one: same bytes
        finally:
            temporary.unlink(missing_ok=True)
        fsync(self.folder, os.O_DIRECTORY)
        self._remember(sha, data)
        return sha

    def get(self, sha256: bytes) -> bytes | None:
        """The reference with this sha256, or None when the store has none.

        Raises
        ------
        EnvelopeError
            The file is not the reference it is named for (altered, moved, another key).
        """
        with self._lock:
            found = self._cache.get(sha256)
            if found is not None:
                self._cache.move_to_end(sha256)
                return found
        try:
            fh = open(self._path(sha256), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with fh:
            packed = b"".join(self._key.open(fh, _binding(sha256)))
        # authenticated: the bytes are the ones sealed under this name
        data = zstandard.ZstdDecompressor().decompress(packed)
        self._remember(sha256, data)
        return data

    def discard(self, sha256: bytes) -> None:
        """Delete a reference no blob names (one made by two processes at once: the one
        not recorded for its series goes before any blob is coded against it)."""
        with self._lock:
            self._cached -= len(self._cache.pop(sha256, b""))
        self._path(sha256).unlink(missing_ok=True)
        fsync(self.folder, os.O_DIRECTORY)

    def _remember(self, sha256: bytes, data: bytes) -> None:
        with self._lock:
            if sha256 in self._cache or len(data) > self._cache_bytes:
                return
            self._cache[sha256] = data
            self._cached += len(data)
            while self._cached > self._cache_bytes:
                self._cached -= len(self._cache.popitem(last=False)[1])

    def _files(self) -> list[Path]:
        """The references' files (not a temporary one being written)."""
        return [p for p in self.folder.glob("*") if len(p.name) == 32]

    def count(self) -> int:
        """How many references the store keeps."""
        return len(self._files())

    def stored_bytes(self) -> int:
        """Their size on disk, sealed."""
        return sum(p.stat().st_size for p in self._files())
