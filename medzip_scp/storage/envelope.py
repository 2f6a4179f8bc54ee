"""Encryption at rest for blobs: streaming AES-256-GCM in fixed-size segments.

A stolen blob folder must not leak PHI, so every blob is sealed with the node's key before it
touches the blob store. Layout::

    b"MZE1" | key id (8 bytes) | nonce prefix (8 bytes) | segment size (u32 LE)
    then segments: AES-GCM(plaintext[i*S:(i+1)*S]) with a 16-byte tag each

The nonce of segment i is ``prefix || i (u32 BE)``; the associated data binds the header, the
segment index and a final-segment flag, so reordering, truncation and appending are detected.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"MZE1"
HEADER = struct.Struct("<4s8s8sI")
SEGMENT_SIZE = 1 << 20
TAG_SIZE = 16


class EnvelopeError(Exception):
    """A sealed blob cannot be opened (wrong key, corruption, truncation)."""


class BlobKey:
    """The node's 256-bit blob key. Its repr never shows the key material."""

    def __init__(self, material: bytes) -> None:
        if len(material) != 32:
            raise ValueError(f"blob key must be 32 bytes, got {len(material)}")
        self._aead = AESGCM(material)
        self.key_id = hashlib.sha256(b"medzip-key-id" + material).digest()[:8]

    def __repr__(self) -> str:
        return f"BlobKey(id={self.key_id.hex()})"

    @classmethod
    def load_or_create(cls, path: Path) -> BlobKey:
        """Read the key file, creating it (mode 0600) on first start."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(32).hex().encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        text = path.read_text().strip()
        try:
            material = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"key file {path} must hold 64 hex digits") from None
        return cls(material)

    def _aad(self, header: bytes, index: int, final: bool) -> bytes:
        return header + struct.pack("<I?", index, final)

    def seal(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Encrypt a stream of plaintext chunks; yields the sealed stream.

        A chunk must not change once yielded (``bytes`` never do): parts of it are held
        until the next chunk arrives.
        """
        header = HEADER.pack(MAGIC, self.key_id, secrets.token_bytes(8), SEGMENT_SIZE)
        prefix = header[12:20]
        yield header
        # Segments are cut from each chunk by memoryview (no copy); only a segment that
        # straddles two chunks is assembled, in `pending`. The rest of the latest chunk is
        # held as a view until the next chunk (or the end) shows whether it is final.
        pending = bytearray()
        held = memoryview(b"")
        index = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            if not len(view):
                continue
            if len(held):
                pending += held
                held = memoryview(b"")
            if pending:
                take = SEGMENT_SIZE - len(pending)
                pending += view[:take]
                view = view[take:]
                if not len(view):
                    continue  # `pending` may be the final segment: wait for more
                yield self._encrypt(header, prefix, index, pending, False)
                index += 1
                pending = bytearray()
            # Strictly greater: the final segment is never empty unless the whole blob is.
            while len(view) > SEGMENT_SIZE:
                yield self._encrypt(header, prefix, index, view[:SEGMENT_SIZE], False)
                view = view[SEGMENT_SIZE:]
                index += 1
            held = view
        yield self._encrypt(header, prefix, index, held if len(held) else pending, final=True)

    def _encrypt(
        self,
        header: bytes,
        prefix: bytes,
        index: int,
        data: bytes | bytearray | memoryview,
        final: bool,
    ) -> bytes:
        nonce = prefix + struct.pack(">I", index)
        return self._aead.encrypt(nonce, data, self._aad(header, index, final))

    def open(self, stream: BinaryIO) -> Iterator[bytes]:
        """Decrypt a sealed stream chunk by chunk; raises EnvelopeError on any tampering."""
        header = stream.read(HEADER.size)
        if len(header) != HEADER.size:
            raise EnvelopeError("sealed blob is shorter than its header")
        magic, key_id, prefix, segment_size = HEADER.unpack(header)
        if magic != MAGIC:
            raise EnvelopeError(f"not a sealed blob: magic {magic!r}, expected {MAGIC!r}")
        if key_id != self.key_id:
            raise EnvelopeError(
                f"blob sealed with key {key_id.hex()}, node key is {self.key_id.hex()}"
            )
        index = 0
        record = segment_size + TAG_SIZE
        current = stream.read(record)
        while True:
            nxt = stream.read(record)
            final = not nxt
            nonce = prefix + struct.pack(">I", index)
            try:
                yield self._aead.decrypt(nonce, current, self._aad(header, index, final))
            except Exception as exc:  # InvalidTag carries no message
                raise EnvelopeError(f"segment {index} failed authentication") from exc
            if final:
                return
            current = nxt
            index += 1
