"""The incoming spool: one folder per node process, removed only once its process is gone."""

from __future__ import annotations

import os
import subprocess
import sys

from medzip_scp.archive import Archive
from medzip_scp.config import Settings
from medzip_scp.net.server import start_server
from tests.helpers.node import ProcessWideSettings

HOLD_SPOOL = """
import fcntl, os, sys
held = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(held, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_start_removes_only_the_spools_of_processes_that_are_gone(
    node_settings: Settings,
) -> None:
    """A partial transfer of a process that is gone is dropped (it was never acknowledged);
    one of a live process, of another node on the same data folder say, is not."""
    incoming = node_settings.storage.incoming_dir()
    gone, alive = incoming / "999999001", incoming / "999999002"
    for folder in (gone, alive):
        folder.mkdir(parents=True)
        (folder / "partial.dcm").write_bytes(b"\0" * 1000)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SPOOL, str(alive)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with ProcessWideSettings():
            start_server(Archive.open(node_settings)).shutdown()
    finally:
        holder.communicate("")
    assert not gone.exists()
    assert (alive / "partial.dcm").is_file()
    assert sorted(p.name for p in incoming.iterdir()) == sorted([alive.name, str(os.getpid())])
