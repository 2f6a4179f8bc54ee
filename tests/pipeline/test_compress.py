"""Background compression: a codec blob replaces an original only after a bit-exact decode."""

from __future__ import annotations

import datetime as dt
import threading
import time
from io import BytesIO

import pytest
from pydicom import dcmread
from sqlalchemy import select

from medzip_scp import archive as archive_module
from medzip_scp.codec.api import DatasetReference
from medzip_scp.config import DuplicatePolicyValues
from medzip_scp.index.ingest import replace_instance
from medzip_scp.index.models import Instance, InstanceState, SupersededInstance
from medzip_scp.instance_codecs import IdentityCodec, Part10Codec, identity_policy
from medzip_scp.net.status import Status
from medzip_scp.pipeline import compress as compress_module
from medzip_scp.pipeline.compress import (
    CompressionSummary,
    compress_instance,
    compress_pending,
    parse_shard,
    pending_ids,
)
from medzip_scp.pipeline.verify import verify_archive
from tests.helpers.node import RunningNode
from tests.helpers.scu import ct_dataset, store

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _rows(node: RunningNode) -> list[Instance]:
    with node.archive.sessions() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def test_compress_replaces_originals_and_retrieval_is_identical(node: RunningNode) -> None:
    sent = [ct_dataset() for _ in range(3)]
    for ds in sent:
        assert store(node, ds) == Status.SUCCESS
    before = {row.sop_instance_uid: node.archive.load_part10(row) for row in _rows(node)}
    old_keys = {row.blob_key for row in _rows(node)}

    summary = compress_pending(node.archive, node.archive.compressing_codec())
    assert (summary.compressed, summary.failed) == (3, 0)

    rows = _rows(node)
    assert {row.codec_id for row in rows} == {IdentityCodec.codec_id}
    assert {row.state for row in rows} == {InstanceState.COMPRESSED}
    for row in rows:
        assert node.archive.load_part10(row) == before[row.sop_instance_uid]
        assert row.stored_size < len(before[row.sop_instance_uid])
        # The payload says when the instance arrived (its row's time), not when compressed.
        blob = node.archive.blobs.read(row.blob_key, bound_to=row.sop_instance_uid)
        record = node.archive.identity_codec.open(bytes(blob), row.sop_instance_uid).record
        assert record.archived_at_us == (row.received_at - EPOCH) // dt.timedelta(microseconds=1)
    # The originals are gone from the store; only the verified blobs remain.
    assert set(node.archive.blobs.keys()) == {row.blob_key for row in rows}
    assert not old_keys & set(node.archive.blobs.keys())
    assert verify_archive(node.archive).ok
    # A second pass finds nothing to do.
    assert compress_pending(node.archive, node.archive.compressing_codec()).compressed == 0


class _LossyCodec:
    """A codec that silently changes one byte: the worker must refuse its blobs."""

    codec_id = "lossy-test"

    def encode(self, part10: bytes, verify: bool = True) -> bytes:
        return part10[:-1] + bytes([part10[-1] ^ 1])

    def decode(self, blob: bytes) -> bytes:
        return blob


def test_codec_that_does_not_round_trip_keeps_the_original(node: RunningNode) -> None:
    assert store(node, ct_dataset()) == Status.SUCCESS
    (row,) = _rows(node)
    original = node.archive.load_part10(row)
    summary = compress_pending(node.archive, _LossyCodec())
    assert (summary.compressed, summary.failed) == (0, 1)
    (after,) = _rows(node)
    assert after.codec_id == Part10Codec.codec_id
    assert after.blob_key == row.blob_key
    assert after.state == InstanceState.COMPRESS_FAILED
    assert node.archive.load_part10(after) == original
    assert list(node.archive.blobs.keys()) == [row.blob_key]
    # Not retried forever.
    assert compress_pending(node.archive, node.archive.compressing_codec()).compressed == 0


def test_row_changed_meanwhile_discards_the_new_blob(node: RunningNode) -> None:
    assert store(node, ct_dataset()) == Status.SUCCESS
    (row,) = _rows(node)
    data = node.archive.load_part10(row)

    class _RacingCodec(IdentityCodec):
        def encode(
            self,
            part10: bytes,
            verify: bool = True,
            received_at: dt.datetime | None = None,
            reference: DatasetReference | None = None,
        ) -> bytes:
            # A differing duplicate replaces the row while the worker compresses.
            moved = node.archive.blobs.put_bytes(data, row.sop_instance_uid)
            with node.archive.sessions() as session:
                current = session.get(Instance, row.id)
                assert current is not None
                current.blob_key = moved.key
                session.commit()
            return super().encode(part10, verify, received_at, reference)

    summary = CompressionSummary()
    racing = _RacingCodec(node.archive.identity, identity_policy(node.settings))
    compress_instance(node.archive, racing, row.id, summary)
    assert summary.skipped == 1 and summary.compressed == 0
    (after,) = _rows(node)
    assert after.codec_id == Part10Codec.codec_id
    keys = set(node.archive.blobs.keys())
    assert after.blob_key in keys
    assert len(keys) == 2  # the original and the racing writer's; the worker's blob is gone
    assert dcmread(BytesIO(node.archive.load_part10(after))).SOPInstanceUID == row.sop_instance_uid


def test_shards_split_the_backlog_without_overlap(node: RunningNode) -> None:
    for _ in range(5):
        assert store(node, ct_dataset()) == Status.SUCCESS
    shards = [(0, 2), (1, 2)]
    parts = [set(pending_ids(node.archive, 100, shard)) for shard in shards]
    assert not parts[0] & parts[1]
    assert parts[0] | parts[1] == {row.id for row in _rows(node)}
    summaries = [
        compress_pending(node.archive, node.archive.compressing_codec(), shard=shard)
        for shard in shards
    ]
    assert [s.compressed for s in summaries] == [len(part) for part in parts]
    assert all(s.skipped == 0 and s.failed == 0 for s in summaries)
    assert {row.codec_id for row in _rows(node)} == {IdentityCodec.codec_id}


def test_shard_text() -> None:
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="K/N"):
            parse_shard(bad)


def test_a_replace_and_a_compression_of_the_same_instance_keep_every_version(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A differing copy replaces an instance while compression swaps the same row: the
    superseded version must keep a blob that exists (without a row lock, PostgreSQL let
    the swap commit and delete the blob the superseded row then named)."""
    node.settings.storage.duplicate_policy = DuplicatePolicyValues.REPLACE
    first = ct_dataset()
    assert store(node, first) == Status.SUCCESS
    (row,) = _rows(node)
    swaps: list[threading.Thread] = []

    def replace_while_compressing(*args: object, **kwargs: object) -> None:
        swap = threading.Thread(
            target=compress_instance,
            args=(node.archive, node.archive.compressing_codec(), row.id, CompressionSummary()),
        )
        swap.start()
        swaps.append(swap)
        time.sleep(1.0)  # the swap commits meanwhile, unless it waits for this transaction
        replace_instance(*args, **kwargs)

    monkeypatch.setattr(archive_module, "replace_instance", replace_while_compressing)
    second = ct_dataset(SOPInstanceUID=first.SOPInstanceUID, SeriesDescription="changed")
    assert store(node, second) == Status.SUCCESS
    swaps[0].join(60)
    with node.archive.sessions() as session:
        superseded = session.scalars(select(SupersededInstance)).all()
        keys = [version.blob_key for version in superseded]
    assert len(keys) == 1 and node.archive.blobs.exists(keys[0])
    assert verify_archive(node.archive).ok


def test_ctrl_c_ends_a_pass_after_the_instance_at_hand_with_its_summary(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``medzip worker --once`` interrupted: what was done is summed up, the rest keeps its
    original for the next pass."""
    for _ in range(3):
        assert store(node, ct_dataset()) == Status.SUCCESS
    real = compress_module.compress_instance
    calls = []

    def interrupted_on_the_second(*args: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(compress_module, "compress_instance", interrupted_on_the_second)
    archive = node.archive
    summary = compress_pending(archive, archive.compressing_codec())
    assert summary.interrupted and summary.compressed == 1
    assert "| 1 | 0 | 0 |" in summary.table() and "interrupted" in summary.table()
    monkeypatch.setattr(compress_module, "compress_instance", real)
    assert compress_pending(archive, archive.compressing_codec()).compressed == 2


def test_a_series_is_compressed_once_it_is_quiet(node: RunningNode) -> None:
    """``[pipeline] series_quiet_seconds``: a series still receiving instances waits, one
    that has gone quiet is compressed, all of it."""
    archive = node.archive
    early = [ct_dataset(SeriesInstanceUID="1.2.826.0.1.3680043.8.498.71") for _ in range(2)]
    for ds in early:
        assert store(node, ds) == Status.SUCCESS
    archive.settings.pipeline.series_quiet_seconds = 1.0
    time.sleep(1.2)
    busy = ct_dataset(SeriesInstanceUID="1.2.826.0.1.3680043.8.498.72")
    assert store(node, busy) == Status.SUCCESS
    summary = compress_pending(archive, archive.compressing_codec())
    assert summary.compressed == 2  # the quiet series, whole; the busy one waits
    time.sleep(1.2)
    assert compress_pending(archive, archive.compressing_codec()).compressed == 1
