"""Schema comes from Alembic on both dialects and matches the models."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
from tests.conftest import database_url


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


def _migrate(url: str, revision: str, *, down: bool = False) -> None:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)
            connection.commit()
    finally:
        engine.dispose()


# An index written by revision 0001: the studies without Patient ID share the patient row
# of their issuer, which holds the newest instance's name.
_ROWS_OF_0001 = """
INSERT INTO patient (patient_id, issuer_of_patient_id, patient_name, patient_birth_date,
                     patient_sex, specific_character_set) VALUES
    ('', '', 'Newest^Sent', '19990909', 'O', ''),
    ('PID-1', '', 'Doe^John', '19700101', 'M', 'ISO_IR 100'),
    ('', 'ISSUER-B', 'Other^Issuer', '', '', '');
INSERT INTO study (study_instance_uid, patient_fk, study_description)
    SELECT uid, (SELECT id FROM patient WHERE patient_id = pid AND issuer_of_patient_id = issuer),
           description
    FROM (SELECT '1.2.3.10' AS uid, '' AS pid, '' AS issuer, 'no id A' AS description
          UNION ALL SELECT '1.2.3.11', '', '', 'no id B'
          UNION ALL SELECT '1.2.3.12', 'PID-1', '', 'with id'
          UNION ALL SELECT '1.2.3.13', '', 'ISSUER-B', 'no id, issuer B') AS rows;
INSERT INTO series (series_instance_uid, study_fk, modality)
    SELECT '1.2.3.20', id, 'CT' FROM study WHERE study_instance_uid = '1.2.3.10';
INSERT INTO instance (sop_instance_uid, sop_class_uid, series_fk, transfer_syntax_uid,
                      blob_key, original_size, original_sha256, stored_size, stored_sha256,
                      codec_id, state, received_at)
    SELECT '1.2.3.30', '1.2.840.10008.5.1.4.1.1.2', id, '1.2.840.10008.1.2.1', 'blobs/x', 1,
           'a', 1, 'b', 'raw', 'stored', '2026-01-01 00:00:00'
    FROM series WHERE series_instance_uid = '1.2.3.20';
"""

_STUDY_PATIENTS = text(
    "SELECT s.study_instance_uid, p.patient_id, p.issuer_of_patient_id, p.patient_name, "
    "s.patient_name, s.patient_birth_date, s.patient_sex, p.sole_study_uid "
    "FROM study s JOIN patient p ON p.id = s.patient_fk ORDER BY s.study_instance_uid"
)


def test_upgrade_gives_each_study_without_patient_id_its_own_patient(db_url: str) -> None:
    _migrate(db_url, "0001")
    engine = create_engine_for(db_url)
    try:
        with engine.begin() as connection:
            for statement in _ROWS_OF_0001.split(";"):
                if statement.strip():
                    connection.execute(text(statement))
        upgrade_database(db_url)
        assert schema_differences(db_url) == []
        with engine.connect() as connection:
            rows = [tuple(row) for row in connection.execute(_STUDY_PATIENTS)]
            patients = connection.execute(text("SELECT count(*) FROM patient")).scalar()
            instance_study = connection.execute(
                text(
                    "SELECT s.study_instance_uid FROM instance i JOIN series se "
                    "ON se.id = i.series_fk JOIN study s ON s.id = se.study_fk"
                )
            ).scalar()
        # A study keeps its patient's values as its own copy, except where the patient row
        # was shared by several studies without ID: those values may be another patient's.
        unknown = ("", "", "", "")
        assert rows == [
            ("1.2.3.10", "", "", *unknown, "1.2.3.10"),
            ("1.2.3.11", "", "", *unknown, "1.2.3.11"),
            ("1.2.3.12", "PID-1", "", "Doe^John", "Doe^John", "19700101", "M", ""),
            ("1.2.3.13", "", "ISSUER-B", "Other^Issuer", "Other^Issuer", "", "", "1.2.3.13"),
        ]
        assert patients == 4  # the two shared rows are gone
        assert instance_study == "1.2.3.10"

        # The downgrade merges them back into one patient per issuer.
        _migrate(db_url, "0001", down=True)
        with engine.connect() as connection:
            merged = connection.execute(
                text(
                    "SELECT s.study_instance_uid, p.issuer_of_patient_id FROM study s "
                    "JOIN patient p ON p.id = s.patient_fk WHERE p.patient_id = '' "
                    "ORDER BY s.study_instance_uid"
                )
            ).all()
            patients = connection.execute(text("SELECT count(*) FROM patient")).scalar()
        assert [tuple(row) for row in merged] == [
            ("1.2.3.10", ""),
            ("1.2.3.11", ""),
            ("1.2.3.13", "ISSUER-B"),
        ]
        assert patients == 3
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_processes_migrating_at_once_take_turns(tmp_path: Path) -> None:
    """A node, its workers and other pods may start together on one PostgreSQL database:
    they migrate one at a time (an advisory lock), and every one finds the schema current."""
    with database_url("postgresql", tmp_path) as url:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(upgrade_database, [url] * 4))  # none fails
        assert current_revision(url) == _head()
