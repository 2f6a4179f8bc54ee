"""No patient identity at rest: once compressed, no blob of the store holds a name or an ID
of the patient, in any common encoding or case, neither as it lies (sealed), nor decrypted
with the blob key, nor decoded without the identity key; retrieval still gives back what
was sent, byte for byte."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from medzip_scp.codec.api import describe
from medzip_scp.dicom.blob import open_blob
from medzip_scp.dicom.part10 import dataset_offset_of
from medzip_scp.index.models import Instance
from medzip_scp.instance_codecs import IdentityCodec, Part10Codec
from medzip_scp.net.status import Status
from medzip_scp.pipeline.compress import compress_pending
from tests.helpers.node import RunningNode, make_settings, running_node
from tests.identity.node_traffic import contexts_of, get_patient, send_files, with_identity

IDENTITY = {
    "PatientName": "Qzvxwy^Marguerite",
    "PatientID": "QZV-4471-XK",
    "OtherPatientIDs": "QZV-9902-OT",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACQZ99172",
    "ReferringPhysicianName": "Dr^Xylophant",
    "InstitutionName": "Zebulon Infirmary",
    "PatientSex": "F",  # one patient (not sought: one letter is in every blob)
}
SOUGHT = (
    *(value for keyword, value in IDENTITY.items() if keyword != "PatientSex"),
    "Qzvxwy",  # the name's components on their own, and joined by a space
    "Marguerite",
    "Qzvxwy Marguerite",
    "Xylophant",
    "Dr Xylophant",
    "Zebulon",
)
ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be")  # ASCII is UTF-8's subset


def identity_found(data: bytes | bytearray) -> list[str]:
    """Each sought text found in ``data``, as ``text (encoding)``, in any letter case."""
    haystack = bytes(data).lower()  # ASCII letters only: in UTF-16 too, the other byte is 0
    return [
        f"{text} ({encoding})"
        for text in SOUGHT
        for encoding in ENCODINGS
        if text.lower().encode(encoding) in haystack
    ]


def test_the_search_finds_each_text_in_each_encoding_and_case() -> None:
    noise = random.Random(7).randbytes(4096)
    for text in SOUGHT:
        for encoding in ENCODINGS:
            for written in (text, text.upper(), text.lower(), text.swapcase()):
                data = noise[:1000] + written.encode(encoding) + noise[1000:]
                assert f"{text} ({encoding})" in identity_found(data)
    assert identity_found(noise) == []


@pytest.fixture
def sqlite_node(tmp_path: Path) -> Iterator[RunningNode]:
    """A node on SQLite (where the index lives does not change what a blob holds)."""
    settings = make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'index.db'}")
    with running_node(settings) as node:
        yield node


def _sources(data: Path) -> list[Path]:
    files = sorted((data / "conformance").rglob("*.dcm"))
    files += sorted(p for p in (data / "mr-epi").rglob("*") if p.is_file() and p.name != "LICENSE")
    if not files:
        pytest.skip(f"no conformance or mr-epi files under {data}")
    return files


def _rows(node: RunningNode) -> list[Instance]:
    with node.archive.sessions() as session:
        rows = list(session.scalars(select(Instance).order_by(Instance.id)))
        session.expunge_all()
    return rows


@pytest.mark.slow  # about 40 s on 2 cores, most of it compressing 113 objects
def test_no_identity_at_rest_once_compressed(
    sqlite_node: RunningNode,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    node = sqlite_node
    sources = _sources(shared_data)
    (tmp_path / "sent").mkdir()
    sent = [
        with_identity(source, tmp_path / "sent" / f"{i:03d}.dcm", IDENTITY)
        for i, source in enumerate(sources)
    ]
    # The node refuses the two malformed ones (a study without Study Instance UID, pixel
    # data without its delimiter): the rest is what the archive holds.
    statuses = send_files(node, sent)
    sent = [path for path, status in statuses.items() if status == Status.SUCCESS]
    assert len(sent) >= len(statuses) - 2

    # The search works on what is at rest: every original, decrypted, names the patient.
    originals = _rows(node)
    assert len(originals) == len(sent)
    assert {row.codec_id for row in originals} == {Part10Codec.codec_id}
    as_sent = {f"{value} (utf-8)" for value in IDENTITY.values() if value in SOUGHT}
    for row in originals:
        plaintext = node.archive.blobs.read(row.blob_key, bound_to=row.sop_instance_uid)
        assert as_sent <= set(identity_found(plaintext)), row.sop_instance_uid

    summary = compress_pending(node.archive, node.archive.compressing_codec())
    assert summary.failures == []
    rows = _rows(node)
    assert {row.codec_id for row in rows} == {IdentityCodec.codec_id}
    # Only the sealed blobs are left: no original stays behind anywhere in the store.
    assert set(node.archive.blobs.keys()) == {row.blob_key for row in rows}

    references = node.archive.blobs.references
    used = set()
    referenced = 0
    for row in rows:
        at_rest = node.archive.blobs._path(row.blob_key).read_bytes()
        plaintext = node.archive.blobs.read(row.blob_key, bound_to=row.sop_instance_uid)
        # no identity key needed; the series' data set reference, from the store
        stored, payload = open_blob(bytes(plaintext), references.get)
        assert payload, row.sop_instance_uid
        for what, data in (("file", at_rest), ("blob", plaintext), ("stored object", stored)):
            assert identity_found(data) == [], f"{row.sop_instance_uid}: {what}"
        sha = describe(bytes(plaintext))["dataset_reference"]
        if sha is not None:
            used.add(bytes.fromhex(sha))
            referenced += 1
    # The references the series' blobs are coded against (the mr-epi runs share their
    # study's) hold no identity either.
    assert referenced >= 40 and used
    for sha in used:
        data = references.get(sha)
        assert data is not None and identity_found(data) == []
    for path in references.folder.iterdir():
        assert identity_found(path.read_bytes()) == [], path.name

    # Retrieval opens each sealed identity again: what was sent comes back, byte for byte.
    final, failed, arrived = get_patient(node, IDENTITY["PatientID"], contexts_of(sent))
    assert final.Status == Status.SUCCESS, failed
    expected = {}
    for path in sent:
        raw = path.read_bytes()
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        expected[uid] = raw[dataset_offset_of(raw) :]
    assert arrived.keys() == expected.keys()
    differing = [uid for uid, data in expected.items() if arrived[uid] != data]
    assert differing == []
