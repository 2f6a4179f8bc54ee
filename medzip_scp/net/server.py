"""Building and running the node's Application Entity: the one place handlers are wired."""

from __future__ import annotations

import collections
import contextlib
import copy
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pydicom.config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from medzip_scp.archive import Archive
from medzip_scp.config import Settings, TLSSettings
from medzip_scp.net import pynetdicom_internals, reactor
from medzip_scp.net.access import AccessPolicy
from medzip_scp.net.commitment import handle_commitment_request
from medzip_scp.net.handlers import (
    QR_CLASSES,
    StoredObject,
    handle_echo,
    handle_find,
    handle_get,
    handle_move,
    handle_requested,
    handle_sop_extended,
    handle_store,
)
from medzip_scp.net.observed import observed
from medzip_scp.net.status import Status

log = logging.getLogger(__name__)


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings the node depends on, once its internals are
    checked (:func:`~medzip_scp.net.pynetdicom_internals.check_internals`)."""
    pynetdicom_internals.check_internals()
    # Large objects are spooled to disk while they arrive, never held whole in memory.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # Retrieval sends a stored object from its (in-memory) file, as it was received.
    _config.STORE_SEND_CHUNKED_DATASET = True
    pynetdicom_internals.convert_sent_datasets(_path_of_stored_object)
    # pynetdicom would otherwise log every query identifier: names, IDs, birth dates.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pydicom's validation warnings quote element values (names, IDs) verbatim.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    # Values read are stored as received whatever they hold, and the warnings of their
    # validation are dropped above; skip it (a regular expression per value, 0.2 ms of a
    # CT slice's C-STORE).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pynetdicom_internals.replace_context_copy(_copy_contexts)
    pynetdicom_internals.replace_spool_file(_SpoolFile)


def _path_of_stored_object(dataset: Any) -> Any:
    """What ``send_c_store`` sends: pynetdicom's C-GET/C-MOVE services accept only data
    sets from a handler, though ``send_c_store`` itself sends from a file path; a
    :class:`StoredObject` (a data set naming a file) is sent from its file."""
    return dataset.path if isinstance(dataset, StoredObject) else dataset


def build_ae(archive: Archive, processes: int = 1) -> AE:
    """An AE accepting every storage SOP class in every syntax, Q/R, Storage Commitment and
    Verification; one of
    ``processes`` node processes, so it takes its share of ``max_associations``."""
    settings = archive.settings
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.node.max_pdu
    ae.maximum_associations = math.ceil(settings.node.max_associations / processes)
    ae.network_timeout = settings.node.network_timeout
    # The ARTIM timer and the acceptor's wait for an A-ASSOCIATE-RQ (and, as requestor of
    # C-MOVE sub-associations, the wait for the destination's answer).
    ae.acse_timeout = settings.node.association_request_timeout
    ae.dimse_timeout = settings.node.dimse_timeout
    ae.require_called_aet = settings.access.check_called_ae
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for uid in pynetdicom_internals.storage_sop_classes():
        # SCP role for C-STORE, and SCU role for C-GET sub-operations on the same contexts.
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for uid in QR_CLASSES:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    # SCP role: the node may also send its N-EVENT-REPORT on a peer's association
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    # Contexts proposed for C-MOVE sub-associations are built per request.
    return ae


class _SpoolFile:
    """Stands in for the ``NamedTemporaryFile`` pynetdicom spools an incoming C-STORE data
    set to (``_config.STORE_RECV_CHUNKED_DATASET``). There, the first write to a full (or
    failing) volume raised in the DUL's thread and aborted the association; here it
    removes the partial file, the rest of the data set is read and dropped, and
    :func:`_store_unless_spool_failed` answers the C-STORE 0xA700 (Out of resources): the
    association goes on."""

    def __init__(self, **kwargs: Any) -> None:
        self.error: OSError | None = None
        self._file: Any = None
        self.name = ""  # no file: pynetdicom's unlink of "" fails, and is ignored
        try:
            # Closed by pynetdicom's C-STORE service, through close() below.
            self._file = tempfile.NamedTemporaryFile(**kwargs)  # noqa: SIM115
            self.name = self._file.name
        except OSError as exc:
            self._fail(exc)

    @property
    def file(self) -> _SpoolFile:
        return self  # pynetdicom flushes ``.file``: the buffered file of a NamedTemporaryFile

    def write(self, data: bytes) -> int:
        if self.error is None:
            try:
                return cast(int, self._file.write(data))
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")

    def _call(self, method: str) -> None:
        if self.error is None:
            try:
                getattr(self._file, method)()
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.name)


def _store_unless_spool_failed(event: evt.Event, archive: Archive, policy: AccessPolicy) -> int:
    """C-STORE: 0xA700 (Out of resources) if the data set could not be spooled, else
    :func:`handle_store`."""
    spool = pynetdicom_internals.spool_file_of(event.request)
    if isinstance(spool, _SpoolFile) and spool.error is not None:
        log.error(
            "C-STORE of %s from %r refused: its data set could not be spooled (%s)",
            event.request.AffectedSOPInstanceUID,
            event.assoc.requestor.ae_title,
            spool.error.strerror,
        )
        return Status.OUT_OF_RESOURCES
    return handle_store(event, archive, policy)


def event_handlers(archive: Archive) -> list[tuple]:
    policy = AccessPolicy(archive.settings.access, archive.settings.node.ae_title)
    return observed(
        [
            (evt.EVT_REQUESTED, handle_requested, [policy]),
            (evt.EVT_SOP_EXTENDED, handle_sop_extended),
            (evt.EVT_C_ECHO, handle_echo, [policy]),
            (evt.EVT_C_STORE, _store_unless_spool_failed, [archive, policy]),
            (evt.EVT_C_FIND, handle_find, [archive, policy]),
            (evt.EVT_C_GET, handle_get, [archive, policy]),
            (evt.EVT_C_MOVE, handle_move, [archive, policy]),
            (evt.EVT_N_ACTION, handle_commitment_request, [archive, policy]),
        ]
    )


def tls_context(tls: TLSSettings) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    if tls.certificate is None or tls.private_key is None:
        raise ValueError("tls.enabled needs tls.certificate and tls.private_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    password = tls.private_key_password.get_secret_value() if tls.private_key_password else None
    context.load_cert_chain(str(tls.certificate), str(tls.private_key), password=password)
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    if tls.require_client_certificate:
        if tls.ca_certificates is None:
            raise ValueError("tls.require_client_certificate needs tls.ca_certificates")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


#: The longest PDU a connection may send before its association is established (its
#: A-ASSOCIATE-RQ), and the longest PDU other than a P-DATA-TF after: 128 presentation
#: contexts, each proposing all 45 transfer syntaxes pynetdicom knows, encode to 158 KB.
ASSOCIATION_REQUEST_LIMIT = 256 * 1024
_PDU_HEADER = struct.Struct(">BxL")  # PDU type, reserved, length of what follows
_PDU_TYPES = range(0x01, 0x08)  # A-ASSOCIATE-RQ ... A-ABORT
_A_ASSOCIATE_RQ = b"\x01"
_P_DATA_TF = 0x04


class _BulkReceiveSocket(AssociationSocket):
    """pynetdicom's association socket, reading what a peer may send within limits.

    Its own ``recv`` reads 4096 bytes a call into a growing bytearray (130 calls and copies
    for one 519 KiB CT slice); this one reads a PDU in as few calls as the kernel allows.
    The buffer starts at no more than :data:`FIRST_BUFFER` and doubles as data arrive: the
    length comes from the peer, and a 4 GiB PDU header must not reserve 4 GiB before a byte
    of it has arrived.

    Once :meth:`guard` has been called, :meth:`read_pdu` stands in for the DUL's reading of
    a PDU. A connection must send its whole A-ASSOCIATE-RQ within the association's ACSE
    timeout (the ARTIM timer) and it may be at most :data:`ASSOCIATION_REQUEST_LIMIT`
    long; after that, a P-DATA-TF may be as long as our maximum PDU length (plus its
    header). A longer PDU, or one of an unknown type, is refused unread: the state machine
    sends an A-ABORT and the connection is closed. A peer that stalls in the middle of a
    PDU for the network timeout, or leaves a PDU of ours unread that long, is dropped.
    """

    FIRST_BUFFER = 1 << 20

    # Defaults, also for a socket read without guard() (which read_pdu needs).
    _pushed_back: memoryview | None = None  # a PDU read by read_pdu, for pynetdicom's recv
    _refused = False  # a PDU was refused: nothing more is read, the connection closes
    _awaiting_request = True  # the acceptor's thread waits for an A-ASSOCIATE-RQ

    def guard(self) -> None:
        """Apply the limits from now on: the connection's time to send its A-ASSOCIATE-RQ
        starts now."""
        assoc = self.assoc
        self._network_timeout = cast(float, assoc.network_timeout)
        self._request_deadline = time.monotonic() + cast(float, assoc.acse_timeout)
        maximum = assoc.acceptor.maximum_length
        self._p_data_limit = maximum + _PDU_HEADER.size if maximum else None
        cast(socket.socket, self.socket).settimeout(self._network_timeout)  # sends too

    @property
    def ready(self) -> bool:
        # Once a PDU is refused nothing more is read: in Sta13 the DUL then closes.
        return not self._refused and cast(bool, AssociationSocket.ready.fget(self))

    def recv(self, nr_bytes: int) -> bytearray:
        if self._pushed_back is None:
            return self._receive(bytearray(), nr_bytes, None)
        part, rest = self._pushed_back[:nr_bytes], self._pushed_back[nr_bytes:]
        self._pushed_back = rest if rest else None
        return part  # type: ignore[return-value]  # pynetdicom appends it to a bytearray

    def read_pdu(self, decode: Callable[[], None]) -> None:
        """Read the next PDU within the limits, then have ``decode`` (the DUL's own
        ``_read_pdu_data``) take it from :meth:`recv` as if from the network."""
        state = pynetdicom_internals.dul_state(self.assoc.dul)
        deadline = self._request_deadline if self._awaiting_request else None
        length = 0
        try:
            pdu = self._receive(bytearray(), _PDU_HEADER.size, deadline)
            if len(pdu) == _PDU_HEADER.size:
                pdu_type, length = _PDU_HEADER.unpack(pdu)
                limit = self._limit(state, pdu_type)
                if pdu_type not in _PDU_TYPES or (limit is not None and length > limit):
                    self._refuse(state, pdu_type, length, limit)
                    return
                self._receive(pdu, length, deadline)
        except TimeoutError:
            log.warning(
                "closing the connection from %s: %s",
                self.assoc.requestor.address,
                f"no complete A-ASSOCIATE-RQ within {self.assoc.acse_timeout:g} s"
                if deadline is not None
                else f"stalled {self._network_timeout:g} s in the middle of a PDU",
            )
            self._close_and_end_request_wait()
            return
        except OSError as exc:
            log.info("connection from %s failed: %s", self.assoc.requestor.address, exc)
            self._close_and_end_request_wait()
            return
        finally:
            if deadline is not None and self.socket is not None:
                self.socket.settimeout(self._network_timeout)
        if pdu[:1] == _A_ASSOCIATE_RQ and len(pdu) == _PDU_HEADER.size + length:
            self._awaiting_request = False
        self._pushed_back = memoryview(pdu)
        decode()  # a short PDU (the peer closed) ends the connection there, as before
        self._end_request_wait()  # unless the request arrived: nothing to wait for

    def _limit(self, state: str, pdu_type: int) -> int | None:
        if pdu_type == _P_DATA_TF and pynetdicom_internals.in_data_transfer(state):
            return self._p_data_limit
        return ASSOCIATION_REQUEST_LIMIT

    def _refuse(self, state: str, pdu_type: int, length: int, limit: int | None) -> None:
        log.warning(
            "aborting the association with %s: %s",
            self.assoc.requestor.address,
            f"PDU type 0x{pdu_type:02X} is not a DICOM PDU type"
            if pdu_type not in _PDU_TYPES
            else f"a PDU of type 0x{pdu_type:02X} declares {length} bytes, more than the "
            f"{limit} accepted "
            f"{'after' if pynetdicom_internals.in_data_transfer(state) else 'before'} "
            "association",
        )
        self._refused = True
        pynetdicom_internals.abort_invalid_pdu(self.assoc.dul)
        self._end_request_wait()

    def _close_and_end_request_wait(self) -> None:
        self.close()  # the state machine gets its transport-closed event from close()
        self._end_request_wait()

    def _end_request_wait(self) -> None:
        """Before its A-ASSOCIATE-RQ has arrived, the acceptor's thread waits for it, up
        to its ACSE timeout; once the connection is over it will not come: ``None`` ends
        that wait, as the timeout would."""
        if self._awaiting_request:
            self._awaiting_request = False
            pynetdicom_internals.end_association_request_wait(self.assoc.dul)

    def _receive(self, received: bytearray, nr_bytes: int, deadline: float | None) -> bytearray:
        """Append ``nr_bytes`` from the peer to ``received`` (fewer if the peer closes);
        :class:`TimeoutError` once ``deadline`` (``time.monotonic``) has passed, or when
        the peer stalls for the network timeout."""
        sock = cast(socket.socket, self.socket)
        filled = len(received)
        end = filled + nr_bytes
        received.extend(bytes(min(nr_bytes, self.FIRST_BUFFER)))
        while filled < end:
            if filled == len(received):
                received.extend(bytes(min(len(received), end - filled)))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(min(left, self._network_timeout))
            with memoryview(received) as view:
                count = sock.recv_into(view[filled:end])
            if not count:  # connection closed: what arrived, as pynetdicom's own recv does
                break
            filled += count
        del received[filled:]
        return received


def _copy_contexts(contexts: Any, memo: Any = None) -> Any:
    """``copy.deepcopy`` for pynetdicom's transport module, which deep-copies the server's
    presentation contexts for every association: for this node's (every storage SOP class
    in every syntax) that cost 0.1 s of CPU per association. The contexts hold only
    immutable values (UIDs are strings) and lists of them, so copying the contexts and
    their lists gives the same independent copy. Anything else is deep-copied as before."""
    if not isinstance(contexts, list) or not all(
        type(cx) is PresentationContext for cx in contexts
    ):
        return copy.deepcopy(contexts, memo)
    copies = []
    for cx in contexts:
        twin = PresentationContext.__new__(PresentationContext)
        twin.__dict__.update(
            {k: list(v) if isinstance(v, list) else v for k, v in vars(cx).items()}
        )
        copies.append(twin)
    return copies


def _accept(listening: socket.socket) -> tuple[socket.socket, Any]:
    """Accept a connection, with Nagle's algorithm off: a DIMSE response is one small
    write after the peer's last fragment, and waiting for its ACK cost about 45 ms per
    C-GET sub-operation on loopback (30 retrieved in 1.55 s, 0.43 s without the wait)."""
    client, address = listening.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, address


def _prepare_association(handler: RequestHandler, assoc: Association) -> None:
    """An acceptor association, before its thread starts: bulk and guarded reads, reactor
    wake-ups, and its connection counted until the thread has started."""
    dul = assoc.dul
    # Same state, faster and guarded reads.
    sock = pynetdicom_internals.swap_socket_class(dul, _BulkReceiveSocket)
    sock.guard()
    pynetdicom_internals.intercept_pdu_reads(dul, sock.read_pdu)
    reactor.attach(dul)
    server = cast(NodeServer, handler.server)
    host = handler.client_address[0]
    pynetdicom_internals.wrap_association_start(
        assoc, lambda start: server.start_counted(start, host)
    )


_NodeRequestHandler = pynetdicom_internals.request_handler_class(_prepare_association)


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved from the accepting thread
    (where one silent client would stop every other from connecting) to the association's
    own thread, under the network timeout; and at most ``max_per_address`` open
    connections from one remote address: more are closed as they are accepted, before a
    thread is started for them, so that no one address can take every association."""

    # socketserver's default backlog of 5 overflowed under a burst of connections (those
    # of one hostile peer, say): the next peer's SYN was dropped and retried a second later.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, *args: Any, max_per_address: int, **kwargs: Any) -> None:
        self.max_per_address = max_per_address
        # Connections accepted whose thread has not started their association yet (from
        # then on, the association's thread counts).
        self._starting: collections.Counter[str] = collections.Counter()
        self._starting_lock = threading.Lock()
        self._counted = threading.local()  # per connection thread: start_counted ran
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        host = client_address[0]
        with self._starting_lock:
            open_now = self._starting[host] + sum(
                1 for assoc in self.active_associations if assoc.requestor.address == host
            )
            if open_now >= self.max_per_address:
                log.warning(
                    "closed a connection from %s: %d already open from that address "
                    "([node] max_associations_per_address)",
                    host,
                    open_now,
                )
                self.shutdown_request(request)
                return
            self._starting[host] += 1
        try:
            super().process_request(request, client_address)  # starts its thread
        except BaseException:
            self._started(host)
            raise

    def start_counted(self, start: Callable[[], None], host: str) -> None:
        """Start an association's thread and stop counting its connection as starting, in
        one step: in between, the connection was counted twice (a second peer from the
        address was refused at a cap of 2) or, the other way round, not at all."""
        with self._starting_lock:
            start()
            self._uncount(host)
        self._counted.done = True

    def _started(self, host: str) -> None:
        if getattr(self._counted, "done", False):  # start_counted has uncounted it
            self._counted.done = False
            return
        with self._starting_lock:
            self._uncount(host)

    def _uncount(self, host: str) -> None:
        self._starting[host] -= 1
        if not self._starting[host]:
            del self._starting[host]

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = _accept(self.socket)
        return self._wrap(client), address

    def _wrap(self, client: socket.socket) -> socket.socket:
        if not self.ssl_context:
            return client
        return self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.ae.network_timeout)
                    request.do_handshake()
                    request.settimeout(None)
                except OSError as exc:  # ssl.SSLError, timeouts, resets
                    log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._started(client_address[0])  # its association's thread, if any, now counts


class DispatchingServer(NodeServer):
    """The first node process's server when there are several: it accepts every connection
    on the port and deals them round-robin to itself and to the other node processes
    (passing the connected socket over a Unix socket pair), so that N concurrent
    associations use N processes and their cores. (With ``SO_REUSEPORT`` the kernel hashes
    connections to processes: 4 associations on 2 processes landed 4/0 or 3/1 five times in
    eight.) TLS is set up by the process that serves the association. A process's turn
    without a channel (it stopped, or its replacement is starting) is served here."""

    HAND_OVER_TIMEOUT = 10.0

    def __init__(self, *args: Any, channels: list[socket.socket], **kwargs: Any) -> None:
        self._channels: list[socket.socket | None] = []
        self._channels_lock = threading.Lock()  # the acceptor hands over, the supervisor swaps
        for channel in channels:
            channel.settimeout(self.HAND_OVER_TIMEOUT)
            self._channels.append(channel)
        self._turn = 0
        super().__init__(*args, **kwargs)

    def replace_channel(self, number: int, channel: socket.socket | None) -> None:
        """Deal the turn of node process ``number`` (1 for the second process) over
        ``channel`` from now on, or serve it here (``None``); closes the channel it had."""
        if channel is not None:
            channel.settimeout(self.HAND_OVER_TIMEOUT)
        with self._channels_lock:
            old, self._channels[number - 1] = self._channels[number - 1], channel
        if old is not None:
            old.close()

    def get_request(self) -> tuple[socket.socket, Any]:
        return _accept(self.socket)  # wrapped for TLS only where it is served

    def process_request(self, request: Any, client_address: Any) -> None:
        self._turn = (self._turn + 1) % (len(self._channels) + 1)
        if self._turn and self._hand_over(self._turn, request, client_address):
            return
        super().process_request(self._wrap(request), client_address)

    def _hand_over(self, number: int, request: socket.socket, address: Any) -> bool:
        with self._channels_lock:
            channel = self._channels[number - 1]
            if channel is None:
                return False
            try:
                socket.send_fds(channel, [json.dumps(list(address)).encode()], [request.fileno()])
            except TimeoutError:
                log.warning("a node process is not taking associations; serving this one here")
                return False
            except OSError:
                log.error("a node process stopped; serving its share of associations here")
                self._channels[number - 1] = None
                channel.close()
                return False
        request.close()  # our descriptor only: the other process now owns the connection
        return True

    def server_close(self) -> None:
        super().server_close()
        with self._channels_lock:
            for channel in self._channels:
                if channel is not None:
                    channel.close()


class ForwardedServer(NodeServer):
    """Another node process's server: serves the connections the :class:`DispatchingServer`
    passes to it over ``channel``; calls ``on_closed`` when the dispatcher is gone."""

    def __init__(
        self, *args: Any, channel: socket.socket, on_closed: Callable[[], None], **kwargs: Any
    ) -> None:
        self._channel = channel
        self._on_closed = on_closed
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        self.socket.close()  # the TCP socket made by TCPServer: this server listens on nothing
        self.socket = self._channel

    def server_activate(self) -> None:
        pass

    def get_request(self) -> tuple[socket.socket, Any]:
        message, fds, flags, _addr = socket.recv_fds(self._channel, 1024, 1)
        if not message and not fds:  # end of stream: the dispatching process is gone
            self._on_closed()
            raise OSError("the dispatching node process closed the channel")
        if not fds:  # e.g. out of file descriptors: the kernel dropped the socket
            log.error("an association handed to this process was lost (flags %#x)", flags)
            raise OSError("no socket in the hand-over message")
        client = socket.socket(fileno=fds[0])
        return self._wrap(client), tuple(json.loads(message))


_held_spools: dict[Path, int] = {}  # spool folder -> the descriptor holding its lock


def claim_spool(incoming: Path) -> Path:
    """This process's spool folder ``incoming/<pid>``, locked (``flock``) for the life of
    the process; first removes the folders of processes that are gone, with the partial
    transfers in them (never acknowledged, so safe to drop). A folder whose process lives,
    of this node or of another on the same data folder, is never touched."""
    spool = incoming / str(os.getpid())
    if spool in _held_spools:  # a second server in this process (tests)
        return spool
    incoming.mkdir(parents=True, exist_ok=True)
    for folder in incoming.iterdir():
        _remove_if_abandoned(folder)
    while True:
        spool.mkdir(exist_ok=True)
        try:
            held = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # another process removed it as abandoned: make it again
            continue
        fcntl.flock(held, fcntl.LOCK_EX)  # waits only while another process removes it
        if _same_file(held, spool):
            _held_spools[spool] = held
            return spool
        os.close(held)


def _remove_if_abandoned(folder: Path) -> None:
    try:
        held = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # its process is alive
        os.close(held)
        return
    try:
        if _same_file(held, folder):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed the spool folder %s of a process that is gone", folder.name)
    finally:
        os.close(held)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def start_server(
    archive: Archive,
    dispatch_to: list[socket.socket] | None = None,
    forwarded: tuple[socket.socket, Callable[[], None]] | None = None,
) -> ThreadedAssociationServer:
    """Start serving in a background thread and return the running server.

    Parameters
    ----------
    dispatch_to
        The first of several node processes: listen on the port and deal connections
        round-robin to this process and over these channels.
    forwarded
        Another node process: serve the connections arriving on this channel; the callable
        is called when the channel closes.
    """
    configure_pynetdicom()
    reactor.install()
    # pynetdicom spools incoming data sets with tempfile: keep them on the archive's volume,
    # one folder per process so that no process can remove another's transfers.
    tempfile.tempdir = str(claim_spool(archive.settings.storage.incoming_dir()))
    node = archive.settings.node
    processes = node.processes if dispatch_to or forwarded is not None else 1
    ae = build_ae(archive, processes)
    extra: dict[str, Any] = {}
    server_class: type[NodeServer] = NodeServer
    if dispatch_to:
        server_class, extra = DispatchingServer, {"channels": dispatch_to}
    elif forwarded is not None:
        server_class, extra = ForwardedServer, {"channel": forwarded[0], "on_closed": forwarded[1]}
    server = ae.make_server(
        (node.bind, node.port),
        evt_handlers=event_handlers(archive),
        ssl_context=tls_context(archive.settings.tls),
        server_class=server_class,
        request_handler=_NodeRequestHandler,
        max_per_address=math.ceil(node.max_associations_per_address / processes),
        **extra,
    )
    thread = threading.Thread(target=server.serve_forever, name="medzip-acceptor", daemon=True)
    thread.start()
    pynetdicom_internals.register_server(ae, server)
    return server


def describe_startup(archive: Archive) -> list[str]:
    """Lines printed at start: where the node listens and how to open or restrict it."""
    s = archive.settings
    access = s.access
    lines = [
        f"medzip node: AE title {s.node.ae_title}, port {s.node.port} (bind {s.node.bind})"
        + (" with TLS" if s.tls.enabled else ""),
        f"data directory: {Path(s.storage.data_dir).resolve()}",
        f"database: {_redact(s.storage.resolved_database_url())}",
        f"blobs: {s.storage.resolved_blob_dir()} (sealed with AES-256-GCM)",
    ]
    if archive.identity is not None:
        generation = archive.identity.current
        lines.append(
            f"identity keys: {archive.identity.path} (node {archive.identity.node_id}, "
            f"master key {generation.master_id.hex()}, signing key "
            f"{generation.signing_id.hex()}); patient identity sealed inside each compressed "
            "blob"
        )
    lines += secret_keys_inside_data_folder(s)
    if access.allow_unknown_ae:
        lines.append(
            "access: any calling AE from "
            + ", ".join(access.unknown_ae_hosts)
            + f" ({', '.join(sorted(r.value for r in access.unknown_ae_rights))});"
            " to open or restrict it, set [access] in the config file"
            " (see `medzip config example`)"
        )
    else:
        lines.append(f"access: allow-list only ({len(access.peers)} peers)")
    if s.node.processes > 1:
        lines.append(f"node processes: {s.node.processes}, associations dealt round-robin")
    for dest in s.retrieve.destinations:
        lines.append(f"move destination: {dest.ae_title} = {dest.host}:{dest.port}")
    return lines


def secret_keys_inside_data_folder(settings: Settings) -> list[str]:
    """Warnings for secret key files kept in the data folder: a copy of the folder (a
    backup, a stolen disk) then carries the keys to open it."""
    data_dir = Path(settings.storage.data_dir).resolve()
    keys = {
        "blob key ([storage] key_file)": settings.storage.resolved_key_file(),
        "identity keys ([identity] key_file)": settings.identity.resolved_key_file(
            settings.storage.data_dir
        ),
    }
    return [
        f"warning: the {what} {path} is inside the data folder {data_dir}: whoever copies the "
        "folder can open it; keep keys elsewhere (and backed up apart from the data)"
        for what, path in keys.items()
        if path.is_relative_to(data_dir)
    ]


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
