"""Background compression: replace acknowledged originals with codec blobs, verified first.

C-STORE acknowledges the original as received (fast, durable). This worker then, per instance:
1. reads the original and encodes it with the archive's compressing codec, its non-pixel
   data against its series' data set reference (:meth:`Archive.series_reference`; made, kept
   durably and recorded first when the series has none yet);
2. decodes the new blob (once: the codec does not decode each frame's stream as well) and
   compares it with the original byte for byte; when they differ, the codec codes it again
   verifying every frame's stream (``verify=True``) and the result is compared again;
3. writes the new blob durably, then swaps the index row to it in one committed UPDATE that
   only succeeds if the row still points at the original (a concurrent replace wins);
4. deletes the original blob only after that commit (3 and 4: :meth:`Archive.swap_blob`).
A crash anywhere leaves either the original or the verified blob indexed, never neither.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from medzip_scp import metrics
from medzip_scp.archive import Archive
from medzip_scp.codec.api import DatasetReference
from medzip_scp.index.models import Instance
from medzip_scp.instance_codecs import IdentityCodec, InstanceCodec, Part10Codec

log = logging.getLogger(__name__)

INGEST_QUIET_SECONDS = 2.0  # compression waits until C-STOREs have paused this long


@dataclass
class CompressionSummary:
    compressed: int = 0
    failed: int = 0
    skipped: int = 0  # raced with a replace, or already done
    original_bytes: int = 0
    stored_bytes: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: the counts are those of the instances done

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.stored_bytes if self.stored_bytes else 0.0

    def table(self) -> str:
        """The pass as a table, each failure on a line of its own (UID and reason)."""
        lines = [
            "| compressed | failed | skipped | original bytes | stored bytes | ratio |",
            "|---|---|---|---|---|---|",
            f"| {self.compressed} | {self.failed} | {self.skipped} | {self.original_bytes} "
            f"| {self.stored_bytes} | {self.ratio:.2f} |",
        ]
        lines += [f"failed: {uid}: {reason}" for uid, reason in self.failures]
        if self.interrupted:
            lines.append("interrupted: the rest stays stored as received, for the next pass")
        return "\n".join(lines)


Shard = tuple[int, int]
"""``(k, n)``: this worker takes the instances whose row id is ``k`` modulo ``n``, so ``n``
workers (one per node process, say) share the backlog without compressing one twice."""


def parse_shard(text: str) -> Shard:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must be K/N, e.g. 0/2, got {text!r}") from None
    if not 0 <= k < n:
        raise ValueError(f"shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def pending_ids(archive: Archive, limit: int, shard: Shard = (0, 1)) -> list[int]:
    """Instances (of this shard) still stored as received, oldest first."""
    return archive.pending_compression(limit, shard)


def _encode(
    codec: InstanceCodec,
    original: bytes,
    row: Instance,
    verify: bool,
    reference: DatasetReference | None,
) -> bytes:
    if isinstance(codec, IdentityCodec):  # its payload records when the row arrived
        return codec.encode(
            original, verify=verify, received_at=row.received_at, reference=reference
        )
    return codec.encode(original, verify=verify)


def compress_instance(
    archive: Archive, codec: InstanceCodec, instance_id: int, summary: CompressionSummary
) -> None:
    row = archive.instance(instance_id)
    if row is None or row.codec_id != Part10Codec.codec_id:
        summary.skipped += 1
        return
    sop_uid = row.sop_instance_uid
    started = time.monotonic()
    try:
        # Checked against the hashes recorded at ingest: a damaged original is never
        # compressed (and its damage never made permanent by the swap).
        original = archive.load_part10(row)
        reference = None
        if isinstance(codec, IdentityCodec):  # the non-pixel data coded against its series'
            reference = archive.series_reference(row, original)
        # verified here, once, whatever the codec: decoded and compared byte for byte
        blob = _encode(codec, original, row, False, reference)
        if codec.decode(blob) != original:
            log.warning("new blob of %s differs from the original: coding it again", sop_uid)
            blob = _encode(codec, original, row, True, reference)
            if codec.decode(blob) != original:
                raise ValueError("decoded blob differs from the original")
    except Exception as exc:
        # Keep the original; mark it so the worker does not retry forever.
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("compression of %s failed, original kept: %s", sop_uid, reason)
        archive.mark_compress_failed(row)
        summary.failed += 1
        summary.failures.append((sop_uid, reason))
        return
    new = archive.swap_blob(row, blob, codec.codec_id)
    if new is None:  # the row moved on (replaced) while we worked
        summary.skipped += 1
        return
    summary.compressed += 1
    summary.original_bytes += len(original)
    summary.stored_bytes += new.stored_size
    metrics.observe_codec("encode", time.monotonic() - started, len(original), new.stored_size)
    log.info("compressed %s: %d -> %d bytes", sop_uid, len(original), new.stored_size)


def compress_pending(
    archive: Archive,
    codec: InstanceCodec,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    shard: Shard = (0, 1),
) -> CompressionSummary:
    """One pass over the instances (of this shard) still stored as received; Ctrl-C ends
    it after the instance at hand (an instance is swapped only once its blob is durable,
    so one cut short keeps its original), with the summary of what was done."""
    summary = CompressionSummary()
    ids = pending_ids(archive, limit or 1_000_000, shard)
    try:
        for done, instance_id in enumerate(ids, 1):
            compress_instance(archive, codec, instance_id, summary)
            if progress is not None:
                progress(done, len(ids))
    except KeyboardInterrupt:
        summary.interrupted = True
    return summary


def run_worker(
    archive: Archive,
    codec: InstanceCodec,
    stop: threading.Event,
    poll_seconds: float = 2.0,
    shard: Shard = (0, 1),
) -> None:
    """Loop until ``stop`` is set: compress pending instances (of this shard) one at a time
    while no C-STORE is arriving in any node process, then wait for more."""
    while not stop.is_set():
        # Yield the CPU to ingest: compression is background work, C-STORE is not.
        idle = time.monotonic() - archive.store_activity.value
        if idle < INGEST_QUIET_SECONDS:
            stop.wait(INGEST_QUIET_SECONDS - idle)
            continue
        started = time.monotonic()
        try:
            summary = compress_pending(archive, codec, limit=1, shard=shard)
        except Exception as exc:  # the database or store is unavailable: try again later
            log.error("compression pass failed: %s", type(exc).__name__)
            stop.wait(poll_seconds)
            continue
        if summary.compressed or summary.failed:
            log.info(
                "compression pass: %d compressed, %d failed in %.1f s",
                summary.compressed,
                summary.failed,
                time.monotonic() - started,
            )
        else:
            stop.wait(poll_seconds)
