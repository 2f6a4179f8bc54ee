"""The archive: what the DICOM services and the CLI ask of storage and index.

It is built once, at the composition root (``medzip serve``), from the settings, and holds the
engine, the blob store and the codec. Network handlers call it and map its outcomes to DIMSE
statuses; it never raises for bad input (that is an outcome), only for broken infrastructure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp.config import DuplicatePolicyValues, Settings
from medzip_scp.dicom.blob import decode_blob, encode_dataset
from medzip_scp.dicom.part10 import ReceivedObject
from medzip_scp.index.db import create_engine_for, session_factory, upgrade_database
from medzip_scp.index.errors import DuplicateInstanceError
from medzip_scp.index.ingest import (
    add_instance,
    attributes_from_dataset,
    get_instance,
    replace_instance,
)
from medzip_scp.index.models import Instance
from medzip_scp.storage.envelope import BlobKey
from medzip_scp.storage.local import BlobNotFoundError, LocalBlobStore, StoredBlob

log = logging.getLogger(__name__)


class InstanceCodec(Protocol):
    """Turns a complete Part-10 object into the blob the store keeps, and back, bit-exact."""

    codec_id: str

    def encode(self, part10: bytes) -> bytes: ...

    def decode(self, blob: bytes) -> bytes: ...


class Part10Codec:
    """The identity codec: the blob is the Part-10 object as received."""

    codec_id = "part10"

    def encode(self, part10: bytes) -> bytes:
        return part10

    def decode(self, blob: bytes) -> bytes:
        return blob


class MzpCodec:
    """The medzip codec: pixel data through the codec library, the rest compressed.

    ``encode`` itself decodes its output and compares it with the input before returning.
    """

    codec_id = "mzp1"

    def encode(self, part10: bytes) -> bytes:
        return encode_dataset(part10)

    def decode(self, blob: bytes) -> bytes:
        return decode_blob(blob)


# Every codec that ever wrote a blob stays here forever: old blobs must keep decoding.
CODECS: dict[str, InstanceCodec] = {c.codec_id: c for c in (Part10Codec(), MzpCodec())}


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


class StoreResult(Enum):
    STORED = "stored"
    IDENTICAL_DUPLICATE = "identical_duplicate"  # already archived with the same content
    REPLACED = "replaced"  # differing duplicate stored; the old version is kept superseded
    DUPLICATE_REJECTED = "duplicate_rejected"  # differing duplicate refused (policy reject)


@dataclass(frozen=True)
class StoreOutcome:
    result: StoreResult
    sop_instance_uid: str


class Archive:
    """Index + blob store + codec, with the durability rules of the node."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        blobs: LocalBlobStore,
        codec: InstanceCodec,
        read_sessions: sessionmaker[Session] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        # Queries and retrievals: on SQLite these must not take the write lock (BEGIN
        # IMMEDIATE), or a long C-FIND would stall every C-STORE behind it.
        self.read_sessions = read_sessions or sessions
        self.blobs = blobs
        self.codec = codec

    @classmethod
    def open(cls, settings: Settings, migrate: bool = True) -> Archive:
        """Open (creating on first use) the archive the settings describe."""
        data_dir = settings.storage.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.storage.resolved_database_url()
        if migrate:
            upgrade_database(url)
        engine = create_engine_for(url)
        key = BlobKey.load_or_create(settings.storage.resolved_key_file())
        blobs = LocalBlobStore(settings.storage.resolved_blob_dir(), key)
        return cls(
            settings,
            session_factory(engine),
            blobs,
            Part10Codec(),
            read_sessions=session_factory(engine, readonly=True),
        )

    # -- C-STORE -------------------------------------------------------------------------

    def _put_original(self, received: ReceivedObject) -> StoredBlob:
        """Seal and store what arrived; the identity codec streams it without loading it."""
        if isinstance(self.codec, Part10Codec):
            return self.blobs.put(_file_chunks(received.path))
        return self.blobs.put_bytes(self.codec.encode(received.path.read_bytes()))

    def store(self, received: ReceivedObject, calling_ae_title: str) -> StoreOutcome:
        """Archive a validated object; returns only after blob fsync and index commit."""
        sop_uid = str(received.dataset.SOPInstanceUID)
        with self.sessions() as session:
            existing = get_instance(session, sop_uid)
            if existing is not None and existing.original_sha256 == received.dataset_sha256:
                return StoreOutcome(StoreResult.IDENTICAL_DUPLICATE, sop_uid)
            if (
                existing is not None
                and self.settings.storage.duplicate_policy is DuplicatePolicyValues.REJECT
            ):
                return StoreOutcome(StoreResult.DUPLICATE_REJECTED, sop_uid)

        blob = self._put_original(received)
        try:
            return self._index(received, blob, calling_ae_title)
        except BaseException:
            # Nothing half-stored: a blob without its committed row is removed again.
            self.blobs.delete(blob.key)
            raise

    def _index(
        self, received: ReceivedObject, blob: StoredBlob, calling_ae_title: str
    ) -> StoreOutcome:
        attrs = attributes_from_dataset(received.dataset)
        sop_uid = str(received.dataset.SOPInstanceUID)
        fields = dict(
            transfer_syntax_uid=str(received.transfer_syntax_uid),
            blob_key=blob.key,
            original_size=received.dataset_size,
            original_sha256=received.dataset_sha256,
            stored_size=blob.stored_size,
            stored_sha256=blob.sha256,
            codec_id=self.codec.codec_id,
            calling_ae_title=calling_ae_title,
        )
        policy = self.settings.storage.duplicate_policy
        for _attempt in range(3):
            with self.sessions() as session:
                existing = get_instance(session, sop_uid)
                if existing is not None and existing.original_sha256 == received.dataset_sha256:
                    result = StoreResult.IDENTICAL_DUPLICATE
                elif existing is not None and policy is DuplicatePolicyValues.REJECT:
                    result = StoreResult.DUPLICATE_REJECTED
                else:
                    try:
                        if existing is None:
                            add_instance(session, attrs, **fields)
                            result = StoreResult.STORED
                        else:
                            replace_instance(session, existing, attrs, **fields)
                            result = StoreResult.REPLACED
                        session.commit()
                    except (IntegrityError, DuplicateInstanceError):
                        # Another association indexed the same SOP Instance first: look again.
                        session.rollback()
                        continue
                    return StoreOutcome(result, sop_uid)
            self.blobs.delete(blob.key)  # an identical or refused copy is not kept
            return StoreOutcome(result, sop_uid)
        raise RuntimeError(f"could not index {sop_uid} after 3 attempts")

    # -- Retrieval -----------------------------------------------------------------------

    def load_part10(self, instance: Instance) -> bytes:
        """Restore the Part-10 object of an instance, bit-exact."""
        try:
            return self._decode(instance.codec_id, self.blobs.read(instance.blob_key))
        except BlobNotFoundError:
            # The compression worker may have swapped the blob since the row was read.
            with self.read_sessions() as session:
                current = session.get(Instance, instance.id)
                if current is None or current.blob_key == instance.blob_key:
                    raise
                return self._decode(current.codec_id, self.blobs.read(current.blob_key))

    def _decode(self, codec_id: str, blob: bytes) -> bytes:
        codec = CODECS.get(codec_id)
        if codec is None:
            raise LookupError(f"instance stored with unknown codec {codec_id!r}")
        return codec.decode(blob)

    def instances(self, sop_instance_uids: list[str] | None = None) -> list[Instance]:
        """Index rows, all or by SOP Instance UID (for verification tools)."""
        with self.sessions() as session:
            query = session.query(Instance).order_by(Instance.id)
            if sop_instance_uids is not None:
                query = query.filter(Instance.sop_instance_uid.in_(sop_instance_uids))
            return list(query)
