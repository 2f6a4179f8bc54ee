"""The archive: the one door through which the DICOM services, the background pipeline and
the CLI reach the index and the blob store.

It is built once, at the composition root (``medzip serve``, the ``medzip`` commands), from
the settings, and holds the engines, the blob store and the codecs. Its callers open no
database session and write no SQL (the queries live in :mod:`medzip_scp.index`):

- C-STORE: :meth:`Archive.store`;
- C-FIND: :meth:`Archive.find`; C-GET, C-MOVE: :meth:`Archive.retrieve`, then
  :meth:`Archive.load_part10` for each instance;
- background compression: :meth:`Archive.pending_compression`, :meth:`Archive.swap_blob`;
- ``medzip verify``: :meth:`Archive.verify_study`; ``medzip db rebuild``:
  :meth:`Archive.rebuilding`; housekeeping: :meth:`Archive.remove_orphan_blobs`.

Network handlers map its outcomes to DIMSE statuses. C-STORE never raises for bad input
(that is an outcome), only for broken infrastructure; a query or retrieve identifier that is
not valid raises QueryError.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import fcntl
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp import metrics
from medzip_scp.codec.api import DEFAULT_LEARNED, DatasetReference
from medzip_scp.codec.errors import CodecError, UnknownModelError, UnsupportedFormatError
from medzip_scp.codec.installation import check_codec
from medzip_scp.codec.zoo import use_models_folder
from medzip_scp.config import DuplicatePolicyValues, Settings
from medzip_scp.dicom.equivalence import first_difference
from medzip_scp.dicom.part10 import (
    ReceivedObject,
    dataset_offset_of,
    load_dataset,
)
from medzip_scp.group_commit import GroupCommitter, Pending
from medzip_scp.identity.instance import IdentityCheckError, Verdict
from medzip_scp.identity.keys import IdentityKeyError, IdentityKeyring
from medzip_scp.identity.payload import IdentityRecord
from medzip_scp.index.blobs import blob_keys_of, holds_codec, index_is_empty, named_blob_keys
from medzip_scp.index.compression import mark_compress_failed, pending_compression, swap_blob
from medzip_scp.index.db import create_engine_for, ping, session_factory, upgrade_database
from medzip_scp.index.errors import DuplicateInstanceError, IndexNotEmptyError
from medzip_scp.index.identity import (
    InstanceFilter,
    index_identity_mismatch,
    instances_by_id,
    select_instances,
    study_instances,
)
from medzip_scp.index.ingest import (
    InstanceAttributes,
    KnownSeries,
    Rebuilt,
    StorageFacts,
    add_instance,
    add_instances_of_known_series,
    attributes_from_dataset,
    get_instance,
    index_found_version,
    indexed_content,
    indexed_counts,
    replace_instance,
)
from medzip_scp.index.models import Instance, InstanceState, VerificationRun, utcnow
from medzip_scp.index.query import QueryModel, find, find_instances
from medzip_scp.index.references import record_reference, recorded_reference, series_references
from medzip_scp.index.stats import (
    StateTotals,
    VerificationPass,
    instance_totals,
    last_verification,
    record_verification,
)
from medzip_scp.index.studies import (
    SeriesSummary,
    StudySummary,
    delete_study_rows,
    named_keys,
    series_of,
    study_summaries,
)
from medzip_scp.instance_codecs import (
    CODECS,
    IdentityCodec,
    InstanceCodec,
    Part10Codec,
    codec_blob_claim,
    identity_policy,
)
from medzip_scp.storage.digest import ConcurrentSha256
from medzip_scp.storage.envelope import EnvelopeError
from medzip_scp.storage.fsync import fsync
from medzip_scp.storage.local import (
    BlobNotFoundError,
    LocalBlobStore,
    StoredBlob,
    open_blob_key,
)

log = logging.getLogger(__name__)


def _claims_sealed_identity(blobs: LocalBlobStore, key: str) -> bool:
    """Whether a blob says it carries a sealed identity (False for one that cannot say:
    gone, not sealed with this store's key, or not parsable)."""
    try:
        claim = codec_blob_claim(blobs, key)
    except (BlobNotFoundError, EnvelopeError, CodecError, OSError):
        return False
    return claim is not None and claim.codec_id == IdentityCodec.codec_id


def _unindexed_blobs(
    blobs: LocalBlobStore, sessions: sessionmaker[Session], folder: str
) -> set[str]:
    """Blobs in one folder of the store (named by the first two hex digits of their key)
    that no index row, current or superseded, names."""
    on_disk = set(blobs.keys(folder))
    with sessions() as session:
        return on_disk - named_blob_keys(session, folder)


def _holds_sealed_instances(sessions: sessionmaker[Session], blobs: LocalBlobStore) -> bool:
    """Whether the index, or a blob no index row names (the index was lost, or rebuilt
    without the identity keys), holds an instance sealed with identity keys."""
    with sessions() as session:
        if holds_codec(session, IdentityCodec.codec_id):
            return True
    return any(
        _claims_sealed_identity(blobs, key)
        for folder in blobs.folders()
        for key in _unindexed_blobs(blobs, sessions, folder)
    )


def attributes_of(part10: bytes) -> InstanceAttributes:
    """The index attributes of a Part-10 object (read up to its pixels)."""
    return attributes_from_dataset(load_dataset(part10, stop_before_pixels=True))


def _open_identity_keys(
    settings: Settings, sessions: sessionmaker[Session], blobs: LocalBlobStore, required: bool
) -> IdentityKeyring | None:
    """The node's identity keys; created on first use, but never for an archive that holds
    sealed instances, indexed or not (their identity would be lost to a new key, and the
    instances sealed with the new key once the old file is restored), and never silently."""
    path = settings.identity.resolved_key_file(settings.storage.data_dir)
    if path.exists():
        return IdentityKeyring.load(path)
    if not _holds_sealed_instances(sessions, blobs):
        keyring = IdentityKeyring.open_or_create(path)
        log.warning("created identity key file %s: back it up, apart from the data", path)
        return keyring
    if not required:
        return None
    raise IdentityKeyError(
        f"identity key file {path} is missing, but the archive holds instances sealed with "
        "it: restore it from your key backup (or point [identity] key_file at it); no new key "
        "is made for an archive that holds sealed instances"
    )


def _file_chunks(path: Path, size: int = 8 << 20) -> Iterator[bytes]:
    """The file's bytes in chunks of at most ``size``. Each read asks for exactly what is
    left (up to ``size``): a larger request allocates, and faults in, memory it then
    gives back, which cost more than the read itself for a 0.5 MB CT slice."""
    with open(path, "rb", buffering=0) as fh:
        left = os.fstat(fh.fileno()).st_size
        while chunk := fh.read(min(max(left, 1 << 16), size)):  # to EOF, even if it grew
            left -= len(chunk)
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
    # REPLACED, DUPLICATE_REJECTED: where the content first differs from the archived
    # copy's (tags only, never a value: see dicom.equivalence.first_difference)
    first_difference: str | None = None


class InstanceIntegrityError(Exception):
    """An instance's blob is not what its index row says (swapped, altered, unreadable):
    it is never sent. The message names the check that failed, never a data set value;
    ``verdict`` is what ``medzip verify`` reports."""

    def __init__(
        self, sop_instance_uid: str, reason: str, verdict: Verdict = Verdict.TAMPERED
    ) -> None:
        super().__init__(f"instance {sop_instance_uid}: {reason}")
        self.sop_instance_uid = sop_instance_uid
        self.reason = reason
        self.verdict = verdict


class BlobsNotDurableError(OSError):
    """Writing a commit batch's blobs to stable storage failed (fsync)."""


def _wait_durable(synced: Future[None]) -> None:
    try:
        synced.result()
    except OSError as exc:
        raise BlobsNotDurableError(exc.errno, f"blob fsync failed: {exc.strerror}") from exc


@dataclass
class StoreRequest(Pending[StoreOutcome]):
    """One C-STORE queued for the group commit: what arrived and the blob written for it."""

    received: ReceivedObject
    attrs: InstanceAttributes
    blob: StoredBlob
    dataset_sha256: str
    calling_ae_title: str
    # The archived copies (by the SHA-256 of their data set) this object was compared with,
    # outside the transaction: None, the same content; else where it first differs.
    differences: dict[str, str | None] = field(default_factory=dict)
    # Set in the transaction: an archived copy with another hash, not compared yet, is
    # there (the outcome is only a placeholder; compare, then submit again).
    needs_comparison: bool = False


class Archive:
    """Index + blob store + codecs, with the durability rules of the node: the service
    layer's one door (see the module's docstring)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        blobs: LocalBlobStore,
        codec: InstanceCodec,
        read_sessions: sessionmaker[Session] | None = None,
        identity: IdentityKeyring | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.identity_codec = IdentityCodec(
            identity, identity_policy(settings), settings.pipeline.learned, blobs.references.get
        )
        self.codecs: dict[str, InstanceCodec] = {
            **CODECS,
            IdentityCodec.codec_id: self.identity_codec,
        }
        self.sessions = sessions
        # Queries and retrievals: on SQLite these must not take the write lock (BEGIN
        # IMMEDIATE), or a long C-FIND would stall every C-STORE behind it.
        self.read_sessions = read_sessions or sessions
        self.blobs = blobs
        self.codec = codec
        # When the last C-STORE arrived (CLOCK_MONOTONIC is system-wide on Linux, so node
        # processes share one value to let background compression yield to any of them).
        self.store_activity: ctypes.c_double = multiprocessing.RawValue("d", 0.0)
        # A failed fsync is final for every blob it covered: a second fsync may report
        # success for data the kernel has already dropped, so such a batch is not retried.
        self._committer: GroupCommitter[StoreRequest, StoreOutcome] = GroupCommitter(
            self._commit_batch, final=(BlobsNotDurableError,)
        )
        self._syncing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-sync")
        self._known_series = KnownSeries()  # used by the committing leader only
        # Each comparison of a duplicate holds both objects in memory: a few at a time.
        self._comparing = threading.BoundedSemaphore(self.COMPARISONS_AT_ONCE)

    @classmethod
    def open(cls, settings: Settings, migrate: bool = True, need_identity: bool = True) -> Archive:
        """Open (creating on first use) the archive the settings describe.

        Without ``need_identity`` (verification, rebuilding), a missing identity key file is
        no error: the archive opens without it and reports the instances it cannot open.

        Raises
        ------
        CodecInstallError
            If the codec's C core or the predictive prior does not load, or
            ``[pipeline] learned`` is on and its models are not installed.
        """
        data_dir = settings.storage.data_dir
        if settings.pipeline.models_dir is not None:
            use_models_folder(settings.pipeline.models_dir)
        # a path that cannot run fails here, never by coding with another one
        check_codec(DEFAULT_LEARNED if settings.pipeline.learned else None, prior=True)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # the index holds PHI
        url = settings.storage.resolved_database_url()
        if migrate:
            upgrade_database(url)
        engine = create_engine_for(url)
        blob_dir = settings.storage.resolved_blob_dir()
        key = open_blob_key(settings.storage.resolved_key_file(), blob_dir)
        blobs = LocalBlobStore(blob_dir, key)
        sessions = session_factory(engine)
        identity = _open_identity_keys(settings, sessions, blobs, need_identity)
        return cls(
            settings,
            sessions,
            blobs,
            Part10Codec(),
            read_sessions=session_factory(engine, readonly=True),
            identity=identity,
        )

    def compressing_codec(self) -> IdentityCodec:
        """The codec background compression writes with."""
        return self.identity_codec

    SERIES_REFERENCE_MIN_INSTANCES = 2
    """A series gets a data set reference once it has this many instances: a one-instance
    series would only pay for the reference (one more coded header) and gain nothing."""
    MAX_REFERENCE_BYTES = 1 << 20
    """A header larger than this (private blobs, overlays) makes no reference: zstd's prepared
    dictionary for it would take tens of MB of memory in every node process coding against
    it (4.4 MB for a 150 KB Siemens header), for headers that rarely repeat."""
    OWN_REFERENCE_MIN_INSTANCES = 8
    """A series this large gets its own reference even when its study has one: the study's
    (another series' header) leaves about twice the bytes per instance, which pays for a
    reference of its own from about this many instances on (measured on MR-EPI)."""

    def series_reference(self, instance: Instance, part10: bytes) -> DatasetReference | None:
        """The data set reference the blob of ``instance`` (whose Part-10 object is
        ``part10``) is coded against (:mod:`medzip_scp.storage.references`):

        1. its series' own;
        2. for a series of :data:`OWN_REFERENCE_MIN_INSTANCES` or more, one made from
           ``part10``, durably kept and recorded for the series before this returns;
        3. else the reference of another series of its study (one study's headers share
           the patient, study and equipment), when there is one;
        4. else, for a series of :data:`SERIES_REFERENCE_MIN_INSTANCES` or more, one made
           as in 2 (the study's first);
        5. else None (and None for a reference gone from the store: logged, coded without;
           and for a header above :data:`MAX_REFERENCE_BYTES`).
        """
        with self.read_sessions() as session:
            known = series_references(session, instance.series_fk)
        if known is None:  # the instance was replaced or removed meanwhile
            return None
        series_uid = known.series_instance_uid
        if known.recorded is not None:
            return self._kept_reference(known.recorded, series_uid)
        if known.members < self.OWN_REFERENCE_MIN_INSTANCES and known.study is not None:
            return self._kept_reference(known.study, series_uid)
        if known.members < self.SERIES_REFERENCE_MIN_INSTANCES:
            return None
        reference = self.identity_codec.series_reference(part10)
        if len(reference.data) > self.MAX_REFERENCE_BYTES:
            return None
        self.blobs.references.put(reference.data)
        with self.sessions() as session:
            record_reference(session, series_uid, reference.sha256.hex(), len(reference.data))
            try:
                session.commit()
                return reference
            except IntegrityError:  # another process recorded one first: use that one
                session.rollback()
        return self._recorded_instead(series_uid, reference)

    def _recorded_instead(self, series_uid: str, ours: DatasetReference) -> DatasetReference | None:
        """The reference another process recorded for the series while we made ``ours``
        (its file is kept before its row commits); ours goes, no blob names it yet."""
        with self.read_sessions() as session:
            sha256 = recorded_reference(session, series_uid)
        if sha256 is None or sha256 == ours.sha256.hex():
            return ours if sha256 is not None else None
        self.blobs.references.discard(ours.sha256)
        return self._kept_reference(sha256, series_uid)

    def _kept_reference(self, sha256: str, series_uid: str) -> DatasetReference | None:
        """The reference the store keeps under ``sha256``; None (logged: new blobs of the
        series are then coded without one) when it is gone or does not open."""
        try:
            data = self.blobs.references.get(bytes.fromhex(sha256))
        except (EnvelopeError, OSError) as exc:
            data, why = None, f"does not open ({type(exc).__name__})"
        else:
            why = "is missing"
        if data is not None:
            return DatasetReference(data)
        log.error(
            "data set reference %s of series %s %s in %s: new blobs of the series are coded "
            "without it; blobs that need it will not decode (restore refs/ from a backup)",
            sha256,
            series_uid,
            why,
            self.blobs.references.folder,
        )
        return None

    # -- C-STORE -------------------------------------------------------------------------

    COMPARISONS_AT_ONCE = 2
    """Duplicates of differing bytes compared by content at once, per node process."""

    def _write_original(
        self, received: ReceivedObject, sop_instance_uid: str
    ) -> tuple[StoredBlob, str]:
        """Seal and write what arrived (not yet durable), in one pass over the spooled file.

        Returns the blob and the SHA-256 of the data set as received (after File Meta): the
        identity of the content for duplicate detection and for ``medzip verify``.
        """
        digest = ConcurrentSha256()
        offset = received.dataset_offset

        def chunks() -> Iterator[bytes]:
            position = 0
            for chunk in _file_chunks(received.path):
                if position + len(chunk) > offset:
                    digest.update(memoryview(chunk)[max(0, offset - position) :])
                position += len(chunk)
                yield chunk

        blob = self.blobs.write(self.codec.encode_chunks(chunks()), bound_to=sop_instance_uid)
        return blob, digest.hexdigest()

    def store(self, received: ReceivedObject, calling_ae_title: str) -> StoreOutcome:
        """Archive a validated object; returns only after blob fsync and index commit.

        Raises
        ------
        MissingAttributeError
            The object lacks an attribute the index needs (nothing is written).
        """
        attrs = attributes_from_dataset(received.header)
        uid = attrs.sop_instance_uid
        self.store_activity.value = time.monotonic()
        blob, dataset_sha256 = self._write_original(received, uid)
        differences: dict[str, str | None] = {}
        try:
            # A duplicate whose data set bytes differ from the archived copy's is compared
            # by content, outside the transaction (it loads both objects); the transaction
            # then decides with that comparison, if the archived copy is still the same.
            for _attempt in range(3):
                request = StoreRequest(
                    received, attrs, blob, dataset_sha256, calling_ae_title, differences
                )
                # An unindexed blob counts as orphaned only once it has not changed for
                # ORPHAN_MIN_AGE: comparisons may have held this one back, so renew it.
                self.blobs.touch(blob.key)
                outcome = self._committer.submit(request)
                if not request.needs_comparison:
                    break
                self._compare_with_archived(received, uid, differences)
            else:
                raise RuntimeError(f"the archived copy of {uid} kept changing while compared")
        except BaseException:
            self._discard_unindexed(blob, uid)
            raise
        if outcome.result in (StoreResult.IDENTICAL_DUPLICATE, StoreResult.DUPLICATE_REJECTED):
            self.blobs.delete(blob.key)  # an identical or refused copy is not kept
        if outcome.result is StoreResult.DUPLICATE_REJECTED:
            log.warning(
                "duplicate %s from %r rejected: content differs from the archived copy (first "
                "difference: %s)",
                uid,
                calling_ae_title,
                outcome.first_difference,
            )
        elif outcome.result is StoreResult.IDENTICAL_DUPLICATE and differences:
            log.info(
                "duplicate %s from %r: the archived content, encoded otherwise (not kept)",
                uid,
                calling_ae_title,
            )
        elif outcome.result is StoreResult.REPLACED:
            log.info(
                "duplicate %s from %r replaced the archived copy, kept superseded (first "
                "difference: %s)",
                uid,
                calling_ae_title,
                outcome.first_difference,
            )
        return outcome

    def _compare_with_archived(
        self, received: ReceivedObject, sop_instance_uid: str, differences: dict[str, str | None]
    ) -> None:
        """Compare a received object with the archived copy of its SOP Instance, by
        content (dicom.equivalence), and note the result under that copy's hash."""
        with self.read_sessions() as session:
            archived = get_instance(session, sop_instance_uid)
            if archived is None:  # removed meanwhile: the transaction will see
                return
            session.expunge(archived)
        with self._comparing:
            try:
                archived_part10 = self.load_part10(archived)
            except InstanceIntegrityError as exc:
                log.error("cannot compare a duplicate with its archived copy: %s", exc)
                differences[archived.original_sha256] = "not compared: archived copy damaged"
                return
            differences[archived.original_sha256] = first_difference(
                archived_part10, received.path.read_bytes()
            )

    def _discard_unindexed(self, blob: StoredBlob, sop_instance_uid: str) -> None:
        """Nothing half-stored: remove the blob of a failed commit, unless the commit went
        through after all (a connection lost during COMMIT) and a row names it. When that
        cannot be checked, keep it: an unreferenced file is harmless, a row naming a
        removed blob is a lost image."""
        try:
            with self.read_sessions() as session:
                indexed = indexed_content(session, [sop_instance_uid]).get(sop_instance_uid)
        except Exception as exc:
            log.warning("kept blob %s of a failed commit: %s", blob.key, type(exc).__name__)
            return
        if indexed is None or indexed[1] != blob.key:
            self.blobs.delete(blob.key)

    def _commit_batch(self, batch: list[StoreRequest]) -> list[StoreOutcome]:
        """Make a batch durable: fsync its blobs, and index all of it in one transaction
        that commits only once they are durable.

        The fsyncs run in a worker thread while the rows are inserted (they wait on the
        disk, the inserts on Python), so a batch pays for the longer of the two, not both.
        """
        synced = self._syncing.submit(self.blobs.sync, [request.blob.key for request in batch])
        durable = functools.partial(_wait_durable, synced)
        try:
            try:
                return self._index_batch(batch, fast=True, blobs_durable=durable)
            except IntegrityError:
                # The one statement of the fast path failed as a whole (a series row gone,
                # say): forget what this process knew of series rows, and index the batch
                # again one instance at a time, with a savepoint each.
                self._known_series.clear()
                return self._index_batch(batch, fast=False, blobs_durable=durable)
        finally:
            wait([synced])  # done before a failed batch's blobs are removed

    def _index_batch(
        self, batch: list[StoreRequest], fast: bool, blobs_durable: Callable[[], object]
    ) -> list[StoreOutcome]:
        try:
            with self.sessions() as session:
                outcomes = self._index_new_of_known_series(session, batch) if fast else {}
                ordered = [
                    outcomes.get(i) or self._index(session, request)
                    for i, request in enumerate(batch)
                ]
                blobs_durable()  # raises if an fsync failed: the transaction rolls back
                session.commit()
        except BaseException:
            self._known_series.rolled_back()
            raise
        self._known_series.committed()
        return ordered

    def _facts(self, request: StoreRequest) -> StorageFacts:
        """What the index records about an instance besides its attributes."""
        return StorageFacts(
            transfer_syntax_uid=str(request.received.transfer_syntax_uid),
            blob_key=request.blob.key,
            original_size=request.received.dataset_size,
            original_sha256=request.dataset_sha256,
            stored_size=request.blob.stored_size,
            stored_sha256=request.blob.sha256,
            codec_id=self.codec.codec_id,
            calling_ae_title=request.calling_ae_title,
        )

    def _index_new_of_known_series(
        self, session: Session, batch: list[StoreRequest]
    ) -> dict[int, StoreOutcome]:
        """The fast path: index, in one statement, the batch's new instances of series this
        process has committed; returns their outcomes by position in the batch."""
        indexed = add_instances_of_known_series(
            session,
            [(request.attrs, self._facts(request)) for request in batch],
            self._known_series,
        )
        return {
            i: StoreOutcome(StoreResult.STORED, request.attrs.sop_instance_uid)
            for i, (request, done) in enumerate(zip(batch, indexed, strict=True))
            if done
        }

    def _index(self, session: Session, request: StoreRequest) -> StoreOutcome:
        sop_uid = request.attrs.sop_instance_uid
        facts = self._facts(request)
        policy = self.settings.storage.duplicate_policy
        request.needs_comparison = False  # a batch retried alone decides afresh
        for _attempt in range(3):
            archived = indexed_content(session, [sop_uid]).get(sop_uid)
            if archived is not None and archived[1] == request.blob.key:
                # This very blob is indexed: a commit reported as failed had gone through
                # (connection lost during COMMIT) and its batch is being retried.
                return StoreOutcome(StoreResult.STORED, sop_uid)
            archived_sha256 = archived[0] if archived is not None else None
            if archived_sha256 == request.dataset_sha256:
                return StoreOutcome(StoreResult.IDENTICAL_DUPLICATE, sop_uid)
            difference = None
            if archived_sha256 is not None:
                if archived_sha256 not in request.differences:
                    request.needs_comparison = True  # compared outside the transaction
                    return StoreOutcome(StoreResult.DUPLICATE_REJECTED, sop_uid)
                difference = request.differences[archived_sha256]
                if difference is None:  # the same content, encoded otherwise
                    return StoreOutcome(StoreResult.IDENTICAL_DUPLICATE, sop_uid)
                if policy is DuplicatePolicyValues.REJECT:
                    return StoreOutcome(StoreResult.DUPLICATE_REJECTED, sop_uid, difference)
            try:
                with session.begin_nested():
                    if archived_sha256 is None:
                        add_instance(session, request.attrs, facts, known_series=self._known_series)
                        return StoreOutcome(StoreResult.STORED, sop_uid)
                    # Locked: a compression swap committing meanwhile would leave the
                    # superseded version naming the blob it deletes.
                    existing = get_instance(session, sop_uid, for_update=True)
                    if existing is None:  # removed meanwhile: look again
                        continue
                    replace_instance(
                        session, existing, request.attrs, facts, known_series=self._known_series
                    )
                    return StoreOutcome(StoreResult.REPLACED, sop_uid, difference)
            except (IntegrityError, DuplicateInstanceError):
                # Another process indexed the same SOP Instance meanwhile: look again. The
                # savepoint's rollback may have undone series rows noted for the fast path.
                self._known_series.rolled_back()
                continue
        raise RuntimeError(f"could not index {sop_uid} after 3 attempts")

    # -- C-FIND, C-GET, C-MOVE -----------------------------------------------------------

    def find(
        self,
        model: QueryModel,
        identifier: Dataset,
        cancelled: Callable[[], bool] = lambda: False,
        limit: int | None = None,
    ) -> Iterator[Dataset]:
        """The C-FIND responses to ``identifier``, one per matching entity
        (:func:`medzip_scp.index.query.find`, with the node's default character set),
        streamed from a read transaction held until the iterator ends or is closed.

        Raises
        ------
        QueryError
            When first advanced: the identifier is not a valid query of ``model``.
        """
        with self.read_sessions() as session:
            yield from find(
                session,
                model,
                identifier,
                cancelled,
                default_charset=self.settings.query.character_set,
                limit=limit,
            )

    def retrieve(self, model: QueryModel, identifier: Dataset) -> list[Instance]:
        """The index rows (detached) of the instances a C-GET or C-MOVE identifier
        designates; each is then restored with :meth:`load_part10`.

        Raises
        ------
        QueryError
            The identifier is not a valid retrieve of ``model``.
        """
        with self.read_sessions() as session:
            instances = find_instances(session, model, identifier)
            session.expunge_all()
        return instances

    # -- Retrieval -----------------------------------------------------------------------

    def load_part10(self, instance: Instance) -> bytes:
        """Restore the Part-10 object of an instance, bit-exact, after checking that it is
        the instance the row describes (before a byte of it is sent anywhere).

        Raises
        ------
        InstanceIntegrityError
            The blob is missing, fails authentication (moved, swapped, altered, another
            instance's), or its content differs from the hashes recorded at ingest.
        """
        started = time.monotonic()
        try:
            part10 = self._load_checked(instance)
            metrics.observe_codec("decode", time.monotonic() - started)
            return part10
        except InstanceIntegrityError:
            # A compression worker may have swapped the blob (and deleted the one this row
            # named) since the row was read: check the current row before calling it damage.
            with self.read_sessions() as session:
                current = session.get(Instance, instance.id)
                if current is None or current.blob_key == instance.blob_key:
                    raise
                session.expunge(current)
            return self._load_checked(current)

    def _stored_blob(self, instance: Instance) -> bytearray:
        """The instance's blob, opened for its name and instance, with the checksum recorded
        when it was stored.

        Raises
        ------
        InstanceIntegrityError
            The blob is missing, unreadable, refused by its seal, or differs.
        """
        uid = instance.sop_instance_uid
        try:
            blob = self.blobs.read(instance.blob_key, bound_to=uid)
        except BlobNotFoundError:
            raise InstanceIntegrityError(
                uid, "blob missing from the store", Verdict.UNREADABLE
            ) from None
        except EnvelopeError as exc:
            raise InstanceIntegrityError(uid, f"blob refused: {exc}") from None
        except OSError as exc:
            raise InstanceIntegrityError(
                uid, f"blob unreadable ({type(exc).__name__})", Verdict.UNREADABLE
            ) from None
        if hashlib.sha256(blob).hexdigest() != instance.stored_sha256:
            raise InstanceIntegrityError(uid, "blob hash differs from the one recorded at ingest")
        return blob

    def _load_checked(self, instance: Instance) -> bytes:
        uid = instance.sop_instance_uid
        blob = self._stored_blob(instance)
        record: IdentityRecord | None = None
        try:
            if instance.codec_id == IdentityCodec.codec_id:
                opened = self.identity_codec.open(bytes(blob), uid)
                part10, record = opened.part10, opened.record
            else:
                part10 = self._decode(instance.codec_id, blob)
        except IdentityCheckError as exc:
            raise InstanceIntegrityError(uid, exc.reason, exc.verdict) from None
        except (UnknownModelError, UnsupportedFormatError, LookupError) as exc:
            raise InstanceIntegrityError(
                uid, f"blob needs what this node lacks ({exc})", Verdict.UNREADABLE
            ) from None
        except Exception as exc:
            reason = f"blob does not decode ({type(exc).__name__})"
            raise InstanceIntegrityError(uid, reason) from None
        dataset = memoryview(part10)[dataset_offset_of(part10) :]
        if len(dataset) != instance.original_size or (
            hashlib.sha256(dataset).hexdigest() != instance.original_sha256
        ):
            raise InstanceIntegrityError(uid, "decoded data set differs from what was received")
        if record is not None and self.settings.identity.check_on_retrieve:
            self._check_index_identity(instance, part10)
        return part10

    def _check_index_identity(self, instance: Instance, part10: bytes) -> None:
        """The index row's patient, study and series say what the sealed data set says
        (``[identity] check_on_retrieve``; strict: see the setting)."""
        with self.read_sessions() as session:
            mismatch = index_identity_mismatch(session, instance.id, attributes_of(part10))
        if mismatch is not None:
            raise InstanceIntegrityError(instance.sop_instance_uid, mismatch)

    def _decode(self, codec_id: str, blob: bytes) -> bytes:
        codec = self.codecs.get(codec_id)
        if codec is None:
            raise LookupError(f"instance stored with unknown codec {codec_id!r}")
        return codec.decode(blob)

    # -- Verification --------------------------------------------------------------------

    def select_instances(self, which: InstanceFilter) -> list[Instance]:
        """The index rows (detached) ``which`` selects, by id."""
        with self.read_sessions() as session:
            rows = select_instances(session, which)
            session.expunge_all()
        return rows

    def instances_by_id(self, instance_ids: Iterable[int]) -> list[Instance]:
        """The index rows (detached) of these instances, those that still exist, by id."""
        with self.read_sessions() as session:
            rows = instances_by_id(session, instance_ids)
            session.expunge_all()
        return rows

    def study_instances(self, instance_ids: Iterable[int]) -> dict[int, list[int]]:
        """The ids of every instance of each study these instances belong to, by study id."""
        with self.read_sessions() as session:
            return study_instances(session, instance_ids)

    def verify_study(
        self, members: list[Instance], selected: set[int]
    ) -> dict[int, tuple[Verdict, str]]:
        """Verdicts (and, unless OK, which check failed) on the ``selected`` instances of one
        study, whose ``members`` are all its instances: every check of :meth:`load_part10`,
        then the index rows against what each sealed data set and the study's other
        instances say (a study's index row follows its newest instance)."""
        verdicts: dict[int, tuple[Verdict, str]] = {}
        received: dict[int, InstanceAttributes] = {}
        for instance in members:
            try:
                part10 = self.load_part10(instance)
            except InstanceIntegrityError as exc:
                verdicts[instance.id] = (exc.verdict, exc.reason)
                continue
            verdicts[instance.id] = (Verdict.OK, "")
            # an attribute pydicom cannot read: not compared
            with contextlib.suppress(Exception):
                received[instance.id] = attributes_of(part10)
        with self.read_sessions() as session:
            for instance in members:
                sealed = received.get(instance.id)
                if instance.id not in selected or sealed is None:
                    continue
                if instance.codec_id != IdentityCodec.codec_id:
                    continue  # not sealed yet: its original is checked against ingest's hashes
                others = [attrs for other, attrs in received.items() if other != instance.id]
                mismatch = index_identity_mismatch(session, instance.id, sealed, others)
                if mismatch is not None:
                    verdicts[instance.id] = (Verdict.TAMPERED, mismatch)
        return {i: verdict for i, verdict in verdicts.items() if i in selected}

    # -- Background compression ----------------------------------------------------------

    def pending_compression(self, limit: int, shard: tuple[int, int] = (0, 1)) -> list[int]:
        """Ids of the instances (of ``shard``, see :func:`index.compression.pending_compression`)
        still stored as received, oldest first; of quiet series only, with ``[pipeline]
        series_quiet_seconds``."""
        quiet = self.settings.pipeline.series_quiet_seconds
        since = utcnow() - dt.timedelta(seconds=quiet) if quiet else None
        with self.sessions() as session:
            return pending_compression(session, Part10Codec.codec_id, limit, shard, since)

    def instance(self, instance_id: int) -> Instance | None:
        """An index row (detached) by its id; None when there is none."""
        with self.sessions() as session:
            row = session.get(Instance, instance_id)
            if row is not None:
                session.expunge(row)
            return row

    def mark_compress_failed(self, instance: Instance) -> None:
        """Keep an instance's original for good: its compression failed, and is not retried
        (unless the instance is replaced meanwhile)."""
        with self.sessions() as session:
            mark_compress_failed(session, instance.id, instance.blob_key)
            session.commit()

    def swap_blob(self, instance: Instance, blob: bytes, codec_id: str) -> StoredBlob | None:
        """Replace an instance's blob by ``blob`` (written by ``codec_id``, verified by the
        caller): written durably, the row swapped to it in one committed UPDATE that only
        succeeds while the row still names the blob ``instance`` names, and only then is
        that blob deleted. Returns the new blob; None when the row moved on meanwhile (a
        replace won), and the new blob is deleted. A crash anywhere leaves one of the two
        blobs indexed, never neither."""
        new = self.blobs.put_bytes(blob, bound_to=instance.sop_instance_uid)
        with self.sessions() as session:
            swapped = swap_blob(
                session,
                instance.id,
                instance.blob_key,
                new.key,
                codec_id,
                new.stored_size,
                new.sha256,
            )
            session.commit()
        if not swapped:
            self.blobs.delete(new.key)
            return None
        self.blobs.delete(instance.blob_key)
        return new

    # -- Index rebuild (``medzip db rebuild``) -------------------------------------------

    @contextlib.contextmanager
    def rebuilding(
        self,
    ) -> Iterator[Callable[[InstanceAttributes, StorageFacts, dt.datetime], Rebuilt]]:
        """One transaction that indexes the versions found in the blob store, oldest first,
        through the function it yields (:func:`~medzip_scp.index.ingest.index_found_version`);
        committed when the block ends, nothing written when it raises.

        Raises
        ------
        IndexNotEmptyError
            The index holds instances (before anything is written).
        """
        with self.sessions() as session:
            instances, superseded = indexed_counts(session)
            if instances or superseded:
                raise IndexNotEmptyError(
                    f"the index database is not empty (instances: {instances}, superseded "
                    f"versions: {superseded})"
                )
            known_series = KnownSeries()

            def index(
                attrs: InstanceAttributes, facts: StorageFacts, received_at: dt.datetime
            ) -> Rebuilt:
                state = InstanceState.STORED
                if facts.codec_id != Part10Codec.codec_id:
                    state = InstanceState.COMPRESSED
                return index_found_version(session, attrs, facts, received_at, state, known_series)

            yield index
            session.commit()

    # -- Housekeeping --------------------------------------------------------------------

    ORPHAN_MIN_AGE = 3600.0
    """Seconds an unindexed blob must have existed before it counts as orphaned: younger,
    it may be a C-STORE or compression of another process between fsync and commit."""

    def remove_orphan_blobs(self, min_age: float = ORPHAN_MIN_AGE, wait: bool = True) -> int:
        """Set aside (``blobs/set-aside``, never delete) the blobs no index row names, left
        by a crash between a blob's write and its commit (C-STORE or compression); returns
        how many. Never deleted: an index restored from an older backup names no blob stored
        since, and those instances were acknowledged; an admin moves them back and runs
        ``medzip db rebuild``, or deletes them once they are known to be leftovers.

        Only what a crash leaves goes (:meth:`_crash_leftover`), and nothing while the index
        is empty: an index lost, or being rebuilt, names no blob, and every one would go.
        A blob younger than ``min_age`` is only deleted once it is that old and still
        unnamed (``wait``; else left for a later sweep). One folder at a time, so memory
        stays bounded by a folder's blobs.
        """
        if self._index_is_empty():
            if next(self.blobs.keys(), None) is not None:
                log.warning(
                    "the index is empty but the blob store %s holds blobs: none removed as "
                    "orphans (was the index lost? `medzip db rebuild` builds it from the blobs)",
                    self.blobs.root,
                )
            return 0
        removed = kept = 0
        young: list[str] = []
        for folder in self.blobs.folders():
            for key in self._unindexed_blobs(folder):
                if not self._crash_leftover(key):
                    kept += 1
                elif self.blobs.age_seconds(key) >= min_age:
                    removed += self._remove_orphan(key)
                else:
                    young.append(key)
        if young and wait:
            time.sleep(max(0.0, min_age - min(self.blobs.age_seconds(k) for k in young)))
            for folder in sorted({key[:2] for key in young}):
                still = self._unindexed_blobs(folder)
                for key in young:
                    # a C-STORE renews its blob before each commit attempt: age again
                    if key in still and self.blobs.age_seconds(key) >= min_age:
                        removed += self._remove_orphan(key)
        if removed:
            log.warning(
                "set aside %d blobs no index row names in %s (written, never indexed: a crash "
                "before the commit, or an index older than the blob store); to index them "
                "again move them back (a key starting ab into ab/) and run `medzip db "
                "rebuild`; delete them once you know they are leftovers",
                removed,
                self.blobs.root / self.blobs.SET_ASIDE,
            )
        if kept:
            log.warning(
                "kept %d blobs no index row names that no crash leaves behind (compressed "
                "instances the index does not know, or blobs this node cannot read): an "
                "index rebuilt without a key or model they need? `medzip db rebuild` lists them",
                kept,
            )
        return removed

    def _index_is_empty(self) -> bool:
        with self.read_sessions() as session:
            return index_is_empty(session)

    def _crash_leftover(self, key: str) -> bool:
        """Whether an unindexed blob is what a crash leaves: an original a C-STORE wrote but
        did not commit, or a codec blob of an instance the index knows (its compression's
        swap did not commit, or the blob it replaced was not yet removed). A codec blob of
        an instance the index does not know, or one this node cannot read, is not: the index
        lacks it (rebuilt without the identity key or a model it needs), so it is kept. Nor
        is a codec blob of an indexed instance whose row names a blob that is gone (an
        index older than the store: the row still names the original compression removed):
        it may be the instance's only copy."""
        try:
            claim = codec_blob_claim(self.blobs, key)
            if claim is None:
                return True  # an original
            uid = claim.sop_instance_uid()
        except Exception:  # gone, another key, a model this node lacks, damage: keep it
            return False
        if not uid:
            return False
        with self.read_sessions() as session:
            named = blob_keys_of(session, uid)
        return bool(named) and all(self.blobs.exists(named_key) for named_key in named)

    def _unindexed_blobs(self, folder: str) -> set[str]:
        return _unindexed_blobs(self.blobs, self.read_sessions, folder)

    def _remove_orphan(self, key: str) -> int:
        """Set one blob aside; 1 if it was, 0 if it was gone already."""
        where = self.blobs.set_aside(key)
        if where is None:
            return 0
        log.info("set aside unindexed blob %s: %s", key, where)
        return 1

    def instances(self, sop_instance_uids: list[str] | None = None) -> list[Instance]:
        """Index rows, all or by SOP Instance UID (for verification tools)."""
        if sop_instance_uids is not None and not sop_instance_uids:
            return []  # an empty filter selects all: no UID, no row
        which = InstanceFilter(tuple(sop_instance_uids or ()))
        with self.sessions() as session:
            return select_instances(session, which)

    # -- Study management ----------------------------------------------------------------

    def studies(
        self, study_instance_uid: str | None = None, limit: int | None = None
    ) -> list[StudySummary]:
        """Summaries of every study (or the one named), newest first (``medzip studies``)."""
        with self.read_sessions() as session:
            return study_summaries(session, study_instance_uid, limit)

    def series_of(self, study_instance_uid: str) -> list[SeriesSummary]:
        with self.read_sessions() as session:
            return series_of(session, study_instance_uid)

    def study_instance_rows(self, study_instance_uid: str) -> list[Instance]:
        """A study's instances (detached rows), for export with :meth:`load_part10`."""
        return self.select_instances(InstanceFilter(study_instance_uid=study_instance_uid))

    def delete_study(self, study_instance_uid: str) -> int | None:
        """Delete a study for good; returns the number of blobs deleted (None: no such
        study). Safe while nodes serve: a retrieval under way fails the instances whose
        blobs went (never sends another's), and a node that still knows the study's series
        indexes their next instance afresh.

        Crash-safe order: the blobs and references the study's rows name are written to a
        journal (``data_dir/deleting/``, fsynced, locked while in use) before the rows'
        deletion commits; then they are deleted and the journal with them. After a crash,
        :meth:`finish_deletions` (at the node's start and before each deletion) deletes
        what a committed deletion left and forgets a journal whose deletion never
        committed: never a row without its blob, never a deleted study's blob kept."""
        self.finish_deletions()
        self._deletions.mkdir(parents=True, exist_ok=True, mode=0o700)
        journal = self._deletions / f"{study_instance_uid}.json"
        with open(journal, "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # finish_deletions leaves a locked journal be
            with self.sessions() as session:
                deleted = delete_study_rows(session, study_instance_uid)
                if deleted is None:
                    journal.unlink()
                    return None
                references = [sha.hex() for sha in deleted.references]
                held.truncate(0)
                held.write(json.dumps({"blobs": deleted.blob_keys, "references": references}))
                held.flush()
                os.fsync(held.fileno())
                fsync(self._deletions, os.O_DIRECTORY)
                session.commit()
            self._delete_journaled(journal)
        return len(deleted.blob_keys)

    @property
    def _deletions(self) -> Path:
        return Path(self.settings.storage.data_dir) / "deleting"

    def finish_deletions(self) -> int:
        """Finish what study deletions a crash interrupted (see :meth:`delete_study`);
        returns how many journals it found."""
        journals = sorted(self._deletions.glob("*.json")) if self._deletions.is_dir() else []
        finished = 0
        for journal in journals:
            with open(journal, "a+") as held:
                try:
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a deletion under way in another process
                stat = os.fstat(held.fileno())
                if not stat.st_size and time.time() - stat.st_mtime < 60:
                    continue  # just opened by a deletion about to lock it
                if journal.exists():  # not finished by another process meanwhile
                    self._delete_journaled(journal)
                    finished += 1
        return finished

    def _delete_journaled(self, journal: Path) -> None:
        text = journal.read_text()
        if not text:  # cut short before its content was written: nothing committed
            journal.unlink()
            return
        content = json.loads(text)
        keys = list(content["blobs"])
        with self.read_sessions() as session:
            named = named_keys(session, keys)  # rows still there: the deletion never committed
        for key in keys:
            if key not in named:
                self.blobs.delete(key)
        if not named:
            for sha in content["references"]:
                self.blobs.references.discard(bytes.fromhex(sha))
        journal.unlink()
        fsync(self._deletions, os.O_DIRECTORY)

    # -- Storage commitment --------------------------------------------------------------

    def commitment_failures(
        self, references: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], int]:
        """The references (SOP Class UID, SOP Instance UID) the node does not commit to,
        each with its Failure Reason (PS3.4 J.3.2.1.1): 0x0112 not stored,
        0x0119 stored under another SOP Class, 0x0110 its blob is missing, refused by its
        seal, or differs from the checksum recorded when it was stored (or it is marked
        corrupt). Every other reference is committed: its blob is intact."""
        references = list(references)
        uids = [uid for _, uid in references]
        rows: dict[str, Instance] = {}
        for start in range(0, len(uids), 1000):  # bounded IN lists
            rows |= {
                row.sop_instance_uid: row for row in self.instances(uids[start : start + 1000])
            }
        failures: dict[tuple[str, str], int] = {}
        for reference in references:
            class_uid, uid = reference
            row = rows.get(uid)
            if row is None:
                failures[reference] = 0x0112
            elif row.sop_class_uid != class_uid:
                failures[reference] = 0x0119
            elif row.state == InstanceState.CORRUPT or not self._blob_intact_now(row):
                failures[reference] = 0x0110
        return failures

    def _blob_intact_now(self, row: Instance) -> bool:
        """Whether the instance's blob is intact; when not, its row once more (background
        compression may have swapped the blob, and deleted the old one, meanwhile)."""
        if self._blob_intact(row):
            return True
        (current,) = self.instances([row.sop_instance_uid]) or (None,)
        return (
            current is not None
            and current.blob_key != row.blob_key
            and (self._blob_intact(current))
        )

    def _blob_intact(self, instance: Instance) -> bool:
        try:
            self._stored_blob(instance)
        except InstanceIntegrityError:
            return False
        return True

    def totals(self) -> list[StateTotals]:
        """Instances and their bytes by modality and state (``medzip status``)."""
        with self.read_sessions() as session:
            return instance_totals(session)

    def last_verification(self) -> VerificationRun | None:
        """The newest recorded verification pass (``medzip verify`` or a sweep), if any."""
        with self.read_sessions() as session:
            return last_verification(session)

    def record_verification(self, run: VerificationPass) -> None:
        """Record a verification pass (counts only) for ``medzip status``."""
        with self.sessions() as session:
            record_verification(session, run)
            session.commit()

    def health_problems(self) -> list[str]:
        """Why this node cannot serve now (empty when it can): the index does not answer,
        or the blob folder cannot be written. For readiness probes: no PHI, no key."""
        problems = []
        try:
            with self.read_sessions() as session:
                ping(session)
        except Exception as exc:
            problems.append(f"the index does not answer ({type(exc).__name__})")
        if not os.access(self.blobs.root, os.W_OK | os.X_OK):
            problems.append(f"blob folder {self.blobs.root} is not writable")
        return problems
