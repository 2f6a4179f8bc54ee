"""Retrieval never serves another instance: a blob swapped on disk, or a row pointing at
another instance's blob, fails that sub-operation (issue: C-GET served the other patient)."""

from __future__ import annotations

import logging

import pytest
from pydicom.dataset import Dataset
from pynetdicom import evt
from sqlalchemy import select, update

from medzip_scp.index.models import Instance
from medzip_scp.net.status import Status
from medzip_scp.pipeline.verify import verify_archive
from tests.helpers.node import RunningNode, c_get
from tests.helpers.scu import ct_dataset, store


def _get(node: RunningNode, ds: Dataset) -> tuple[Dataset, Dataset | None, list[Dataset]]:
    """C-GET one instance at IMAGE level; returns the final response, its identifier and
    what arrived."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return Status.SUCCESS

    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = ds.StudyInstanceUID
    query.SeriesInstanceUID = ds.SeriesInstanceUID
    query.SOPInstanceUID = ds.SOPInstanceUID
    responses = c_get(node, query, on_store)
    return responses[-1][0], responses[-1][1], received


def _two_patients(node: RunningNode) -> tuple[Dataset, Dataset]:
    alpha = ct_dataset(PatientName="Alpha^Anna", PatientID="MZ-ALPHA-1")
    beta = ct_dataset(PatientName="Beta^Bert", PatientID="MZ-BETA-2")
    for ds in (alpha, beta):
        assert store(node, ds) == Status.SUCCESS
    return alpha, beta


def _row(node: RunningNode, uid: str) -> Instance:
    with node.archive.sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        session.expunge(row)
        return row


@pytest.mark.parametrize("tampering", ["blob files swapped", "row names the other blob"])
def test_a_tampered_instance_is_never_served(
    node: RunningNode, tampering: str, caplog: pytest.LogCaptureFixture
) -> None:
    alpha, beta = _two_patients(node)
    a, b = _row(node, alpha.SOPInstanceUID), _row(node, beta.SOPInstanceUID)
    if tampering == "blob files swapped":
        path_a, path_b = node.archive.blobs._path(a.blob_key), node.archive.blobs._path(b.blob_key)
        bytes_a, bytes_b = path_a.read_bytes(), path_b.read_bytes()
        path_a.write_bytes(bytes_b)
        path_b.write_bytes(bytes_a)
    else:
        with node.archive.sessions() as session:
            session.execute(update(Instance).where(Instance.id == a.id).values(blob_key=b.blob_key))
            session.commit()

    with caplog.at_level(logging.ERROR):
        final, failed, received = _get(node, alpha)
    assert received == []  # not one byte of Beta's image went out as Alpha's
    assert final.Status == Status.WARNING_SUBOPERATIONS
    assert failed is not None and failed.FailedSOPInstanceUIDList == alpha.SOPInstanceUID
    refusals = [r.getMessage() for r in caplog.records if "refusing to send" in r.getMessage()]
    assert refusals and alpha.SOPInstanceUID in refusals[0]
    assert not any("Alpha" in m or "Beta" in m or "MZ-" in m for m in caplog.messages)

    report = verify_archive(node.archive)
    damaged = dict(report.problems)
    assert alpha.SOPInstanceUID in damaged and "blob refused" in damaged[alpha.SOPInstanceUID]
    if tampering == "blob files swapped":
        assert beta.SOPInstanceUID in damaged
    else:  # Beta's own row and blob are untouched: still served, intact
        assert beta.SOPInstanceUID not in damaged
        final, _, received = _get(node, beta)
        assert final.Status == Status.SUCCESS
        assert [ds.PatientID for ds in received] == ["MZ-BETA-2"]


def test_a_blob_altered_behind_a_valid_envelope_is_refused(node: RunningNode) -> None:
    """The hashes recorded at ingest are checked too: a blob re-sealed with the right key
    and binding but other content (a restored backup of another version, say) is refused."""
    (alpha, _beta) = _two_patients(node)
    a = _row(node, alpha.SOPInstanceUID)
    blobs = node.archive.blobs
    altered = bytearray(blobs.read(a.blob_key, a.sop_instance_uid))
    altered[-1] ^= 0x01  # one pixel bit
    path = blobs._path(a.blob_key)
    path.unlink()
    resealed = blobs._key.seal([bytes(altered)], f"{a.blob_key}\n{a.sop_instance_uid}".encode())
    path.write_bytes(b"".join(resealed))
    final, _, received = _get(node, alpha)
    assert received == [] and final.Status == Status.WARNING_SUBOPERATIONS
    assert dict(verify_archive(node.archive).problems) == {
        alpha.SOPInstanceUID: "blob hash differs from the one recorded at ingest"
    }
