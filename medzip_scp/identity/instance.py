"""Instances that carry their own identity: seal on compression, open (and check) on read.

:func:`seal_instance` cuts the identifying elements out of a Part-10 object
(:mod:`medzip_scp.dicom.identifying`), seals them with the instance's UIDs and content hashes
(:mod:`medzip_scp.identity.payload`) and codes the rest with that payload carried in the pixel
streams (:func:`medzip_scp.dicom.blob.encode_dataset`); it opens its own blob again and checks
the original comes back before returning. :func:`open_instance` reverses it and says, when
something is wrong, what: the blob holds no PHI readable without the identity key, and the
pixels decode without any key (:func:`stored_object`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from medzip_scp.codec.api import DatasetReference, LearnedOptions, ReferenceSource
from medzip_scp.codec.errors import CodecError, UnknownModelError, UnsupportedFormatError
from medzip_scp.dicom.blob import dataset_reference, encode_dataset, open_blob, references_of
from medzip_scp.dicom.identifying import content_hashes, restore, split
from medzip_scp.dicom.part10 import instance_uids
from medzip_scp.identity.keys import IdentityKeyring
from medzip_scp.identity.payload import (
    IdentityRecord,
    PayloadKeyMissingError,
    PayloadTamperedError,
    open_payload,
    seal_payload,
)

__all__ = [
    "IdentityCheckError",
    "IdentityPolicy",
    "OpenedInstance",
    "Verdict",
    "open_instance",
    "seal_instance",
    "series_reference",
    "stored_object",
]


class Verdict(enum.StrEnum):
    """What ``medzip verify`` reports per instance."""

    OK = "OK"
    TAMPERED = "TAMPERED"
    KEY_MISSING = "KEY-MISSING"
    UNREADABLE = "UNREADABLE"


class IdentityCheckError(Exception):
    """An instance failed a check; ``verdict`` and a PHI-free ``reason`` say which."""

    def __init__(self, verdict: Verdict, reason: str) -> None:
        super().__init__(f"{verdict}: {reason}")
        self.verdict = verdict
        self.reason = reason


@dataclass(frozen=True)
class IdentityPolicy:
    """Which elements go into the payload (:func:`medzip_scp.dicom.identifying.split`)."""

    tags: frozenset[int]
    private: bool = False


@dataclass(frozen=True)
class OpenedInstance:
    part10: bytes  # the original object, byte for byte
    record: IdentityRecord


def seal_instance(
    part10: bytes,
    keyring: IdentityKeyring,
    policy: IdentityPolicy,
    learned: LearnedOptions | None = None,
    archived_at_us: int | None = None,
    verify: bool = True,
    reference: DatasetReference | None = None,
) -> bytes:
    """A blob of ``part10`` whose identifying elements are only in its sealed payload;
    ``archived_at_us`` is when the node received it (microseconds since the epoch; default
    now). It is opened again, every check included, and compared with ``part10`` (the one
    decode that verifies it: :func:`~medzip_scp.dicom.blob.encode_dataset`) unless ``verify``
    is off (for a caller that decodes and compares it itself). With ``reference``
    (:func:`series_reference`) the stored object is coded against it
    (:func:`~medzip_scp.dicom.blob.encode_dataset`).

    Raises
    ------
    CodecError
        The blob does not give back ``part10`` (keep the original).
    """
    cut = split(part10, policy.tags, policy.private)
    uids = instance_uids(part10)
    record = IdentityRecord(
        node_id=keyring.node_id,
        archived_at_us=time.time_ns() // 1000 if archived_at_us is None else archived_at_us,
        study_instance_uid=uids[0],
        series_instance_uid=uids[1],
        sop_instance_uid=uids[2],
        pixel_sha256=cut.pixel_sha256,
        rest_sha256=cut.rest_sha256,
        removed=cut.removed,
    )
    sealed = seal_payload(record, keyring)

    def opens_to_original(blob: bytes) -> None:
        # verified once: opening decodes every frame and checks the whole round trip
        try:
            opened = open_instance(blob, keyring, uids[2], references_of(reference))
        except IdentityCheckError as exc:
            raise CodecError(f"verification failed: {exc.reason}") from None
        if opened.part10 != part10:
            raise CodecError("verification failed: the original did not come back")

    return encode_dataset(
        cut.stored,
        learned,
        payload=sealed,
        verify=verify,
        check=opens_to_original,
        reference=reference,
    )


def series_reference(part10: bytes, policy: IdentityPolicy) -> DatasetReference:
    """A reference for the stored objects of ``part10``'s series (``seal_instance``): its
    own stored object's data set, without the identifying elements, like every blob's."""
    return dataset_reference(split(part10, policy.tags, policy.private).stored)


def stored_object(blob: bytes, references: ReferenceSource | None = None) -> tuple[bytes, bytes]:
    """``(the object without its identifying elements, the sealed payload)``: no key needed
    (``references`` gives the data set reference the blob may be coded against).

    Raises
    ------
    IdentityCheckError
        TAMPERED (a stream fails its checks) or UNREADABLE (a model or format this decoder
        does not have).
    """
    try:
        return open_blob(blob, references)
    except (UnknownModelError, UnsupportedFormatError) as exc:
        raise IdentityCheckError(
            Verdict.UNREADABLE, f"blob needs what this node lacks ({exc})"
        ) from None
    except CodecError as exc:
        raise IdentityCheckError(
            Verdict.TAMPERED, f"coded stream fails its checks ({type(exc).__name__})"
        ) from None


def open_instance(
    blob: bytes,
    keyring: IdentityKeyring | None,
    expected_sop_instance_uid: str | None,
    references: ReferenceSource | None = None,
) -> OpenedInstance:
    """The original object and its identity record, after every check.

    Checks, in order: the blob decodes (stream CRCs, pixel CRCs, the stored object's hash);
    the payload is signed by a key of this node and decrypts; it names
    ``expected_sop_instance_uid`` (when given); the identifying elements fit back; the
    original's pixel data and the rest hash to what the payload signed.

    Raises
    ------
    IdentityCheckError
        With the verdict and which check failed.
    """
    stored, sealed = stored_object(blob, references)
    if not sealed:
        raise IdentityCheckError(Verdict.TAMPERED, "blob carries no identity payload")
    if keyring is None:
        raise IdentityCheckError(
            Verdict.KEY_MISSING, "the identity key file is missing (or none was given)"
        )
    try:
        record = open_payload(sealed, keyring)
    except PayloadKeyMissingError as exc:
        raise IdentityCheckError(Verdict.KEY_MISSING, str(exc)) from None
    except PayloadTamperedError as exc:
        raise IdentityCheckError(Verdict.TAMPERED, exc.reason) from None
    if expected_sop_instance_uid is not None and (
        record.sop_instance_uid != expected_sop_instance_uid
    ):
        raise IdentityCheckError(
            Verdict.TAMPERED, f"payload is that of another instance ({record.sop_instance_uid})"
        )
    try:
        original = restore(stored, record.removed)
    except ValueError:
        raise IdentityCheckError(
            Verdict.TAMPERED, "identifying elements do not fit the stored data set"
        ) from None
    pixel_sha256, rest_sha256 = content_hashes(original)
    if pixel_sha256 != record.pixel_sha256:
        raise IdentityCheckError(Verdict.TAMPERED, "pixel data differs from the signed hash")
    if rest_sha256 != record.rest_sha256:
        raise IdentityCheckError(Verdict.TAMPERED, "data set differs from the signed hash")
    return OpenedInstance(original, record)
