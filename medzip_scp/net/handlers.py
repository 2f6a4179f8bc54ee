"""DIMSE handlers: thin adapters from pynetdicom events to the archive.

Handlers never raise: every exception is mapped to a named status here, and logs carry UIDs,
AE titles and statuses only (no names, IDs, dates or data sets).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from medzip_scp.archive import Archive, InstanceIntegrityError, StoreResult
from medzip_scp.config import Right
from medzip_scp.dicom.part10 import (
    InvalidObjectError,
    RejectReason,
    load_dataset,
    read_received,
)
from medzip_scp.dicom.transcode import TranscodeError, choose_syntax, convert, proposal_syntaxes
from medzip_scp.index.ingest import MissingAttributeError
from medzip_scp.index.models import Instance
from medzip_scp.index.query import QueryError, QueryModel
from medzip_scp.net import pynetdicom_internals
from medzip_scp.net.access import AccessPolicy
from medzip_scp.net.status import Status

log = logging.getLogger(__name__)

STATUS_BY_REASON = {
    RejectReason.UNPARSABLE: Status.CANNOT_UNDERSTAND,
    RejectReason.MISSING_ATTRIBUTE: Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE,
    RejectReason.SOP_CLASS_MISMATCH: Status.DATASET_SOP_CLASS_MISMATCH,
    RejectReason.SOP_INSTANCE_MISMATCH: Status.CANNOT_UNDERSTAND_SOP_INSTANCE_MISMATCH,
    RejectReason.PIXEL_DATA_INCONSISTENT: Status.CANNOT_UNDERSTAND_PIXEL_DATA,
    RejectReason.INVALID_UID: Status.CANNOT_UNDERSTAND_INVALID_UID,
}

STATUS_BY_STORE_RESULT = {
    StoreResult.STORED: Status.SUCCESS,
    StoreResult.IDENTICAL_DUPLICATE: Status.SUCCESS,
    StoreResult.REPLACED: Status.SUCCESS,
    StoreResult.DUPLICATE_REJECTED: Status.DUPLICATE_SOP_INSTANCE,
}

QR_CLASSES = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

_PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
}


def _query_model(event: evt.Event) -> QueryModel:
    sop_class = UID(event.request.AffectedSOPClassUID)
    return "PATIENT" if sop_class in _PATIENT_ROOT else "STUDY"


def handle_requested(event: evt.Event, policy: AccessPolicy) -> None:
    """A-ASSOCIATE-RQ: reject unknown calling AEs, wrong called AE and foreign hosts."""
    assoc: Association = event.assoc
    primitive = assoc.requestor.primitive
    calling = str(primitive.calling_ae_title).strip()
    called = str(primitive.called_ae_title).strip()
    rejection = policy.association_rejection(calling, called, assoc.requestor.address)
    if rejection is None:
        _prefer_requestor_syntaxes(assoc)
        return
    log.warning(
        "association rejected from %s (A-ASSOCIATE-RJ %s): %s",
        assoc.requestor.address,
        "/".join(str(field) for field in rejection.fields),
        rejection.reason,
    )
    assoc.acse.send_reject(*rejection.fields)
    # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ is out and
    # the peer has closed (or the ARTIM timer fired) before the socket is shut down.
    assoc.kill()


def _prefer_requestor_syntaxes(assoc: Association) -> None:
    """Accept, per context, the first transfer syntax the peer proposed that we support.

    pynetdicom picks the acceptor's first matching syntax; ours lists Implicit VR first, so a
    viewer proposing [JPEG 2000 Lossless, Explicit, Implicit] would get Implicit VR, and a
    compressed original could not go back as it is.
    """
    preferred: dict[str, list[UID]] = {}
    for cx in assoc.requestor.primitive.presentation_context_definition_list:
        preferred.setdefault(cx.abstract_syntax, list(cx.transfer_syntax))
    for cx in assoc.acceptor.supported_contexts:
        order = preferred.get(cx.abstract_syntax)
        if order:
            ours = set(cx.transfer_syntax)
            first = [ts for ts in order if ts in ours]
            cx.transfer_syntax = first + [ts for ts in cx.transfer_syntax if ts not in first]


def handle_echo(event: evt.Event, policy: AccessPolicy) -> int:
    if not policy.allows(event.assoc, Right.ECHO):
        return Status.NOT_AUTHORIZED
    return Status.SUCCESS


def handle_store(event: evt.Event, archive: Archive, policy: AccessPolicy) -> int:
    """C-STORE: success only once the blob is fsynced and the index row committed."""
    assoc: Association = event.assoc
    calling = assoc.requestor.ae_title
    if not policy.allows(assoc, Right.STORE):
        return Status.NOT_AUTHORIZED
    request = event.request
    try:
        received = read_received(
            event.dataset_path,
            expected_sop_class_uid=str(request.AffectedSOPClassUID),
            expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
        )
    except InvalidObjectError as exc:
        log.warning(
            "C-STORE from %r refused (sop_instance=%s): %s",
            calling,
            request.AffectedSOPInstanceUID,
            exc,
        )
        return STATUS_BY_REASON[exc.reason]
    except Exception as exc:  # anything pydicom did not foresee
        log.warning("C-STORE from %r refused: unreadable (%s)", calling, type(exc).__name__)
        return Status.CANNOT_UNDERSTAND
    try:
        outcome = archive.store(received, calling)
    except MissingAttributeError as exc:
        log.warning("C-STORE from %r refused: %s", calling, exc)
        return Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE
    except Exception as exc:
        # Disk full, database down...: nothing was acknowledged, the peer may retry.
        log.error(
            "C-STORE of %s from %r failed: %s",
            request.AffectedSOPInstanceUID,
            calling,
            type(exc).__name__,
        )
        return Status.OUT_OF_RESOURCES
    status = STATUS_BY_STORE_RESULT[outcome.result]
    log.info(
        "C-STORE %s from %r: %s (0x%04X)",
        outcome.sop_instance_uid,
        calling,
        outcome.result.value,
        status,
    )
    return status


FIND_RESPONSES_IN_FLIGHT = 16


def drain_sends(assoc: Association) -> None:
    """Wait until pynetdicom has sent every queued PDU of this association.

    Its reactor reads nothing from the peer (a C-CANCEL) while it has PDUs to send, and it
    queues responses without bound: a fast C-FIND over thousands of matches would be sent
    whole, and held whole in memory, before a C-CANCEL is even read. Draining every
    :data:`FIND_RESPONSES_IN_FLIGHT` responses bounds both (and costs about 2 ms per
    batch of responses).
    """
    dul = assoc.dul
    while dul.to_provider_queue.qsize() and assoc.is_established:
        time.sleep(0.0005)
    # The reactor reads (a C-CANCEL, say) on its next turn after the queue empties; give it
    # two turns before the caller looks for a cancel.
    time.sleep(2 * pynetdicom_internals.run_loop_delay(dul))


def _cancel_latch(event: evt.Event) -> Callable[[], bool]:
    """``event.is_cancelled`` consumes the C-CANCEL it reports (pynetdicom deletes it), so
    remember it: once cancelled, every later check must say so too."""
    seen = False

    def cancelled() -> bool:
        nonlocal seen
        seen = seen or event.is_cancelled
        return seen

    return cancelled


def handle_find(
    event: evt.Event, archive: Archive, policy: AccessPolicy
) -> Iterator[tuple[int, Dataset | None]]:
    """C-FIND on Patient Root and Study Root; checks C-CANCEL before each response."""
    if not policy.allows(event.assoc, Right.FIND):
        yield Status.NOT_AUTHORIZED, None
        return
    model = _query_model(event)
    try:
        identifier = event.identifier
    except Exception:
        yield Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    cancelled = _cancel_latch(event)
    wants_retrieve_aet = "RetrieveAETitle" in identifier
    wants_availability = "InstanceAvailability" in identifier
    max_answers = archive.settings.query.max_answers
    count = 0
    try:
        # One match more than answered tells that the limit cut the answer short.
        with contextlib.closing(
            archive.find(model, identifier, cancelled, limit=max_answers + 1)
        ) as responses:
            for response in responses:
                if cancelled():
                    yield Status.CANCEL, None
                    return
                if count == max_answers:
                    log.warning(
                        "C-FIND from %r: more than %d matches ([query] max_answers), "
                        "answered those, then 0x%04X",
                        event.assoc.requestor.ae_title,
                        count,
                        Status.OUT_OF_RESOURCES,
                    )
                    yield _too_many_matches(count), None
                    return
                if wants_retrieve_aet:
                    response.RetrieveAETitle = archive.settings.node.ae_title
                if wants_availability:
                    response.InstanceAvailability = "ONLINE"
                count += 1
                if count % FIND_RESPONSES_IN_FLIGHT == 0:
                    drain_sends(event.assoc)
                yield Status.PENDING, response
    except QueryError as exc:
        log.warning("C-FIND from %r refused: %s", event.assoc.requestor.ae_title, exc)
        yield Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    except Exception as exc:
        log.error("C-FIND failed: %s", type(exc).__name__)
        yield Status.UNABLE_TO_PROCESS, None
        return
    if cancelled():
        yield Status.CANCEL, None
        return
    log.info(
        "C-FIND %s level from %r: %d matches",
        identifier.get("QueryRetrieveLevel", "?"),
        event.assoc.requestor.ae_title,
        count,
    )


def _too_many_matches(answered: int) -> Dataset:
    """Final C-FIND status after ``answered`` responses when more entities matched.

    PS3.4 C.4.1.1.4 has no warning for an incomplete answer; 0xA700 (Refused: Out of
    Resources) is its status for a resource limit, and being a failure no peer takes
    the responses it got for the whole answer. (Orthanc answers 0xFE00 instead, which
    claims a C-CANCEL the peer never sent.)
    """
    status = Dataset()
    status.Status = Status.OUT_OF_RESOURCES
    status.ErrorComment = f"more than {answered} matches; narrow the query"
    return status


def handle_sop_extended(event: evt.Event) -> dict[UID, bytes]:
    """SOP Class Extended Negotiation (PS3.4 C.5.1.1, C.5.2.1, C.5.3.1): relational queries
    and relational retrieval supported (byte 1), the other options not (0).

    Queries and retrieves are relational whether or not a peer asks; this only says so.
    """
    answer = {}
    for sop_class, app_info in event.app_info.items():
        if sop_class in QR_CLASSES and app_info:
            answer[sop_class] = b"\x01" + bytes(len(app_info[:5]) - 1)
    return answer


def _failed_placeholder(sop_instance_uid: str) -> Dataset:
    """A data set no context can carry: pynetdicom counts it as one failed sub-operation
    and puts its UID in the Failed SOP Instance UID List."""
    ds = Dataset()
    ds.SOPClassUID = "0.0"
    ds.SOPInstanceUID = sop_instance_uid
    return ds


class StoredObject(Dataset):
    """A restored Part-10 object to be sent from its file as it was received: group
    lengths, UN elements and value encodings byte for byte, read in chunks
    (``STORE_SEND_CHUNKED_DATASET``). The file is an anonymous in-memory one (nothing on
    disk), freed on :meth:`close`.

    pynetdicom's C-GET/C-MOVE services take only data sets from a handler, though its
    ``send_c_store`` sends from a path; this empty data set carries the path to it
    (see :func:`medzip_scp.net.server.configure_pynetdicom`).
    """

    def __init__(self, part10: bytes, instance: Instance) -> None:
        super().__init__()
        # pynetdicom skips a sub-operation whose data set is empty (falsy)
        self.SOPClassUID = instance.sop_class_uid
        self.SOPInstanceUID = instance.sop_instance_uid
        self.transfer_syntax = UID(instance.transfer_syntax_uid)
        fd = os.memfd_create("medzip-retrieve", os.MFD_CLOEXEC)
        self._closed = weakref.finalize(self, os.close, fd)  # also if dropped unsent
        with memoryview(part10) as view:
            while view:  # one write() stops short of 2 GiB
                view = view[os.write(fd, view) :]
        self.path = Path(f"/proc/self/fd/{fd}")
        self._fd = fd

    def read(self) -> bytes:
        """The whole object again (to convert it to another syntax)."""
        size = os.fstat(self._fd).st_size
        parts, done = [], 0
        while done < size:  # one read() stops short of 2 GiB
            part = os.pread(self._fd, size - done, done)
            if not part:
                raise OSError(f"restored object ended at byte {done} of {size}")
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def close(self) -> None:
        self._closed()


class _LoadAhead:
    """The instances of a retrieval, each restored (read, checked, decoded) on another
    thread one instance ahead of the one being sent: decoding the next overlaps sending this
    one, and the first starts as soon as the matches are known (for C-MOVE, while the
    sub-association is being opened). At most two restored objects are held at a time."""

    def __init__(self, archive: Archive, instances: list[Instance]) -> None:
        self.instances = instances
        self._archive = archive
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medzip-retrieve")
        self._ahead = self._load(0)

    def _load(self, position: int) -> Future[StoredObject] | None:
        if position >= len(self.instances):
            return None
        return self._pool.submit(self._restore, self.instances[position])

    def _restore(self, instance: Instance) -> StoredObject:
        # Into its in-memory file at once: the restored bytes are not held twice.
        return StoredObject(self._archive.load_part10(instance), instance)

    def __iter__(self) -> Iterator[tuple[Instance, Future[StoredObject]]]:
        for position, instance in enumerate(self.instances):
            current = self._ahead
            assert current is not None
            self._ahead = self._load(position + 1)  # starts once this one is restored
            yield instance, current

    def close(self) -> None:
        """Stop loading (a load under way finishes on its own; its result is dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _prepare(stored: StoredObject, accepted: list[UID]) -> Dataset | StoredObject:
    """What to send for one sub-operation: the object as received when the peer accepted
    its transfer syntax, else a data set converted to one the peer accepted."""
    if stored.transfer_syntax in accepted:
        return stored
    part10 = stored.read()
    stored.close()
    return convert(load_dataset(part10), choose_syntax(stored.transfer_syntax, accepted))


def _sub_operations(
    event: evt.Event,
    loads: _LoadAhead,
    accepted_for: Callable[[str], list[UID]],
) -> Iterator[tuple[int, Dataset | None]]:
    instances = loads.instances
    unsendable: list[str] = []
    cancelled = _cancel_latch(event)
    sent: StoredObject | None = None
    try:
        for position, (instance, loaded) in enumerate(loads, 1):
            if sent is not None:  # pynetdicom has sent it by the time it asks for the next
                sent.close()
                sent = None
            if cancelled():
                yield Status.CANCEL, None
                return
            try:
                prepared = _prepare(loaded.result(), accepted_for(instance.sop_class_uid))
            except TranscodeError as exc:
                log.warning("cannot send %s: %s", instance.sop_instance_uid, exc)
                prepared = None
            except InstanceIntegrityError as exc:
                # Never send what may be another instance (another patient's image): this
                # sub-operation fails, and `medzip verify` reports the same finding.
                log.error("refusing to send %s", exc)
                prepared = None
            except Exception as exc:
                log.error("cannot read %s: %s", instance.sop_instance_uid, type(exc).__name__)
                prepared = None
            if isinstance(prepared, StoredObject):
                sent = prepared
            if prepared is not None:
                yield Status.PENDING, prepared
                continue
            unsendable.append(instance.sop_instance_uid)
            if position == len(instances) and len(unsendable) == len(instances):
                # Every sub-operation failed on our side: the final response is Warning
                # 0xB000 with the Failed SOP Instance UID List (PS3.4 C.4.3.1.3.2), not
                # pynetdicom's 0xA702, which would claim the sub-operations could not be
                # attempted at all.
                failed = Dataset()
                failed.FailedSOPInstanceUIDList = unsendable
                yield Status.WARNING_SUBOPERATIONS, failed
                return
            yield Status.PENDING, _failed_placeholder(instance.sop_instance_uid)
    finally:
        if sent is not None:
            sent.close()


def _allow_get_without_role_selection(assoc: Association) -> None:
    """Horos/OsiriX propose storage contexts for C-GET without SCP/SCU role selection;
    treat such contexts as if the peer had offered the SCP role (PS3.4 C.4.3.1)."""
    negotiated = set(assoc.requestor.role_selection)
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax not in negotiated and not cx.as_scu:
            pynetdicom_internals.grant_scu_role(cx)  # pynetdicom has no public switch


def handle_get(
    event: evt.Event, archive: Archive, policy: AccessPolicy
) -> Iterator[int | tuple[int, Dataset | None]]:
    """C-GET: sub-operations on the same association, in a syntax the peer accepted."""
    if not policy.allows(event.assoc, Right.GET):
        yield 1
        yield Status.NOT_AUTHORIZED, None
        return
    try:
        instances = archive.retrieve(_query_model(event), event.identifier)
    except QueryError as exc:
        log.warning("C-GET refused: %s", exc)
        yield 1
        yield Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    except Exception as exc:
        log.error("C-GET failed: %s", type(exc).__name__)
        yield 1
        yield Status.UNABLE_TO_PROCESS, None
        return
    assoc: Association = event.assoc
    if archive.settings.retrieve.get_without_role_selection:
        _allow_get_without_role_selection(assoc)

    def accepted_for(sop_class_uid: str) -> list[UID]:
        return [
            cx.transfer_syntax[0]
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class_uid and cx.as_scu
        ]

    log.info("C-GET from %r: %d sub-operations", assoc.requestor.ae_title, len(instances))
    loads = _LoadAhead(archive, instances)
    try:
        yield len(instances)
        yield from _sub_operations(event, loads, accepted_for)
    finally:
        loads.close()


def _move_contexts(instances: list[Instance]) -> list[PresentationContext]:
    seen: set[tuple[str, tuple[str, ...]]] = set()
    contexts = []
    for instance in instances:
        for syntaxes in proposal_syntaxes(UID(instance.transfer_syntax_uid)):
            key = (instance.sop_class_uid, tuple(syntaxes))
            if key not in seen:
                seen.add(key)
                contexts.append(build_context(instance.sop_class_uid, syntaxes))
    return contexts[:128]  # PS3.8: at most 128 presentation contexts per association


def handle_move(event: evt.Event, archive: Archive, policy: AccessPolicy) -> Iterator[Any]:
    """C-MOVE to a destination named in the configuration (unknown: 0xA801)."""
    destination = archive.settings.move_destination(str(event.move_destination))
    if not policy.allows(event.assoc, Right.MOVE):
        yield None, None  # pynetdicom answers 0xA801; refusing here must not reveal matches
        return
    if destination is None:
        log.warning(
            "C-MOVE from %r refused: unknown destination %r",
            event.assoc.requestor.ae_title,
            str(event.move_destination).strip(),
        )
        yield None, None
        return
    try:
        instances = archive.retrieve(_query_model(event), event.identifier)
    except QueryError as exc:
        log.warning("C-MOVE refused: %s", exc)
        yield destination.host, destination.port
        yield 1
        yield Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, None
        return
    sub_association: list[Association] = []

    def on_established(sub_event: evt.Event) -> None:
        sub_association.append(sub_event.assoc)

    loads = _LoadAhead(archive, instances)
    try:
        yield (
            destination.host,
            destination.port,
            {
                "contexts": _move_contexts(instances),
                "evt_handlers": [(evt.EVT_ESTABLISHED, on_established)],
            },
        )
        log.info(
            "C-MOVE from %r to %r: %d sub-operations",
            event.assoc.requestor.ae_title,
            destination.ae_title,
            len(instances),
        )
        yield len(instances)

        def accepted_for(sop_class_uid: str) -> list[UID]:
            if not sub_association:
                return []
            return [
                cx.transfer_syntax[0]
                for cx in sub_association[0].accepted_contexts
                if cx.abstract_syntax == sop_class_uid
            ]

        yield from _sub_operations(event, loads, accepted_for)
    finally:
        loads.close()
