"""C-STORE: durability, duplicates and bad input, driven by pynetdicom's SCU."""

from __future__ import annotations

import copy
import logging
import socket
import struct
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import select

from medzip_scp.config import DuplicatePolicyValues, Settings
from medzip_scp.dicom.part10 import dataset_offset_of
from medzip_scp.index.models import Instance, SupersededInstance
from medzip_scp.net.status import Status
from medzip_scp.pipeline.verify import verify_archive
from tests.helpers.node import RunningNode, sending_files_as_they_are
from tests.helpers.scu import association, count_instances, ct_dataset, store


def test_store_is_indexed_and_blob_is_sealed(node: RunningNode) -> None:
    ds = ct_dataset()
    assert store(node, ds) == Status.SUCCESS
    with node.archive.sessions() as session:
        row = session.scalars(select(Instance)).one()
        assert row.sop_instance_uid == ds.SOPInstanceUID
        assert row.transfer_syntax_uid == ExplicitVRLittleEndian
        path = node.archive.blobs._path(row.blob_key)
    sealed = path.read_bytes()
    # PHI must not be readable at rest: neither the patient's name nor any UID in plain text.
    assert str(ds.PatientName).encode() not in sealed
    assert ds.SOPInstanceUID.encode() not in sealed
    assert verify_archive(node.archive).ok


def test_restored_object_equals_received_bytes(node: RunningNode) -> None:
    ds = ct_dataset()
    assert store(node, ds) == Status.SUCCESS
    sent = BytesIO()
    dcmwrite(sent, ds, enforce_file_format=True)
    with node.archive.sessions() as session:
        row = session.scalars(select(Instance)).one()
        restored = node.archive.load_part10(row)
    original = dcmread(BytesIO(sent.getvalue()))
    back = dcmread(BytesIO(restored))
    assert back.PixelData == original.PixelData
    for elem in original:
        assert back[elem.tag].value == elem.value, elem.tag


def test_identical_duplicate_is_idempotent(node: RunningNode) -> None:
    ds = ct_dataset()
    assert store(node, ds) == Status.SUCCESS
    assert store(node, ds) == Status.SUCCESS
    assert count_instances(node) == 1
    # The second copy left no orphan blob behind.
    assert len(list(node.archive.blobs.keys())) == 1


def test_differing_duplicate_rejected_by_default(node: RunningNode) -> None:
    ds = ct_dataset()
    assert store(node, ds) == Status.SUCCESS
    changed = copy.deepcopy(ds)
    changed.SeriesDescription = "changed"
    assert store(node, changed) == Status.DUPLICATE_SOP_INSTANCE
    with node.archive.sessions() as session:
        row = session.scalars(select(Instance)).one()
        back = dcmread(BytesIO(node.archive.load_part10(row)))
    assert back.get("SeriesDescription") == ds.get("SeriesDescription")
    assert len(list(node.archive.blobs.keys())) == 1


@pytest.fixture
def replace_policy(node_settings: Settings) -> Settings:
    node_settings.storage.duplicate_policy = DuplicatePolicyValues.REPLACE
    return node_settings


def test_differing_duplicate_replaces_and_keeps_old(replace_policy: Settings, node) -> None:  # type: ignore[no-untyped-def]
    ds = ct_dataset()
    assert store(node, ds) == Status.SUCCESS
    changed = copy.deepcopy(ds)
    changed.SeriesDescription = "changed"
    assert store(node, changed) == Status.SUCCESS
    with node.archive.sessions() as session:
        row = session.scalars(select(Instance)).one()
        old = session.scalars(select(SupersededInstance)).one()
        back = dcmread(BytesIO(node.archive.load_part10(row)))
        assert old.blob_key != row.blob_key
        assert node.archive.blobs.exists(old.blob_key)
    assert back.SeriesDescription == "changed"


# -- bad input -------------------------------------------------------------------------


def raw_file(ds: Dataset, dataset_bytes: bytes, path: Path) -> Path:
    """A Part-10 file with a valid File Meta group and arbitrary data set bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    shell = Dataset()
    shell.file_meta = meta
    dcmwrite(buf, shell, enforce_file_format=True)
    path.write_bytes(buf.getvalue() + dataset_bytes)
    return path


def encoded(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    return data[dataset_offset_of(data) :]


def send_raw(node: RunningNode, path: Path) -> int | None:
    with sending_files_as_they_are(), association(node) as assoc:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status) if "Status" in rsp else None


def short_pixels(ds: Dataset) -> bytes:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return encoded(ds)


def without(keyword: str):  # type: ignore[no-untyped-def]
    def build(ds: Dataset) -> bytes:
        delattr(ds, keyword)
        return encoded(ds)

    return build


BAD_INPUTS = {
    "truncated": (lambda ds: encoded(ds)[:-1000], Status.CANNOT_UNDERSTAND),
    "truncated_header": (lambda ds: encoded(ds)[:1001], Status.CANNOT_UNDERSTAND),
    "garbage": (lambda ds: bytes(range(256)) * 40, Status.CANNOT_UNDERSTAND),
    "wrong_length": (
        lambda ds: encoded(ds)[:200] + struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 200) + b"X",
        Status.CANNOT_UNDERSTAND,
    ),
    "short_pixel_data": (short_pixels, Status.CANNOT_UNDERSTAND_PIXEL_DATA),
    "no_study_uid": (without("StudyInstanceUID"), Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE),
    "no_series_uid": (without("SeriesInstanceUID"), Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_failure_and_nothing_indexed(
    node: RunningNode, tmp_path: Path, case: str
) -> None:
    build, expected = BAD_INPUTS[case]
    ds = ct_dataset()
    status = send_raw(node, raw_file(ds, build(copy.deepcopy(ds)), tmp_path / "bad.dcm"))
    assert status == expected
    assert count_instances(node) == 0
    assert list(node.archive.blobs.keys()) == []
    # The node keeps serving.
    assert store(node, ct_dataset()) == Status.SUCCESS
    assert count_instances(node) == 1


def test_sop_class_mismatch(node: RunningNode, tmp_path: Path) -> None:
    ds = ct_dataset()
    body = encoded(ds)
    ds_as_mr = copy.deepcopy(ds)
    ds_as_mr.SOPClassUID = MRImageStorage  # request says MR, data set says CT
    assert send_raw(node, raw_file(ds_as_mr, body, tmp_path / "x.dcm")) == (
        Status.DATASET_SOP_CLASS_MISMATCH
    )
    assert count_instances(node) == 0


def test_association_dropped_mid_transfer(node: RunningNode) -> None:
    """A peer that vanishes inside a P-DATA stream leaves nothing behind."""
    ds = ct_dataset()
    with association(node, max_pdu=16384) as assoc:
        sock: socket.socket = assoc.dul.socket.socket  # type: ignore[union-attr]
        # Send the command and the first data fragments by hand, then cut the TCP connection.
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = ds.SOPClassUID
        req.AffectedSOPInstanceUID = ds.SOPInstanceUID
        req.Priority = 2
        req.DataSet = BytesIO(encoded(ds))
        msg = C_STORE_RQ()
        msg.primitive_to_message(req)
        cx_id = assoc.accepted_contexts[0].context_id
        pdus = list(msg.encode_msg(cx_id, 16384))
        for primitive in pdus[:3]:
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            sock.sendall(pdu.encode())
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        assoc.kill()
    assert count_instances(node) == 0
    assert store(node, ct_dataset()) == Status.SUCCESS
    assert count_instances(node) == 1
    spool = node.settings.storage.incoming_dir()
    assert len(list(spool.rglob("*.dcm"))) <= 1  # only what pynetdicom may still hold open


def test_no_phi_in_logs(
    node: RunningNode, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    caplog.set_level(logging.DEBUG)
    ds = ct_dataset(PatientName="Secret^Person", PatientID="PID-SECRET-42")
    ds.PatientBirthDate = "19010203"
    ds.PatientAge = "AGE-SECRET"  # invalid AS: pydicom's validation would quote it
    caplog.clear()  # what building the data set here printed is not the node's doing
    recwarn.clear()
    assert store(node, ds) == Status.SUCCESS
    assert store(node, ds) == Status.SUCCESS
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "Secret*"
    query.PatientID = "PID-SECRET-42"
    query.StudyInstanceUID = ""
    responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert any(identifier is not None for _, identifier in responses)
    text = caplog.text + "\n".join(str(w.message) for w in recwarn)
    for secret in ("Secret", "PID-SECRET-42", "19010203", "AGE-SECRET"):
        assert secret not in text
