"""Peers that connect and misbehave before (or after) any AE check must not lock others out.

Every connection on loopback comes from 127.0.0.1; a peer at "another address" binds its
socket to 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification

from medzip_scp.config import Settings
from medzip_scp.net.status import Status
from tests.helpers.node import RunningNode, make_settings

OTHER_ADDRESS = "127.0.0.2"
FOREVER = 0xFFFFFFFF  # the largest PDU length a header can declare


@pytest.fixture
def node_settings(tmp_path: Path) -> Settings:
    """SQLite only (the index plays no part here), open to all of loopback."""
    settings = make_settings(tmp_path / "data", "")
    settings.access.unknown_ae_hosts = ["127.0.0.0/8"]
    return settings


def _connect(node: RunningNode, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((node.host, node.port))
    return sock


def _header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BxL", pdu_type, length)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the node closes ``sock`` within ``seconds`` (whatever it sends first)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def _associate(node: RunningNode, source: str = "127.0.0.1", *contexts: str) -> Association:
    ae = AE(ae_title="PEER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for context in contexts or (Verification,):
        ae.add_requested_context(context)
    return ae.associate(node.host, node.port, ae_title=node.ae_title, bind_address=(source, 0))


def _echo(node: RunningNode, source: str) -> int | None:
    assoc = _associate(node, source)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_hostile_connections_do_not_keep_an_echo_out(node: RunningNode) -> None:
    """20 headers declaring 4 GiB and 20 stalled partial headers, all held open (defaults:
    more than max_associations of them)."""
    hostile = []
    try:
        for _ in range(20):
            huge = _connect(node)
            huge.sendall(_header(0x01, FOREVER) + b"\x00" * 1000)
            stalled = _connect(node)
            stalled.sendall(b"\x01\x00\x00")
            hostile += [huge, stalled]
        started = time.monotonic()
        assert _echo(node, OTHER_ADDRESS) == Status.SUCCESS
        assert time.monotonic() - started < 3.0
    finally:
        for sock in hostile:
            sock.close()


def _stream_declared_forever(sock: socket.socket, header: bytes, limit: int) -> int:
    """Send ``header`` then up to ``limit`` bytes of its body; the bytes sent."""
    chunk = b"\x00" * (1 << 20)
    sent = 0
    sock.settimeout(5)
    with contextlib.suppress(OSError):  # the node aborts and closes: reset, broken pipe
        sock.sendall(header)
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    return sent


@pytest.mark.parametrize("when", ["before association", "after association"])
def test_a_huge_declared_pdu_is_refused_not_buffered(node: RunningNode, when: str) -> None:
    streamed = 256 << 20
    before = _rss()
    if when == "before association":
        with _connect(node) as sock:
            sent = _stream_declared_forever(sock, _header(0x01, FOREVER), streamed)
            growth = _rss() - before
            assert _closed_within(sock, 2.0)
    else:
        assoc = _associate(node)
        assert assoc.is_established
        sock = assoc.dul.socket.socket  # the requestor's own connection, written to directly
        sent = _stream_declared_forever(sock, _header(0x04, FOREVER), streamed)
        growth = _rss() - before
        deadline = time.monotonic() + 2.0
        while not assoc.is_aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert assoc.is_aborted
    assert sent < streamed  # the node closed the connection mid-stream
    assert growth < 64 << 20


@pytest.fixture
def short_timeouts(node_settings: Settings) -> Settings:
    node_settings.node.association_request_timeout = 1.0
    node_settings.node.network_timeout = 1.0
    return node_settings


@pytest.mark.parametrize(
    "sent",
    [b"\x01\x00\x00", _header(0x01, 200) + b"\x00" * 50],
    ids=["partial header", "partial request"],
)
def test_a_connection_that_stalls_before_its_association_request_is_dropped(
    short_timeouts: Settings, node: RunningNode, sent: bytes
) -> None:
    with _connect(node) as sock:
        sock.sendall(sent)
        assert _closed_within(sock, 3.0)


def test_a_connection_that_trickles_its_association_request_is_dropped(
    short_timeouts: Settings, node: RunningNode
) -> None:
    """One byte at a time keeps the link busy, but the whole request has 1 s to arrive."""
    started = time.monotonic()
    with _connect(node) as sock:
        for byte in (_header(0x01, 200) + b"\x00" * 200)[:20]:
            sock.sendall(bytes([byte]))
            if _closed_within(sock, 0.25):
                break
        else:
            pytest.fail("the node still reads a request trickled for 5 s")
    assert time.monotonic() - started < 3.0


def test_a_peer_that_stalls_in_the_middle_of_a_pdu_is_dropped(
    short_timeouts: Settings, node: RunningNode
) -> None:
    assoc = _associate(node)
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(_header(0x04, 100) + b"\x00" * 10)
    deadline = time.monotonic() + 3.0
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


@pytest.fixture
def per_address_cap_of_two(node_settings: Settings) -> Settings:
    node_settings.node.max_associations_per_address = 2
    return node_settings


def test_connections_from_one_address_are_capped_and_others_still_get_in(
    per_address_cap_of_two: Settings, node: RunningNode
) -> None:
    with _connect(node) as first, _connect(node) as second:
        time.sleep(0.2)  # both are being served
        with _connect(node) as third:
            assert _closed_within(third, 5.0)  # at once; 5 s for a loaded machine
        assert not _closed_within(first, 0.1) and not _closed_within(second, 0.1)
        assert _echo(node, OTHER_ADDRESS) == Status.SUCCESS


@pytest.fixture
def spool_volume(node_settings: Settings) -> Iterator[Path]:
    """The node's spool folder on a 2 MB tmpfs (ask for it before ``node``)."""
    spool = node_settings.storage.incoming_dir()
    spool.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(spool)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; deleting the file returned
    frees it again."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\x00" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_spool_volume_answers_out_of_resources_and_keeps_the_association(
    spool_volume: Path, node: RunningNode
) -> None:
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    filler = _fill(spool_volume)  # after the node started: it clears its spool at start
    assoc = _associate(node, "127.0.0.1", CTImageStorage, Verification)
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dataset).Status == Status.OUT_OF_RESOURCES
        assert assoc.send_c_echo().Status == Status.SUCCESS
        left = [p for p in spool_volume.rglob("*") if p.is_file() and p != filler]
        assert left == []  # the partial spool file is gone
        filler.unlink()
        assert assoc.send_c_store(dataset).Status == Status.SUCCESS
    finally:
        assoc.release()
