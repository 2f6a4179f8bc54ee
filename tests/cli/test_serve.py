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
