"""Series data set references: a series' blobs code their headers against one instance's,
kept once in the blob store (refs/); every blob still decodes bit-exact, whatever happens to
the series after it was coded."""

from __future__ import annotations

import multiprocessing
import os
import threading
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as StudyRootGet
from sqlalchemy import select

from medzip_scp.archive import Archive
from medzip_scp.codec.api import DatasetReference, describe
from medzip_scp.config import DuplicatePolicyValues, Settings
from medzip_scp.dicom.blob import open_blob
from medzip_scp.dicom.part10 import dataset_offset_of
from medzip_scp.identity.instance import Verdict
from medzip_scp.index.models import Instance, SeriesReference, SupersededInstance
from medzip_scp.instance_codecs import IdentityCodec
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from medzip_scp.pipeline.verify import verify_archive
from medzip_scp.storage.envelope import BlobKey, EnvelopeError
from medzip_scp.storage.local import LocalBlobStore
from medzip_scp.storage.references import ReferenceStore
from tests.helpers.node import RunningNode
from tests.helpers.scu import ct_dataset, store
from tests.identity.node_traffic import get_data_sets

_STUDIES: dict[str, str] = {}


def _series(
    numbers: list[int], series_uid: str | None = None, study_uid: str | None = None
) -> list[Dataset]:
    """CT slices of one series (of a study of its own unless ``study_uid``), with these
    instance numbers (in this order of arrival)."""
    uid = series_uid or generate_uid()
    study = study_uid or _STUDIES.setdefault(uid, generate_uid())
    return [
        ct_dataset(
            StudyInstanceUID=study,
            SeriesInstanceUID=uid,
            InstanceNumber=n,
            SliceLocation=f"{n * 1.25:.2f}",
        )
        for n in numbers
    ]


def _rows(node: RunningNode, table: type = Instance) -> list:
    with node.archive.sessions() as session:
        rows = list(session.scalars(select(table).order_by(table.id)))
        session.expunge_all()
    return rows


def _reference_sha(node: RunningNode, row: Instance | SupersededInstance) -> str | None:
    blob = node.archive.blobs.read(row.blob_key, bound_to=row.sop_instance_uid)
    return describe(bytes(blob))["dataset_reference"]


def _retrieved(archive: Archive) -> dict[str, bytes]:
    with archive.read_sessions() as session:
        rows = list(session.scalars(select(Instance)))
        session.expunge_all()
    return {row.sop_instance_uid: archive.load_part10(row) for row in rows}


def _compress_all(archive: Archive) -> None:
    summary = compress_pending(archive, archive.compressing_codec())
    assert summary.failures == []


def _reference_files(node: RunningNode) -> list[Path]:
    folder = node.archive.blobs.references.folder
    return (
        sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []
    )


def test_a_series_arriving_out_of_order_shares_one_reference(node: RunningNode) -> None:
    sent = _series([3, 1, 4, 2])
    for ds in sent:
        assert store(node, ds) == Status.SUCCESS
    before = _retrieved(node.archive)
    _compress_all(node.archive)

    rows = _rows(node)
    shas = {_reference_sha(node, row) for row in rows}
    assert len(shas) == 1 and None not in shas
    [reference] = _rows(node, SeriesReference)
    assert reference.series_instance_uid == sent[0].SeriesInstanceUID
    assert {reference.sha256} == shas
    assert len(_reference_files(node)) == 1
    assert _retrieved(node.archive) == before
    assert verify_archive(node.archive).ok


def test_the_reference_takes_the_header_out_of_each_blob(node: RunningNode) -> None:
    """What a reference saves: each blob's DATASET section holds the differences only."""
    for ds in _series([1, 2, 3]):
        assert store(node, ds) == Status.SUCCESS
    [row] = _rows(node)[:1]
    original = node.archive.load_part10(row)
    codec = node.archive.compressing_codec()
    alone = describe(codec.encode(original))
    _compress_all(node.archive)
    [row] = _rows(node)[:1]
    blob = node.archive.blobs.read(row.blob_key, bound_to=row.sop_instance_uid)
    coded = describe(bytes(blob))
    assert coded["dataset_raw_bytes"] == alone["dataset_raw_bytes"]
    # CT_small's header: about 1 KB zstd-coded alone, tens of bytes against its series
    assert coded["dataset_bytes"] < alone["dataset_bytes"] / 4
    assert coded["pixel_bytes"] == alone["pixel_bytes"]


def test_small_series_of_a_study_share_its_reference_large_ones_get_their_own(
    node: RunningNode,
) -> None:
    study = generate_uid()
    small = [_series([1, 2], study_uid=study) for _ in range(3)]  # like MR-EPI's 2-volume runs
    large = _series(list(range(1, Archive.OWN_REFERENCE_MIN_INSTANCES + 1)), study_uid=study)
    for ds in [*(ds for s in small for ds in s), *large]:
        assert store(node, ds) == Status.SUCCESS
    before = _retrieved(node.archive)
    _compress_all(node.archive)
    by_series: dict[str, set[str | None]] = {}
    for row in _rows(node):
        uid = next(ds.SeriesInstanceUID for s in [*small, large] for ds in s
                   if ds.SOPInstanceUID == row.sop_instance_uid)  # fmt: skip
        by_series.setdefault(uid, set()).add(_reference_sha(node, row))
    shared = by_series[small[0][0].SeriesInstanceUID]
    assert len(shared) == 1 and None not in shared
    assert all(by_series[s[0].SeriesInstanceUID] == shared for s in small)
    own = by_series[large[0].SeriesInstanceUID]
    assert len(own) == 1 and own != shared
    assert len(_reference_files(node)) == 2  # the study's (the first series') and the large's
    assert _retrieved(node.archive) == before
    # a one-instance series of another study, alone, gets none
    assert store(node, _series([1])[0]) == Status.SUCCESS
    _compress_all(node.archive)
    assert _reference_sha(node, _rows(node)[-1]) is None


def test_a_series_grown_after_it_was_coded_keeps_its_reference(node: RunningNode) -> None:
    series_uid = generate_uid()
    for ds in _series([1, 2], series_uid):
        assert store(node, ds) == Status.SUCCESS
    _compress_all(node.archive)
    [first] = {_reference_sha(node, row) for row in _rows(node)}
    for ds in _series([5, 3, 4], series_uid):
        assert store(node, ds) == Status.SUCCESS
    before = _retrieved(node.archive)
    _compress_all(node.archive)
    assert {_reference_sha(node, row) for row in _rows(node)} == {first}
    assert len(_reference_files(node)) == 1
    assert _retrieved(node.archive) == before


def test_two_processes_making_a_series_reference_at_once_keep_one(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two node processes compress the first instances of a series at the same time: both
    make a reference, one records it, the other codes against that one and drops its own."""
    for ds in _series([1, 2, 3, 4]):
        assert store(node, ds) == Status.SUCCESS
    rows = _rows(node)
    both_made = threading.Barrier(2, timeout=30)
    make = node.archive.identity_codec.series_reference

    def made_at_once(part10: bytes) -> DatasetReference:
        reference = make(part10)
        both_made.wait()
        return reference

    monkeypatch.setattr(node.archive.identity_codec, "series_reference", made_at_once)
    made: list[DatasetReference | None] = [None, None]

    def one(k: int) -> None:
        made[k] = node.archive.series_reference(rows[k], node.archive.load_part10(rows[k]))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert made[0] is not None and made[1] is not None
    assert made[0].sha256 == made[1].sha256  # both code against the recorded one
    [recorded] = _rows(node, SeriesReference)
    assert recorded.sha256 == made[0].sha256.hex()
    assert len(_reference_files(node)) == 1


def test_a_series_with_huge_headers_gets_no_reference(node: RunningNode) -> None:
    """A header above MAX_REFERENCE_BYTES (a private blob): coded without a reference."""
    sent = _series([1, 2])
    for ds in sent:
        ds.add_new(0x00291010, "OB", bytes(range(256)) * (Archive.MAX_REFERENCE_BYTES // 200))
        assert store(node, ds) == Status.SUCCESS
    before = _retrieved(node.archive)
    _compress_all(node.archive)
    assert {_reference_sha(node, row) for row in _rows(node)} == {None}
    assert _reference_files(node) == [] and _rows(node, SeriesReference) == []
    assert _retrieved(node.archive) == before


def test_a_one_instance_series_is_coded_without_a_reference(node: RunningNode) -> None:
    assert store(node, ct_dataset(SeriesInstanceUID=generate_uid())) == Status.SUCCESS
    _compress_all(node.archive)
    [row] = _rows(node)
    assert row.codec_id == IdentityCodec.codec_id
    assert _reference_sha(node, row) is None
    assert _reference_files(node) == [] and _rows(node, SeriesReference) == []


def test_the_reference_instance_replaced_by_a_differing_duplicate(node: RunningNode) -> None:
    """The reference is the first coded instance's header; that instance is then replaced
    by a differing copy: the others, the new version and the superseded one all decode."""
    node.settings.storage.duplicate_policy = DuplicatePolicyValues.REPLACE
    sent = _series([1, 2, 3])
    for ds in sent:
        assert store(node, ds) == Status.SUCCESS
    _compress_all(node.archive)
    [sha] = {_reference_sha(node, row) for row in _rows(node)}
    replacement = ct_dataset(
        SOPInstanceUID=sent[0].SOPInstanceUID,
        SeriesInstanceUID=sent[0].SeriesInstanceUID,
        InstanceNumber=1,
        SeriesDescription="corrected",
        ImageComments="re-sent after a correction",
    )
    assert store(node, replacement) == Status.SUCCESS
    before = _retrieved(node.archive)
    _compress_all(node.archive)
    assert {_reference_sha(node, row) for row in _rows(node)} == {sha}
    assert _retrieved(node.archive) == before
    returned = dcmread(BytesIO(before[replacement.SOPInstanceUID]))
    assert returned.ImageComments == "re-sent after a correction"
    [old] = _rows(node, SupersededInstance)
    assert _reference_sha(node, old) == sha
    plaintext = node.archive.blobs.read(old.blob_key, bound_to=old.sop_instance_uid)
    opened = node.archive.identity_codec.open(bytes(plaintext), old.sop_instance_uid).part10
    assert dcmread(BytesIO(opened)).get("ImageComments") != "re-sent after a correction"
    assert verify_archive(node.archive).ok


def test_a_c_get_of_one_instance_in_the_middle_of_a_series(node: RunningNode) -> None:
    sent = _series([1, 2, 3, 4, 5])
    for ds in sent:
        assert store(node, ds) == Status.SUCCESS
    expected = _retrieved(node.archive)[sent[2].SOPInstanceUID]
    _compress_all(node.archive)
    # a node process that has not read the reference yet: one read of refs/ decodes it
    node.archive.blobs.references = ReferenceStore(
        node.archive.blobs.references.folder, node.archive.blobs._key
    )
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = sent[2].StudyInstanceUID
    query.SeriesInstanceUID = sent[2].SeriesInstanceUID
    query.SOPInstanceUID = sent[2].SOPInstanceUID
    contexts = {(str(sent[2].SOPClassUID), str(sent[2].file_meta.TransferSyntaxUID))}
    final, _, arrived = get_data_sets(node, query, contexts, StudyRootGet)
    assert final.Status == Status.SUCCESS
    assert arrived == {sent[2].SOPInstanceUID: expected[dataset_offset_of(expected) :]}


def test_a_reference_gone_from_the_store_is_reported_never_served(node: RunningNode) -> None:
    sent = _series([1, 2])
    for ds in sent:
        assert store(node, ds) == Status.SUCCESS
    _compress_all(node.archive)
    [path] = _reference_files(node)
    path.unlink()
    archive = Archive.open(node.settings)  # another process: nothing cached
    report = verify_archive(archive)
    assert report.counts()[Verdict.UNREADABLE] == 2
    assert all("needs data set reference" in reason for _, reason in report.problems)
    # New instances of the series are coded without it (and say so), never against nothing.
    assert store(node, _series([3], sent[0].SeriesInstanceUID)[0]) == Status.SUCCESS
    _compress_all(archive)
    newest = _rows(node)[-1]
    assert newest.codec_id == IdentityCodec.codec_id and _reference_sha(node, newest) is None
    assert dcmread(BytesIO(archive.load_part10(newest))).InstanceNumber == 3


def test_a_reference_that_does_not_open_fails_no_compression(node: RunningNode) -> None:
    """A damaged reference: the series' new instances are still compressed (without it)."""
    series_uid = generate_uid()
    for ds in _series([1, 2], series_uid):
        assert store(node, ds) == Status.SUCCESS
    _compress_all(node.archive)
    [path] = _reference_files(node)
    damaged = bytearray(path.read_bytes())
    damaged[-20] ^= 1
    path.write_bytes(bytes(damaged))
    archive = Archive.open(node.settings)  # nothing cached
    assert store(node, _series([3], series_uid)[0]) == Status.SUCCESS
    _compress_all(archive)  # asserts no failures
    newest = _rows(node)[-1]
    assert newest.codec_id == IdentityCodec.codec_id and _reference_sha(node, newest) is None


def test_a_tampered_reference_does_not_open(tmp_path: Path) -> None:
    key = BlobKey.create(tmp_path / "key")
    references = ReferenceStore(tmp_path / "refs", key)
    sha = references.put(b"header bytes of a series" * 100)
    assert references.put(b"header bytes of a series" * 100) == sha  # written once
    [path] = list((tmp_path / "refs").iterdir())
    assert path.name != sha.hex() and len(path.name) == 32  # the name reveals nothing
    other = ReferenceStore(tmp_path / "refs", BlobKey.create(tmp_path / "other-key"))
    assert other.get(sha) is None  # another key names it otherwise
    fresh = ReferenceStore(tmp_path / "refs", key)
    assert fresh.get(sha) == b"header bytes of a series" * 100
    damaged = bytearray(path.read_bytes())
    damaged[-20] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(EnvelopeError):
        ReferenceStore(tmp_path / "refs", key).get(sha)


# -- a crash (kill -9) at each step of coding a series -------------------------------------


def _die(*args: object, **kwargs: object) -> None:
    os._exit(9)  # like kill -9: no cleanup, no commit, no rollback


def _compress_and_crash(settings: Settings, step: str) -> None:
    """In a process of its own: compress, dying at ``step``."""
    archive = Archive.open(settings)
    if step == "reference kept, not recorded":
        real_put = ReferenceStore.put

        def put_then_die(self: ReferenceStore, data: bytes) -> bytes:
            real_put(self, data)
            os._exit(9)

        ReferenceStore.put = put_then_die  # type: ignore[method-assign]
    elif step == "reference recorded, blob not written":
        LocalBlobStore.put = _die  # type: ignore[method-assign]
    elif step == "swap committed, original not deleted":
        LocalBlobStore.delete = _die  # type: ignore[method-assign]
    compress_pending(archive, archive.compressing_codec())
    raise AssertionError(f"compression did not reach {step!r}")


@pytest.mark.slow  # three processes that import the node (about 3 s each)
def test_a_crash_at_each_step_of_coding_a_series_loses_nothing(node: RunningNode) -> None:
    context = multiprocessing.get_context("spawn")
    for step in (
        "reference kept, not recorded",
        "reference recorded, blob not written",
        "swap committed, original not deleted",
    ):
        for ds in _series([1, 2, 3]):
            assert store(node, ds) == Status.SUCCESS
        before = _retrieved(node.archive)
        child = context.Process(target=_compress_and_crash, args=(node.settings, step))
        child.start()
        child.join(120)
        assert child.exitcode == 9, step
        assert _retrieved(node.archive) == before, step  # nothing served differs
        _compress_all(node.archive)  # the next pass finishes the job
        assert {row.codec_id for row in _rows(node)} == {IdentityCodec.codec_id}, step
        assert _retrieved(node.archive) == before, step
        assert verify_archive(node.archive).ok, step
    # every series has one reference row and every blob names a reference that opens
    assert len(_rows(node, SeriesReference)) == 3
    for row in _rows(node):
        sha = _reference_sha(node, row)
        assert sha is not None and node.archive.blobs.references.get(bytes.fromhex(sha))
    plaintexts = [
        bytes(node.archive.blobs.read(row.blob_key, bound_to=row.sop_instance_uid))
        for row in _rows(node)
    ]
    assert all(open_blob(p, node.archive.blobs.references.get) for p in plaintexts)
