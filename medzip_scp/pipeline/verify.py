"""``medzip verify``: is every stored image still the image of the patient the index says?

Per instance, the checks of every retrieval (:meth:`Archive.load_part10`) and then some: the
blob opens for this name and instance; its hash is the one recorded; it decodes (stream and
pixel CRCs); its sealed identity payload is signed by this node and decrypts; it names this
instance; the identifying elements fit back; the pixel data and the rest of the data set hash
to what the payload signed; the restored object is what was received; and the index row's
patient, study and series say what the sealed data set says. Verdicts: OK, TAMPERED (with the
check that failed), KEY-MISSING (an identity key is not in the key file) or UNREADABLE (the
blob is missing or needs a model or format this node does not have).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from medzip_scp import audit, metrics
from medzip_scp.archive import Archive
from medzip_scp.identity.instance import Verdict
from medzip_scp.index.identity import InstanceFilter
from medzip_scp.index.models import Instance, utcnow
from medzip_scp.index.stats import VerificationPass
from medzip_scp.instance_codecs import IdentityCodec

__all__ = ["InstanceFilter", "VerifyReport", "run_sweeps", "verify_archive", "verify_instance"]

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    results: list[tuple[str, Verdict, str, str]] = field(default_factory=list)
    # (SOP Instance UID, verdict, reason or "", codec id)
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return all(verdict == Verdict.OK for _, verdict, _, _ in self.results)

    @property
    def checked(self) -> int:
        return len(self.results)

    @property
    def ok_count(self) -> int:
        return self.counts()[Verdict.OK]

    @property
    def problems(self) -> list[tuple[str, str]]:
        """(SOP Instance UID, which check failed) of each instance that is not OK."""
        return [(uid, reason) for uid, verdict, reason, _ in self.results if verdict != Verdict.OK]

    def counts(self) -> Counter[Verdict]:
        return Counter(verdict for _, verdict, _, _ in self.results)

    def table(self) -> str:
        counts = self.counts()
        rate = len(self.results) / self.seconds if self.seconds else 0.0
        sealed = sum(1 for *_, codec in self.results if codec == IdentityCodec.codec_id)
        lines = [
            "| checked | sealed identity | OK | TAMPERED | KEY-MISSING | UNREADABLE | "
            "instances/s |",
            "|---|---|---|---|---|---|---|",
            f"| {len(self.results)} | {sealed} | {counts[Verdict.OK]} "
            f"| {counts[Verdict.TAMPERED]} | {counts[Verdict.KEY_MISSING]} "
            f"| {counts[Verdict.UNREADABLE]} | {rate:.1f} |",
        ]
        for uid, verdict, reason, _ in self.results:
            if verdict != Verdict.OK:
                lines.append(f"{verdict}: {uid}: {reason}")
        if self.interrupted:
            lines.append("interrupted: the instances above are the ones checked so far")
        return "\n".join(lines)

    def json(self) -> str:
        return json.dumps(
            {
                "counts": {str(v): self.counts()[v] for v in Verdict},
                "seconds": round(self.seconds, 3),
                "interrupted": self.interrupted,
                "instances": [
                    {"sop_instance_uid": uid, "verdict": str(v), "reason": r, "codec": c}
                    for uid, v, r, c in self.results
                ],
            },
            indent=1,
        )


def verify_instance(archive: Archive, instance: Instance) -> tuple[Verdict, str]:
    """The verdict on one stored instance and, unless OK, which check failed (no PHI).
    Its study's other instances are decoded too: the study's index row follows the newest
    of them (see :func:`~medzip_scp.index.identity.identity_differences`)."""
    (members,) = archive.study_instances([instance.id]).values()
    return archive.verify_study(archive.instances_by_id(members), {instance.id})[instance.id]


def verify_archive(
    archive: Archive,
    which: InstanceFilter = InstanceFilter(),  # noqa: B008 - frozen, never mutated
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check the selected instances; Ctrl-C ends it early with what was checked so far."""
    instances = archive.select_instances(which)
    report = VerifyReport()
    started, started_at = time.monotonic(), utcnow()
    try:
        for instance, verdict, reason in _verdicts(archive, instances):
            report.results.append((instance.sop_instance_uid, verdict, reason, instance.codec_id))
            if progress is not None:
                progress(len(report.results), len(instances))
    except KeyboardInterrupt:
        report.interrupted = True
    report.seconds = time.monotonic() - started
    not_ok = report.checked - report.ok_count
    _record(
        archive, VerificationPass("verify", started_at, report.checked, not_ok, report.interrupted)
    )
    return report


def _record(archive: Archive, run: VerificationPass) -> None:
    """Record a pass for ``medzip status``, the metrics and the audit trail; a database
    that is away loses the index's record only."""
    metrics.count_verification(run.not_ok)
    who = {"user": audit.local_user()} if run.kind == "verify" else {"by": "node sweep"}
    outcome = "interrupted" if run.interrupted else "not ok" if run.not_ok else "success"
    audit.record("verify", outcome, **who, checked=run.checked, not_ok=run.not_ok)
    try:
        archive.record_verification(run)
    except Exception as exc:
        log.error("verification pass not recorded: %s", type(exc).__name__)


def _verdicts(
    archive: Archive, instances: list[Instance]
) -> Iterator[tuple[Instance, Verdict, str]]:
    """Verdicts on ``instances``, study by study (each study's other instances decoded too)."""
    by_id = {instance.id: instance for instance in instances}
    studies = archive.study_instances(by_id)
    for members in studies.values():
        selected = {i for i in members if i in by_id}
        try:
            # the study's other instances, not loaded yet
            others = archive.instances_by_id([i for i in members if i not in by_id])
            rows = sorted([by_id[i] for i in selected] + others, key=lambda row: row.id)
            verdicts = archive.verify_study(rows, selected)
        except Exception as exc:  # the database went away, say: report it, go on
            failure = (Verdict.UNREADABLE, f"could not be checked ({type(exc).__name__})")
            verdicts = dict.fromkeys(selected, failure)
        for instance_id in sorted(selected):
            yield by_id[instance_id], *verdicts[instance_id]


def run_sweeps(archive: Archive, stop: threading.Event, hours: float) -> None:
    """The node's periodic sweep (``[identity] sweep_hours``): every instance, one at a
    time, an error line (UID and check, never a value) for each that is not OK."""
    while not stop.wait(hours * 3600):
        try:
            _sweep(archive, stop)
        except Exception as exc:  # the next sweep tries again
            log.error("verification sweep failed: %s", type(exc).__name__)


def _sweep(archive: Archive, stop: threading.Event) -> None:
    checked = failed = 0
    started_at = utcnow()
    for instance, verdict, reason in _verdicts(archive, archive.select_instances(InstanceFilter())):
        if stop.is_set():
            _record(archive, VerificationPass("sweep", started_at, checked, failed, True))
            return
        checked += 1
        if verdict != Verdict.OK:
            failed += 1
            log.error("verification sweep: %s %s: %s", verdict, instance.sop_instance_uid, reason)
    log.info("verification sweep: %d instances checked, %d not OK", checked, failed)
    _record(archive, VerificationPass("sweep", started_at, checked, failed, False))
