"""The instance codecs: how an archived instance's blob is made from its Part-10 object,
and back, bit-exact; the registry of every codec that ever wrote a blob; and which codec a
blob claims, by its content, when no index row says (:func:`claim_of`).

A blob's index row names its codec (``codec_id``); the archive decodes it with the codec of
that name, so a codec stays here as long as blobs it wrote may exist.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from medzip_scp.codec.api import DEFAULT_LEARNED, DatasetReference, ReferenceSource
from medzip_scp.codec.container import MAGIC as CONTAINER_MAGIC
from medzip_scp.config import Settings
from medzip_scp.dicom.blob import decode_blob, encode_dataset, open_blob, peek_blob
from medzip_scp.dicom.identifying import identifying_tags
from medzip_scp.dicom.part10 import instance_uids
from medzip_scp.identity.instance import (
    IdentityPolicy,
    OpenedInstance,
    open_instance,
    seal_instance,
    series_reference,
)
from medzip_scp.identity.keys import IdentityKeyError, IdentityKeyring
from medzip_scp.storage.local import LocalBlobStore


class InstanceCodec(Protocol):
    """Turns a complete Part-10 object into the blob the store keeps, and back, bit-exact.

    ``encode`` decodes its blob once and compares it with its input before returning it
    (verify before replace); ``verify=False`` is for a caller that does exactly that itself (the
    compression worker), so that a blob is decoded once."""

    codec_id: str

    def encode(self, part10: bytes, verify: bool = True) -> bytes: ...

    def encode_chunks(self, chunks: Iterable[bytes]) -> Iterable[bytes]:
        """The blob of the object whose bytes ``chunks`` yields, as chunks for the blob store
        to write as they come (C-STORE writes what arrived from its spool file this way)."""
        ...

    def decode(self, blob: bytes) -> bytes: ...


class Part10Codec:
    """The pass-through codec: the blob is the Part-10 object as received."""

    codec_id = "part10"

    def encode(self, part10: bytes, verify: bool = True) -> bytes:
        return part10

    def encode_chunks(self, chunks: Iterable[bytes]) -> Iterable[bytes]:
        return chunks  # streamed: the object is never held whole in memory

    def decode(self, blob: bytes) -> bytes:
        return blob


class MzpCodec:
    """The medzip codec without identity payload (blobs written before it existed): pixel
    data through the codec library, the rest compressed.

    ``encode`` itself decodes its output and compares it with the input before returning.
    It tries the learned split paths only when ``learned`` (``[pipeline] learned``); any
    instance decodes blobs of either kind.
    """

    codec_id = "mzp1"

    def __init__(self, learned: bool = False) -> None:
        self._learned = DEFAULT_LEARNED if learned else None

    def encode(self, part10: bytes, verify: bool = True) -> bytes:
        return encode_dataset(part10, self._learned, verify=verify)

    def encode_chunks(self, chunks: Iterable[bytes]) -> Iterable[bytes]:
        return [self.encode(b"".join(chunks))]

    def decode(self, blob: bytes) -> bytes:
        return decode_blob(blob)


class IdentityCodec:
    """The medzip codec with the patient's identity sealed inside the blob
    (:mod:`medzip_scp.identity`): what background compression writes.

    ``encode`` opens its own blob again (payload included) and compares before returning;
    ``decode`` runs every check of :func:`~medzip_scp.identity.instance.open_instance`.
    """

    codec_id = "mzp2"

    def __init__(
        self,
        keyring: IdentityKeyring | None,
        policy: IdentityPolicy,
        learned: bool = False,
        references: ReferenceSource | None = None,
    ) -> None:
        self._keyring = keyring
        self._policy = policy
        self._learned = DEFAULT_LEARNED if learned else None
        self._references = references

    def encode(
        self,
        part10: bytes,
        verify: bool = True,
        received_at: dt.datetime | None = None,
        reference: DatasetReference | None = None,
    ) -> bytes:
        """The payload says the instance was received at ``received_at`` (default now):
        compression gives its index row's, so that a rebuilt index (``medzip db rebuild``)
        orders instances as they arrived, not as compressed. With ``reference``
        (:meth:`series_reference`), the data set is coded against it."""
        if self._keyring is None:
            raise IdentityKeyError("the identity key file is missing: compression cannot seal")
        received_us = None if received_at is None else _microseconds(received_at)
        return seal_instance(
            part10,
            self._keyring,
            self._policy,
            self._learned,
            received_us,
            verify=verify,
            reference=reference,
        )

    def encode_chunks(self, chunks: Iterable[bytes]) -> Iterable[bytes]:
        return [self.encode(b"".join(chunks))]

    def series_reference(self, part10: bytes) -> DatasetReference:
        """A reference for the blobs of ``part10``'s series, made from it."""
        return series_reference(part10, self._policy)

    def decode(self, blob: bytes) -> bytes:
        return self.open(blob, None).part10

    def open(self, blob: bytes, sop_instance_uid: str | None) -> OpenedInstance:
        """The original and its identity record; raises IdentityCheckError."""
        return open_instance(blob, self._keyring, sop_instance_uid, self._references)


def _microseconds(moment: dt.datetime) -> int:
    """Microseconds since the Unix epoch (exact: no float in between)."""
    return (moment - dt.datetime.fromtimestamp(0, dt.UTC)) // dt.timedelta(microseconds=1)


# Every codec that ever wrote a blob stays here forever: old blobs must keep decoding.
# (IdentityCodec, which needs the node's keys, is the archive's own: Archive.codecs.)
CODECS: dict[str, InstanceCodec] = {c.codec_id: c for c in (Part10Codec(), MzpCodec())}


def identity_policy(settings: Settings) -> IdentityPolicy:
    return IdentityPolicy(
        identifying_tags(settings.identity.extra_attributes),
        settings.identity.private_elements,
    )


@dataclass(frozen=True)
class BlobClaim:
    """What a blob's plaintext, read WITHOUT authentication, says it is (``medzip db
    rebuild``, which has no index row to say so): the codec that wrote it and what names
    its instance. Only a claim: the blob is then read authenticated, bound to the SOP
    Instance UID it leads to, and only that is used."""

    codec_id: str
    plaintext: bytes
    stored: bytes  # the object as stored (a codec blob's up to its pixel data)
    payload: bytes | None  # the sealed identity payload (b"": none), None: in the coded bits
    references: ReferenceSource | None = None  # where the blob's data set reference is

    def sop_instance_uid(self) -> str:
        """The SOP Instance UID the stored object names; "" when it names none (an object
        sealed whole names it in its payload only)."""
        return instance_uids(self.stored)[2]

    def sealed_payload(self) -> bytes:
        """The sealed identity payload, decoding the blob when its coded bits carry some."""
        if self.payload is not None:
            return self.payload
        return open_blob(self.plaintext, self.references)[1]


def claim_of(plaintext: bytes, references: ReferenceSource | None = None) -> BlobClaim:
    """What ``plaintext`` claims to be, by its content: a codec container with an identity
    payload is mzp2, one without mzp1, anything else a Part-10 original. Pixels are not
    decoded; ``references`` gives the data set reference the blob may be coded against.

    Raises
    ------
    CodecError
        A codec container that does not parse (UnknownModelError, UnsupportedFormatError:
        one this node cannot read).
    """
    if plaintext[: len(CONTAINER_MAGIC)] != CONTAINER_MAGIC:
        return BlobClaim(Part10Codec.codec_id, plaintext, plaintext, b"")
    stored, payload = peek_blob(plaintext, references)
    codec_id = MzpCodec.codec_id if payload == b"" else IdentityCodec.codec_id
    return BlobClaim(codec_id, plaintext, stored, payload, references)


def codec_blob_claim(blobs: LocalBlobStore, key: str) -> BlobClaim | None:
    """What a codec blob in the store claims to be (:func:`claim_of`, read without
    authentication); None for a Part-10 original, told by its first bytes (the rest is not
    read). Raises as :func:`claim_of` and :meth:`LocalBlobStore.read_unauthenticated`."""
    if blobs.read_unauthenticated(key, len(CONTAINER_MAGIC)) != CONTAINER_MAGIC:
        return None
    return claim_of(blobs.read_unauthenticated(key), blobs.references.get)
