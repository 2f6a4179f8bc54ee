"""``medzip serve``'s processes: one node per data folder, no process outliving the node,
a node process that dies replaced, and a prompt stop while compressing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medzip_scp.net.status import Status
from tests.cli.serve_helpers import start_serve, start_two_processes, stop_serve, user_env
from tests.data_paths import SHARED_DATA
from tests.helpers.node import free_port
from tests.helpers.scu import ct_dataset, store


def _medzip(
    folder: Path, *args: str, output: int | None = subprocess.PIPE
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "medzip_scp.cli.main", *args],
        cwd=folder,
        env=user_env(),
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _processes_in(folder: Path) -> list[str]:
    """Every process whose working directory is ``folder``: a node started there and every
    process it started (they inherit it, and keep it when orphaned)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "cwd") == str(folder.resolve()):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name}: {cmdline[:120]}")
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def _assert_none_left_in(folder: Path, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (left := _processes_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for line in left:  # do not leave them to the next test
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert not left, "processes left behind:\n" + "\n".join(left)


def _node_process_pids(folder: Path) -> list[int]:
    """The node processes after the first started in ``folder``."""
    return [int(line.split(":")[0]) for line in _processes_in(folder) if "spawn_main" in line]


class _Output:
    """The rest of a node's output, read as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._reader.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, text: str, timeout: float) -> int:
        """The index of the first line holding ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, line in enumerate(self.lines):
                if text in line:
                    return i
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the node's output:\n" + "\n".join(self.lines))

    def rest(self) -> list[str]:
        self._reader.join(timeout=60)
        return self.lines


@pytest.mark.slow
def test_second_node_on_the_same_data_folder_is_refused(tmp_path: Path) -> None:
    """A second node would clear the first one's spool (every C-STORE in flight, and each
    after, failed); a compression worker beside the node is welcome."""
    proc, _, node = start_two_processes(tmp_path)
    data_dir = (tmp_path / "d").resolve()
    worker = _medzip(tmp_path, "worker", "--data-dir", "d")
    try:
        assert worker.stdout is not None
        for line in worker.stdout:  # past its log lines
            if "compression worker running" in line:
                break
        second = _medzip(tmp_path, "serve", "--port", str(free_port()), "--data-dir", "d")
        try:
            out = second.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            second.kill()
            out = second.communicate()[0]
        assert second.returncode == 1, out
        assert f"data folder {data_dir} is in use" in out and f"pid {proc.pid}" in out, out
        assert len(list((data_dir / "incoming").iterdir())) == 2  # both spools untouched
        # the first node still stores, in both its processes (associations are dealt in turn)
        assert [store(node, ct_dataset()) for _ in range(2)] == [Status.SUCCESS] * 2
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
        stop_serve(proc)
    assert proc.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_no_process_outlives_a_node_stopped_during_start_up(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """The node processes wait for the first and it waits for them: a stop (or the first
    process's death) meanwhile once left one spinning on a core forever."""
    for step in range(8):
        delay = 0.2 + 0.4 * step
        folder = tmp_path / f"after-{delay:.1f}s"
        folder.mkdir()
        args = ("serve", "--port", str(free_port()), "--processes", "2", "--data-dir", "d")
        with open(folder / "output", "w") as output:  # a pipe would be held by orphans
            proc = _medzip(folder, *args, output=output.fileno())
        time.sleep(delay)
        proc.send_signal(stop_signal)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the node did not stop within 15 s of {stop_signal.name} at {delay:.1f} s")
        _assert_none_left_in(folder)


@pytest.mark.slow
def test_a_node_process_that_dies_is_replaced(tmp_path: Path) -> None:
    proc, _, node = start_two_processes(tmp_path)
    output = _Output(proc)
    try:
        [child] = _node_process_pids(tmp_path)
        os.kill(child, signal.SIGKILL)
        replaced = output.wait_for("medzip-node-1 replaced", timeout=20)
        assert _node_process_pids(tmp_path) not in ([], [child])
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: store(node, ct_dataset()), range(4)))
        assert statuses == [Status.SUCCESS] * 4
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    after = output.rest()[replaced:]
    stored = [line for line in after if "C-STORE" in line and ": stored" in line]
    by_process = {name: sum(name in line for line in stored) for name in ("MainProcess", "node-1")}
    assert by_process == {"MainProcess": 2, "node-1": 2}, by_process
    assert proc.returncode == 0


@pytest.mark.slow
def test_sigterm_while_compressing_stops_within_seconds(tmp_path: Path) -> None:
    """The frame being encoded is abandoned, not waited for: the original stays indexed
    until a verified blob is durable. (The learned paths make this object take minutes;
    classically it takes seconds, which the node could finish before the signal.)"""
    source = SHARED_DATA / "series" / "mr-dti-enhanced" / "3000.dcm"
    if not source.is_file():
        pytest.skip(f"real DICOM data not found at {source} (see ../shared/data/README.md)")
    from pydicom import dcmread
    from pynetdicom import AE

    config = tmp_path / "node.toml"
    config.write_text("[pipeline]\ncompress = true\npoll_seconds = 0.2\nlearned = true\n")
    port = free_port()
    proc, _ = start_serve(
        tmp_path, "--port", str(port), "--processes", "1", "--data-dir", "d", "-c", str(config)
    )
    try:
        ds = dcmread(source)
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDZIP")
        assert int(assoc.send_c_store(ds).Status) == Status.SUCCESS
        assoc.release()
        # compression begins once C-STOREs have paused for 2 s; an idle node uses no CPU
        deadline = time.monotonic() + 15
        while _cpu_share_for_a_second(proc.pid) < 0.5:
            assert time.monotonic() < deadline, "the node did not begin to compress"
    finally:
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    took = time.monotonic() - sent
    assert took < 5.0, f"the node took {took:.1f} s to stop"
    import sqlite3

    from medzip_scp.instance_codecs import Part10Codec

    with sqlite3.connect(tmp_path / "d" / "index.sqlite3") as db:
        codecs = [row[0] for row in db.execute("select codec_id from instance")]
    assert codecs == [Part10Codec.codec_id]  # the original, still indexed


def _cpu_share_for_a_second(pid: int) -> float:
    """The share of a core ``pid`` used over the next second."""

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(1.0)
    return cpu_seconds() - before
