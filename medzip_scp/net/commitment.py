"""Storage Commitment Push Model SCP (PS3.4 Annex J): a peer asks the node to take charge of
instances it sent (N-ACTION); the node answers at once, checks each instance, and reports
which it commits and which it does not, and why (N-EVENT-REPORT).

An instance is committed only when it is indexed under the SOP Class the request names and
its stored blob still has the checksum recorded when it was stored
(:meth:`~medzip_scp.archive.Archive.commitment_failures`). The report goes over the same
association while the peer keeps it open, else over a new association to the address the
configuration gives for the peer's AE title (``[[retrieve.destinations]]``), proposing the
SOP Class in the SCP role (PS3.4 J.3.3).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel

from medzip_scp import audit
from medzip_scp.archive import Archive
from medzip_scp.config import Right
from medzip_scp.net.access import AccessPolicy
from medzip_scp.net.handlers import drain_sends

__all__ = ["COMMITMENT_INSTANCE", "handle_commitment_request"]

log = logging.getLogger(__name__)

COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance (PS3.4 J.3.5)
_REQUEST_COMMITMENT = 1  # Action Type ID
_ALL_COMMITTED, _SOME_FAILED = 1, 2  # Event Type IDs
MAX_REFERENCES = 100_000  # instances one request may name (bounds memory and work)
# one request checked and reported at a time per node process: each may read and hash up to
# MAX_REFERENCES blobs, so concurrent requests wait their turn instead of piling up threads
_REPORTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medzip-commitment")
# N-ACTION statuses (PS3.4 J.3.2.2, PS3.7 C.5.x)
_NO_SUCH_ACTION = 0x0123
_NO_SUCH_INSTANCE = 0x0112
_INVALID_ARGUMENT = 0x0115
_MISSING_ATTRIBUTE = 0x0120
_RESOURCE_LIMITATION = 0x0213
_NOT_AUTHORIZED = 0x0124


@dataclass(frozen=True)
class _Request:
    transaction_uid: str
    references: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)


def _parse(info: Dataset | None) -> _Request | int:
    """The request's transaction and references, or the status refusing it."""
    if info is None or "TransactionUID" not in info or "ReferencedSOPSequence" not in info:
        return _MISSING_ATTRIBUTE
    items = info.ReferencedSOPSequence
    if not len(items):
        return _INVALID_ARGUMENT
    if len(items) > MAX_REFERENCES:
        return _RESOURCE_LIMITATION
    references = []
    for item in items:
        class_uid = str(item.get("ReferencedSOPClassUID", "") or "")
        instance_uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
        if not class_uid or not instance_uid:
            return _MISSING_ATTRIBUTE
        references.append((class_uid, instance_uid))
    return _Request(str(info.TransactionUID), references)


def handle_commitment_request(
    event: evt.Event, archive: Archive, policy: AccessPolicy
) -> tuple[int, Dataset | None]:
    """N-ACTION: check the request, answer it, and report from a thread of its own."""
    assoc: Association = event.assoc
    if not policy.allows(assoc, Right.STORE):
        return _NOT_AUTHORIZED, None
    request = event.request
    if request.ActionTypeID != _REQUEST_COMMITMENT:
        return _NO_SUCH_ACTION, None
    if str(request.RequestedSOPInstanceUID) != COMMITMENT_INSTANCE:
        return _NO_SUCH_INSTANCE, None
    try:
        parsed = _parse(event.action_information)
    except Exception as exc:  # an undecodable data set
        log.warning("storage commitment request refused: %s", type(exc).__name__)
        return _INVALID_ARGUMENT, None
    if isinstance(parsed, int):
        return parsed, None
    _REPORTER.submit(_report, archive, assoc, parsed)
    return 0x0000, None


def _report(archive: Archive, assoc: Association, request: _Request) -> None:
    """Check every referenced instance, then send the report (same association, else new);
    whatever happens, the outcome is logged and audited."""
    calling = str(assoc.requestor.ae_title).strip()
    who = {"calling_ae": calling, "address": assoc.requestor.address}
    try:
        failures = archive.commitment_failures(request.references)
    except Exception as exc:  # the index is away: nothing is committed, every one fails
        log.error("storage commitment check failed: %s", type(exc).__name__)
        failures = dict.fromkeys(request.references, 0x0110)
    report = Dataset()
    report.TransactionUID = request.transaction_uid
    report.ReferencedSOPSequence = Sequence()
    failed = Sequence()
    for class_uid, instance_uid in request.references:
        item = Dataset()
        item.ReferencedSOPClassUID = class_uid
        item.ReferencedSOPInstanceUID = instance_uid
        reason = failures.get((class_uid, instance_uid))
        if reason is None:
            report.ReferencedSOPSequence.append(item)
        else:
            item.FailureReason = reason
            failed.append(item)
    if failed:
        report.FailedSOPSequence = failed
    event_type = _SOME_FAILED if failed else _ALL_COMMITTED
    # the N-ACTION response goes first: the handler has returned it by now (the checks
    # above read the index and every blob); let it leave before the report
    time.sleep(0.05)
    drain_sends(assoc)
    sent = _send_on(assoc, report, event_type) or _send_new(archive, calling, report, event_type)
    audit.record(
        "commit",
        "success" if sent else "not reported",
        **who,
        transaction_uid=request.transaction_uid,
        committed=len(report.ReferencedSOPSequence),
        failed=len(failed),
    )
    log.info(
        "storage commitment %s from %r: %d committed, %d failed, %s",
        request.transaction_uid,
        calling,
        len(report.ReferencedSOPSequence),
        len(failed),
        "reported" if sent else "NOT reported (no association, no address for the AE title)",
    )


def _delivered(assoc: Association, report: Dataset, event_type: int) -> bool:
    """Send the report on ``assoc``; whether the peer answered it with Success (no answer,
    an invalid one, a refused context or a dropped association: not delivered)."""
    try:
        status, _ = assoc.send_n_event_report(
            report, event_type, StorageCommitmentPushModel, COMMITMENT_INSTANCE
        )
    except Exception as exc:
        log.info("storage commitment report not delivered: %s", type(exc).__name__)
        return False
    return status is not None and status.get("Status") == 0


def _send_on(assoc: Association, report: Dataset, event_type: int) -> bool:
    return assoc.is_established and _delivered(assoc, report, event_type)


def _send_new(archive: Archive, calling: str, report: Dataset, event_type: int) -> bool:
    destination = archive.settings.move_destination(calling)
    if destination is None:
        return False
    ae = AE(ae_title=archive.settings.node.ae_title)
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    try:
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, ext_neg=[role]
        )
    except Exception as exc:
        log.error("storage commitment report: %r unreachable (%s)", calling, type(exc).__name__)
        return False
    if not assoc.is_established:
        log.error("storage commitment report: %r did not accept an association", calling)
        return False
    try:
        return _delivered(assoc, report, event_type)
    finally:
        assoc.release()
