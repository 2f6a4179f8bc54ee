"""``medzip serve`` as users start it: a subprocess, answering DCMTK's echoscu."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.serve_helpers import start_serve, start_two_processes, stop_serve, user_env
from tests.helpers.node import free_port
from tests.helpers.tls import client_context, echo

ECHOSCU = Path("/usr/bin/echoscu")


def test_serve_prints_aet_port_and_answers_echo(tmp_path: Path) -> None:
    port = free_port()
    proc, lines = start_serve(tmp_path, "--port", str(port), "--data-dir", "archive")
    try:
        text = "\n".join(lines)
        assert f"AE title MEDZIP, port {port}" in text
        assert "127.0.0.1/32" in text and "medzip config example" in text
        assert (tmp_path / "archive" / "index.sqlite3").exists()
        if not ECHOSCU.exists():
            pytest.skip("DCMTK's echoscu is not installed (apt-get install dcmtk)")
        echo = subprocess.run(
            [str(ECHOSCU), "-aec", "MEDZIP", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stdout + echo.stderr
        wrong = subprocess.run(
            [str(ECHOSCU), "-aec", "OTHER", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert wrong.returncode != 0  # called AE title is checked
    finally:
        stop_serve(proc)
    assert proc.returncode == 0


def test_cli_entry_point_installed() -> None:
    exe = shutil.which("medzip", path=str(Path(sys.executable).parent))
    assert exe is not None, "the medzip console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("serve", "verify", "config", "db", "keys"):
        assert command in out.stdout


STORESCU = Path("/usr/bin/storescu")


def test_serve_with_two_processes_shares_the_port(tmp_path: Path) -> None:
    """Several node processes on one port: concurrent associations are dealt evenly to
    both, and no process disturbs another's transfers (each spools into its own folder)."""
    if not STORESCU.exists():
        pytest.skip("DCMTK's storescu is not installed (apt-get install dcmtk)")
    import sqlite3

    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    files = tmp_path / "files"
    files.mkdir()
    for i in range(24):
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(files / f"{i}.dcm")
    proc, lines, node = start_two_processes(tmp_path)
    port = node.port
    try:
        assert "node processes: 2" in "\n".join(lines)
        # "ready" comes only once both processes listen (each made its spool folder first)
        assert len(list((tmp_path / "d" / "incoming").iterdir())) == 2
        names = sorted(files.iterdir())
        senders = [
            subprocess.Popen(
                [str(STORESCU), "-aec", "MEDZIP", "-aet", f"S{i}", "127.0.0.1", str(port)]
                + [str(p) for p in names[i::4]],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i in range(4)
        ]
        for sender in senders:
            out = sender.communicate(timeout=120)[0]
            assert sender.returncode == 0, out
    finally:
        log = stop_serve(proc)
    count = sqlite3.connect(tmp_path / "d" / "index.sqlite3").execute(
        "select count(*) from instance"
    )
    assert count.fetchone()[0] == 24
    # associations are dealt round-robin: each process stored the files of two of them
    stored = [line for line in log.splitlines() if "C-STORE" in line and ": stored" in line]
    by_process = {
        name: sum(name in line for line in stored) for name in ("MainProcess", "medzip-node-1")
    }
    assert by_process == {"MainProcess": 12, "medzip-node-1": 12}, by_process


def test_mutual_tls_in_every_node_process(tmp_path: Path, pki: dict[str, Path]) -> None:
    """Each process sets up TLS for the associations it is dealt (a TLS session cannot be
    handed from one process to another)."""
    config = tmp_path / "node.toml"
    config.write_text(
        "[tls]\nenabled = true\n"
        f'certificate = "{pki["node_cert"]}"\nprivate_key = "{pki["node_key"]}"\n'
        f'ca_certificates = "{pki["ca"]}"\nrequire_client_certificate = true\n'
    )
    proc, _, node = start_two_processes(tmp_path, "--config", str(config))
    try:
        # associations are dealt in turn, so four in a row reach both processes twice; a
        # client that connects and stays silent holds up neither
        silent = socket.create_connection(("127.0.0.1", node.port))
        with_cert = [echo(node, (client_context(pki, True), "localhost")) for _ in range(4)]
        silent.close()
        without = [echo(node, (client_context(pki, False), "localhost")) for _ in range(2)]
    finally:
        stop_serve(proc)
    assert with_cert == [True] * 4
    assert without == [False] * 2


def test_port_in_use_fails_fast_with_a_message(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "medzip_scp.cli.main", "serve", "--port", str(port)]
            + ["--processes", "2", "--data-dir", str(tmp_path / "d")],
            capture_output=True,
            text=True,
            timeout=60,
            env=user_env(),
        )
    assert result.returncode == 1
    assert f"cannot serve on 0.0.0.0:{port}" in result.stderr
    assert "Address already in use" in result.stderr


@pytest.mark.slow  # 5-10 s on 2 cores: two node processes, waiting for both to compress
def test_every_node_process_serves_store_get_and_move(
    tmp_path: Path, store_scp: tuple[int, list]
) -> None:
    """The default production set-up (several processes): with associations dealt in turn,
    C-STORE, C-GET and C-MOVE each land on both processes and return what was sent, and
    both processes compress their share of the originals."""

    from medzip_scp.net.status import Status
    from tests.helpers.scu import move_study, store_study

    dest_port, moved = store_scp
    proc, _, node = start_two_processes(
        tmp_path, "--move-destination", f"DEST=127.0.0.1:{dest_port}"
    )
    try:
        study_uid, sent = store_study(node, 3)  # three associations: both processes store
        originals = {ds.SOPInstanceUID: ds.PixelData for ds in sent}
        for _ in range(2):  # two C-GETs: one per process
            status, got = _get_study(node.port, study_uid)
            assert status == Status.SUCCESS
            assert {ds.SOPInstanceUID: ds.PixelData for ds in got} == originals
        for _ in range(2):  # two C-MOVEs: one per process
            assert move_study(node, study_uid, "DEST")[-1].Status == Status.SUCCESS
        assert len(moved) == 6
        assert all(ds.PixelData == originals[ds.SOPInstanceUID] for ds in moved)
        # once C-STOREs pause, each process compresses its share of the three originals
        index = tmp_path / "d" / "index.sqlite3"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and _codecs(index) != {"mzp2"}:
            time.sleep(0.5)
        assert _codecs(index) == {"mzp2"}
        status, got = _get_study(node.port, study_uid)
        assert status == Status.SUCCESS
        assert {ds.SOPInstanceUID: ds.PixelData for ds in got} == originals
    finally:
        log = stop_serve(proc)
    assert proc.returncode == 0
    for name in ("MainProcess", "medzip-node-1"):
        served = "\n".join(line for line in log.splitlines() if name in line)
        for service in ("C-STORE", "C-GET", "C-MOVE", "compressed"):
            assert service in served, (name, service)


def _codecs(index: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(index) as db:
        return {row[0] for row in db.execute("select codec_id from instance")}


def _get_study(port: int, study_uid: str) -> tuple[int, list]:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    from tests.helpers.scu import qr_identifier

    got: list = []

    def on_store(event: evt.Event) -> int:
        got.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="MEDZIP",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    query = qr_identifier("STUDY", StudyInstanceUID=study_uid)
    final = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet))[-1][0]
    assoc.release()
    return int(final.Status), got


def _http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_monitoring_and_audit_follow_dcmtk_peers_across_processes(tmp_path: Path) -> None:
    """Two node processes, DCMTK's peers: /metrics adds up both processes' counts, the
    probes answer, the audit trail names who stored, queried and retrieved which UIDs,
    without the patient's name, and ``log_format = "json"`` logs JSON lines."""
    for tool in ("storescu", "findscu", "getscu", "movescu"):
        if not Path(f"/usr/bin/{tool}").exists():
            pytest.skip(f"DCMTK's {tool} is not installed (apt-get install dcmtk)")
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    study_uid = generate_uid()
    files = []
    for i in range(3):
        ds = dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SOPInstanceUID = study_uid, generate_uid()
        ds.PatientName = "Audit^Probe"
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1])
    http = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'log_format = "json"\n[monitoring]\nport = {http}\n')
    proc, lines, node = start_two_processes(
        tmp_path, "--config", str(config), "--allow", "10.0.0.0/8"
    )
    peer = ["-aec", "MEDZIP", "127.0.0.1", str(node.port)]
    study = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
    try:
        said = "\n".join(lines)
        assert f"monitoring: http://127.0.0.1:{http}/metrics" in said
        assert "access: any calling AE from 127.0.0.1/32, ::1/128, 10.0.0.0/8" in said
        assert _http_get(http, "/healthz") == (200, "ok\n")
        assert _http_get(http, "/readyz") == (200, "ready\n")
        runs = [
            ["storescu", "-aet", "MODALITY", *peer, str(files[0])],  # one per association:
            ["storescu", "-aet", "MODALITY", *peer, *map(str, files[1:])],  # both processes
            ["findscu", "-S", "-aet", "VIEWER", *study, "-k", "PatientName", *peer],
            ["getscu", "-S", "-aet", "VIEWER", "-od", str(tmp_path), *study, *peer],
            ["movescu", "-S", "-aet", "VIEWER", "-aem", "NOWHERE", *study, *peer],
        ]
        for args in runs:
            subprocess.run([f"/usr/bin/{args[0]}", *args[1:]], capture_output=True, timeout=60)
        status, text = _http_get(http, "/metrics")
    finally:
        log = stop_serve(proc)
    logged = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any("C-STORE" in r["message"] and r["process"] == "medzip-node-1" for r in logged)
    assert status == 200
    requests = "medzip_dimse_requests_total"
    assert _metric(text, requests, service="C-STORE", outcome="success") == 3
    assert _metric(text, requests, service="C-FIND", outcome="success") == 1
    assert _metric(text, requests, service="C-GET", outcome="success") == 1
    assert _metric(text, requests, service="C-MOVE", outcome="failure") == 1
    assert _metric(text, "medzip_associations_total", outcome="accepted") == 5
    assert _metric(text, "medzip_dimse_request_seconds_count", service="C-STORE") == 3
    assert _metric(text, "medzip_codec_seconds_total", op="decode") > 0  # C-GET restored 3
    stored = _metric(text, "medzip_instances", modality="CT", state="stored")
    compressed = _metric(text, "medzip_instances", modality="CT", state="compressed")
    assert stored + compressed == 3

    trail = (tmp_path / "d" / "audit" / "audit.jsonl").read_text()
    records = [json.loads(line) for line in trail.splitlines()]
    stores = [r for r in records if r["action"] == "store"]
    assert {r["sop_instance_uid"] for r in stores} == {dcmread(f).SOPInstanceUID for f in files}
    assert {(r["calling_ae"], r["address"], r["outcome"]) for r in stores} == {
        ("MODALITY", "127.0.0.1", "success")
    }
    assert len({r["pid"] for r in stores}) == 2  # both processes write the one trail
    (query,) = [r for r in records if r["action"] == "query"]
    assert (query["calling_ae"], query["level"], query["matches"]) == ("VIEWER", "STUDY", 1)
    get, move = [r for r in records if r["action"] == "retrieve"]
    assert (get["service"], get["StudyInstanceUID"], get["sub_operations"]) == (
        "C-GET",
        study_uid,
        3,
    )
    assert (move["destination"], move["outcome"]) == ("NOWHERE", "status 0xA801")
    assert "Audit^Probe" not in trail
