"""A real node in this process, on a free loopback port, and what the tests do with it."""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pydicom.config
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_role, dimse_messages, evt, transport
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from medzip_scp.archive import Archive
from medzip_scp.config import MoveDestination, NodeSettings, Settings, StorageSettings
from medzip_scp.net.pynetdicom_internals import CONFIG_SETTINGS
from medzip_scp.net.server import start_server

# What medzip_scp.net.server.start_server sets for the whole process when a node starts
# (configure_pynetdicom, and the spool folder as tempfile's default); not here: a warnings
# filter, which pytest restores after each test itself, and reactor.install()'s stand-ins for
# pynetdicom's `time` (installed once per process, the same for every node, and plain `time`
# outside pynetdicom's reactor loops).
_PROCESS_WIDE: dict[str, tuple[object, str]] = {
    f"pynetdicom._config.{name}": (_config, name) for name in CONFIG_SETTINGS
} | {
    "Association.send_c_store": (Association, "send_c_store"),
    "pynetdicom.transport.deepcopy": (transport, "deepcopy"),
    "pynetdicom.dimse_messages.NamedTemporaryFile": (dimse_messages, "NamedTemporaryFile"),
    "tempfile.tempdir": (tempfile, "tempdir"),
    # the attribute behind `reading_validation_mode` (whose getter fills in a default)
    "pydicom.config.settings.reading_validation_mode": (
        pydicom.config.settings,
        "_reading_validation_mode",
    ),
}
_LOGGERS = ("pynetdicom", "pydicom")


class ProcessWideSettings:
    """The process-wide settings (pynetdicom's, pydicom's, tempfile's) that starting a node in
    this process changes, as they are when this is made; :meth:`restore` (or leaving a
    ``with`` block) puts them back, so that no test depends on a node an earlier test started."""

    def __init__(self) -> None:
        self._values = [
            (label, owner, name, getattr(owner, name))
            for label, (owner, name) in _PROCESS_WIDE.items()
        ]
        self._levels = {name: logging.getLogger(name).level for name in _LOGGERS}

    def changed(self) -> list[str]:
        """What differs now from when this was made."""
        names = [
            label
            for label, owner, name, value in self._values
            if getattr(owner, name) is not value and getattr(owner, name) != value
        ]
        names += [
            f"logging.getLogger({name!r}).level"
            for name, level in self._levels.items()
            if logging.getLogger(name).level != level
        ]
        return names

    def restore(self) -> None:
        for _, owner, name, value in self._values:
            setattr(owner, name, value)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    def __enter__(self) -> ProcessWideSettings:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.restore()


@contextlib.contextmanager
def sending_files_as_they_are() -> Iterator[None]:
    """pynetdicom's ``send_c_store(path)`` sends the file's data set bytes unchanged (no
    re-encoding); the previous setting is restored after (an in-process node sets it too)."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningNode:
    settings: Settings
    archive: Archive
    host: str
    port: int

    @property
    def ae_title(self) -> str:
        return self.settings.node.ae_title

    def add_move_destination(self, ae_title: str, host: str, port: int) -> None:
        self.settings.retrieve.destinations.append(
            MoveDestination(ae_title=ae_title, host=host, port=port)
        )


@contextlib.contextmanager
def running_node(settings: Settings, archive: Archive | None = None) -> Iterator[RunningNode]:
    """A node of ``settings`` (on ``archive``, else one opened for it) serving in this process
    until the block ends; the process-wide settings it changed are restored then."""
    with ProcessWideSettings():
        archive = Archive.open(settings) if archive is None else archive
        server = start_server(archive)
        assert server is not None
        try:
            yield RunningNode(settings, archive, "127.0.0.1", settings.node.port)
        finally:
            server.shutdown()


CT_EXPLICIT = {(str(CTImageStorage), str(ExplicitVRLittleEndian))}


def c_get(
    node: RunningNode,
    query: Dataset,
    on_store: Callable[[evt.Event], int],
    contexts: Iterable[tuple[str, str]] = CT_EXPLICIT,
    model: str = StudyRootQueryRetrieveInformationModelGet,
) -> list[tuple[Dataset, Dataset | None]]:
    """A C-GET of ``query`` from the node, taking the C-STOREs it sends with ``on_store``
    (SCP role for each SOP class of ``contexts``, one transfer syntax each); its responses."""
    contexts = sorted(contexts)
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(model)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        ext_neg=[build_role(c, scp_role=True) for c in sorted({c for c, _ in contexts})],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        return list(assoc.send_c_get(query, model))
    finally:
        assoc.release()


def make_settings(data_dir: Path, db_url: str, **node: object) -> Settings:
    return Settings(
        node=NodeSettings(bind="127.0.0.1", port=free_port(), **node),
        storage=StorageSettings(data_dir=data_dir, database_url=db_url),
    )
