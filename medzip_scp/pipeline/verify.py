"""Integrity check of the whole archive: every blob decodes to what was received."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from medzip_scp.archive import CODECS, Archive
from medzip_scp.dicom.part10 import dataset_offset_of
from medzip_scp.index.models import Instance


@dataclass
class VerifyReport:
    checked: int = 0
    ok_count: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, what)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        lines = [
            "| instances checked | intact | damaged |",
            "|---|---|---|",
            f"| {self.checked} | {self.ok_count} | {len(self.problems)} |",
        ]
        for uid, what in self.problems:
            lines.append(f"damaged: {uid}: {what}")
        return "\n".join(lines)


def verify_instance(archive: Archive, instance: Instance) -> str | None:
    """Return what is wrong with a stored instance, or None when it is intact."""
    try:
        blob = archive.blobs.read(instance.blob_key)
    except Exception as exc:
        return f"blob unreadable ({type(exc).__name__}: {exc})"
    if hashlib.sha256(blob).hexdigest() != instance.stored_sha256:
        return "blob hash differs from the index"
    codec = CODECS.get(instance.codec_id)
    if codec is None:
        return f"unknown codec {instance.codec_id!r}"
    try:
        part10 = codec.decode(blob)
    except Exception as exc:
        return f"blob does not decode ({type(exc).__name__})"
    dataset = part10[dataset_offset_of(part10) :]
    if len(dataset) != instance.original_size:
        return f"decoded size {len(dataset)} differs from received {instance.original_size}"
    if hashlib.sha256(dataset).hexdigest() != instance.original_sha256:
        return "decoded data set differs from what was received"
    return None


def verify_archive(
    archive: Archive,
    sop_instance_uids: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    instances = archive.instances(sop_instance_uids)
    report = VerifyReport()
    for instance in instances:
        problem = verify_instance(archive, instance)
        report.checked += 1
        if problem is None:
            report.ok_count += 1
        else:
            report.problems.append((instance.sop_instance_uid, problem))
        if progress is not None:
            progress(report.checked, len(instances))
    return report
