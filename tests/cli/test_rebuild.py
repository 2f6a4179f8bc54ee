"""``medzip db rebuild``: the index database deleted, a new one built from the blob store and
the keys answers every C-FIND as before and serves the same bytes; blobs that fail a check,
or need the identity key, are listed and not indexed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import select
from sqlalchemy.engine import make_url
from typer.testing import CliRunner, Result

from medzip_scp.archive import Archive
from medzip_scp.cli.main import app
from medzip_scp.config import DuplicatePolicyValues, Settings
from medzip_scp.dicom.part10 import dataset_offset_of
from medzip_scp.index.models import Instance, SupersededInstance
from medzip_scp.instance_codecs import CODECS, IdentityCodec, InstanceCodec, MzpCodec
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import CompressionSummary, compress_instance
from medzip_scp.pipeline.verify import verify_archive
from tests.helpers.node import RunningNode, c_get, running_node
from tests.helpers.scu import ct_dataset, qr_identifier, store

# Every key the index answers, per level; each level's query also asks for those above.
KEYS = {
    "PATIENT": [
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ],
    "STUDY": [
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ],
    "SERIES": [
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
    ],
    "IMAGE": ["SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Rows", "Columns"],
}
LEVELS = list(KEYS)


def _ct(patient: tuple[str, str], study: str, series: str, **changes: object) -> Dataset:
    """A CT instance of ``(Patient ID, Patient's Name)`` in that study and series."""
    return ct_dataset(
        PatientID=patient[0],
        PatientName=patient[1],
        StudyInstanceUID=study,
        SeriesInstanceUID=series,
        **changes,
    )


def _plain(value: Any) -> Any:
    if isinstance(value, MultiValue | list | tuple):
        return tuple(_plain(v) for v in value)
    return "" if value is None else str(value)


def _canonical(identifier: Dataset) -> tuple[tuple[int, str, Any], ...]:
    """An answer as comparable values: every element's tag, VR and value."""
    return tuple(sorted((int(e.tag), str(e.VR), _plain(e.value)) for e in identifier))


def _answers(node: RunningNode, level: str) -> list[tuple[tuple[int, str, Any], ...]]:
    """Every answer to a query of ``level`` asking for every key down to it, sorted."""
    keys = [k for lv in LEVELS[: LEVELS.index(level) + 1] for k in KEYS[lv]]
    model = (
        PatientRootQueryRetrieveInformationModelFind
        if level == "PATIENT"
        else StudyRootQueryRetrieveInformationModelFind
    )
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(model)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        responses = list(assoc.send_c_find(qr_identifier(level, **dict.fromkeys(keys, "")), model))
    finally:
        assoc.release()
    assert responses[-1][0].Status == Status.SUCCESS
    return sorted(_canonical(ident) for status, ident in responses if status.Status != 0)


def _get_study(node: RunningNode, study_uid: str) -> dict[str, bytes]:
    """C-GET a study in Explicit VR Little Endian: each instance's data set as it arrived."""
    arrived: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        data = Path(event.dataset_path).read_bytes()  # behind a File Meta pynetdicom wrote
        arrived[event.request.AffectedSOPInstanceUID] = data[dataset_offset_of(data) :]
        return Status.SUCCESS

    responses = c_get(node, qr_identifier("STUDY", StudyInstanceUID=study_uid), on_store)
    assert responses[-1][0].Status == Status.SUCCESS
    return arrived


def _compress(node: RunningNode, sop_instance_uid: str, codec: InstanceCodec | None = None) -> None:
    """Compress one instance with ``codec`` (the node's, mzp2, by default)."""
    with node.archive.sessions() as session:
        row_id = session.scalar(
            select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
        )
    summary = CompressionSummary()
    compress_instance(node.archive, codec or node.archive.compressing_codec(), row_id, summary)
    assert summary.compressed == 1


def _rows(settings: Settings) -> dict[str, set[tuple[Any, ...]]]:
    """What the index says of each stored version (not the calling AE, nor receive times:
    the blobs do not keep them to the microsecond)."""
    archive = Archive.open(settings, need_identity=False)
    with archive.read_sessions() as session:
        current = {
            (
                r.sop_instance_uid,
                r.blob_key,
                r.codec_id,
                r.state,
                r.transfer_syntax_uid,
                r.original_size,
                r.original_sha256,
                r.stored_size,
                r.stored_sha256,
            )
            for r in session.scalars(select(Instance))
        }
        superseded = {
            (r.sop_instance_uid, r.series_instance_uid, r.blob_key, r.codec_id, r.original_sha256)
            for r in session.scalars(select(SupersededInstance))
        }
    return {"instances": current, "superseded": superseded}


def _drop_index(settings: Settings) -> None:
    """Delete the index database: the SQLite file, or the PostgreSQL schema (made again,
    empty)."""
    url = make_url(settings.storage.resolved_database_url())
    if url.get_backend_name() == "sqlite":
        for path in Path(str(url.database)).parent.glob(Path(str(url.database)).name + "*"):
            path.unlink()
        return
    libpq = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        row = conn.execute("SELECT current_schema()").fetchone()
        assert row is not None and row[0].startswith("medzip_test_")
        schema = sql.Identifier(row[0])
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))


def _rebuild(settings: Settings) -> Result:
    return CliRunner().invoke(
        app,
        ["db", "rebuild", "--data-dir", str(settings.storage.data_dir)],
        env={"MEDZIP_STORAGE__DATABASE_URL": settings.storage.database_url},
    )


@pytest.fixture
def replacing(node_settings: Settings) -> Settings:
    node_settings.storage.duplicate_policy = DuplicatePolicyValues.REPLACE
    return node_settings


def test_a_rebuilt_index_answers_as_before(replacing: Settings) -> None:
    study_1, study_2, series_1 = generate_uid(), generate_uid(), generate_uid()
    ann = ("PID-A", "Alpha^Ann")
    first = _ct(ann, study_1, series_1, InstanceNumber=1, StudyDescription="first")
    second = _ct(ann, study_1, series_1, InstanceNumber=2, StudyDescription="first")
    # the same patient, named otherwise: patient-level answers keep the first received name
    renamed = _ct(("PID-A", "Alpha^Anna"), study_2, generate_uid(), PatientSex="F")
    other = _ct(("PID-B", "Beta^Bob"), generate_uid(), generate_uid(), AccessionNumber="A3")
    anonymous = _ct(("", "Gamma^Gus"), generate_uid(), generate_uid())  # no Patient ID
    corrected = _ct(ann, study_1, series_1, SOPInstanceUID=second.SOPInstanceUID,
                    InstanceNumber=22, SeriesDescription="corrected",
                    StudyDescription="first, corrected")  # fmt: skip
    with running_node(replacing) as node:
        for ds in (first, second, renamed, other, anonymous):
            assert store(node, ds) == Status.SUCCESS
        _compress(node, second.SOPInstanceUID)  # this version is superseded sealed
        assert store(node, corrected) == Status.SUCCESS  # replaces it
        # Sealed after the later instances arrived: its blob file is newer than theirs,
        # its sealed identity says when it arrived.
        for ds in (first, corrected, anonymous):
            _compress(node, ds.SOPInstanceUID)
        before = {level: _answers(node, level) for level in LEVELS}
        sent = _get_study(node, study_1)
    rows = _rows(replacing)
    codecs = {row[0]: row[2] for row in rows["instances"]}
    assert sorted(codecs.values()).count(IdentityCodec.codec_id) == 3
    assert len(rows["superseded"]) == 1
    names = [{tag: value for tag, _, value in answer} for answer in before["PATIENT"]]
    patients = {name[0x00100020]: name[0x00100010] for name in names}
    assert patients == {"PID-A": "Alpha^Ann", "PID-B": "Beta^Bob", "": "Gamma^Gus"}
    assert len(before["IMAGE"]) == 5

    _drop_index(replacing)
    result = _rebuild(replacing)
    assert result.exit_code == 0, result.output
    assert "| 6 | 5 | 1 | 0 | 0 | 0 | 0 |" in result.output  # blobs, indexed, superseded...

    assert _rows(replacing) == rows
    with running_node(replacing) as node:
        for level in LEVELS:
            assert _answers(node, level) == before[level], level
        assert _get_study(node, study_1) == sent  # byte for byte, sealed or original
        assert verify_archive(node.archive).ok


def test_a_database_that_is_not_empty_is_refused(node: RunningNode) -> None:
    assert store(node, ct_dataset()) == Status.SUCCESS
    result = _rebuild(node.settings)
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("medzip: the index database is not empty (instances: 1, superseded")
    assert line.endswith("move it away, or give --database-url for an empty one")


def test_a_tampered_blob_is_listed_not_indexed(node_settings: Settings) -> None:
    with running_node(node_settings) as node:
        sent = [ct_dataset() for _ in range(4)]
        for ds in sent:
            assert store(node, ds) == Status.SUCCESS
        _compress(node, sent[0].SOPInstanceUID)
        _compress(node, sent[2].SOPInstanceUID, CODECS[MzpCodec.codec_id])  # without identity
    rows = _rows(node_settings)
    assert {row[2] for row in rows["instances"]} == {"part10", "mzp1", "mzp2"}
    victim = next(row for row in rows["instances"] if row[0] == sent[1].SOPInstanceUID)
    path = node.archive.blobs._path(victim[1])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the sealed blob
    path.write_bytes(bytes(raw))
    _drop_index(node_settings)

    result = _rebuild(node_settings)
    assert result.exit_code == 1
    assert "| 4 | 3 | 0 | 0 | 1 | 0 | 0 |" in result.output
    assert f"TAMPERED: blob {victim[1]}: blob refused: segment 0 failed authentication" in (
        result.output
    )
    assert _rows(node_settings)["instances"] == rows["instances"] - {victim}


def test_without_the_identity_key_sealed_instances_are_key_missing(
    node_settings: Settings, tmp_path: Path
) -> None:
    with running_node(node_settings) as node:
        sent = [ct_dataset() for _ in range(2)]
        for ds in sent:
            assert store(node, ds) == Status.SUCCESS
        _compress(node, sent[0].SOPInstanceUID)
    rows = _rows(node_settings)
    sealed = next(row for row in rows["instances"] if row[2] == IdentityCodec.codec_id)
    key_file = node_settings.identity.resolved_key_file(node_settings.storage.data_dir)
    key_file.rename(tmp_path / "identity-backup.json")
    _drop_index(node_settings)

    result = _rebuild(node_settings)
    assert result.exit_code == 1
    assert "| 2 | 1 | 0 | 0 | 0 | 1 | 0 |" in result.output
    assert f"KEY-MISSING: blob {sealed[1]}: the identity key file is missing" in result.output
    assert _rows(node_settings)["instances"] == rows["instances"] - {sealed}  # nothing invented
    assert not key_file.exists()  # and no new key

    (tmp_path / "identity-backup.json").rename(key_file)
    _drop_index(node_settings)
    result = _rebuild(node_settings)
    assert result.exit_code == 0, result.output
    assert _rows(node_settings) == rows
    assert os.stat(key_file).st_size > 0
