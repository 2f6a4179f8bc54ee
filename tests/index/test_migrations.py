"""Schema comes from Alembic on both dialects and matches the models."""

from __future__ import annotations

import sqlite3

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from medzip_scp.index.db import (
    alembic_config,
    create_engine_for,
    current_revision,
    schema_differences,
    upgrade_database,
)


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def test_upgrade_from_empty_matches_models(db_url: str) -> None:
    assert current_revision(db_url) is None
    upgrade_database(db_url)
    assert current_revision(db_url) == _head()
    # `alembic check`: autogenerate finds nothing to change.
    assert schema_differences(db_url) == []
    engine = create_engine_for(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"patient", "study", "series", "instance", "superseded_instance"} <= tables


def test_upgrade_is_idempotent_and_downgrade_roundtrips(db_url: str) -> None:
    upgrade_database(db_url)
    upgrade_database(db_url)
    assert current_revision(db_url) == _head()
    engine = create_engine_for(db_url)
    try:
        with engine.connect() as connection:
            config = alembic_config(db_url)
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
            connection.commit()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    assert current_revision(db_url) is None
    upgrade_database(db_url)
    assert schema_differences(db_url) == []


def test_single_linear_history() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    assert len(script.get_bases()) == 1


def test_sqlite_connection_settings(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'index.db'}"
    upgrade_database(url)
    engine = create_engine_for(url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        # Every transaction is BEGIN IMMEDIATE: an open (still empty) transaction
        # already holds the write lock.
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT 1"))
            other = sqlite3.connect(tmp_path / "index.db", timeout=0, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
        # AUTOCOMMIT connections emit no BEGIN and leave the driver in autocommit.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SELECT 1"))
            assert conn.connection.dbapi_connection.in_transaction is False
        # ... and the pooled connection is back to SQLAlchemy-managed BEGIN afterwards.
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT 1"))
            assert conn.connection.dbapi_connection.in_transaction is True
    finally:
        engine.dispose()


def test_rejects_in_memory_and_unknown_backends() -> None:
    with pytest.raises(ValueError, match="file path"):
        create_engine_for("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        create_engine_for("mysql://localhost/x")


@pytest.mark.postgres
def test_postgresql_read_committed(db_engine) -> None:
    if db_engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    with db_engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
