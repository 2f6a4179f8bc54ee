"""Building and running the node's Application Entity: the one place handlers are wired."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import socket
import ssl
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pydicom.config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt, transport
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    _STORAGE_CLASSES,
    Verification,
)
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from medzip_scp.archive import Archive
from medzip_scp.config import TLSSettings
from medzip_scp.net import reactor
from medzip_scp.net.access import AccessPolicy
from medzip_scp.net.handlers import (
    QR_CLASSES,
    handle_echo,
    handle_find,
    handle_get,
    handle_move,
    handle_requested,
    handle_sop_extended,
    handle_store,
)

log = logging.getLogger(__name__)


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings the node depends on."""
    # Large objects are spooled to disk while they arrive, never held whole in memory.
    _config.STORE_RECV_CHUNKED_DATASET = True
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
    transport.deepcopy = _copy_contexts  # used there only to copy the server's contexts


def _storage_sop_classes() -> list[str]:
    # pynetdicom's own table of every storage SOP class it knows (no public accessor).
    return sorted(set(_STORAGE_CLASSES.values()))


def build_ae(archive: Archive, processes: int = 1) -> AE:
    """An AE accepting every storage SOP class in every syntax, Q/R and Verification; one of
    ``processes`` node processes, so it takes its share of ``max_associations``."""
    settings = archive.settings
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.node.max_pdu
    ae.maximum_associations = math.ceil(settings.node.max_associations / processes)
    ae.network_timeout = settings.node.network_timeout
    ae.dimse_timeout = settings.node.dimse_timeout
    ae.require_called_aet = settings.access.check_called_ae
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for uid in _storage_sop_classes():
        # SCP role for C-STORE, and SCU role for C-GET sub-operations on the same contexts.
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for uid in QR_CLASSES:
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    # Contexts proposed for C-MOVE sub-associations are built per request.
    return ae


def event_handlers(archive: Archive) -> list[tuple]:
    policy = AccessPolicy(archive.settings.access, archive.settings.node.ae_title)
    return [
        (evt.EVT_REQUESTED, handle_requested, [policy]),
        (evt.EVT_SOP_EXTENDED, handle_sop_extended),
        (evt.EVT_C_ECHO, handle_echo, [policy]),
        (evt.EVT_C_STORE, handle_store, [archive, policy]),
        (evt.EVT_C_FIND, handle_find, [archive, policy]),
        (evt.EVT_C_GET, handle_get, [archive, policy]),
        (evt.EVT_C_MOVE, handle_move, [archive, policy]),
    ]


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


class _BulkReceiveSocket(AssociationSocket):
    """pynetdicom's association socket, receiving a PDU in as few calls as the kernel
    allows: its own ``recv`` reads 4096 bytes a call into a growing bytearray (130 calls
    and copies for one 519 KiB CT slice). The buffer starts at no more than
    :data:`FIRST_BUFFER` and doubles as data arrive: the length comes from the peer, and
    a 4 GiB PDU header must not reserve 4 GiB before a byte of it has arrived."""

    FIRST_BUFFER = 1 << 20

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        received = bytearray(min(nr_bytes, self.FIRST_BUFFER))
        filled = 0
        while filled < nr_bytes:
            if filled == len(received):
                received.extend(bytes(min(len(received), nr_bytes - filled)))
            with memoryview(received) as view:
                count = sock.recv_into(view[filled:])
            if not count:  # connection closed: what arrived, as pynetdicom's own recv does
                del received[filled:]
                return received
            filled += count
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


class _NodeRequestHandler(RequestHandler):
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _BulkReceiveSocket  # same state, faster recv
        reactor.attach(assoc.dul)
        return assoc


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved from the accepting thread
    (where one silent client would stop every other from connecting) to the association's
    own thread, under the network timeout."""

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()
        return self._wrap(client), address

    def _wrap(self, client: socket.socket) -> socket.socket:
        if not self.ssl_context:
            return client
        return self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
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


class DispatchingServer(NodeServer):
    """The first node process's server when there are several: it accepts every connection
    on the port and deals them round-robin to itself and to the other node processes
    (passing the connected socket over a Unix socket pair), so that N concurrent
    associations use N processes and their cores. (With ``SO_REUSEPORT`` the kernel hashes
    connections to processes: 4 associations on 2 processes landed 4/0 or 3/1 five times in
    eight.) TLS is set up by the process that serves the association."""

    HAND_OVER_TIMEOUT = 10.0

    def __init__(self, *args: Any, channels: list[socket.socket], **kwargs: Any) -> None:
        self._channels = list(channels)
        for channel in self._channels:
            channel.settimeout(self.HAND_OVER_TIMEOUT)
        self._turn = 0
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        return self.socket.accept()  # wrapped for TLS only where it is served

    def process_request(self, request: Any, client_address: Any) -> None:
        self._turn = (self._turn + 1) % (len(self._channels) + 1)
        if self._turn and self._hand_over(self._channels[self._turn - 1], request, client_address):
            return
        super().process_request(self._wrap(request), client_address)

    def _hand_over(self, channel: socket.socket, request: socket.socket, address: Any) -> bool:
        try:
            socket.send_fds(channel, [json.dumps(list(address)).encode()], [request.fileno()])
        except TimeoutError:
            log.warning("a node process is not taking associations; serving this one here")
            return False
        except OSError:
            log.error("a node process stopped; serving its share of associations here")
            self._channels.remove(channel)
            channel.close()
            self._turn = 0
            return False
        request.close()  # our descriptor only: the other process now owns the connection
        return True

    def server_close(self) -> None:
        super().server_close()
        for channel in self._channels:
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
    incoming = archive.settings.storage.incoming_dir()
    if forwarded is None and not dispatch_to:
        # Left by a crash mid-transfer: never acknowledged, safe to drop. (With several node
        # processes, `medzip serve` clears it before it starts any.)
        shutil.rmtree(incoming, ignore_errors=True)
    # pynetdicom spools incoming data sets with tempfile: keep them on the archive's volume,
    # one folder per process so that no process can remove another's transfers.
    spool = incoming / str(os.getpid())
    spool.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(spool)
    node = archive.settings.node
    ae = build_ae(archive, node.processes if dispatch_to or forwarded is not None else 1)
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
        **extra,
    )
    thread = threading.Thread(target=server.serve_forever, name="medzip-acceptor", daemon=True)
    thread.start()
    ae._servers.append(server)  # so ae.shutdown() stops it, as for ae.start_server()
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


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
