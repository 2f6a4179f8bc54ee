"""Integrity check of the whole archive: every blob decodes to what was received."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from medzip_scp.archive import Archive, InstanceIntegrityError
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
    """Return what is wrong with a stored instance, or None when it is intact.

    The same checks as every retrieval (:meth:`Archive.load_part10`): the blob opens for
    this name and instance, its hash and the decoded data set's hash are those recorded at
    ingest. A row that moved to a compressed blob meanwhile is checked as it is now.
    """
    try:
        archive.load_part10(instance)
    except InstanceIntegrityError as exc:
        return exc.reason
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
