"""A real node on a free loopback port, on SQLite and on PostgreSQL (``db_url``)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from medzip_scp.archive import Archive
from medzip_scp.config import MoveDestination, NodeSettings, Settings, StorageSettings
from medzip_scp.net.server import start_server
from tests.data_paths import SHARED_DATA


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


@pytest.fixture
def node_settings(tmp_path: Path, db_url: str) -> Settings:
    """Settings for a node; tests may adjust them before asking for ``node``."""
    return make_settings(tmp_path / "data", db_url)


@pytest.fixture
def node(node_settings: Settings) -> Iterator[RunningNode]:
    archive = Archive.open(node_settings)
    server = start_server(archive)
    assert server is not None
    try:
        yield RunningNode(node_settings, archive, "127.0.0.1", node_settings.node.port)
    finally:
        server.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real DICOM data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


from tests.net.tls_helpers import pki  # noqa: E402, F401  (a fixture for the TLS tests)
