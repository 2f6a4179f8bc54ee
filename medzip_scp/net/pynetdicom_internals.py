"""Every use the node makes of pynetdicom beyond its public API, in one place.

pynetdicom does not promise any of these; :func:`check_internals` verifies at start that
each is still as relied on (pyproject.toml pins the tested minor version, see
:data:`TESTED_VERSION`) and otherwise fails with one line naming what changed. The
internals, and why the node needs them:

``sop_class._STORAGE_CLASSES``
    Its table of every storage SOP class: there is no public accessor, and the node
    accepts each of them (:func:`storage_sop_classes`).
``transport.deepcopy``
    ``RequestHandler._create_association`` deep-copies the server's presentation contexts
    for every association, 0.1 s of CPU for the node's; replaced by a cheaper exact copy
    (:func:`replace_context_copy`).
``dimse_messages.NamedTemporaryFile`` and ``C_STORE._dataset_file``
    The file an incoming C-STORE data set is spooled to: replaced so that a full volume
    answers 0xA700 instead of aborting the association, and read back by the C-STORE
    handler (:func:`replace_spool_file`, :func:`spool_file_of`).
``Association.send_c_store``
    Wrapped so that the C-GET/C-MOVE services, which accept only data sets from a
    handler, send a stored object from its file (:func:`convert_sent_datasets`).
``RequestHandler._create_association``
    The hook between an association's creation and its start, where the node fits its
    own socket reading and wake-ups (:func:`request_handler_class`).
``AssociationSocket`` instance ``__class__``, ``DULServiceProvider._read_pdu_data``
    The acceptor's socket becomes a subclass that reads PDUs in bulk and within limits,
    and takes over the DUL's reading of a PDU (:func:`swap_socket_class`,
    :func:`intercept_pdu_reads`); that subclass overrides the ``ready`` property and
    ``recv``.
``DULServiceProvider.state_machine``, ``event_queue``, ``to_user_queue``, ``fsm`` names
    A refused PDU is Evt19 (invalid PDU: A-ABORT), P-DATA-TF is read in Sta6 and Sta7,
    and ``None`` on the user queue ends the acceptor's wait for an A-ASSOCIATE-RQ
    (:func:`dul_state`, :func:`in_data_transfer`, :func:`abort_invalid_pdu`,
    :func:`end_association_request_wait`).
``Association.start`` on the instance
    The association's thread is started while the server counts the connection
    (:func:`wrap_association_start`).
``AE._servers``
    The node makes its server with ``AE.make_server`` (``AE.start_server`` takes no server
    class); registered there, ``AE.shutdown`` stops it (:func:`register_server`).
``DULServiceProvider.to_provider_queue`` and the thread's ``_target``
    The DUL's send queue becomes one that wakes its reactor, and the wake-up descriptor is
    closed when the reactor returns (:func:`replace_send_queue`, :func:`wrap_dul_thread`).
``Association._run_reactor``, ``DULServiceProvider.run_reactor``, the ``time`` module of
``pynetdicom.association`` and ``pynetdicom.dul``
    The two polling loops' ``time.sleep`` becomes a wait on their events
    (:func:`reactor_loops`, :func:`replace_reactor_time`).
``AssociationSocket._is_connected``
    Whether there is a connected socket to wait on (:func:`is_connected`).
``DULServiceProvider._run_loop_delay``
    How long the DUL reactor sleeps between turns (:func:`run_loop_delay`).
``PresentationContext._as_scu``
    Granting the SCU role on a context the peer proposed without role selection (C-GET
    from Horos/OsiriX): no public setter (:func:`grant_scu_role`).

pynetdicom's public ``_config.UNRESTRICTED_STORAGE_SERVICE`` would make the storage table
and the context copy unnecessary, but it is not the same negotiation: it also accepts
private and unknown SOP classes and transfer syntaxes, takes the peer's first syntax
whatever the node supports, and grants the SCU role on every storage context (so
``[retrieve] get_without_role_selection = false`` would no longer refuse). It is not used.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from types import CodeType
from typing import Any, TypeVar, cast

import pynetdicom
import pynetdicom.association
import pynetdicom.dul
from pynetdicom import AE, _config, dimse_messages, fsm, sop_class, transport
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket, RequestHandler

#: The pynetdicom minor version these internals were checked against (pyproject.toml).
TESTED_VERSION = "3.0"
CONFIG_SETTINGS = (
    "STORE_RECV_CHUNKED_DATASET",
    "STORE_SEND_CHUNKED_DATASET",
    "LOG_REQUEST_IDENTIFIERS",
    "LOG_RESPONSE_IDENTIFIERS",
    "LOG_HANDLER_LEVEL",
)
"""The ``pynetdicom._config`` settings the node sets for its whole process (server.py)."""

_Socket = TypeVar("_Socket", bound=AssociationSocket)

_INVALID_PDU = "Evt19"  # state machine event: the acceptor sends an A-ABORT
_P_DATA_RECEIVED = "Evt10"
_DATA_TRANSFER_STATES = frozenset({"Sta6", "Sta7"})  # where the state machine takes P-DATA


class PynetdicomMismatchError(RuntimeError):
    """The installed pynetdicom lacks an internal the node relies on."""


def _names(function: Any) -> set[str]:
    """The global and attribute names a function's code uses (``set()`` if none)."""
    function = getattr(function, "__wrapped__", function)
    if isinstance(function, property):
        function = function.fget
    return set(getattr(getattr(function, "__code__", None), "co_names", ()))


def _storage_table() -> bool:
    storage = sop_class._STORAGE_CLASSES
    return isinstance(storage, dict) and "1.2.840.10008.5.1.4.1.1.2" in storage.values()  # CT


def _reactor_loops_sleep() -> bool:
    return all(
        {"time", "sleep"} <= _names(loop) and hasattr(module, "time")
        for module, loop in (
            (pynetdicom.association, Association._run_reactor),
            (pynetdicom.dul, DULServiceProvider.run_reactor),
        )
    )


def _p_data_states() -> bool:
    taken = {
        state
        for (event, state), action in fsm.TRANSITION_TABLE.items()
        if event == _P_DATA_RECEIVED and not action.startswith("AA")  # AA: abort or ignore
    }
    return taken == _DATA_TRANSFER_STATES


#: Each internal relied on, described for the user, and a test that it is as expected (an
#: exception counts as not).
_INTERNALS: dict[str, Callable[[], bool]] = {
    "sop_class._STORAGE_CLASSES maps names to storage SOP class UIDs": _storage_table,
    "RequestHandler._create_association copies contexts with transport.deepcopy and sets "
    "an AssociationSocket": lambda: (
        callable(transport.deepcopy)
        and {"deepcopy", "AssociationSocket", "set_socket"}
        <= _names(RequestHandler._create_association)
    ),
    "RequestHandler.handle starts what _create_association returns": lambda: (
        {"_create_association", "start"} <= _names(RequestHandler.handle)
    ),
    "C-STORE data sets are spooled with dimse_messages.NamedTemporaryFile": lambda: (
        callable(dimse_messages.NamedTemporaryFile)
        and "NamedTemporaryFile" in _names(dimse_messages.DIMSEMessage.decode_msg)
    ),
    "the C-STORE request carries its spool file as _dataset_file": lambda: (
        "_dataset_file" in _names(StorageServiceClass.SCP)
    ),
    "Association.send_c_store sends a data set from a file path": lambda: (
        "split_dataset" in _names(Association.send_c_store)
    ),
    "AE keeps its servers in _servers for AE.shutdown": lambda: "_servers" in _names(AE.shutdown),
    "AssociationSocket.ready is a property and recv, close exist": lambda: (
        isinstance(AssociationSocket.ready, property)
        and callable(AssociationSocket.recv)
        and callable(AssociationSocket.close)
    ),
    "AssociationSocket keeps _is_connected": lambda: (
        "_is_connected" in _names(AssociationSocket.close)
    ),
    "the DUL reads a PDU in _read_pdu_data, from AssociationSocket.recv": lambda: (
        "_read_pdu_data" in _names(DULServiceProvider._is_transport_event)
        and "recv" in _names(DULServiceProvider._read_pdu_data)
    ),
    "the DUL has state_machine, event_queue, to_user_queue, to_provider_queue and "
    "_run_loop_delay": lambda: (
        {"state_machine", "event_queue", "to_user_queue", "to_provider_queue", "_run_loop_delay"}
        <= _names(DULServiceProvider.__init__)
    ),
    "the DUL is a thread whose target is in _target": lambda: (
        issubclass(DULServiceProvider, threading.Thread)
        and threading.Thread(target=print)._target is print  # type: ignore[attr-defined]
    ),
    "an invalid PDU (Evt19) aborts before and after association": lambda: (
        {(_INVALID_PDU, "Sta2"), (_INVALID_PDU, "Sta6")} <= set(fsm.TRANSITION_TABLE)
    ),
    "P-DATA-TF is taken in states Sta6 and Sta7 only": _p_data_states,
    "the reactor loops call time.sleep": _reactor_loops_sleep,
    "the association's DIMSE messages wait in dimse.msg_queue": lambda: (
        "msg_queue" in _names(DIMSEServiceProvider.__init__)
    ),
    "PresentationContext.as_scu reads _as_scu": lambda: (
        hasattr(PresentationContext(), "_as_scu")
        and "_as_scu" in _names(PresentationContext.as_scu)
    ),
    "_config has the chunked data set and logging settings": lambda: all(
        hasattr(_config, name) for name in CONFIG_SETTINGS
    ),
}


def _as_expected(test: Callable[[], bool]) -> bool:
    try:
        return bool(test())
    except Exception:  # an attribute gone, a table of another shape: not as expected
        return False


def check_internals() -> None:
    """Fail, in one line, if any pynetdicom internal this module uses is not as expected.

    Raises
    ------
    PynetdicomMismatchError
        Naming the installed pynetdicom version, what changed, and the version to install.
    """
    missing = [what for what, test in _INTERNALS.items() if not _as_expected(test)]
    if missing:
        raise PynetdicomMismatchError(
            f"pynetdicom {pynetdicom.__version__} is not as medzip expects "
            f"({'; '.join(missing)}): install pynetdicom {TESTED_VERSION}.x, the version "
            "pyproject.toml pins"
        )


# --------------------------------------------------------------------- negotiation, C-STORE


def storage_sop_classes() -> list[str]:
    """Every storage SOP class UID pynetdicom knows, sorted."""
    return sorted(set(sop_class._STORAGE_CLASSES.values()))


def grant_scu_role(context: PresentationContext) -> None:
    """Let the peer act as SCU of ``context`` (we send C-STOREs on it for a C-GET)."""
    context._as_scu = True


def replace_context_copy(copier: Callable[..., Any]) -> None:
    """Have pynetdicom's transport module copy the server's contexts with ``copier`` (it
    uses ``deepcopy`` for nothing else)."""
    transport.deepcopy = copier  # type: ignore[attr-defined]


def replace_spool_file(factory: Callable[..., Any]) -> None:
    """Spool incoming C-STORE data sets to ``factory(**kwargs)`` in place of
    ``tempfile.NamedTemporaryFile`` (pynetdicom uses it for nothing else there)."""
    dimse_messages.NamedTemporaryFile = factory  # type: ignore[attr-defined]


def spool_file_of(request: Any) -> Any:
    """The file a C-STORE request's data set was spooled to (``None`` if in memory)."""
    return request._dataset_file


def convert_sent_datasets(convert: Callable[[Any], Any]) -> None:
    """Have ``Association.send_c_store`` send ``convert(dataset)`` (a data set or a file
    path), also for C-GET/C-MOVE sub-operations; idempotent."""
    send_c_store = Association.send_c_store
    if getattr(send_c_store, "_medzip", False):
        return

    @functools.wraps(send_c_store)
    def send(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
        return send_c_store(self, convert(dataset), *args, **kwargs)

    send._medzip = True  # type: ignore[attr-defined]
    Association.send_c_store = send  # type: ignore[method-assign]


# ---------------------------------------------------------------------- server, association


def register_server(ae: AE, server: Any) -> None:
    """Have ``ae.shutdown()`` stop ``server``, as for one from ``ae.start_server()``."""
    ae._servers.append(server)


def request_handler_class(
    prepare: Callable[[RequestHandler, Association], None],
) -> type[RequestHandler]:
    """pynetdicom's request handler, calling ``prepare(handler, association)`` on each
    acceptor association after it is created and before its thread starts."""

    class _PreparingRequestHandler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            prepare(self, assoc)
            return assoc

    return _PreparingRequestHandler


def wrap_association_start(assoc: Association, wrap: Callable[[Callable[[], None]], None]) -> None:
    """Start ``assoc``'s thread through ``wrap(start)``."""
    start = assoc.start
    assoc.start = lambda: wrap(start)  # type: ignore[method-assign]


# ------------------------------------------------------------------------------ DUL, socket


def swap_socket_class(dul: DULServiceProvider, socket_class: type[_Socket]) -> _Socket:
    """Make the DUL's socket an instance of ``socket_class`` (a subclass of
    ``AssociationSocket`` with no state of its own to set up) and return it."""
    sock = dul.socket
    sock.__class__ = socket_class  # type: ignore[union-attr]
    return cast(_Socket, sock)


def intercept_pdu_reads(
    dul: DULServiceProvider, read: Callable[[Callable[[], None]], None]
) -> None:
    """Have the DUL read each PDU through ``read(decode)``, where ``decode`` is the DUL's
    own reading (from the socket's ``recv``) and decoding of the next PDU."""
    dul._read_pdu_data = functools.partial(read, dul._read_pdu_data)  # type: ignore[method-assign]


def dul_state(dul: DULServiceProvider) -> str:
    """The DUL's state machine state (``"Sta1"`` ... ``"Sta13"``)."""
    return cast(str, dul.state_machine.current_state)


def in_data_transfer(state: str) -> bool:
    """Whether the state machine takes P-DATA-TF PDUs in ``state``."""
    return state in _DATA_TRANSFER_STATES


def abort_invalid_pdu(dul: DULServiceProvider) -> None:
    """Tell the state machine an invalid PDU arrived: it sends an A-ABORT and closes."""
    dul.event_queue.put(_INVALID_PDU)


def end_association_request_wait(dul: DULServiceProvider) -> None:
    """End the acceptor's wait for an A-ASSOCIATE-RQ, as its timeout would."""
    dul.to_user_queue.put(None)  # type: ignore[arg-type]


def replace_send_queue(dul: DULServiceProvider, send_queue: Any) -> None:
    """Make ``send_queue`` the DUL's queue of primitives to send, moving over anything
    queued already (the A-ASSOCIATE response, say)."""
    old = dul.to_provider_queue
    while not old.empty():
        send_queue.put(old.get_nowait())
    dul.to_provider_queue = send_queue


def wrap_dul_thread(dul: Any, wrap: Callable[[Callable[[], None]], None]) -> None:
    """Run the DUL's thread as ``wrap(reactor)``, ``reactor`` being what it ran before;
    before the thread starts."""
    reactor = dul._target
    dul._target = lambda: wrap(reactor)


def is_connected(transport_socket: Any) -> bool:
    """Whether an association's transport has a connected socket."""
    return bool(getattr(transport_socket, "_is_connected", False))


def run_loop_delay(dul: DULServiceProvider) -> float:
    """How long the DUL's reactor sleeps after a turn that found nothing to do."""
    return cast(float, dul._run_loop_delay)


def reactor_loops() -> tuple[tuple[CodeType, type], tuple[CodeType, type]]:
    """The code and owner (thread class) of the association's and the DUL's reactor loop."""
    return (
        (Association._run_reactor.__code__, Association),
        (DULServiceProvider.run_reactor.__code__, DULServiceProvider),
    )


def replace_reactor_time(association_time: object, dul_time: object) -> None:
    """Give ``pynetdicom.association`` and ``pynetdicom.dul`` these stand-ins for the
    ``time`` module, whose ``sleep`` their reactor loops call."""
    pynetdicom.association.time = association_time  # type: ignore[attr-defined]
    pynetdicom.dul.time = dul_time  # type: ignore[attr-defined]
