"""Running the node: its hold on the data folder, its processes and their supervision.

One node process accepts every association on the port and deals them to the others over
Unix socket pairs (see :class:`medzip_scp.net.server.DispatchingServer`). Only one node may
use a data folder at a time: a second is a mistake (a service started twice) and would
compress the same shards of the backlog as the first. Separate ``medzip worker`` processes
may run beside it: they take their own shards, and neither spool nor serve.
The other node processes end with the first, whatever ended it, and one that dies is
replaced.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer

from medzip_scp import metrics
from medzip_scp.archive import Archive
from medzip_scp.audit import configure_audit
from medzip_scp.config import NodeSettings, Settings, describe_storage_failure
from medzip_scp.net.monitoring import start_monitoring
from medzip_scp.net.server import DispatchingServer, describe_startup, start_server
from medzip_scp.pipeline.compress import run_worker

log = logging.getLogger(__name__)

LOCK_FILE = "node.lock"
READY = b"ready"  # a node process to the first, over its channel, once it serves
SUPERVISE_SECONDS = 0.5  # how often the first process looks for node processes that died
STOP_SECONDS = 60.0  # node processes finishing open associations, then they are killed
ABANDON_SECONDS = 0.5  # at stop, compression gets this long to finish before it is abandoned
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class NodeError(Exception):
    """The node cannot run; the message is one line for the user."""


def check_port(node: NodeSettings) -> None:
    """Bind the node's address and port and let them go again, as the node's listening
    socket will (with ``SO_REUSEADDR``, as pynetdicom binds): so a port in use, one this
    user may not bind or an address not on this machine fails before anything is created.

    Raises
    ------
    NodeError
        The address and port cannot be bound.
    """
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            node.bind, node.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise NodeError(
            f"cannot serve on {node.bind}:{node.port}: {exc.strerror or exc}; stop what uses "
            "it, or choose another port (--port, [node] port) or address ([node] bind)"
        ) from None


def hold_data_dir(data_dir: Path) -> int:
    """Hold ``data_dir`` for this node until the process ends (an exclusive ``flock`` on
    its lock file, which names our pid; the kernel releases it however the process ends),
    or until the descriptor returned is closed.

    Raises
    ------
    NodeError
        Another node holds the folder, or it cannot be created or written.
    """
    path = data_dir / LOCK_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        held = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise NodeError(
            f"cannot write {exc.filename or path}: {exc.strerror}; the data folder "
            f"{data_dir.resolve()} must be a folder this user can write: fix its owner or "
            "permissions, or give another --data-dir ([storage] data_dir)"
        ) from None
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(held, 32).decode(errors="replace").strip() or "unknown"
        os.close(held)
        raise NodeError(
            f"data folder {data_dir.resolve()} is in use by another medzip node (pid {holder});"
            " stop it first or give this one another --data-dir"
        ) from None
    os.ftruncate(held, 0)
    os.write(held, f"{os.getpid()}\n".encode())
    return held  # not inherited by child processes


def run_node(
    settings: Settings,
    say: Callable[[str], None],
    configure_logging: Callable[[str], None],
) -> None:
    """Run the node until SIGTERM or SIGINT, then stop taking associations and let every
    process finish its open ones. ``say`` prints the start-up lines (the last is "ready");
    ``configure_logging`` (importable, given the log level) sets up the other processes'
    logging as this one's.

    Raises
    ------
    NodeError
        The port cannot be bound (checked before anything is created), the data folder is
        in use or cannot be written, the archive cannot be opened, or a node process did
        not come up.
    """
    stop = threading.Event()
    # From the very start: a stop during start-up ends it and every process it began.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    check_port(settings.node)
    hold_data_dir(settings.storage.data_dir)
    try:
        archive = Archive.open(settings)
    except Exception as exc:
        message = describe_storage_failure(settings, exc)
        if message is None:
            raise
        raise NodeError(message) from None
    if settings.monitoring.port is not None:  # before any process counts anything
        metrics.prepare_folder(settings.storage.data_dir / "run" / "metrics")
    observe_process(settings, first=True)
    # Blobs a crash left unindexed (the newest only once no process can still commit them)
    archive.finish_deletions()  # what a crash left of a study deletion
    threading.Thread(target=archive.remove_orphan_blobs, name="medzip-orphans", daemon=True).start()
    processes = NodeProcesses(settings, archive, configure_logging)
    node = settings.node
    try:
        # This process binds the port first, so a port in use fails before any other
        # process exists; connections handed to a process still starting wait in its
        # socket pair.
        server = start_server(archive, dispatch_to=processes.channels)
    except OSError as exc:
        processes.close_channels()
        raise NodeError(f"cannot serve on {node.bind}:{node.port}: {exc.strerror or exc}") from None
    try:
        monitor = start_monitoring(archive)
    except OSError as exc:
        server.shutdown()
        processes.close_channels()
        where = f"{settings.monitoring.bind}:{settings.monitoring.port}"
        raise NodeError(f"cannot serve monitoring on {where}: {exc.strerror or exc}") from None
    compressing = None
    try:
        failed = processes.start(stop)
        if failed is not None:
            raise NodeError(f"cannot serve on {node.bind}:{node.port}: {failed}")
        if stop.is_set():
            return
        compressing = start_compression(archive, stop, number=0)
        start_verification_sweeps(archive, stop)
        for line in describe_startup(archive):
            say(line)
        say(
            "background compression: "
            + ("on (originals replaced only after a bit-exact decode)" if compressing else "off")
        )
        if monitor is not None:
            host, port = monitor.server_address[:2]
            say(f"monitoring: http://{host}:{port}/metrics, /healthz, /readyz")
            monitor.serving.set()
        say("ready; Ctrl-C to stop")
        if isinstance(server, DispatchingServer):
            processes.supervise(stop, server)
        else:
            stop.wait()
        say("stopping: finishing open associations")
    finally:
        # Stop taking associations first (this also closes the other processes' socket
        # pairs), so none is handed to a process that is stopping; then each finishes its
        # own.
        server.shutdown()
        processes.stop()
        if monitor is not None:
            monitor.shutdown()
    _end_unless_compressing(compressing, server)


def observe_process(settings: Settings, first: bool) -> None:
    """Count (``[monitoring] port``) and audit (``[audit]``) in this node process; the
    ``first`` rotates the audit file, the others follow its rotations."""
    if settings.monitoring.port is not None:
        metrics.enable()
    audit = settings.audit
    if audit.enabled:
        file = audit.resolved_file(settings.storage.data_dir)
        configure_audit(file, audit.max_bytes, audit.backups, rotates=first)


class NodeProcesses:
    """Node processes 2 to ``[node] processes``: process ``number`` serves the associations
    the first process deals it over its channel and compresses its share of the backlog."""

    def __init__(
        self, settings: Settings, archive: Archive, configure_logging: Callable[[str], None]
    ) -> None:
        self._settings = settings
        self._archive = archive
        self._configure_logging = configure_logging
        self._spawn = multiprocessing.get_context("spawn")
        pairs = [_socket_pair() for _ in range(1, settings.node.processes)]
        self.channels = [ours for ours, _theirs in pairs]  # the first process's ends
        self._theirs: list[socket.socket | None] = [theirs for _ours, theirs in pairs]
        self._processes: list[BaseProcess | None] = [None] * len(pairs)

    def start(self, stop: threading.Event) -> str | None:
        """Start every process and wait until each serves (or ``stop`` is set); a reason
        when one exited instead."""
        for number in range(1, len(self._processes) + 1):
            if stop.is_set():
                return None
            theirs = self._theirs[number - 1]
            assert theirs is not None
            self._processes[number - 1] = self._launch(number, theirs)
            self._theirs[number - 1] = None
        for number, process in enumerate(self._processes, 1):
            assert process is not None
            if not self._await_ready(process, self.channels[number - 1], stop):
                if stop.is_set():
                    return None
                return f"node process {process.name} exited ({process.exitcode})"
        return None

    def supervise(self, stop: threading.Event, server: DispatchingServer) -> None:
        """Until ``stop`` is set: replace a process that died with a new one on a new
        channel (its turns are served by this process meanwhile); one whose replacement
        does not come up stays served here."""
        while not stop.wait(SUPERVISE_SECONDS):
            for number, process in enumerate(self._processes, 1):
                if process is None or process.is_alive():
                    continue
                log.error(
                    "node process %s exited (%s); starting a new one",
                    process.name,
                    process.exitcode,
                )
                server.replace_channel(number, None)
                ours, theirs = _socket_pair()
                replacement = self._launch(number, theirs)
                self._processes[number - 1] = replacement
                if self._await_ready(replacement, ours, stop):
                    server.replace_channel(number, ours)
                    log.info("node process %s replaced: serving its share again", process.name)
                    continue
                ours.close()
                if not replacement.is_alive():
                    self._processes[number - 1] = None
                    log.error(
                        "the new node process %s exited (%s); its share is served by the"
                        " first process",
                        process.name,
                        replacement.exitcode,
                    )

    def stop(self) -> None:
        """Ask every process to stop, give them :data:`STOP_SECONDS` to finish their open
        associations, then kill what is left."""
        running = [p for p in self._processes if p is not None and p.is_alive()]
        for process in running:
            process.terminate()
        for process in running:
            process.join(STOP_SECONDS)
            if process.is_alive():
                log.error("node process %s did not stop; killing it", process.name)
                process.kill()
                process.join()
        self.close_channels()

    def close_channels(self) -> None:
        for channel in [*self.channels, *self._theirs]:
            if channel is not None:
                channel.close()

    def _launch(self, number: int, theirs: socket.socket) -> BaseProcess:
        # Started from the main thread: the kernel's parent-death signal follows the thread
        # that started a process, and the main thread lasts as long as this process.
        process = self._spawn.Process(
            target=_serve_forwarded,
            args=(
                self._settings,
                self._archive.store_activity,
                theirs,
                os.getpid(),
                number,
                self._configure_logging,
            ),
            name=f"medzip-node-{number}",
        )
        process.start()
        theirs.close()  # the process holds its own copy
        return process

    @staticmethod
    def _await_ready(process: BaseProcess, ours: socket.socket, stop: threading.Event) -> bool:
        """True once ``process`` says it serves; False if it exited first or stop is set."""
        while not stop.is_set():
            ready = wait([ours, process.sentinel], timeout=0.2)
            if ours in ready:
                try:
                    return ours.recv(len(READY)) == READY  # b"": it exited
                except OSError:
                    return False
            if ready:
                return False
        return False


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def start_compression(
    archive: Archive, stop: threading.Event, number: int
) -> threading.Thread | None:
    """Node process ``number`` compresses its share of the backlog (``[pipeline] compress``)
    in a background thread until ``stop`` is set; ``None`` when compression is off. The
    thread is not waited for at exit (see :func:`_end_unless_compressing`)."""
    settings = archive.settings
    if not settings.pipeline.compress:
        return None
    worker = threading.Thread(
        target=run_worker,
        args=(archive, archive.compressing_codec(), stop, settings.pipeline.poll_seconds),
        kwargs={"shard": (number, settings.node.processes)},
        name="medzip-compress",
        daemon=True,
    )
    worker.start()
    return worker


def start_verification_sweeps(archive: Archive, stop: threading.Event) -> None:
    """The first node process verifies every instance each ``[identity] sweep_hours``."""
    from medzip_scp.pipeline.verify import run_sweeps

    hours = archive.settings.identity.sweep_hours
    if hours:
        threading.Thread(
            target=run_sweeps, args=(archive, stop, hours), name="medzip-sweep", daemon=True
        ).start()


def _end_unless_compressing(
    compressing: threading.Thread | None, server: ThreadedAssociationServer
) -> None:
    """Let the open associations finish (for at most :data:`STOP_SECONDS`: pynetdicom's
    association threads are daemons, which the interpreter's exit would cut off), then
    return, for the usual exit, unless ``compressing`` is inside an encode: then end the
    process at once. Python's exit would wait for the encode's native code or crash in it
    (a torch operation running while the interpreter is torn down aborts the process).
    Abandoning the encode is safe: a blob is indexed only once it is durable, so the
    original stays indexed."""
    deadline = time.monotonic() + STOP_SECONDS
    for association in server.ae.active_associations:
        association.join(max(0.0, deadline - time.monotonic()))
    if compressing is None:
        return
    compressing.join(ABANDON_SECONDS)  # between two instances it ends at once
    if not compressing.is_alive():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _end_with_parent(parent_pid: int) -> bool:
    """Have the kernel send this process SIGTERM when its parent ends (Linux); False when
    the parent has already gone (before this could be asked)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    return os.getppid() == parent_pid


def _serve_forwarded(
    settings: Settings,
    store_activity: ctypes.c_double,
    channel: socket.socket,
    parent_pid: int,
    number: int,
    configure_logging: Callable[[str], None],
) -> None:
    """Node process ``number``: serves the associations the first process passes over
    ``channel`` (and says so on it), compresses its share of the backlog while no C-STORE
    arrives, and stops on SIGTERM, when the first process ends, or when it closes the
    channel."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first process decides when to stop
    if not _end_with_parent(parent_pid):
        return
    configure_logging(settings.log_level)
    observe_process(settings, first=False)
    archive = Archive.open(settings, migrate=False)
    if stop.is_set():  # stopped (or orphaned) while opening: serve nothing, end now
        return
    archive.store_activity = store_activity
    server = start_server(archive, forwarded=(channel, stop.set))
    try:
        channel.send(READY)
    except OSError:  # the first process has gone before hearing from us
        stop.set()
    compressing = start_compression(archive, stop, number)
    stop.wait()
    server.shutdown()
    _end_unless_compressing(compressing, server)
