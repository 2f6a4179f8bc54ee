"""Retrieval in the syntax an object was received in returns its data set byte for byte:
group lengths kept, UN elements not re-encoded with their dictionary VR, values unchanged.
(Re-encoding is only for a peer that does not take the original syntax.)"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from medzip_scp.dicom.part10 import dataset_offset_of
from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode
from tests.helpers.scu import CT_SMALL, qr_identifier

UN_FILE = "conformance/JPEG2000Lossless/explicit_VR-UN.dcm"


def _with_group_lengths(path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    """CT_small with group length elements (values deliberately not recomputed) and a
    private element in UN: what pydicom would drop or re-encode on the way out."""
    ds = dcmread(CT_SMALL)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for group in (0x0008, 0x0010, 0x0020, 0x0028):
        ds.add(DataElement((group, 0x0000), "UL", 1234))
    ds.add(DataElement((0x0029, 0x0010), "LO", "MEDZIP TEST"))
    ds.add(DataElement((0x0029, 0x1001), "UN", b"\x01\x02\x03\x04"))
    ds.save_as(path, enforce_file_format=True)
    return path


def _send_file(node: RunningNode, path: Path) -> None:
    """C-STORE the file's data set as its bytes are (pynetdicom sends it from the file)."""
    ds = dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    assert assoc.send_c_store(path).Status == Status.SUCCESS
    assoc.release()


def _get_raw(node: RunningNode, path: Path, syntax: str) -> bytes:
    """C-GET the object back in ``syntax``; returns the file pynetdicom wrote of it."""
    ds = dcmread(path, stop_before_pixels=True)
    arrived: list[bytes] = []

    def on_store(event: evt.Event) -> int:
        # the data set as it arrived, behind File Meta (the node set STORE_RECV_CHUNKED_DATASET)
        arrived.append(Path(event.dataset_path).read_bytes())
        return Status.SUCCESS

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(ds.SOPClassUID, [syntax])
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        ext_neg=[build_role(ds.SOPClassUID, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = qr_identifier("STUDY", StudyInstanceUID=ds.StudyInstanceUID)
    responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    assert responses[-1][0].Status == Status.SUCCESS
    assert len(arrived) == 1
    return arrived[0]


@pytest.mark.parametrize(
    "source", ["group lengths, explicit VR", "group lengths, implicit VR", "UN elements (J2K)"]
)
def test_retrieval_in_the_original_syntax_is_byte_exact(
    node: RunningNode, shared_data: Path, tmp_path: Path, source: str
) -> None:
    if source.startswith("group lengths"):
        implicit = source.endswith("implicit VR")
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        path = _with_group_lengths(tmp_path / "gl.dcm", syntax)
    else:
        path = shared_data / UN_FILE
    original = path.read_bytes()
    _send_file(node, path)
    syntax = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    back = _get_raw(node, path, syntax)
    assert back[dataset_offset_of(back) :] == original[dataset_offset_of(original) :]


def test_another_syntax_is_still_converted(node: RunningNode, tmp_path: Path) -> None:
    path = _with_group_lengths(tmp_path / "gl.dcm", ExplicitVRLittleEndian)
    _send_file(node, path)
    received = dcmread(BytesIO(_get_raw(node, path, ImplicitVRLittleEndian)))
    sent = dcmread(path)
    assert received.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert received.SOPInstanceUID == sent.SOPInstanceUID
    assert received.PixelData == sent.PixelData
