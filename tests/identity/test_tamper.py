"""Tampering with a sealed instance is caught, and says how, whatever the attacker holds.

The attacker here holds the blob key and can write the index: whatever they change, they
seal again for the instance's name and record its hash, so the at-rest envelope and the
recorded hash pass and only the sealed identity can tell. Each case tampers with one
sealed instance of an archive of five (three CT slices of one study, an MR image and a
10-frame Enhanced MR, each study of another patient; and a CT image received after
compression, not sealed); ``medzip verify`` then reports exactly that instance TAMPERED,
with the check that failed, and every other one OK.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import evt
from sqlalchemy import select, update
from typer.testing import CliRunner

from medzip_scp.archive import Archive
from medzip_scp.cli.main import app
from medzip_scp.codec.container import Section, SectionType, read_container, write_container
from medzip_scp.dicom.blob import encode_dataset, open_blob
from medzip_scp.identity.instance import Verdict
from medzip_scp.identity.keys import ID_BYTES, IdentityKeyring, KeyGeneration
from medzip_scp.identity.payload import open_payload, seal_payload
from medzip_scp.index.models import Instance, Series, Study
from medzip_scp.instance_codecs import IdentityCodec, Part10Codec
from medzip_scp.net.server import start_server
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from medzip_scp.pipeline.verify import verify_archive
from tests.helpers.node import ProcessWideSettings, RunningNode, c_get, free_port, make_settings
from tests.identity.node_traffic import send_files, with_identity

CT_SLICES = ("I1000.dcm", "I1010.dcm", "I1020.dcm")  # of series/ct-phantom-1mm
PATIENTS = {  # per study: who the images belong to (never to be seen in a log line)
    "ct": {"PatientName": "Qzvxwy^Ctphantom", "PatientID": "QZV-CT-0001"},
    "mr": {"PatientName": "Wyvernby^Mrsmall", "PatientID": "QZV-MR-0002"},
    "enhanced": {"PatientName": "Jobbleton^Emri", "PatientID": "QZV-EN-0003"},
    "unsealed": {"PatientName": "Brackwater^Late", "PatientID": "QZV-UN-0004"},
}
TEXTS_OF_PATIENTS = [v for patient in PATIENTS.values() for v in patient.values()] + [
    part for patient in PATIENTS.values() for part in patient["PatientName"].split("^")
]


@dataclass
class SealedArchive:
    """A running node whose instances are sealed, but for one received after compression."""

    node: RunningNode
    uids: dict[str, str]  # "ct0", "ct1", "ct2", "mr", "enhanced", "unsealed": SOP Instance UID
    study: dict[str, str]  # by patient ("ct", "mr", "enhanced", "unsealed"): Study Inst. UID
    series: dict[str, str]  # by patient: Series Instance UID

    @property
    def archive(self) -> Archive:
        return self.node.archive

    @property
    def sealed_uids(self) -> list[str]:
        return [uid for name, uid in self.uids.items() if name != "unsealed"]


@pytest.fixture(scope="module")
def sealed_archive(
    module_db_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    shared_data: Path,
) -> Iterator[SealedArchive]:
    ct_folder = shared_data / "series" / "ct-phantom-1mm"
    enhanced = shared_data / "conformance" / "LittleEndianExplicit" / "emri_small.dcm"
    if not ct_folder.is_dir() or not enhanced.is_file():
        pytest.skip(f"{ct_folder} or {enhanced} is missing (see ../shared/data/README.md)")
    mr_small = Path(get_testdata_file("MR_small.dcm"))
    tmp = tmp_path_factory.mktemp("tamper")
    settings = make_settings(tmp / "data", module_db_url)
    archive = Archive.open(settings)
    kept = ProcessWideSettings()
    server = start_server(archive)
    node = RunningNode(settings, archive, "127.0.0.1", settings.node.port)
    try:
        sources = {f"ct{i}": ("ct", ct_folder / name) for i, name in enumerate(CT_SLICES)}
        sources |= {"mr": ("mr", mr_small), "enhanced": ("enhanced", enhanced)}
        files = {
            name: with_identity(source, tmp / f"{name}.dcm", PATIENTS[patient])
            for name, (patient, source) in sources.items()
        }
        assert set(send_files(node, list(files.values())).values()) == {Status.SUCCESS}
        summary = compress_pending(archive, archive.compressing_codec())
        assert (summary.compressed, summary.failures) == (len(files), [])
        # received after compression: kept as received, not sealed
        sources["unsealed"] = ("unsealed", Path(get_testdata_file("CT_small.dcm")))
        files["unsealed"] = with_identity(
            sources["unsealed"][1], tmp / "unsealed.dcm", PATIENTS["unsealed"]
        )
        assert send_files(node, [files["unsealed"]]) == {files["unsealed"]: Status.SUCCESS}
        report = verify_archive(archive)
        assert report.problems == [] and report.checked == len(files)
        headers = {name: dcmread(path, stop_before_pixels=True) for name, path in files.items()}
        yield SealedArchive(
            node,
            uids={name: ds.SOPInstanceUID for name, ds in headers.items()},
            study={p: headers[name].StudyInstanceUID for name, (p, _) in sources.items()},
            series={p: headers[name].SeriesInstanceUID for name, (p, _) in sources.items()},
        )
    finally:
        server.shutdown()
        kept.restore()


def _snapshot(archive: Archive) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    with archive.sessions() as session:
        instances = [
            dict(id=r.id, blob_key=r.blob_key, stored_sha256=r.stored_sha256,
                 stored_size=r.stored_size, received_at=r.received_at, series_fk=r.series_fk)
            for r in session.scalars(select(Instance))
        ]  # fmt: skip
        studies = [
            dict(id=r.id, patient_name=r.patient_name) for r in session.scalars(select(Study))
        ]
    return instances, studies


@pytest.fixture
def sealed(sealed_archive: SealedArchive) -> Iterator[SealedArchive]:
    """The sealed archive; afterwards its rows and blob files are put back as they were
    (each case tampers with it its own way, and finds every other instance OK)."""
    blobs = sealed_archive.archive.blobs
    files = {key: blobs._path(key).read_bytes() for key in list(blobs.keys())}
    instances, studies = _snapshot(sealed_archive.archive)
    yield sealed_archive
    with sealed_archive.archive.sessions() as session:
        for row in instances:
            session.execute(update(Instance).where(Instance.id == row["id"]).values(**row))
        for row in studies:
            session.execute(update(Study).where(Study.id == row["id"]).values(**row))
        session.commit()
    for key in set(blobs.keys()) - files.keys():
        blobs.delete(key)
    for key, data in files.items():
        blobs._path(key).write_bytes(data)


# -- what the attacker does ------------------------------------------------------------------


def _row(archive: Archive, uid: str) -> Instance:
    (row,) = archive.instances([uid])
    return row


def _blob(archive: Archive, uid: str) -> bytes:
    """The instance's blob, decrypted with the blob key."""
    row = _row(archive, uid)
    return bytes(archive.blobs.read(row.blob_key, bound_to=uid))


def _stored(archive: Archive, uid: str) -> tuple[bytes, bytes]:
    """``(the stored object, the sealed payload)``, decoded without the identity key."""
    return open_blob(_blob(archive, uid), archive.blobs.references.get)


def _substitute(archive: Archive, uid: str, blob: bytes) -> None:
    """Seal ``blob`` for the instance with the blob key and point its row at it, with its
    hash: the envelope and the recorded hash pass, only the identity checks are left."""
    new = archive.blobs.put_bytes(blob, bound_to=uid)
    with archive.sessions() as session:
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == uid)
            .values(blob_key=new.key, stored_sha256=new.sha256, stored_size=new.stored_size)
        )
        session.commit()


def _element_value(part10: bytes, keyword: str) -> tuple[int, int]:
    """``(offset, length)`` of a top-level element's value in a Part-10 object."""
    ds = dcmread(io.BytesIO(part10), force=True, defer_size=64)
    raw = ds.get_item(keyword, keep_deferred=True)
    assert raw is not None and raw.value_tell is not None, keyword
    return raw.value_tell, raw.length


def _with_bytes(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def _not_ok(archive: Archive) -> dict[str, tuple[Verdict, str]]:
    report = verify_archive(archive)
    assert report.checked == len(_snapshot(archive)[0])
    return {uid: (verdict, reason) for uid, verdict, reason, _ in report.results if reason}


# -- the cases -------------------------------------------------------------------------------


def test_patient_name_edited_in_the_index(sealed: SealedArchive) -> None:
    with sealed.archive.sessions() as session:
        session.execute(
            update(Study)
            .where(Study.study_instance_uid == sealed.study["mr"])
            .values(patient_name="Someone^Else")
        )
        session.commit()
    assert _not_ok(sealed.archive) == {
        sealed.uids["mr"]: (
            Verdict.TAMPERED,
            "index row differs from the sealed identity (PatientName)",
        )
    }


def test_instance_filed_under_another_patients_study(sealed: SealedArchive) -> None:
    victim = sealed.uids["ct0"]
    with sealed.archive.sessions() as session:
        mr_series = select(Series.id).where(Series.series_instance_uid == sealed.series["mr"])
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == victim)
            .values(series_fk=mr_series.scalar_subquery())
        )
        session.commit()
    differing = "StudyInstanceUID, SeriesInstanceUID, PatientID, PatientName, PatientSex, StudyDate"
    assert _not_ok(sealed.archive) == {
        victim: (Verdict.TAMPERED, f"index row differs from the sealed identity ({differing})")
    }


@pytest.mark.parametrize("where", ["blob files swapped", "rows name each other's blob"])
def test_two_blobs_swapped(sealed: SealedArchive, where: str) -> None:
    a, b = sealed.uids["ct0"], sealed.uids["mr"]
    row_a, row_b = _row(sealed.archive, a), _row(sealed.archive, b)
    if where == "blob files swapped":
        path_a, path_b = (sealed.archive.blobs._path(r.blob_key) for r in (row_a, row_b))
        data_a, data_b = path_a.read_bytes(), path_b.read_bytes()
        path_a.write_bytes(data_b)
        path_b.write_bytes(data_a)
    else:
        with sealed.archive.sessions() as session:
            for row, other in ((row_a, row_b), (row_b, row_a)):
                session.execute(
                    update(Instance)
                    .where(Instance.id == row.id)
                    .values(blob_key=other.blob_key, stored_sha256=other.stored_sha256)
                )
            session.commit()
    problems = _not_ok(sealed.archive)
    assert problems.keys() == {a, b}
    for verdict, reason in problems.values():
        assert verdict == Verdict.TAMPERED
        assert reason.startswith("blob refused: segment 0 failed authentication"), reason


def test_another_instances_blob_sealed_for_this_one(sealed: SealedArchive) -> None:
    victim, donor = sealed.uids["ct0"], sealed.uids["ct1"]
    _substitute(sealed.archive, victim, _blob(sealed.archive, donor))
    assert _not_ok(sealed.archive) == {
        victim: (Verdict.TAMPERED, f"payload is that of another instance ({donor})")
    }


def _flipped_in_streams(blob: bytes, payload: bytes, in_payload: bool) -> bytes:
    """``blob`` with one bit flipped in its STREAMS section: in the payload segment the one
    frame carries, or in the middle of the frame's coded pixels around it."""
    header, sections = read_container(blob)
    (streams,) = [s for s in sections if s.type == SectionType.STREAMS]
    # The payload's first bytes may ride in the frame's coder flush (free bits); the rest,
    # its signature last, is a segment inside the frame's stream ending at ``end``.
    end = streams.data.find(payload[-64:]) + 64
    assert end >= 64, "a single frame carries the payload's tail in its stream"
    at = end - len(payload)
    if in_payload:
        position = end - 32
    elif at > len(streams.data) - at - len(payload):
        position = at // 2
    else:
        position = (at + len(payload) + len(streams.data)) // 2
    data = bytearray(streams.data)
    data[position] ^= 0x10
    flipped = Section(SectionType.STREAMS, bytes(data))
    return write_container(header, [flipped if s is streams else s for s in sections])


@pytest.mark.parametrize(
    ("flip", "reason"),
    [
        ("in the coded pixels", "coded stream fails its checks (CorruptStreamError)"),
        ("in the coded pixels, CRCs left", "coded stream fails its checks (CorruptStreamError)"),
        ("in the payload segment", "payload signature does not verify"),
    ],
)
def test_bit_flipped_in_a_coded_stream(sealed: SealedArchive, flip: str, reason: str) -> None:
    victim = sealed.uids["ct1"]
    blob = _blob(sealed.archive, victim)
    _stored_object, payload = open_blob(blob, sealed.archive.blobs.references.get)
    flipped = _flipped_in_streams(blob, payload, in_payload=flip == "in the payload segment")
    if flip.endswith("CRCs left"):  # the container's own CRCs then catch it
        header_end = len(flipped) - sum(len(s.data) for s in read_container(blob)[1])
        flipped = blob[:header_end] + flipped[header_end:]
    _substitute(sealed.archive, victim, flipped)
    assert _not_ok(sealed.archive) == {victim: (Verdict.TAMPERED, reason)}


def test_stored_data_set_replaced(sealed: SealedArchive) -> None:
    victim = sealed.uids["enhanced"]
    stored, payload = _stored(sealed.archive, victim)
    offset, length = _element_value(stored, "SeriesNumber")  # not an identifying element
    assert stored[offset : offset + length] != b"9" * length
    altered = _with_bytes(stored, offset, b"9" * length)
    _substitute(sealed.archive, victim, encode_dataset(altered, payload=payload))
    assert _not_ok(sealed.archive) == {
        victim: (Verdict.TAMPERED, "data set differs from the signed hash")
    }


@pytest.mark.parametrize("victim", ["ct2", "enhanced"])
def test_one_pixel_value_altered(sealed: SealedArchive, victim: str) -> None:
    uid = sealed.uids[victim]
    stored, payload = _stored(sealed.archive, uid)
    offset, length = _element_value(stored, "PixelData")
    pixel = offset + length - 1000  # in the last frame
    altered = _with_bytes(stored, pixel, bytes([stored[pixel] ^ 0x01]))
    _substitute(sealed.archive, uid, encode_dataset(altered, payload=payload))
    assert _not_ok(sealed.archive) == {
        uid: (Verdict.TAMPERED, "pixel data differs from the signed hash")
    }


# a sealed payload: format byte, master key id, signing key id, salt, ciphertext, signature
_MASTER_ID = slice(1, 1 + ID_BYTES)
_SIGNING_ID = slice(1 + ID_BYTES, 1 + 2 * ID_BYTES)
_SIGNATURE = 64


@pytest.mark.parametrize("claimed", ["the other node's signing key", "our signing key"])
def test_payload_signed_by_another_nodes_key(
    sealed: SealedArchive, tmp_path: Path, claimed: str
) -> None:
    victim = sealed.uids["mr"]
    other = IdentityKeyring("another-node", [KeyGeneration.new()], tmp_path / "other.json")
    stored, payload = _stored(sealed.archive, victim)
    signed = bytearray(payload[:-_SIGNATURE])  # our master key id stays in the header
    if claimed == "the other node's signing key":
        signed[_SIGNING_ID] = other.current.signing_id
    forged = bytes(signed) + other.current.signing.sign(bytes(signed))
    _substitute(sealed.archive, victim, encode_dataset(stored, payload=forged))
    ((uid, (verdict, reason)),) = _not_ok(sealed.archive).items()
    assert (uid, verdict) == (victim, Verdict.TAMPERED)
    if claimed == "the other node's signing key":
        assert reason == (
            f"payload signed by key {other.current.signing_id.hex()}, which this node does not "
            "trust"
        )
    else:
        assert reason == "payload signature does not verify"


def test_payload_naming_a_master_key_this_node_lacks(sealed: SealedArchive) -> None:
    """Signed by our key, the header's master key id is covered by the signature: another id
    there is tampering, not a key generation the key file lacks (which would have its own
    signing key, unknown too)."""
    victim = sealed.uids["mr"]
    stored, payload = _stored(sealed.archive, victim)
    altered = bytearray(payload)
    altered[_MASTER_ID] = bytes(b ^ 0xFF for b in payload[_MASTER_ID])
    _substitute(sealed.archive, victim, encode_dataset(stored, payload=bytes(altered)))
    assert _not_ok(sealed.archive) == {
        victim: (Verdict.TAMPERED, "payload signature does not verify")
    }


def test_payload_sealed_by_a_key_generation_this_node_lacks(
    sealed: SealedArchive, tmp_path: Path
) -> None:
    """A payload sealed and signed with keys the key file does not hold (a generation lost
    with an old backup, another node's) cannot be checked: KEY-MISSING, naming the key."""
    victim = sealed.uids["mr"]
    stored, payload = _stored(sealed.archive, victim)
    record = open_payload(payload, sealed.archive.identity)  # type: ignore[arg-type]
    lost = IdentityKeyring(record.node_id, [KeyGeneration.new()], tmp_path / "lost.json")
    resealed = seal_payload(record, lost)
    _substitute(sealed.archive, victim, encode_dataset(stored, payload=resealed))
    assert _not_ok(sealed.archive) == {
        victim: (
            Verdict.KEY_MISSING,
            f"identity key {lost.current.master_id.hex()} is not in the key file",
        )
    }


def test_payload_of_another_instance(sealed: SealedArchive) -> None:
    victim, donor = sealed.uids["mr"], sealed.uids["ct0"]
    stored, _payload = _stored(sealed.archive, victim)
    _donor_stored, donor_payload = _stored(sealed.archive, donor)
    _substitute(sealed.archive, victim, encode_dataset(stored, payload=donor_payload))
    assert _not_ok(sealed.archive) == {
        victim: (Verdict.TAMPERED, f"payload is that of another instance ({donor})")
    }


# -- what the node and the CLI make of it ----------------------------------------------------


def _get_study(node: RunningNode, study_uid: str) -> tuple[Dataset, Dataset | None, list[str]]:
    """C-GET a CT study; returns the final response, its identifier and the SOP Instance
    UIDs that arrived."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return Status.SUCCESS

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    responses = c_get(node, query, on_store)
    return responses[-1][0], responses[-1][1], received


def test_c_get_sends_the_others_and_names_the_tampered_one(
    sealed: SealedArchive, caplog: pytest.LogCaptureFixture
) -> None:
    victim = sealed.uids["ct1"]
    stored, payload = _stored(sealed.archive, victim)
    offset, _length = _element_value(stored, "PixelData")
    altered = _with_bytes(stored, offset, bytes([stored[offset] ^ 0x01]))
    _substitute(sealed.archive, victim, encode_dataset(altered, payload=payload))

    with caplog.at_level(logging.INFO):
        final, identifier, received = _get_study(sealed.node, sealed.study["ct"])
    assert sorted(received) == sorted([sealed.uids["ct0"], sealed.uids["ct2"]])
    assert final.Status == Status.WARNING_SUBOPERATIONS
    assert identifier is not None and identifier.FailedSOPInstanceUIDList == victim
    refusals = [m for m in caplog.messages if victim in m]
    assert refusals == [
        f"refusing to send instance {victim}: pixel data differs from the signed hash"
    ]
    leaked = [t for t in TEXTS_OF_PATIENTS for m in caplog.messages if t.lower() in m.lower()]
    assert leaked == []


def _cli_env(sealed: SealedArchive) -> dict[str, str]:
    return {"MEDZIP_STORAGE__DATABASE_URL": sealed.node.settings.storage.database_url}


def _verify(sealed: SealedArchive, *options: str) -> tuple[int, dict[str, Any]]:
    """``medzip verify --json`` with ``options``: exit code and the report."""
    data_dir = str(sealed.node.settings.storage.data_dir)
    result = CliRunner().invoke(
        app, ["verify", "--data-dir", data_dir, "--json", *options], env=_cli_env(sealed)
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def _verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {i["sop_instance_uid"]: i["verdict"] for i in report["instances"]}


def test_medzip_verify_reports_the_tampered_instance(sealed: SealedArchive) -> None:
    victim = sealed.uids["ct2"]
    stored, payload = _stored(sealed.archive, victim)
    offset, _length = _element_value(stored, "PixelData")
    altered = _with_bytes(stored, offset, bytes([stored[offset] ^ 0x01]))
    _substitute(sealed.archive, victim, encode_dataset(altered, payload=payload))

    code, report = _verify(sealed)
    assert code == 1
    assert report["counts"] == {"OK": 5, "TAMPERED": 1, "KEY-MISSING": 0, "UNREADABLE": 0}
    (tampered,) = [i for i in report["instances"] if i["verdict"] != "OK"]
    assert tampered == {
        "sop_instance_uid": victim,
        "verdict": "TAMPERED",
        "reason": "pixel data differs from the signed hash",
        "codec": IdentityCodec.codec_id,
    }

    code, report = _verify(sealed, "--study", sealed.study["ct"])
    assert code == 1
    assert _verdicts(report) == {
        sealed.uids["ct0"]: "OK",
        sealed.uids["ct1"]: "OK",
        victim: "TAMPERED",
    }
    code, report = _verify(sealed, "--series", sealed.series["enhanced"])
    assert (code, _verdicts(report)) == (0, {sealed.uids["enhanced"]: "OK"})

    # --since: only what was received since that day (the CT study arrived years ago)
    with sealed.archive.sessions() as session:
        ct_rows = (
            select(Instance.id)
            .join(Series, Instance.series_fk == Series.id)
            .join(Study, Series.study_fk == Study.id)
            .where(Study.study_instance_uid == sealed.study["ct"])
        )
        session.execute(
            update(Instance)
            .where(Instance.id.in_(ct_rows))
            .values(received_at=dt.datetime(2019, 6, 1, tzinfo=dt.UTC))
        )
        session.commit()
    code, report = _verify(sealed, "--since", "2020-01-01")
    assert code == 0
    assert _verdicts(report).keys() == {sealed.uids[n] for n in ("mr", "enhanced", "unsealed")}
    code, report = _verify(sealed, "--since", "2019-01-01")
    assert code == 1 and len(_verdicts(report)) == 6


# -- the identity key file missing -----------------------------------------------------------


@pytest.fixture
def identity_key_moved_away(sealed: SealedArchive, tmp_path: Path) -> Iterator[Path]:
    """The identity key file, moved out of its place (and back afterwards); yields where it
    belongs. The running node keeps the keys it read."""
    settings = sealed.node.settings
    key_file = settings.identity.resolved_key_file(settings.storage.data_dir)
    backup = tmp_path / "identity-backup.json"
    shutil.move(key_file, backup)
    try:
        yield key_file
    finally:
        shutil.move(backup, key_file)


def test_verify_without_the_identity_key(
    sealed: SealedArchive, identity_key_moved_away: Path
) -> None:
    code, report = _verify(sealed)
    assert code == 1
    verdicts = {i["sop_instance_uid"]: i for i in report["instances"]}
    assert verdicts.pop(sealed.uids["unsealed"])["verdict"] == "OK"
    assert verdicts.keys() == set(sealed.sealed_uids)
    for found in verdicts.values():
        assert (found["verdict"], found["codec"]) == ("KEY-MISSING", IdentityCodec.codec_id)
        assert "identity key" in found["reason"]
    assert not identity_key_moved_away.exists()  # no new key was made


def test_worker_refuses_to_start_without_the_identity_key(
    sealed: SealedArchive, identity_key_moved_away: Path
) -> None:
    data_dir = str(sealed.node.settings.storage.data_dir)
    result = CliRunner().invoke(
        app, ["worker", "--once", "--data-dir", data_dir], env=_cli_env(sealed)
    )
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert str(identity_key_moved_away) in line and "missing" in line
    assert not identity_key_moved_away.exists()
    assert _row(sealed.archive, sealed.uids["unsealed"]).codec_id == Part10Codec.codec_id


def test_serve_refuses_to_start_without_the_identity_key(
    sealed: SealedArchive, identity_key_moved_away: Path
) -> None:
    data_dir = str(sealed.node.settings.storage.data_dir)
    result = subprocess.run(
        [sys.executable, "-m", "medzip_scp.cli.main", "serve", "--data-dir", data_dir]
        + ["--port", str(free_port())],
        env={**_cli_env(sealed), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    (line,) = [m for m in result.stderr.splitlines() if m.startswith("medzip:")]  # and logs
    assert str(identity_key_moved_away) in line and "missing" in line
    assert "ready" not in result.stdout
    assert not identity_key_moved_away.exists()
