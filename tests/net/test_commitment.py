"""Storage Commitment Push Model: the node commits to the instances it holds intact and
reports the others with their reasons, on the requester's association or on a new one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StorageCommitmentPushModel
from sqlalchemy import select

from medzip_scp.index.models import Instance
from medzip_scp.net.commitment import COMMITMENT_INSTANCE
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from tests.helpers.node import RunningNode, free_port
from tests.helpers.scu import ct_dataset, store


def _request(references: list[tuple[str, str]]) -> Dataset:
    info = Dataset()
    info.TransactionUID = generate_uid()
    info.ReferencedSOPSequence = Sequence()
    for class_uid, instance_uid in references:
        item = Dataset()
        item.ReferencedSOPClassUID = class_uid
        item.ReferencedSOPInstanceUID = instance_uid
        info.ReferencedSOPSequence.append(item)
    return info


@contextmanager
def _requester(node: RunningNode, reports: list[tuple[int, Dataset]]) -> Iterator[Association]:
    """An association proposing Storage Commitment, taking the node's N-EVENT-REPORTs."""
    received = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((event.event_type, event.event_information))
        received.set()
        return 0x0000, None

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _references(report: Dataset, sequence: str) -> dict[str, int | None]:
    return {
        str(item.ReferencedSOPInstanceUID): item.get("FailureReason")
        for item in report.get(sequence, [])
    }


def test_commitment_reports_intact_instances_and_the_reason_for_each_other(
    node: RunningNode,
) -> None:
    kept, tampered = ct_dataset(), ct_dataset()
    for ds in (kept, tampered):
        assert store(node, ds) == Status.SUCCESS
    with node.archive.sessions() as session:
        row = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == tampered.SOPInstanceUID)
        ).one()
        path = node.archive.blobs._path(row.blob_key)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    path.write_bytes(bytes(damaged))
    unknown = generate_uid()
    request = _request(
        [
            (CTImageStorage, kept.SOPInstanceUID),
            (CTImageStorage, tampered.SOPInstanceUID),
            (CTImageStorage, unknown),
            (MRImageStorage, kept.SOPInstanceUID),  # stored as CT: a class conflict
        ]
    )
    reports: list[tuple[int, Dataset]] = []
    with _requester(node, reports) as assoc:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        for _ in range(100):
            if reports:
                break
            threading.Event().wait(0.1)
    assert len(reports) == 1, "no N-EVENT-REPORT on the requester's association"
    event_type, report = reports[0]
    assert event_type == 2  # some failed
    assert report.TransactionUID == request.TransactionUID
    assert _references(report, "ReferencedSOPSequence") == {kept.SOPInstanceUID: None}
    assert _references(report, "FailedSOPSequence") == {
        tampered.SOPInstanceUID: 0x0110,  # processing failure: the blob is not intact
        unknown: 0x0112,  # no such object instance
        kept.SOPInstanceUID: 0x0119,  # class/instance conflict
    }


def test_commitment_report_goes_to_the_configured_address_once_the_requester_left(
    node: RunningNode,
) -> None:
    """The usual IHE flow: the modality releases after the N-ACTION response and listens;
    the node associates with it (SCP role) and sends the report there."""
    sent = [ct_dataset() for _ in range(2)]
    for ds in sent:
        assert store(node, ds) == Status.SUCCESS
    reports: list[tuple[int, Dataset]] = []
    received = threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((event.event_type, event.event_information))
        received.set()
        return 0x0000, None

    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    port = free_port()
    server = listener.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    node.add_move_destination("MODALITY", "127.0.0.1", port)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        request = _request([(CTImageStorage, ds.SOPInstanceUID) for ds in sent])
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assoc.release()
        assert status.Status == 0x0000
        assert received.wait(30), "no N-EVENT-REPORT on a new association"
    finally:
        server.shutdown()
    ((event_type, report),) = reports
    assert event_type == 1  # all committed
    assert set(_references(report, "ReferencedSOPSequence")) == {ds.SOPInstanceUID for ds in sent}
    assert "FailedSOPSequence" not in report


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (lambda info: delattr(info, "TransactionUID"), 0x0120),
        (lambda info: setattr(info, "ReferencedSOPSequence", Sequence()), 0x0115),
    ],
)
def test_malformed_commitment_requests_are_refused(
    node: RunningNode, change: object, status: int
) -> None:
    request = _request([(CTImageStorage, generate_uid())])
    change(request)  # type: ignore[operator]
    with _requester(node, []) as assoc:
        answer, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE)
        assert answer.Status == status
        answer, _ = assoc.send_n_action(
            _request([(CTImageStorage, generate_uid())]),
            2,  # no such action
            StorageCommitmentPushModel,
            COMMITMENT_INSTANCE,
        )
        assert answer.Status == 0x0123


def test_an_instance_compressed_while_it_is_checked_is_committed(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Background compression swaps the blob (and deletes the original) between the row
    read and the blob read: the current row is read again before calling it a failure."""
    ds = ct_dataset()
    assert store(node, ds) == Status.SUCCESS
    archive = node.archive
    stale = archive.instances([ds.SOPInstanceUID])
    assert compress_pending(archive, archive.compressing_codec()).compressed == 1
    real = type(archive).instances
    calls = []

    def first_the_stale_rows(self: object, uids: list[str] | None = None) -> list:
        calls.append(uids)
        return stale if len(calls) == 1 else real(archive, uids)

    monkeypatch.setattr(type(archive), "instances", first_the_stale_rows)
    assert archive.commitment_failures([(CTImageStorage, ds.SOPInstanceUID)]) == {}
    assert len(calls) == 2
