"""Storing to, finding in and moving from a node with pynetdicom's SCU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
from sqlalchemy import func, select

from medzip_scp.index.models import Instance
from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode

CT_SMALL = get_testdata_file("CT_small.dcm")


@contextmanager
def association(node: RunningNode, calling: str = "TESTSCU", **kw: object) -> Iterator[Association]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, **kw)
    assert assoc.is_established, "association with the node was not established"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def ct_dataset(**changes: object) -> Dataset:
    ds = dcmread(CT_SMALL)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


def store(node: RunningNode, ds: Dataset) -> int:
    with association(node) as assoc:
        return int(assoc.send_c_store(ds).Status)


def count_instances(node: RunningNode) -> int:
    with node.archive.sessions() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def store_study(node: RunningNode, n: int = 3) -> tuple[str, list[Dataset]]:
    """``n`` CT slices of one new study and series, stored; the study's UID and the slices."""
    study_uid = generate_uid()
    series_uid = generate_uid()
    sent = []
    for i in range(n):
        ds = ct_dataset(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
        ds.InstanceNumber = i + 1
        assert store(node, ds) == Status.SUCCESS
        sent.append(ds)
    return study_uid, sent


def qr_identifier(level: str, **keys: str) -> Dataset:
    """A query/retrieve identifier of ``level`` with ``keys`` (keyword: value)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def move_study(node: RunningNode, study_uid: str, destination: str) -> list[Dataset]:
    """A study-root C-MOVE of a study to ``destination``; the response statuses."""
    ae = AE(ae_title="MOVESCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    responses = [
        status
        for status, _ in assoc.send_c_move(
            qr_identifier("STUDY", StudyInstanceUID=study_uid),
            destination,
            StudyRootQueryRetrieveInformationModelMove,
        )
    ]
    assoc.release()
    return responses
