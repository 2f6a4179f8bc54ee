"""Event waits in place of pynetdicom's polling sleeps, and the bulk-receiving socket.

The end-to-end suites run every association through both; these tests pin down the parts
that a slow but working fallback (a full timeout per turn) would otherwise hide.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pynetdicom.association
import pynetdicom.dul
import pytest

from medzip_scp.net import reactor
from medzip_scp.net.server import _BulkReceiveSocket

LONG = 5.0  # a wait that ran to this timeout did not wake on its event


def _later(action: Any, delay: float = 0.05) -> threading.Thread:
    thread = threading.Timer(delay, action)
    thread.start()
    return thread


def test_install_swaps_time_only_in_the_two_reactor_modules() -> None:
    reactor.install()
    reactor.install()  # idempotent
    assert isinstance(pynetdicom.association.time, reactor._ReactorTime)
    assert isinstance(pynetdicom.dul.time, reactor._ReactorTime)
    assert pynetdicom.dul.time.monotonic is time.monotonic  # everything else passes through
    started = time.monotonic()
    pynetdicom.association.time.sleep(0.05)  # not called by a reactor loop: a real sleep
    assert time.monotonic() - started >= 0.05


def test_association_wait_ends_when_a_message_is_queued() -> None:
    messages: queue.Queue = queue.Queue()
    association = SimpleNamespace(dimse=SimpleNamespace(msg_queue=messages))
    _later(lambda: messages.put((1, "C-STORE-RQ")))
    started = time.monotonic()
    reactor._wait_association(association, LONG)  # type: ignore[arg-type]
    assert time.monotonic() - started < LONG / 2
    assert messages.qsize() == 1  # the reactor, not the wait, takes the message


class _Dul:
    """What attach and the DUL wait use of a DULServiceProvider."""

    def __init__(self, sock: socket.socket, connected: bool = True) -> None:
        self.socket = SimpleNamespace(socket=sock, _is_connected=connected)
        self.to_provider_queue: queue.Queue = queue.Queue()
        self._target = lambda: None  # the thread's target: the reactor loop


def _dul(sock: socket.socket) -> Any:
    dul = _Dul(sock)
    dul.to_provider_queue.put("A-ASSOCIATE-AC")  # queued before attach
    reactor.attach(dul)  # type: ignore[arg-type]
    assert dul.to_provider_queue.get_nowait() == "A-ASSOCIATE-AC"  # moved over
    reactor._wait_dul(dul, 0)  # consumes the wake-up its move caused
    return dul


def test_dul_wait_ends_when_the_peer_sends() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        dul = _dul(ours)
        _later(lambda: peer.sendall(b"\x04"))
        started = time.monotonic()
        reactor._wait_dul(dul, LONG)
        assert time.monotonic() - started < LONG / 2


def test_dul_wait_ends_when_a_pdu_is_queued_to_send() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        dul = _dul(ours)
        _later(lambda: dul.to_provider_queue.put("P-DATA"))
        started = time.monotonic()
        reactor._wait_dul(dul, LONG)
        assert time.monotonic() - started < LONG / 2
        # the wake-up was consumed: with nothing new, the next wait runs to its timeout
        dul.to_provider_queue.get_nowait()
        started = time.monotonic()
        reactor._wait_dul(dul, 0.05)
        assert time.monotonic() - started >= 0.05


def test_the_dul_thread_closes_its_wake_up_descriptor_when_its_reactor_returns() -> None:
    ours, peer = socket.socketpair()
    with ours, peer:
        dul = _dul(ours)
        wake_fd = dul.to_provider_queue.wake_fd
        os.fstat(wake_fd)  # open
        dul._target()  # the reactor loop returns
        assert dul.to_provider_queue.wake_fd == -1
        with pytest.raises(OSError):
            os.fstat(wake_fd)
        dul.to_provider_queue.put("late A-ABORT")  # queued by another thread: no error
        reactor._wait_dul(dul, 0.01)  # still waits on the socket


def test_dul_wait_sleeps_while_the_socket_is_not_connected() -> None:
    unconnected = socket.socket()  # select/poll call it readable at once
    with unconnected:
        dul = _Dul(unconnected, connected=False)
        started = time.monotonic()
        reactor._wait_dul(dul, 0.05)
        assert time.monotonic() - started >= 0.05


def _bulk_socket(sock: socket.socket) -> _BulkReceiveSocket:
    bulk = object.__new__(_BulkReceiveSocket)  # the state recv uses: the connected socket
    bulk.socket = sock
    return bulk


def test_bulk_recv_returns_exactly_the_bytes_asked_for() -> None:
    ours, peer = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one socket buffer
    with ours, peer:
        sender = threading.Thread(
            target=lambda: [
                peer.sendall(payload[i : i + 70_001]) for i in range(0, len(payload), 70_001)
            ]
        )
        sender.start()
        bulk = _bulk_socket(ours)
        assert bulk.recv(6) == payload[:6]
        assert bulk.recv(len(payload) - 6) == payload[6:]
        sender.join()


@pytest.mark.parametrize("sent", [0, 1000])
def test_bulk_recv_returns_what_arrived_when_the_peer_closes(sent: int) -> None:
    ours, peer = socket.socketpair()
    with ours:
        peer.sendall(b"x" * sent)
        peer.close()
        assert _bulk_socket(ours).recv(4096) == b"x" * sent


def test_bulk_recv_does_not_reserve_what_the_peer_only_announces() -> None:
    ours, peer = socket.socketpair()
    with ours:
        peer.sendall(b"y" * 10)
        peer.close()
        received = _bulk_socket(ours).recv(0xFFFFFFFF)  # a PDU length from a hostile header
        assert received == b"y" * 10


def test_bulk_recv_grows_past_its_first_buffer() -> None:
    ours, peer = socket.socketpair()
    payload = os.urandom(3 * _BulkReceiveSocket.FIRST_BUFFER + 5)
    with ours, peer:
        sender = threading.Thread(target=peer.sendall, args=(payload,))
        sender.start()
        assert _bulk_socket(ours).recv(len(payload)) == payload
        sender.join()
