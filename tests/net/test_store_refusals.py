"""C-STORE refusals of objects the node could not serve, through a real node and
pynetdicom's SCU: each gets its failure status, and nothing is indexed or kept."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless, MRImageStorage
from pynetdicom import AE

from medzip_scp.dicom.part10 import dataset_offset
from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode, sending_files_as_they_are
from tests.helpers.scu import count_instances, ct_dataset, store


def _send_file(node: RunningNode, path: Path) -> int:
    """Send a Part-10 file's data set bytes as they are, in its own transfer syntax."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    with sending_files_as_they_are():
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()


def _assert_nothing_kept(node: RunningNode) -> None:
    assert count_instances(node) == 0
    assert list(node.archive.blobs.keys()) == []
    assert store(node, ct_dataset()) == Status.SUCCESS  # and the node goes on serving


def test_j2k_frame_claiming_more_than_its_attributes_is_refused(
    node: RunningNode, shared_data: Path, tmp_path: Path
) -> None:
    """The object that took a node to 17 GB on a C-GET: a 64 x 64 MR whose J2K SIZ
    marker claims 640 x 8,389,088 pixels."""
    source = shared_data / "conformance" / "JPEG2000Lossless" / "MR_small_jp2klossless.dcm"
    data = bytearray(source.read_bytes())
    siz = data.index(b"\xff\x4f\xff\x51", dataset_offset(source))
    struct.pack_into(">II", data, siz + 8, 640, 8_389_088)  # Xsiz, Ysiz
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(bytes(data))
    ds = pydicom.dcmread(bomb, stop_before_pixels=True)
    assert (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) == (MRImageStorage, JPEG2000Lossless)
    assert _send_file(node, bomb) == Status.CANNOT_UNDERSTAND_PIXEL_DATA == 0xC002
    _assert_nothing_kept(node)


def test_unknown_vr_is_cannot_understand_not_out_of_resources(
    node: RunningNode, tmp_path: Path
) -> None:
    """A permanently malformed object: 0xC000, never 0xA700 (which tells the peer to
    retry, forever)."""
    path = tmp_path / "unknown_vr.dcm"
    ct_dataset().save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    name = data.index(struct.pack("<HH2s", 0x0010, 0x0010, b"PN"), dataset_offset(path))
    data[name + 4 : name + 6] = b"ZZ"
    path.write_bytes(bytes(data))
    assert _send_file(node, path) == Status.CANNOT_UNDERSTAND == 0xC000
    _assert_nothing_kept(node)


def test_wildcard_in_series_uid_is_refused(node: RunningNode) -> None:
    """A SeriesInstanceUID with '?' would be a wildcard in every C-FIND and C-GET for it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid UID
        ds = ct_dataset(SeriesInstanceUID="1.2.826.0.1.3680043.2.1125.1?")
    assert store(node, ds) == Status.CANNOT_UNDERSTAND_INVALID_UID == 0xC004
    _assert_nothing_kept(node)


def test_nul_inside_an_indexed_value_is_refused(node: RunningNode) -> None:
    """PostgreSQL stores no NUL in text: the commit failed, and the peer was told 0xA700
    (out of resources, retry) for an object that could never be stored."""
    assert store(node, ct_dataset(PatientID="AB\0CD")) == Status.CANNOT_UNDERSTAND
    _assert_nothing_kept(node)
