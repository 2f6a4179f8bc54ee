"""The node's periodic verification sweep (``[identity] sweep_hours``) reports an instance
whose index row no longer says what its sealed identity says, by UID and check, no value."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sqlalchemy import select, update

from medzip_scp.index.models import Instance, Series, Study, VerificationRun
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from medzip_scp.pipeline.verify import run_sweeps, verify_archive
from tests.net.conftest import RunningNode
from tests.net.test_store import ct_dataset, store

MARKER = "Edited^Byattacker"


def test_sweep_logs_the_tampered_instance_only(
    node: RunningNode, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = ct_dataset(), ct_dataset()
    second.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.424242"
    second.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.424243"
    for ds in (first, second):
        assert store(node, ds) == Status.SUCCESS
    assert compress_pending(node.archive, node.archive.compressing_codec()).compressed == 2
    with node.archive.sessions() as session:
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == second.StudyInstanceUID)
            .values(patient_name=MARKER)
        )
        session.commit()
        victim = session.scalar(
            select(Instance.sop_instance_uid)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .where(Study.study_instance_uid == second.StudyInstanceUID)
        )
    stop = threading.Event()
    caplog.set_level(logging.INFO, logger="medzip_scp.pipeline.verify")
    sweeper = threading.Thread(target=run_sweeps, args=(node.archive, stop, 0.5 / 3600))
    sweeper.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "2 instances checked" not in caplog.text:
        time.sleep(0.1)
    stop.set()
    sweeper.join(timeout=30)
    assert "2 instances checked, 1 not OK" in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(victim in e and "PatientName" in e for e in errors)
    assert first.SOPInstanceUID not in caplog.text
    assert MARKER not in caplog.text and str(first.PatientName) not in caplog.text
    with node.archive.read_sessions() as session:  # each pass recorded for `medzip status`
        runs = session.execute(
            select(VerificationRun.kind, VerificationRun.checked, VerificationRun.not_ok).where(
                VerificationRun.interrupted.is_(False)
            )
        ).all()
    assert runs and set(runs) == {("sweep", 2, 1)}


def test_a_study_renamed_by_its_newer_instance_is_no_tampering(node: RunningNode) -> None:
    """A study's index row follows its newest instance: an older instance sealed with the
    name before the correction is OK, retrievable, and a name no instance sent is not."""
    older, newer = ct_dataset(), ct_dataset()
    newer.PatientName = "Corrected^Name"
    for ds in (older, newer):
        assert store(node, ds) == Status.SUCCESS
    assert compress_pending(node.archive, node.archive.compressing_codec()).compressed == 2
    assert verify_archive(node.archive).ok
    with node.archive.read_sessions() as session:
        row = session.scalar(
            select(Instance).where(Instance.sop_instance_uid == older.SOPInstanceUID)
        )
        session.expunge_all()
    assert node.archive.load_part10(row)  # retrieval sends it
    with node.archive.sessions() as session:
        session.execute(update(Study).values(patient_name=MARKER))
        session.commit()
    problems = dict(verify_archive(node.archive).problems)
    assert problems.keys() == {older.SOPInstanceUID, newer.SOPInstanceUID}
    assert all("PatientName" in reason for reason in problems.values())
