"""End to end with DCMTK's command-line peers: the node as a modality and a viewer see it.

One node per database (module scope) receives every file of ``../shared/data/conformance``
and ``../shared/data/mr-epi`` once from ``/usr/bin/storescu`` (each file proposed and sent
in its own transfer syntax); the tests then query and retrieve it with ``findscu``,
``getscu``, ``movescu`` (to a ``storescp``) and an in-process pynetdicom SCU, and compare
every retrieved object with the file that was sent, element by element and pixel by pixel
(``dicom_compare.differences``). The expected patients, studies, series, instances and
counts are computed from the files with pydicom.

The conformance corpus reuses SOP Instance UIDs across files (the same image in several
transfer syntaxes): the first copy stored wins, a later differing copy is refused with
0x0111 (duplicate policy ``reject``), an identical one is an idempotent success.
``966.dcm`` (a J2K stream that does not decode) is sent on its own first, so that the
undecodable object is the archived one and retrieval without J2K exercises the failure path.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import func, select

from medzip_scp.archive import Archive
from medzip_scp.dicom.part10 import dataset_offset
from medzip_scp.index.models import Instance
from medzip_scp.net.server import start_server
from tests.helpers.node import ProcessWideSettings, RunningNode, free_port, make_settings
from tests.net.dicom_compare import differences, is_lossy

BIN = Path("/usr/bin")
DCMTK_TOOLS = ("echoscu", "storescu", "findscu", "getscu", "movescu", "storescp")
FOLDERS = ("conformance", "mr-epi")
CALLING = "E2E_SCU"
ALL_UN = "conformance/JPEG2000Lossless/explicit_VR-UN.dcm"  # every element in VR UN
UNDECODABLE = "conformance/JPEG2000Lossless/966.dcm"
NO_SOP_INSTANCE = "conformance/JPEGLosslessSV1/JPEGLosslessP14SV1_1s_1f_u_16_16.dcm"
TOOL_TIMEOUT = 120
UNDECODABLE_UID = "1.2.392.200046.100.2.1.97028794843.150131102105.1.1.1"
NO_UID_REQUEST_UID = "1.2.826.0.1.3680043.8.498.999999"

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.slow,
    pytest.mark.skipif(
        not all((BIN / tool).exists() for tool in DCMTK_TOOLS),
        reason="DCMTK is not installed (/usr/bin/storescu etc.): apt-get install dcmtk",
    ),
]


# ------------------------------------------------------------------------- the files


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: UID
    study_uid: str
    series_uid: str
    patient_key: tuple[str, str]  # (PatientID, IssuerOfPatientID)
    modality: str


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def scan_files(root: Path) -> tuple[list[SourceFile], list[Path]]:
    """DICOM files with a SOP Instance UID, and DICOM files without one."""
    files: list[SourceFile] = []
    without_uid: list[Path] = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:
                continue  # LICENSE, __init__.py
            if not _text(ds, "SOPInstanceUID"):
                without_uid.append(path)
                continue
            files.append(
                SourceFile(
                    path=path,
                    rel=str(path.relative_to(root)),
                    sop_instance_uid=_text(ds, "SOPInstanceUID").replace(" ", ""),
                    sop_class_uid=_text(ds, "SOPClassUID"),
                    transfer_syntax=UID(ds.file_meta.TransferSyntaxUID),
                    study_uid=_text(ds, "StudyInstanceUID").replace(" ", ""),
                    series_uid=_text(ds, "SeriesInstanceUID").replace(" ", ""),
                    patient_key=(_text(ds, "PatientID"), _text(ds, "IssuerOfPatientID")),
                    modality=_text(ds, "Modality"),
                )
            )
    return files, without_uid


def storescu_config(files: list[SourceFile], path: Path) -> None:
    """A storescu profile with one presentation context per (SOP class, file syntax), so
    that every file is proposed, accepted and sent in its own transfer syntax."""
    pairs = sorted({(f.sop_class_uid, str(f.transfer_syntax)) for f in files})
    syntaxes = sorted({ts for _, ts in pairs})
    assert len(pairs) <= 128, "more presentation contexts than one association allows"
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[OwnSyntaxContexts]"]
    for i, (sop_class, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{i} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", "[OwnSyntax]", "PresentationContexts = OwnSyntaxContexts"]
    path.write_text("\n".join(lines) + "\n")


def run_tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    if check and proc.returncode != 0:
        if os.environ.get("E2E_DUMP"):
            Path(os.environ["E2E_DUMP"]).write_text(proc.stdout + proc.stderr)
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)$")


def parse_store_log(text: str) -> dict[str, str]:
    """storescu -v output -> {file path: response text} (files actually sent)."""
    statuses: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines():
        if m := _SENDING.match(line):
            current = m.group(1).strip()
        elif (m := _RESPONSE.match(line)) and current is not None:
            statuses[current] = m.group(1)
            current = None
    return statuses


def store_status(response: str) -> int:
    if response == "Success":
        return 0x0000
    if m := re.search(r"0x([0-9a-fA-F]+)", response):
        return int(m.group(1), 16)
    return -1


# ------------------------------------------------------------------------- the node


@dataclass
class Sent:
    """What was sent to one node, and what the node must therefore hold."""

    node: RunningNode
    root: Path
    work: Path
    files: list[SourceFile]
    statuses: dict[str, int]  # file rel path -> C-STORE status
    stored: dict[str, SourceFile]  # SOP Instance UID -> the copy the node archived
    no_uid_status: int
    timings: dict[str, float] = field(default_factory=dict)

    def by_study(self) -> dict[str, list[SourceFile]]:
        out: dict[str, list[SourceFile]] = collections.defaultdict(list)
        for f in self.stored.values():
            out[f.study_uid].append(f)
        return out

    def by_series(self) -> dict[str, list[SourceFile]]:
        out: dict[str, list[SourceFile]] = collections.defaultdict(list)
        for f in self.stored.values():
            out[f.series_uid].append(f)
        return out


def _send_without_sop_instance(node: RunningNode, path: Path, work: Path) -> int:
    """C-STORE a data set that has no SOP Instance UID (storescu refuses to send it).

    pynetdicom sends a file's data set bytes as they are and takes the request's UIDs from
    its File Meta Information, so a copy with a meta naming a UID carries the original data
    set (without SOP Instance UID) unchanged."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = NO_UID_REQUEST_UID
    meta.TransferSyntaxUID = ts
    buffer = BytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    copy = work / "no-sop-instance.dcm"
    copy.write_bytes(
        b"\0" * 128 + b"DICM" + buffer.getvalue() + path.read_bytes()[dataset_offset(path) :]
    )
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(ds.SOPClassUID, [ts])
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, UIDs from its meta
    try:
        rsp = assoc.send_c_store(copy)
        assert "Status" in rsp, "no C-STORE response"
        return int(rsp.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def _send_with_pynetdicom(node: RunningNode, files: list[SourceFile]) -> dict[str, int]:
    """Files storescu cannot send (it does not find their UIDs, e.g. encoded as UN)."""
    ae = AE(ae_title=CALLING)
    for sop_class, ts in sorted({(f.sop_class_uid, f.transfer_syntax) for f in files}):
        ae.add_requested_context(sop_class, [ts])
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    out = {}
    try:
        for f in files:
            rsp = assoc.send_c_store(f.path)
            out[f.rel] = int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()
    return out


@pytest.fixture(scope="module")
def sent(
    module_db_url: str,
    shared_data: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Sent]:
    work = tmp_path_factory.mktemp("e2e")
    settings = make_settings(work / "data", module_db_url)
    archive = Archive.open(settings)
    kept = ProcessWideSettings()
    server = start_server(archive)
    assert server is not None
    node = RunningNode(settings, archive, "127.0.0.1", settings.node.port)
    try:
        files, without_uid = scan_files(shared_data)
        assert [p.relative_to(shared_data).as_posix() for p in without_uid] == [NO_SOP_INSTANCE]
        config = work / "storescu.cfg"
        storescu_config(files, config)
        base = [
            BIN / "storescu", "-v", "-aec", node.ae_title, "-aet", CALLING,
            "-xf", config, "OwnSyntax", "-nh", node.host, str(node.port),
        ]  # fmt: skip
        t0 = time.monotonic()
        first = run_tool(*base, shared_data / UNDECODABLE)
        folders = run_tool(*base, "+sd", "+r", *(shared_data / f for f in FOLDERS))
        elapsed = time.monotonic() - t0
        responses = parse_store_log(first.stdout + first.stderr)
        responses_all = parse_store_log(folders.stdout + folders.stderr)
        statuses: dict[str, int] = {}
        order: list[str] = []
        for path_text, response in [*responses.items(), *responses_all.items()]:
            rel = Path(path_text).relative_to(shared_data).as_posix()
            key = rel if rel not in statuses else rel + "#again"
            statuses[key] = store_status(response)
            order.append(key)
        by_rel = {f.rel: f for f in files}
        unsent = [f for f in files if f.rel not in statuses]
        statuses.update(_send_with_pynetdicom(node, unsent))
        order += [f.rel for f in unsent]
        stored: dict[str, SourceFile] = {}
        for key in order:
            f = by_rel[key.removesuffix("#again")]
            if statuses[key] == 0 and f.sop_instance_uid not in stored:
                stored[f.sop_instance_uid] = f
        no_uid_status = _send_without_sop_instance(node, shared_data / NO_SOP_INSTANCE, work)
        yield Sent(
            node=node,
            root=shared_data,
            work=work,
            files=files,
            statuses=statuses,
            stored=stored,
            no_uid_status=no_uid_status,
            timings={"store": elapsed},
        )
    finally:
        server.shutdown()
        kept.restore()


# ------------------------------------------------------------------------- C-ECHO, C-STORE


def test_echoscu(sent: Sent) -> None:
    node = sent.node
    run_tool(BIN / "echoscu", "-aec", node.ae_title, "-aet", CALLING, node.host, node.port)


def test_every_file_answered_success_or_duplicate(sent: Sent) -> None:
    """Each file gets success, or 0x0111 when a differing copy of its UID is archived."""
    stored_rel = {f.rel for f in sent.stored.values()}
    by_rel = {f.rel: f for f in sent.files}
    problems = []
    for key, status in sent.statuses.items():
        f = by_rel[key.removesuffix("#again")]
        if status == 0x0000:
            continue
        archived = sent.stored.get(f.sop_instance_uid)
        if status == 0x0111 and archived is not None and f.rel not in stored_rel:
            continue
        problems.append(f"{key}: 0x{status:04X}")
    assert not problems, problems
    assert set(sent.stored) == {f.sop_instance_uid for f in sent.files}
    assert sent.statuses[UNDECODABLE] == 0


def test_index_holds_each_instance_once_in_its_original_syntax(sent: Sent) -> None:
    with sent.node.archive.sessions() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.transfer_syntax_uid, Instance.sop_class_uid)
        ).all()
        total = session.scalar(select(func.count()).select_from(Instance))
    uids = collections.Counter(r.sop_instance_uid for r in rows)
    assert total == len(sent.stored)
    assert {u for u, n in uids.items() if n > 1} == set()
    assert set(uids) == set(sent.stored)
    wrong = {
        r.sop_instance_uid: (
            r.transfer_syntax_uid,
            str(sent.stored[r.sop_instance_uid].transfer_syntax),
        )
        for r in rows
        if r.transfer_syntax_uid != sent.stored[r.sop_instance_uid].transfer_syntax
        or r.sop_class_uid != sent.stored[r.sop_instance_uid].sop_class_uid
    }
    assert not wrong
    assert (
        sent.stored[next(f.sop_instance_uid for f in sent.files if f.rel == UNDECODABLE)].rel
        == UNDECODABLE
    )


def test_object_without_sop_instance_uid_is_refused(sent: Sent) -> None:
    assert sent.no_uid_status == 0xC001
    with sent.node.archive.sessions() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.sop_instance_uid == NO_UID_REQUEST_UID)
            )
            == 0
        )


# ------------------------------------------------------------------------- C-FIND


def findscu(
    sent: Sent, model: str, keys: list[str], name: str, queries: list[Dataset] = ()
) -> list[Dataset]:
    """Run findscu (``-S`` Study Root, ``-P`` Patient Root) with ``-k`` keys and/or query
    files (one association, one C-FIND per file); every response as written by ``-X``."""
    out = sent.work / "find" / name
    out.mkdir(parents=True)
    files = []
    for i, query in enumerate(queries):
        files.append(out / f"query{i:04d}.dcm")
        pydicom.dcmwrite(files[-1], query, implicit_vr=False, little_endian=True)
    node = sent.node
    args: list[str | Path] = [BIN / "findscu", model, "-X", "-od", out]
    args += ["-aec", node.ae_title, "-aet", CALLING]
    for key in keys:
        args += ["-k", key]
    run_tool(*args, node.host, str(node.port), *files)
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _query(level: str, **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _int_value(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    return None if value in (None, "") else int(value)


def _modalities(ds: Dataset) -> set[str]:
    value = ds.get("ModalitiesInStudy")
    if not value:
        return set()
    return {str(value)} if isinstance(value, str) else {str(v) for v in value}


def test_findscu_study_level(sent: Sent) -> None:
    responses = findscu(
        sent,
        "-S",
        [
            "QueryRetrieveLevel=STUDY",
            "StudyInstanceUID",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances",
            "PatientID",
        ],
        "study",
    )
    expected = sent.by_study()
    uids = collections.Counter(str(r.StudyInstanceUID) for r in responses)
    assert {u: n for u, n in uids.items() if n > 1} == {}
    assert set(uids) == set(expected)
    problems = []
    for r in responses:
        files = expected[str(r.StudyInstanceUID)]
        want = (
            len(files),
            len({f.series_uid for f in files}),
            {f.modality for f in files if f.modality},
        )
        got = (
            _int_value(r, "NumberOfStudyRelatedInstances"),
            _int_value(r, "NumberOfStudyRelatedSeries"),
            _modalities(r),
        )
        if got != want:
            problems.append(f"{r.StudyInstanceUID}: got {got}, expected {want}")
    assert not problems, problems


def test_findscu_series_level(sent: Sent) -> None:
    expected = sent.by_series()
    responses = findscu(
        sent,
        "-S",
        ["SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"],
        "series",
        [_query("SERIES", StudyInstanceUID=uid) for uid in sorted(sent.by_study())],
    )
    uids = collections.Counter(str(r.SeriesInstanceUID) for r in responses)
    assert {u: n for u, n in uids.items() if n > 1} == {}
    assert set(uids) == set(expected)
    problems = []
    for r in responses:
        files = expected[str(r.SeriesInstanceUID)]
        want = (len(files), files[0].modality, files[0].study_uid)
        got = (
            _int_value(r, "NumberOfSeriesRelatedInstances"),
            str(r.get("Modality", "") or ""),
            str(r.StudyInstanceUID),
        )
        if got != want:
            problems.append(f"{r.SeriesInstanceUID}: got {got}, expected {want}")
    assert not problems, problems


def test_findscu_image_level(sent: Sent) -> None:
    responses = findscu(
        sent,
        "-S",
        ["SOPInstanceUID", "SOPClassUID"],
        "image",
        [
            _query("IMAGE", StudyInstanceUID=files[0].study_uid, SeriesInstanceUID=uid)
            for uid, files in sorted(sent.by_series().items())
        ],
    )
    uids = collections.Counter(str(r.SOPInstanceUID) for r in responses)
    assert {u: n for u, n in uids.items() if n > 1} == {}
    assert set(uids) == set(sent.stored)
    wrong = {
        str(r.SOPInstanceUID): str(r.SOPClassUID)
        for r in responses
        if str(r.SOPClassUID) != sent.stored[str(r.SOPInstanceUID)].sop_class_uid
    }
    assert not wrong


def test_findscu_patient_level(sent: Sent) -> None:
    responses = findscu(
        sent,
        "-P",
        [
            "QueryRetrieveLevel=PATIENT",
            "PatientID",
            "IssuerOfPatientID",
            "NumberOfPatientRelatedStudies",
            "NumberOfPatientRelatedSeries",
            "NumberOfPatientRelatedInstances",
        ],
        "patient",
    )
    # Without a Patient ID nothing links two studies: each such study is a patient of its own.
    expected: dict[tuple[str, str, str], list[SourceFile]] = collections.defaultdict(list)
    for f in sent.stored.values():
        expected[(*f.patient_key, "" if f.patient_key[0] else f.study_uid)].append(f)
    want = collections.Counter(
        (
            patient_id,
            issuer,
            len({f.study_uid for f in files}),
            len({f.series_uid for f in files}),
            len(files),
        )
        for (patient_id, issuer, _), files in expected.items()
    )
    got = collections.Counter(
        (
            _text(r, "PatientID"),
            _text(r, "IssuerOfPatientID"),
            _int_value(r, "NumberOfPatientRelatedStudies"),
            _int_value(r, "NumberOfPatientRelatedSeries"),
            _int_value(r, "NumberOfPatientRelatedInstances"),
        )
        for r in responses
    )
    assert got == want


# ------------------------------------------------------------------------- C-GET, C-MOVE

UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})
_DIMSE_BLOCK = re.compile(
    r"Message Type\s+: C-(?:GET|MOVE) RSP.*?Remaining Suboperations\s+: (\S+).*?"
    r"Completed Suboperations\s+: (\S+).*?Failed Suboperations\s+: (\S+).*?"
    r"Warning Suboperations\s+: (\S+).*?DIMSE Status\s+: 0x([0-9a-fA-F]{4})",
    re.S,
)


@dataclass
class Retrieval:
    received: dict[str, Path]  # SOP Instance UID -> file the peer wrote
    statuses: list[int]  # final status of each C-GET / C-MOVE
    completed: int
    failed: int
    warning: int
    log: str


def _number(text: str) -> int:
    return int(text) if text.isdigit() else 0


def parse_retrieve_log(text: str, received_dir: Path) -> Retrieval:
    """getscu/movescu ``-d`` output: the final response of each request (non-pending)."""
    finals = [m for m in _DIMSE_BLOCK.finditer(text) if int(m.group(5), 16) not in (0xFF00,)]
    received: dict[str, Path] = {}
    for path in sorted(received_dir.iterdir()):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid not in received, f"{uid} received twice"
        received[uid] = path
    return Retrieval(
        received=received,
        statuses=[int(m.group(5), 16) for m in finals],
        completed=sum(_number(m.group(2)) for m in finals),
        failed=sum(_number(m.group(3)) for m in finals),
        warning=sum(_number(m.group(4)) for m in finals),
        log=text,
    )


@functools.cache
def decodes(path: Path) -> bool:
    """Whether pydicom can decode the file's pixel data (the node decodes with pydicom)."""
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018
    except Exception:
        return False
    return True


def check_retrieved(
    sent: Sent,
    files: list[SourceFile],
    result: Retrieval,
    accepted: frozenset[UID] | None,
    must_keep: frozenset[UID] = frozenset(),
    keep_accepted: bool = True,
    refused_by_peer: frozenset[str] = frozenset(),
) -> None:
    """Every requested object came back equal to the file sent, or (when the peer did not
    accept its syntax and it does not decode) is counted as a failed sub-operation.

    ``accepted``: the syntaxes the peer accepts (None: any the node proposes);
    ``must_keep``: original syntaxes that must come back unchanged; with ``keep_accepted``
    also every original in an ``accepted`` syntax (False where the peer proposed several
    uncompressed syntaxes in one context and the node picks one of them);
    ``refused_by_peer``: files (relative paths) the peer receives but answers with a
    failure status (it cannot parse them as they were received).
    """
    problems: list[str] = []
    expected_failed = {f.sop_instance_uid for f in files if f.rel in refused_by_peer}
    for f in files:
        got = result.received.get(f.sop_instance_uid)
        keeps = f.transfer_syntax in must_keep or (
            keep_accepted and accepted is not None and f.transfer_syntax in accepted
        )
        if got is None:
            if keeps or decodes(f.path):
                problems.append(f"{f.rel}: not received")
            else:
                expected_failed.add(f.sop_instance_uid)
            continue
        ts = UID(pydicom.dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if keeps and ts != f.transfer_syntax:
            problems.append(f"{f.rel}: came back in {ts.name}, not {f.transfer_syntax.name}")
        if accepted is not None and ts not in accepted:
            problems.append(f"{f.rel}: came back in {ts.name}, which the peer did not accept")
        problems += [f"{f.rel}: {d}" for d in differences(f.path, got)]
    extra = set(result.received) - {f.sop_instance_uid for f in files}
    if extra:
        problems.append(f"objects that were not asked for: {sorted(extra)}")
    assert not problems, "\n".join(problems)
    assert expected_failed <= {
        f.sop_instance_uid
        for f in files
        if f.rel == UNDECODABLE
        or f.rel in refused_by_peer
        or is_lossy(f.transfer_syntax)
        or not decodes(f.path)
    }
    assert (result.completed, result.failed, result.warning) == (
        len(files) - len(expected_failed),
        len(expected_failed),
        0,
    ), result.log[-3000:]
    ours = {f.sop_instance_uid for f in files if f.rel not in refused_by_peer}
    want_status = 0xB000 if expected_failed & ours else 0x0000
    assert want_status in result.statuses, result.statuses
    if refused_by_peer:  # pynetdicom's own final status when the peer refused every one
        assert {0xB000, 0xA702} & set(result.statuses), result.statuses


def _write_queries(directory: Path, queries: list[Dataset]) -> list[Path]:
    directory.mkdir(parents=True)
    paths = []
    for i, query in enumerate(queries):
        paths.append(directory / f"query{i:04d}.dcm")
        pydicom.dcmwrite(paths[-1], query, implicit_vr=False, little_endian=True)
    return paths


def getscu(sent: Sent, name: str, queries: list[Dataset], *options: str) -> Retrieval:
    """One getscu run (association) per query, all objects written to one fresh folder.

    One association per C-GET because getscu 3.6.7 does not read the identifier (Failed
    SOP Instance UID List) of a final 0xB000/0xA702 response: the next request on the same
    association then fails with "Command PDV Expected"."""
    out = sent.work / "get" / name
    files = _write_queries(sent.work / "get" / f"{name}-queries", queries)
    out.mkdir(parents=True)
    node = sent.node
    log = []
    for query in files:
        proc = run_tool(
            BIN / "getscu", "-d", "-S", *options, "-aec", node.ae_title, "-aet", CALLING,
            "-od", out, node.host, str(node.port), query,
        )  # fmt: skip
        log.append(proc.stdout + proc.stderr)
    return parse_retrieve_log("\n".join(log), out)


def _stored_in(sent: Sent, study_uids: list[str]) -> list[SourceFile]:
    wanted = set(study_uids)
    return [f for f in sent.stored.values() if f.study_uid in wanted]


def _undecodable_study(sent: Sent) -> str:
    study = next(f.study_uid for f in sent.stored.values() if f.rel == UNDECODABLE)
    assert [f.rel for f in _stored_in(sent, [study])] == [UNDECODABLE]
    return study


def _studies_except_undecodable(sent: Sent) -> list[str]:
    return sorted(set(sent.by_study()) - {_undecodable_study(sent)})


def test_getscu_every_study_uncompressed(sent: Sent) -> None:
    """getscu proposes uncompressed syntaxes only: compressed originals are decompressed
    (pixel-equal); the lossy ones that do not decode are failed sub-operations."""
    studies = _studies_except_undecodable(sent)
    result = getscu(sent, "uncompressed", [_query("STUDY", StudyInstanceUID=u) for u in studies])
    check_retrieved(sent, _stored_in(sent, studies), result, UNCOMPRESSED, keep_accepted=False)


def test_getscu_prefers_j2k_lossless(sent: Sent) -> None:
    """getscu +xv proposes [J2K Lossless, Explicit LE, Explicit BE, Implicit LE] per
    storage class: a J2K lossless original must come back as it is."""
    f = next(f for f in sent.stored.values() if f.rel.endswith("JPEG2KLossless_1s_1f_u_16_16.dcm"))
    result = getscu(sent, "j2k", [_query("STUDY", StudyInstanceUID=f.study_uid)], "+xv")
    check_retrieved(sent, [f], result, frozenset({JPEG2000Lossless}))


def test_getscu_undecodable_object_is_a_failed_sub_operation(sent: Sent) -> None:
    """One C-GET of two studies, one of them holding only 966.dcm (J2K that does not
    decode), from a peer accepting uncompressed syntaxes only: 0xB000, 1 failed, 1 completed;
    the node keeps serving."""
    other = next(f for f in sent.stored.values() if f.rel.endswith("CT_small.dcm"))
    studies = [_undecodable_study(sent), other.study_uid]
    result = getscu(
        sent,
        "undecodable",
        [
            _query("STUDY", StudyInstanceUID=studies),
            _query("STUDY", StudyInstanceUID=other.study_uid),
        ],
    )
    assert result.statuses == [0xB000, 0x0000]
    assert (result.completed, result.failed, result.warning) == (2, 1, 0)
    assert set(result.received) == {other.sop_instance_uid}


@contextlib.contextmanager
def storescp(sent: Sent, name: str, *options: str) -> Iterator[tuple[str, Path]]:
    """A DCMTK storescp on a free port, registered as a C-MOVE destination of the node."""
    out = sent.work / "move" / name
    out.mkdir(parents=True)
    port = free_port()
    aet = f"SCP_{name.upper()}"[:16]
    log = open(out.parent / f"{name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [BIN / "storescp", *options, "-aet", aet, "-od", out, str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while run_tool(BIN / "echoscu", "-aec", aet, "127.0.0.1", port, check=False).returncode:
            assert proc.poll() is None and time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.2)
        sent.node.add_move_destination(aet, "127.0.0.1", port)
        yield aet, out
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def movescu(sent: Sent, destination: str, out: Path, queries: list[Dataset]) -> Retrieval:
    """One movescu run per query (see getscu about the final responses' identifiers)."""
    files = _write_queries(out.parent / f"{out.name}-queries", queries)
    node = sent.node
    log = []
    for query in files:
        proc = run_tool(
            BIN / "movescu",
            "-d",
            "-S",
            "-aec",
            node.ae_title,
            "-aet",
            CALLING,
            "-aem",
            destination,
            node.host,
            str(node.port),
            query,
            check=False,
        )  # fmt: skip  (movescu exits non-zero after a final warning status)
        log.append(proc.stdout + proc.stderr)
    return parse_retrieve_log("\n".join(log), out)


def test_movescu_to_storescp_accepting_all_syntaxes(sent: Sent) -> None:
    """storescp +xa accepts the compressed syntaxes: every object in a syntax it accepts
    comes back as sent, bytes included; the rest decompressed, pixel-equal."""
    studies = _studies_except_undecodable(sent)
    with storescp(sent, "all", "+xa") as (aet, out):
        result = movescu(sent, aet, out, [_query("STUDY", StudyInstanceUID=u) for u in studies])
    stored = _stored_in(sent, studies)
    # storescp +xa does not accept JPEG Lossless Process 14 (non-SV1); uncompressed originals
    # may come back in either uncompressed syntax the node proposes together
    kept = frozenset(
        f.transfer_syntax
        for f in stored
        if f.transfer_syntax != JPEGLossless and f.transfer_syntax not in UNCOMPRESSED
    )
    # Sent byte for byte as received, the all-UN object is more than storescp can parse
    # ("bad DICOM file"): it stores the bytes but answers a failure.
    check_retrieved(sent, stored, result, None, must_keep=kept, refused_by_peer=frozenset({ALL_UN}))


def test_movescu_to_storescp_accepting_uncompressed_only(sent: Sent) -> None:
    """storescp without options accepts uncompressed syntaxes only: the node decompresses,
    pixel-equal; an object that does not decode is a failed sub-operation (0xB000)."""
    studies = _studies_except_undecodable(sent)
    with storescp(sent, "uncompressed") as (aet, out):
        result = movescu(sent, aet, out, [_query("STUDY", StudyInstanceUID=u) for u in studies])
    check_retrieved(sent, _stored_in(sent, studies), result, UNCOMPRESSED, keep_accepted=False)
    other = next(f for f in sent.stored.values() if f.rel.endswith("CT_small.dcm"))
    with storescp(sent, "failing") as (aet, out):
        failing = movescu(
            sent,
            aet,
            out,
            [_query("STUDY", StudyInstanceUID=[_undecodable_study(sent), other.study_uid])],
        )
    assert failing.statuses == [0xB000]
    assert (failing.completed, failing.failed, failing.warning) == (1, 1, 0)
    assert set(failing.received) == {other.sop_instance_uid}


# ------------------------------------------------------------------------- pynetdicom SCU


def _get_without_role_selection(
    sent: Sent, files: list[SourceFile], identifier: Dataset, syntaxes: list[UID]
) -> tuple[list[Dataset], list[tuple[int, Dataset | None]]]:
    """C-GET like Horos: storage contexts proposed without SCP/SCU role selection."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="HOROS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in sorted({f.sop_class_uid for f in files}):
        ae.add_requested_context(sop_class, syntaxes)  # no build_role: no role selection
    assoc = ae.associate(
        sent.node.host,
        sent.node.port,
        ae_title=sent.node.ae_title,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        # the requestor acts as Storage SCP on these contexts, as Horos does
        for cx in assoc.accepted_contexts:
            cx._as_scp = True
        responses = list(assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet))
    finally:
        assoc.release()
    return received, responses


def test_pynetdicom_get_without_role_selection(sent: Sent) -> None:
    """A peer that proposes storage contexts without role selection still gets the study,
    with correct sub-operation counts in the final response."""
    files = max(sent.by_study().values(), key=len)  # the mr-epi study: 42 instances
    assert len(files) > 5
    received, responses = _get_without_role_selection(
        sent,
        files,
        _query("STUDY", StudyInstanceUID=files[0].study_uid),
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
    )
    final = responses[-1][0]
    decodable = [f for f in files if f.transfer_syntax in UNCOMPRESSED or decodes(f.path)]
    failed = len(files) - len(decodable)
    assert final.Status == (0xB000 if failed else 0x0000)
    assert (
        final.get("NumberOfCompletedSuboperations"),
        final.get("NumberOfFailedSuboperations", 0),
        final.get("NumberOfWarningSuboperations", 0),
    ) == (len(decodable), failed, 0)
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(
        f.sop_instance_uid for f in decodable
    )


def test_pynetdicom_get_undecodable_lists_the_failed_uid(sent: Sent) -> None:
    """The Failed SOP Instance UID List of the final 0xB000 names the undecodable object."""
    other = next(f for f in sent.stored.values() if f.rel.endswith("CT_small.dcm"))
    files = [sent.stored[UNDECODABLE_UID], other]
    received, responses = _get_without_role_selection(
        sent,
        files,
        _query("STUDY", StudyInstanceUID=[_undecodable_study(sent), other.study_uid]),
        [ExplicitVRLittleEndian],
    )
    status, identifier = responses[-1]
    assert status.Status == 0xB000
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (1, 1)
    assert identifier is not None
    failed = identifier.FailedSOPInstanceUIDList
    assert [failed] if isinstance(failed, str) else list(failed) == [UNDECODABLE_UID]
    assert [str(ds.SOPInstanceUID) for ds in received] == [other.sop_instance_uid]


def test_pynetdicom_get_only_undecodable_is_a_warning(sent: Sent) -> None:
    files = [sent.stored[UNDECODABLE_UID]]
    _, responses = _get_without_role_selection(
        sent, files, _query("STUDY", StudyInstanceUID=_undecodable_study(sent)),
        [ExplicitVRLittleEndian],
    )  # fmt: skip
    status, identifier = responses[-1]
    assert status.Status == 0xB000
    assert identifier is not None and identifier.FailedSOPInstanceUIDList == UNDECODABLE_UID


def test_pynetdicom_move_unknown_destination(sent: Sent) -> None:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(sent.node.host, sent.node.port, ae_title=sent.node.ae_title)
    assert assoc.is_established
    try:
        study = next(iter(sent.by_study()))
        responses = list(
            assoc.send_c_move(
                _query("STUDY", StudyInstanceUID=study),
                "NOWHERE",
                StudyRootQueryRetrieveInformationModelMove,
            )
        )
    finally:
        assoc.release()
    assert [r[0].Status for r in responses] == [0xA801]
