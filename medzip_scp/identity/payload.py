"""The identity payload: who an image belongs to, encrypted and signed, carried in the blob.

Plaintext (:class:`IdentityRecord`, compact binary, raw-deflated when that is smaller): the
node id, when the node received the instance, the Study/Series/SOP Instance UIDs, the SHA-256
of the original Pixel Data value and of the rest of the original file, and the identifying
elements cut out of the stored file (each as its original bytes and where it was), so the
original comes back byte for byte.

Sealed form (what the codec carries; every field is needed to open it, none reveals PHI)::

    u8  format (1)
    4   id of the identity master key        } the header: associated data of the AEAD,
    4   id of the Ed25519 signing key        } and signed with the rest
    16  random salt
    ... AES-256-GCM ciphertext of the plaintext, 16-byte tag included; key =
        HKDF-SHA256(master key, salt, "medzip identity payload 1"), nonce 0 (each key
        seals exactly one message)
    64  Ed25519 signature over everything before it

Encrypt-then-sign: the signature can be checked with the public key alone
(:func:`check_signature`); opening needs the master key.
"""

from __future__ import annotations

import secrets
import struct
import zlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from medzip_scp.codec.container import get_varint, put_varint
from medzip_scp.identity.keys import ID_BYTES, IdentityKeyring, PublicKeys

__all__ = [
    "OVERHEAD",
    "IdentityRecord",
    "PayloadKeyMissingError",
    "PayloadTamperedError",
    "check_signature",
    "open_payload",
    "seal_payload",
]

_FORMAT = 1
_HEADER = struct.Struct(f"<B{ID_BYTES}s{ID_BYTES}s16s")
_TAG = 16
_SIGNATURE = 64
OVERHEAD = _HEADER.size + _TAG + _SIGNATURE
"""Bytes a sealed payload adds to its plaintext."""
_INFO = b"medzip identity payload 1"
_NONCE = bytes(12)
# 2: the receive time in microseconds (version 1, whole seconds, is still read)
_RECORD_VERSION = 2
_SECONDS_RECORD_VERSION = 1
_STORED, _DEFLATED = 0, 1
_MAX_PLAINTEXT = 1 << 31


class PayloadTamperedError(Exception):
    """The payload is not what this node sealed: ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PayloadKeyMissingError(Exception):
    """The payload names an identity master key this node does not have."""

    def __init__(self, key_id: bytes) -> None:
        super().__init__(f"identity key {key_id.hex()} is not in the key file")
        self.key_id = key_id


@dataclass(frozen=True)
class IdentityRecord:
    """What a payload says about its instance."""

    node_id: str
    # When the node received the instance, in microseconds since the Unix epoch: with it
    # `medzip db rebuild` indexes instances in the order they arrived.
    archived_at_us: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    pixel_sha256: bytes  # of the original Pixel Data value (of b"" when there is none)
    rest_sha256: bytes  # of the original file with that value taken out
    removed: tuple[tuple[int, bytes], ...]  # (offset in the original file, its bytes)

    def encode(self) -> bytes:
        out = bytearray([_RECORD_VERSION])
        for text in (
            self.node_id,
            self.study_instance_uid,
            self.series_instance_uid,
            self.sop_instance_uid,
        ):
            _put_bytes(out, text.encode())
        put_varint(out, self.archived_at_us)
        out += self.pixel_sha256 + self.rest_sha256
        put_varint(out, len(self.removed))
        previous = 0
        for offset, data in self.removed:
            put_varint(out, offset - previous)  # ascending: small deltas
            _put_bytes(out, data)
            previous = offset
        raw = bytes(out)
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        packed = packer.compress(raw) + packer.flush()
        if len(packed) < len(raw):
            return bytes([_DEFLATED]) + struct.pack("<I", len(raw)) + packed
        return bytes([_STORED]) + raw

    @classmethod
    def decode(cls, data: bytes) -> IdentityRecord:
        """Parse an authenticated plaintext (a malformed one raises ValueError)."""
        if data[:1] == bytes([_DEFLATED]):
            (size,) = struct.unpack_from("<I", data, 1)
            unpacker = zlib.decompressobj(-15)
            raw = unpacker.decompress(data[5:], min(size, _MAX_PLAINTEXT))
            if len(raw) != size or not unpacker.eof or unpacker.unused_data:
                raise ValueError("identity record: deflated stream is cut short or runs on")
        elif data[:1] == bytes([_STORED]):
            raw = data[1:]
        else:
            raise ValueError("identity record: unknown packing")
        if raw[:1] not in (bytes([_RECORD_VERSION]), bytes([_SECONDS_RECORD_VERSION])):
            raise ValueError("identity record: unknown version")
        pos = 1
        texts = []
        for _ in range(4):
            value, pos = _get_bytes(raw, pos)
            texts.append(value.decode())
        archived_at, pos = _get_varint(raw, pos)
        if raw[0] == _SECONDS_RECORD_VERSION:
            archived_at *= 1_000_000
        pixel, rest = raw[pos : pos + 32], raw[pos + 32 : pos + 64]
        pos += 64
        count, pos = _get_varint(raw, pos)
        removed = []
        offset = 0
        for _ in range(count):
            delta, pos = _get_varint(raw, pos)
            offset += delta
            value, pos = _get_bytes(raw, pos)
            removed.append((offset, value))
        if pos != len(raw) or len(rest) != 32:
            raise ValueError("identity record: length mismatch")
        return cls(texts[0], archived_at, texts[1], texts[2], texts[3], pixel, rest, tuple(removed))


def _get_varint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return get_varint(data, pos)
    except IndexError:
        raise ValueError("identity record: cut short") from None


def _put_bytes(out: bytearray, data: bytes) -> None:
    put_varint(out, len(data))
    out += data


def _get_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    length, pos = _get_varint(data, pos)
    if pos + length > len(data):
        raise ValueError("identity record: cut short")
    return data[pos : pos + length], pos + length


def _instance_key(master: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(SHA256(), 32, salt, _INFO).derive(master))


def seal_payload(record: IdentityRecord, keyring: IdentityKeyring) -> bytes:
    """Encrypt ``record`` under a fresh per-instance key, then sign it (current keys)."""
    generation = keyring.current
    header = _HEADER.pack(
        _FORMAT, generation.master_id, generation.signing_id, secrets.token_bytes(16)
    )
    ciphertext = _instance_key(generation.master, header[-16:]).encrypt(
        _NONCE, record.encode(), header
    )
    signed = header + ciphertext
    return signed + generation.signing.sign(signed)


def _split(sealed: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """``(header, master id, signing id, ciphertext, signature)``."""
    if len(sealed) < OVERHEAD:
        raise PayloadTamperedError(f"payload is {len(sealed)} bytes, shorter than any sealed one")
    header = sealed[: _HEADER.size]
    fmt, master_id, signing_id, _salt = _HEADER.unpack(header)
    if fmt != _FORMAT:
        raise PayloadTamperedError(f"payload format must be {_FORMAT}, got {fmt}")
    return header, master_id, signing_id, sealed[_HEADER.size : -_SIGNATURE], sealed[-_SIGNATURE:]


def check_signature(sealed: bytes, trusted: PublicKeys) -> bytes:
    """Check the payload's signature with public keys only; returns the signing key id.

    Raises
    ------
    PayloadTamperedError
        Malformed, signed by a key not in ``trusted``, or the signature does not verify.
    """
    header, _master_id, signing_id, ciphertext, signature = _split(sealed)
    key = trusted.keys.get(signing_id)
    if key is None:
        raise PayloadTamperedError(
            f"payload signed by key {signing_id.hex()}, which this node does not trust"
        )
    try:
        key.verify(signature, header + ciphertext)
    except InvalidSignature:
        raise PayloadTamperedError("payload signature does not verify") from None
    return signing_id


def open_payload(sealed: bytes, keyring: IdentityKeyring) -> IdentityRecord:
    """Authenticate and decrypt a payload sealed by this node (any key generation).

    Raises
    ------
    PayloadKeyMissingError
        It names a key generation the key file does not hold (neither its master key nor
        its signing key).
    PayloadTamperedError
        Anything else is wrong (signature, signer, ciphertext, record), including a master
        key id altered in a payload signed by this node.
    """
    header, master_id, signing_id, ciphertext, _signature = _split(sealed)
    master = keyring.master(master_id)
    trusted = keyring.public_keys()
    # The signature covers the master key id: checked whenever either key is ours, it tells
    # an altered id from a key generation this key file lacks (both of its keys unknown).
    if master is not None or signing_id in trusted.keys:
        check_signature(sealed, trusted)
    if master is None:
        raise PayloadKeyMissingError(master_id)
    try:
        plaintext = _instance_key(master, header[-16:]).decrypt(_NONCE, ciphertext, header)
    except InvalidTag:
        raise PayloadTamperedError("payload does not decrypt (altered)") from None
    try:
        return IdentityRecord.decode(plaintext)
    except (ValueError, UnicodeDecodeError, zlib.error, struct.error) as exc:
        raise PayloadTamperedError(f"payload malformed ({exc})") from None
