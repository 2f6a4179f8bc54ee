"""Alembic environment of the medzip index (one migration tree for SQLite and PostgreSQL).

The URL comes from ``config.attributes["url"]`` (set by
:func:`medzip_scp.index.db.upgrade_database`), else ``MEDZIP_STORAGE__DATABASE_URL`` (the
node's own variable), else ``sqlalchemy.url`` in alembic.ini. A caller may also pass an
open connection in ``config.attributes["connection"]``. Engines are made with
:func:`medzip_scp.index.db.create_engine_for` so that migrations run with the same
SQLite pragmas and ``BEGIN IMMEDIATE`` as the node itself.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from medzip_scp.config import redact_url, setting_variables
from medzip_scp.index.db import MIGRATION_COMPARE_OPTIONS, create_engine_for
from medzip_scp.index.models import Base

config = context.config
target_metadata = Base.metadata
DATABASE_URL_VARIABLE = next(
    name for name, setting in setting_variables().items() if setting == ("storage", "database_url")
)

if config.config_file_name is not None and "connection" not in config.attributes:
    # Command-line use only: do not reconfigure the logging of a running node.
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = (
        config.attributes.get("url")
        or os.environ.get(DATABASE_URL_VARIABLE)
        or config.get_main_option("sqlalchemy.url")
    )
    if not url:
        # CommandError: the alembic command prints its message as one line, no traceback
        raise CommandError(
            f"no database URL: set {DATABASE_URL_VARIABLE} (as for the node), or run "
            "`medzip db upgrade`, which finds the database as the node does"
        )
    return str(url)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # Table rebuilds ("move and copy") are needed for ALTER on SQLite only.
        render_as_batch=connection.dialect.name == "sqlite",
        **MIGRATION_COMPARE_OPTIONS,
        # SQLite DDL is transactional once BEGIN is emitted explicitly (db.py does).
        transactional_ddl=True,
    )


def _run_on(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    raw = connection.connection.dbapi_connection if sqlite else None
    if raw is not None:
        # Batch migrations drop and recreate tables; foreign key enforcement must be
        # off meanwhile (PRAGMA foreign_keys is ignored inside a transaction, so this
        # runs on the autocommit driver connection before alembic begins).
        raw.execute("PRAGMA foreign_keys = OFF")
    try:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
            if raw is not None:
                violations = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if violations:
                    raise RuntimeError(f"migration left {len(violations)} foreign key violations")
    finally:
        if raw is not None:
            raw.execute("PRAGMA foreign_keys = ON")


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``)."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on a live connection."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    url = _url()
    engine = create_engine_for(url)
    try:
        try:
            conn = engine.connect()
        except OperationalError as exc:
            reason = str(exc.orig or exc).splitlines()[0]
            raise CommandError(
                f"cannot reach the index database at {redact_url(url)}: {redact_url(reason)}"
            ) from None
        with conn:
            _run_on(conn)
            if conn.in_transaction():
                conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
