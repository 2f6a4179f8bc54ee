"""``medzip serve`` as users start it: a subprocess, answering DCMTK's echoscu."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.net.conftest import free_port

ECHOSCU = Path("/usr/bin/echoscu")


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDZIP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medzip_scp.cli.main", "serve", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith("ready"):
            return proc, lines
    proc.kill()
    raise AssertionError("node did not start:\n" + "\n".join(lines))


def test_serve_prints_aet_port_and_answers_echo(tmp_path: Path) -> None:
    port = free_port()
    proc, lines = _start(tmp_path, "--port", str(port), "--data-dir", "archive")
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
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
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
    """Several node processes on one port: concurrent associations land on both, and no
    process disturbs another's transfers (each spools into its own folder)."""
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
    port = free_port()
    proc, lines = _start(tmp_path, "--port", str(port), "--processes", "2", "--data-dir", "d")
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
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    count = sqlite3.connect(tmp_path / "d" / "index.sqlite3").execute(
        "select count(*) from instance"
    )
    assert count.fetchone()[0] == 24
