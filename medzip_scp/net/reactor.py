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
their old latency. pynetdicom's code is not copied or changed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import sys
import threading
import time
import weakref
from types import CodeType, ModuleType
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider


class _WakingQueue(queue.Queue):
    """The DUL's queue of primitives to send; a put also wakes the DUL's socket wait."""

    def __init__(self, wake_fd: int) -> None:
        super().__init__()
        self._wake_fd = wake_fd

    def _put(self, item: Any) -> None:
        super()._put(item)
        with contextlib.suppress(OSError):  # closed: the association is over
            os.eventfd_write(self._wake_fd, 1)


def attach(dul: DULServiceProvider) -> None:
    """Give an association's DUL a send queue that wakes its reactor (acceptor side; an
    association without it still works, with the old latency for what it sends)."""
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    waking = _WakingQueue(wake_fd)
    while True:  # anything queued before (the A-ASSOCIATE response, say) moves over
        try:
            waking.put(dul.to_provider_queue.get_nowait())
        except queue.Empty:
            break
    dul.to_provider_queue = waking
    dul._medzip_wake_fd = wake_fd  # type: ignore[attr-defined]
    weakref.finalize(dul, os.close, wake_fd)


def _wait_association(reactor: Association, timeout: float) -> None:
    messages: queue.Queue = reactor.dimse.msg_queue
    with messages.not_empty:
        if not messages._qsize():
            messages.not_empty.wait(timeout)


def _wait_dul(dul: DULServiceProvider, timeout: float) -> None:
    wake_fd = getattr(dul, "_medzip_wake_fd", None)
    if dul.to_provider_queue.qsize():
        return
    sock = getattr(dul.socket, "socket", None)
    if sock is None:
        time.sleep(timeout)
        return
    pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted, not on the fd
    if pending is not None and pending():
        return
    watched = [sock] if wake_fd is None else [sock, wake_fd]
    try:
        ready, _, _ = select.select(watched, [], [], timeout)
    except (OSError, ValueError):  # socket closed meanwhile: let the loop find out
        return
    if wake_fd is not None and wake_fd in ready:
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
    targets: list[tuple[ModuleType, CodeType, type, Any]] = [
        (
            pynetdicom.association,
            Association._run_reactor.__code__,
            Association,
            _wait_association,
        ),
        (pynetdicom.dul, DULServiceProvider.run_reactor.__code__, DULServiceProvider, _wait_dul),
    ]
    for module, loop, owner, wait in targets:
        module.time = _ReactorTime(loop, owner, wait)  # type: ignore[attr-defined]
    _installed = True
