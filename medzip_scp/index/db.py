"""Engines, sessions and schema migrations of the index database.

Two dialects are supported with one schema and one Alembic migration tree:

* SQLite (``sqlite:///path``): every connection uses ``journal_mode=WAL``,
  ``foreign_keys=ON``, ``busy_timeout=30000`` and ``synchronous=FULL`` (a C-STORE
  is acknowledged only after its commit reached the disk). pysqlite's own
  transaction handling is disabled and every transaction starts with
  ``BEGIN IMMEDIATE`` (an engine ``begin`` event, following the SQLAlchemy SQLite
  dialect documentation "Enabling Non-Legacy SQLite Transactional Modes"), so a
  writer takes the write lock up front instead of failing to upgrade a read lock.
  Connections with ``isolation_level="AUTOCOMMIT"`` get no ``BEGIN``; sessions made
  with ``session_factory(engine, readonly=True)`` use a plain (deferred) ``BEGIN``
  so that long C-FIND reads do not hold the write lock.
* PostgreSQL (``postgresql+psycopg://...``): ``READ COMMITTED``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, event, select, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import medzip_scp

__all__ = [
    "SQLITE_BEGIN_OPTION",
    "SQLITE_LOWER_FUNCTION",
    "MIGRATION_COMPARE_OPTIONS",
    "alembic_config",
    "create_engine_for",
    "current_revision",
    "ping",
    "schema_differences",
    "session_factory",
    "upgrade_database",
]

#: Execution option naming the ``BEGIN`` flavour on SQLite ("IMMEDIATE" or "DEFERRED").
SQLITE_BEGIN_OPTION = "medzip_sqlite_begin"

SQLITE_BUSY_TIMEOUT_MS = 30_000

#: PostgreSQL advisory lock key held while migrating (any fixed 64-bit number: "medzip")
_MIGRATE_LOCK = int.from_bytes(b"medzip", "big")

#: SQL function registered on SQLite connections: Python's ``str.lower``.
SQLITE_LOWER_FUNCTION = "medzip_lower"


def _py_lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _install_sqlite_events(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Hand transaction control to SQLAlchemy (see module docstring); with
        # isolation_level None the driver is in autocommit mode, which PRAGMA
        # journal_mode needs.
        dbapi_connection.isolation_level = None
        # Unicode-aware lower() for case-insensitive PN matching (SQLite's own
        # lower()/LIKE fold ASCII only); see medzip_scp.index.query.
        dbapi_connection.create_function(SQLITE_LOWER_FUNCTION, 1, _py_lower, deterministic=True)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return
        # Setting a non-autocommit isolation level makes pysqlite re-enable its
        # legacy implicit BEGIN; switch it off again before every transaction.
        dbapi_connection = conn.connection.dbapi_connection
        if dbapi_connection is not None and dbapi_connection.isolation_level is not None:
            dbapi_connection.isolation_level = None
        flavour = options.get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        if flavour not in ("IMMEDIATE", "DEFERRED", "EXCLUSIVE"):
            raise ValueError(f"{SQLITE_BEGIN_OPTION} must be IMMEDIATE, DEFERRED or EXCLUSIVE")
        conn.exec_driver_sql(f"BEGIN {flavour}")


def _make_private(database: Path) -> None:
    """Create the SQLite file readable by its owner only (0600): the index holds PHI.
    SQLite gives its -wal and -shm files the database file's mode. An existing file made
    with a wider mode by an older version is narrowed."""
    if database.parent.is_dir():
        os.close(os.open(database, os.O_RDWR | os.O_CREAT, 0o600))
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)


def create_engine_for(url: str) -> Engine:
    """Create an engine for the index database.

    Parameters
    ----------
    url : str
        ``sqlite:///path/to/index.db`` or ``postgresql+psycopg://user@host/db``.

    Returns
    -------
    Engine
        An engine configured as described in the module docstring. Bound
        parameters are hidden from SQLAlchemy's logs and exception messages
        (``hide_parameters``), since they carry PHI.

    Raises
    ------
    ValueError
        If the URL names another backend, or an in-memory SQLite database (the
        index must be durable and shared between connections).
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("the SQLite index needs a file path, not an in-memory database")
        _make_private(Path(parsed.database))
        engine = sa_create_engine(parsed, hide_parameters=True)
        _install_sqlite_events(engine)
        return engine
    if backend == "postgresql":
        return sa_create_engine(
            parsed, isolation_level="READ COMMITTED", pool_pre_ping=True, hide_parameters=True
        )
    raise ValueError(f"unsupported index database backend {backend!r}")


def session_factory(engine: Engine, *, readonly: bool = False) -> sessionmaker[Session]:
    """Return a session factory bound to ``engine``.

    Parameters
    ----------
    engine : Engine
        An engine from :func:`create_engine_for`.
    readonly : bool, optional
        On SQLite, start transactions with a deferred ``BEGIN`` instead of
        ``BEGIN IMMEDIATE`` (for C-FIND/C-GET/C-MOVE reads that must not block
        writers). No effect on PostgreSQL.

    Returns
    -------
    sessionmaker[Session]
        Sessions do not autoflush implicitly beyond SQLAlchemy's defaults and
        expire their objects on commit.
    """
    bind = engine
    if readonly and engine.dialect.name == "sqlite":
        bind = engine.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
    return sessionmaker(bind=bind, expire_on_commit=True)


def ping(session: Session) -> None:
    """Ask the database a trivial question; raises what its driver raises when it does not
    answer (readiness probes)."""
    session.execute(select(1))


def alembic_config(url: str | None = None) -> Config:
    """Build the Alembic configuration of the repository checkout.

    Parameters
    ----------
    url : str, optional
        Database URL, passed to ``alembic/env.py`` through ``Config.attributes``
        (so that ``%`` in passwords needs no escaping).

    Returns
    -------
    Config
        Configuration with ``script_location`` pointing at the shipped ``alembic/``.
    """
    ini = medzip_scp.shipped_path("alembic.ini")
    config = Config(str(ini)) if ini.is_file() else Config()
    config.set_main_option("script_location", str(medzip_scp.shipped_path("alembic")))
    if url is not None:
        config.attributes["url"] = url
    return config


def upgrade_database(url: str) -> None:
    """Migrate the database at ``url`` to the newest schema (``alembic upgrade head``).

    Parameters
    ----------
    url : str
        Database URL as accepted by :func:`create_engine_for`.
    """
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            postgres = connection.dialect.name == "postgresql"
            if postgres:
                # One migrator at a time: a node, its workers and other pods may start
                # together; the others wait, then find the schema current.
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATE_LOCK})
                connection.commit()  # the lock is the session's: it outlives this
            try:
                config = alembic_config(url)
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if connection.in_transaction():
                    connection.commit()
            finally:
                if postgres:
                    connection.rollback()
                    connection.execute(
                        text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATE_LOCK}
                    )
                    connection.commit()
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """Return the Alembic revision the database is at, or ``None`` if unversioned.

    Parameters
    ----------
    url : str
        Database URL as accepted by :func:`create_engine_for`.

    Returns
    -------
    str or None
        The current revision identifier.
    """
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def _normalise_default(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    while len(text) >= 2 and text[0] == "(" and text[-1] == ")":
        text = text[1:-1].strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    return text


def _compare_server_default(
    context: MigrationContext,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Server-default comparison that copes with SQLite reflecting ``''`` as ``('')``.

    Returns ``None`` (use Alembic's own comparison) on other dialects.
    """
    if context.dialect.name != "sqlite":
        return None
    return _normalise_default(inspected_default) != _normalise_default(rendered_metadata_default)


#: Options of Alembic's autogenerate comparison, shared by alembic/env.py and
#: :func:`schema_differences` (the ``alembic check`` of the test-suite).
MIGRATION_COMPARE_OPTIONS: dict[str, Any] = {
    "compare_type": True,
    "compare_server_default": _compare_server_default,
}


def schema_differences(url: str) -> list[Any]:
    """Compare the live schema at ``url`` with :data:`models.Base.metadata`.

    Parameters
    ----------
    url : str
        Database URL as accepted by :func:`create_engine_for`.

    Returns
    -------
    list
        Alembic autogenerate diffs; empty when the migrations match the models.
    """
    from medzip_scp.index.models import Base

    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts=MIGRATION_COMPARE_OPTIONS)
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()
