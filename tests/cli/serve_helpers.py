"""``medzip serve`` started as users start it: a subprocess, from an environment without the
suite's MEDZIP_ overrides."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from tests.helpers.node import free_port


def user_env() -> dict[str, str]:
    """The environment a user starts the node from: no MEDZIP_ overrides of the suite's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MEDZIP_")}


def start_serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "medzip_scp.cli.main", "serve", *args],
        cwd=tmp_path,
        env=user_env(),
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


def start_two_processes(
    tmp_path: Path, *args: str
) -> tuple[subprocess.Popen[str], list[str], SimpleNamespace]:
    """A node of two processes on a free port, its data in ``d``: the process, its start-up
    output, and the node as the SCU helpers take it."""
    port = free_port()
    proc, lines = start_serve(
        tmp_path, "--port", str(port), "--processes", "2", "--data-dir", "d", *args
    )
    return proc, lines, SimpleNamespace(host="127.0.0.1", port=port, ae_title="MEDZIP")


def stop_serve(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, as an init system stops the node; returns the rest of its output."""
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    rest = proc.stdout.read()
    proc.wait(timeout=60)
    return rest
