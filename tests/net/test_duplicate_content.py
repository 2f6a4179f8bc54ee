"""Duplicates judged by content: the same instance sent as is and re-encoded by a forwarding
peer (padding dropped, implicit VR, group lengths, undefined lengths) is one instance; only a
real difference goes through the duplicate policy. Raw files sent by pynetdicom's SCU."""

from __future__ import annotations

import logging
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from medzip_scp.archive import StoreResult
from medzip_scp.config import DuplicatePolicyValues, Settings
from medzip_scp.dicom.part10 import dataset_offset_of, read_received
from medzip_scp.index.models import Instance, SupersededInstance
from medzip_scp.net.status import Status
from tests.dicom.forwarding import TRAILING_PADDING, forwarded
from tests.helpers.node import RunningNode, sending_files_as_they_are
from tests.helpers.scu import count_instances, ct_dataset


def send_files(node: RunningNode, *paths: Path) -> list[int]:
    """C-STORE each file's bytes as they are, on one association."""
    ae = AE(ae_title="FORWARDER")
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae.add_requested_context(CTImageStorage, syntax)
    with sending_files_as_they_are():
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(path).Status) for path in paths]
        finally:
            assoc.release()


def instance() -> Dataset:
    """A CT instance with an all-space value and Data Set Trailing Padding."""
    ds = ct_dataset(StudyID="    ")
    ds.add_new(TRAILING_PADDING, "OB", b"\0" * 16)
    return ds


def written(path: Path, ds: Dataset, reencoded: bool = False) -> Path:
    """The instance as a file, as is or as a forwarding peer re-encodes it."""
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)
    path.write_bytes(forwarded(out.getvalue()) if reencoded else out.getvalue())
    return path


def superseded_count(node: RunningNode) -> int:
    with node.archive.sessions() as session:
        return int(session.scalar(select(func.count(SupersededInstance.id))) or 0)


def data_set(part10: bytes) -> bytes:
    return part10[dataset_offset_of(part10) :]


def archived_bytes(node: RunningNode) -> bytes:
    """The data set of the archived copy (the node writes its own File Meta)."""
    with node.archive.sessions() as session:
        return data_set(node.archive.load_part10(session.scalars(select(Instance)).one()))


@pytest.mark.parametrize("order", ["direct first", "forwarded first"])
def test_a_reencoded_copy_is_the_same_instance(
    node: RunningNode, tmp_path: Path, order: str
) -> None:
    ds = instance()
    direct = written(tmp_path / "direct.dcm", ds)
    reencoded = written(tmp_path / "forwarded.dcm", ds, reencoded=True)
    assert direct.read_bytes() != reencoded.read_bytes()
    first, second = (direct, reencoded) if order == "direct first" else (reencoded, direct)
    assert send_files(node, first, second) == [Status.SUCCESS, Status.SUCCESS]
    assert count_instances(node) == 1
    assert len(list(node.archive.blobs.keys())) == 1  # the second copy was not kept
    assert archived_bytes(node) == data_set(first.read_bytes())


def with_a_real_difference(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An instance as is, re-encoded, and re-encoded with another Series Description."""
    ds = instance()
    direct = written(tmp_path / "direct.dcm", ds)
    same = written(tmp_path / "same.dcm", ds, reencoded=True)
    ds.SeriesDescription = "ZZCHANGED"
    return direct, same, written(tmp_path / "changed.dcm", ds, reencoded=True)


def test_a_real_difference_is_rejected_and_named_by_tag(
    node: RunningNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    direct, same, changed = with_a_real_difference(tmp_path)
    assert send_files(node, direct, same) == [Status.SUCCESS, Status.SUCCESS]
    assert send_files(node, changed) == [Status.DUPLICATE_SOP_INSTANCE]
    assert count_instances(node) == 1
    assert len(list(node.archive.blobs.keys())) == 1
    assert archived_bytes(node) == data_set(direct.read_bytes())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "rejected" in warnings[0] and "(0008,103E)" in warnings[0]
    assert "ZZCHANGED" not in caplog.text


@pytest.fixture
def replace_policy(node_settings: Settings) -> Settings:
    node_settings.storage.duplicate_policy = DuplicatePolicyValues.REPLACE
    return node_settings


def test_with_policy_replace_only_a_real_difference_supersedes(
    replace_policy: Settings, node: RunningNode, tmp_path: Path
) -> None:
    direct, same, changed = with_a_real_difference(tmp_path)
    assert send_files(node, direct, same) == [Status.SUCCESS, Status.SUCCESS]
    assert superseded_count(node) == 0  # a re-encoded copy is no new version
    assert archived_bytes(node) == data_set(direct.read_bytes())
    assert send_files(node, changed) == [Status.SUCCESS]
    assert superseded_count(node) == 1
    assert archived_bytes(node) == data_set(changed.read_bytes())
    assert count_instances(node) == 1


def test_an_archived_copy_replaced_while_compared_is_compared_again(
    replace_policy: Settings,
    node: RunningNode,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The comparison runs outside the transaction: when another copy replaced the archived
    one meanwhile, the transaction does not decide by the stale comparison."""
    direct, same, changed = with_a_real_difference(tmp_path)
    archive = node.archive
    assert archive.store(read_received(direct), "DIRECT").result is StoreResult.STORED
    compare = archive._compare_with_archived
    calls = []

    def compare_then_replace(*args: object) -> None:
        compare(*args)  # type: ignore[arg-type]
        calls.append(args)
        if len(calls) == 1:  # another association replaces the copy just compared
            replaced = archive.store(read_received(changed), "OTHER")
            assert replaced.result is StoreResult.REPLACED

    monkeypatch.setattr(archive, "_compare_with_archived", compare_then_replace)
    outcome = archive.store(read_received(same), "FORWARDER")
    assert outcome.result is StoreResult.REPLACED  # not the same content as the newest copy
    assert outcome.first_difference == "(0008,103E)"
    assert len(calls) == 3  # same vs direct, changed vs direct, same vs changed
    assert superseded_count(node) == 2
    assert archived_bytes(node) == data_set(same.read_bytes())
