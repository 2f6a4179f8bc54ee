"""Wake pynetdicom's polling loops when there is work, instead of after a fixed 1 ms sleep.

Each pynetdicom association runs two threads that poll. The DUL reactor (socket in, PDUs
out) sleeps 1 ms after a turn that found nothing to do; the association reactor sleeps 1 ms
before every look at its queue of decoded DIMSE messages. A C-STORE crosses these loops
three times (request decoded, request served, response sent), so at one association a peer
waited about 1.5 ms per instance for nothing, and with many associations the idle wake-ups
cost CPU the C-STOREs needed.

:func:`install` swaps the ``time`` module those two pynetdicom modules see for a shim whose
``sleep``, when called by one of the two reactor loops, waits on the loop's own events with
the same timeout: the association reactor on its DIMSE queue, the DUL reactor on its socket
and on the queue of PDUs to send. Every other ``sleep`` in those modules sleeps as before,
and each loop still turns at least once per timeout, so release, abort and timer checks keep
their old latency. pynetdicom's code is neither copied nor edited.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from types import CodeType
from typing import Any

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from medzip_scp.net import pynetdicom_internals


class _WakingQueue(queue.Queue):
    """The DUL's queue of primitives to send; a put also wakes the DUL's socket wait."""

    def __init__(self, wake_fd: int) -> None:
        super().__init__()
        self.wake_fd = wake_fd  # -1 once closed; read and changed under ``self.mutex``

    def _put(self, item: Any) -> None:  # called with self.mutex held
        super()._put(item)
        if self.wake_fd >= 0:
            os.eventfd_write(self.wake_fd, 1)

    def close_wake_fd(self) -> None:
        with self.mutex:
            fd, self.wake_fd = self.wake_fd, -1
        if fd >= 0:
            os.close(fd)


def attach(dul: DULServiceProvider) -> None:
    """Give an association's DUL, before its thread starts, a send queue that wakes its
    reactor (acceptor side; an association without it still works, with the old latency
    for what it sends). The wake-up descriptor is closed by the DUL thread itself when its
    reactor returns, so no wait can use it after it is closed."""
    waking = _WakingQueue(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    pynetdicom_internals.replace_send_queue(dul, waking)

    def run_reactor_then_close(reactor_loop: Callable[[], None]) -> None:
        try:
            reactor_loop()
        finally:
            waking.close_wake_fd()

    pynetdicom_internals.wrap_dul_thread(dul, run_reactor_then_close)


def _wait_association(reactor: Association, timeout: float) -> None:
    messages: queue.Queue = reactor.dimse.msg_queue
    with messages.not_empty:
        if not messages._qsize():
            messages.not_empty.wait(timeout)


def _wait_dul(dul: DULServiceProvider, timeout: float) -> None:
    if dul.to_provider_queue.qsize():
        return
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    if sock is None or not pynetdicom_internals.is_connected(transport):
        # Not connected yet (a C-MOVE sub-association) or closed: nothing to wait on.
        time.sleep(timeout)
        return
    pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted, not on the fd
    if pending is not None and pending():
        return
    waking = dul.to_provider_queue
    wake_fd = waking.wake_fd if isinstance(waking, _WakingQueue) else -1
    poller = select.poll()  # not select(): no limit on descriptor numbers
    try:
        poller.register(sock, select.POLLIN)
        if wake_fd >= 0:
            poller.register(wake_fd, select.POLLIN)
        events = poller.poll(timeout * 1000)
    except (OSError, ValueError):  # socket closed meanwhile
        time.sleep(timeout)
        return
    if wake_fd >= 0 and any(fd == wake_fd for fd, _ in events):
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(wake_fd)


class _ReactorTime:
    """Stands in for the ``time`` module inside one pynetdicom module."""

    def __init__(self, loop: CodeType, owner: type, wait: Any) -> None:
        self._loop = loop
        self._owner = owner
        self._wait = wait

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if sys._getframe(1).f_code is self._loop and isinstance(thread, self._owner):
            self._wait(thread, seconds)
        else:
            time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


_installed = False


def install() -> None:
    """Put the event waits in place (idempotent; process-wide, like pynetdicom's _config)."""
    global _installed
    if _installed:
        return
    (association_loop, association), (dul_loop, dul) = pynetdicom_internals.reactor_loops()
    pynetdicom_internals.replace_reactor_time(
        _ReactorTime(association_loop, association, _wait_association),
        _ReactorTime(dul_loop, dul, _wait_dul),
    )
    _installed = True
