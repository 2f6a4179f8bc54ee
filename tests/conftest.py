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
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from medzip_scp.audit import close_audit
from medzip_scp.index.db import create_engine_for, session_factory, upgrade_database

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
