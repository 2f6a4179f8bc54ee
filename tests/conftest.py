"""Shared database fixtures: a fresh index database on SQLite and on PostgreSQL.

``db_url`` is parametrised over ``sqlite`` (a file in ``tmp_path``) and
``postgresql`` (``MEDZIP_TEST_PG_URL``, default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``; every test gets its own
schema, selected through ``options=-csearch_path=<schema>`` and dropped afterwards).
PostgreSQL tests are skipped when the server is unreachable, unless
``MEDZIP_REQUIRE_PG=1`` (CI), which turns that into a failure.

``db_engine`` / ``db_session_factory`` are the same database after
``upgrade_database`` (the schema always comes from the Alembic migrations).
``module_db_url`` is a module-scoped variant for read-only test modules.

The fixtures that the test folders share live here too: ``node_settings`` and ``node`` (a
real node in this process, on ``db_url``), ``store_scp`` (a C-MOVE destination),
``pki`` (TLS keys and certificates) and ``shared_data`` (../shared/data, or a skip). Plain
helpers are in ``tests.helpers``; test modules import nothing from one another.

An autouse fixture fails any test that leaves the process-wide settings a node started in this
process sets (pynetdicom's, pydicom's, tempfile's) otherwise than it found them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp.audit import close_audit
from medzip_scp.config import Settings
from medzip_scp.index.db import create_engine_for, session_factory, upgrade_database
from tests.data_paths import NO_SHARED_DATA, SHARED_DATA
from tests.helpers.node import (
    ProcessWideSettings,
    RunningNode,
    free_port,
    make_settings,
    running_node,
)
from tests.helpers.tls import make_pki

PG_DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DB_KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _pg_url() -> str:
    return os.environ.get("MEDZIP_TEST_PG_URL", PG_DEFAULT_URL)


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@functools.cache
def _pg_unreachable() -> str | None:
    try:
        psycopg.connect(_libpq(_pg_url()), connect_timeout=3).close()
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
    return None


@contextlib.contextmanager
def database_url(kind: str, directory: Path) -> Iterator[str]:
    """Yield the URL of a new, empty database of ``kind`` and remove it afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'index.db'}"
        return
    reason = _pg_unreachable()
    if reason is not None:
        message = f"PostgreSQL at MEDZIP_TEST_PG_URL is unreachable ({reason})"
        if os.environ.get("MEDZIP_REQUIRE_PG") == "1":
            pytest.fail(message + " and MEDZIP_REQUIRE_PG=1", pytrace=False)
        pytest.skip(message)
    schema = f"medzip_test_{uuid.uuid4().hex[:16]}"
    admin = _libpq(_pg_url())
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    url = make_url(_pg_url()).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("SET lock_timeout = '30s'")
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=DB_KINDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty (unmigrated) database; per test."""
    with database_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="module", params=DB_KINDS)
def module_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of a fresh, empty database shared by one test module."""
    with database_url(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """Engine on ``db_url`` after ``alembic upgrade head``."""
    upgrade_database(db_url)
    engine = create_engine_for(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def db_session_factory(db_engine: Engine) -> sessionmaker[Session]:
    """Session factory on a migrated, empty index database."""
    return session_factory(db_engine)


@pytest.fixture(autouse=True)
def _audit_closed_after_each_test() -> Iterator[None]:
    """A command run in-process (CliRunner) configures the audit trail for the process:
    close it after the test, as the command's own process would end."""
    yield
    close_audit()


@pytest.fixture(autouse=True)
def _process_wide_settings_kept() -> Iterator[None]:
    """Every test leaves the process-wide settings that a node started in this process
    changes (``tests.helpers.node.ProcessWideSettings``) as it found them."""
    before = ProcessWideSettings()
    yield
    changed = before.changed()
    before.restore()
    assert not changed, f"the test left process-wide settings changed: {', '.join(changed)}"


@pytest.fixture
def node_settings(tmp_path: Path, db_url: str) -> Settings:
    """Settings for a node; tests may adjust them before asking for ``node``."""
    return make_settings(tmp_path / "data", db_url)


@pytest.fixture
def node(node_settings: Settings) -> Iterator[RunningNode]:
    """A node of ``node_settings`` serving in this process; the process-wide settings that
    starting it changes are restored afterwards."""
    with running_node(node_settings) as running:
        yield running


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that ask for it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_SHARED_DATA)
    return SHARED_DATA


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A throw-away CA, node and client key and certificate (``tests.helpers.tls``)."""
    return make_pki(tmp_path)


@pytest.fixture
def store_scp() -> Iterator[tuple[int, list[Dataset]]]:
    """A C-MOVE destination (AE title ``DEST``) taking CT images: its port, and the data
    sets it received."""
    received: list[Dataset] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    yield port, received
    server.shutdown()
