"""Encryption at rest for blobs: streaming AES-256-GCM in fixed-size segments.

A stolen blob folder must not leak PHI, so every blob is sealed with the node's key before it
touches the blob store. Layout::

    b"MZE2" | key id (8 bytes) | nonce prefix (8 bytes) | segment size (u32 LE)
    then segments: AES-GCM(plaintext[i*S:(i+1)*S]) with a 16-byte tag each

The nonce of segment i is ``prefix || i (u32 BE)``; the associated data binds the header, the
segment index and a final-segment flag, so reordering, truncation and appending are detected,
and (format 2) the blob's *binding*: the caller's statement of what this blob is (the store
binds its file name and the SOP Instance UID). A blob moved under another name, or read for
another instance, fails authentication: a swapped file can never be served as another
patient's image. Format 1 (``MZE1``, no binding) is still read.

:meth:`BlobKey.open_unauthenticated` decrypts without checking anything: only to learn which
instance a blob claims to hold (the binding it needs) when no index says so (``medzip db
rebuild``); what is then used is what :meth:`BlobKey.open` gives for that claim.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"MZE2"
LEGACY_MAGIC = b"MZE1"  # written before blobs were bound to their instance; read only
HEADER = struct.Struct("<4s8s8sI")
SEGMENT_SIZE = 1 << 20
TAG_SIZE = 16


class EnvelopeError(Exception):
    """A sealed blob cannot be opened (wrong key, corruption, truncation)."""


def sealed_key_id(stream: BinaryIO) -> bytes | None:
    """The id of the key a sealed stream was sealed with (no key needed), or None when the
    stream is not a sealed blob."""
    header = stream.read(HEADER.size)
    if len(header) != HEADER.size:
        return None
    magic, key_id, _prefix, _size = HEADER.unpack(header)
    return key_id if magic in (MAGIC, LEGACY_MAGIC) else None


def _segment_aad(aad: bytes, index: int, final: bool) -> bytes:
    """A segment's associated data: the blob's (header, binding), its index, final flag."""
    return aad + struct.pack("<I?", index, final)


class BlobKey:
    """The node's 256-bit blob key. Its repr never shows the key material."""

    def __init__(self, material: bytes) -> None:
        if len(material) != 32:
            raise ValueError(f"blob key must be 32 bytes, got {len(material)}")
        self._aead = AESGCM(material)
        self._material = material
        self.key_id = hashlib.sha256(b"medzip-key-id" + material).digest()[:8]

    def __repr__(self) -> str:
        return f"BlobKey(id={self.key_id.hex()})"

    def file_name(self, label: bytes) -> str:
        """A file name for ``label`` (32 hex digits) that only this key's holder can tell
        from the label: keyed, so names in the store reveal nothing of what they hold."""
        return hmac.new(self._material, b"medzip-file-name\n" + label, "sha256").hexdigest()[:32]

    @classmethod
    def load(cls, path: Path) -> BlobKey:
        """Read the key file (64 hex digits)."""
        text = path.read_text().strip()
        try:
            material = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"key file {path} must hold 64 hex digits") from None
        return cls(material)

    @classmethod
    def create(cls, path: Path) -> BlobKey:
        """Write a new random key to ``path`` (mode 0600, fsynced); fails if it exists."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32).hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls.load(path)

    @staticmethod
    def _aad_prefix(header: bytes, binding: bytes) -> bytes:
        if header[:4] == LEGACY_MAGIC:
            return header
        return header + struct.pack("<I", len(binding)) + binding

    def seal(self, chunks: Iterable[bytes], binding: bytes) -> Iterator[bytes]:
        """Encrypt a stream of plaintext chunks, bound to ``binding``; yields the sealed
        stream. Only :meth:`open` with the same ``binding`` can decrypt it.

        A chunk must not change once yielded (``bytes`` never do): parts of it are held
        until the next chunk arrives.
        """
        header = HEADER.pack(MAGIC, self.key_id, secrets.token_bytes(8), SEGMENT_SIZE)
        prefix = header[12:20]
        aad = self._aad_prefix(header, binding)
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
                yield self._encrypt(aad, prefix, index, pending, False)
                index += 1
                pending = bytearray()
            # Strictly greater: the final segment is never empty unless the whole blob is.
            while len(view) > SEGMENT_SIZE:
                yield self._encrypt(aad, prefix, index, view[:SEGMENT_SIZE], False)
                view = view[SEGMENT_SIZE:]
                index += 1
            held = view
        yield self._encrypt(aad, prefix, index, held if len(held) else pending, final=True)

    def _encrypt(
        self,
        aad: bytes,
        prefix: bytes,
        index: int,
        data: bytes | bytearray | memoryview,
        final: bool,
    ) -> bytes:
        nonce = prefix + struct.pack(">I", index)
        return self._aead.encrypt(nonce, data, _segment_aad(aad, index, final))

    def _read_header(self, stream: BinaryIO) -> tuple[bytes, bytes, int]:
        """``(header, nonce prefix, segment size)`` of a stream sealed with this key."""
        header = stream.read(HEADER.size)
        if len(header) != HEADER.size:
            raise EnvelopeError("sealed blob is shorter than its header")
        magic, key_id, prefix, segment_size = HEADER.unpack(header)
        if magic not in (MAGIC, LEGACY_MAGIC):
            raise EnvelopeError(f"not a sealed blob: magic {magic!r}, expected {MAGIC!r}")
        if key_id != self.key_id:
            raise EnvelopeError(
                f"blob sealed with key {key_id.hex()}, node key is {self.key_id.hex()}"
            )
        return header, prefix, segment_size

    def open(self, stream: BinaryIO, binding: bytes) -> Iterator[bytes]:
        """Decrypt a sealed stream chunk by chunk; raises EnvelopeError on any tampering,
        and when the blob was sealed with another ``binding`` (format 2)."""
        header, prefix, segment_size = self._read_header(stream)
        aad = self._aad_prefix(header, binding)
        index = 0
        record = segment_size + TAG_SIZE
        current = stream.read(record)
        while True:
            nxt = stream.read(record)
            final = not nxt
            nonce = prefix + struct.pack(">I", index)
            try:
                yield self._aead.decrypt(nonce, current, _segment_aad(aad, index, final))
            except Exception as exc:  # InvalidTag carries no message
                raise EnvelopeError(
                    f"segment {index} failed authentication (damaged, or not the blob"
                    " of this name and instance)"
                ) from exc
            if final:
                return
            current = nxt
            index += 1

    def open_unauthenticated(self, stream: BinaryIO, limit: int | None = None) -> bytes:
        """The plaintext of a sealed stream (its first ``limit`` bytes at most) WITHOUT
        authentication: tags, binding, order and length are not checked, so the bytes may
        be altered or another blob's. Use them only to learn what the blob claims to be
        (:meth:`open` with that claim is what to trust).

        AES-GCM encrypts with AES-CTR, its counter block the 12-byte nonce then a 32-bit
        counter that starts at 2 for the first block of plaintext (1 encrypts the tag);
        each segment is decrypted so, its 16-byte tag ignored.

        Raises
        ------
        EnvelopeError
            Not a sealed blob, or sealed with another key.
        """
        _header, prefix, segment_size = self._read_header(stream)
        plaintext = bytearray()
        index = 0
        while limit is None or len(plaintext) < limit:
            take = segment_size if limit is None else min(segment_size, limit - len(plaintext))
            # With the tag's length more: a record shorter than that is the last one.
            record = stream.read(take + TAG_SIZE)
            last = len(record) < take + TAG_SIZE
            ciphertext = record[:-TAG_SIZE] if last else record[:take]
            counter = prefix + struct.pack(">II", index, 2)
            decryptor = Cipher(algorithms.AES(self._material), modes.CTR(counter)).decryptor()
            plaintext += decryptor.update(ciphertext) + decryptor.finalize()
            if last:
                break
            index += 1  # (a take shorter than a segment ends the loop: no record is half read)
        return bytes(plaintext)
