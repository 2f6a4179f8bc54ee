"""``medzip studies list|show|delete`` and ``medzip export`` on a node's archive."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import evt
from typer.testing import CliRunner

from medzip_scp.cli.main import app
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from tests.helpers.node import RunningNode, c_get
from tests.helpers.scu import ct_dataset, store


def _medzip(node: RunningNode, *args: str, allow_delete: bool = False) -> tuple[int, str]:
    env = {"MEDZIP_STORAGE__DATABASE_URL": node.settings.storage.database_url}
    if allow_delete:
        env["MEDZIP_STORAGE__ALLOW_DELETE"] = "true"
    result = CliRunner().invoke(
        app, [*args, "--data-dir", str(node.settings.storage.data_dir)], env=env
    )
    return result.exit_code, result.output


def test_list_show_export_and_delete_a_study(node: RunningNode, tmp_path: Path) -> None:
    one, other = (f"1.2.826.0.1.3680043.8.498.{n}" for n in (1001, 1002))
    gone = [ct_dataset(StudyInstanceUID=one, SeriesInstanceUID=f"{one}.1") for _ in range(2)]
    kept = ct_dataset(
        StudyInstanceUID=other, SeriesInstanceUID=f"{other}.1", PatientName="Kept^Pat"
    )
    for ds in [*gone, kept]:
        assert store(node, ds) == Status.SUCCESS
    archive = node.archive
    assert compress_pending(archive, archive.compressing_codec()).compressed == 3

    code, out = _medzip(node, "studies", "list", "--json")
    assert code == 0, out
    studies = {s["study_instance_uid"]: s for s in json.loads(out)}
    assert {uid: s["instances"] for uid, s in studies.items()} == {
        gone[0].StudyInstanceUID: 2,
        kept.StudyInstanceUID: 1,
    }
    assert studies[kept.StudyInstanceUID]["patient_name"] == "Kept^Pat"
    code, out = _medzip(node, "studies", "show", gone[0].StudyInstanceUID, "--json")
    assert code == 0, out
    (series,) = json.loads(out)["series"]
    assert (series["modality"], series["instances"]) == ("CT", 2)

    code, out = _medzip(node, "export", gone[0].StudyInstanceUID, "--to", str(tmp_path / "out"))
    assert code == 0, out
    assert "| 2 | 2 | 0 |" in out  # instances, written, failed
    files = sorted((tmp_path / "out").rglob("*.dcm"))
    assert [f.parent.parent.name for f in files] == [gone[0].StudyInstanceUID] * 2
    exported = {str(dcmread(f).SOPInstanceUID): dcmread(f).PixelData for f in files}
    assert exported == {ds.SOPInstanceUID: ds.PixelData for ds in gone}

    study = gone[0].StudyInstanceUID
    code, out = _medzip(node, "studies", "delete", study, "--yes")
    assert code == 1 and "allow_delete = true" in out
    blobs_before = len(list(archive.blobs.keys()))
    assert blobs_before >= 3
    references_before = archive.blobs.references.count()
    code, out = _medzip(node, "studies", "delete", study, "--yes", allow_delete=True)
    assert code == 0, out
    assert f"deleted study {study}: 2 instances in 1 series, 2 blobs" in out
    assert len(list(archive.blobs.keys())) == blobs_before - 2
    # its series' data set reference (a header of the deleted patient) goes too
    assert archive.blobs.references.count() == references_before - 1
    assert [s.study_instance_uid for s in archive.studies()] == [kept.StudyInstanceUID]
    (row,) = archive.study_instance_rows(kept.StudyInstanceUID)
    assert archive.load_part10(row)  # the other study is untouched and still served
    code, out = _medzip(node, "studies", "show", study)
    assert code == 1 and f"no study {study}" in out

    trail = (node.settings.storage.data_dir / "audit" / "audit.jsonl").read_text()
    records = [json.loads(line) for line in trail.splitlines()]
    assert [(r["action"], r.get("study_instance_uid")) for r in records] == [
        ("list", None),
        ("show", study),
        ("export", study),
        ("delete", study),
        ("show", study),
    ]
    assert records[3]["instances"] == 2 and records[3]["user"]
    assert "Kept^Pat" not in trail


@pytest.mark.parametrize(
    "command", [["studies", "show", "1.2.3.4"], ["export", "1.2.3.4", "--to", "x"]]
)
def test_an_unknown_study_is_one_line(node: RunningNode, command: list[str]) -> None:
    code, out = _medzip(node, *command)
    assert code == 1 and "no study 1.2.3.4 in the archive" in out


def test_a_deletion_cut_short_after_its_commit_is_finished_later(
    node: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash after the rows' deletion committed, before the blobs went: the journal
    names them, and the next start (finish_deletions) deletes them; a journal whose
    deletion never committed deletes nothing."""
    one, other = (f"1.2.826.0.1.3680043.8.498.{n}" for n in (2001, 2002))
    gone = ct_dataset(StudyInstanceUID=one, SeriesInstanceUID=f"{one}.1")
    kept = ct_dataset(StudyInstanceUID=other, SeriesInstanceUID=f"{other}.1")
    for ds in (gone, kept):
        assert store(node, ds) == Status.SUCCESS
    archive = node.archive
    (gone_row,) = archive.study_instance_rows(one)
    (kept_row,) = archive.study_instance_rows(other)

    def crash(journal: Path) -> None:
        raise OSError("the machine went down")

    monkeypatch.setattr(archive, "_delete_journaled", crash)
    with pytest.raises(OSError):
        archive.delete_study(one)
    monkeypatch.undo()
    assert archive.studies(one) == []  # the rows went
    assert archive.blobs.exists(gone_row.blob_key)  # the blob not yet
    # a journal of a deletion that never committed: its rows still name the blob
    journals = node.settings.storage.data_dir / "deleting"
    (journals / f"{other}.json").write_text(
        json.dumps({"blobs": [kept_row.blob_key], "references": []})
    )
    assert archive.finish_deletions() == 2
    assert not archive.blobs.exists(gone_row.blob_key)
    assert archive.blobs.exists(kept_row.blob_key) and archive.load_part10(kept_row)
    assert not list(journals.iterdir())


def test_a_study_deleted_during_its_retrieval(node: RunningNode) -> None:
    """C-GET of a study while it is deleted: every instance that arrives is bit-exact, the
    others fail as sub-operations (their blobs are gone), the node goes on serving."""
    study = "1.2.826.0.1.3680043.8.498.3001"
    sent = [ct_dataset(StudyInstanceUID=study, SeriesInstanceUID=f"{study}.1") for _ in range(6)]
    for ds in sent:
        assert store(node, ds) == Status.SUCCESS
    deleted = threading.Event()
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        if not deleted.is_set():  # the first instance arrives: delete the study now
            assert node.archive.delete_study(study) == 6
            deleted.set()
        received[str(event.dataset.SOPInstanceUID)] = event.dataset.PixelData
        return 0x0000

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    responses = c_get(node, query, on_store)
    final = responses[-1][0]
    assert deleted.is_set() and received
    originals = {ds.SOPInstanceUID: ds.PixelData for ds in sent}
    assert all(received[uid] == originals[uid] for uid in received)
    assert final.Status in (0x0000, 0xB000, 0xA702)
    failed = final.get("NumberOfFailedSuboperations", 0)
    assert len(received) + failed == 6
    assert node.archive.studies(study) == []
    other = ct_dataset()  # the node goes on storing and serving
    assert store(node, other) == Status.SUCCESS
